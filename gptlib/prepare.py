"""Making a dataset: documents tokenised into train/validation token files, published atomically
(`gptlib prepare` for .txt/.parquet files; the built-in corpus uses the same path)."""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from gptlib.config import one_line
from gptlib.data import DataError, check_positive, write_tokens_atomic
from gptlib.display import notice
from gptlib.tokenizer import (
    BPE_FILE,
    BPETokenizer,
    GPT2Tokenizer,
    Tokenizer,
    TokenizerError,
    file_sha256,
    get_tokenizer,
    parse_tokenizer_name,
    train_bpe,
)

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
    started = time.monotonic()
    if isinstance(tokenizer, GPT2Tokenizer):
        get_tokenizer()  # build it once here, so forked workers inherit it
        encoded = _map_ordered(_encode_documents, batches, workers)
    else:
        encoded = (_encode_documents(batch, tokenizer) for batch in batches)
    try:
        doc_ends = _stream_tokens(raw_path, encoded, progress)
        n_docs, n_tokens = len(doc_ends), int(doc_ends[-1]) if len(doc_ends) else 0
        if n_docs < 2:
            raise DataError(
                f"found {n_docs} non-empty documents for {out_dir}; need at least 2 "
                "(one for train, one for validation)"
            )
        split = _split_point(doc_ends, validation_documents, validation_fraction, min_validation_tokens)
        _write_splits(raw_path, out_dir, split, n_tokens)
    finally:
        raw_path.unlink(missing_ok=True)
    train_docs = int(np.searchsorted(doc_ends, split, side="right"))
    result = {
        **meta, "tokenizer": tokenizer.name, "vocab_size": tokenizer.n_vocab,
        "eot_id": tokenizer.eot_id, "dtype": "uint16",
        "documents": n_docs, "train_documents": train_docs, "validation_documents": n_docs - train_docs,
        "train_tokens": split, "validation_tokens": n_tokens - split,
        "seconds": round(time.monotonic() - started, 2),
    }
    if isinstance(tokenizer, BPETokenizer):
        tokenizer.save(out_dir / BPE_FILE)
        result["tokenizer_sha256"] = file_sha256(out_dir / BPE_FILE)
    write_json_atomic(out_dir / "meta.json", result)
    return result


def _split_point(doc_ends: np.ndarray, validation_documents: int | None, validation_fraction: float,
                 min_validation_tokens: int) -> int:
    """The first validation token: before the last `validation_documents` documents, else before
    the last documents that hold `validation_fraction` of the tokens (at least the minimum)."""
    n_docs, n_tokens = len(doc_ends), int(doc_ends[-1])
    if validation_documents is not None:
        if not 1 <= validation_documents < n_docs:
            raise DataError(f"validation_documents={validation_documents} must be in "
                            f"[1, {n_docs - 1}] for {n_docs} documents")
        return int(doc_ends[n_docs - validation_documents - 1])
    target = max(min_validation_tokens, math.ceil(validation_fraction * n_tokens))
    return _validation_start(doc_ends, target)


def _stream_tokens(raw_path: Path, encoded: Iterable[tuple[np.ndarray, np.ndarray]],
                   progress: bool) -> np.ndarray:
    """Append every encoded batch's tokens to the raw file; the documents' cumulative end offsets."""
    lengths: list[np.ndarray] = []
    n_docs = n_tokens = 0
    started = last_report = time.monotonic()
    with open(raw_path, "wb") as raw:
        for tokens, doc_lengths in encoded:
            raw.write(tokens.data)
            lengths.append(doc_lengths)
            n_docs += len(doc_lengths)
            n_tokens += len(tokens)
            if progress and time.monotonic() - last_report >= 10:
                last_report = time.monotonic()
                elapsed = last_report - started
                notice(f"prepare: {n_docs:,} documents, {n_tokens:,} tokens "
                       f"({n_docs / elapsed:,.0f} docs/s, {n_tokens / elapsed:,.0f} tokens/s)")
    return np.cumsum(np.concatenate(lengths)) if lengths else np.zeros(0, dtype=np.int64)


def _write_splits(raw_path: Path, out_dir: Path, split: int, n_tokens: int) -> None:
    """train = tokens [0, split), validation = [split, n_tokens), copied in 16M-token chunks."""
    tokens = np.memmap(raw_path, dtype=np.uint16, mode="r", shape=(n_tokens,))
    chunk = 1 << 24
    for name, lo, hi in (("train", 0, split), ("validation", split, n_tokens)):
        chunks = (tokens[i : min(i + chunk, hi)] for i in range(lo, hi, chunk))
        write_tokens_atomic(out_dir / f"{name}.safetensors", chunks, hi - lo, np.uint16)
    del tokens


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
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError("reading .parquet inputs needs pyarrow: pip install pyarrow") from e
        for f in files:
            if f.suffix != ".parquet":
                continue
            try:
                schema = pq.ParquetFile(f).schema_arrow
            except Exception as e:  # pyarrow's ArrowInvalid, OSError ...
                raise DataError(f"input {f} is not a readable parquet file ({one_line(e)})") from None
            if "text" not in schema.names:
                raise DataError(f"parquet file {f} has no `text` column (it has {', '.join(schema.names)})")
            kind = schema.field("text").type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise DataError(f"parquet file {f}: its `text` column holds {kind}, not strings")
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
    check_positive(workers=workers)
    files = _input_files(inputs)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir} is a file; give a folder for the dataset")

    def say(message: str) -> None:
        if progress:
            notice(f"prepare: {message}")

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
