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
import functools
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gptlib import checkpoint as ckpt
from gptlib import rundir
from gptlib.config import RunConfig, check_world_size
from gptlib.data import BatchReader, token_budget
from gptlib.device import autocast_context, pick_device, resolve_precision, use_compile
from gptlib.display import format_duration
from gptlib.lifeline import hold_writer_lock
from gptlib.metrics import MetricsLog, SpikeDetector, StepStats, is_checkpoint_step, peak_flops
from gptlib.model import GPTModel, count_parameters, flops_per_token
from gptlib.optim import build_optimizer, lr_at, set_lr
from gptlib.presets import load_config
from gptlib.sources import dataset_split, open_tokenizer


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. too many consecutive non-finite steps)."""


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


# --------------------------------------------------------------------------- one optimizer step


def micro_batch_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                     autocast: contextlib.AbstractContextManager) -> torch.Tensor:
    """Mean cross-entropy of one micro-batch: `model(inputs, targets)`, the chunked LM-head loss that
    never materialises the [batch x tokens x vocab] logits (see `GPTModel.forward`)."""
    with autocast:
        return model(inputs, targets)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    accumulation: int,
    autocast: contextlib.AbstractContextManager,
    scaler: torch.amp.GradScaler | None = None,
    clip_norm: float | None = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
) -> StepStats:
    """Accumulate `accumulation` micro-batches (`micro_batch(i)`), unscale, measure the gradient
    norm, clip, then step, or skip when a gradient is not finite. (`loss_fn` is for the bench's
    ablation; training always uses `micro_batch_loss`.)"""
    loss_fn = loss_fn or micro_batch_loss
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum = torch.zeros((), device=params[0].device)
    losses = []
    for accum in range(accumulation):
        inputs, targets = micro_batch(accum)
        # Under DDP, gradients are all-reduced only on the last micro-batch of the step.
        last = accum == accumulation - 1
        sync = model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
        with sync:
            loss = loss_fn(model, inputs, targets, autocast)
            scaled = loss / accumulation
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach()
        losses.append(loss.detach())

    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    clipped = torch.zeros((), device=loss_sum.device)
    if clip_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, clip_norm, grad_norm)
        clipped = (grad_norm > clip_norm).float()
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
    return StepStats(loss_sum / accumulation, grad_norm.float(), clipped, skipped, torch.stack(losses))


# --------------------------------------------------------------------------- what the loop carries


@dataclass
class RunState:
    """The counters a run carries across steps; stored in, and restored from, each checkpoint."""

    best_loss: float | None = None
    best_step: int | None = None
    skipped_total: int = 0
    wall_time_s: float = 0.0  # before this session
    final_train_loss: float | None = None
    consecutive_skips: int = 0  # not stored: a resume starts counting again

    @classmethod
    def from_meta(cls, meta: dict) -> RunState:
        return cls(best_loss=meta["best_loss"], best_step=meta["best_step"],
                   skipped_total=meta["skipped_total"], wall_time_s=meta["wall_time_s"],
                   final_train_loss=meta["period"]["loss_avg"])

    def to_meta(self, elapsed_s: float) -> dict:
        return {"best_loss": self.best_loss, "best_step": self.best_step,
                "skipped_total": self.skipped_total, "wall_time_s": self.wall_time_s + elapsed_s}

    def count(self, stats: StepStats, step: int, lr: float, max_nonfinite: int | None) -> None:
        """Count a skipped step; too many in a row end the run (never, with `max_nonfinite`
        None: the series' loop carries on whatever happens)."""
        if not stats.skipped:
            self.consecutive_skips = 0
            return
        self.skipped_total += 1
        self.consecutive_skips += 1
        if max_nonfinite is not None and self.consecutive_skips >= max_nonfinite:
            raise TrainingError(
                f"{self.consecutive_skips} consecutive non-finite steps (last: step {step}, lr "
                f"{lr:.2e}); the run cannot recover - lower train.learning_rate, enable "
                "train.clipping_max_norm, or resume from an earlier checkpoint"
            )

    def end_period(self, period: dict, steps_done: int) -> bool:
        """Take a checkpoint period's aggregates; True when its loss is the best so far."""
        loss = period["loss_avg"]
        if loss is not None:
            self.final_train_loss = loss
        is_best = loss is not None and (self.best_loss is None or loss < self.best_loss)
        if is_best:
            self.best_loss, self.best_step = loss, steps_done
        return is_best


class Checkpointer:
    """When to checkpoint, and the checkpoint itself: every rank's RNG state, weights, optimizer,
    pointers (latest, best) and pruning down to `train.keep_checkpoints`."""

    def __init__(self, run_dir: Path, cfg: RunConfig, ctx: RankContext, precision: str):
        self.run_dir, self.cfg, self.ctx, self.precision = run_dir, cfg, ctx, precision
        if ctx.rank == 0:
            ckpt.remove_temporary_files(ckpt.checkpoints_dir(run_dir))  # a crash mid-checkpoint

    def is_due(self, step: int, total_steps: int) -> bool:
        """After 0-based `step`? (gptlib's and the series' steps: metrics.is_checkpoint_step)"""
        t = self.cfg.train
        return is_checkpoint_step(step, total_steps, t.checkpoint_interval, t.protocol)

    def gather_rng_states(self) -> dict[str, list[torch.Tensor]]:
        """RNG states of every rank (a collective call), for exact resume."""
        mine = {"cpu": torch.get_rng_state()}
        if self.ctx.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.ctx.device)
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        return {kind: [states[kind] for states in everyone] for kind in mine}

    def save(self, steps_done: int, model: GPTModel, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler | None, log: MetricsLog, state: RunState,
             elapsed_s: float) -> None:
        rng = self.gather_rng_states()
        if self.ctx.rank != 0:
            return
        period = log.take_period()
        is_best = state.end_period(period, steps_done)
        stored = state.to_meta(elapsed_s)
        meta = {"tokens_seen": steps_done * log.tokens_per_step, "period": period,
                "best_loss": stored["best_loss"], "best_step": stored["best_step"],
                "skipped_total": stored["skipped_total"], "world_size": self.ctx.world_size,
                "wall_time_s": stored["wall_time_s"], "run_name": self.cfg.run_name,
                "precision": self.precision}
        path = ckpt.save_checkpoint(self.run_dir, steps_done, model, optimizer, scaler, rng, meta,
                                    is_best)
        if self.cfg.train.keep_checkpoints > 0:
            ckpt.prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        self.ctx.log(f"checkpoint {path.name}: period loss avg {_loss(period['loss_avg'])} "
                     f"(min {_loss(period['loss_min'])}, max {_loss(period['loss_max'])})"
                     + (" - best so far" if is_best else ""))


