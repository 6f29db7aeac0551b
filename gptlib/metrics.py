"""Per-step records (metrics.jsonl, spikes.json), checkpoint-period aggregates, loss-spike detection
and hardware peaks.

The training loop and the charts share these functions, so a chart computed from `metrics.jsonl`
shows exactly the aggregates the loop stored in each checkpoint's `meta.json`.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from gptlib.checkpoint import write_text_atomic
from gptlib.rundir import METRICS, SPIKES, load_spikes

# Dense peak FLOP/s per device for 16-bit (fp16/bf16) tensor-core math and for fp32 (TF32 off).
# Sources: NVIDIA A100, H100 SXM, H200 and RTX 3090 data sheets.
PEAK_FLOPS = {
    "A100": {"16bit": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "H100": {"16bit": 989e12, "tf32": 494e12, "fp32": 67e12},
    "H200": {"16bit": 989e12, "tf32": 494e12, "fp32": 67e12},
    "RTX 3090": {"16bit": 71e12, "tf32": 35.6e12, "fp32": 35.6e12},
    "RTX 4090": {"16bit": 165e12, "tf32": 82.6e12, "fp32": 82.6e12},
}


def read_metrics(path: str | Path) -> list[dict]:
    """All per-step records of a run (an unfinished last line, from a crash, is ignored)."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def is_checkpoint_step(step: int, total_steps: int, interval: int, protocol: str = "gptlib") -> bool:
    """Whether the run checkpoints after 0-based step `step`: gptlib after every `interval` steps
    done (steps interval - 1, 2 x interval - 1, ...); the series' code at steps 0, interval,
    2 x interval, ... (so its first period is step 0 alone); both after the last step."""
    offset = 0 if protocol == "series" else 1
    return (step + offset) % interval == 0 or step == total_steps - 1


def _period_losses(records: list[dict], protocol: str) -> tuple[list[float], bool]:
    """The losses a period's statistics describe, and whether one of them was not finite.

    gptlib: each step's loss (the mean over all ranks and micro-batches), skipped steps left out.
    series: rank 0's micro-batch losses of every step (skipped or not), as the series' loop
    collects them; one non-finite loss makes its average non-finite, as there."""
    if protocol == "series":
        values = [v for r in records for v in r.get("rank0_losses", [])]
    else:
        values = [r["loss"] for r in records if not r["skipped"]]
    finite = [v for v in values if v is not None]
    return finite, len(finite) < len(values)


def aggregate_period(records: Iterable[dict], protocol: str = "gptlib") -> dict:
    """Loss min/avg/max, grad-norm max/avg, fraction clipped and last LR of a checkpoint period.

    Skipped (non-finite) steps count in `skipped` but not in the grad-norm statistics (nor, for
    gptlib, in the loss statistics: see `_period_losses`)."""
    records = list(records)
    finite = [r for r in records if not r["skipped"]]
    losses, nonfinite = _period_losses(records, protocol)
    norms = [r["grad_norm"] for r in finite]
    return {
        "first_step": records[0]["step"],
        "last_step": records[-1]["step"],
        "loss_min": min(losses) if losses else None,
        "loss_avg": sum(losses) / len(losses) if losses and not nonfinite else None,
        "loss_max": max(losses) if losses else None,
        "grad_norm_max": max(norms) if norms else None,
        "grad_norm_avg": sum(norms) / len(norms) if norms else None,
        "clipped_fraction": sum(r["clipped"] for r in records) / len(records),
        "skipped": sum(r["skipped"] for r in records),
        "lr": records[-1]["lr"],
    }


def periods(records: list[dict], checkpoint_interval: int, protocol: str = "gptlib") -> list[dict]:
    """Split per-step records into checkpoint periods (see :func:`is_checkpoint_step`; the last
    may be shorter) and aggregate each as the loop did for its checkpoint's meta.json."""
    chunks: list[list[dict]] = [[]]
    for record in records:
        chunks[-1].append(record)
        if is_checkpoint_step(record["step"], 0, checkpoint_interval, protocol):
            chunks.append([])
    return [aggregate_period(chunk, protocol) for chunk in chunks if chunk]


