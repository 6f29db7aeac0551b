"""Token data: token files, per-rank batch reads, dataset sources and preparing datasets.

A token file is a safetensors file holding one 1-D tensor `tokens` (uint16 when every id fits,
else int32); documents are separated by the tokenizer's `<|endoftext|>` (50256 in GPT-2). A dataset
is a directory with `train.safetensors` and `validation.safetensors`, the layout of the HF dataset
`gpjt/fineweb-gpt2-tokens`, plus (when gptlib made it) `meta.json` naming its tokenizer and, for a
fitted BPE, `tokenizer.json` (see gptlib.tokenizer). The built-in corpus is gptlib.corpus.

Reads are positioned reads (`os.pread`) of one slice at a time, so a rank never holds a whole split
in memory, and its resident memory does not grow with the file (a memory map would count every page
it ever touched as resident). The training stream
is cut into blocks of `microbatch_size` contiguous context-length windows; accumulation step `a`
of optimizer step `s` on rank `r` reads block `(s * GA + a) * world_size + r`, so where the data
comes from is a pure function of the step.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import math
import multiprocessing
import os
import struct
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from gptlib.tokenizer import (
    BPE_FILE,
    BPETokenizer,
    GPT2Tokenizer,
    Tokenizer,
    TokenizerError,
    dataset_tokenizer,
    file_sha256,
    get_tokenizer,
    parse_tokenizer_name,
    train_bpe,
)

SPLITS = ("train", "validation")
DATASET_FILES = tuple(f"{split}.safetensors" for split in SPLITS)
BUILTIN_PYTHON_STDLIB = "builtin:python-stdlib"
RETIRED_BUILTINS = {"builtin:stdlib-docs": "docstrings only, GPT-2 tokens, unshuffled"}
DATASET_FORMS = (
    f"`{BUILTIN_PYTHON_STDLIB}`, `hf:<owner/repo>`, "
    "or a directory with train.safetensors and validation.safetensors"
)

# safetensors dtype codes we read, and the numpy dtypes we write them with.
_READ_DTYPES = {"U16": np.uint16, "I32": np.int32, "I64": np.int64}
_WRITE_CODES = {np.dtype(np.uint16): "U16", np.dtype(np.int32): "I32"}


class DataError(ValueError):
    """A user-facing data problem: names the bad file, key or value and what is allowed."""


# ---------------------------------------------------------------------------------------------
# Token files
# ---------------------------------------------------------------------------------------------


def _write_tokens_atomic(path: Path, chunks: Iterable[np.ndarray], n: int, dtype: Any) -> None:
    """Stream `n` tokens from `chunks` into a safetensors file at `path` (tmp file + rename).

    The safetensors format is an 8-byte little-endian header size, a JSON header (padded to a
    multiple of 8) and the raw little-endian tensor bytes; writing it by hand lets a dataset much
    larger than memory be written chunk by chunk.
    """
    dtype = np.dtype(dtype).newbyteorder("<")
    header = {
        "tokens": {
            "dtype": _WRITE_CODES[np.dtype(dtype.type)],
            "shape": [n],
            "data_offsets": [0, n * dtype.itemsize],
        }
    }
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        written = 0
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header_bytes)))
            f.write(header_bytes)
            for chunk in chunks:
                f.write(np.ascontiguousarray(chunk, dtype=dtype).data)
                written += len(chunk)
        if written != n:
            raise RuntimeError(f"wrote {written} tokens to {path}, expected {n}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_token_file(path: str | Path, tokens: Sequence[int] | np.ndarray | torch.Tensor) -> Path:
    """Write 1-D token ids to a token file atomically: uint16 if they all fit, else int32."""
    path = Path(path)
    if isinstance(tokens, torch.Tensor):
        array = tokens.detach().cpu().to(torch.int64).numpy()
    else:
        array = np.asarray(tokens)
    if array.ndim != 1 or array.size == 0:
        raise DataError(f"tokens for {path} must be a non-empty 1-D sequence, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"tokens for {path} must be integer ids, got dtype {array.dtype}")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= 2**31:
        raise DataError(f"tokens for {path} must lie in [0, 2**31), got values in [{low}, {high}]")
    dtype = np.uint16 if high < 2**16 else np.int32
    _write_tokens_atomic(path, [array], len(array), dtype)
    return path


class TokenFile:
    """A validated token file; `read` copies one slice out of it as int64 with a positioned read."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"token file {self.path} does not exist")
        try:  # safetensors validates the header and the data offsets against the file size
            with safe_open(str(self.path), framework="numpy") as handle:
                keys = list(handle.keys())
                if "tokens" not in keys:
                    raise DataError(
                        f"token file {self.path} has no tensor `tokens` (it has {keys}); "
                        "expected one 1-D integer tensor named `tokens`"
                    )
                tokens = handle.get_slice("tokens")
                shape, self.dtype = tokens.get_shape(), tokens.get_dtype()
        except SafetensorError as e:
            raise DataError(f"token file {self.path} is not a safetensors file ({e})") from e
        if len(shape) != 1:
            raise DataError(f"token file {self.path}: `tokens` has shape {shape}; expected 1-D")
        if self.dtype not in _READ_DTYPES:
            allowed = ", ".join(_READ_DTYPES)
            raise DataError(f"token file {self.path}: `tokens` has dtype {self.dtype}; allowed: {allowed}")
        if shape[0] == 0:
            raise DataError(f"token file {self.path}: `tokens` is empty")
        self._len = int(shape[0])
        self._numpy_dtype = np.dtype(_READ_DTYPES[self.dtype]).newbyteorder("<")
        with open(self.path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            data_start = json.loads(f.read(header_size))["tokens"]["data_offsets"][0]
        self._offset = 8 + header_size + data_start
        self._fd: int | None = None
        self._fd_pid: int | None = None

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r}, tokens={self._len:,}, dtype={self.dtype})"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_fd_pid": None}  # a descriptor does not travel

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._fd_pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def _descriptor(self) -> int:
        # Opened lazily and per process, so a forked worker never shares the parent's descriptor.
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd, self._fd_pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, start: int, length: int) -> torch.Tensor:
        """Tokens [start, start + length) as a new int64 tensor (only that slice is read)."""
        if start < 0 or length < 0 or start + length > self._len:
            raise DataError(
                f"cannot read tokens [{start:,}, {start + length:,}) from {self.path}: "
                f"it has {self._len:,} tokens"
            )
        itemsize = self._numpy_dtype.itemsize
        wanted = length * itemsize
        data = os.pread(self._descriptor(), wanted, self._offset + start * itemsize)
        if len(data) != wanted:
            raise DataError(f"token file {self.path} is shorter than its header says (truncated?)")
        return torch.from_numpy(np.frombuffer(data, dtype=self._numpy_dtype).astype(np.int64))


