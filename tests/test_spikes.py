"""Loss-spike detection and forensics on a planted pathological micro-batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from runs import cli, micro, set_args

from gptlib.data import TokenFile, write_token_file
from gptlib.metrics import SpikeDetector, read_metrics
from gptlib.spikes import analyse, checkpoint_before
from gptlib.tokenizer import decode

PLANT_STEP = 90
CONTEXT = 16
MICROBATCH = 2


def spike_overrides(dataset: Path) -> dict:
    return micro(dataset, **{
        "train.min_train_tokens": 100 * MICROBATCH * CONTEXT, "train.checkpoint_interval": 10,
        "train.spike_window": 20, "train.learning_rate": 3e-3, "train.log_interval": 10})


@pytest.fixture(scope="module")
def planted(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """The test dataset with the first window of step PLANT_STEP replaced by a short random token
    sequence repeated (text the model has never seen)."""
    directory = tmp_path_factory.mktemp("planted")
    tokens = TokenFile(dataset / "train.safetensors").read(0, len(TokenFile(dataset / "train.safetensors")))
    gen = torch.Generator().manual_seed(1)
    pattern = torch.randint(1000, 50000, (5,), generator=gen)
    window = PLANT_STEP * MICROBATCH  # world 1, GA 1: step s reads windows 2s and 2s + 1
    start = window * CONTEXT
    planted_tokens = pattern.repeat(CONTEXT // 5 + 2)[: CONTEXT + 1]
    tokens[start : start + CONTEXT + 1] = planted_tokens
    write_token_file(directory / "train.safetensors", tokens)
    (directory / "validation.safetensors").write_bytes((dataset / "validation.safetensors").read_bytes())
    return directory, planted_tokens.tolist()


def test_planted_batch_is_detected_and_shown(planted, dataset: Path, tmp_path: Path) -> None:
    directory, planted_tokens = planted
    run_dir = tmp_path / "planted"
    result = cli("train", "--run-dir", str(run_dir),
                 *set_args({**spike_overrides(dataset), "train.dataset": str(directory)}))
    assert result.returncode == 0, result.stderr
    spikes = json.loads((run_dir / "spikes.json").read_text())
    assert PLANT_STEP in [s["step"] for s in spikes]
    spike = next(s for s in spikes if s["step"] == PLANT_STEP)
    assert spike["windows"] == {"0": [PLANT_STEP * MICROBATCH, PLANT_STEP * MICROBATCH + 1]}
    loss = read_metrics(run_dir / "metrics.jsonl")[PLANT_STEP]["loss"]
    assert spike["loss"] == loss and loss > spike["level"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["spike_count"] == len(spikes)

    reports = {r.step: r for r in analyse(run_dir)}
    worst = reports[PLANT_STEP].windows[0]
    assert worst.window == PLANT_STEP * MICROBATCH  # the planted window scores worst
    assert worst.text == decode(planted_tokens[:-1])
    assert worst.loss > 2 * reports[PLANT_STEP].windows[1].loss
    assert reports[PLANT_STEP].checkpoint == f"step-{PLANT_STEP}"

    shown = cli("spikes", str(run_dir))
    assert shown.returncode == 0, shown.stderr
    assert f"Spike at step {PLANT_STEP}:" in shown.stdout
    assert repr(decode(planted_tokens[:-1])) in shown.stdout


def test_clean_run_has_no_spike_there(dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "clean"
    result = cli("train", "--run-dir", str(run_dir), *set_args(spike_overrides(dataset)))
    assert result.returncode == 0, result.stderr
    steps = [s["step"] for s in json.loads((run_dir / "spikes.json").read_text())]
    assert PLANT_STEP not in steps
    shown = cli("spikes", str(run_dir))
    assert shown.returncode == 0
    if not steps:
        assert "No loss spikes were recorded." in shown.stdout


def test_spike_detector_rule() -> None:
    detector = SpikeDetector(window=5, threshold=6.0)
    history = [3.0, 3.1, 2.9, 3.05, 2.95]
    assert [detector.update(x) for x in history] == [(False, None)] * 5  # window filling
    # median 3.0, MAD 0.05: the threshold is 3.0 + 6 x 0.05 = 3.3
    assert detector.update(3.29) == (False, 3.0)
    is_spike, level = detector.update(5.0)
    assert is_spike and level == pytest.approx(3.0, abs=0.06)


def test_checkpoint_before_picks_the_weights_the_step_started_from(tmp_path: Path) -> None:
    for n in (10, 20, 30):
        (tmp_path / "checkpoints" / f"step-{n}").mkdir(parents=True)
    assert checkpoint_before(tmp_path, 30) == "step-30"
    assert checkpoint_before(tmp_path, 29) == "step-20"
    assert checkpoint_before(tmp_path, 3) == "step-10"
