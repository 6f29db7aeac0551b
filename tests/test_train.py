"""The training engine: DDP equivalence, exact resume, atomic checkpoints, each knob, failures."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from runs import cli, final_weights, micro, set_args

from gptlib import checkpoint as ckpt
from gptlib.config import ModelConfig, TrainConfig
from gptlib.device import autocast_context
from gptlib.launch import prepare_run
from gptlib.metrics import read_metrics
from gptlib.model import GPTModel
from gptlib.optim import build_optimizer, param_groups
from gptlib.train import RankContext, TrainingError, train


@pytest.fixture
def in_process(tmp_path: Path):
    """Run `train()` in this process as a world of one (gloo), for knobs that need a look inside."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg-store", rank=0, world_size=1)

    def run(overrides: dict, run_dir: Path | None = None) -> tuple[Path, dict]:
        cfg, path, _ = prepare_run(overrides=overrides, run_dir=run_dir or tmp_path / "run")
        ctx = RankContext(0, 1, 0, torch.device("cpu"), path / "train.log")
        return path, train(cfg, path, None, ctx)

    yield run
    dist.destroy_process_group()


# ------------------------------------------------------------------------------- DDP and resume


def test_two_processes_equal_one_process_with_accumulation(dataset: Path, tmp_path: Path) -> None:
    two = cli("train", "--nproc", "2", "--run-dir", str(tmp_path / "ddp"), "--no-eval",
              *set_args(micro(dataset)))
    assert two.returncode == 0, two.stderr + two.stdout
    one = cli("train", "--nproc", "1", "--run-dir", str(tmp_path / "ga"), "--no-eval",
              *set_args(micro(dataset, **{"train.gradient_accumulation_steps": 2})))
    assert one.returncode == 0, one.stderr + one.stdout
    ddp, ga = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "ga")
    assert set(ddp) == set(ga)
    for name in ddp:
        torch.testing.assert_close(ddp[name], ga[name], atol=1e-6, rtol=0, msg=name)
    initial = GPTModel_state(tmp_path / "ga")
    assert any(not torch.equal(initial[n], ga[n]) for n in ga)  # training did move the weights
    losses_ddp = [r["loss"] for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl")]
    losses_ga = [r["loss"] for r in read_metrics(tmp_path / "ga" / "metrics.jsonl")]
    assert losses_ddp == pytest.approx(losses_ga, abs=1e-5)


def GPTModel_state(run_dir: Path) -> dict[str, torch.Tensor]:
    from gptlib.presets import load_config

    cfg = load_config(run_dir / "config.yaml")
    torch.manual_seed(cfg.train.random_seed)
    return GPTModel(cfg.model).state_dict()


def test_resume_after_sigkill_is_bit_exact(dataset: Path, tmp_path: Path) -> None:
    overrides = micro(dataset, **{
        "model.drop_rate": 0.1, "model.emb_dim": 64, "model.context_length": 32,
        "train.microbatch_size": 4, "train.checkpoint_interval": 6,
        "train.min_train_tokens": 24 * 4 * 32, "train.log_interval": 1})
    full = cli("train", "--run-dir", str(tmp_path / "full"), "--no-eval", *set_args(overrides))
    assert full.returncode == 0, full.stderr

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptlib", "train", "--run-dir", str(killed), *set_args(overrides)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() != "step-6"):
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["status"] == "running"  # killed mid-run, not after the end
    assert ckpt.list_checkpoints(killed)[:2] == ["step-6", "step-12"]
    assert "step-24" not in ckpt.list_checkpoints(killed)

    resumed = cli("train", "--run-dir", str(killed), "--resume", "latest", "--no-eval",
                  *set_args(overrides))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after step" in resumed.stdout
    a, b = final_weights(tmp_path / "full"), final_weights(killed)
    assert all(torch.equal(a[name], b[name]) for name in a)
    losses = [[r["loss"] for r in read_metrics(d / "metrics.jsonl")] for d in (tmp_path / "full", killed)]
    assert len(losses[0]) == 24 and losses[0] == losses[1]


def test_failed_checkpoint_write_keeps_previous_latest(dataset: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = GPTModel(prepare_run(overrides=micro(dataset), run_dir=tmp_path / "cfg")[0].model)
    optimizer = torch.optim.AdamW(model.parameters())
    rng = {"cpu": [torch.get_rng_state()]}
    meta = {"world_size": 1}
    ckpt.save_checkpoint(tmp_path, 4, model, optimizer, None, rng, meta, is_best=True)

    real_save = torch.save

    def failing_save(obj: object, path: object, *args: object, **kwargs: object) -> None:
        if str(path).endswith("optimizer.pt"):
            real_save(obj, path)
            Path(path).write_bytes(Path(path).read_bytes()[:100])  # half written
            raise OSError("disk full (injected)")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError, match="injected"):
        ckpt.save_checkpoint(tmp_path, 8, model, optimizer, None, rng, meta, is_best=True)
    monkeypatch.undo()

    assert ckpt.list_checkpoints(tmp_path) == ["step-4"]
    for pointer in ("latest", "best"):
        path = ckpt.resolve_checkpoint(tmp_path, pointer)
        assert path.name == "step-4"
    fresh = GPTModel(model.cfg)
    loaded_meta, _ = ckpt.load_checkpoint(path, fresh, torch.optim.AdamW(fresh.parameters()))
    assert loaded_meta["step"] == 4
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 model.state_dict().values(), strict=True))
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # a failed write frees its space
    killed = tmp_path / "checkpoints" / ".tmp-step-8.4242"  # what a SIGKILL mid-write leaves
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    assert ckpt.remove_temporary_files(tmp_path / "checkpoints") == [killed.name]
    assert not killed.exists()


