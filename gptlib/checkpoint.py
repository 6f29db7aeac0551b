"""Atomic checkpoints: `checkpoints/step-<N>/` plus the `latest` and `best` pointer files.

A checkpoint is written into a hidden temporary directory, every file is fsynced, each file's sha256
goes into `meta.json`, and only then is the directory renamed to `step-<N>` and the pointers replaced
(`os.replace`), so a crash at any moment leaves the previous checkpoint and pointers intact, and a
half-written directory is never picked up by a resume.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from gptlib.model import GPTModel, load_weights, save_weights

POINTERS = ("latest", "best")
TEMP_PREFIX = ".tmp-"
MODEL_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that does not exist or does not verify."""


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step (temp file, fsync, rename)."""
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        tmp.write_text(text)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, say: leave no half-written temporary file behind
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: GPTModel,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    rng_states: dict[str, list[torch.Tensor]],
    meta: dict,
    is_best: bool,
) -> Path:
    """Write checkpoint `step-<step>` (step = optimizer steps completed) and move the pointers."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TEMP_PREFIX}step-{step}.{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        return _write_checkpoint(tmp, root, step, model, optimizer, scaler, rng_states, meta, is_best)
    except BaseException as error:  # a full disk, say: free what the unfinished checkpoint took
        disk_full = isinstance(error, Exception) and (
            getattr(error, "errno", None) == errno.ENOSPC or shutil.disk_usage(root).free < 1 << 20)
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full:  # torch.save reports it as "unexpected pos ...": say what happened
            raise CheckpointError(f"checkpoint step-{step} could not be written: the disk holding "
                                  f"{root} is full; free space, then resume with --resume latest") from error
        raise


def _write_checkpoint(tmp: Path, root: Path, step: int, model: GPTModel,
                      optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                      rng_states: dict[str, list[torch.Tensor]], meta: dict, is_best: bool) -> Path:
    """save_checkpoint's writing, into the temporary directory `tmp`, then the renames."""
    save_weights(model, tmp / MODEL_FILE)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    torch.save(rng_states, tmp / "rng.pt")
    files = sorted(p.name for p in tmp.iterdir())
    meta = {**meta, "step": step, "files": {name: sha256_file(tmp / name) for name in files}}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    for name in [*files, "meta.json"]:
        _fsync(tmp / name)
    final = root / f"step-{step}"
    if final.exists():  # a re-run of a step after a resume from an earlier checkpoint
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    write_text_atomic(root / "latest", final.name + "\n")
    if is_best:
        write_text_atomic(root / "best", final.name + "\n")
    return final


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` checkpoints, never the ones `latest` or `best` name.
    Returns the names removed."""
    root = checkpoints_dir(run_dir)
    pinned = {(root / p).read_text().strip() for p in POINTERS if (root / p).exists()}
    names = list_checkpoints(run_dir)
    doomed = [n for n in names[: max(0, len(names) - keep)] if n not in pinned]
    for name in doomed:
        # Rename first, so a crash mid-delete leaves debris that is cleaned, not a broken step-N.
        trash = root / f"{TEMP_PREFIX}{name}.deleted"
        os.rename(root / name, trash)
        shutil.rmtree(trash)
    return doomed


def list_checkpoints(run_dir: str | Path) -> list[str]:
    """Complete checkpoint names, in step order."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step-\d+", p.name)]
    return sorted(names, key=lambda n: int(n.split("-")[1]))


def resolve_checkpoint(run_dir: str | Path, which: str = "latest") -> Path:
    """Directory of checkpoint `latest`, `best` or `step-N`, or a CheckpointError listing those
    that exist."""
    root = checkpoints_dir(run_dir)
    available = list_checkpoints(run_dir)
    if which in POINTERS:
        pointer = root / which
        if not pointer.exists():
            raise CheckpointError(
                f"checkpoint '{which}': {root} has no checkpoints yet"
                if not available
                else f"checkpoint '{which}': pointer {pointer} is missing"
            )
        named = pointer.read_text(errors="replace").strip()
        if not re.fullmatch(r"step-\d+", named):  # never a path: it must stay inside checkpoints/
            raise CheckpointError(f"checkpoint '{which}': pointer {pointer} names {named[:80]!r}, "
                                  "not a checkpoint of this run (step-N)")
        which = named
    elif not re.fullmatch(r"step-\d+", which):
        raise CheckpointError(
            f"checkpoint '{which}' is not valid; allowed: latest, best, or step-N "
            f"(available: {', '.join(available) or 'none'})"
        )
    path = root / which
    if path.is_dir() and not (path / "meta.json").is_file():
        raise CheckpointError(f"checkpoint '{which}' in {root} is incomplete (its meta.json is "
                              "missing): resume from another one")
    if not (path / "meta.json").is_file():
        raise CheckpointError(
            f"checkpoint '{which}' does not exist in {root}; available: "
            f"{', '.join(['latest', 'best', *available]) if available else 'none'}"
        )
    return path


def read_meta(path: Path) -> dict:
    """A checkpoint's meta.json; unreadable or garbage is one CheckpointError naming the file."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path / 'meta.json'} is not readable JSON ({type(error).__name__}); "
                              "resume from another checkpoint") from None
    files = meta.get("files") if isinstance(meta, dict) else None
    if (not isinstance(meta, dict) or not _is_count(meta.get("step")) or not isinstance(files, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())):
        raise CheckpointError(f"{path / 'meta.json'} is not a gptlib checkpoint's meta.json "
                              "(needs an integer step and a files map of sha256 values)")
    return meta


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def remove_temporary_files(folder: str | Path) -> list[str]:
    """Remove the debris an interrupted atomic write left in `folder` (a run folder's summary.json
    or spikes.json, a checkpoints/ folder's unfinished step); returns the names removed."""
    debris = sorted(Path(folder).glob(f"{TEMP_PREFIX}*"))
    for path in debris:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return [p.name for p in debris]


def verify_checkpoint(path: Path) -> dict:
    """Check every file against the sha256 recorded in meta.json; returns the meta."""
    meta = read_meta(path)
    for name, expected in meta["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: file {name} is missing")
        if sha256_file(file) != expected:
            raise CheckpointError(
                f"checkpoint {path}: {name} does not match its recorded sha256 "
                "(truncated or edited); resume from an earlier checkpoint with --resume step-N"
            )
    return meta


def load_checkpoint(
    path: Path,
    model: GPTModel,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[dict, dict[str, list[torch.Tensor]]]:
    """Verify, then load weights (and optimizer / scaler state when given).
    Returns (meta, rng_states)."""
    meta = verify_checkpoint(path)
    load_weights(model, path / MODEL_FILE)
    if optimizer is not None:
        optimizer.load_state_dict(
            torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True)
        )
    if scaler is not None:
        if not (path / "scaler.pt").is_file():
            raise CheckpointError(f"checkpoint {path} has no scaler state (saved without fp16)")
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    rng_states = torch.load(path / "rng.pt", weights_only=True)
    return meta, rng_states
