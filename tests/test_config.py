"""Configuration: presets, interventions, overrides, series import and validation messages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gptlib import config
from gptlib.config import ConfigError, EvalConfig, ModelConfig, RunConfig, TrainConfig, check_world_size
from gptlib.presets import list_interventions, list_scales, load_config, resolve_config, save_config

SCALES = ["gpt2-small-1gpu", "gpt2-small-8xa100", "tiny"]
INTERVENTIONS = [
    "baseline",
    "gradient-clipping",
    "learning-rate",
    "learning-rate-schedule",
    "no-amp",
    "no-dropout",
    "qkv-bias",
    "stacked-1",
    "stacked-2",
    "stacked-3",
    "weight-decay-cerebras",
    "weight-decay-cerebras-scheduling-and-increasing-learning-rate",
    "weight-decay-cerebras-scheduling-learning-rate",
    "weight-decay-gpt2",
    "weight-tying",
]
FULL = "gpt2-small-8xa100"
# warmup_period_percent 5 is also the default, so it is no change (the files spell it out).
LR_SCHEDULE = {"train.learning_rate": 0.0014, "train.schedule_learning_rate": True}
STACKED_1 = {
    "train.clipping_max_norm": 3.5,
    "model.drop_rate": 0.0,
    "train.weight_decay": 0.01,
    **LR_SCHEDULE,
}
# What each intervention changes vs the baseline, and nothing else.
DELTAS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "gradient-clipping": {"train.clipping_max_norm": 3.5},
    "no-dropout": {"model.drop_rate": 0.0},
    "qkv-bias": {"model.qkv_bias": True},
    "learning-rate": {"train.learning_rate": 0.0014},
    "learning-rate-schedule": LR_SCHEDULE,
    "weight-decay-gpt2": {"train.weight_decay": 0.01},
    "weight-decay-cerebras": {"train.weight_decay": 0.33724},
    "weight-decay-cerebras-scheduling-learning-rate": {
        "train.weight_decay": 0.33724, "train.schedule_learning_rate": True},
    "weight-decay-cerebras-scheduling-and-increasing-learning-rate": {
        "train.weight_decay": 0.33724, "train.schedule_learning_rate": True,
        "train.learning_rate": 0.0014},
    "weight-tying": {"model.tie_weights": True},
    "no-amp": {"train.precision": "fp32"},
    "stacked-1": STACKED_1,
    "stacked-2": {**STACKED_1, "model.qkv_bias": True},
    "stacked-3": {k: v for k, v in STACKED_1.items() if k != "train.weight_decay"},
}


def flat(cfg: RunConfig) -> dict[str, Any]:
    """``{"model.n_layers": 12, ...}`` for the three sections, plus nproc."""
    out: dict[str, Any] = {"nproc": cfg.nproc}
    for section in ("model", "train", "eval"):
        for key, value in cfg.to_dict()[section].items():
            out[f"{section}.{key}"] = value
    return out


def changed(before: RunConfig, after: RunConfig) -> dict[str, Any]:
    a, b = flat(before), flat(after)
    return {k: b[k] for k in a if a[k] != b[k]}


@pytest.fixture
def params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A writable copy of parameters/ that the config module reads instead of the real one."""
    copy = tmp_path / "parameters"
    shutil.copytree(config.PARAMETERS_DIR, copy)
    monkeypatch.setattr(config, "PARAMETERS_DIR", copy)
    return copy


def series_run(parent: Path, name: str, model: dict[str, Any], train: dict[str, Any]) -> Path:
    run = parent / name
    run.mkdir()
    (run / "model.json").write_text(json.dumps(model))
    (run / "train.json").write_text(json.dumps(train))
    return run


SERIES_MODEL = {
    "vocab_size": 50257,
    "context_length": 1024,
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}
SERIES_TRAIN = {  # runs/8xa100m80-no-amp/train.json of gpjt/ddp-base-model-from-scratch
    "microbatch_size": 12,
    "checkpoint_interval": 617,
    "dataset": "gpjt/fineweb-gpt2-tokens",
    "min_train_tokens": 3260190720,
    "start_train_token": 0,
    "start_val_token": 0,
    "use_amp": False,
}


