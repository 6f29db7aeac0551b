"""The training loop for one rank, a plain torchrun entry point:

    torchrun --standalone --nproc_per_node=N -m gptlib.train --config RUN_DIR/config.yaml

`gptlib train` and the notebook start it through gptlib.launch; multi-node users run the same module
under torchrun's own `--nnodes/--node-rank/--rdzv-endpoint` flags.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the slow imports below; see gptlib.lifeline
    from gptlib.lifeline import die_with_parent

    die_with_parent()

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gptlib import checkpoint as ckpt
from gptlib.config import ConfigError, RunConfig, TrainConfig, check_world_size, load_config
from gptlib.data import BatchReader, TokenFile, open_tokenizer, resolve_dataset, token_budget
from gptlib.lifeline import hold_writer_lock
from gptlib.metrics import SpikeDetector, aggregate_period, peak_flops, read_metrics
from gptlib.model import GPTModel, count_parameters, flops_per_token
from gptlib.optim import build_optimizer, lr_at, set_lr


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. too many consecutive non-finite steps)."""


# --------------------------------------------------------------------------- device and precision


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available; allowed: auto, cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """Native bf16 matmul support (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn `auto` into bf16 or fp32 for this device; refuse bf16 where the GPU cannot do it."""
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
    else:
        bf16_ok = cpu_has_bf16()
    if precision == "auto":
        return "bf16" if bf16_ok else "fp32"
    if precision == "bf16" and device.type == "cuda" and not bf16_ok:
        raise ConfigError(
            f"train.precision=bf16 is not supported by {torch.cuda.get_device_name(device)}; "
            "allowed here: fp16, fp32"
        )
    return precision


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for fp16/bf16 (TF32 allowed), nothing for fp32 (TF32 off)."""
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def use_compile(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.compile if cfg.compile is not None else device.type == "cuda"


# --------------------------------------------------------------------------- run records


def versions() -> dict:
    import tiktoken

    from gptlib import __version__

    return {
        "gptlib": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tiktoken": tiktoken.__version__,
        "cuda": torch.version.cuda,
    }


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_summary(run_dir: Path, summary: dict) -> None:
    path = run_dir / "summary.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    ckpt.write_text_atomic(path, json.dumps({**previous, **summary}, indent=2) + "\n")


def end_of_run_lines(summary: dict) -> list[str]:
    """The series' closing lines."""
    return [
        f"Training complete in {summary['wall_time_s']:.2f} seconds",
        f"Tokens seen: {summary['tokens_seen']:,}",
        f"Throughput: {summary['tokens_per_s']:,.0f} tokens/second",
        f"Final train loss: {summary['final_train_loss']:.3f}",
    ]


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity; a non-finite value is recorded as null."""
    return value if math.isfinite(value) else None


def format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


# --------------------------------------------------------------------------- the loop


@dataclass
class RankContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    log_file: Path

    def log(self, message: str, console: bool | None = None) -> None:
        """Append to this rank's log; rank 0 also prints (what the launcher streams)."""
        with open(self.log_file, "a") as f:
            f.write(message + "\n")
        if console if console is not None else self.rank == 0:
            print(message, flush=True)


@dataclass
class RunState:
    """What the loop carries across steps and stores in each checkpoint's meta.json."""

    best_loss: float | None = None
    best_step: int | None = None
    skipped_total: int = 0
    wall_time_s: float = 0.0
    final_train_loss: float | None = None
    pending: list = field(default_factory=list)  # per-step device tensors not yet reduced
    period: list = field(default_factory=list)  # host records of the current period


def micro_batch_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                     autocast: contextlib.AbstractContextManager) -> torch.Tensor:
    """Mean cross-entropy of one micro-batch: `model(inputs, targets)`, the chunked LM-head loss that
    never materialises the [batch x tokens x vocab] logits (see `GPTModel.forward`)."""
    with autocast:
        return model(inputs, targets)


def gather_rng_states(device: torch.device) -> dict[str, list[torch.Tensor]]:
    """RNG states of every rank (a collective call), for exact resume."""
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {kind: [states[kind] for states in everyone] for kind in mine}


