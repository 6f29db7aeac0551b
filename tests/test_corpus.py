"""The built-in corpus builtin:python-stdlib: contents, a shuffled split disjoint by document, the
fitted tokenizer, caching."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from gptlib import corpus
from gptlib.data import token_budget
from gptlib.presets import resolve_config
from gptlib.sources import open_tokenizer, resolve_dataset
from gptlib.tokenizer import BPETokenizer, dataset_tokenizer


def _files(directory: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    train = load_file(str(directory / "train.safetensors"))["tokens"]
    validation = load_file(str(directory / "validation.safetensors"))["tokens"]
    return train, validation, json.loads((directory / "meta.json").read_text())


def test_contents_and_size(python_stdlib: tuple[Path, str]) -> None:
    directory, stderr = python_stdlib
    train, validation, meta = _files(directory)
    assert directory.name == f"python-stdlib-{meta['fingerprint']}"
    assert meta["tokenizer"] == f"bpe-{corpus.VOCAB_SIZE}" and meta["eot_id"] == 0
    assert train.dtype == validation.dtype == np.uint16
    assert int(max(train.max(), validation.max())) < corpus.VOCAB_SIZE
    assert (meta["train_tokens"], meta["validation_tokens"]) == (len(train), len(validation))
    assert len(validation) >= 100_000
    # Single epoch with room to spare: the default run reads at most a third of the training split.
    tiny = resolve_config("tiny")
    _, needed = token_budget(tiny.train.min_train_tokens, tiny.train.microbatch_size
                             * tiny.model.context_length * tiny.train.gradient_accumulation_steps,
                             len(train))
    assert len(train) >= 3 * needed
    assert tiny.model.vocab_size >= dataset_tokenizer(directory).n_vocab
    # Every document ends with EOT; the counts match the files.
    assert train[-1] == validation[-1] == 0
    assert (int((train == 0).sum()), int((validation == 0).sum())) == (
        meta["train_documents"], meta["validation_documents"])
    assert f"building builtin:python-stdlib into {directory}" in stderr
    assert f"{meta['train_tokens']:,} train + {meta['validation_tokens']:,} validation" in stderr


def test_split_is_shuffled_and_disjoint_by_document(python_stdlib: tuple[Path, str]) -> None:
    directory, _ = python_stdlib
    train, validation, meta = _files(directory)
    names = meta["document_names"]
    documents = {d.name: d.text for d in corpus.documents()}  # listed again, independently
    assert not set(names["train"]) & set(names["validation"])
    assert sorted(names["train"] + names["validation"]) == sorted(documents)
    # Shuffled: neither split is a run of the sorted order, and validation spans the whole of it.
    order = sorted(documents)
    positions = sorted(order.index(n) for n in names["validation"])
    assert positions != list(range(positions[0], positions[0] + len(positions)))
    assert positions[0] < len(order) / 4 and positions[-1] > 3 * len(order) / 4
    assert names["train"][:20] != sorted(names["train"])[:20]
    assert any(n.startswith("pydoc_data.topics:") for n in names["train"])
    # The validation file is exactly its documents' ids, each followed by EOT, in that order ...
    tokenizer = open_tokenizer(directory)
    expected = [t for name in names["validation"]
                for t in [*tokenizer.encode_documents([documents[name]])[0], 0]]
    assert validation.tolist() == expected
    # ... and the training file starts with its own documents (the first 25 checked).
    head = [t for name in names["train"][:25]
            for t in [*tokenizer.encode_documents([documents[name]])[0], 0]]
    assert train[: len(head)].tolist() == head


def test_fitted_tokenizer_round_trips_python(python_stdlib: tuple[Path, str]) -> None:
    tokenizer = open_tokenizer(python_stdlib[0])
    assert isinstance(tokenizer, BPETokenizer) and tokenizer.n_vocab == corpus.VOCAB_SIZE
    source = Path(corpus.__file__).read_text()  # text the fit never saw
    ids = tokenizer.encode_documents([source])[0]
    assert tokenizer.decode(ids) == source
    assert len(source) / len(ids) > 2.0  # merges worth having: well above one byte per token
    # A literal <|endoftext|> is text inside a document, the EOT id in a prompt.
    assert 0 not in tokenizer.encode_documents(["x = '<|endoftext|>'"])[0]
    assert tokenizer.encode("a<|endoftext|>")[-1] == 0


def test_the_fit_is_deterministic_across_processes(tmp_path: Path) -> None:
    """The same documents give the same tokenizer file in fresh processes (hash seeds differ)."""
    script = ("import sys; from gptlib.tokenizer import train_bpe; "
              "docs = [open(p).read() for p in sys.argv[2:]]; "
              "train_bpe(docs, 600).save(sys.argv[1])")
    sources = [str(p) for p in sorted(Path(corpus.__file__).parent.glob("*.py"))]
    files = []
    for seed in ("1", "2"):
        out = tmp_path / f"tok-{seed}.json"
        subprocess.run([sys.executable, "-c", script, str(out), *sources], check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed})
        files.append(out.read_bytes())
    assert files[0] == files[1]


def test_the_built_corpus_is_reused(python_stdlib: tuple[Path, str], monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    directory, _ = python_stdlib
    mtime = (directory / "train.safetensors").stat().st_mtime_ns

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt the cached corpus")

    monkeypatch.setattr(corpus, "tokenize_into", no_rebuild)
    assert resolve_dataset("builtin:python-stdlib") == directory
    assert (directory / "train.safetensors").stat().st_mtime_ns == mtime
    assert capsys.readouterr().err == ""
    assert sorted(p.name for p in directory.parent.iterdir() if p.name.startswith(".")) == []
