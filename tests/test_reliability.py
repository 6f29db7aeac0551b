"""Hostile input, crashes, hangs, concurrent launches and secrets: nothing lost, nothing hangs."""

from __future__ import annotations

import ast
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from runs import cli, final_weights, micro, set_args
from safetensors.numpy import save_file

from gptlib import checkpoint as ckpt
from gptlib import launch, preflight
from gptlib.config import ConfigError
from gptlib.device import resolve_precision
from gptlib.metrics import read_metrics

# ------------------------------------------------------------------------------- bad input


def bad_datasets(root: Path) -> dict[str, Path]:
    """Directories that look like datasets but are not usable ones."""
    made = {}
    for name, arrays in {
        "wrong-key": {"ids": np.arange(100, dtype=np.uint16)},
        "float-tokens": {"tokens": np.zeros(100, dtype=np.float32)},
        "empty": {"tokens": np.zeros(0, dtype=np.uint16)},
        "two-dims": {"tokens": np.zeros((10, 10), dtype=np.uint16)},
    }.items():
        directory = root / name
        directory.mkdir()
        for split in ("train", "validation"):
            save_file(arrays, str(directory / f"{split}.safetensors"))
        made[name] = directory
    (root / "no-validation").mkdir()
    save_file({"tokens": np.arange(100, dtype=np.uint16)},
              str(root / "no-validation" / "train.safetensors"))
    made["no-validation"] = root / "no-validation"
    (root / "not-safetensors").mkdir()
    for split in ("train", "validation"):
        (root / "not-safetensors" / f"{split}.safetensors").write_text("hello")
    made["not-safetensors"] = root / "not-safetensors"
    return made


BAD_CLI_INPUTS = [
    (["--scale", "tinny"], r"unknown scale 'tinny'; allowed: tiny"),
    (["--intervention", "no-dropot"], r"unknown intervention 'no-dropot'; allowed: no-dropout"),
    (["--intervention", "no-dropout+no-dropout"], r"'no-dropout' is given more than once"),
    (["--set", "model.n_layer=2"], r"model.n_layer.*allowed.*: n_layers"),
    (["--set", "trian.learning_rate=1"], r"trian.*allowed.*train"),
    (["--set", "train.microbatch_size=four"], r"train.microbatch_size: expected int, got 'four'"),
    (["--set", "train.microbatch_size=true"], r"train.microbatch_size: expected int"),
    (["--set", "train.microbatch_size=0"], r"train.microbatch_size=0 must be >= 1"),
    (["--set", "model.n_layers=-3"], r"model.n_layers=-3 must be >= 1"),
    (["--set", "model.drop_rate=1.0"], r"model.drop_rate=1.0 must be in \[0, 1\)"),
    (["--set", "model.emb_dim=33"], r"model.emb_dim=33 is not divisible by model.n_heads=2"),
    (["--set", "train.precision=fp8"], r"train.precision.*fp8.*allowed"),
    (["--set", "train.device=tpu"], r"train.device.*tpu.*allowed"),
    (["--set", "train.learning_rate=-1"], r"train.learning_rate=-1.0 must be > 0"),
    (["--set", "train.min_train_tokens=0"], r"train.min_train_tokens=0 must be -1"),
    (["--set", "train.keep_checkpoints=0"], r"train.keep_checkpoints=0 must be -1"),
    (["--set", "train.clipping_max_norm=0"], r"train.clipping_max_norm=0.0 must be > 0"),
    (["--set", "train.global_batch_size=96"], r"train.global_batch_size=96 but"),
    (["--set", "train.min_train_tokens=100000000"], r"needs .*lower train.min_train_tokens"),
    (["--set", "train.start_train_token=99999999"], r"start_train_token"),
    (["--set", "train.dataset=/no/such/dir"], r"/no/such/dir"),
    (["--set", "train.dataset=hf:"], r"hf:"),
    (["--nproc", "0"], r"nproc=0: not allowed; allowed: 'auto' or an int >= 1"),
    (["--nproc", "many"], r"nproc='many': not allowed"),
    (["--nproc", "2", "--set", "train.device=cuda"], r"train.device=cuda|GPUs are visible"),
    (["--resume", "step-5"], r"checkpoint 'step-5' does not exist"),
    (["--resume", "newest"], r"resume='newest': allowed: latest, best, step-N, or None to start afresh"),
    (["--run-dir", "/proc/gptlib-run"], r"run directory /proc/gptlib-run is not writable"),
]


