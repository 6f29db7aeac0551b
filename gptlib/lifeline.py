"""Tie a process's life to its parent's, and keep two trainings out of one run directory.

No heavy imports here: `python -m gptlib.train` calls `die_with_parent` before importing torch, to
keep the window in which a worker could outlive a killed launcher as short as possible.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send `sig` to this process when its parent dies. torchrun starts each worker in
    a session of its own, so without this a worker outlives a launcher killed with SIGKILL."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() == 1:  # the parent died before the request was made
        os.kill(os.getpid(), sig)


RUN_LOCK = ".lock"  # held by the launcher of a run
WRITER_LOCK = ".writer-lock"  # held by its rank-0 trainer


def try_lock(path: Path) -> int | None:
    """An exclusive flock on `path` (created if needed) without waiting: its file descriptor, or
    None while another process holds it. A lock file removed and re-created meanwhile (see
    :func:`remove_lock`) is opened again, so two processes never hold locks on different files."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def is_locked(path: Path) -> bool:
    """Whether a process holds the lock on `path` (False when there is no such file)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock taken just now
    return False


def remove_lock(path: Path, fd: int | None = None) -> None:
    """Delete a lock file while holding it (taking it first unless `fd` holds it already), so a
    finished run folder keeps no lock files; left in place while another process holds it."""
    fd = try_lock(path) if fd is None else fd
    if fd is None:
        return
    path.unlink(missing_ok=True)
    os.close(fd)


def hold_writer_lock(run_dir: Path, wait_s: float = 60.0) -> int:
    """Block until this process is the only trainer writing to `run_dir` (an orphaned worker of a
    killed launcher still finishing, say); returns the lock's file descriptor, released on exit."""
    deadline = time.monotonic() + wait_s
    while (fd := try_lock(run_dir / WRITER_LOCK)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"another training process is still writing to {run_dir}; "
                               "stop it before starting this run")
        time.sleep(0.2)
    return fd
