"""The built-in corpus `builtin:python-stdlib`: the miniature's offline, deterministic dataset.

Documents: every `.py` file of the running Python's standard library (tests and site-packages
left out; docstrings and comments come with the code) and every `pydoc_data` help topic -- about
12.6 M characters on CPython 3.11, on every machine that has Python. They are sorted by name, then
shuffled with a fixed seed, so the validation split (the first shuffled documents holding
`VALIDATION_CHARS` characters) and the training stream are draws from the same distribution and
share no document. A byte-level BPE of `VOCAB_SIZE` tokens is fitted to the training documents
alone (Hugging Face `tokenizers`) and ships beside the token files.

The dataset is built on first use into `$GPTLIB_CACHE/datasets/python-stdlib-<fingerprint>/`
(about 15 s on two cores) and reused; the fingerprint covers the Python version, the list of
source files with their sizes and times, the builder's settings and the `tokenizers` version.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import sysconfig
import time
import tokenize
import uuid
from dataclasses import dataclass
from pathlib import Path

from gptlib.data import DataError
from gptlib.display import notice
from gptlib.prepare import publish_dir, tokenize_into
from gptlib.sources import BUILTIN_PYTHON_STDLIB, default_cache_dir
from gptlib.tokenizer import train_bpe

CORPUS_VERSION = 2  # bump when what the builder writes changes
VOCAB_SIZE = 1024
SHUFFLE_SEED = 1729
VALIDATION_CHARS = 500_000  # about 180,000 tokens of the 1,024-token BPE
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
# The source of the help topics, which are documents of their own.
SKIP_FILES = {"pydoc_data/topics.py"}


@dataclass(frozen=True)
class Document:
    name: str  # a path relative to the standard library, or pydoc_data.topics:<key>
    text: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(stdlib: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of the standard library's .py files, sorted by path."""
    sources = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in files:
            path = Path(root, name)
            relative = path.relative_to(stdlib).as_posix()
            if not name.endswith(".py") or relative in SKIP_FILES:
                continue
            try:
                stat = path.stat()
            except OSError:
                continue
            sources.append((relative, stat.st_size, stat.st_mtime_ns))
    return sorted(sources)


def _read_source(path: Path) -> str:
    """A source file's text in its declared encoding (PEP 263), undecodable bytes replaced."""
    data = path.read_bytes()
    try:
        encoding, _ = tokenize.detect_encoding(iter(data.splitlines(keepends=True)).__next__)
    except (SyntaxError, StopIteration):
        encoding = "utf-8"
    return data.decode(encoding, errors="replace")


def documents(stdlib: Path | None = None) -> list[Document]:
    """Every non-blank document of the corpus, sorted by name."""
    from pydoc_data.topics import topics

    stdlib = stdlib_dir() if stdlib is None else stdlib
    docs = [Document(f"pydoc_data.topics:{key}", text) for key, text in topics.items()]
    for relative, _, _ in source_files(stdlib):
        try:
            docs.append(Document(relative, _read_source(stdlib / relative)))
        except OSError:
            continue
    return sorted((d for d in docs if d.text.strip()), key=lambda d: d.name)


def split_documents(
    docs: list[Document], seed: int = SHUFFLE_SEED, validation_chars: int = VALIDATION_CHARS
) -> tuple[list[Document], list[Document]]:
    """(train, validation): `docs` shuffled with `seed`; validation takes the first shuffled
    documents until they hold `validation_chars` characters, train the rest, in shuffled order."""
    shuffled = list(docs)
    random.Random(seed).shuffle(shuffled)
    held, count = 0, 0
    while count < len(shuffled) - 1 and held < validation_chars:
        held += len(shuffled[count].text)
        count += 1
    return shuffled[count:], shuffled[:count]


def fingerprint(stdlib: Path) -> str:
    """Short hash of everything the built dataset depends on."""
    import tokenizers

    key = {
        "python": sys.version,
        "builder": [CORPUS_VERSION, VOCAB_SIZE, SHUFFLE_SEED, VALIDATION_CHARS],
        "tokenizers": tokenizers.__version__,
        "stdlib": str(stdlib),
        "sources": source_files(stdlib),
    }
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]


def _say(message: str) -> None:
    notice(f"gptlib: {message}")


def build_python_stdlib(cache_dir: Path | None = None) -> Path:
    """The `builtin:python-stdlib` dataset directory, built on first use and reused afterwards."""
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    stdlib = stdlib_dir()
    final = cache_dir / "datasets" / f"python-stdlib-{fingerprint(stdlib)}"
    if (final / "meta.json").is_file():
        return final
    if final.exists():  # an incomplete leftover (never produced by this function): rebuild
        shutil.rmtree(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"cannot create the dataset cache {final.parent} ({e.strerror}); "
            "set GPTLIB_CACHE to a writable directory"
        ) from e
    started = time.monotonic()
    _say(f"building {BUILTIN_PYTHON_STDLIB} into {final} (once per machine) ...")
    train, validation = split_documents(documents(stdlib))
    chars = sum(len(d.text) for d in train + validation)
    _say(f"  {len(train) + len(validation):,} documents ({chars / 1e6:.1f} M characters) from "
         f"{stdlib}; fitting a {VOCAB_SIZE}-token BPE to the {len(train):,} training documents ...")
    bpe = train_bpe((d.text for d in train), VOCAB_SIZE)
    _say(f"  tokenising with {bpe.name} ...")
    tmp = final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        meta = tokenize_into(
            tmp,
            ([d.text for d in part] for part in (train, validation)),
            meta={"source": BUILTIN_PYTHON_STDLIB, "fingerprint": final.name.rsplit("-", 1)[1],
                  "python": sys.version.split()[0], "shuffle_seed": SHUFFLE_SEED,
                  "document_names": {"train": [d.name for d in train],
                                     "validation": [d.name for d in validation]}},
            tokenizer=bpe,
            validation_documents=len(validation),
        )
        publish_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(f"  {BUILTIN_PYTHON_STDLIB}: {meta['documents']:,} documents, {meta['train_tokens']:,} "
         f"train + {meta['validation_tokens']:,} validation tokens in "
         f"{time.monotonic() - started:.1f} s")
    return final
