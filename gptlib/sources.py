"""Where a dataset comes from: `builtin:python-stdlib` (built on first use), `hf:<owner/repo>`
(downloaded once per machine, under a lock), or a directory; and the tokenizer a dataset records."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from gptlib.data import DATASET_FILES, SPLITS, DataError, TokenFile
from gptlib.tokenizer import (
    BPE_FILE,
    Tokenizer,
    TokenizerError,
    dataset_tokenizer,
)

BUILTIN_PYTHON_STDLIB = "builtin:python-stdlib"
RETIRED_BUILTINS = {"builtin:stdlib-docs": "docstrings only, GPT-2 tokens, unshuffled"}
DATASET_FORMS = (
    f"`{BUILTIN_PYTHON_STDLIB}`, `hf:<owner/repo>`, "
    "or a directory with train.safetensors and validation.safetensors"
)


# ---------------------------------------------------------------------------------------------
# Dataset sources: builtin:python-stdlib, hf:<repo>, a directory
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """`$GPTLIB_CACHE`, else `~/.cache/gptlib`."""
    return Path(os.environ.get("GPTLIB_CACHE") or Path.home() / ".cache" / "gptlib").expanduser()


def _missing_files(directory: Path) -> list[str]:
    return [name for name in DATASET_FILES if not (directory / name).is_file()]


def resolve_dataset(spec: str | Path, cache_dir: Path | None = None) -> Path:
    """The directory holding train/validation token files for a dataset spec (fetch/build it)."""
    spec = str(spec)
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    if spec == BUILTIN_PYTHON_STDLIB:
        from gptlib.corpus import build_python_stdlib

        return build_python_stdlib(cache_dir)
    if spec in RETIRED_BUILTINS:
        raise DataError(
            f"built-in dataset {spec!r} ({RETIRED_BUILTINS[spec]}) was replaced by "
            f"{BUILTIN_PYTHON_STDLIB}; runs made with it cannot be re-evaluated"
        )
    if spec.startswith("builtin:"):
        raise DataError(f"unknown built-in dataset {spec!r}; the only one is {BUILTIN_PYTHON_STDLIB}")
    if spec.startswith("hf:"):
        return _resolve_hf(spec[3:], cache_dir)
    directory = Path(spec).expanduser()
    if not directory.is_dir():
        raise DataError(f"dataset {spec!r} is not a directory or known source; use {DATASET_FORMS}")
    missing = _missing_files(directory)
    if missing:
        raise DataError(f"dataset directory {directory} lacks {', '.join(missing)}; use {DATASET_FORMS}")
    return directory


def env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hf_offline() -> bool:
    """Whether HF_HUB_OFFLINE is set (as huggingface_hub read it at import, or in the environment now)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or env_true("HF_HUB_OFFLINE")


def _hf_cache_snapshot(repo_id: str) -> Path | None:
    """The snapshot folder of dataset `repo_id` in the Hugging Face cache (`hf download` without
    --local-dir, `HF_HUB_CACHE`) when it holds both token files; no network."""
    from huggingface_hub import try_to_load_from_cache

    found = []
    for name in DATASET_FILES:
        try:
            path = try_to_load_from_cache(repo_id, name, repo_type="dataset")
        except Exception:  # a malformed cache is the same as no cache
            return None
        if not isinstance(path, str):
            return None
        found.append(Path(path).parent)
    return found[0] if found[0] == found[1] else None


@contextlib.contextmanager
def _machine_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` shared by every process of this machine (flock): the first
    process (e.g. local rank 0) downloads, the others wait and then find the files."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
    except OSError as e:
        raise DataError(
            f"cannot create the dataset cache {path.parent} ({e.strerror}); "
            "set GPTLIB_CACHE to a writable directory"
        ) from e
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _resolve_hf(repo_id: str, cache_dir: Path) -> Path:
    """The dataset repo's two token files: GPTLIB_CACHE's copy, else the Hugging Face cache's,
    else downloaded once per machine into GPTLIB_CACHE (never when HF_HUB_OFFLINE is set).

    Only the two files are fetched; a token comes from HF_TOKEN or `hf auth login`, never from here.
    """
    owner, _, name = repo_id.partition("/")
    if not owner or not name or "/" in name:
        raise DataError(f"dataset hf:{repo_id!r} must name a repository as hf:<owner>/<name>")
    local_dir = cache_dir / "datasets" / "hf" / f"{owner}--{name}"
    if not _missing_files(local_dir):
        return local_dir
    snapshot = _hf_cache_snapshot(repo_id)
    if snapshot is not None:
        return snapshot
    if hf_offline():
        raise DataError(
            f"hf:{repo_id} is not cached and HF_HUB_OFFLINE is set: download "
            f"{' and '.join(DATASET_FILES)} of dataset {repo_id} into {local_dir} "
            f"(hf download {repo_id} {' '.join(DATASET_FILES)} --repo-type dataset --local-dir "
            f"{local_dir}), or unset HF_HUB_OFFLINE"
        )
    with _machine_lock(local_dir.parent / f".{local_dir.name}.lock"):
        if not _missing_files(local_dir):  # another process of this machine fetched it meanwhile
            return local_dir
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(
                repo_id=repo_id,
                repo_type="dataset",
                allow_patterns=[*DATASET_FILES, "meta.json", BPE_FILE],  # a fitted BPE, if any
                local_dir=local_dir,
            )
        except Exception as e:  # network, authentication, unknown repository ...
            reason = (str(e).strip().splitlines() or [""])[0]
            raise DataError(
                f"could not download dataset hf:{repo_id} into {local_dir}: {type(e).__name__}: {reason}"
            ) from e
    missing = _missing_files(local_dir)
    if missing:
        raise DataError(f"dataset hf:{repo_id} has no {', '.join(missing)} at its top level")
    return local_dir


def open_tokenizer(spec_or_dir: str | Path, cache_dir: Path | None = None) -> Tokenizer:
    """The tokenizer of a dataset spec or directory (GPT-2 unless its meta.json names a BPE)."""
    try:
        return dataset_tokenizer(resolve_dataset(spec_or_dir, cache_dir))
    except TokenizerError as e:
        raise DataError(str(e)) from None


def check_vocab_size(vocab_size: int, spec: str) -> Tokenizer:
    """The dataset's tokenizer, after checking a model with `vocab_size` outputs can hold its ids."""
    tokenizer = open_tokenizer(spec)
    if vocab_size < tokenizer.n_vocab:
        raise DataError(
            f"model.vocab_size={vocab_size} is smaller than the {tokenizer.name} tokenizer of "
            f"dataset {spec} ({tokenizer.n_vocab:,} tokens); set model.vocab_size >= "
            f"{tokenizer.n_vocab}"
        )
    return tokenizer


def dataset_split(spec_or_dir: str | Path, split: str, cache_dir: Path | None = None) -> TokenFile:
    """Open split `train` or `validation` of a dataset spec or directory."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return TokenFile(resolve_dataset(spec_or_dir, cache_dir) / f"{split}.safetensors")