class SpikeDetector:
    """Flags a loss more than `threshold` rolling MADs above the rolling median of the previous
    `window` finite losses. Median and MAD ignore the spikes themselves, so one spike does not
    hide the next; nothing is flagged until the window has filled."""

    def __init__(self, window: int, threshold: float):
        self.threshold = threshold
        self.history: deque[float] = deque(maxlen=window)

    def update(self, loss: float) -> tuple[bool, float | None]:
        """Returns (is_spike, rolling level) for this loss, then adds it to the window."""
        if len(self.history) < (self.history.maxlen or 0):
            self.history.append(loss)
            return False, None
        level = statistics.median(self.history)
        mad = statistics.median(abs(x - level) for x in self.history)
        # A floor on the MAD keeps a perfectly flat window from flagging tiny wiggles.
        is_spike = loss > level + self.threshold * max(mad, 1e-3 * abs(level), 1e-8)
        self.history.append(loss)
        return is_spike, level


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity; a non-finite value is recorded as null."""
    return value if math.isfinite(value) else None


@dataclass
class StepStats:
    """One optimizer step, as device tensors (read on the host only at a flush)."""

    loss: torch.Tensor  # mean over the step's micro-batches
    grad_norm: torch.Tensor  # before clipping
    clipped: torch.Tensor  # 1.0 when clipping scaled the gradients down
    skipped: bool  # a non-finite gradient or loss: no update
    micro_losses: torch.Tensor | None = None  # this rank's loss of each micro-batch


class MetricsLog:
    """metrics.jsonl and spikes.json (written by rank 0). Each step's values stay on the device until
    `flush` reduces them over the ranks in one all-reduce, so the loop never waits on the host."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, tokens_per_step: int,
                 detector: SpikeDetector, windows: Callable[[int], dict[str, list[int]]],
                 start_step: int, resume: bool, protocol: str = "gptlib"):
        self.world_size, self.tokens_per_step, self.detector, self.windows = (
            world_size, tokens_per_step, detector, windows)
        self.protocol = protocol
        self.metrics_path, self.spikes_path = run_dir / METRICS, run_dir / SPIKES
        self.pending: list[tuple[StepStats, float]] = []
        self.period: list[dict] = []  # records of the current checkpoint period (rank 0)
        self.spikes: list[dict] = []
        self.file = None
        self.last_loss = math.nan  # the newest step's loss, unrounded, for the progress line
        if rank == 0:
            # Steps after the checkpoint we resume from are recomputed; drop their records.
            kept = [r for r in read_metrics(self.metrics_path) if r["step"] < start_step]
            write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
            for r in kept:
                if not r["skipped"]:
                    detector.update(r["loss"])
            if resume:
                self.spikes = [s for s in load_spikes(run_dir) if s["step"] < start_step]
            self.file = open(self.metrics_path, "a")
        self.last_flush_time, self.last_flush_step = math.nan, start_step  # start_clock() sets the time

    def start_clock(self) -> float:
        """Time the first flush's tokens/s from now (after the set-up); returns the time."""
        self.last_flush_time = time.perf_counter()
        return self.last_flush_time

    def add(self, stats: StepStats, lr: float) -> None:
        self.pending.append((stats, lr))

    def flush(self, step: int) -> dict | None:
        """Reduce the pending steps over ranks; rank 0 writes them and returns the last record."""
        values = torch.stack([torch.stack([s.loss, s.grad_norm, s.clipped]) for s, _ in self.pending])
        host = [(lr, s.skipped) for s, lr in self.pending]
        # The series' period statistics are rank 0's own micro-batch losses (not reduced).
        micro = ([s.micro_losses.tolist() for s, _ in self.pending]
                 if self.protocol == "series" and self.file is not None else None)
        self.pending.clear()
        dist.all_reduce(values)
        rows = (values / self.world_size).tolist()
        now = time.perf_counter()
        tokens_per_s = ((step + 1 - self.last_flush_step) * self.tokens_per_step
                        / (now - self.last_flush_time))
        first = self.last_flush_step
        self.last_flush_time, self.last_flush_step = now, step + 1
        self.last_loss = rows[-1][0]
        if self.file is None:
            return None
        for offset, ((loss, grad_norm, clipped), (lr, skipped)) in enumerate(zip(rows, host, strict=True)):
            record = {"step": first + offset, "tokens": (first + offset + 1) * self.tokens_per_step,
                      "loss": finite_or_none(loss), "lr": lr, "grad_norm": finite_or_none(grad_norm),
                      "clipped": clipped > 0.5, "skipped": skipped, "tokens_per_s": tokens_per_s}
            if micro is not None:
                record["rank0_losses"] = [finite_or_none(v) for v in micro[offset]]
            self.file.write(json.dumps(record) + "\n")
            self.period.append(record)
            if not skipped:
                self._check_spike(record, loss, grad_norm)
        self.file.flush()
        write_text_atomic(self.spikes_path, json.dumps(self.spikes, indent=1))
        return record

    def _check_spike(self, record: dict, loss: float, grad_norm: float) -> None:
        is_spike, level = self.detector.update(loss)
        if is_spike:
            self.spikes.append({
                "step": record["step"], "loss": loss, "level": level, "grad_norm": grad_norm,
                "lr": record["lr"], "clipped": record["clipped"], "skipped": False,
                "windows": self.windows(record["step"]),
            })

    def take_period(self) -> dict:
        """The aggregates of the checkpoint period that just ended (rank 0)."""
        period = aggregate_period(self.period, self.protocol)
        self.period.clear()
        return period

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def measured_cpu_peak_flops(dtype: torch.dtype = torch.float32, size: int = 1024) -> float:
    """Peak matmul FLOP/s of this CPU in `dtype`, measured (best of a few repeats)."""
    generator = torch.Generator().manual_seed(0)  # leaves the global RNG (dropout) untouched
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device for the precision mode, or None when the device is unknown."""
    if device.type == "cpu":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return measured_cpu_peak_flops(dtype)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    kind = "16bit" if precision in ("fp16", "bf16") else "tf32"
    if precision == "fp32":
        kind = "fp32"
    for model, peaks in PEAK_FLOPS.items():
        if model in name:
            return peaks[kind]
    return None
