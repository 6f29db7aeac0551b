"""The measurements of `gptlib bench`, each run in a fresh process (`python -m gptlib.bench
--worker SPEC`): training steps and test-loss batches of one side (the book's reference code or
gptlib's own step), and the data reader's memory; plus the process-memory probes they use."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gptlib.config import ModelConfig
from gptlib.data import READ_DTYPES, read_tokens_header, write_tokens_atomic


class BenchError(RuntimeError):
    """A benchmark that cannot run (bad option, failed worker); the message says why."""


# --------------------------------------------------------------------------------------------------
# Process measurements


def _proc_status_mb(key: str) -> float | None:
    """A `VmRSS` / `VmHWM` line of /proc/self/status in MB (None where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident memory of this process, MB."""
    value = _proc_status_mb("VmRSS")
    return value if value is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (VmHWM, else ru_maxrss)."""
    value = _proc_status_mb("VmHWM")
    if value is not None:
        return value
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1024**2


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs); True if it worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# Workers (each runs in a fresh process)


def _model_config(spec: dict) -> ModelConfig:
    return ModelConfig(**spec["model"])


def _build_model(side: str, cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """The side's model with seeded initial weights (the same for both sides: same creation order)."""
    torch.manual_seed(seed)
    if side == "reference":
        from llms_from_scratch.ch04 import GPTModel as BookGPTModel

        return BookGPTModel(dataclasses.asdict(cfg))
    from gptlib.model import GPTModel

    return GPTModel(cfg)


def _batches(cfg: ModelConfig, rows: int, count: int, seed: int) -> torch.Tensor:
    """`count` batches of `rows` windows of context + 1 tokens, deterministic in `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (count, rows, cfg.context_length + 1), generator=generator)


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The training loop's autocast (it also sets TF32 as the loop does), for both sides."""
    from gptlib.device import autocast_context

    return autocast_context(precision, device)


def _ablations(ablate: list[str]) -> contextlib.AbstractContextManager:
    """gptlib's CPU fast paths with the ones named in `--ablate` switched off, to measure them."""
    from gptlib.kernels import cpu_paths_set

    return cpu_paths_set(dropout_attention="blockwise-attention" not in ablate,
                         fast_dropout="fast-dropout" not in ablate)


def logits_then_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                     autocast: contextlib.AbstractContextManager) -> torch.Tensor:
    """The loss without the chunked LM head: full logits, then cross-entropy (`--ablate chunked-loss`)."""
    with autocast:
        return F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())


def train_worker(spec: dict) -> dict:
    """Time `warmup + steps` training steps of one side; peak RSS and per-step losses."""
    with _ablations(spec.get("ablate", [])):
        return _train_worker(spec)


def _reference_step(model: torch.nn.Module, spec: dict, autocast: Any,
                    scaler: torch.amp.GradScaler | None) -> tuple[Callable, torch.optim.Optimizer]:
    """The series' step: plain AdamW, logits then cross-entropy, ``loss.item()`` every micro-batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["learning_rate"],
                                  weight_decay=spec["weight_decay"])

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> float:
        optimizer.zero_grad()
        with autocast:
            logits = model(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        return loss.item()

    return step, optimizer


def _gptlib_step(model: torch.nn.Module, spec: dict, device: torch.device, autocast: Any,
                 scaler: torch.amp.GradScaler | None) -> tuple[Callable, torch.optim.Optimizer]:
    """The training loop's own ``train_step`` on one micro-batch (with any ``--ablate`` applied)."""
    from gptlib.config import TrainConfig
    from gptlib.optim import build_optimizer, param_groups
    from gptlib.train import micro_batch_loss, train_step

    ablate = spec.get("ablate", [])
    train_cfg = TrainConfig(learning_rate=spec["learning_rate"], weight_decay=spec["weight_decay"])
    if "fused-adamw" in ablate:
        optimizer = torch.optim.AdamW(param_groups(model, train_cfg), lr=train_cfg.learning_rate)
    else:  # the training loop's optimizer
        optimizer = build_optimizer(model, train_cfg, device)
    net = torch.compile(model) if spec["compile"] else model
    loss_fn = micro_batch_loss if "chunked-loss" not in ablate else logits_then_loss

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return train_step(net, optimizer, lambda _: (inputs, targets), 1, autocast, scaler,
                          loss_fn=loss_fn).loss

    return step, optimizer