def train(cfg: RunConfig, run_dir: Path, resume: str | None, ctx: RankContext) -> dict | None:
    """Train one rank; rank 0 returns the run summary."""
    t = cfg.train
    check_world_size(cfg, ctx.world_size)
    precision = resolve_precision(t.precision, ctx.device)
    autocast = autocast_context(precision, ctx.device)

    train_tokens = TokenFile(resolve_dataset(t.dataset) / "train.safetensors")
    ga = t.gradient_accumulation_steps
    reader = BatchReader(train_tokens, t.microbatch_size, cfg.model.context_length, ga,
                         ctx.world_size, t.start_train_token, pin_memory=ctx.device.type == "cuda")
    global_batch_tokens = t.microbatch_size * cfg.model.context_length * ga * ctx.world_size
    total_steps, _ = token_budget(t.min_train_tokens, global_batch_tokens, len(train_tokens),
                                  t.start_train_token)

    torch.manual_seed(t.random_seed)  # as the series: seed, then build the model
    raw_model = GPTModel(cfg.model)
    if t.training_seed is not None:  # data-order/dropout noise apart from initialisation noise
        torch.manual_seed(t.training_seed)
    raw_model.to(ctx.device)
    optimizer = build_optimizer(raw_model, t, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type) if precision == "fp16" else None

    state = RunState()
    start_step = 0
    if resume:
        path = ckpt.resolve_checkpoint(run_dir, resume)
        meta, rng = ckpt.load_checkpoint(path, raw_model, optimizer, scaler, ctx.device)
        if meta["world_size"] != ctx.world_size:
            raise TrainingError(f"checkpoint {path.name} was written by {meta['world_size']} "
                                f"processes; resume it with --nproc {meta['world_size']}")
        start_step = meta["step"]
        state.best_loss, state.best_step = meta["best_loss"], meta["best_step"]
        state.skipped_total, state.wall_time_s = meta["skipped_total"], meta["wall_time_s"]
        state.final_train_loss = meta["period"]["loss_avg"]

    model: torch.nn.Module = raw_model
    if use_compile(t, ctx.device):
        model = torch.compile(model)
    # Gradients as views into DDP's all-reduce buckets: one gradient-sized buffer fewer per rank.
    model = DistributedDataParallel(
        model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        gradient_as_bucket_view=True,
    )
    params = [p for p in raw_model.parameters() if p.requires_grad]

    if ctx.rank == 0:
        ckpt.remove_partial_checkpoints(run_dir)  # debris of a crash during a checkpoint write
    metrics_path = run_dir / "metrics.jsonl"
    spikes_path = run_dir / "spikes.json"
    detector = SpikeDetector(t.spike_window, t.spike_threshold)
    spikes: list[dict] = []
    if ctx.rank == 0:
        # Steps after the checkpoint we resume from are recomputed; drop their records.
        kept = [r for r in read_metrics(metrics_path) if r["step"] < start_step]
        ckpt.write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        for r in kept:
            if not r["skipped"]:
                detector.update(r["loss"])
        if spikes_path.exists() and resume:
            spikes = [s for s in json.loads(spikes_path.read_text()) if s["step"] < start_step]
        write_summary(run_dir, {"status": "running", "error": None, "run_name": cfg.run_name,
                                "scale": cfg.scale, "interventions": cfg.interventions,
                                "world_size": ctx.world_size, "device": str(ctx.device),
                                "precision": precision, "total_steps": total_steps,
                                "tokenizer": open_tokenizer(t.dataset).name})
        ctx.log(f"Run {cfg.scale}/{cfg.run_name}: {count_parameters(raw_model):,} parameters, "
                f"{ctx.world_size} x {ctx.device.type}, {precision}, {total_steps:,} steps of "
                f"{global_batch_tokens:,} tokens"
                + (f", resuming after step {start_step:,}" if start_step else ""))
    metrics_file = open(metrics_path, "a") if ctx.rank == 0 else None
    peak = peak_flops(ctx.device, precision) if ctx.rank == 0 else None
    tokens_seen_at_start = start_step * global_batch_tokens
    session_start = time.perf_counter()
    last_flush_time, last_flush_step = session_start, start_step

    def flush(step: int) -> None:
        """Reduce the pending per-step values over ranks and (rank 0) write their records."""
        nonlocal last_flush_time, last_flush_step
        stats = torch.stack([values for values, _, _ in state.pending])  # loss, norm, clipped
        host = [(lr, skipped) for _, lr, skipped in state.pending]
        state.pending.clear()
        dist.all_reduce(stats)
        stats = [row + [lr, skipped]
                 for row, (lr, skipped) in zip((stats / ctx.world_size).tolist(), host, strict=True)]
        now = time.perf_counter()
        tokens_per_s = (step + 1 - last_flush_step) * global_batch_tokens / (now - last_flush_time)
        first = last_flush_step
        last_flush_time, last_flush_step = now, step + 1
        if metrics_file is None:
            return
        for offset, (loss, grad_norm, clipped, lr, skipped) in enumerate(stats):
            s = first + offset
            record = {"step": s, "tokens": (s + 1) * global_batch_tokens,
                      "loss": finite_or_none(loss), "lr": lr, "grad_norm": finite_or_none(grad_norm),
                      "clipped": clipped > 0.5, "skipped": skipped, "tokens_per_s": tokens_per_s}
            metrics_file.write(json.dumps(record) + "\n")
            state.period.append(record)
            if not record["skipped"]:
                is_spike, level = detector.update(loss)
                if is_spike:
                    spikes.append({
                        "step": s, "loss": loss, "level": level, "grad_norm": grad_norm,
                        "lr": lr, "clipped": record["clipped"], "skipped": False,
                        "windows": {str(r): [w for a in range(ga)
                                             for w in reader.window_indices(s, a, r)]
                                    for r in range(ctx.world_size)},
                    })
        metrics_file.flush()
        ckpt.write_text_atomic(spikes_path, json.dumps(spikes, indent=1))
        elapsed = state.wall_time_s + now - session_start
        eta = (total_steps - step - 1) * (now - session_start) / max(1, step + 1 - start_step)
        ctx.log(f"step {step + 1:,}/{total_steps:,} | loss {stats[-1][0]:.4f} | "
                f"lr {stats[-1][3]:.2e} | {tokens_per_s:,.0f} tok/s | "
                f"elapsed {format_duration(elapsed)} | ETA {format_duration(eta)}")

    def save(step: int) -> None:
        rng = gather_rng_states(ctx.device)
        if ctx.rank != 0:
            return
        period = aggregate_period(state.period)
        state.period.clear()
        if period["loss_avg"] is not None:
            state.final_train_loss = period["loss_avg"]
        is_best = period["loss_avg"] is not None and (
            state.best_loss is None or period["loss_avg"] < state.best_loss)
        if is_best:
            state.best_loss, state.best_step = period["loss_avg"], step + 1
        meta = {"tokens_seen": (step + 1) * global_batch_tokens, "period": period,
                "best_loss": state.best_loss, "best_step": state.best_step,
                "skipped_total": state.skipped_total, "world_size": ctx.world_size,
                "wall_time_s": state.wall_time_s + time.perf_counter() - session_start,
                "run_name": cfg.run_name, "precision": precision}
        path = ckpt.save_checkpoint(run_dir, step + 1, raw_model, optimizer, scaler, rng, meta,
                                    is_best)
        if t.keep_checkpoints > 0:
            ckpt.prune_checkpoints(run_dir, t.keep_checkpoints)
        ctx.log(f"checkpoint {path.name}: period loss avg {period['loss_avg']:.4f} "
                f"(min {period['loss_min']:.4f}, max {period['loss_max']:.4f})"
                + (" - best so far" if is_best else ""))

    if resume:  # restored last, so nothing above can consume the dropout RNG stream
        torch.set_rng_state(rng["cpu"][ctx.rank])
        if ctx.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"][ctx.rank], ctx.device)
    consecutive_skips = 0
    for step in range(start_step, total_steps):
        lr = lr_at(step, t, total_steps)
        set_lr(optimizer, lr)
        loss_sum = torch.zeros((), device=ctx.device)
        for accum in range(ga):
            inputs, targets = reader.get(step, accum, ctx.rank)
            inputs = inputs.to(ctx.device, non_blocking=True)
            targets = targets.to(ctx.device, non_blocking=True)
            # Gradients are all-reduced only on the last micro-batch of the step.
            sync = model.no_sync() if accum < ga - 1 else contextlib.nullcontext()
            with sync:
                loss = micro_batch_loss(model, inputs, targets, autocast)
                scaled = loss / ga
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            loss_sum += loss.detach()

        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        clipped = torch.zeros((), device=ctx.device)
        if t.clipping_max_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, t.clipping_max_norm, grad_norm)
            clipped = (grad_norm > t.clipping_max_norm).float()
        if scaler is not None:
            scale_before = scaler.get_scale()
            scaler.step(optimizer)  # skips the update itself when a gradient is not finite
            scaler.update()
            skipped = scaler.get_scale() < scale_before
        else:
            skipped = not bool(torch.isfinite(grad_norm) & torch.isfinite(loss_sum))
            if not skipped:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        if skipped:
            state.skipped_total += 1
            consecutive_skips += 1
            if consecutive_skips >= t.max_nonfinite_steps:
                raise TrainingError(
                    f"{consecutive_skips} consecutive non-finite steps (last: step {step}, lr "
                    f"{lr:.2e}); the run cannot recover - lower train.learning_rate, enable "
                    "train.clipping_max_norm, or resume from an earlier checkpoint"
                )
        else:
            consecutive_skips = 0
        state.pending.append((torch.stack([loss_sum / ga, grad_norm.float(), clipped]), lr, skipped))

        at_checkpoint = (step + 1) % t.checkpoint_interval == 0 or step + 1 == total_steps
        if at_checkpoint or (step + 1) % t.log_interval == 0:
            flush(step)
        if at_checkpoint:
            save(step)

    if metrics_file is not None:
        metrics_file.close()
    if ctx.rank != 0:
        return None
    session_time = time.perf_counter() - session_start
    wall = state.wall_time_s + session_time
    tokens_seen = total_steps * global_batch_tokens
    tokens_per_s = (tokens_seen - tokens_seen_at_start) / session_time
    summary = {
        "status": "completed", "wall_time_s": wall, "tokens_seen": tokens_seen,
        "tokens_per_s": tokens_per_s,
        "mfu": (tokens_per_s * flops_per_token(cfg.model) / (peak * ctx.world_size)
                if peak else None),
        "final_train_loss": state.final_train_loss, "best_step": state.best_step,
        "best_loss": state.best_loss, "skipped_steps": state.skipped_total,
        "spike_count": len(spikes), "versions": versions(), "git_commit": git_commit(),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_summary(run_dir, summary)
    for line in end_of_run_lines(summary):
        ctx.log(line)
    return summary


# --------------------------------------------------------------------------- entry point


def unresponsive_ranks(monitor: dist.ProcessGroup, timeout_s: int) -> str:
    """After a collective timed out: ask every rank to check in, and name those that do not."""
    try:
        dist.monitored_barrier(group=monitor, wait_all_ranks=True,
                               timeout=datetime.timedelta(seconds=min(timeout_s, 60)))
    except RuntimeError as error:
        found = re.search(r"Ranks? ([\d, ]+) failed to pass", str(error))
        if found:
            return (f"rank {found.group(1).strip()} stopped responding: no answer within "
                    f"train.collective_timeout_s={timeout_s} s")
        return f"a collective timed out after {timeout_s} s; {str(error).splitlines()[0]}"
    return f"a collective timed out after {timeout_s} s, yet every rank answered afterwards"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gptlib.train", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="RUN_DIR/config.yaml")
    parser.add_argument("--resume", default=None, help="latest, best or step-N")
    args = parser.parse_args(argv)

    cfg = load_config(args.config)
    run_dir = args.config.resolve().parent
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(cfg.train.device, local_rank)
    (run_dir / "logs").mkdir(exist_ok=True)
    if rank == 0:
        hold_writer_lock(run_dir)
    ctx = RankContext(rank, world_size, local_rank, device, run_dir / "logs" / f"rank-{rank}.log")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "MASTER_ADDR" not in os.environ:  # plain `python -m gptlib.train`: a world of one
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0", RANK="0", WORLD_SIZE="1")
    timeout = datetime.timedelta(seconds=cfg.train.collective_timeout_s)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    # A separate gloo group that only ever runs the diagnostic barrier below, so it is usable
    # even when a collective of the main group has timed out.
    monitor = dist.new_group(backend="gloo", timeout=timeout) if world_size > 1 else None
    try:
        train(cfg, run_dir, args.resume, ctx)
    except BaseException as error:
        ctx.log("".join(traceback.format_exception(error)).rstrip(), console=False)
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        if monitor is not None and "timed out" in str(error).lower().replace("timeout", "timed out"):
            message = f"{unresponsive_ranks(monitor, cfg.train.collective_timeout_s)} ({message})"
        print(f"[rank {rank}] {message}", file=sys.stderr, flush=True)
        ctx.log(f"[rank {rank}] {message}", console=False)
        raise SystemExit(1) from None
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
