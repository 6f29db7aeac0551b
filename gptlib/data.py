"""Token data: token files and per-rank batch reads, and the token budget.

A token file is a safetensors file holding one 1-D tensor `tokens` (uint16 when every id fits,
else int32); documents are separated by the tokenizer's `<|endoftext|>` (50256 in GPT-2). A dataset
is a directory with `train.safetensors` and `validation.safetensors`, the layout of the HF dataset
`gpjt/fineweb-gpt2-tokens`, plus (when gptlib made it) `meta.json` naming its tokenizer and, for a
fitted BPE, `tokenizer.json` (see gptlib.tokenizer). Where datasets come from is gptlib.sources;
making one from documents is gptlib.prepare; the built-in corpus is gptlib.corpus.

Reads are positioned reads (`os.pread`) of one slice at a time, so a rank never holds a whole split
in memory, and its resident memory does not grow with the file (a memory map would count every page
it ever touched as resident). The training stream
is cut into blocks of `microbatch_size` contiguous context-length windows; accumulation step `a`
of optimizer step `s` on rank `r` reads block `(s * GA + a) * world_size + r`, so where the data
comes from is a pure function of the step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

SPLITS = ("train", "validation")
DATASET_FILES = tuple(f"{split}.safetensors" for split in SPLITS)

# safetensors dtype codes we read, and the numpy dtypes we write them with.
READ_DTYPES = {"U16": np.uint16, "I32": np.int32, "I64": np.int64}
_WRITE_CODES = {np.dtype(np.uint16): "U16", np.dtype(np.int32): "I32"}


class DataError(ValueError):
    """A user-facing data problem: names the bad file, key or value and what is allowed."""


# ---------------------------------------------------------------------------------------------
# Token files
# ---------------------------------------------------------------------------------------------


# The safetensors format is an 8-byte little-endian header size, a JSON header (padded to a multiple
# of 8) and the raw little-endian tensor bytes. Writing it by hand lets a dataset much larger than
# memory be written chunk by chunk; reading the header by hand gives the offset of a positioned read.


def tokens_header(n: int, dtype: np.dtype) -> bytes:
    """The size prefix and JSON header of a token file holding `n` tokens of `dtype`."""
    info = {"dtype": _WRITE_CODES[np.dtype(dtype.type)], "shape": [n],
            "data_offsets": [0, n * dtype.itemsize]}
    header = json.dumps({"tokens": info}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def read_tokens_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(file offset of the first token, the header's `tokens` entry) of a token file."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(size))["tokens"]
    return 8 + size + info["data_offsets"][0], info


def write_tokens_atomic(path: Path, chunks: Iterable[np.ndarray], n: int, dtype: Any) -> None:
    """Stream `n` tokens from `chunks` into a safetensors file at `path` (tmp file + rename)."""
    dtype = np.dtype(dtype).newbyteorder("<")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        written = 0
        with open(tmp, "wb") as f:
            f.write(tokens_header(n, dtype))
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
    write_tokens_atomic(path, [array], len(array), dtype)
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
        if self.dtype not in READ_DTYPES:
            allowed = ", ".join(READ_DTYPES)
            raise DataError(f"token file {self.path}: `tokens` has dtype {self.dtype}; allowed: {allowed}")
        if shape[0] == 0:
            raise DataError(f"token file {self.path}: `tokens` is empty")
        self._len = int(shape[0])
        self._numpy_dtype = np.dtype(READ_DTYPES[self.dtype]).newbyteorder("<")
        self._offset, _ = read_tokens_header(self.path)
        self._fd: int | None = None
        self._fd_pid: int | None = None

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r}, tokens={self._len:,}, dtype={self.dtype})"

    def array(self) -> np.memmap:
        """The whole file's tokens as a read-only memory map (nothing is read until indexed)."""
        return np.memmap(self.path, dtype=self._numpy_dtype, mode="r", offset=self._offset,
                         shape=(self._len,))

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


def check_positive(**values: int) -> None:
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
        check_positive(
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
        self.global_batch_tokens = global_batch_tokens(microbatch_size, context_length,
                                                       gradient_accumulation_steps, world_size)

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

    def step_windows(self, step: int) -> dict[str, list[int]]:
        """Every rank's context windows of optimizer step `step`, keyed by rank (spikes.json)."""
        return {str(rank): [w for accum in range(self.gradient_accumulation_steps)
                            for w in self.window_indices(step, accum, rank)]
                for rank in range(self.world_size)}

    def window_tokens(self, window: int) -> torch.Tensor:
        """The context_length + 1 tokens of window `window` (inputs plus the last target)."""
        if window < 0:
            raise DataError(f"window {window} must be >= 0")
        start = self.start_token + window * self.context_length
        return self.token_file.read(start, self.context_length + 1)


def global_batch_tokens(
    microbatch_size: int, context_length: int, gradient_accumulation_steps: int, world_size: int
) -> int:
    """Tokens per optimizer step: micro-batch x context x accumulation steps x ranks (the one
    formula; :meth:`gptlib.config.RunConfig.tokens_per_step` and the batch reader use it)."""
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
    check_positive(global_batch_tokens=global_batch_tokens)
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
