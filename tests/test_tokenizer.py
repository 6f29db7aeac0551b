"""The offline GPT-2 tokenizer: real gpt2 ids, exact round trips, no network, loud corruption."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gptlib.tokenizer import (
    EOT_TOKEN,
    GPT2_PAT_STR,
    decode,
    encode,
    get_tokenizer,
    gpt2_data_dir,
    load_gpt2_encoding,
)


def test_known_ids() -> None:
    assert encode("Hello, world") == [15496, 11, 995]
    # Raschka's book, chapter 2: the tiktoken gpt2 ids of this sentence.
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
    assert encode(text) == [
        15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250,
        8812, 2114, 286, 617, 34680, 27271, 13,
    ]  # fmt: skip


def test_end_of_text() -> None:
    assert EOT_TOKEN == 50256
    assert encode("<|endoftext|>") == [50256]
    assert decode([50256]) == "<|endoftext|>"
    with pytest.raises(ValueError, match="endoftext"):
        encode("a <|endoftext|> b", allow_eot=False)
    assert encode("plain text", allow_eot=False) == encode("plain text")


def test_encoding_shape() -> None:
    enc = get_tokenizer()
    assert enc.name == "gpt2"
    assert enc.n_vocab == 50257
    assert enc.eot_token == EOT_TOKEN
    assert get_tokenizer() is enc  # cached


def test_pattern_matches_tiktoken_gpt2() -> None:
    openai_public = pytest.importorskip("tiktoken_ext.openai_public")
    assert GPT2_PAT_STR == openai_public.r50k_pat_str


def _random_text(rng: random.Random) -> str:
    """A string mixing ASCII, accents, combining marks, CJK, emoji, controls and whitespace runs."""
    pieces = [
        lambda: rng.choice(["the", " cat", "Hello", "'s", "'ll", "123", "3.14", "def f():"]),
        lambda: " " * rng.randint(1, 6),
        lambda: rng.choice(["\n", "\n\n", "\t", "\r\n", "\u00a0", "\u3000", "  \n  "]),
        lambda: "e" + "".join(chr(rng.randint(0x300, 0x36F)) for _ in range(rng.randint(1, 3))),
        lambda: chr(rng.randint(0x4E00, 0x9FFF)),  # CJK
        lambda: chr(rng.randint(0x1F300, 0x1FAFF)),  # emoji and pictographs
        lambda: "\U0001f468\u200d\U0001f469\u200d\U0001f467",  # a ZWJ family
        lambda: chr(rng.randint(0x20, 0x7E)),
        lambda: chr(rng.choice([rng.randint(0xA0, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])),
        lambda: chr(rng.randint(0, 0x1F)),  # control characters
    ]
    return "".join(rng.choice(pieces)() for _ in range(rng.randint(0, 40)))


def test_round_trip_random_unicode() -> None:
    rng = random.Random(1234)
    for _ in range(2000):
        text = _random_text(rng)
        assert decode(encode(text, allow_eot=False)) == text


def test_decode_accepts_tensors_and_arrays() -> None:
    import numpy as np
    import torch

    ids = encode("Hello, world")
    assert decode(torch.tensor(ids)) == "Hello, world"
    assert decode(np.array(ids, dtype=np.uint16)) == "Hello, world"


def test_corrupted_vocabulary_fails_loudly(tmp_path: Path) -> None:
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(gpt2_data_dir() / name, tmp_path / name)
    assert load_gpt2_encoding(tmp_path).encode("Hello, world") == [15496, 11, 995]
    with open(tmp_path / "vocab.bpe", "ab") as f:
        f.write(b"x")
    with pytest.raises(RuntimeError, match=r"vocab\.bpe is corrupted: sha256"):
        load_gpt2_encoding(tmp_path)
    (tmp_path / "encoder.json").unlink()
    shutil.copy(gpt2_data_dir() / "vocab.bpe", tmp_path / "vocab.bpe")
    with pytest.raises(RuntimeError, match=r"encoder\.json is missing"):
        load_gpt2_encoding(tmp_path)


def test_builds_without_network(tmp_path: Path) -> None:
    """A fresh interpreter with sockets disabled and an empty tiktoken cache still encodes."""
    script = textwrap.dedent(
        """
        import socket

        def refuse(*args, **kwargs):
            raise OSError("network disabled by test")

        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse

        from gptlib.tokenizer import decode, encode, get_tokenizer

        assert get_tokenizer().n_vocab == 50257
        ids = encode("Hello, world<|endoftext|>")
        assert ids == [15496, 11, 995, 50256], ids
        print(decode(ids))
        """
    )
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache)}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Hello, world<|endoftext|>"
    # Whatever tiktoken cached went into the cache directory we gave it.
    assert all(p.parent == cache for p in cache.rglob("*"))
