"""What the launcher refuses before any worker starts, each with one line naming the problem, and
what it never deletes."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from runs import cli, micro

from gptlib import checkpoint as ckpt
from gptlib import launch, preflight, presets
from gptlib.config import ConfigError, closest_first
from gptlib.data import DataError, write_token_file
from gptlib.lifeline import RUN_LOCK


def test_yes_no_parameters_are_strict() -> None:
    for value, expected in [(True, True), ("no", False), ("YES", True), ("0", False), (1, True),
                            ("false", False)]:
        assert preflight.parse_bool("overwrite", value) is expected
    for bad in ("nope", "", 2, None, "off"):
        with pytest.raises(ConfigError, match=r"^overwrite=.*: not a yes/no value; allowed: true, "):
            preflight.parse_bool("overwrite", bad)


def test_a_string_no_does_not_delete_a_finished_run(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    launch.prepare_run(overrides=micro(dataset), run_dir=run)
    (run / "summary.json").write_text(json.dumps({"status": "completed"}))
    with pytest.raises(ConfigError, match="already holds a run .status: completed"):
        launch.prepare_run(overrides=micro(dataset), run_dir=run, overwrite="no")
    assert (run / "summary.json").exists()


@pytest.mark.parametrize("name", ["", "   "])
def test_an_empty_run_dir_is_refused(dataset: Path, name: str, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="^run_dir is empty"):
        launch.prepare_run(overrides=micro(dataset), run_dir=name)
    assert list(tmp_path.iterdir()) == []
    result = cli("train", "--run-dir", name, "--set", f"train.dataset={dataset}", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: run_dir is empty")


def test_overwrite_never_deletes_what_gptlib_did_not_write(dataset: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    (mine / "logs").mkdir(parents=True)
    (mine / "logs" / "notes.txt").write_text("my notes")
    with pytest.raises(ConfigError, match=r"is not a gptlib run .* and holds logs: --overwrite "):
        launch.prepare_run(overrides=micro(dataset), run_dir=mine, overwrite=True)
    assert sorted(p.name for p in mine.iterdir()) == ["logs"]  # not even a lock file added
    assert (mine / "logs" / "notes.txt").read_text() == "my notes"
    run = tmp_path / "run"
    launch.prepare_run(overrides=micro(dataset), run_dir=run)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "train.ipynb").write_text("{}")  # papermill's, and a reader's own file: both stay
    (run / "notes.txt").write_text("mine")
    launch.unlock_run_dir(run)
    launch.prepare_run(overrides=micro(dataset), run_dir=run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == [".lock", "config.yaml", "notes.txt", "train.ipynb"]
    launch.unlock_run_dir(run)
    assert not (run / ".lock").exists()


def test_token_ids_and_the_eval_slice_are_checked_first(dataset: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    write_token_file(bad / "train.safetensors", list(range(60_000)))
    shutil.copy(dataset / "validation.safetensors", bad / "validation.safetensors")
    with pytest.raises(DataError, match=r"train.safetensors: token ids from 0 to 59999 \(every id\), "
                                        r"outside \[0, model.vocab_size=50257\)"):
        launch.prepare_run(overrides=micro(bad), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(DataError, match=r"validation split .* the test loss needs 50 batches"):
        launch.prepare_run(overrides={**micro(dataset), "eval.batches": 50, "eval.start_token": 1000},
                           run_dir=tmp_path / "run")


def test_a_large_token_file_is_sampled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = [5] * 20_000
    tokens[10_000] = 70_000  # between the sampled stretches of a small sample
    path = write_token_file(tmp_path / "t.safetensors", tokens)
    from gptlib.data import TokenFile

    assert preflight._ids(TokenFile(path)) == (5, 70_000, "every id")
    monkeypatch.setattr(preflight, "FULL_PASS_TOKENS", 1000)
    monkeypatch.setattr(preflight, "SAMPLE_TOKENS", 640)
    low, high, how = preflight._ids(TokenFile(path))
    assert (low, how) == (5, "a sample of 640 ids") and high in (5, 70_000)


def test_resources(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    with pytest.raises(ConfigError, match="^nproc=2 but this machine has 1 CPU cores"):
        launch.prepare_run(overrides=micro(dataset), nproc=2, run_dir=tmp_path / "a")
    monkeypatch.undo()
    huge = {**micro(dataset), "model.context_length": 65536, "train.microbatch_size": 64}
    with pytest.raises(ConfigError, match=r"needs an estimated [\d.]+ GiB per process .* context "
                                          r"65536, micro-batch 64.* cannot hold it"):
        launch.prepare_run(overrides=huge, run_dir=tmp_path / "b")
    cfg = presets.resolve_config("gpt2-small-8xa100")
    assert 5 * 2**30 < preflight.memory_estimate(cfg) < 40 * 2**30  # fits the series' A100 40 GB


def test_a_resume_counts_only_the_checkpoints_it_adds(dataset: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = presets.resolve_config(overrides={**micro(dataset), "train.keep_checkpoints": -1})
    each = preflight.checkpoint_bytes(cfg)

    class Usage:
        free = 3 * each  # 2 checkpoints and one being written

    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(ConfigError, match="keeps 4 checkpoints"):
        preflight.check_disk_space(cfg, tmp_path, 16)  # interval 4: 4 checkpoints from the start
    preflight.check_disk_space(cfg, tmp_path, 16, start_step=12)  # resuming after 12: one more


def test_checkpoint_pointers_stay_inside_the_run(tmp_path: Path) -> None:
    root = tmp_path / "run" / "checkpoints"
    (root / "step-4").mkdir(parents=True)
    (root / "latest").write_text("../../other/checkpoints/step-8")
    with pytest.raises(ckpt.CheckpointError, match=r"pointer .*latest names '../../other/checkpoints"
                                                   r"/step-8', not a checkpoint of this run"):
        ckpt.resolve_checkpoint(tmp_path / "run", "latest")
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint 'step-4' .* is incomplete"):
        ckpt.resolve_checkpoint(tmp_path / "run", "step-4")


def test_failure_causes_are_named() -> None:
    assert launch._cause([], 1) == "exit code 1"
    report = ["[rank0]:", "  exitcode  : -9 (pid: 4242)", "  traceback : Signal 9 (SIGKILL)"]
    assert launch._cause(report, 1).startswith("killed by SIGKILL: if nobody killed it, probably out")
    assert launch._cause(["exitcode  : -15 (pid: 1)"], 1) == "killed by SIGTERM"


def test_parameter_files_and_names(tmp_path: Path) -> None:
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  learning_rate: 0.1\n  learning_rate: 0.2\n")
    with pytest.raises(ConfigError, match=r"invalid YAML: key 'learning_rate' given twice"):
        presets._read_yaml(twice)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("train:\n  dataset: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.yaml: not UTF-8 text$"):
        presets._read_yaml(latin)
    assert closest_first("Baseline", ["no-dropout", "baseline", "qkv-bias"]).startswith("baseline")
    with pytest.raises(ConfigError, match=r"random_seed=18446744073709551616 must be in \[0, 2\*\*63\)"):
        presets.resolve_config(seed=2**64)


def test_spikes_of_a_run_that_never_logged(dataset: Path, tmp_path: Path) -> None:
    launch.prepare_run(overrides=micro(dataset), run_dir=tmp_path / "run")
    launch.unlock_run_dir(tmp_path / "run")
    result = cli("spikes", tmp_path / "run")
    assert result.returncode == 2 and result.stderr.startswith("error: ")
    assert "has no spikes.json" in result.stderr


def test_prepare_and_sweep_inputs_of_the_wrong_kind(tmp_path: Path) -> None:
    import pandas as pd

    from gptlib.prepare import prepare_dataset
    from gptlib.sweep import sweep

    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    with pytest.raises(DataError, match=r"fake.parquet is not a readable parquet file \("):
        prepare_dataset([fake], tmp_path / "out")
    numbers = tmp_path / "numbers.parquet"
    pd.DataFrame({"text": [1, 2, 3]}).to_parquet(numbers)
    with pytest.raises(DataError, match=r"numbers.parquet: its `text` column holds int64, not strings"):
        prepare_dataset([numbers], tmp_path / "out")
    text = tmp_path / "a.txt"
    text.write_text("some text")
    with pytest.raises(DataError, match=r"^--out .*a.txt is a file; give a folder"):
        prepare_dataset([text], text)
    with pytest.raises(ConfigError, match=r"^--outputs .*a.txt is a file"):
        sweep("tiny", "baseline", outputs=text)


def test_parameters_of_the_wrong_type_are_refused_first(tmp_path: Path) -> None:
    from gptlib import summary

    for kwargs, expected in [
        ({"intervention": 5}, "intervention: expected a name or names joined by '+', got 5"),
        ({"overrides": 5}, "overrides: expected a mapping of dotted keys"),
        ({"overrides": "{train.x: ["}, "overrides '{train.x: [': invalid YAML"),
        ({"run_dir": ["a"]}, "run_dir=['a']: expected a folder path as text"),
        ({"resume": "newest"}, "resume='newest': allowed: latest, best, step-N"),
        ({"resume": 5}, "resume=5: allowed: latest, best, step-N"),
    ]:
        with pytest.raises(ConfigError) as caught:
            launch.prepare_run(**kwargs)
        assert str(caught.value).startswith(expected), caught.value
    for kwargs, expected in [({"scale": 5}, "scale=5: expected a scale name"),
                             ({"runs": 5}, 'runs=5: expected "all" or a list of run names'),
                             ({"runs": ["baseline", 5]}, "runs=['baseline', 5]: expected"),
                             ({"outputs_dir": 5}, "outputs_dir=5: expected a folder path")]:
        with pytest.raises(ConfigError, match="^" + re.escape(expected)):
            summary.collect_runs(**kwargs)


@pytest.fixture(scope="module")
def finished_run(micro_run) -> Path:
    """A trained micro run (20 steps; checkpoints after 4, 8 ... 20), to copy and damage."""
    return micro_run("resume-files/run", **{"train.min_train_tokens": 20 * 2 * 16})


def _damaged(finished_run: Path, tmp_path: Path, name: str, edit) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    path = run / name
    path.write_text(edit(path.read_text()))
    return run


@pytest.mark.parametrize(("name", "edit", "expected"), [
    ("metrics.jsonl", lambda text: "".join(text.splitlines(True)[:5]),
     r"metrics.jsonl holds steps 0-4 \(5 record\(s\)\) before checkpoint step-20 .* needs one record "
     r"of each of steps 0-19"),
    ("metrics.jsonl", lambda text: "garbage\n" + text, r"metrics.jsonl holds no records before"),
    ("metrics.jsonl", lambda text: text.replace('"skipped": false', '"skipped": 0', 1),
     r"metrics.jsonl: the record of step 0 has skipped missing or of the wrong type"),
    ("metrics.jsonl", lambda text: text.replace('"tokens": 64,', '"tokens": 65,'),
     r"metrics.jsonl: the record of step 1 counts 65 tokens, not 64 \(32 per step in this config\)"),
    ("spikes.json", lambda text: "{}", r"spikes.json: expected a list of spikes, got dict"),
    ("spikes.json", lambda text: '[{"step": "x"}]', r"spikes.json: entry 0 is not a spike gptlib wrote"),
    ("checkpoints/step-20/meta.json", lambda text: text.replace('"world_size": 1', '"world_size": "1"'),
     r"step-20/meta.json: world_size missing or of the wrong type"),
    ("checkpoints/step-20/meta.json", lambda text: text.replace('"tokens_seen": 640', '"tokens_seen": 64'),
     r"checkpoint step-20 of .* saw 64 tokens in 20 steps, but this config trains 20 steps of 32 "
     r"tokens: it belongs to another run"),
    ("checkpoints/step-20/meta.json", lambda text: re.sub(r'"files": \{[^}]*\}', '"files": 3', text),
     r"step-20/meta.json is not a gptlib checkpoint's meta.json \(needs an integer step and a files map"),
])
def test_a_resume_checks_its_run_files_first(finished_run: Path, tmp_path: Path, dataset: Path,
                                             name: str, edit, expected: str) -> None:
    run = _damaged(finished_run, tmp_path, name, edit)
    def files() -> list:  # (the lock file the in-process training left is removed on unlock)
        return sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*")
                      if p.name != RUN_LOCK)

    before = files()
    with pytest.raises((ConfigError, ckpt.CheckpointError)) as caught:
        launch.prepare_run(overrides=micro(dataset, **{"train.min_train_tokens": 20 * 2 * 16}),
                           run_dir=run, resume="latest")
    assert re.search(expected, str(caught.value)) and "\n" not in str(caught.value), caught.value
    assert files() == before  # nothing written or removed


def test_the_spike_command_names_a_damaged_spikes_file(finished_run: Path, tmp_path: Path) -> None:
    run = _damaged(finished_run, tmp_path, "spikes.json", lambda text: "[1, 2]")
    done = cli("spikes", run)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().endswith("spikes.json: entry 0 is not a spike gptlib wrote (needs step, "
                                        "loss, level, lr and windows)")
