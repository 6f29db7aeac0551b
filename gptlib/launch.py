"""Start a training run under torchrun from the CLI or a notebook, stream rank 0's progress, and turn
any worker failure into one clear error with that rank's last log lines.

Everything that can be checked before the workers start is checked here (config, world size,
precision, dataset, token budget, resume target, an existing run), so a bad input costs seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from gptlib import checkpoint as ckpt
from gptlib import paths, preflight, rundir
from gptlib.config import ConfigError, RunConfig, check_world_size, config_changes
from gptlib.data import token_budget
from gptlib.device import pick_device, resolve_precision
from gptlib.lifeline import RUN_LOCK, WRITER_LOCK, remove_lock, try_lock
from gptlib.paths import short_path
from gptlib.presets import load_config, resolve_config
from gptlib.sources import check_vocab_size, dataset_split

TERMINATE_GRACE_S = 10
FAILURE_GRACE_S = 10
# torchrun's own report of a failed worker (the error itself is raised as LaunchError)
AGENT_FAILURE = re.compile(r"E\d{4} [\d:.]+ \d+ torch/distributed/elastic/")


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
    overwrite = preflight.parse_bool("overwrite", overwrite)
    run_dir = preflight.run_dir_path(run_dir) if run_dir is not None else None
    resume = preflight.resume_target(resume)
    cfg = resolve_config(scale, intervention, seed=seed, overrides=overrides, nproc=nproc)
    world_size = resolve_nproc(cfg.nproc)
    check_world_size(cfg, world_size)
    if cfg.train.device == "cuda" and torch.cuda.device_count() < world_size:
        raise ConfigError(f"nproc={world_size} but only {torch.cuda.device_count()} GPUs are visible")
    device = pick_device(cfg.train.device)
    cfg.train.precision = resolve_precision(cfg.train.precision, device)
    preflight.check_resources(cfg, world_size, device)
    train_split = dataset_split(cfg.train.dataset, "train")
    check_vocab_size(cfg.model.vocab_size, cfg.train.dataset)
    preflight.check_token_ids(cfg)
    preflight.check_eval_slice(cfg)
    t = cfg.train
    total_steps, _ = token_budget(
        t.min_train_tokens,
        cfg.tokens_per_step(world_size),
        len(train_split), t.start_train_token)

    run_dir = run_dir if run_dir is not None else default_run_dir(cfg)
    preflight.check_writable(run_dir)
    if not resume:
        preflight.check_overwritable(run_dir)  # before the lock file goes into someone's folder
    lock_run_dir(run_dir)
    try:
        _clean(run_dir)
        return _prepare_run_dir(cfg, run_dir, world_size, total_steps, resume, overwrite)
    except BaseException:
        unlock_run_dir(run_dir)
        raise


def _prepare_run_dir(cfg: RunConfig, run_dir: Path, world_size: int, total_steps: int,
                     resume: str | None, overwrite: bool) -> tuple[RunConfig, Path, int]:
    """Under the run's lock: check a resume target, or clear a finished run for --overwrite;
    then write config.yaml."""
    config_path = run_dir / "config.yaml"
    if resume:
        meta = preflight.check_resume(run_dir, resume)
        preflight.check_disk_space(cfg, run_dir, total_steps, meta["step"])
        written_by = meta["world_size"]
        if written_by != world_size:
            raise ConfigError(f"checkpoint {resume} of {run_dir} was written by {written_by} "
                              f"processes; resume it with --nproc {written_by}")
        stored = load_config(config_path)
        if stored.to_dict() != cfg.to_dict():
            changed = sorted(key for key, _, _ in config_changes(stored, cfg))
            raise ConfigError(f"cannot resume {run_dir}: its config.yaml differs in "
                              f"{', '.join(changed)}; resume with the same settings")
        preflight.check_run_files(cfg, run_dir, meta, world_size, total_steps)
        return cfg, run_dir, world_size
    preflight.check_disk_space(cfg, run_dir, total_steps)
    existing = preflight.check_overwritable(run_dir)
    if existing and not overwrite:
        status = rundir.read_status(run_dir)
        raise ConfigError(
            f"{run_dir} already holds a run (status: {status}); pass --resume latest to continue "
            "it or --overwrite to start again"
        )
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.write_text_atomic(config_path, cfg.to_yaml())
    return cfg, run_dir, world_size


def _clean(run_dir: Path) -> None:
    """At a start: remove what an interrupted atomic write left behind."""
    removed = ckpt.remove_temporary_files(run_dir)
    if removed:
        print(f"removed the temporary files of an interrupted write: {', '.join(removed)}", file=sys.stderr)


_held_locks: dict[Path, int] = {}


def lock_run_dir(run_dir: Path) -> None:
    """Take the run directory's lock for this process (kept until `unlock_run_dir`), so two
    launches cannot interleave their checkpoints. The OS drops it if the process dies."""
    key = run_dir.resolve()
    if key in _held_locks:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = try_lock(run_dir / RUN_LOCK)
    if fd is None:
        try:
            holder = (run_dir / RUN_LOCK).read_text(errors="replace").strip() or "?"
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
        remove_lock(run_dir / RUN_LOCK, fd)


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
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main else None
    try:
        return _launch(run_dir, nproc, resume, on_line)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        unlock_run_dir(run_dir)


class Terminated(KeyboardInterrupt):
    """SIGTERM reached the launcher: stopped like Ctrl-C, recorded as such."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _cause(tail: list[str], returncode: int) -> str:
    """How the failed worker ended, from torchrun's report: an exit code, or a signal by name."""
    codes = [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", "\n".join(tail))]
    code = next((c for c in codes if c != 0), returncode)
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"
    if name == "SIGKILL":
        return "killed by SIGKILL: if nobody killed it, probably out of memory (the kernel's OOM killer)"
    return f"killed by {name}"


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
    failing = False  # after a worker's error line, torchrun's own report (and tracebacks) only
    try:             # go to the tail and the logs, not to the reader
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            failing = failing or bool(AGENT_FAILURE.match(line)) or line.startswith("Traceback ")
            if not failing:
                on_line(line)
            if line.startswith("[rank "):
                failing = True
                if watchdog.ident is None:  # not started yet
                    watchdog.start()
        returncode = proc.wait()
    except BaseException as error:
        _stop(proc)
        how = "SIGTERM" if isinstance(error, Terminated) else "Ctrl-C / SIGINT" \
            if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
        interrupted = isinstance(error, KeyboardInterrupt)
        _record_end(run_dir, "interrupted" if interrupted else "failed",
                    f"interrupted ({how})" if interrupted else how)
        raise
    finally:
        watchdog.cancel()
    _stop(proc)
    if returncode != 0:
        rank = failing_rank(list(tail))
        logs = run_dir / "logs" / (f"rank-{rank}.log" if rank is not None else "")
        error = next((line for line in reversed(tail) if line.startswith("[rank ")), None)
        message = (f"training failed{f' on rank {rank}' if rank is not None else ''} "
                   f"({_cause(list(tail), returncode)})" + (f": {error}" if error else "")
                   + f"; details in {short_path(logs)}")
        raise LaunchError(message + _record_end(run_dir, "failed", message))
    return rundir.read_summary(run_dir)


def _record_end(run_dir: Path, status: str, error: str) -> str:
    """Record how the run ended in summary.json; when even that fails (a full disk), say so in a
    note for the error line instead of raising (the summary then reads "stopped": see
    gptlib.summary.run_status)."""
    try:
        rundir.merge_summary(run_dir, {"status": status, "error": error})
    except OSError as failure:
        return f" (summary.json not updated: {failure.strerror or failure})"
    return ""