def _loss(value: float | None) -> str:
    return "n/a (not finite)" if value is None else f"{value:.4f}"


# --------------------------------------------------------------------------- the loop


def train(cfg: RunConfig, run_dir: Path, resume: str | None, ctx: RankContext) -> dict | None:
    """Train one rank; rank 0 returns the run summary."""
    t = cfg.train
    check_world_size(cfg, ctx.world_size)
    precision = resolve_precision(t.precision, ctx.device)
    autocast = autocast_context(precision, ctx.device)
    ga, tokens_per_step = t.gradient_accumulation_steps, cfg.tokens_per_step(ctx.world_size)
    train_tokens = dataset_split(t.dataset, "train")
    reader = BatchReader(train_tokens, t.microbatch_size, cfg.model.context_length, ga,
                         ctx.world_size, t.start_train_token, pin_memory=ctx.device.type == "cuda")
    total_steps, _ = token_budget(t.min_train_tokens, tokens_per_step, len(train_tokens),
                                  t.start_train_token)

    torch.manual_seed(t.random_seed)  # as the series: seed, then build the model
    raw_model = GPTModel(cfg.model)
    if t.training_seed is not None:  # data-order/dropout noise apart from initialisation noise
        torch.manual_seed(t.training_seed)
    raw_model.to(ctx.device)
    optimizer = build_optimizer(raw_model, t, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type) if precision == "fp16" else None
    state, start_step, rng = RunState(), 0, None
    if resume:
        state, start_step, rng = restore(run_dir, resume, raw_model, optimizer, scaler, ctx)
    model = torch.compile(raw_model) if use_compile(t, ctx.device) else raw_model
    # Gradients as views into DDP's all-reduce buckets: one gradient-sized buffer fewer per rank.
    model = DistributedDataParallel(
        model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        gradient_as_bucket_view=True,
    )

    checkpointer = Checkpointer(run_dir, cfg, ctx, precision)
    log = MetricsLog(run_dir, ctx.rank, ctx.world_size, tokens_per_step,
                     SpikeDetector(t.spike_window, t.spike_threshold), reader.step_windows, start_step,
                     bool(resume), t.protocol)
    if ctx.rank == 0:
        rundir.merge_summary(run_dir, {
            "status": "running", "error": None, "run_name": cfg.run_name, "scale": cfg.scale,
            "interventions": cfg.interventions, "world_size": ctx.world_size, "device": str(ctx.device),
            "precision": precision, "total_steps": total_steps,
            "tokenizer": open_tokenizer(t.dataset).name})
        ctx.log(f"Run {cfg.scale}/{cfg.run_name}: {count_parameters(raw_model):,} parameters, "
                f"{ctx.world_size} x {ctx.device.type}, {precision}, {total_steps:,} steps of "
                f"{tokens_per_step:,} tokens"
                + (f", resuming after step {start_step:,}" if start_step else ""))
    peak = peak_flops(ctx.device, precision) if ctx.rank == 0 else None
    session_start = log.start_clock()

    def micro_batch(step: int, accum: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = reader.get(step, accum, ctx.rank)
        return inputs.to(ctx.device, non_blocking=True), targets.to(ctx.device, non_blocking=True)

    if rng is not None:  # restored last, so nothing above can consume the dropout RNG stream
        torch.set_rng_state(rng["cpu"][ctx.rank])
        if ctx.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"][ctx.rank], ctx.device)
    for step in range(start_step, total_steps):
        lr = lr_at(step, t, total_steps)
        set_lr(optimizer, lr)
        stats = train_step(model, optimizer, functools.partial(micro_batch, step), ga, autocast, scaler,
                           t.clipping_max_norm)
        state.count(stats, step, lr, None if t.protocol == "series" else t.max_nonfinite_steps)
        log.add(stats, lr)
        at_checkpoint = checkpointer.is_due(step, total_steps)
        if at_checkpoint or (step + 1) % t.log_interval == 0:
            record = log.flush(step)
            if record is not None:
                ctx.log(progress_line(step, total_steps, log.last_loss, record, state, session_start,
                                      start_step))
        if at_checkpoint:
            elapsed = time.perf_counter() - session_start
            checkpointer.save(step + 1, raw_model, optimizer, scaler, log, state, elapsed)
    log.close()
    if ctx.rank != 0:
        return None
    summary = final_summary(cfg, state, total_steps * tokens_per_step, start_step * tokens_per_step,
                            time.perf_counter() - session_start, peak, ctx.world_size, len(log.spikes))
    rundir.merge_summary(run_dir, summary)
    for line in rundir.end_of_run_lines(summary):
        ctx.log(line)
    return summary


def restore(run_dir: Path, which: str, model: GPTModel, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler | None, ctx: RankContext) -> tuple[RunState, int, dict]:
    """Load checkpoint `which` into the model, optimizer and scaler; returns the run state, the
    steps it had done and every rank's RNG states (set just before the first step)."""
    path = ckpt.resolve_checkpoint(run_dir, which)
    meta, rng = ckpt.load_checkpoint(path, model, optimizer, scaler, ctx.device)
    if meta["world_size"] != ctx.world_size:
        raise TrainingError(f"checkpoint {path.name} was written by {meta['world_size']} "
                            f"processes; resume it with --nproc {meta['world_size']}")
    return RunState.from_meta(meta), meta["step"], rng


def progress_line(step: int, total_steps: int, loss: float, record: dict, state: RunState,
                  session_start: float, start_step: int) -> str:
    now = time.perf_counter()
    elapsed = state.wall_time_s + now - session_start
    eta = (total_steps - step - 1) * (now - session_start) / max(1, step + 1 - start_step)
    return (f"step {step + 1:,}/{total_steps:,} | loss {loss:.4f} | "
            f"lr {record['lr']:.2e} | {record['tokens_per_s']:,.0f} tok/s | "
            f"elapsed {format_duration(elapsed)} | ETA {format_duration(eta)}")


def final_summary(cfg: RunConfig, state: RunState, tokens_seen: int, tokens_at_start: int,
                  session_s: float, peak: float | None, world_size: int, spike_count: int) -> dict:
    """What summary.json records when the run completes."""
    tokens_per_s = (tokens_seen - tokens_at_start) / session_s
    return {
        "status": "completed", "wall_time_s": state.wall_time_s + session_s, "tokens_seen": tokens_seen,
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops_per_token(cfg.model) / (peak * world_size) if peak else None,
        "final_train_loss": state.final_train_loss, "best_step": state.best_step,
        "best_loss": state.best_loss, "skipped_steps": state.skipped_total,
        "spike_count": spike_count, "versions": rundir.versions(), "git_commit": rundir.git_commit(),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


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
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        if monitor is not None and "timed out" in str(error).lower().replace("timeout", "timed out"):
            message = f"{unresponsive_ranks(monitor, cfg.train.collective_timeout_s)} ({message})"
        print(f"[rank {rank}] {message}", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):  # the log too may sit on the disk that is full
            ctx.log("".join(traceback.format_exception(error)).rstrip(), console=False)
            ctx.log(f"[rank {rank}] {message}", console=False)
        raise SystemExit(1) from None
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
