"""`gptlib bench`: training-step throughput, MFU and peak memory of gptlib's model and loop, side by side
with the reference -- the book's `llms_from_scratch.ch04.GPTModel` trained the way the series' loop
does it (manual masked attention, plain AdamW, `loss.item()` every micro-batch) -- on identical
shapes, data (seeded random tokens), initial weights (same seed) and optimizer settings.

Every measurement runs in a fresh subprocess (`python -m gptlib.bench --worker SPEC`), so each side's
peak resident memory (VmHWM, read after its steps) is its own. `--rounds N` repeats each side's
process N times, alternating which side goes first, and takes medians over all rounds: on a shared
machine a drift in load then favours neither side. Per precision:

* training: per round `warmup` untimed steps, then `steps` timed steps of one micro-batch each
  (forward, backward, AdamW); tokens/s = the micro-batch's tokens / the median step time. gptlib's
  step is the training loop's own `train.train_step` (the chunked loss under the run's autocast, no
  logits tensor; the global gradient norm; the non-finite check; `optim.build_optimizer`'s fused
  AdamW, on CPU too; `zero_grad(set_to_none=True)`; no `.item()`).
* evaluation (test loss): `eval_batches` timed batches of [eval_batch_size, context] tokens (default
  eval_batch_size = the micro-batch), the same tokens on both sides. gptlib: `eval()`,
  `torch.inference_mode()`, SDPA (or on the CPU in bf16 the blocked attention) and the chunked loss;
  reference: `eval()`, `torch.no_grad()`, the book's forward, `F.cross_entropy` of the logits and
  `.item()` per batch, as the series' test loss does. The target compares gptlib in bf16 (where the
  device runs it natively) with the reference in fp32; the like-for-like ratios are shown too.
* data reader (once): resident-memory growth of reading every micro-batch, in order, of a 10M- and
  of a 500M-token uint16 token file: gptlib's `BatchReader` against reading the whole split into
  memory (the series' loader); split into anonymous and file-backed (page cache mapped in) memory.

MFU = tokens/s x `gptlib.model.flops_per_token` / the device's peak (`gptlib.metrics.peak_flops`:
the data-sheet table on GPUs, a measured matmul on CPUs, per precision); evaluation uses a third of
the FLOPs (forward only). The table's CPU column (CPU time / (wall time x threads)) shows how much of
the machine each side got: well under 100% means others were using it and the timings are noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gptlib.bench_report import SIDES, format_report
from gptlib.bench_workers import (
    WORKERS,
    BenchError,
    cpu_name,
    data_probe,
    loadavg,
    run_worker,
)
from gptlib.config import ModelConfig
from gptlib.model import flops_per_token

PRECISIONS = ("fp32", "bf16", "fp16")
QUICK_SHAPE = {"layers": 2, "heads": 2, "emb": 64, "context": 64, "microbatch": 2}
DEFAULT_DATA_TOKENS = (10_000_000, 500_000_000)
QUICK_DATA_TOKENS = (1_000_000, 20_000_000)
# The targets the benchmark checks (`--check`).
TARGET_TOKENS_PER_S = 1.3
TARGET_PEAK_RSS = 0.7
TARGET_EVAL = 2.0
TARGET_DATA_GROWTH_MB = 64.0



# --------------------------------------------------------------------------------------------------
# Orchestration


def resolve_shape(args: argparse.Namespace) -> tuple[ModelConfig, int]:
    """(model config, micro-batch size) from --scale, --quick and the shape flags (flags win)."""
    cfg, microbatch = ModelConfig(), 1
    if args.scale:
        from gptlib.presets import resolve_config

        run = resolve_config(args.scale)
        cfg, microbatch = run.model, run.train.microbatch_size
    if args.quick:
        cfg = dataclasses.replace(cfg, n_layers=QUICK_SHAPE["layers"], n_heads=QUICK_SHAPE["heads"],
                                  emb_dim=QUICK_SHAPE["emb"], context_length=QUICK_SHAPE["context"])
        microbatch = QUICK_SHAPE["microbatch"]
    changes = {name: value for name, value in (
        ("n_layers", args.layers), ("n_heads", args.heads), ("emb_dim", args.emb),
        ("context_length", args.context), ("drop_rate", args.drop_rate), ("vocab_size", args.vocab),
    ) if value is not None}
    cfg = dataclasses.replace(cfg, **changes)
    microbatch = args.microbatch if args.microbatch is not None else microbatch
    if cfg.emb_dim % cfg.n_heads:
        raise BenchError(f"--emb {cfg.emb_dim} is not divisible by --heads {cfg.n_heads}")
    if min(cfg.n_layers, cfg.n_heads, cfg.emb_dim, cfg.context_length, cfg.vocab_size, microbatch) < 1:
        raise BenchError("shape values must be >= 1")
    if not 0 <= cfg.drop_rate < 1:
        raise BenchError(f"--drop-rate {cfg.drop_rate} must be in [0, 1)")
    return cfg, microbatch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda but no CUDA device is available; allowed: auto, cpu")
    return torch.device(name)


def resolve_precisions(name: str, device: torch.device) -> list[str]:
    precisions = ["fp32", "bf16"] if name == "both" else [name]
    if "fp16" in precisions and device.type != "cuda":
        raise BenchError("--precision fp16 needs CUDA (fp16 autocast + GradScaler); "
                         "on a CPU use fp32 or bf16")
    return precisions


def _bf16_native(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    from gptlib.device import cpu_has_bf16

    return cpu_has_bf16()


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _target(name: str, value: float | None, op: str, threshold: float) -> dict:
    checks = {">=": lambda v: v >= threshold, "<=": lambda v: v <= threshold, "<": lambda v: v < threshold}
    met = None if value is None else checks[op](value)
    return {"name": name, "value": value, "op": op, "threshold": threshold, "met": met}


def _settings(args: argparse.Namespace, microbatch: int) -> dict[str, Any]:
    """The run's counts with their defaults filled in (quick and compile change them)."""
    return {"steps": args.steps if args.steps is not None else (3 if args.quick else 5),
            "warmup": args.warmup if args.warmup is not None else (2 if args.compile else 1),
            "rounds": args.rounds, "compile": args.compile, "seed": args.seed,
            "learning_rate": args.lr, "weight_decay": args.weight_decay,
            "eval_batch_size": args.eval_batch_size if args.eval_batch_size is not None else microbatch,
            "eval_batches": args.eval_batches, "ablate": args.ablate,
            "sides": ["gptlib"] if args.skip_reference else list(SIDES)}