def _train_worker(spec: dict) -> dict:
    cfg, side, precision = _model_config(spec), spec["side"], spec["precision"]
    device = torch.device(spec["device"])
    rss_start = rss_mb()
    model = _build_model(side, cfg, spec["seed"]).to(device)
    model.train()
    n_steps = spec["warmup"] + spec["steps"]
    data = _batches(cfg, spec["microbatch"], n_steps, spec["seed"] + 1)
    autocast = _autocast(precision, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    if side == "reference":
        step, optimizer = _reference_step(model, spec, autocast, scaler)
    else:
        step, optimizer = _gptlib_step(model, spec, device, autocast, scaler)
    rss_ready = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu_times, losses = [], [], []
    load_start = loadavg()
    for i in range(n_steps):
        inputs, targets = (t.to(device, non_blocking=True) for t in (data[i, :, :-1], data[i, :, 1:]))
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(step(inputs, targets))
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        if spec.get("verbose"):
            kind = "warm-up" if i < spec["warmup"] else "step"
            print(f"  {side} {precision} {kind} {i + 1}/{n_steps}: {times[-1]:.2f} s", file=sys.stderr,
                  flush=True)
    return {
        "side": side, "precision": precision,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "compile": bool(spec["compile"]) and side == "gptlib",
        "fused_adamw": bool(optimizer.defaults.get("fused")), "ablate": spec.get("ablate", []),
        "step_times_s": times, "step_cpu_times_s": cpu_times,
        "tokens_per_step": spec["microbatch"] * cfg.context_length,
        "losses": [float(x) for x in losses],
        "rss_start_mb": rss_start, "rss_ready_mb": rss_ready, "peak_rss_mb": peak_rss_mb(),
        "peak_device_mb": (torch.cuda.max_memory_allocated(device) / 1024**2
                           if device.type == "cuda" else None),
        "loadavg": [load_start, loadavg()], "threads": torch.get_num_threads(),
    }


def eval_worker(spec: dict) -> dict:
    """Time test-loss batches of one side (gptlib's evaluation or the series' forward pass)."""
    cfg, side, precision = _model_config(spec), spec["side"], spec["precision"]
    device = torch.device(spec["device"])
    model = _build_model(side, cfg, spec["seed"]).to(device).eval()
    n = spec["warmup"] + spec["batches"]
    data = _batches(cfg, spec["batch_size"], n, spec["seed"] + 2)
    autocast = _autocast(precision, device)
    times, cpu_times, losses = [], [], []
    load_start = loadavg()
    for i in range(n):
        inputs, targets = (t.to(device) for t in (data[i, :, :-1], data[i, :, 1:]))
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        if side == "reference":
            with torch.no_grad(), autocast:
                logits = model(inputs)
                loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            losses.append(loss.item())
        else:
            with torch.inference_mode(), autocast:
                losses.append(model(inputs, targets).float())
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "side": side,
        "precision": precision,
        "batch_shape": [spec["batch_size"], cfg.context_length],
        "batch_times_s": times,
        "batch_cpu_times_s": cpu_times,
        "tokens_per_step": spec["batch_size"] * cfg.context_length,
        "losses": [float(x) for x in losses],
        "peak_rss_mb": peak_rss_mb(),
        "loadavg": [load_start, loadavg()],
        "threads": torch.get_num_threads(),
    }