# --------------------------------------------------------------------------------------------------
# Presets


def test_lists_every_scale_and_intervention() -> None:
    assert list_scales() == SCALES
    assert list_interventions() == INTERVENTIONS


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("intervention", INTERVENTIONS)
def test_every_scale_and_intervention_resolves(scale: str, intervention: str) -> None:
    cfg = resolve_config(scale, intervention)
    assert cfg.scale == scale
    assert cfg.interventions == ([] if intervention == "baseline" else [intervention])
    assert cfg.run_name == intervention


def test_dataclass_defaults_are_the_series_baseline() -> None:
    assert ModelConfig() == ModelConfig(
        vocab_size=50257,
        context_length=1024,
        emb_dim=768,
        n_heads=12,
        n_layers=12,
        drop_rate=0.1,
        qkv_bias=False,
        tie_weights=False,
    )
    t = TrainConfig()
    assert (t.learning_rate, t.weight_decay, t.weight_decay_matrices_only) == (4e-4, 0.1, False)
    assert (t.clipping_max_norm, t.schedule_learning_rate) == (None, False)
    assert (t.precision, t.random_seed, t.training_seed, t.start_train_token) == (
        "fp16",
        42,
        None,
        0,
    )
    e = EvalConfig()
    assert (e.start_token, e.batches, e.batch_size) == (50_000_000, 3200, 6)
    assert (e.smoke_prompt, e.smoke_tokens, e.smoke_top_k, e.smoke_temperature) == (
        "Every effort moves you",
        20,
        25,
        1.4,
    )


def test_full_scale_baseline_equals_the_series() -> None:
    cfg = resolve_config(FULL, "baseline")
    assert cfg.model == ModelConfig()
    assert cfg.eval == EvalConfig()
    assert cfg.nproc == 8
    assert cfg.train == TrainConfig(
        dataset="hf:gpjt/fineweb-gpt2-tokens",
        microbatch_size=12,
        gradient_accumulation_steps=1,
        global_batch_size=96,
        checkpoint_interval=617,
        min_train_tokens=3_260_190_720,
        precision="fp16",
        protocol="series",
    )
    assert cfg.run_name == "baseline"
    check_world_size(cfg, 8)


def test_one_gpu_scale_differs_only_in_batch_layout() -> None:
    one, eight = resolve_config("gpt2-small-1gpu"), resolve_config(FULL)
    assert changed(eight, one) == {
        "nproc": 1,
        "train.microbatch_size": 6,
        "train.gradient_accumulation_steps": 16,
    }
    check_world_size(one, 1)


def test_tiny_is_the_default_and_small() -> None:
    cfg = resolve_config()
    assert cfg == resolve_config("tiny", "baseline")
    assert (cfg.model.vocab_size, cfg.model.context_length, cfg.model.emb_dim, cfg.model.n_layers) == (
        1024, 128, 256, 4)
    assert cfg.train.dataset == "builtin:python-stdlib"
    # The series' baseline hyperparameters, unchanged.
    assert (cfg.train.learning_rate, cfg.train.weight_decay, cfg.model.drop_rate) == (4e-4, 0.1, 0.1)
    assert not cfg.train.schedule_learning_rate and cfg.train.clipping_max_norm is None
    assert (cfg.train.precision, cfg.eval.batches, cfg.eval.start_token) == ("auto", -1, 0)


@pytest.mark.parametrize("intervention", INTERVENTIONS)
def test_intervention_changes_exactly_its_keys(intervention: str) -> None:
    base = resolve_config(FULL, "baseline")
    assert changed(base, resolve_config(FULL, intervention)) == DELTAS[intervention]


# --------------------------------------------------------------------------------------------------
# Combining, seeds, overrides