def test_edited_checkpoint_is_detected(dataset: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPTModel(prepare_run(overrides=micro(dataset), run_dir=tmp_path / "cfg")[0].model)
    path = ckpt.save_checkpoint(tmp_path, 4, model, torch.optim.AdamW(model.parameters()), None,
                                {"cpu": [torch.get_rng_state()]}, {}, is_best=False)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors does not match its recorded sha256"):
        ckpt.load_checkpoint(path, model)
    with pytest.raises(ckpt.CheckpointError,
                       match="'step-7' does not exist.*available: latest, best, step-4"):
        ckpt.resolve_checkpoint(tmp_path, "step-7")


# ------------------------------------------------------------------------------- each knob


def test_clipping_bounds_the_applied_gradient_and_records_the_pre_clip_norm(
        dataset: Path, in_process, monkeypatch: pytest.MonkeyPatch) -> None:
    applied: list[float] = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):  # noqa: ANN001, ANN202
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        applied.append(float(torch.nn.utils.get_total_norm(grads)))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    run_dir, summary = in_process(micro(dataset, **{"train.clipping_max_norm": 0.5}))
    records = read_metrics(run_dir / "metrics.jsonl")
    assert len(records) == len(applied) == 8
    for record, norm in zip(records, applied, strict=True):
        assert norm <= 0.5 * (1 + 1e-5)
        assert norm == pytest.approx(min(record["grad_norm"], 0.5), rel=1e-4)
        assert record["clipped"] == (record["grad_norm"] > 0.5)
    assert any(r["clipped"] for r in records)


