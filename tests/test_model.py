"""GPTModel against the book's own implementation (`llms_from_scratch.ch04.GPTModel`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from llms_from_scratch.ch04 import GPTModel as BookGPTModel
from safetensors.torch import save_file, save_model

from gptlib.config import ModelConfig
from gptlib.model import (
    GPTModel,
    count_parameters,
    flops_per_token,
    load_weights,
    matmul_parameters,
)

SMALL = ModelConfig(vocab_size=500, context_length=32, emb_dim=64, n_heads=4, n_layers=2)
GPT2_SMALL = ModelConfig()


def book_model(cfg: ModelConfig, seed: int = 42) -> BookGPTModel:
    torch.manual_seed(seed)
    return BookGPTModel(dataclasses.asdict(cfg))


def our_model(cfg: ModelConfig, seed: int = 42) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(cfg)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [({}, 163_009_536), ({"qkv_bias": True}, 163_037_184), ({"tie_weights": True}, 124_412_160)],
)
def test_gpt2_small_parameter_counts(changes: dict, expected: int) -> None:
    with torch.device("meta"):
        model = GPTModel(dataclasses.replace(GPT2_SMALL, **changes))
    assert count_parameters(model) == expected


def test_flops_per_token_gpt2_small() -> None:
    with torch.device("meta"):
        model = GPTModel(GPT2_SMALL)
    linear_weights = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
    )
    assert matmul_parameters(GPT2_SMALL) == linear_weights
    assert flops_per_token(GPT2_SMALL) == 6 * linear_weights + 12 * 12 * 1024 * 768
    assert round(flops_per_token(GPT2_SMALL) / 1e6) == 854


@pytest.mark.parametrize("cfg", [SMALL, dataclasses.replace(SMALL, qkv_bias=True), GPT2_SMALL],
                         ids=["small", "small-qkv-bias", "gpt2-small"])
def test_seeded_init_matches_book_and_logits_agree(cfg: ModelConfig) -> None:
    book = book_model(cfg)
    ours = our_model(cfg)
    book_state = book.state_dict()
    our_state = ours.state_dict()
    # The book keeps its causal mask as a buffer; SDPA needs none. Everything else is identical.
    assert {k for k in book_state if not k.endswith(".att.mask")} == set(our_state)
    for name, tensor in our_state.items():
        assert torch.equal(tensor, book_state[name]), name

    book.eval()
    ours.eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, min(cfg.context_length, 128)),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), book(tokens), atol=1e-4, rtol=0)


def test_tie_weights_keeps_rng_stream_and_shares_the_matrix() -> None:
    untied = our_model(SMALL)
    tied = our_model(dataclasses.replace(SMALL, tie_weights=True))
    assert tied.out_head.weight is tied.tok_emb.weight
    for name, tensor in tied.state_dict().items():
        if name != "out_head.weight":
            assert torch.equal(tensor, untied.state_dict()[name]), name


def test_training_mode_dropout_is_active_and_eval_is_deterministic() -> None:
    model = our_model(dataclasses.replace(SMALL, drop_rate=0.5))
    tokens = torch.randint(0, SMALL.vocab_size, (2, 16))
    model.train()
    assert not torch.equal(model(tokens), model(tokens))
    model.eval()
    assert torch.equal(model(tokens), model(tokens))


def test_book_checkpoint_loads_strict(tmp_path) -> None:
    book = book_model(SMALL, seed=7)
    path = tmp_path / "model.safetensors"
    save_file(book.state_dict(), str(path))  # includes the book's att.mask buffers
    ours = load_weights(our_model(SMALL, seed=0), path)
    book.eval()
    ours.eval()
    tokens = torch.randint(0, SMALL.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), book(tokens), atol=1e-4, rtol=0)


def test_tied_book_checkpoint_loads_strict(tmp_path) -> None:
    book = book_model(SMALL, seed=7)
    book.out_head.weight = book.tok_emb.weight
    path = tmp_path / "model.safetensors"
    save_model(book, str(path))  # stores the shared matrix under one name only
    ours = load_weights(our_model(dataclasses.replace(SMALL, tie_weights=True), seed=0), path)
    assert ours.out_head.weight is ours.tok_emb.weight
    assert torch.equal(ours.tok_emb.weight, book.tok_emb.weight)
    book.eval()
    ours.eval()
    tokens = torch.randint(0, SMALL.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), book(tokens), atol=1e-4, rtol=0)


def test_wrong_shape_checkpoint_is_rejected(tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    save_model(our_model(SMALL), str(path))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_weights(our_model(dataclasses.replace(SMALL, emb_dim=32)), path)