def data_worker(spec: dict) -> dict:
    """Resident memory of opening a token file and reading its micro-batches in order (every one,
    or `batches` spread evenly over the file): what a run does to its training split."""
    from gptlib.data import BatchReader, TokenFile

    path, microbatch, context = Path(spec["path"]), spec["microbatch"], spec["context"]
    before = {key: _proc_status_mb(key) for key in ("VmRSS", "RssAnon", "RssFile")}
    reset_peak_rss()
    start = time.perf_counter()
    block = microbatch * context
    if spec["loader"] == "gptlib":
        reader = BatchReader(TokenFile(path), microbatch, context, 1, 1)
        blocks = reader.max_steps

        def read(i: int) -> torch.Tensor:
            return reader.get(i, 0, 0)[0]
    else:  # the series' loader: the whole split read into memory
        tokens = load_whole_token_file(path)
        blocks = (len(tokens) - 1) // block

        def read(i: int) -> torch.Tensor:
            window = tokens[i * block : (i + 1) * block + 1].long()
            return window[:-1].view(microbatch, context)  # the inputs, as BatchReader.get gives them

    batches = spec.get("batches") or blocks
    checksum = 0
    for i in np.linspace(0, blocks - 1, min(batches, blocks)).astype(int).tolist():
        checksum += int(read(i)[..., -1].sum())
    after = {key: _proc_status_mb(key) for key in ("VmRSS", "RssAnon", "RssFile")}
    peak = peak_rss_mb()
    return {
        "loader": spec["loader"],
        "tokens": spec["tokens"],
        "file_mb": path.stat().st_size / 1024**2,
        "batches_read": min(batches, blocks),
        "seconds": time.perf_counter() - start,
        "rss_before_mb": before["VmRSS"],
        "peak_rss_mb": peak,
        "growth_mb": max(peak, after["VmRSS"] or 0) - (before["VmRSS"] or 0),
        # Anonymous memory is the process's own; file-backed pages are the page cache mapped in
        # (reclaimable, and shared by every rank that maps the same file).
        "anon_growth_mb": _difference(after["RssAnon"], before["RssAnon"]),
        "file_growth_mb": _difference(after["RssFile"], before["RssFile"]),
        "checksum": checksum,
    }


def _difference(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


WORKERS: dict[str, Callable[[dict], dict]] = {
    "train": train_worker,
    "eval": eval_worker,
    "data": data_worker,
}


def run_worker(spec: dict, timeout: float | None = None) -> dict:
    """Run one measurement in a fresh Python process and return its result."""
    with tempfile.TemporaryDirectory(prefix="gptlib-bench-") as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "gptlib.bench", "--worker", json.dumps(spec),
                   "--worker-out", str(out)]
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        proc = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, timeout=timeout)
        if proc.stderr and spec.get("verbose"):
            sys.stderr.write(proc.stderr)
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise BenchError(f"{spec['task']} worker ({spec.get('side') or spec.get('loader')}, "
                             f"{spec.get('precision', '')}) failed with exit code {proc.returncode}:\n{tail}")
        return json.loads(out.read_text())


# --------------------------------------------------------------------------------------------------
# Token files for the data-reader probe


def write_synthetic_token_file(path: Path, n_tokens: int, chunk: int = 1 << 24) -> Path:
    """A safetensors token file of `n_tokens` uint16 ids < 50257, written chunk by chunk."""
    chunks = (np.arange(start, min(start + chunk, n_tokens), dtype=np.int64) * 7919 % 50257
              for start in range(0, n_tokens, chunk))
    write_tokens_atomic(path, chunks, n_tokens, np.uint16)
    return path


def load_whole_token_file(path: Path) -> torch.Tensor:
    """A token file's `tokens`, read whole into (anonymous) memory, as the series' loader holds it."""
    offset, info = read_tokens_header(path)
    start, stop = info["data_offsets"]
    dtype = np.dtype(READ_DTYPES[info["dtype"]]).newbyteorder("<")
    with open(path, "rb") as f:
        f.seek(offset)
        return torch.from_numpy(np.fromfile(f, dtype=dtype, count=(stop - start) // dtype.itemsize))


def data_probe(token_counts: tuple[int, ...], microbatch: int, context: int, batches: int,
               workdir: Path | None = None, verbose: bool = False) -> dict:
    """Memory growth per loader and file size, and the growth from the smallest to the largest file."""
    with tempfile.TemporaryDirectory(prefix="gptlib-bench-data-", dir=workdir) as tmp:
        files = {n: write_synthetic_token_file(Path(tmp) / f"tokens-{n}.safetensors", n)
                 for n in token_counts}
        result: dict[str, Any] = {"tokens": list(token_counts), "microbatch": microbatch,
                                  "context": context, "batches_read": batches}
        for loader in ("gptlib", "series"):
            runs = {}
            for n, path in files.items():
                if verbose:
                    print(f"bench: data reader {loader}, {n:,} tokens", file=sys.stderr, flush=True)
                runs[str(n)] = run_worker({"task": "data", "loader": loader, "path": str(path),
                                           "tokens": n, "microbatch": microbatch, "context": context,
                                           "batches": batches})
            small, large = runs[str(min(token_counts))], runs[str(max(token_counts))]
            result[loader] = {"runs": runs, "growth_mb": large["growth_mb"] - small["growth_mb"]}
    return result