def test_interventions_stack_in_order_with_plus() -> None:
    joined = resolve_config(FULL, "gradient-clipping+no-dropout+weight-decay-gpt2")
    listed = resolve_config(FULL, ["gradient-clipping", "no-dropout + weight-decay-gpt2"])
    assert joined == listed
    assert joined.interventions == ["gradient-clipping", "no-dropout", "weight-decay-gpt2"]
    assert joined.run_name == "gradient-clipping+no-dropout+weight-decay-gpt2"
    # The parts of stacked-1 add up to stacked-1 (apart from the names).
    parts = resolve_config(
        FULL, "gradient-clipping+no-dropout+weight-decay-gpt2+learning-rate-schedule"
    )
    stacked = resolve_config(FULL, "stacked-1")
    assert (parts.model, parts.train) == (stacked.model, stacked.train)
    # stacked-2 = stacked-1 + qkv-bias; later deltas win.
    assert (
        resolve_config(FULL, "stacked-1+qkv-bias").model == resolve_config(FULL, "stacked-2").model
    )
    wd = "weight-decay-gpt2+weight-decay-cerebras"
    assert resolve_config(FULL, wd).train.weight_decay == 0.33724
    assert resolve_config(FULL, "+".join(reversed(wd.split("+")))).train.weight_decay == 0.01


def test_baseline_is_dropped_when_combined() -> None:
    cfg = resolve_config(FULL, "baseline+no-dropout")
    assert cfg.interventions == ["no-dropout"]
    assert cfg.run_name == "no-dropout"
    assert resolve_config(FULL, ["baseline"]).interventions == []


def test_seed_and_run_name() -> None:
    assert resolve_config(seed=42).run_name == "baseline"
    cfg = resolve_config(FULL, "qkv-bias+no-dropout", seed=7)
    assert cfg.train.random_seed == 7
    assert cfg.run_name == "qkv-bias+no-dropout-seed7"
    both = resolve_config(seed=3, overrides={"train.training_seed": 5})
    assert both.run_name == "baseline-seed3-tseed5"
    assert resolve_config(seed="9").train.random_seed == 9  # papermill may pass text
    # Overrides come after the seed.
    assert resolve_config(seed=7, overrides=["train.random_seed=8"]).train.random_seed == 8


def test_overrides_as_list_of_strings() -> None:
    cfg = resolve_config(
        "tiny",
        "gradient-clipping",
        overrides=[
            "model.n_layers=2",
            "train.microbatch_size=4",
            "eval.batches=2",
            "nproc=2",
            "train.clipping_max_norm=null",
            "train.schedule_learning_rate=true",
            "train.learning_rate=4e-4",
            "train.warmup_period_percent=10",
            "train.dataset=/data/my tokens",
            "eval.smoke_prompt=Hello, world",
            "train.compile=false",
        ],
    )
    assert cfg.model.n_layers == 2
    assert cfg.train.microbatch_size == 4
    assert cfg.eval.batches == 2
    assert cfg.nproc == 2
    assert cfg.train.clipping_max_norm is None
    assert cfg.train.schedule_learning_rate is True
    assert cfg.train.learning_rate == 4e-4
    assert cfg.train.warmup_period_percent == 10.0
    assert isinstance(cfg.train.warmup_period_percent, float)
    assert cfg.train.dataset == "/data/my tokens"
    assert cfg.eval.smoke_prompt == "Hello, world"
    assert cfg.train.compile is False


def test_overrides_as_dict_dotted_or_nested_and_nproc_argument() -> None:
    dotted = resolve_config(overrides={"model.n_layers": 2, "train.precision": "fp32"})
    nested = resolve_config(overrides={"model": {"n_layers": 2}, "train": {"precision": "fp32"}})
    text = resolve_config(overrides="{model.n_layers: 2, train.precision: fp32}")
    assert dotted == nested == text
    assert (dotted.model.n_layers, dotted.train.precision) == (2, "fp32")
    assert resolve_config(nproc="auto").nproc == "auto"
    assert resolve_config(nproc=3).nproc == 3
    assert resolve_config(nproc="3").nproc == 3
    # The nproc argument wins over an nproc override.
    assert resolve_config(overrides=["nproc=2"], nproc=4).nproc == 4
    full = resolve_config(FULL, overrides=["nproc=4", "train.gradient_accumulation_steps=2"])
    check_world_size(full, 4)


