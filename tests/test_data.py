"""Token files, batch order, token budget, dataset sources and `prepare` (the built-in corpus:
test_corpus.py)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from gptlib import prepare, sources
from gptlib.data import BatchReader, DataError, TokenFile, global_batch_tokens, token_budget, write_token_file
from gptlib.prepare import prepare_dataset
from gptlib.sources import check_vocab_size, dataset_split, open_tokenizer, resolve_dataset
from gptlib.tokenizer import EOT_TOKEN, BPETokenizer, dataset_tokenizer, decode, encode

# ---------------------------------------------------------------------------------------------
# Token files


def test_write_and_read_uint16(tmp_path: Path) -> None:
    tokens = [5, 0, 50256, 65535, 17]
    path = write_token_file(tmp_path / "t.safetensors", tokens)
    stored = load_file(str(path))  # read back with safetensors itself
    assert list(stored) == ["tokens"]
    assert stored["tokens"].dtype == np.uint16
    assert stored["tokens"].tolist() == tokens
    tf = TokenFile(path)
    assert len(tf) == 5 and tf.dtype == "U16"
    got = tf.read(1, 3)
    assert got.dtype == torch.int64 and got.tolist() == [0, 50256, 65535]
    assert tf.read(0, 0).tolist() == []


@pytest.mark.parametrize(
    "tokens",
    [
        [1, 65536, 2**31 - 1],
        torch.tensor([1, 65536, 2**31 - 1]),
        np.array([1, 65536, 2**31 - 1], dtype=np.int64),
    ],
    ids=["list", "tensor", "numpy"],
)
def test_write_int32_when_ids_do_not_fit_uint16(tmp_path: Path, tokens: object) -> None:
    path = write_token_file(tmp_path / "t.safetensors", tokens)  # type: ignore[arg-type]
    assert load_file(str(path))["tokens"].dtype == np.int32
    assert TokenFile(path).read(0, 3).tolist() == [1, 65536, 2**31 - 1]


def test_write_is_atomic_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "t.safetensors"
    write_token_file(path, np.arange(10, dtype=np.int32))
    write_token_file(path, torch.tensor([7, 8, 9]))
    assert TokenFile(path).read(0, 3).tolist() == [7, 8, 9]
    assert sorted(p.name for p in path.parent.iterdir()) == ["t.safetensors"]  # no temp left


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_reads_files_written_by_safetensors(tmp_path: Path, dtype: type) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"tokens": np.arange(100, dtype=dtype)}, str(path))
    assert TokenFile(path).read(95, 5).tolist() == [95, 96, 97, 98, 99]


@pytest.mark.parametrize(
    ("tokens", "match"),
    [
        ([], "non-empty 1-D"),
        ([[1, 2], [3, 4]], r"non-empty 1-D sequence, got shape \(2, 2\)"),
        ([1.5, 2.0], "must be integer ids, got dtype float64"),
        ([3, -1], r"must lie in \[0, 2\*\*31\), got values in \[-1, 3\]"),
        ([2**31], r"got values in \[2147483648, 2147483648\]"),
    ],
)
def test_write_token_file_errors(tmp_path: Path, tokens: list, match: str) -> None:
    with pytest.raises(DataError, match=match):
        write_token_file(tmp_path / "t.safetensors", tokens)


def test_token_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"token file .*missing\.safetensors does not exist"):
        TokenFile(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(DataError, match=r"garbage\.safetensors is not a safetensors file"):
        TokenFile(garbage)
    cases = {
        "nokey": ({"ids": np.arange(3, dtype=np.uint16)}, r"has no tensor `tokens`.*\['ids'\]"),
        "twod": ({"tokens": np.zeros((2, 3), np.uint16)}, r"shape \[2, 3\]; expected 1-D"),
        "float": ({"tokens": np.zeros(3, np.float32)}, "dtype F32; allowed: U16, I32, I64"),
        "empty": ({"tokens": np.zeros(0, np.uint16)}, "`tokens` is empty"),
    }
    for name, (tensors, match) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(DataError, match=rf"{name}\.safetensors.*{match}"):
            TokenFile(path)
    tf = TokenFile(write_token_file(tmp_path / "ok.safetensors", [1, 2, 3]))
    with pytest.raises(DataError, match=r"cannot read tokens \[2, 5\) from .*ok\.safetensors"):
        tf.read(2, 3)
    with pytest.raises(DataError, match="it has 3 tokens"):
        tf.read(-1, 1)


def _memory_kib() -> dict[str, int]:
    """VmRSS (all resident memory) and RssAnon (heap copies, excluding mapped file pages)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "RssAnon")}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_reading_the_whole_file_does_not_grow_resident_memory(tmp_path: Path) -> None:
    n = 50_000_000  # 100 MB of uint16
    path = tmp_path / "big.safetensors"
    write_token_file(path, (np.arange(n, dtype=np.uint32) % 50_000).astype(np.uint16))
    tf = TokenFile(path)
    reader = BatchReader(tf, 4, 1024, 1, 1)
    reader.get(0, 0, 0)  # warm up lazy allocations
    before = _memory_kib()
    for step in range(reader.max_steps):  # every micro-batch, as a run reads its split
        inputs, _ = reader.get(step, 0, 0)
        assert inputs[0, 0].item() == step * 4 * 1024 % 50_000
    after = _memory_kib()
    assert inputs.shape == (4, 1024)
    # A memory map would leave every page it read resident (+100 MB); positioned reads leave none.
    assert after["RssAnon"] - before["RssAnon"] < 5 * 1024
    assert after["VmRSS"] - before["VmRSS"] < 10 * 1024