@pytest.mark.parametrize(("args", "expected"), BAD_CLI_INPUTS,
                         ids=[" ".join(a) for a, _ in BAD_CLI_INPUTS])
def test_bad_cli_input_gets_one_line(args: list[str], expected: str, dataset: Path,
                                     tmp_path: Path) -> None:
    overrides = micro(dataset)
    for arg in args:  # an explicit override replaces the micro one
        overrides.pop(arg.split("=")[0], None)
    base = ["--run-dir", str(tmp_path / "run")] if "--run-dir" not in args else []
    started = time.time()
    result = cli("train", *base, *args, *set_args(overrides))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert re.search(expected, lines[0]), lines[0]
    assert time.time() - started < 30  # refused before any expensive work
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("kind", ["wrong-key", "float-tokens", "empty", "two-dims", "no-validation",
                                  "not-safetensors"])
def test_bad_dataset_gets_one_line(kind: str, dataset: Path, tmp_path: Path) -> None:
    directory = bad_datasets(tmp_path)[kind]
    result = cli("train", "--run-dir", str(tmp_path / "run"),
                 *set_args(micro(dataset, **{"train.dataset": str(directory)})))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(directory) in lines[0], lines


def test_not_enough_disk_for_the_checkpoints(dataset: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    sixteen_steps = micro(dataset, **{"train.min_train_tokens": 16 * 2 * 16})  # 4 checkpoints
    each = preflight.checkpoint_bytes(launch.resolve_config(overrides=sixteen_steps))

    class Usage:
        free = 3 * each + 1  # room for 2 checkpoints and 1 being written, not for 4

    monkeypatch.setattr(launch.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(ConfigError, match=r"keeps 4 checkpoints .* is free.*keep_checkpoints=N"):
        launch.prepare_run(overrides=sixteen_steps, run_dir=tmp_path / "run")
    # Keeping fewer checkpoints is the documented way out: newest 1 + the best one fit.
    launch.prepare_run(overrides={**sixteen_steps, "train.keep_checkpoints": 1},
                       run_dir=tmp_path / "run2")


def test_bf16_refused_on_a_gpu_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-16GB")
    with pytest.raises(ConfigError, match="bf16 is not supported by Tesla V100.*allowed here: fp16, fp32"):
        resolve_precision("bf16", torch.device("cuda", 0))
    assert resolve_precision("auto", torch.device("cuda", 0)) == "fp32"


def test_keep_checkpoints_prunes_but_keeps_best_and_latest(dataset: Path, tmp_path: Path) -> None:
    result = cli("train", "--run-dir", str(tmp_path / "r"),
                 *set_args(micro(dataset, **{"train.keep_checkpoints": 1,
                                             "train.min_train_tokens": 16 * 2 * 16})))
    assert result.returncode == 0, result.stderr
    kept = ckpt.list_checkpoints(tmp_path / "r")
    best = ckpt.resolve_checkpoint(tmp_path / "r", "best").name
    assert kept == sorted({best, "step-16"}, key=lambda n: int(n.split("-")[1]))


# ------------------------------------------------------------------------------- crashes


def start(run_dir: Path, overrides: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gptlib", "train", "--run-dir", str(run_dir), *extra,
         *set_args(overrides)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and torchrun; the workers die with their parent (PR_SET_PDEATHSIG)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def completed(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    except (OSError, ValueError, KeyError):
        return False


HARNESS_OVERRIDES = {  # big enough that a checkpoint write takes a while to hit
    "model.drop_rate": 0.1, "model.emb_dim": 64, "model.context_length": 32,
    "train.microbatch_size": 4, "train.checkpoint_interval": 3, "train.min_train_tokens": 15 * 4 * 32,
    "train.log_interval": 1,
}


@pytest.fixture(scope="module")
def reference_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    started = time.time()
    # --no-eval here and in the harness: the kills target training, and the weights are compared.
    result = cli("train", "--run-dir", str(run_dir), "--no-eval",
                 *set_args(micro(dataset, **HARNESS_OVERRIDES)))
    assert result.returncode == 0, result.stderr
    return run_dir, time.time() - started


def crash_and_recover(trial: int, dataset: Path, run_dir: Path, duration: float) -> list[str]:
    """Kill a run at random moments (some during a checkpoint write), resume until it completes.
    Returns what happened, for the failure message."""
    rng = random.Random(trial)
    overrides = micro(dataset, **HARNESS_OVERRIDES)
    events = []
    for attempt in range(rng.randint(1, 2)):
        has_checkpoint = (run_dir / "checkpoints" / "latest").exists()
        proc = start(run_dir, overrides, "--no-eval", *(["--resume", "latest"] if has_checkpoint
                                           else ["--overwrite"] if attempt else []))
        if rng.random() < 0.4:  # aim at a checkpoint being written
            deadline = time.time() + duration
            while time.time() < deadline and proc.poll() is None:
                if list((run_dir / "checkpoints").glob(".tmp-step-*")):
                    break
            events.append("kill during checkpoint write")
        else:
            delay = rng.uniform(0.2, 1.0) * duration
            time.sleep(delay)
            events.append(f"kill after {delay:.2f}s")
        kill_all(proc)
        if completed(run_dir):
            events.append("(had already completed)")
            break
    while not completed(run_dir):
        has_checkpoint = (run_dir / "checkpoints" / "latest").exists()
        result = cli("train", "--run-dir", str(run_dir), "--no-eval",
                     *(["--resume", "latest"] if has_checkpoint else ["--overwrite"]),
                     *set_args(overrides))
        events.append(f"resumed from {'latest' if has_checkpoint else 'scratch'}: rc {result.returncode}")
        assert result.returncode == 0, (events, result.stderr)
    return events


def check_identical(reference: Path, run_dir: Path, events: list[str]) -> None:
    a, b = final_weights(reference), final_weights(run_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), events
    losses = [[r["loss"] for r in read_metrics(d / "metrics.jsonl")] for d in (reference, run_dir)]
    assert losses[0] == losses[1], events
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), events


@pytest.mark.parametrize("trial", range(5))
def test_random_kills_then_resume_are_bit_exact(trial: int, dataset: Path, reference_run,
                                                tmp_path: Path) -> None:
    reference, duration = reference_run
    events = crash_and_recover(trial, dataset, tmp_path / "run", duration)
    check_identical(reference, tmp_path / "run", events)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(5, 50))
def test_random_kills_many_trials(trial: int, dataset: Path, reference_run, tmp_path: Path) -> None:
    reference, duration = reference_run
    events = crash_and_recover(trial, dataset, tmp_path / "run", duration)
    check_identical(reference, tmp_path / "run", events)


# ------------------------------------------------------------------------------- hangs


def workers(run_dir: Path) -> dict[int, int]:
    from test_train import worker_pids

    return worker_pids(run_dir)


def wait_for_steps(run_dir: Path, steps: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and len(read_metrics(run_dir / "metrics.jsonl")) < steps:
        time.sleep(0.05)


def test_a_stalled_rank_stops_the_job_and_is_named(dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "stall"
    proc = start(run_dir, micro(dataset, **{"train.min_train_tokens": -1,
                                            "train.checkpoint_interval": 10000,
                                            "train.collective_timeout_s": 5}), "--nproc", "2")
    wait_for_steps(run_dir, 4)
    pids = workers(run_dir)
    os.kill(pids[1], signal.SIGSTOP)
    stopped_at = time.time()
    _, stderr = proc.communicate(timeout=90)
    assert time.time() - stopped_at < 60
    assert proc.returncode == 1
    assert "rank 1 stopped responding" in stderr, stderr
    time.sleep(0.5)
    assert workers(run_dir) == {}


def test_interrupt_stops_every_worker(dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "interrupted"
    proc = start(run_dir, micro(dataset, **{"train.min_train_tokens": -1,
                                            "train.checkpoint_interval": 10000}), "--nproc", "2")
    wait_for_steps(run_dir, 4)
    assert sorted(workers(run_dir)) == [0, 1]
    os.kill(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    time.sleep(0.5)
    assert workers(run_dir) == {}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"] == "interrupted (Ctrl-C / SIGINT)"


def test_killed_launcher_takes_its_workers_along(dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "orphans"
    proc = start(run_dir, micro(dataset, **{"train.min_train_tokens": -1,
                                            "train.checkpoint_interval": 10000}), "--nproc", "2")
    wait_for_steps(run_dir, 4)
    assert sorted(workers(run_dir)) == [0, 1]
    os.kill(proc.pid, signal.SIGKILL)  # only the launcher
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and workers(run_dir):
        time.sleep(0.1)
    assert workers(run_dir) == {}


# ------------------------------------------------------------------------------- runs already there


def test_a_locked_run_directory_refuses_a_second_launch(dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "busy"
    launch.lock_run_dir(run_dir)
    try:
        result = cli("train", "--run-dir", str(run_dir), *set_args(micro(dataset)))
    finally:
        launch.unlock_run_dir(run_dir)
    assert result.returncode == 2
    assert f"{run_dir} is in use by another run (pid {os.getpid()})" in result.stderr
    assert not (run_dir / "config.yaml").exists()
    assert cli("train", "--run-dir", str(run_dir), *set_args(micro(dataset))).returncode == 0


# ------------------------------------------------------------------------------- security


def test_no_unpickling_or_eval_in_the_package() -> None:
    """torch.load only with weights_only=True; no pickle.load, eval, exec or yaml.load."""
    package = Path(__file__).resolve().parent.parent / "gptlib"
    problems = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if name.endswith("torch.load") and not (
                    "weights_only" in keywords and ast.unparse(keywords["weights_only"]) == "True"):
                problems.append(f"{path.name}:{node.lineno} {name} without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "eval", "exec", "yaml.load",
                        "yaml.unsafe_load", "marshal.loads"):
                problems.append(f"{path.name}:{node.lineno} {name}")
    assert problems == []


def test_a_hub_token_in_the_environment_is_written_nowhere(dataset: Path, tmp_path: Path) -> None:
    token = "hf_FAKEtoken1234567890abcdefGHIJ"
    env = {**os.environ, "HF_TOKEN": token, "HUGGING_FACE_HUB_TOKEN": token}
    run_dir = tmp_path / "run"
    result = cli("train", "--run-dir", run_dir, *set_args(micro(dataset)), env=env)
    assert result.returncode == 0, result.stderr
    assert token not in result.stdout + result.stderr
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        assert token.encode() not in path.read_bytes(), path


def test_resume_with_another_world_size_is_refused(dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    assert cli("train", "--run-dir", str(run_dir), *set_args(micro(dataset))).returncode == 0
    result = cli("train", "--run-dir", str(run_dir), "--resume", "latest", "--nproc", "2",
                 *set_args(micro(dataset)))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: checkpoint latest of {run_dir} was written by 1 processes; resume it with --nproc 1"]


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 300 MB tmpfs (a disk that fills), where this machine lets the tests mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("left_mb", [0, 20])  # 20 MB: a checkpoint (39 MB) does not fit
def test_a_full_disk_fails_in_one_line_and_the_run_resumes(dataset: Path, small_disk: Path,
                                                           left_mb: int) -> None:
    from gptlib import summary

    run_dir, filler = small_disk / "run", small_disk / "filler"
    overrides = micro(dataset, **{"train.min_train_tokens": 64 * 32, "train.log_interval": 1})
    proc = start(run_dir, overrides, "--nproc", "1")
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "checkpoints" / "step-4").is_dir():
        time.sleep(0.02)
    with open(filler, "wb") as f:  # fill the disk to the last byte
        with pytest.raises(OSError, match="No space left on device"):
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
    os.truncate(filler, filler.stat().st_size - left_mb * (1 << 20))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    # torchrun's failure report and the tracebacks stay in the logs: the reader sees one line
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    last = stderr.strip()
    assert re.fullmatch(r"error: training failed on rank 0 \(exit code 1\): \[rank 0\] .*(No space left "
                        r"on device|disk holding .* is full).*; details in .*rank-0\.log"
                        r"( \(summary.json not updated: No space left on device\))?", last), last
    # Nothing half-written is left (an unfinished checkpoint's space is freed), and the run's
    # state reads true: failed with the reason where summary.json could take it (always when a
    # checkpoint's freed space makes room), else stopped.
    assert not list(run_dir.rglob(f"{ckpt.TEMP_PREFIX}*"))
    status, error = summary.run_status(run_dir)
    if "summary.json not updated" in last:
        assert left_mb == 0 and status == "stopped" and "no process holds the run" in error
    else:
        assert (status, error) == ("failed", last.removeprefix("error: "))
    written = ckpt.list_checkpoints(run_dir)
    filler.unlink()
    resumed = cli("train", "--run-dir", run_dir, "--nproc", "1", "--resume", "latest", "--no-eval",
                  *set_args(overrides))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after step {written[-1].split('-')[1]}" in resumed.stdout
    assert summary.run_status(run_dir)[0] == "completed (not evaluated)"
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(64))
