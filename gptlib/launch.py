"""Start a training run under torchrun from the CLI or a notebook, stream rank 0's progress, and turn
any worker failure into one clear error with that rank's last log lines.

Everything that can be checked before the workers start is checked here (config, world size,
precision, dataset, token budget, resume target, an existing run), so a bad input costs seconds.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from gptlib import checkpoint as ckpt
from gptlib import paths, rundir
from gptlib.config import ConfigError, RunConfig, check_world_size, config_changes
from gptlib.data import token_budget
from gptlib.device import pick_device, resolve_precision
from gptlib.lifeline import WRITER_LOCK, remove_lock, try_lock
from gptlib.model import GPTModel, count_parameters
from gptlib.presets import load_config, resolve_config
from gptlib.sources import check_vocab_size, dataset_split

TERMINATE_GRACE_S = 10
FAILURE_GRACE_S = 10
LOCK_FILE = ".lock"


class LaunchError(RuntimeError):
    """A run that failed or could not start; the message says which rank and why."""


def resolve_nproc(nproc: int | str) -> int:
    """`auto` = one process per visible GPU, or one process on a CPU-only machine."""
    if nproc == "auto":
        return max(1, torch.cuda.device_count())
    return int(nproc)


def default_run_dir(cfg: RunConfig, outputs: Path | None = None) -> Path:
    """`<repo>/outputs/<scale>/<run-name>` unless another outputs folder is given."""
    return (outputs or paths.OUTPUTS_DIR) / Path(cfg.scale).name / cfg.run_name


def prepare_run(
    scale: str = "tiny",
    intervention: str | list[str] = "baseline",
    seed: int | None = None,
    overrides: dict | list[str] | None = None,
    nproc: int | str | None = None,
    run_dir: str | Path | None = None,
    resume: str | None = None,
    overwrite: bool = False,
) -> tuple[RunConfig, Path, int]:
    """Resolve and validate everything, write `config.yaml`; returns (config, run dir, nproc)."""
    cfg = resolve_config(scale, intervention, seed=seed, overrides=overrides, nproc=nproc)
    world_size = resolve_nproc(cfg.nproc)
    check_world_size(cfg, world_size)
    if cfg.train.device == "cuda" and torch.cuda.device_count() < world_size:
        raise ConfigError(f"nproc={world_size} but only {torch.cuda.device_count()} GPUs are visible")
    cfg.train.precision = resolve_precision(cfg.train.precision, pick_device(cfg.train.device))
    train_split = dataset_split(cfg.train.dataset, "train")
    check_vocab_size(cfg.model.vocab_size, cfg.train.dataset)
    t = cfg.train
    total_steps, _ = token_budget(
        t.min_train_tokens,
        cfg.tokens_per_step(world_size),
        len(train_split), t.start_train_token)

    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    check_writable(run_dir)
    lock_run_dir(run_dir)
    check_disk_space(cfg, run_dir, total_steps)
    config_path = run_dir / "config.yaml"
    if resume:
        written_by = ckpt.read_meta(ckpt.resolve_checkpoint(run_dir, resume))["world_size"]
        if written_by != world_size:
            raise ConfigError(f"checkpoint {resume} of {run_dir} was written by {written_by} "
                              f"processes; resume it with --nproc {written_by}")
        stored = load_config(config_path)
        if stored.to_dict() != cfg.to_dict():
            changed = sorted(key for key, _, _ in config_changes(stored, cfg))
            raise ConfigError(f"cannot resume {run_dir}: its config.yaml differs in "
                              f"{', '.join(changed)}; resume with the same settings")
        return cfg, run_dir, world_size
    existing = [name for name in rundir.RUN_FILES if (run_dir / name).exists()]
    if existing and not overwrite:
        status = rundir.read_status(run_dir)
        raise ConfigError(
            f"{run_dir} already holds a run (status: {status}); pass --resume latest to continue "
            "it or --overwrite to start again"
        )
    for name in existing:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.write_text_atomic(config_path, cfg.to_yaml())
    return cfg, run_dir, world_size


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_writable(run_dir: Path) -> None:
    """Fail unless the run directory (or the folder it will be created in) accepts files."""
    base = _existing_ancestor(run_dir)
    if not base.is_dir():
        raise ConfigError(f"run directory {run_dir}: {base} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as error:
        raise ConfigError(f"run directory {run_dir} is not writable ({base}: {error.strerror}); "
                          "choose another with --run-dir") from None


def checkpoint_bytes(cfg: RunConfig) -> int:
    """Size of one checkpoint: fp32 weights plus AdamW's two moments, plus small files."""
    with torch.device("meta"):
        parameters = count_parameters(GPTModel(cfg.model))
    return 3 * 4 * parameters + 1_000_000