def test_token_file_survives_pickling_and_fork(tmp_path: Path) -> None:
    tf = TokenFile(write_token_file(tmp_path / "t.safetensors", np.arange(1000) % 500))
    assert tf.read(10, 3).tolist() == [10, 11, 12]  # opens this process's descriptor
    copy = pickle.loads(pickle.dumps(tf))
    assert copy.read(998, 2).tolist() == [498, 499] and len(copy) == 1000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reads through its own descriptor, then exits without cleanup
        os.write(write, bytes(tf.read(500, 4).tolist()))
        os._exit(0)
    os.waitpid(pid, 0)
    assert list(os.read(read, 4)) == [0, 1, 2, 3]
    assert tf.read(499, 2).tolist() == [499, 0]  # the parent's descriptor still works


# ---------------------------------------------------------------------------------------------
# Batch order


@pytest.fixture
def stream_file(tmp_path: Path) -> tuple[TokenFile, np.ndarray]:
    """A 10,000-token file of random ids, and the ids."""
    stream = np.random.default_rng(0).integers(0, 50257, size=10_000)
    return TokenFile(write_token_file(tmp_path / "s.safetensors", stream)), stream


@pytest.mark.parametrize(
    ("mb", "ctx", "ga", "world", "start"),
    [(1, 8, 1, 1, 0), (2, 16, 1, 4, 0), (3, 5, 4, 1, 7), (2, 8, 3, 2, 123), (4, 32, 2, 8, 1)],
)
def test_batch_order_matches_series(
    stream_file: tuple[TokenFile, np.ndarray], mb: int, ctx: int, ga: int, world: int, start: int
) -> None:
    tf, stream = stream_file
    reader = BatchReader(tf, mb, ctx, ga, world, start_token=start)
    assert reader.global_batch_tokens == global_batch_tokens(mb, ctx, ga, world) == mb * ctx * ga * world
    # The series' loop order: steps, then accumulation steps, then ranks each take the next block.
    position = start
    seen_inputs = []
    for step in range(reader.max_steps):
        for accum in range(ga):
            for rank in range(world):
                inputs, targets = reader.get(step, accum, rank)
                assert inputs.dtype == targets.dtype == torch.int64
                assert inputs.shape == targets.shape == (mb, ctx)
                expected = stream[position : position + mb * ctx + 1]
                assert inputs.flatten().tolist() == expected[:-1].tolist()
                assert targets.flatten().tolist() == expected[1:].tolist()
                windows = reader.window_indices(step, accum, rank)
                assert windows == [(position - start) // ctx + i for i in range(mb)]
                for row, window in enumerate(windows):
                    window_tokens = reader.window_tokens(window)
                    assert window_tokens[:-1].tolist() == inputs[row].tolist()
                    assert window_tokens[1:].tolist() == targets[row].tolist()
                seen_inputs.append(inputs.flatten())
                position += mb * ctx
    # Together the ranks and steps read the stream contiguously: no overlap, no gap.
    covered = torch.cat(seen_inputs).tolist()
    assert covered == stream[start : start + len(covered)].tolist()
    assert len(covered) == reader.max_steps * reader.global_batch_tokens
    # The step after the last whole one runs past the end of the file.
    assert position + reader.global_batch_tokens + 1 > len(stream)


def test_max_steps_agrees_with_token_budget(stream_file: tuple[TokenFile, np.ndarray]) -> None:
    tf, _ = stream_file
    reader = BatchReader(tf, 2, 16, 3, 2, start_token=50)
    steps, needed = token_budget(-1, reader.global_batch_tokens, len(tf), 50)
    assert steps == reader.max_steps == (10_000 - 50 - 1) // 192
    assert needed == steps * 192 + 1
    reader.get(steps - 1, 2, 1)  # the last block of the budget is readable


def test_batch_reader_errors(stream_file: tuple[TokenFile, np.ndarray]) -> None:
    tf, _ = stream_file
    with pytest.raises(DataError, match="microbatch_size must be a positive integer, got 0"):
        BatchReader(tf, 0, 16, 1, 1)
    with pytest.raises(DataError, match="world_size must be a positive integer"):
        BatchReader(tf, 1, 16, 1, -2)
    with pytest.raises(DataError, match=r"start_token 10000 is outside .*s\.safetensors"):
        BatchReader(tf, 1, 16, 1, 1, start_token=10_000)
    reader = BatchReader(tf, 2, 100, 1, 2)
    with pytest.raises(DataError, match="rank 2 out of range for world_size 2"):
        reader.get(0, 0, 2)
    with pytest.raises(DataError, match="accumulation step 1 out of range"):
        reader.get(0, 1, 0)
    message = r"step 25 \(accumulation step 0, rank 0\) needs tokens \[10,000, 10,201\) but "
    with pytest.raises(DataError, match=message + r".*s\.safetensors has 10,000"):
        reader.get(25, 0, 0)
    with pytest.raises(DataError, match=r"cannot read tokens \[9,900, 10,001\)"):
        reader.window_tokens(99)


def test_pin_memory_flag(stream_file: tuple[TokenFile, np.ndarray]) -> None:
    tf, _ = stream_file
    reader = BatchReader(tf, 2, 8, 1, 1, pin_memory=True)
    assert reader.pin_memory == torch.cuda.is_available()
    inputs, targets = reader.get(0, 0, 0)
    assert inputs.is_pinned() == targets.is_pinned() == torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------
# Token budget


def test_token_budget_full_scale_preset() -> None:
    gbt = global_batch_tokens(12, 1024, 1, 8)
    assert gbt == 96 * 1024
    assert token_budget(3_260_190_720, gbt, 10_000_000_000) == (33_165, 3_260_252_161)


def test_token_budget_rounding() -> None:
    assert token_budget(1000, 100, 1001) == (10, 1001)  # exact multiple
    assert token_budget(1001, 100, 5000) == (11, 1101)  # rounded up
    assert token_budget(1, 100, 101) == (1, 101)
    assert token_budget(-1, 100, 1000) == (9, 901)  # 999 usable -> 9 whole batches + 1
    assert token_budget(-1, 100, 1001) == (10, 1001)
    assert token_budget(-1, 100, 1001, start_train_token=1) == (9, 901)
    assert token_budget(200, 100, 1000, start_train_token=799) == (2, 201)


def test_token_budget_errors() -> None:
    with pytest.raises(
        DataError,
        match=r"dataset too small: the training split has 1,000 tokens .* the run needs 1,101 "
        r"\(11 steps x 100 \+ 1\); lower train\.min_train_tokens",
    ):
        token_budget(1001, 100, 1000)
    with pytest.raises(DataError, match="has 200 tokens from start_train_token 800"):
        token_budget(200, 100, 1000, start_train_token=800)
    with pytest.raises(DataError, match=r"start_train_token 1,000 is past the end .*1,000 tokens"):
        token_budget(10, 100, 1000, start_train_token=1000)
    with pytest.raises(DataError, match=r"less than one global batch \(100 \+ 1\)"):
        token_budget(-1, 100, 100)
    for bad in (0, -2):
        with pytest.raises(DataError, match=rf"min_train_tokens must be .* got {bad}"):
            token_budget(bad, 100, 1000)
    with pytest.raises(DataError, match="global_batch_tokens must be a positive integer"):
        token_budget(10, 0, 1000)


# ---------------------------------------------------------------------------------------------
# Dataset sources


def _dataset_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    write_token_file(path / "train.safetensors", [1, 2, 3, EOT_TOKEN])
    write_token_file(path / "validation.safetensors", [4, 5, EOT_TOKEN])
    return path


def test_resolve_local_directory(tmp_path: Path) -> None:
    directory = _dataset_dir(tmp_path / "ds")
    assert resolve_dataset(str(directory)) == directory
    assert dataset_split(directory, "validation").read(0, 3).tolist() == [4, 5, EOT_TOKEN]
    with pytest.raises(DataError, match="split must be one of train, validation, got 'test'"):
        dataset_split(directory, "test")
    (directory / "validation.safetensors").unlink()
    with pytest.raises(DataError, match=r"ds lacks validation\.safetensors; use `builtin:"):
        resolve_dataset(str(directory))
    with pytest.raises(
        DataError,
        match=r"'nope' is not a directory or known source; use `builtin:python-stdlib`, "
        r"`hf:<owner/repo>`, or a directory with train\.safetensors and validation\.safetensors",
    ):
        resolve_dataset("nope")
    with pytest.raises(DataError, match="unknown built-in dataset 'builtin:shakespeare'"):
        resolve_dataset("builtin:shakespeare")
    with pytest.raises(DataError, match="'builtin:stdlib-docs' .* was replaced by builtin:python-stdlib"):
        resolve_dataset("builtin:stdlib-docs")
    with pytest.raises(DataError, match=r"must name a repository as hf:<owner>/<name>"):
        resolve_dataset("hf:just-a-name", tmp_path)


def test_resolve_hf_uses_cached_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def no_download(**kwargs: object) -> None:
        raise AssertionError("must not download")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    local = _dataset_dir(tmp_path / "datasets" / "hf" / "gpjt--fineweb-gpt2-tokens")
    assert resolve_dataset("hf:gpjt/fineweb-gpt2-tokens", tmp_path) == local
    monkeypatch.setenv("GPTLIB_CACHE", str(tmp_path))
    assert dataset_split("hf:gpjt/fineweb-gpt2-tokens", "train").read(0, 1).tolist() == [1]


def test_resolve_hf_offline_names_what_to_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as error:
        resolve_dataset("hf:gpjt/fineweb-gpt2-tokens", tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "train.safetensors and validation.safetensors of dataset gpjt/fineweb-gpt2-tokens" in message
    assert str(tmp_path / "datasets" / "hf" / "gpjt--fineweb-gpt2-tokens") in message


def test_resolve_hf_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    calls: list[dict] = []

    def fake_snapshot_download(**kwargs: object) -> str:
        calls.append(kwargs)
        _dataset_dir(Path(str(kwargs["local_dir"])))
        return str(kwargs["local_dir"])

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    local = resolve_dataset("hf:someone/tokens", tmp_path)
    assert local == tmp_path / "datasets" / "hf" / "someone--tokens"
    assert calls == [
        {
            "repo_id": "someone/tokens",
            "repo_type": "dataset",
            "allow_patterns": ["train.safetensors", "validation.safetensors", "meta.json",
                                   "tokenizer.json"],
            "local_dir": local,
        }
    ]

    def failing_download(**kwargs: object) -> str:
        raise OSError("connection refused\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing_download)
    with pytest.raises(DataError, match=r"could not download .* OSError: connection refused$"):
        resolve_dataset("hf:someone/other", tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kwargs: "")
    with pytest.raises(DataError, match=r"hf:someone/empty has no train\.safetensors, valid"):
        resolve_dataset("hf:someone/empty", tmp_path)


# ---------------------------------------------------------------------------------------------
# The dataset cache


def test_unwritable_cache_is_a_data_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DataError, match=r"cannot create the dataset cache .*set GPTLIB_CACHE"):
        resolve_dataset("builtin:python-stdlib", blocker)


def test_publish_keeps_the_first_finished_build(tmp_path: Path) -> None:
    theirs, ours = tmp_path / "final", tmp_path / ".final.tmp"
    for directory, text in ((theirs, "theirs"), (ours, "ours")):
        directory.mkdir()
        (directory / "meta.json").write_text(text)
    prepare.publish_dir(ours, theirs)
    assert (theirs / "meta.json").read_text() == "theirs"
    prepare.publish_dir(ours, tmp_path / "fresh")
    assert (tmp_path / "fresh" / "meta.json").read_text() == "ours"


# ---------------------------------------------------------------------------------------------
# prepare_dataset


TEXTS = [
    "First document.\nWith two lines.",
    "Ünïcödé, 中文, emoji 😀 and   spaces.",
    "A third one, a little longer than the others " * 5,
    "def f():\n    return 'code'\n",
    "The fifth and last document.",
]


def _expected_stream(texts: list[str]) -> list[int]:
    return [t for text in texts for t in [*encode(text, allow_eot=False), EOT_TOKEN]]


def _split_docs(tokens: np.ndarray) -> list[str]:
    ends = np.flatnonzero(tokens == EOT_TOKEN)
    starts = [0, *(ends[:-1] + 1)]
    return [decode(tokens[s:e]) for s, e in zip(starts, ends, strict=True)]


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_from_text_files(tmp_path: Path, workers: int) -> None:
    inputs = []
    for i, text in enumerate(TEXTS):
        inputs.append(tmp_path / f"doc{i}.txt")
        inputs[-1].write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    result = prepare_dataset(inputs, out, validation_fraction=0.2, workers=workers, progress=False)
    train = load_file(str(out / "train.safetensors"))["tokens"]
    validation = load_file(str(out / "validation.safetensors"))["tokens"]
    assert train.dtype == np.uint16
    assert train.tolist() + validation.tolist() == _expected_stream(TEXTS)
    assert _split_docs(train) + _split_docs(validation) == TEXTS
    # Validation = the fewest last documents holding >= 20% of the tokens.
    lengths = [len(encode(t)) + 1 for t in TEXTS]
    n_val = next(k for k in range(1, 5) if sum(lengths[-k:]) >= 0.2 * sum(lengths))
    assert result["validation_documents"] == n_val
    assert result["validation_tokens"] == len(validation) == sum(lengths[-n_val:])
    assert result["train_tokens"] == len(train)
    assert result["documents"] == 5
    assert json.loads((out / "meta.json").read_text()) == result
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "train.safetensors",
        "validation.safetensors",
    ]


def test_prepare_keeps_a_document_on_each_side(tmp_path: Path) -> None:
    inputs = []
    for i, text in enumerate(["tiny", "a much longer document " * 50, "tiny too"]):
        inputs.append(tmp_path / f"{i}.txt")
        inputs[-1].write_text(text)
    small = prepare_dataset(inputs, tmp_path / "a", 0.0001, workers=1, progress=False)
    assert small["validation_documents"] == 1
    large = prepare_dataset(inputs, tmp_path / "b", 0.99, workers=1, progress=False)
    assert large["train_documents"] == 1 and large["validation_documents"] == 2


def test_prepare_with_a_fitted_bpe(tmp_path: Path) -> None:
    """--tokenizer bpe-N: a BPE fitted to the training documents only, shipped beside the tokens."""
    train_texts = [f"def handler_{i}(request):\n    return request.reply({i})\n" * 3 for i in range(40)]
    held_out = "zebraquokka " * 200  # only in the last document: the validation split
    inputs = []
    for i, text in enumerate([*train_texts, held_out]):
        inputs.append(tmp_path / f"{i:02d}.txt")
        inputs[-1].write_text(text)
    out = tmp_path / "bpe"
    share = len(held_out) / sum(len(t) for t in [*train_texts, held_out])
    result = prepare_dataset(inputs, out, validation_fraction=share * 0.9, progress=False,
                             tokenizer="bpe-300")
    assert result["tokenizer"] == "bpe-300" and result["vocab_size"] == 300
    assert (result["train_documents"], result["validation_documents"]) == (40, 1)
    tokenizer = dataset_tokenizer(out)
    assert isinstance(tokenizer, BPETokenizer) and tokenizer.n_vocab == 300 and tokenizer.eot_id == 0
    assert result["tokenizer_sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    train = load_file(str(out / "train.safetensors"))["tokens"]
    validation = load_file(str(out / "validation.safetensors"))["tokens"]
    assert int(train.max()) < 300 and int(validation.max()) < 300
    # The files hold exactly each document's ids and EOT, and decode back to the documents.
    expected = [t for text in train_texts for t in [*tokenizer.encode(text), 0]]
    assert train.tolist() == expected
    assert tokenizer.decode(validation[:-1]) == held_out and validation[-1] == 0
    # The fit never saw the held-out text: its word is no token, though it is the most frequent.
    assert not any("zebra" in piece for piece in tokenizer.backend.get_vocab())
    assert any("handler" in piece for piece in tokenizer.backend.get_vocab())
    with pytest.raises(DataError, match=r"tokenizer 'bpe-9': not allowed; allowed: gpt2, or bpe-<N>"):
        prepare_dataset(inputs, tmp_path / "bad", progress=False, tokenizer="bpe-9")


def test_a_dataset_without_meta_is_gpt2_and_a_tampered_bpe_is_refused(tmp_path: Path) -> None:
    plain = _dataset_dir(tmp_path / "plain")
    assert open_tokenizer(plain).name == "gpt2"
    inputs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    inputs[0].write_text("some text for the tokenizer " * 20)
    inputs[1].write_text("more text " * 20)
    out = tmp_path / "bpe"
    prepare_dataset(inputs, out, 0.3, progress=False, tokenizer="bpe-270")
    with open(out / "tokenizer.json", "a") as f:
        f.write(" ")  # still valid JSON, but not the file the dataset was made with
    with pytest.raises(DataError, match=r"tokenizer\.json does not match the sha256 .* meta\.json"):
        open_tokenizer(out)
    with pytest.raises(DataError, match=r"model\.vocab_size=100 is smaller than the gpt2 tokenizer"):
        check_vocab_size(100, str(plain))


def test_prepare_from_parquet(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [*TEXTS, None, "", *[f"row {i} of the second batch" for i in range(3000)]]
    table = pa.table({"id": list(range(len(rows))), "text": rows})
    pq.write_table(table, tmp_path / "part-0.parquet", row_group_size=700)
    extra = tmp_path / "zz.txt"
    extra.write_text("a text file after the parquet")
    result = prepare_dataset([tmp_path], tmp_path / "out", workers=2)  # a directory input
    documents = [r for r in rows if r] + ["a text file after the parquet"]
    train = load_file(str(tmp_path / "out" / "train.safetensors"))["tokens"]
    validation = load_file(str(tmp_path / "out" / "validation.safetensors"))["tokens"]
    assert train.tolist() + validation.tolist() == _expected_stream(documents)
    assert result["documents"] == len(documents)
    assert len(validation) >= 0.01 * (len(train) + len(validation))
    err = capsys.readouterr().err
    assert "prepare: tokenising 2 files with 2 workers" in err
    assert f"prepare: {len(documents):,} documents -> {len(train):,} train" in err

    pq.write_table(pa.table({"content": ["x", "y"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"parquet file .*bad\.parquet has no `text` column"):
        prepare_dataset([tmp_path / "bad.parquet"], tmp_path / "out2", progress=False)


def test_prepare_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"input .*missing\.txt does not exist"):
        prepare_dataset([tmp_path / "missing.txt"], out, progress=False)
    (tmp_path / "doc.md").write_text("# markdown")
    with pytest.raises(DataError, match=r"doc\.md has an unsupported type; allowed: \.txt"):
        prepare_dataset([tmp_path / "doc.md"], out, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no input files \(\.txt or \.parquet\)"):
        prepare_dataset([tmp_path / "empty"], out, progress=False)
    blanks = [tmp_path / "a.txt", tmp_path / "b.txt"]
    blanks[0].write_text("")
    blanks[1].write_text("  \n")
    with pytest.raises(DataError, match="found 0 non-empty documents"):
        prepare_dataset(blanks, out, workers=1, progress=False)
    assert not any(out.iterdir())  # the temporary token stream is cleaned up
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not valid UTF-8"):
        prepare_dataset([tmp_path / "latin1.txt"], out, workers=1, progress=False)
    with pytest.raises(DataError, match=r"validation_fraction must be in \(0, 1\), got 1"):
        prepare_dataset(blanks, out, validation_fraction=1, progress=False)
    with pytest.raises(DataError, match="workers must be a positive integer, got 0"):
        prepare_dataset(blanks, out, workers=0, progress=False)
    (tmp_path / "x.parquet").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were missing
    with pytest.raises(DataError, match="reading .parquet inputs needs pyarrow: pip install pyarrow"):
        prepare_dataset([tmp_path / "x.parquet"], out, progress=False)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GPTLIB_CACHE", str(tmp_path))
    assert sources.default_cache_dir() == tmp_path
    monkeypatch.delenv("GPTLIB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert sources.default_cache_dir() == tmp_path / ".cache" / "gptlib"