# ---------------------------------------------------------------------------------------------
# Batches and the token budget
# ---------------------------------------------------------------------------------------------


def _check_positive(**values: int) -> None:
    """Raise DataError naming the first value that is not a positive integer."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{key} must be a positive integer, got {value!r}")


class BatchReader:
    """Reads one rank's micro-batches by (step, accumulation step, rank): a pure function."""

    def __init__(
        self,
        token_file: TokenFile,
        microbatch_size: int,
        context_length: int,
        gradient_accumulation_steps: int,
        world_size: int,
        start_token: int = 0,
        pin_memory: bool = False,
    ) -> None:
        _check_positive(
            microbatch_size=microbatch_size,
            context_length=context_length,
            gradient_accumulation_steps=gradient_accumulation_steps,
            world_size=world_size,
        )
        if not 0 <= start_token < len(token_file):
            raise DataError(
                f"start_token {start_token} is outside {token_file.path} ({len(token_file):,} tokens)"
            )
        self.token_file = token_file
        self.microbatch_size = microbatch_size
        self.context_length = context_length
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.world_size = world_size
        self.start_token = start_token
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.block_tokens = microbatch_size * context_length
        self.global_batch_tokens = self.block_tokens * gradient_accumulation_steps * world_size

    @property
    def max_steps(self) -> int:
        """How many whole optimizer steps the file holds after `start_token`."""
        return (len(self.token_file) - self.start_token - 1) // self.global_batch_tokens

    def block_index(self, step: int, accum: int, rank: int) -> int:
        """The block read by accumulation step `accum` of optimizer step `step` on `rank`."""
        if step < 0 or not 0 <= accum < self.gradient_accumulation_steps:
            raise DataError(
                f"step {step} / accumulation step {accum} out of range "
                f"(gradient_accumulation_steps={self.gradient_accumulation_steps})"
            )
        if not 0 <= rank < self.world_size:
            raise DataError(f"rank {rank} out of range for world_size {self.world_size}")
        return (step * self.gradient_accumulation_steps + accum) * self.world_size + rank

    def get(self, step: int, accum: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 [microbatch_size, context_length]; targets shifted by one.

        Both are views of one buffer of microbatch_size * context_length + 1 tokens.
        """
        start = self.start_token + self.block_index(step, accum, rank) * self.block_tokens
        stop = start + self.block_tokens + 1
        if stop > len(self.token_file):
            raise DataError(
                f"step {step} (accumulation step {accum}, rank {rank}) needs tokens "
                f"[{start:,}, {stop:,}) but {self.token_file.path} has {len(self.token_file):,}; "
                "lower the token budget or use a larger dataset"
            )
        tokens = self.token_file.read(start, stop - start)
        if self.pin_memory:
            tokens = tokens.pin_memory()
        shape = (self.microbatch_size, self.context_length)
        return tokens[:-1].view(shape), tokens[1:].view(shape)

    def window_indices(self, step: int, accum: int, rank: int) -> list[int]:
        """Global numbers of the context windows in that micro-batch (for spike forensics)."""
        first = self.block_index(step, accum, rank) * self.microbatch_size
        return list(range(first, first + self.microbatch_size))

    def window_tokens(self, window: int) -> torch.Tensor:
        """The context_length + 1 tokens of window `window` (inputs plus the last target)."""
        if window < 0:
            raise DataError(f"window {window} must be >= 0")
        start = self.start_token + window * self.context_length
        return self.token_file.read(start, self.context_length + 1)


def global_batch_tokens(
    microbatch_size: int, context_length: int, gradient_accumulation_steps: int, world_size: int
) -> int:
    """Tokens per optimizer step: micro-batch x context x accumulation steps x ranks."""
    return microbatch_size * context_length * gradient_accumulation_steps * world_size


def token_budget(
    min_train_tokens: int,
    global_batch_tokens: int,
    available_tokens: int,
    start_train_token: int = 0,
) -> tuple[int, int]:
    """(optimizer_steps, tokens_needed) for a run of at least `min_train_tokens` tokens.

    The budget is rounded up to whole global batches; tokens_needed = steps * batch + 1 (the extra
    token is the last target). min_train_tokens == -1 means "every available token".
    """
    if min_train_tokens < -1 or min_train_tokens == 0:
        raise DataError(
            f"train.min_train_tokens must be a positive token count or -1 (all available), "
            f"got {min_train_tokens}"
        )
    _check_positive(global_batch_tokens=global_batch_tokens)
    if not 0 <= start_train_token < available_tokens:
        raise DataError(
            f"train.start_train_token {start_train_token:,} is past the end of the training split "
            f"({available_tokens:,} tokens)"
        )
    usable = available_tokens - start_train_token
    if min_train_tokens == -1:
        steps = (usable - 1) // global_batch_tokens
        if steps == 0:
            raise DataError(
                f"the training split has {usable:,} tokens from start_train_token "
                f"{start_train_token:,}, less than one global batch ({global_batch_tokens:,} + 1); "
                "lower train.microbatch_size, train.gradient_accumulation_steps or "
                "model.context_length"
            )
        return steps, steps * global_batch_tokens + 1
    steps = math.ceil(min_train_tokens / global_batch_tokens)
    needed = steps * global_batch_tokens + 1
    if needed > usable:
        raise DataError(
            f"dataset too small: the training split has {usable:,} tokens from start_train_token "
            f"{start_train_token:,}, the run needs {needed:,} ({steps:,} steps x "
            f"{global_batch_tokens:,} + 1); lower train.min_train_tokens (-1 uses all there is)"
        )
    return steps, needed


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


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


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
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or _env_true("HF_HUB_OFFLINE"):
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


# ---------------------------------------------------------------------------------------------
# Tokenising documents into a dataset directory (shared by the built-in corpus and `prepare`)
# ---------------------------------------------------------------------------------------------

T = TypeVar("T")
R = TypeVar("R")


def _encode_documents(texts: list[str], tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of non-blank documents, each followed by EOT, and each document's token count
    (GPT-2 unless another tokenizer is given)."""
    tokenizer = GPT2Tokenizer() if tokenizer is None else tokenizer
    docs = [ids + [tokenizer.eot_id]
            for ids in tokenizer.encode_documents([text for text in texts if text.strip()])]
    lengths = np.array([len(doc) for doc in docs], dtype=np.int64)
    tokens = [np.array(doc, dtype=np.uint16) for doc in docs]
    return (np.concatenate(tokens) if tokens else np.zeros(0, np.uint16)), lengths


def _map_ordered(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """map(fn, items) in order over a process pool, keeping at most 2 x workers tasks in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    method = "fork" if sys.platform == "linux" else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        pending: deque[Any] = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _batched(docs: Iterable[str], max_docs: int = 512, max_chars: int = 4_000_000) -> Iterator[list[str]]:
    """Group documents into lists of at most max_docs documents / about max_chars characters."""
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _validation_start(doc_ends: np.ndarray, target_tokens: int) -> int:
    """Token index where validation starts: the last documents holding >= target_tokens.

    Splits on a document boundary and keeps at least one document on each side.
    """
    total = int(doc_ends[-1])
    boundaries = doc_ends[:-1]
    i = int(np.searchsorted(boundaries, total - target_tokens, side="right")) - 1
    return int(boundaries[max(i, 0)])


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def tokenize_into(
    out_dir: Path,
    batches: Iterable[list[str]],
    *,
    meta: dict[str, Any],
    tokenizer: Tokenizer | None = None,
    validation_documents: int | None = None,
    validation_fraction: float = 0.01,
    min_validation_tokens: int = 1,
    workers: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Tokenise document batches into out_dir/{train,validation}.safetensors + meta.json (and the
    tokenizer's tokenizer.json when it is a BPE).

    The validation split is the last `validation_documents` non-blank documents when given, else
    the last documents holding `validation_fraction` of the tokens (at least
    `min_validation_tokens`). GPT-2 encodes on `workers` processes; a BPE encodes in this process
    (`tokenizers` uses its own threads). Tokens stream to a raw temporary file, so memory stays
    bounded however big the input is.
    """
    tokenizer = GPT2Tokenizer() if tokenizer is None else tokenizer
    out_dir.mkdir(parents=True, exist_ok=True)
    raw_path = out_dir / f".tokens-{uuid.uuid4().hex}.tmp"
    lengths: list[np.ndarray] = []
    n_docs = n_tokens = 0
    started = last_report = time.monotonic()
    if isinstance(tokenizer, GPT2Tokenizer):
        get_tokenizer()  # build it once here, so forked workers inherit it
        encoded = _map_ordered(_encode_documents, batches, workers)
    else:
        encoded = (_encode_documents(batch, tokenizer) for batch in batches)
    try:
        with open(raw_path, "wb") as raw:
            for tokens, doc_lengths in encoded:
                raw.write(tokens.data)
                lengths.append(doc_lengths)
                n_docs += len(doc_lengths)
                n_tokens += len(tokens)
                if progress and time.monotonic() - last_report >= 10:
                    last_report = time.monotonic()
                    elapsed = last_report - started
                    print(
                        f"prepare: {n_docs:,} documents, {n_tokens:,} tokens "
                        f"({n_docs / elapsed:,.0f} docs/s, {n_tokens / elapsed:,.0f} tokens/s)",
                        file=sys.stderr,
                        flush=True,
                    )
        if n_docs < 2:
            raise DataError(
                f"found {n_docs} non-empty documents for {out_dir}; need at least 2 "
                "(one for train, one for validation)"
            )
        doc_ends = np.cumsum(np.concatenate(lengths))
        if validation_documents is not None:
            if not 1 <= validation_documents < n_docs:
                raise DataError(f"validation_documents={validation_documents} must be in "
                                f"[1, {n_docs - 1}] for {n_docs} documents")
            split = int(doc_ends[n_docs - validation_documents - 1])
        else:
            target = max(min_validation_tokens, math.ceil(validation_fraction * n_tokens))
            split = _validation_start(doc_ends, target)
        tokens = np.memmap(raw_path, dtype=np.uint16, mode="r", shape=(n_tokens,))
        chunk = 1 << 24
        for name, lo, hi in (("train", 0, split), ("validation", split, n_tokens)):
            chunks = (tokens[i : min(i + chunk, hi)] for i in range(lo, hi, chunk))
            _write_tokens_atomic(out_dir / f"{name}.safetensors", chunks, hi - lo, np.uint16)
        del tokens
    finally:
        raw_path.unlink(missing_ok=True)
    train_docs = int(np.searchsorted(doc_ends, split, side="right"))
    result = {
        **meta,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.n_vocab,
        "eot_id": tokenizer.eot_id,
        "dtype": "uint16",
        "documents": n_docs,
        "train_documents": train_docs,
        "validation_documents": n_docs - train_docs,
        "train_tokens": split,
        "validation_tokens": n_tokens - split,
        "seconds": round(time.monotonic() - started, 2),
    }
    if isinstance(tokenizer, BPETokenizer):
        tokenizer.save(out_dir / BPE_FILE)
        result["tokenizer_sha256"] = file_sha256(out_dir / BPE_FILE)
    write_json_atomic(out_dir / "meta.json", result)
    return result


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename a finished tmp dir to final; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / "meta.json").is_file():
            raise


# ---------------------------------------------------------------------------------------------
# prepare_dataset: token files from .txt / .parquet documents
# ---------------------------------------------------------------------------------------------

_INPUT_SUFFIXES = (".txt", ".parquet")


def _input_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand inputs (files, or directories searched for .txt/.parquet) and check them."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in _INPUT_SUFFIXES)
        elif not path.exists():
            raise DataError(f"input {path} does not exist")
        elif path.suffix not in _INPUT_SUFFIXES:
            raise DataError(
                f"input {path} has an unsupported type; allowed: .txt (one document per file), "
                ".parquet (one document per row of its `text` column)"
            )
        else:
            files.append(path)
    if not files:
        raise DataError("no input files (.txt or .parquet) given")
    if any(f.suffix == ".parquet" for f in files):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError("reading .parquet inputs needs pyarrow: pip install pyarrow") from e
        for f in files:
            if f.suffix == ".parquet" and "text" not in pq.ParquetFile(f).schema_arrow.names:
                raise DataError(f"parquet file {f} has no `text` column")
    return files


def _read_documents(files: list[Path]) -> Iterator[str]:
    """Documents of the input files in order: a whole .txt file, or each parquet `text` row."""
    for path in files:
        if path.suffix == ".txt":
            try:
                yield path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"input {path} is not valid UTF-8 text ({e.reason})") from e
        else:
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=["text"]):
                yield from (text for text in batch.column(0).to_pylist() if text)


