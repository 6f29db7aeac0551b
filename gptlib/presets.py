"""Building a run configuration: the YAML presets, a series run folder, overrides; config.yaml.

A run is one *scale* (``parameters/scales/<name>.yaml``: model shape, dataset, token budget, batch,
precision) plus zero or more *interventions* (``parameters/interventions/<name>.yaml``: a small
delta each), a seed and explicit overrides, applied in that order on top of the dataclass defaults
(gptlib.config). Every problem raises ConfigError with a one-line message that names the bad key,
value or file and lists what is allowed, closest match first -- before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from gptlib import config
from gptlib.config import (
    SECTIONS,
    ConfigError,
    RunConfig,
    TrainConfig,
    apply_delta,
    closest_first,
    coerce,
    config_changes,
    field_types,
    one_line,
    set_key,
)
from gptlib.device import resolve_precision
from gptlib.paths import short_path
from gptlib.rundir import read_json_object


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """``["key=value", ...]`` (the CLI's ``--set``) as a dict; anything else is one clear error."""
    parsed = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. model.n_layers=2 or nproc=2")
        key, value = item.split("=", 1)
        parsed[key.strip()] = value.strip()
    return parsed


def _named(path: Path) -> str:
    """A parameter file as messages name it: relative to the folder above parameters/."""
    return short_path(path, config.PARAMETERS_DIR.parent)


def list_scales() -> list[str]:
    """Scale names: the file stems of ``parameters/scales/*.yaml``."""
    return sorted(p.stem for p in (config.PARAMETERS_DIR / "scales").glob("*.yaml"))


def list_interventions() -> list[str]:
    """Intervention names: the file stems of ``parameters/interventions/*.yaml``."""
    return sorted(p.stem for p in (config.PARAMETERS_DIR / "interventions").glob("*.yaml"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` ({} for an empty file); a parse error names the file."""
    try:
        loader = _UniqueKeyLoader(path.read_text())
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise ConfigError(f"{_named(path)}: invalid YAML: {one_line(e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{_named(path)}: not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{_named(path)}: cannot read: {e.strerror}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{_named(path)}: expected a mapping of sections, got {type(data).__name__}"
        )
    return data


# --------------------------------------------------------------------------------------------------
# Importing one of the series' run directories (runs/<name>/model.json + train.json)

# Series train.json keys whose name differs here; keys equal to a TrainConfig field map as they are.
SERIES_TRAIN_KEYS = {
    "minibatch_size": "microbatch_size",  # the early name
    "validation_interval": "checkpoint_interval",  # the early name
}
# In-training validation knobs of the series; gptlib measures test loss once, at the end (eval.*).
SERIES_IGNORED_KEYS = ("start_val_token", "validation_batches")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(
            f"{_named(path)}: missing; a series run directory holds model.json and train.json"
        )
    return read_json_object(path, ConfigError)


def _import_series_run(run_dir: Path, cfg: dict[str, Any]) -> None:
    """Apply a series run directory's model.json and train.json to ``cfg``."""
    model_file, train_file = run_dir / "model.json", run_dir / "train.json"
    model_json, train_json = _read_json(model_file), _read_json(train_file)
    apply_delta(cfg, {"model": model_json}, source=f"{_named(model_file)}: ", allow_nproc=False)

    source = f"{_named(train_file)}: "
    train_fields = field_types(TrainConfig)
    allowed = sorted({*train_fields, *SERIES_TRAIN_KEYS, *SERIES_IGNORED_KEYS, "use_amp"})
    for key, value in train_json.items():
        if key in SERIES_IGNORED_KEYS:
            continue
        if key == "use_amp":
            use_amp = coerce(f"{source}use_amp", value, bool)
            cfg["train"]["precision"] = "fp16" if use_amp else "fp32"
            continue
        if key == "dataset" and isinstance(value, str) and ":" not in value:
            value = f"hf:{value}"  # the series downloads every dataset from the HF Hub
        name = SERIES_TRAIN_KEYS.get(key, key)
        if name not in train_fields:
            raise ConfigError(f"{source}unknown key {key!r}; allowed: {closest_first(key, allowed)}")
        set_key(cfg, "train", name, value, source=source)

    cfg["train"]["protocol"] = "series"
    if train_json.get("schedule_learning_rate") and "warmup_period_percent" not in train_json:
        # the series' default when it schedules, not gptlib's 5 (unscheduled, it changes nothing)
        cfg["train"]["warmup_period_percent"] = 0
    # "8xa100m40-baseline": 8 processes, and the series' global batch follows from that.
    match = re.match(r"(\d+)x", run_dir.name)
    if match:
        cfg["nproc"] = int(match.group(1))
        t = cfg["train"]
        t["global_batch_size"] = (
            t["microbatch_size"] * cfg["nproc"] * t["gradient_accumulation_steps"]
        )


# --------------------------------------------------------------------------------------------------
# Resolution: defaults -> scale -> interventions -> seed -> overrides -> nproc


def _split_interventions(intervention: str | list[str]) -> list[str]:
    """``"a+b"`` or ``["a", "b+c"]`` -> validated names, ``baseline`` dropped when combined."""
    if not isinstance(intervention, str | list | tuple):
        raise ConfigError(f"intervention: expected a name or names joined by '+', got {intervention!r}")
    spec = [intervention] if isinstance(intervention, str) else list(intervention)
    names: list[str] = []
    for part in spec:
        if not isinstance(part, str):
            raise ConfigError(f"intervention: expected a name, got {part!r}")
        names += [n.strip() for n in part.split("+")]
    text = "+".join(spec)
    if not names or any(not n for n in names):
        raise ConfigError(
            f"intervention {text!r}: empty name; join names with '+', e.g. "
            "gradient-clipping+no-dropout"
        )
    valid = sorted({*list_interventions(), "baseline"})
    for name in names:
        if name not in valid and "," in name:
            raise ConfigError(f"intervention {name!r}: join interventions with '+', e.g. "
                              f"{'+'.join(part.strip() for part in name.split(','))}")
        if name not in valid:
            raise ConfigError(f"unknown intervention {name!r}; allowed: {closest_first(name, valid)}")
        if names.count(name) > 1:
            raise ConfigError(f"intervention {name!r} is given more than once in {text!r}")
    return [n for n in names if n != "baseline"]


def _parse_overrides(overrides: Mapping[str, Any] | list[str] | str) -> dict[str, Any]:
    """Overrides as ``{section: {key: value}}`` (plus ``nproc``), from dotted keys."""
    items: list[tuple[str, Any]]
    if not isinstance(overrides, str | Mapping | list | tuple):
        raise ConfigError(f"overrides: expected a mapping of dotted keys, e.g. "
                          f"{{'train.learning_rate': 3e-4}}, or key=value items; got {overrides!r}")
    if isinstance(overrides, str):
        try:
            parsed = yaml.safe_load(overrides) if overrides.strip().startswith("{") else None
        except yaml.YAMLError as error:
            raise ConfigError(f"overrides {overrides!r}: invalid YAML ({one_line(error)})") from None
        overrides = parsed if isinstance(parsed, dict) else overrides.split()
    items = list((overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)).items())

    delta: dict[str, Any] = {}
    for key, value in items:
        key = str(key)
        if key in SECTIONS and isinstance(value, Mapping):
            delta.setdefault(key, {}).update(value)
        elif key in SECTIONS or key == "nproc":
            delta[key] = value
        elif "." in key:
            section, name = key.split(".", 1)
            delta.setdefault(section, {})[name] = value
        else:
            dotted = ["nproc"] + [f"{s}.{n}" for s, c in SECTIONS.items() for n in field_types(c)]
            bare = {d.split(".")[-1]: d for d in dotted}
            close = [bare[n] for n in difflib.get_close_matches(key, bare, n=3, cutoff=0.5)]
            raise ConfigError(
                f"override {key!r}: unknown key; use section.key, closest: "
                f"{', '.join(close) or 'none'}; sections: {', '.join(SECTIONS)}, or nproc"
            )
    return delta


def resolve_config(
    scale: str = "tiny",
    intervention: str | list[str] = "baseline",
    seed: int | None = None,
    overrides: Mapping[str, Any] | list[str] | str | None = None,
    nproc: int | str | None = None,
) -> RunConfig:
    """The validated config of one run.

    ``scale`` is a name from :func:`list_scales` or a directory holding one of the series' runs
    (``model.json`` + ``train.json``). ``intervention`` is ``"baseline"``, a name, or names joined
    by ``+`` (applied in order; later ones win). ``overrides`` take dotted keys, as a dict
    (``{"model.n_layers": 2}``) or a list (``["train.microbatch_size=4", "nproc=2"]``); string
    values are read as YAML (``"4"`` -> 4, ``"null"`` -> None, ``"true"`` -> True).
    """
    cfg: dict[str, Any] = RunConfig().to_dict()
    if not isinstance(scale, str) or not scale:
        raise ConfigError(f"scale: expected a name, got {scale!r}")
    scales = list_scales()
    if scale in scales:
        path = config.PARAMETERS_DIR / "scales" / f"{scale}.yaml"
        apply_delta(cfg, _read_yaml(path), source=f"{_named(path)}: ", allow_nproc=True)
        cfg["scale"] = scale
    elif Path(scale).is_dir():
        _import_series_run(Path(scale), cfg)
        cfg["scale"] = Path(scale).resolve().name
    else:
        raise ConfigError(
            f"unknown scale {scale!r}; allowed: {closest_first(scale, scales)} "
            "(or a directory with the series' model.json + train.json)"
        )

    cfg["interventions"] = _split_interventions(intervention)
    for name in cfg["interventions"]:
        path = config.PARAMETERS_DIR / "interventions" / f"{name}.yaml"
        apply_delta(cfg, _read_yaml(path), source=f"{_named(path)}: ", allow_nproc=False)

    if seed is not None:
        cfg["train"]["random_seed"] = coerce("seed", seed, int, text=True)
    if overrides:
        apply_delta(cfg, _parse_overrides(overrides), source="overrides: ", allow_nproc=True, text=True)
    if nproc is not None:
        cfg["nproc"] = coerce("nproc", nproc, int | str, text=True)
    return RunConfig.from_dict(cfg)


def load_config(path: str | Path) -> RunConfig:
    """Read a ``config.yaml`` written by :meth:`RunConfig.to_yaml` and validate it again."""
    path = Path(path)
    data = _read_yaml(path)
    source = f"{_named(path)}: "
    top = [f.name for f in dataclasses.fields(RunConfig)]
    for key in data:
        if key not in top:
            raise ConfigError(f"{source}unknown key {key!r}; allowed: {closest_first(str(key), top)}")
    cfg = RunConfig().to_dict()
    apply_delta(
        cfg,
        {k: v for k, v in data.items() if k in [*SECTIONS, "nproc"]},
        source=source,
        allow_nproc=True,
    )
    cfg["scale"] = data.get("scale", cfg["scale"])
    cfg["interventions"] = data.get("interventions") or []
    try:
        return RunConfig.from_dict(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}{e}") from None


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write ``cfg`` as YAML to ``path`` atomically (temp file + rename); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(cfg.to_yaml())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _resolved_precision(precision: str, device_type: str) -> str:
    """``auto`` as the launcher resolved it on the run's device type, when this machine can tell
    (else ``auto`` stays); other precisions as they are."""
    if precision != "auto" or (device_type == "cuda" and not torch.cuda.is_available()):
        return precision
    try:
        return resolve_precision(precision, torch.device(device_type))
    except Exception:  # an unknown device type
        return precision


def baseline_changes(cfg: RunConfig, device_type: str = "cpu") -> list[tuple[str, Any, Any]] | None:
    """(key, baseline value, run value) for every model/train/eval setting of ``cfg`` that differs
    from its scale's baseline (precision ``auto`` resolved for ``device_type`` as the launcher
    does); None when the scale is not a preset of this checkout."""
    try:
        base = resolve_config(cfg.scale)
    except ConfigError:
        return None
    base.train.precision = _resolved_precision(base.train.precision, device_type)
    skip = {"scale", "interventions", "nproc"}
    return [change for change in config_changes(base, cfg) if change[0] not in skip]