def test_learning_rate_schedule_at_start_end_of_warmup_and_last_step(dataset: Path, in_process) -> None:
    peak = 1e-3
    run_dir, _ = in_process(micro(dataset, **{
        "train.learning_rate": peak, "train.schedule_learning_rate": True,
        "train.warmup_period_percent": 25, "train.min_train_tokens": 20 * 2 * 16}))
    lrs = [r["lr"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert len(lrs) == 20
    warmup = 5  # 25% of 20 steps
    assert lrs[0] == pytest.approx(1e-5 * peak)
    assert lrs[warmup // 2] == pytest.approx(peak * (1e-5 + (1 - 1e-5) * (warmup // 2) / warmup))
    assert lrs[warmup] == pytest.approx(peak)
    assert lrs[-1] == pytest.approx(peak / 10)
    mid = (warmup + 19) / 2  # halfway through the cosine: halfway between peak and peak / 10
    assert lrs[int(mid)] == pytest.approx(peak / 10 + 0.9 * peak * 0.5 * (1 + math.cos(
        math.pi * (int(mid) - warmup) / (19 - warmup))))
    assert all(a >= b for a, b in zip(lrs[warmup:-1], lrs[warmup + 1:], strict=True))  # decays monotonically


def test_constant_learning_rate_by_default(dataset: Path, in_process) -> None:
    run_dir, _ = in_process(micro(dataset))
    assert {r["lr"] for r in read_metrics(run_dir / "metrics.jsonl")} == {4e-4}


@pytest.mark.parametrize("matrices_only", [False, True])
def test_weight_decay_groupings(matrices_only: bool) -> None:
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(context_length=8, emb_dim=16, n_heads=2, n_layers=1, qkv_bias=True))
    cfg = TrainConfig(weight_decay=0.1, weight_decay_matrices_only=matrices_only)
    groups = param_groups(model, cfg)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    named = dict(model.named_parameters())
    expected = {id(p) for n, p in named.items() if p.dim() >= 2 or not matrices_only}
    assert decayed == expected
    assert sum(len(g["params"]) for g in groups) == len(named)
    # Numerically: with zero gradients an AdamW step only applies the decay p -= lr * wd * p.
    before = {n: p.detach().clone() for n, p in named.items()}
    optimizer = torch.optim.AdamW(groups, lr=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for n, p in named.items():
        factor = 1 - 0.5 * 0.1 if (p.dim() >= 2 or not matrices_only) else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor, msg=n)
    assert any(p.dim() < 2 for p in named.values())  # biases and norms exist to tell them apart


def test_the_optimizer_is_fused_on_cpu_and_steps_like_plain_adamw() -> None:
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(vocab_size=64, context_length=8, emb_dim=16, n_heads=2, n_layers=1,
                                 drop_rate=0.0))
    twin = copy.deepcopy(model)
    cfg = TrainConfig(learning_rate=1e-2, weight_decay=0.1)
    fused = build_optimizer(model, cfg, torch.device("cpu"))
    plain = torch.optim.AdamW(param_groups(twin, cfg), lr=1e-2, foreach=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    tokens = torch.randint(0, 64, (2, 9))
    for _ in range(3):
        for net, optimizer in ((model, fused), (twin, plain)):
            net(tokens[:, :-1], tokens[:, 1:]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for (name, ours), theirs in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                                  ("fp16", torch.float16)])
def test_autocast_per_precision(precision: str, dtype: torch.dtype) -> None:
    a = torch.randn(4, 4)
    with autocast_context(precision, torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") == (precision != "fp32")
        assert (a @ a).dtype == dtype


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_grad_scaler_only_with_fp16(dataset: Path, in_process, precision: str) -> None:
    run_dir, summary = in_process(micro(dataset, **{"train.precision": precision}))
    latest = ckpt.resolve_checkpoint(run_dir, "latest")
    assert (latest / "scaler.pt").exists() == (precision == "fp16")
    assert summary["status"] == "completed"
    if precision == "fp16":
        scale = torch.load(latest / "scaler.pt", weights_only=True)["scale"]
        assert 0 < scale <= 2.0**16


def test_non_finite_step_is_skipped_and_counted(dataset: Path, in_process,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import gptlib.train as train_module

    real = train_module.micro_batch_loss
    calls = {"n": 0}

    def poisoned(*args: object) -> torch.Tensor:
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] == 3 else loss  # the 3rd micro-batch = step 2

    monkeypatch.setattr(train_module, "micro_batch_loss", poisoned)
    run_dir, summary = in_process(micro(dataset))
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["skipped"] for r in records] == [i == 2 for i in range(8)]
    assert records[2]["loss"] is None and records[3]["loss"] is not None
    assert summary["skipped_steps"] == 1
    state = torch.load(ckpt.resolve_checkpoint(run_dir, "latest") / "optimizer.pt", weights_only=True)
    assert all(int(s["step"]) == 7 for s in state["state"].values())  # 8 steps, one skipped


def test_consecutive_non_finite_steps_abort(dataset: Path, in_process,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import gptlib.train as train_module

    real = train_module.micro_batch_loss
    monkeypatch.setattr(train_module, "micro_batch_loss", lambda *a: real(*a) * float("inf"))
    with pytest.raises(TrainingError, match="3 consecutive non-finite steps"):
        in_process(micro(dataset, **{"train.max_nonfinite_steps": 3}))


# ------------------------------------------------------------------------------- failures


def worker_pids(run_dir: Path) -> dict[int, int]:
    """rank -> pid of the gptlib.train workers of this run (found through /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = dict(kv.split(b"=", 1) for kv in (entry / "environ").read_bytes().split(b"\0")
                           if b"=" in kv)
        except OSError:
            continue
        # Workers carry RANK in their environment; the launcher and torchrun do not.
        if b"RANK" in environ and str(run_dir).encode() in b" ".join(cmdline):
            found[int(environ[b"RANK"])] = int(entry.name)
    return found


def test_a_dying_rank_stops_the_run_and_is_named(dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "dies"
    overrides = micro(dataset, **{"train.min_train_tokens": -1, "train.checkpoint_interval": 1000})
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptlib", "train", "--nproc", "2", "--run-dir", str(run_dir),
         *set_args(overrides)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_metrics(run_dir / "metrics.jsonl")) < 4:
        time.sleep(0.1)
    pids = worker_pids(run_dir)
    assert sorted(pids) == [0, 1]
    os.kill(pids[1], signal.SIGKILL)
    killed_at = time.time()
    _, stderr = proc.communicate(timeout=60)
    assert time.time() - killed_at < 60
    assert proc.returncode == 1
    assert "training failed on rank 1" in stderr
    assert worker_pids(run_dir) == {}
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"


def test_bad_resume_target_fails_before_any_work(dataset: Path, tmp_path: Path) -> None:
    result = cli("train", "--run-dir", str(tmp_path / "none"), "--resume", "step-3",
                 *set_args(micro(dataset)))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: checkpoint 'step-3' does not exist in {tmp_path / 'none' / 'checkpoints'}; "
        "available: none"]


def test_existing_completed_run_is_not_overwritten(dataset: Path, tmp_path: Path) -> None:
    first = cli("train", "--run-dir", str(tmp_path / "r"), *set_args(micro(dataset)))
    assert first.returncode == 0, first.stderr
    again = cli("train", "--run-dir", str(tmp_path / "r"), *set_args(micro(dataset)))
    assert again.returncode == 2
    assert "already holds a run (status: completed)" in again.stderr
    forced = cli("train", "--run-dir", str(tmp_path / "r"), "--overwrite", *set_args(micro(dataset)))
    assert forced.returncode == 0, forced.stderr


# ------------------------------------------------------------------------------- the default


def test_tiny_scale_on_the_built_in_corpus(tmp_path: Path, python_stdlib: tuple[Path, str]) -> None:
    """`gptlib train --scale tiny`, its budget cut to 40 steps (the full default is a benchmark, not
    a test; the evaluation after training is tested on micro runs): the built-in corpus, its BPE and
    the scale's shape train, learn and write every file."""
    run_dir = tmp_path / "tiny"
    result = cli("train", "--scale", "tiny", "--run-dir", str(run_dir), "--no-eval",
                 *set_args({"train.min_train_tokens": 40 * 8 * 128, "train.checkpoint_interval": 10}),
                 timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    for prefix in ("Training complete in ", "Tokens seen: ", "Throughput: ", "Final train loss: "):
        assert any(line.startswith(prefix) for line in lines), prefix
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("status", "wall_time_s", "tokens_seen", "tokens_per_s", "mfu", "final_train_loss",
                "best_step", "spike_count", "versions", "git_commit"):
        assert key in summary, key
    assert summary["status"] == "completed" and summary["tokenizer"] == "bpe-1024"
    records = read_metrics(run_dir / "metrics.jsonl")
    assert records[0]["loss"] == pytest.approx(math.log(1024), abs=0.3)  # an untrained 1,024-way guess
    assert summary["final_train_loss"] < math.log(1024) - 0.5  # 40 steps learn the common tokens
    assert summary["tokens_seen"] == records[-1]["tokens"] == 40 * 8 * 128
    assert summary["final_train_loss"] == pytest.approx(
        sum(r["loss"] for r in records[-10:]) / 10)  # the last checkpoint period's average
    for name in ("config.yaml", "metrics.jsonl", "spikes.json", "summary.json", "checkpoints/latest",
                 "checkpoints/best"):
        assert (run_dir / name).exists(), name
    # keep_checkpoints: 3 of the scale (and the best, here the last)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == [
        "step-20", "step-30", "step-40"]