def validation_document_count(lengths: Sequence[int], fraction: float) -> int:
    """How many of the last documents (of `lengths` characters each) hold at least `fraction` of
    the characters: at least one, and at least one document left for training."""
    total, tail, count = sum(lengths), 0, 0
    for length in reversed(lengths):
        if tail >= fraction * total or count == len(lengths) - 1:
            break
        tail += length
        count += 1
    return max(count, 1)


def prepare_dataset(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    validation_fraction: float = 0.01,
    workers: int | None = None,
    progress: bool = True,
    tokenizer: str = "gpt2",
) -> dict[str, Any]:
    """Build a token dataset directory from .txt files and/or parquet files with a `text` column.

    `tokenizer` is `gpt2` (GPT-2's ids, tokenised on `workers` processes; the last
    `validation_fraction` of the tokens, on a document boundary, is the validation split) or
    `bpe-<N>` (a byte-level BPE of N tokens fitted to the training documents, saved beside the
    token files as tokenizer.json; validation is the last documents holding `validation_fraction`
    of the characters, decided before the fit so it never sees them). Each document is followed
    by EOT. Returns the counts also written to meta.json.
    """
    if not 0 < validation_fraction < 1:
        raise DataError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    try:
        vocab_size = parse_tokenizer_name(tokenizer)
    except TokenizerError as e:
        raise DataError(str(e)) from None
    workers = (os.cpu_count() or 1) if workers is None else workers
    _check_positive(workers=workers)
    files = _input_files(inputs)
    out_dir = Path(out_dir)

    def say(message: str) -> None:
        if progress:
            print(f"prepare: {message}", file=sys.stderr, flush=True)

    meta: dict[str, Any] = {"source": [str(f) for f in files]}
    if vocab_size is None:
        say(f"tokenising {len(files)} files with {workers} workers into {out_dir}")
        result = tokenize_into(out_dir, _batched(_read_documents(files)), meta=meta,
                               validation_fraction=validation_fraction, workers=workers,
                               progress=progress)
    else:
        lengths = [len(doc) for doc in _read_documents(files) if doc.strip()]
        if len(lengths) < 2:
            raise DataError(f"found {len(lengths)} non-empty documents in the inputs; need at least 2 "
                            "(one for train, one for validation)")
        held_out = validation_document_count(lengths, validation_fraction)
        say(f"fitting a {vocab_size}-token BPE to {len(lengths) - held_out:,} training documents")
        training = (doc for doc in _read_documents(files) if doc.strip())
        bpe = train_bpe(itertools.islice(training, len(lengths) - held_out), vocab_size)
        say(f"tokenising {len(files)} files with {bpe.name} into {out_dir}")
        result = tokenize_into(out_dir, _batched(_read_documents(files)), meta=meta, tokenizer=bpe,
                               validation_documents=held_out, progress=progress)
    say(f"{result['documents']:,} documents -> {result['train_tokens']:,} train + "
        f"{result['validation_tokens']:,} validation tokens ({result['tokenizer']}) in "
        f"{result['seconds']:.1f} s")
    return result
