"""Evals: test loss and smoke test against independent computations; errors; the CLI."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from runs import cli
from safetensors.torch import load_file

from gptlib import evals
from gptlib.checkpoint import CheckpointError
from gptlib.config import ModelConfig
from gptlib.data import DataError
from gptlib.model import GPTModel
from gptlib.tokenizer import decode, encode


@pytest.fixture(scope="module")
def run(micro_run: Callable[..., Path]) -> Path:
    """A micro run of 12 steps (3 checkpoints) on the sentences dataset."""
    return micro_run("evals/run", **{"train.min_train_tokens": 12 * 2 * 16})


@pytest.fixture(scope="module")
def best(run: Path) -> evals.EvalResult:
    """The default evaluation (the config's eval.checkpoint -- the tiny scale's `latest` --, every
    whole batch), not written."""
    return evals.evaluate_run(run, write=False)


def fresh_model(run: Path, checkpoint: str) -> tuple[dict, GPTModel]:
    """The run's raw config and a model loaded from `checkpoint` without gptlib.evals."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    model = GPTModel(ModelConfig(**config["model"]))
    name = (run / "checkpoints" / checkpoint).read_text().strip() if checkpoint in ("best", "latest") \
        else checkpoint
    model.load_state_dict(load_file(str(run / "checkpoints" / name / "model.safetensors")))
    return config, model.eval()


def manual_test_loss(run: Path, checkpoint: str, batches: int | None = None,
                     autocast: torch.autocast | None = None) -> tuple[float, int]:
    config, model = fresh_model(run, checkpoint)
    e, context = config["eval"], config["model"]["context_length"]
    tokens = load_file(str(Path(config["train"]["dataset"]) / "validation.safetensors"))["tokens"]
    tokens = tokens.to(torch.int64)[e["start_token"]:]
    span = e["batch_size"] * context
    n = (len(tokens) - 1) // span if batches is None else batches
    losses = []
    with torch.no_grad():
        for i in range(n):
            chunk = tokens[i * span: (i + 1) * span + 1]
            x, y = chunk[:-1].view(e["batch_size"], context), chunk[1:].view(e["batch_size"], context)
            if autocast is not None:
                with autocast:
                    logits = model(x)
            else:
                logits = model(x)
            losses.append(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                          y.reshape(-1)).item())
    return sum(losses) / n, n


def test_test_loss_equals_an_independent_computation(run: Path, best: evals.EvalResult) -> None:
    result = best
    expected, n = manual_test_loss(run, "latest")
    assert result.eval_batches == n == (2000 - 1) // (8 * 16)  # tiny scale: eval batch 8, all
    assert result.test_loss == pytest.approx(expected, rel=1e-6)
    assert result.eval_tokens == n * 8 * 16
    assert result.eval_checkpoint == (run / "checkpoints" / "latest").read_text().strip() == "step-12"
    assert result.eval_precision == "fp32"


def test_unigram_and_uniform_levels_equal_an_independent_computation(
        run: Path, best: evals.EvalResult) -> None:
    """Unigram: the slice's targets under the training split's add-0.5-smoothed frequencies."""
    import math
    from collections import Counter

    config = yaml.safe_load((run / "config.yaml").read_text())
    dataset = Path(config["train"]["dataset"])
    train = load_file(str(dataset / "train.safetensors"))["tokens"].tolist()
    validation = load_file(str(dataset / "validation.safetensors"))["tokens"].tolist()
    counts, vocab = Counter(train), 50257  # the test dataset is GPT-2 tokens
    span = 8 * 16  # eval batch x context, batches from token 0
    targets = [t for i in range(best.eval_batches) for t in validation[i * span + 1:(i + 1) * span + 1]]
    expected = sum(-math.log((counts[t] + 0.5) / (len(train) + 0.5 * vocab)) for t in targets)
    assert best.unigram_loss == pytest.approx(expected / len(targets), rel=1e-9)
    assert best.uniform_loss == pytest.approx(math.log(vocab))
    # 12 micro steps learn less than the frequencies of five sentences' tokens, and the line says so.
    assert f"{best.test_loss - best.unigram_loss:.3f} nats above it" in evals.reference_line(
        best.test_loss, best.unigram_loss, best.uniform_loss)
    few = evals.evaluate_run(run, checkpoint="step-4", batches=3, write=False)
    assert few.unigram_loss == pytest.approx(
        sum(-math.log((counts[t] + 0.5) / (len(train) + 0.5 * vocab)) for t in targets[:3 * span])
        / (3 * span), rel=1e-9)
    assert "0.500 nats below it" in evals.reference_line(3.5, 4.0, 7.0)


def test_the_default_checkpoint_is_the_configs(run: Path, tmp_path: Path) -> None:
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["eval"]["checkpoint"] == "latest"  # the tiny scale's choice
    copy = tmp_path / "run"
    import shutil

    shutil.copytree(run, copy)
    config["eval"]["checkpoint"] = "best"
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    (copy / "checkpoints" / "best").write_text("step-4")  # make best differ from latest
    assert evals.evaluate_run(copy, batches=1, write=False).eval_checkpoint == "step-4"
    assert evals.evaluate_run(copy, "latest", batches=1, write=False).eval_checkpoint == "step-12"


