"""`scripts/gpu-check`: the CUDA path of a full-scale run, checked in one prepared call.

On one GPU (in about 8 minutes, no network) it measures and checks what a user's first
`-p scale gpt2-small-8xa100` would otherwise be the first to run:

1. the largest GPT-2-small micro-batch (context 1,024) that fits, probed with one bf16 step;
2. `gptlib bench --device cuda` at that micro-batch for bf16 and fp16, torch.compile off and on:
   tokens/s, MFU against the device's dense peak and peak memory, beside the book's reference code
   in the same precision (the reference runs once per precision; compile changes only gptlib);
3. exact resume: a GPT-2-small-shaped run on a synthetic token file with fp16 + GradScaler,
   SIGKILLed after its first checkpoint and resumed, against an uninterrupted twin: bit identity of
   the final weights, else the largest difference (with compile on, kernels chosen by autotuning
   may differ between processes, so only closeness may hold);
4. a 2-rank NCCL run when the machine has two GPUs (skipped, and said so, otherwise).

`--cpu` runs the same steps with tiny shapes on the CPU (bf16 where the CPU has it, else fp32;
compile off; a 2-rank gloo run instead of NCCL) in about a minute, so CI and every developer check
the script itself.
Everything measured goes to one JSON file (`--out`, default `gpu-check/gpu-check.json`), and a short
table is printed. Exit 0 when every check ran and resume was exact (or, with compile, within
`CLOSE_ATOL`); 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptlib import rundir

GPT2_CONTEXT = 1024
MICROBATCH_CANDIDATES = (64, 48, 32, 24, 16, 12, 8, 4, 2, 1)
MEMORY_HEADROOM = 0.9  # a micro-batch "fits" when one step peaks below 90% of the device memory
CLOSE_ATOL = 1e-3  # compile on: final weights within this of the uninterrupted twin count as close
CPU_SHAPE = {"layers": 2, "heads": 2, "emb": 64, "context": 64, "microbatch": 2}


def _say(message: str) -> None:
    print(f"gpu-check: {message}", file=sys.stderr, flush=True)


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def machine(cpu: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
                            "mode": "cpu" if cpu else "cuda"}
    if not cpu:
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, memory_gb=round(props.total_memory / 1e9, 1),
                    bf16=torch.cuda.is_bf16_supported(), nccl=torch.cuda.nccl.version())
    else:
        from gptlib.bench_workers import cpu_name

        info.update(device=cpu_name(), threads=torch.get_num_threads())
    return info


def largest_microbatch() -> dict[str, Any]:
    """The largest GPT-2-small micro-batch whose bf16 training step fits (with headroom)."""
    from gptlib.config import ModelConfig, TrainConfig
    from gptlib.model import GPTModel
    from gptlib.optim import build_optimizer

    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    tried = {}
    for microbatch in MICROBATCH_CANDIDATES:
        model = optimizer = None
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            torch.manual_seed(0)
            model = GPTModel(ModelConfig()).to(device)
            optimizer = build_optimizer(model, TrainConfig(), device)
            tokens = torch.randint(0, 50257, (microbatch, GPT2_CONTEXT + 1), device=device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            optimizer.step()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            tried[microbatch] = round(peak / 2**20)
            if peak < MEMORY_HEADROOM * total:
                return {"microbatch": microbatch, "peak_mb": tried[microbatch], "tried_mb": tried}
        except torch.cuda.OutOfMemoryError:
            tried[microbatch] = "out of memory"
        finally:
            del model, optimizer
            torch.cuda.empty_cache()
    raise RuntimeError(f"not even micro-batch 1 fits: {tried}")


def bench(out: Path, cpu: bool, microbatch: int) -> list[dict[str, Any]]:
    """`gptlib bench` per precision x compile; one row per (precision, compile, side)."""
    if cpu:  # one precision keeps the CPU mode short: the tiny scale's (bf16 where native)
        from gptlib.device import cpu_has_bf16

        precisions: tuple[str, ...] = ("bf16",) if cpu_has_bf16() else ("fp32",)
    else:
        precisions = ("bf16", "fp16")
    rows = []
    for precision in precisions:
        for compiled in ((False,) if cpu else (False, True)):
            path = out / f"bench-{precision}-{'compile' if compiled else 'eager'}.json"
            cmd = [sys.executable, "-m", "gptlib", "bench", "--device", "cpu" if cpu else "cuda",
                   "--precision", precision, "--skip-data", "--eval-batches", "2", "--quiet",
                   "--json", str(path)]
            if cpu:
                cmd += ["--quick", "--steps", "2"]
            else:
                cmd += ["--microbatch", str(microbatch), "--steps", "10", "--warmup", "3"]
            if compiled:
                cmd += ["--compile", "--skip-reference"]  # the reference was measured without
            _say(f"bench {precision}, compile {'on' if compiled else 'off'}")
            started = time.monotonic()
            done = _run(cmd, timeout=600)
            if done.returncode != 0:
                rows.append({"precision": precision, "compile": compiled, "side": "gptlib",
                             "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
                continue
            result = json.loads(path.read_text())
            for side, row in result["train"][precision].items():
                if side == "ratios":
                    continue
                rows.append({
                    "precision": precision, "compile": compiled, "side": side,
                    "microbatch": result["shape"]["microbatch_size"],
                    "tokens_per_s": row["tokens_per_s"], "mfu": row.get("mfu"),
                    "peak_device_mb": row.get("peak_device_mb"), "peak_rss_mb": row.get("peak_rss_mb"),
                    "eval_tokens_per_s": result["eval"].get(precision, {}).get(side, {}).get(
                        "tokens_per_s"),
                    "seconds": round(time.monotonic() - started, 1)})
    return rows


def _synthetic_dataset(directory: Path, tokens: int) -> Path:
    from gptlib.data import write_token_file

    generator = np.random.default_rng(0)
    write_token_file(directory / "train.safetensors", generator.integers(0, 50257, tokens))
    write_token_file(directory / "validation.safetensors", generator.integers(0, 50257, 50_000))
    return directory


def _train_args(run_dir: Path, overrides: dict[str, Any], nproc: int = 1) -> list[str]:
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    return [sys.executable, "-m", "gptlib", "train", "--run-dir", str(run_dir), "--nproc", str(nproc),
            "--no-eval", *sets]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from gptlib import checkpoint as ckpt

    return load_file(str(ckpt.resolve_checkpoint(run_dir, "latest") / ckpt.MODEL_FILE))


def _run_overrides(dataset: Path, cpu: bool, microbatch: int, steps: int, compiled: bool) -> dict:
    if cpu:
        shape = {"model.context_length": CPU_SHAPE["context"], "model.emb_dim": CPU_SHAPE["emb"],
                 "model.n_heads": CPU_SHAPE["heads"], "model.n_layers": CPU_SHAPE["layers"],
                 "model.vocab_size": 50257, "train.precision": "fp32", "train.device": "cpu"}
        context = CPU_SHAPE["context"]
    else:  # GPT-2 small, as the full-scale presets (fp16 + GradScaler)
        shape = {"model.vocab_size": 50257, "model.context_length": GPT2_CONTEXT, "model.emb_dim": 768,
                 "model.n_heads": 12, "model.n_layers": 12, "train.precision": "fp16",
                 "train.device": "cuda"}
        context = GPT2_CONTEXT
    return {**shape, "model.drop_rate": 0.1, "train.dataset": str(dataset),
            "train.microbatch_size": microbatch, "train.gradient_accumulation_steps": 1,
            "train.min_train_tokens": steps * microbatch * context,
            "train.checkpoint_interval": max(1, steps // 4), "train.log_interval": max(1, steps // 20),
            "train.compile": str(compiled).lower(), "train.keep_checkpoints": -1}


def resume_identity(out: Path, cpu: bool, microbatch: int, steps: int, compiled: bool,
                    dataset: Path) -> dict[str, Any]:
    """An uninterrupted run and a twin SIGKILLed after its first checkpoint, then resumed."""
    tag = "compile" if compiled else "eager"
    overrides = _run_overrides(dataset, cpu, microbatch, steps, compiled)
    started = time.monotonic()
    full = out / f"resume-{tag}-uninterrupted"
    done = _run(_train_args(full, overrides), timeout=900)
    if done.returncode != 0:
        return {"compile": compiled, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    killed = out / f"resume-{tag}-killed"
    proc = subprocess.Popen(_train_args(killed, overrides), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    latest, first = killed / "checkpoints" / "latest", overrides["train.checkpoint_interval"]
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() == f"step-{first}":
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = latest.read_text().strip() if latest.exists() else None
    mid_run = rundir.read_status(killed) == "running"
    resumed = _run(_train_args(killed, overrides) + ["--resume", "latest"], timeout=900)
    if resumed.returncode != 0:
        return {"compile": compiled, "killed_at": killed_at,
                "error": (resumed.stderr.strip().splitlines() or ["?"])[-1]}
    a, b = _weights(full), _weights(killed)
    identical = all(torch.equal(a[name], b[name]) for name in a)
    max_diff = max(float((a[name].float() - b[name].float()).abs().max()) for name in a)
    return {"compile": compiled, "steps": steps, "microbatch": microbatch, "killed_at": killed_at,
            "killed_mid_run": mid_run, "identical": identical, "max_abs_difference": max_diff,
            "close": max_diff <= CLOSE_ATOL, "seconds": round(time.monotonic() - started, 1)}


def two_ranks(out: Path, cpu: bool, microbatch: int, dataset: Path) -> dict[str, Any]:
    """A 2-rank run (NCCL on two GPUs, gloo with --cpu); skipped on one GPU."""
    if not cpu and torch.cuda.device_count() < 2:
        return {"skipped": f"the machine has {torch.cuda.device_count()} GPU; NCCL needs two"}
    overrides = _run_overrides(dataset, cpu, microbatch, 20, compiled=False)
    run_dir = out / "two-ranks"
    done = _run(_train_args(run_dir, overrides, nproc=2), timeout=600)
    if done.returncode != 0:
        return {"backend": "gloo" if cpu else "nccl",
                "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    summary = rundir.read_summary(run_dir)
    return {"backend": "gloo" if cpu else "nccl", "world_size": summary["world_size"],
            "tokens_per_s": summary["tokens_per_s"], "status": summary["status"]}


def format_table(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"gpu-check ({m['mode']}): {m['device']}, torch {m['torch']}, cuda {m['cuda']}, "
             f"{m['gpus']} GPU(s); {result['seconds']:.0f} s",
             f"{'precision':<10}{'compile':<9}{'side':<11}{'mb':>4}{'tokens/s':>11}{'MFU':>7}"
             f"{'peak GPU MB':>13}{'peak RSS MB':>13}"]
    for row in result["bench"]:
        if "error" in row:
            lines.append(f"{row['precision']:<10}{str(row['compile']):<9}{row['side']:<11}  FAILED: "
                         f"{row['error']}")
            continue
        mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        gpu = "-" if row["peak_device_mb"] is None else f"{row['peak_device_mb']:,.0f}"
        lines.append(f"{row['precision']:<10}{'on' if row['compile'] else 'off':<9}{row['side']:<11}"
                     f"{row['microbatch']:>4}{row['tokens_per_s']:>11,.0f}{mfu:>7}{gpu:>13}"
                     f"{row['peak_rss_mb']:>13,.0f}")
    for row in result["resume"]:
        name = f"resume after SIGKILL, compile {'on' if row['compile'] else 'off'}"
        if "error" in row:
            lines.append(f"{name}: FAILED: {row['error']}")
        else:
            verdict = "bit-identical" if row["identical"] else (
                f"not identical, max |difference| {row['max_abs_difference']:.3g}"
                + (" (close)" if row["close"] else ""))
            lines.append(f"{name}: killed at {row['killed_at']}, {row['steps']} steps: {verdict}")
    ranks = result["two_ranks"]
    lines.append("2 ranks: " + (ranks.get("skipped") and f"skipped ({ranks['skipped']})"
                                or ranks.get("error") and f"FAILED: {ranks['error']}"
                                or f"{ranks['backend']}, {ranks['tokens_per_s']:,.0f} tokens/s, "
                                   f"{ranks['status']}"))
    if result.get("microbatch_probe"):
        probe = result["microbatch_probe"]
        lines.append(f"largest micro-batch: {probe['microbatch']} (one bf16 step peaks at "
                     f"{probe['peak_mb']:,} MB; tried {probe['tried_mb']})")
    return "\n".join(lines)


def passed(result: dict[str, Any]) -> bool:
    if any("error" in row for row in result["bench"]) or "error" in result["two_ranks"]:
        return False
    return all("error" not in row and row["killed_mid_run"]
               and (row["identical"] or (row["compile"] and row["close"])) for row in result["resume"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (checks the script)")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"),
                        help="folder for the runs and gpu-check.json (default gpu-check/)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps of the resume runs (default 200 on a GPU, 12 with --cpu)")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; use --cpu to check the script on the CPU", file=sys.stderr)
        return 2
    started = time.monotonic()
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network
    result: dict[str, Any] = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "machine": machine(args.cpu)}
    if args.cpu:
        microbatch = CPU_SHAPE["microbatch"]
    else:
        _say("probing the largest GPT-2-small micro-batch")
        result["microbatch_probe"] = largest_microbatch()
        microbatch = result["microbatch_probe"]["microbatch"]
    result["bench"] = bench(out, args.cpu, microbatch)
    steps = args.steps or (12 if args.cpu else 200)
    context = CPU_SHAPE["context"] if args.cpu else GPT2_CONTEXT
    dataset = _synthetic_dataset(out / "dataset", (steps + 25) * microbatch * context * 2 + 1)
    result["resume"] = []
    for compiled in ((False,) if args.cpu else (False, True)):
        _say(f"resume identity, compile {'on' if compiled else 'off'} ({steps} steps)")
        result["resume"].append(resume_identity(out, args.cpu, microbatch, steps, compiled, dataset))
    _say("two ranks")
    result["two_ranks"] = two_ranks(out, args.cpu, microbatch, dataset)
    result["seconds"] = time.monotonic() - started
    result["passed"] = passed(result)
    (out / "gpu-check.json").write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(result))
    print(f"wrote {out / 'gpu-check.json'}; {'passed' if result['passed'] else 'FAILED'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