def _machine(device: torch.device) -> dict[str, Any]:
    return {"device": device.type, "device_name": _device_name(device),
            "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "bf16_native": _bf16_native(device), "loadavg_start": loadavg()}


def _side_ratios(rows: dict, keys: dict[str, str]) -> dict[str, float | None]:
    """gptlib's value over the reference's, for each result key (named in the ratios by ``keys``)."""
    return {name: _ratio(rows["gptlib"][key], rows["reference"][key]) for name, key in keys.items()}


def _measure_training(base: dict, settings: dict, index: int, microbatch: int, peak: float | None,
                      fpt: float, say: Callable[[str], None]) -> dict[str, Any]:
    """One precision's training rows (each side's merged rounds, MFU) and, with both sides, the ratios."""
    spec = {**base, "task": "train", "microbatch": microbatch, "steps": settings["steps"],
            "warmup": settings["warmup"], "compile": settings["compile"],
            "learning_rate": settings["learning_rate"], "weight_decay": settings["weight_decay"]}
    rows = measure_sides(index, settings["rounds"], "training", say, {
        side: {**spec, "side": side, "ablate": settings["ablate"] if side == "gptlib" else []}
        for side in settings["sides"]})
    for row in rows.values():
        row["mfu"] = row["tokens_per_s"] * fpt / peak if peak else None
    if "reference" in rows:
        rows["ratios"] = {
            **_side_ratios(rows, {"tokens_per_s": "tokens_per_s", "tokens_per_cpu_s": "tokens_per_cpu_s",
                                  "peak_rss": "peak_rss_mb"}),
            "initial_loss_difference": abs(rows["gptlib"]["losses"][0] - rows["reference"]["losses"][0]),
            "peak_device": _ratio(rows["gptlib"]["peak_device_mb"], rows["reference"]["peak_device_mb"]),
        }
    return rows


def _measure_eval(base: dict, settings: dict, index: int, peak: float | None, fpt: float,
                  say: Callable[[str], None]) -> dict[str, Any]:
    """One precision's test-loss rows; the forward pass is a third of a training step's FLOPs."""
    spec = {**base, "task": "eval", "batch_size": settings["eval_batch_size"],
            "batches": settings["eval_batches"], "warmup": 1}
    rows = measure_sides(index, settings["rounds"], "evaluation", say,
                         {side: {**spec, "side": side} for side in settings["sides"]})
    for row in rows.values():
        row["mfu"] = row["tokens_per_s"] * fpt / 3 / peak if peak else None
    if "reference" in rows:
        rows["ratios"] = _side_ratios(rows, {"tokens_per_s": "tokens_per_s",
                                             "tokens_per_cpu_s": "tokens_per_cpu_s"})
    return rows


def run_bench(args: argparse.Namespace) -> dict:
    """Run every measurement the options ask for; the JSON-ready result."""
    from gptlib.metrics import peak_flops

    if args.data_only and args.skip_data:
        raise BenchError("--data-only and --skip-data leave nothing to measure")
    cfg, microbatch = resolve_shape(args)
    device = resolve_device(args.device)
    precisions = resolve_precisions(args.precision, device)
    settings = _settings(args, microbatch)
    fpt = flops_per_token(cfg)
    verbose = not args.quiet

    def say(message: str) -> None:
        if verbose:
            print(f"bench: {message}", file=sys.stderr, flush=True)

    result: dict[str, Any] = {
        "version": 1,
        "command": (["gptlib", "bench", *args.argv] if args.argv is not None
                    else [Path(sys.argv[0]).name, *sys.argv[1:]]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": _machine(device),
        "shape": {**dataclasses.asdict(cfg), "microbatch_size": microbatch,
                  "tokens_per_step": microbatch * cfg.context_length},
        "settings": settings, "flops_per_token": fpt, "peak_flops": {}, "train": {}, "eval": {},
        "data": None,
    }
    base = {"model": dataclasses.asdict(cfg), "device": str(device), "seed": args.seed,
            "verbose": verbose}
    for index, precision in enumerate([] if args.data_only else precisions):
        say(f"measuring the {precision} peak FLOP/s of {_device_name(device)}")
        peak = result["peak_flops"][precision] = peak_flops(device, precision)
        spec = {**base, "precision": precision}
        result["train"][precision] = _measure_training(spec, settings, index, microbatch, peak, fpt, say)
        if args.eval_batches > 0:
            result["eval"][precision] = _measure_eval(spec, settings, index, peak, fpt, say)
    if not args.skip_data:
        tokens = tuple(args.data_tokens) if args.data_tokens else (
            QUICK_DATA_TOKENS if args.quick else DEFAULT_DATA_TOKENS)
        say(f"data reader memory: {' vs '.join(f'{n:,}' for n in tokens)}-token files")
        result["data"] = data_probe(tokens, microbatch, cfg.context_length, args.data_batches,
                                    verbose=verbose)
    result["machine"]["loadavg_end"] = loadavg()
    result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result["targets"] = targets(result)
    return result


def measure_sides(index: int, rounds: int, what: str, say: Callable[[str], None],
                   specs: dict[str, dict]) -> dict[str, Any]:
    """Run each side's worker spec `rounds` times, alternating the order (it also flips with `index`,
    the precision's position), so a drift in machine load favours neither side; merge each side's runs."""
    sides = list(specs)
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for r in range(rounds):
        order = sides if (index + r) % 2 == 0 else sides[::-1]
        for side in order:
            spec = specs[side]
            count = spec.get("steps", spec.get("batches"))
            say(f"{what} {side} {spec['precision']} (round {r + 1}/{rounds}): {spec['warmup']} warm-up + "
                f"{count} timed x {spec.get('microbatch', spec.get('batch_size'))} x "
                f"{spec['model']['context_length']} tokens")
            runs[side].append(run_worker(spec))
    return {side: merge_rounds(results, specs[side]["warmup"]) for side, results in runs.items()}


def merge_rounds(runs: list[dict], warmup: int) -> dict:
    """One side's result over its rounds: medians over every round's timed steps, the largest peak
    RSS, the first round's losses; per-round lists under `rounds`."""
    key = "step_times_s" if "step_times_s" in runs[0] else "batch_times_s"
    cpu_key = key.replace("times", "cpu_times")
    timed = [t for run in runs for t in run[key][warmup:]]
    cpu = [t for run in runs for t in run[cpu_key][warmup:]]
    merged = dict(runs[0])
    tokens = runs[0]["tokens_per_step"]
    median = statistics.median(timed)
    merged.update({
        "rounds": len(runs),
        key: [run[key] for run in runs],
        cpu_key: [run[cpu_key] for run in runs],
        "median_s": median,
        "min_s": min(timed),
        "tokens_per_s": tokens / median,
        # Throughput per CPU-second of its threads: what it would reach with the cores to itself.
        "tokens_per_cpu_s": tokens * runs[0]["threads"] / statistics.median(cpu),
        "cpu_use": statistics.median(cpu) / (median * runs[0]["threads"]),
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
        "peak_device_mb": runs[0].get("peak_device_mb"),
        "loadavg": [run["loadavg"] for run in runs],
    })
    return merged


def targets(result: dict) -> list[dict]:
    """The benchmark's targets that this run measured, each with its value and whether it is met."""
    found = []
    for precision, rows in result["train"].items():
        if "ratios" in rows:
            found.append(_target(f"train tokens/s vs reference ({precision})",
                                 rows["ratios"]["tokens_per_s"], ">=", TARGET_TOKENS_PER_S))
            found.append(_target(f"train peak RSS vs reference ({precision})",
                                 rows["ratios"]["peak_rss"], "<=", TARGET_PEAK_RSS))
    evals = result["eval"]
    if evals and all("reference" in rows for rows in evals.values()):
        # gptlib evaluates in bf16 where the device runs it natively (the `auto` precision); the
        # series' test loss is the book's forward pass, in fp32 unless it autocasts (fp16, CUDA).
        ours = "bf16" if "bf16" in evals and result["machine"].get("bf16_native") else next(iter(evals))
        theirs = "fp32" if "fp32" in evals else next(iter(evals))
        value = _ratio(evals[ours]["gptlib"]["tokens_per_s"], evals[theirs]["reference"]["tokens_per_s"])
        found.append(_target(f"eval tokens/s, gptlib {ours} vs reference {theirs}", value, ">=",
                             TARGET_EVAL))
    if result["data"]:
        growth = result["data"]["gptlib"]["growth_mb"]
        found.append(_target("data reader RSS growth MB, small -> large file", growth, "<",
                             TARGET_DATA_GROWTH_MB))
    return found


# --------------------------------------------------------------------------------------------------
# Command line


def _token_counts(value: str) -> list[int]:
    try:
        counts = [int(float(x)) for x in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--data-tokens {value!r}: expected e.g. 10e6,500e6") from None
    if len(counts) != 2 or min(counts) < 2:
        raise argparse.ArgumentTypeError(f"--data-tokens {value!r}: expected two token counts >= 2")
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `gptlib bench` options (cli.py calls this on its sub-parser)."""
    shape = parser.add_argument_group("shape (default: GPT-2 small, micro-batch 1, dropout 0.1)")
    shape.add_argument("--scale", default=None, help="take the model shape and micro-batch of a scale")
    shape.add_argument("--tiny", action="store_true",
                       help="the tiny scale's step against the previous tiny shape (GPT-2 vocabulary), "
                            "gptlib only (gptlib.bench_tiny); takes --rounds, --steps, --warmup, --json")
    shape.add_argument("--quick", action="store_true",
                       help="a small shape (2 layers, emb 64, context 64), 3 steps, small data files")
    shape.add_argument("--layers", type=int, default=None)
    shape.add_argument("--heads", type=int, default=None)
    shape.add_argument("--emb", type=int, default=None)
    shape.add_argument("--context", type=int, default=None)
    shape.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 50257)")
    shape.add_argument("--microbatch", type=int, default=None)
    shape.add_argument("--drop-rate", type=float, default=None)
    run = parser.add_argument_group("run")
    run.add_argument("--precision", choices=[*PRECISIONS, "both"], default="both",
                     help="fp32, bf16 (autocast), fp16 (CUDA only) or both = fp32 and bf16 (default)")
    run.add_argument("--compile", action="store_true", help="torch.compile gptlib's model")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    run.add_argument("--steps", type=int, default=None, help="timed steps per side (default 5; quick 3)")
    run.add_argument("--warmup", type=int, default=None,
                     help="untimed steps first (default 1; 2 with --compile)")
    run.add_argument("--rounds", type=int, default=1,
                     help="fresh processes per side, alternating sides (more = robust to a busy machine)")
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--lr", type=float, default=4e-4)
    run.add_argument("--weight-decay", type=float, default=0.1)
    run.add_argument("--eval-batches", type=int, default=3, help="timed test-loss batches (0 = skip)")
    run.add_argument("--eval-batch-size", type=int, default=None,
                     help="sequences per test-loss batch, both sides (default: the micro-batch)")
    run.add_argument("--skip-reference", action="store_true", help="measure gptlib only")
    run.add_argument("--skip-data", action="store_true", help="no data-reader memory probe")
    run.add_argument("--data-only", action="store_true", help="only the data-reader memory probe")
    run.add_argument("--data-tokens", type=_token_counts, default=None,
                     help="the probe's two file sizes (default 10e6,500e6; quick 1e6,20e6)")
    run.add_argument("--data-batches", type=int, default=0,
                     help="micro-batches the probe reads, spread over the file (default 0 = all, in order)")
    run.add_argument("--ablate", action="append", default=[],
                     choices=["blockwise-attention", "chunked-loss", "fast-dropout", "fused-adamw"],
                     help="switch off one of gptlib's fast paths (repeatable), to measure it")
    out = parser.add_argument_group("output")
    out.add_argument("--json", type=Path, default=None, help="write the full result here")
    out.add_argument("--check", action="store_true", help="exit 1 when a measured target is missed")
    out.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed options: print the table, write the JSON; the exit code
    (1 on a bad option or a failed measurement, with one line on stderr; with --check, 1 when a
    measured target is missed)."""
    try:
        return _run(args)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.worker is not None:
        spec = json.loads(args.worker)
        outcome = WORKERS[spec["task"]](spec)
        text = json.dumps(outcome)
        if args.worker_out is None:
            print(text)
        else:
            args.worker_out.write_text(text)
        return 0
    if not hasattr(args, "argv"):
        args.argv = None
    for name in ("steps", "eval_batch_size", "rounds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        raise BenchError("--warmup must be >= 0")
    if args.tiny:
        from gptlib import bench_tiny

        tiny = bench_tiny.run(args.rounds, args.steps or 30, 5 if args.warmup is None else args.warmup,
                              args.json, verbose=not args.quiet)
        print(bench_tiny.format_table(tiny))
        return 0
    result = run_bench(args)
    print(format_report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    missed = [t for t in result["targets"] if t["met"] is False]
    return 1 if args.check and missed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptlib bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`gptlib bench [options]`; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