def check_disk_space(cfg: RunConfig, run_dir: Path, total_steps: int) -> None:
    """Fail when the checkpoints this run will keep (plus one being written) cannot fit."""
    written = math.ceil(total_steps / cfg.train.checkpoint_interval)
    keep = cfg.train.keep_checkpoints
    kept = written if keep == -1 else min(written, keep + 1)  # + the best one
    each = checkpoint_bytes(cfg)
    needed = (kept + 1) * each
    free = shutil.disk_usage(_existing_ancestor(run_dir)).free
    if needed > free:
        raise ConfigError(
            f"run directory {run_dir}: the run keeps {kept} checkpoints of {each / 1e9:.2f} GB "
            f"(needs ~{needed / 1e9:.1f} GB) but only {free / 1e9:.1f} GB is free; free space, "
            "choose another --run-dir, or set train.keep_checkpoints=N"
        )


_held_locks: dict[Path, int] = {}


def lock_run_dir(run_dir: Path) -> None:
    """Take the run directory's lock for this process (kept until `unlock_run_dir`), so two
    launches cannot interleave their checkpoints. The OS drops it if the process dies."""
    key = run_dir.resolve()
    if key in _held_locks:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = try_lock(run_dir / LOCK_FILE)
    if fd is None:
        try:
            holder = (run_dir / LOCK_FILE).read_text(errors="replace").strip() or "?"
        except OSError:
            holder = "?"
        raise ConfigError(f"{run_dir} is in use by another run (pid {holder}); wait for it "
                          "to finish or choose another --run-dir")
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held_locks[key] = fd


def unlock_run_dir(run_dir: Path) -> None:
    """Release the run directory's lock and remove its lock files (the trainers' writer lock
    too, once no trainer holds it)."""
    fd = _held_locks.pop(run_dir.resolve(), None)
    if fd is not None:
        remove_lock(run_dir / WRITER_LOCK)
        remove_lock(run_dir / LOCK_FILE, fd)


def torchrun_command(run_dir: Path, nproc: int, resume: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "gptlib.torchrun", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "gptlib.train", "--config",
           str(run_dir / "config.yaml")]
    return cmd + (["--resume", resume] if resume else [])


def failing_rank(output: list[str]) -> int | None:
    """The rank torchrun names as the root cause, or the first `[rank N]` error line."""
    text = "\n".join(output)
    root = text.split("Root Cause", 1)[-1] if "Root Cause" in text else ""
    match = re.search(r"rank\s*:\s*(\d+)", root) or re.search(r"^\[rank (\d+)\]", text, re.M)
    return int(match.group(1)) if match else None


def _stop(proc: subprocess.Popen) -> None:
    """Terminate torchrun and every worker (they share its process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(TERMINATE_GRACE_S)
            # Workers may outlive the agent briefly; make sure the group is gone.
            os.killpg(proc.pid, signal.SIGKILL)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return
        return


def launch(
    run_dir: str | Path,
    nproc: int,
    resume: str | None = None,
    on_line: Callable[[str], None] | None = None,
) -> dict:
    """Run `python -m gptlib.train` under torchrun for a prepared run directory.

    Streams every output line to `on_line` (print by default); returns summary.json's content.
    Raises LaunchError naming the failed rank, with its last log lines; never leaves workers behind,
    also when interrupted (KeyboardInterrupt)."""
    run_dir = Path(run_dir)
    lock_run_dir(run_dir)
    try:
        return _launch(run_dir, nproc, resume, on_line)
    finally:
        unlock_run_dir(run_dir)


def _launch(run_dir: Path, nproc: int, resume: str | None,
            on_line: Callable[[str], None] | None) -> dict:
    on_line = on_line or (lambda line: print(line, flush=True))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not torch.cuda.is_available() and nproc > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.Popen(
        torchrun_command(run_dir, nproc, resume), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, bufsize=1, env=env, start_new_session=True,
    )
    tail: deque[str] = deque(maxlen=200)
    # Once a worker reports a fatal error, torchrun gets a short grace period to stop the rest;
    # a stalled (e.g. stopped) worker would otherwise hold it for its own 30 s SIGTERM timeout.
    watchdog = threading.Timer(FAILURE_GRACE_S, _stop, [proc])
    watchdog.daemon = True
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            on_line(line)
            if line.startswith("[rank ") and watchdog.ident is None:  # not started yet
                watchdog.start()
        returncode = proc.wait()
    except BaseException:
        _stop(proc)
        rundir.merge_summary(run_dir, {"status": "failed", "error": "interrupted"})
        raise
    finally:
        watchdog.cancel()
    _stop(proc)
    if returncode != 0:
        rank = failing_rank(list(tail))
        log = run_dir / "logs" / f"rank-{rank}.log"
        last = log.read_text().splitlines()[-15:] if log.exists() else list(tail)[-15:]
        error = next((line for line in reversed(tail) if line.startswith("[rank ")), None)
        message = (f"training failed on rank {rank if rank is not None else '?'} "
                   f"(exit code {returncode})" + (f": {error}" if error else ""))
        rundir.merge_summary(run_dir, {"status": "failed", "error": message})
        raise LaunchError(message + "\nlast log lines:\n" + "\n".join(last))
    return rundir.read_summary(run_dir)