# --------------------------------------------------------------------------------------------------
# Files


def test_to_yaml_load_config_round_trip(tmp_path: Path) -> None:
    for cfg in (
        resolve_config(),
        resolve_config(FULL, "stacked-2+weight-tying", seed=11),
        resolve_config(overrides={"train.training_seed": 1, "train.compile": True}, nproc="auto"),
    ):
        path = save_config(cfg, tmp_path / cfg.run_name / "config.yaml")
        assert path.read_text().startswith(f"# gptlib run config: {cfg.run_name}")
        loaded = load_config(path)
        assert loaded == cfg
        assert loaded.run_name == cfg.run_name
    assert not list(tmp_path.rglob("*.tmp"))  # atomic write left no temp file


def test_parameters_dir_follows_the_environment(tmp_path: Path) -> None:
    scales = tmp_path / "scales"
    scales.mkdir()
    (scales / "mine.yaml").write_text("nproc: 1\n")
    code = "from gptlib.presets import list_scales; print(list_scales())"
    env = {**os.environ, "GPTLIB_PARAMETERS": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "['mine']", out.stderr


def test_import_series_run_directory(tmp_path: Path) -> None:
    run = series_run(tmp_path, "8xa100m80-no-amp", SERIES_MODEL, SERIES_TRAIN)
    cfg = resolve_config(str(run))
    assert cfg.scale == "8xa100m80-no-amp"
    assert cfg.train.precision == "fp32"  # use_amp false
    assert cfg.train.dataset == "hf:gpjt/fineweb-gpt2-tokens"
    assert (cfg.nproc, cfg.train.global_batch_size) == (8, 96)  # from the "8x" of the name
    assert cfg.eval == EvalConfig()  # start_val_token is the series' in-training validation
    # The same run as the preset plus the no-amp intervention.
    preset = resolve_config(FULL, "no-amp")
    assert (cfg.model, cfg.train) == (preset.model, preset.train)

    amp = series_run(tmp_path, "amp", SERIES_MODEL, {**SERIES_TRAIN, "use_amp": True})
    cfg = resolve_config(str(amp), "qkv-bias")
    assert cfg.train.precision == "fp16"
    assert cfg.model.qkv_bias is True
    assert (cfg.nproc, cfg.train.global_batch_size) == ("auto", None)


def test_import_series_run_with_early_key_names(tmp_path: Path) -> None:
    train = {  # runs/test/train.json of the early series code
        "minibatch_size": 6,
        "validation_interval": 10,
        "dataset": "gpjt/fineweb-gpt2-tokens",
        "min_train_tokens": 32601,
        "start_train_token": 0,
        "validation_batches": 2,
        "start_val_token": 0,
    }
    tied = {**SERIES_MODEL, "tie_weights": True, "drop_rate": 0.0}
    cfg = resolve_config(str(series_run(tmp_path, "1xrtx3090-test", tied, train)))
    assert (cfg.train.microbatch_size, cfg.train.checkpoint_interval) == (6, 10)
    assert (cfg.model.tie_weights, cfg.model.drop_rate) == (True, 0.0)
    assert (cfg.nproc, cfg.train.global_batch_size) == (1, 6)


# --------------------------------------------------------------------------------------------------
# Errors: each message names the problem and what is allowed (closest first)

BAD_INPUTS: list[tuple[dict[str, Any], str]] = [
    ({"scale": "tiyn"}, r"^unknown scale 'tiyn'; allowed: tiny, "),
    ({"scale": "gpt2-small-8xa10"}, r"allowed: gpt2-small-8xa100, gpt2-small-1gpu, tiny"),
    ({"intervention": "no-dropot"}, r"^unknown intervention 'no-dropot'; allowed: no-dropout, "),
    ({"intervention": "gradient-cliping+no-dropout"}, r"allowed: gradient-clipping, "),
    ({"intervention": "no-dropout+no-dropout"}, r"'no-dropout' is given more than once"),
    ({"intervention": "no-dropout++qkv-bias"}, r"empty name"),
    (
        {"overrides": ["train.drop_rate=0"]},
        r"train\.drop_rate: unknown key \(it is a key of model: model\.drop_rate\); "
        r"allowed keys of train: ",
    ),
    ({"overrides": ["model.n_layer=2"]}, r"model\.n_layer: unknown key; .* of model: n_layers, "),
    ({"overrides": ["trian.learning_rate=1"]}, r"unknown section 'trian'; allowed: train, "),
    ({"overrides": ["n_layers=2"]}, r"'n_layers': unknown key; use section\.key, .*model\.n_lay"),
    ({"overrides": ["model.n_layers"]}, r"expected key=value"),
    (
        {"overrides": ["train.microbatch_size=four"]},
        r"train\.microbatch_size: expected int, got 'four'",
    ),
    ({"overrides": {"train.microbatch_size": True}}, r"microbatch_size: expected int, got True"),
    ({"overrides": {"train.microbatch_size": 4.5}}, r"microbatch_size: expected int, got 4\.5"),
    ({"overrides": {"train.learning_rate": "fast"}}, r"learning_rate: expected float, got 'fast'"),
    ({"overrides": ["train.learning_rate=.inf"]}, r"learning_rate: expected float"),
    ({"overrides": {"model.qkv_bias": 1}}, r"model\.qkv_bias: expected bool, got 1"),
    ({"overrides": {"train.dataset": None}}, r"train\.dataset: expected str, got None"),
    ({"overrides": {"train": 4}}, r"train: expected a mapping of keys, got 4"),
    ({"seed": True}, r"seed: expected int, got True"),
    (
        {"scale": FULL, "overrides": {"model.emb_dim": 100}},
        r"model\.emb_dim=100 is not divisible "
        r"by model\.n_heads=12",
    ),
    ({"overrides": ["model.n_layers=0"]}, r"model\.n_layers=0 must be >= 1"),
    ({"overrides": ["model.drop_rate=1"]}, r"model\.drop_rate=1\.0 must be in \[0, 1\)"),
    ({"overrides": ["train.learning_rate=0"]}, r"train\.learning_rate=0\.0 must be > 0"),
    ({"overrides": ["train.weight_decay=-0.1"]}, r"train\.weight_decay=-0\.1 must be >= 0"),
    ({"overrides": ["train.warmup_period_percent=150"]}, r"must be in \[0, 100\]"),
    ({"overrides": ["train.clipping_max_norm=0"]}, r"clipping_max_norm=0\.0 must be > 0"),
    ({"overrides": ["train.precision=bf-16"]}, r"precision='bf-16': not allowed; allowed: bf16, "),
    ({"overrides": ["train.device=gpu"]}, r"device='gpu': not allowed; allowed: .*cuda"),
    ({"overrides": ["train.min_train_tokens=0"]}, r"must be -1 \(all available\) or >= 1"),
    ({"overrides": ["train.min_train_tokens=-2"]}, r"min_train_tokens=-2 must be -1"),
    ({"overrides": ["train.start_train_token=-1"]}, r"start_train_token=-1 must be >= 0"),
    ({"overrides": ["train.microbatch_size=0"]}, r"train\.microbatch_size=0 must be >= 1"),
    ({"overrides": ["eval.batches=0"]}, r"eval\.batches=0 must be -1 \(the whole split\)"),
    ({"overrides": ["eval.smoke_top_k=-1"]}, r"eval\.smoke_top_k=-1 must be >= 0"),
    ({"overrides": ["eval.smoke_temperature=-0.5"]}, r"smoke_temperature=-0\.5 must be >= 0"),
    ({"nproc": "many"}, r"nproc='many': not allowed; allowed: 'auto' or an int >= 1"),
    ({"nproc": 0}, r"nproc=0: not allowed"),
    (
        {"scale": FULL, "nproc": 4},
        r"global_batch_size=96 .* x world size 4 x .* = 48; "
        r"set train\.gradient_accumulation_steps=2",
    ),
    (
        {"overrides": {"train.global_batch_size": 20}},
        r"global_batch_size=20 must be a positive multiple of .* = 8",
    ),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_INPUTS)
def test_bad_input_is_rejected_with_a_clear_message(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        resolve_config(**kwargs)
    assert "\n" not in str(info.value)


def test_check_world_size_says_how_to_fix() -> None:
    cfg = resolve_config(FULL)
    with pytest.raises(ConfigError, match=r"set train\.gradient_accumulation_steps=8$"):
        check_world_size(cfg, 1)
    with pytest.raises(ConfigError, match=r"change train\.microbatch_size so that it x 5 divides"):
        check_world_size(cfg, 5)
    check_world_size(resolve_config(), 3)  # no global batch size: any world size


def test_bad_parameter_files_are_named(params: Path) -> None:
    (params / "scales" / "broken.yaml").write_text("train: {microbatch_size: 4\n")
    with pytest.raises(ConfigError, match=r"^parameters/scales/broken\.yaml: invalid YAML: "):
        resolve_config("broken")
    (params / "scales" / "listy.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"listy\.yaml: expected a mapping of sections, got list"):
        resolve_config("listy")
    (params / "scales" / "typo.yaml").write_text("trainer: {microbatch_size: 4}\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown section 'trainer'; allowed: train"):
        resolve_config("typo")
    (params / "interventions" / "wide.yaml").write_text("nproc: 2\n")
    with pytest.raises(ConfigError, match=r"wide\.yaml: unknown section 'nproc'; allowed: "):
        resolve_config(intervention="wide")
    (params / "interventions" / "typo.yaml").write_text("model:\n  qkv_bais: true\n")
    with pytest.raises(
        ConfigError, match=r"typo\.yaml: model\.qkv_bais: unknown key; .*qkv_bias, "
    ):
        resolve_config(intervention="typo")


def test_bad_config_yaml_is_rejected(tmp_path: Path) -> None:
    path = save_config(resolve_config(), tmp_path / "config.yaml")
    text = path.read_text()
    path.write_text(text.replace("n_layers: 4", "n_layers: -4"))
    with pytest.raises(ConfigError, match=r"config\.yaml: model\.n_layers=-4 must be >= 1"):
        load_config(path)
    path.write_text(text + "extra: 1\n")
    with pytest.raises(ConfigError, match=r"config\.yaml: unknown key 'extra'; allowed: "):
        load_config(path)
    path.write_text(text.replace("interventions: []", "interventions: no-dropout"))
    with pytest.raises(ConfigError, match=r"interventions: expected a list of names"):
        load_config(path)


def test_bad_series_run_directories(tmp_path: Path) -> None:
    moe = {**SERIES_TRAIN, "moe_router_loss_scale": 0.01}
    run = series_run(tmp_path, "moe", SERIES_MODEL, moe)
    with pytest.raises(ConfigError, match=r"train\.json: unknown key 'moe_router_loss_scale'"):
        resolve_config(str(run))
    lore = {**SERIES_MODEL, "lore": {"rank": 128}}
    run = series_run(tmp_path, "lore", lore, SERIES_TRAIN)
    with pytest.raises(ConfigError, match=r"model\.json: model\.lore: unknown key; allowed keys"):
        resolve_config(str(run))
    run = series_run(tmp_path, "amp", SERIES_MODEL, {**SERIES_TRAIN, "use_amp": "yes"})
    with pytest.raises(ConfigError, match=r"train\.json: use_amp: expected bool, got 'yes'"):
        resolve_config(str(run))
    (run / "train.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"train\.json: invalid JSON"):
        resolve_config(str(run))
    (run / "train.json").unlink()
    with pytest.raises(ConfigError, match=r"train\.json: missing; a series run directory holds"):
        resolve_config(str(run))