def test_any_checkpoint_and_a_batch_count(run: Path, best: evals.EvalResult) -> None:
    result = evals.evaluate_run(run, checkpoint="step-4", batches=3, write=False)
    expected, _ = manual_test_loss(run, "step-4", batches=3)
    assert result.eval_batches == 3 and result.eval_checkpoint == "step-4"
    assert result.test_loss == pytest.approx(expected, rel=1e-6)
    assert result.test_loss != pytest.approx(best.test_loss)


def test_bf16_runs_evaluate_under_bf16_autocast(run: Path) -> None:
    cfg, model, _ = evals.load_run(run, "best")
    cfg.train.precision = "bf16"
    loss, n, precision = evals.slice_loss(model, cfg)
    assert precision == "bf16"
    expected, _ = manual_test_loss(run, "best", autocast=torch.autocast("cpu", torch.bfloat16))
    assert loss == pytest.approx(expected, rel=1e-5)
    assert evals.eval_precision("fp16", torch.device("cpu")) == "fp32"
    assert evals.eval_precision("fp16", torch.device("cuda")) == "fp16"


def test_greedy_smoke_text_equals_an_independent_greedy_decode(run: Path) -> None:
    cfg, model, _ = evals.load_run(run, "best")
    cfg.eval.smoke_temperature = 0.0
    _, fresh = fresh_model(run, "best")
    ids = torch.tensor([encode(cfg.eval.smoke_prompt)])
    with torch.no_grad():
        for _ in range(cfg.eval.smoke_tokens):
            ids = torch.cat([ids, fresh(ids[:, -16:])[:, -1, :].argmax(-1, keepdim=True)], dim=1)
    assert evals.smoke_test(model, cfg) == decode(ids[0])
    cfg.eval.smoke_temperature, cfg.eval.smoke_top_k = 1.4, 1  # top-1 sampling is greedy too
    assert evals.smoke_test(model, cfg) == decode(ids[0])


def test_sampled_smoke_text_is_reproducible_and_leaves_the_global_rng_alone(run: Path) -> None:
    cfg, model, _ = evals.load_run(run, "best")
    assert (cfg.eval.smoke_top_k, cfg.eval.smoke_temperature, cfg.eval.smoke_tokens) == (25, 1.4, 20)
    assert cfg.eval.smoke_prompt == "Every effort moves you"  # tests/runs.py sets the series' test
    state = torch.get_rng_state()
    first = evals.smoke_test(model, cfg)
    assert torch.equal(torch.get_rng_state(), state)
    assert evals.smoke_test(model, cfg) == first
    assert first.startswith("Every effort moves you")
    assert len(encode(first)) >= len(encode("Every effort moves you")) + 15  # ~20 new tokens
    others = {evals.smoke_test(model, cfg, seed=s) for s in (1, 2, 3)}
    assert len(others | {first}) > 1


def test_evaluate_run_writes_summary(run: Path) -> None:
    result = evals.evaluate_run(run, checkpoint="latest")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"  # merged, not replaced
    assert summary["test_loss"] == result.test_loss
    assert summary["smoke_text"] == result.smoke_text
    assert summary["eval_checkpoint"] == "step-12"
    assert result.lines()[0].startswith(f"Test loss: {result.test_loss:.6f} (checkpoint step-12")


def test_clear_errors(run: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="run directory .* does not exist"):
        evals.evaluate_run(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="not a run directory"):
        evals.evaluate_run(tmp_path)
    with pytest.raises(CheckpointError, match="'step-5' does not exist.*available: latest, best"):
        evals.evaluate_run(run, checkpoint="step-5", write=False)
    with pytest.raises(DataError, match="holds 15 whole batches of 8 x 16 tokens, but the test "
                                        "loss needs 16 batches"):
        evals.evaluate_run(run, batches=16, write=False)
    cfg, _, _ = evals.load_run(run)
    cfg.eval.start_token = 1990
    with pytest.raises(DataError, match="holds 0 whole batches"):
        evals.validation_reader(cfg)


def test_cli(run: Path, tmp_path: Path) -> None:
    ok = cli("eval", str(run), "--checkpoint", "step-8", "--batches", "2")
    assert ok.returncode == 0, ok.stderr
    expected, _ = manual_test_loss(run, "step-8", batches=2)
    printed = re.search(r"^Test loss: (\d+\.\d{6}) \(checkpoint step-8, 2 batches", ok.stdout, re.M)
    assert printed, ok.stdout
    assert float(printed[1]) == pytest.approx(expected, abs=2e-6)  # 6 decimals, chunked-loss rounding
    assert "Smoke test: Every effort moves you" in ok.stdout
    bad = cli("eval", str(tmp_path / "nowhere"))
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: run directory {tmp_path / 'nowhere'} does not exist"
