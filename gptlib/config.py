"""What a run configuration is: the dataclasses, the one type-coercion pass and the value checks.

gptlib.presets builds one from the YAML presets, a series run folder or overrides, and reads and
writes ``config.yaml``. The defaults are the baseline of Giles Thomas's "Writing an LLM from
scratch, part 32" series (GPT-2 small, AdamW lr 4e-4, weight decay 0.1, fp16 AMP, seed 42).

Every problem raises :class:`ConfigError` with a one-line message that names the bad key, value or
file and lists what is allowed, closest match first -- before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gptlib.data import global_batch_tokens
from gptlib.paths import REPO_ROOT

__all__ = [
    "ConfigError",
    "ModelConfig",
    "TrainConfig",
    "EvalConfig",
    "RunConfig",
    "PARAMETERS_DIR",
    "PRECISIONS",
    "DEVICES",
    "check_world_size",
    "validate",
]

PARAMETERS_DIR = Path(
    os.environ.get("GPTLIB_PARAMETERS", REPO_ROOT / "parameters")
)
PRECISIONS = ("fp16", "bf16", "fp32", "auto")
DEVICES = ("auto", "cpu", "cuda")
PROTOCOLS = ("gptlib", "series")
EVAL_CHECKPOINTS = ("best", "latest")


class ConfigError(ValueError):
    """A bad configuration: unknown name or key, wrong type, impossible value, unreadable file."""


# --------------------------------------------------------------------------------------------------
# The configuration dataclasses (defaults = the series' baseline)


@dataclass
class ModelConfig:
    """GPT-2 small, as in Raschka's book; key names match the series' model.json."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    tie_weights: bool = False  # share out_head's weight with tok_emb

    def check(self) -> None:
        _at_least_one("model", self, ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"))
        _require(0 <= self.drop_rate < 1, f"model.drop_rate={self.drop_rate} must be in [0, 1)")
        _require(self.emb_dim % self.n_heads == 0,
                 f"model.emb_dim={self.emb_dim} is not divisible by model.n_heads={self.n_heads}")


@dataclass
class TrainConfig:
    """Optimisation and data; key names follow the series' train.json."""

    dataset: str = "builtin:python-stdlib"  # builtin:<name> | hf:<repo> | a local directory
    microbatch_size: int = 12  # sequences per rank per forward pass
    gradient_accumulation_steps: int = 1
    global_batch_size: int | None = None  # if set: microbatch x world size x GA must equal it
    checkpoint_interval: int = 617  # optimizer steps
    min_train_tokens: int = 3_260_190_720  # rounded up to whole global batches; -1 = all
    start_train_token: int = 0
    clipping_max_norm: float | None = None  # None = no clipping
    learning_rate: float = 4e-4  # the peak when scheduled
    schedule_learning_rate: bool = False  # linear warmup then cosine decay to peak / 10
    warmup_period_percent: float = 5.0
    weight_decay: float = 0.1
    weight_decay_matrices_only: bool = False  # False: one group, decay on every parameter
    random_seed: int = 42  # seeds model initialisation (and everything, unless training_seed)
    training_seed: int | None = None  # if set, re-seeded after the model is built
    precision: str = "fp16"  # fp16 | bf16 | fp32 | auto (bf16 where supported, else fp32)
    compile: bool | None = None  # None = torch.compile on CUDA only
    device: str = "auto"  # auto | cpu | cuda
    max_nonfinite_steps: int = 20  # abort after this many consecutive skipped steps
    log_interval: int = 10  # progress line every N optimizer steps
    spike_window: int = 50  # loss-spike detection: rolling window (steps) ...
    spike_threshold: float = 6.0  # ... and threshold in rolling-MAD multiples
    collective_timeout_s: int = 600  # a rank silent this long stops the whole job
    keep_checkpoints: int = -1  # -1 = keep all; N = keep the newest N (and always the best)
    # gptlib | series: "series" follows the series' code where gptlib's own choice differs
    # (checkpoint steps, rank-0 period losses, cosine end, no abort, fp16 test loss, fp32 sampling)
    protocol: str = "gptlib"

    def check(self) -> None:
        _at_least_one("train", self, ("microbatch_size", "gradient_accumulation_steps",
                                      "checkpoint_interval", "max_nonfinite_steps", "log_interval",
                                      "spike_window", "collective_timeout_s"))
        _require(bool(self.dataset.strip()), "train.dataset must not be empty")
        _require(self.min_train_tokens == -1 or self.min_train_tokens >= 1,
                 f"train.min_train_tokens={self.min_train_tokens} must be -1 (all available) or >= 1")
        _require(self.start_train_token >= 0,
                 f"train.start_train_token={self.start_train_token} must be >= 0")
        _require(self.learning_rate > 0, f"train.learning_rate={self.learning_rate} must be > 0")
        _require(self.weight_decay >= 0, f"train.weight_decay={self.weight_decay} must be >= 0")
        _require(0 <= self.warmup_period_percent <= 100,
                 f"train.warmup_period_percent={self.warmup_period_percent} must be in [0, 100]")
        _require(self.clipping_max_norm is None or self.clipping_max_norm > 0,
                 f"train.clipping_max_norm={self.clipping_max_norm} must be > 0 (or null for no clipping)")
        _require(self.spike_threshold > 0, f"train.spike_threshold={self.spike_threshold} must be > 0")
        _require(0 <= self.random_seed < 2**63,
                 f"train.random_seed={self.random_seed} must be in [0, 2**63) (torch seeds are 64-bit)")
        _require(self.training_seed is None or self.training_seed >= 0,
                 f"train.training_seed={self.training_seed} must be >= 0 (or null)")
        _require(self.keep_checkpoints == -1 or self.keep_checkpoints >= 1,
                 f"train.keep_checkpoints={self.keep_checkpoints} must be -1 (keep all) or >= 1")
        _one_of("train.precision", self.precision, PRECISIONS)
        _one_of("train.device", self.device, DEVICES)
        _one_of("train.protocol", self.protocol, PROTOCOLS)
        if self.global_batch_size is not None:
            per_rank = self.microbatch_size * self.gradient_accumulation_steps
            _require(self.global_batch_size >= 1 and self.global_batch_size % per_rank == 0,
                     f"train.global_batch_size={self.global_batch_size} must be a positive multiple of "
                     f"train.microbatch_size x train.gradient_accumulation_steps = {per_rank}")


@dataclass
class EvalConfig:
    """Test loss on the held-out validation slice and the smoke-test generation."""

    checkpoint: str = "best"  # the checkpoint evaluated after training: best | latest
    start_token: int = 50_000_000
    batches: int = 3200  # -1 = the whole split from start_token
    batch_size: int = 6
    smoke_prompt: str = "Every effort moves you"
    smoke_tokens: int = 20
    smoke_top_k: int = 25  # 0 = no top-k filter
    smoke_temperature: float = 1.4  # 0 = greedy
    smoke_seed: int = 123

    def check(self) -> None:
        _at_least_one("eval", self, ("batch_size", "smoke_tokens"))
        _one_of("eval.checkpoint", self.checkpoint, EVAL_CHECKPOINTS)
        _require(self.start_token >= 0, f"eval.start_token={self.start_token} must be >= 0")
        _require(self.batches == -1 or self.batches >= 1,
                 f"eval.batches={self.batches} must be -1 (the whole split) or >= 1")
        _require(self.smoke_top_k >= 0, f"eval.smoke_top_k={self.smoke_top_k} must be >= 0 (0 = no top-k)")
        _require(self.smoke_temperature >= 0,
                 f"eval.smoke_temperature={self.smoke_temperature} must be >= 0 (0 = greedy)")
        _require(bool(self.smoke_prompt), "eval.smoke_prompt must not be empty")


SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}


@dataclass
class RunConfig:
    """One fully resolved run: scale + interventions + model/train/eval settings."""

    scale: str = "tiny"
    interventions: list[str] = field(default_factory=list)
    nproc: int | str = "auto"  # processes per machine: "auto" or >= 1
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_name(self) -> str:
        """``baseline`` or the interventions joined by ``+``, with ``-seed<N>`` when not 42."""
        name = "+".join(self.interventions) or "baseline"
        if self.train.random_seed != 42:
            name += f"-seed{self.train.random_seed}"
        if self.train.training_seed is not None:
            name += f"-tseed{self.train.training_seed}"
        return name

    def check(self) -> None:
        """Every section's checks, then the run's own (process count, interventions)."""
        for section in SECTIONS:
            getattr(self, section).check()
        _require(self.nproc == "auto" or (isinstance(self.nproc, int) and self.nproc >= 1),
                 f"nproc={self.nproc!r}: not allowed; allowed: 'auto' or an int >= 1")
        duplicates = sorted({n for n in self.interventions if self.interventions.count(n) > 1})
        _require(not duplicates, f"interventions: {', '.join(duplicates)} given more than once")
        if isinstance(self.nproc, int):
            check_world_size(self, self.nproc)

    def tokens_per_step(self, world_size: int) -> int:
        """Tokens per optimizer step: micro-batch x context x accumulation steps x ranks."""
        t = self.train
        return global_batch_tokens(t.microbatch_size, self.model.context_length,
                                   t.gradient_accumulation_steps, world_size)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """The validated config of a nested dict (what :meth:`to_dict` returns)."""
        sections = {name: section(**data[name]) for name, section in SECTIONS.items()}
        top = {k: data[k] for k in ("scale", "interventions", "nproc")}
        return validate(cls(**top, **sections))

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what ``config.yaml`` holds)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """YAML text that :func:`load_config` reads back to an equal config."""
        header = f"# gptlib run config: {self.run_name} (scale {self.scale})\n"
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------------
# Messages


def closest_first(word: str, names: Iterable[str]) -> str:
    """The valid names, closest to ``word`` first, as one comma-separated string."""
    names = list(names)
    same = [n for n in names if n.lower() == word.lower()]  # "Baseline" -> baseline first
    close = same + [n for n in difflib.get_close_matches(word.lower(), names, n=len(names), cutoff=0.5)
                    if n not in same]
    return ", ".join(close + sorted(n for n in names if n not in close))


def one_line(text: object) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------------------------------
# Types: check (and gently coerce) one value against a dataclass field's annotation

_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_TYPE_NAMES = {type(None): "null", bool: "bool", int: "int", float: "float", str: "str"}


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """``{field name: annotation}`` of a config dataclass, in declaration order."""
    return typing.get_type_hints(cls)


def _arms(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _fit(value: Any, arm: Any) -> tuple[bool, Any]:
    """Whether ``value`` is of type ``arm`` (bool is not an int; float takes ints and '4e-4')."""
    if arm is type(None):
        return value is None, None
    if arm is bool:
        return type(value) is bool, value
    if arm is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if arm is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok and math.isfinite(value), float(value) if ok else value
    if arm is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported config type {arm!r}")


def coerce(key: str, value: Any, tp: Any, text: bool = False) -> Any:
    """``value`` checked against ``tp``; with ``text``, a str is read as YAML first ('4' -> 4)."""
    arms = _arms(tp)
    candidates = [value]
    if text and isinstance(value, str):
        try:
            candidates.insert(0, yaml.safe_load(value))
        except yaml.YAMLError:
            pass
    for candidate in candidates:
        for arm in arms:
            ok, converted = _fit(candidate, arm)
            if ok:
                return converted
    expected = " or ".join(_TYPE_NAMES[a] for a in arms)
    raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def set_key(
    cfg: dict[str, Any], section: str, key: str, value: Any, *, source: str, text: bool = False
) -> None:
    """Set ``cfg[section][key]`` after checking the key exists and the value's type."""
    fields = field_types(SECTIONS[section])
    if key not in fields:
        elsewhere = [s for s, cls in SECTIONS.items() if key in field_types(cls)]
        hint = f" (it is a key of {elsewhere[0]}: {elsewhere[0]}.{key})" if elsewhere else ""
        raise ConfigError(
            f"{source}{section}.{key}: unknown key{hint}; "
            f"allowed keys of {section}: {closest_first(key, fields)}"
        )
    try:
        cfg[section][key] = coerce(f"{section}.{key}", value, fields[key], text)
    except ConfigError as e:
        raise ConfigError(f"{source}{e}") from None


def apply_delta(
    cfg: dict[str, Any],
    delta: Mapping[str, Any],
    *,
    source: str,
    allow_nproc: bool,
    text: bool = False,
) -> None:
    """Merge a ``{section: {key: value}}`` delta (scale, intervention, overrides) into ``cfg``."""
    allowed = [*SECTIONS, "nproc"] if allow_nproc else list(SECTIONS)
    for section, values in delta.items():
        if section == "nproc" and allow_nproc:
            try:
                cfg["nproc"] = coerce("nproc", values, int | str, text)
            except ConfigError as e:
                raise ConfigError(f"{source}{e}") from None
            continue
        if section not in SECTIONS:
            raise ConfigError(
                f"{source}unknown section {section!r}; allowed: {closest_first(str(section), allowed)}"
            )
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}{section}: expected a mapping of keys, got {values!r}")
        for key, value in values.items():
            set_key(cfg, section, str(key), value, source=source, text=text)


# --------------------------------------------------------------------------------------------------
# Values: impossible settings


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _at_least_one(section: str, part: object, names: tuple[str, ...]) -> None:
    """Sizes and counts that must be >= 1."""
    for name in names:
        value = getattr(part, name)
        _require(value >= 1, f"{section}.{name}={value} must be >= 1")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, f"{key}={value!r}: not allowed; allowed: {closest_first(value, allowed)}")


def _check_types(cfg: RunConfig) -> None:
    for section, cls in SECTIONS.items():
        part = getattr(cfg, section)
        for name, tp in field_types(cls).items():
            setattr(part, name, coerce(f"{section}.{name}", getattr(part, name), tp))
    cfg.nproc = coerce("nproc", cfg.nproc, int | str)
    _require(isinstance(cfg.scale, str) and bool(cfg.scale), f"scale: bad name {cfg.scale!r}")
    names = cfg.interventions
    _require(
        isinstance(names, list) and all(isinstance(n, str) and n for n in names),
        f"interventions: expected a list of names, got {names!r}",
    )




def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(before: RunConfig, after: RunConfig) -> list[tuple[str, Any, Any]]:
    """(dotted key, value before, value after) for every setting that differs, in config order
    (the model card, the stacking table and the resume check all use this)."""
    old, new = _flat(before.to_dict()), _flat(after.to_dict())
    keys = [*old, *(k for k in new if k not in old)]
    return [(k, old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)]


def validate(cfg: RunConfig) -> RunConfig:
    """Check types (coercing int -> float) and values of ``cfg`` in place; return it."""
    _check_types(cfg)
    cfg.check()
    return cfg


def check_world_size(cfg: RunConfig, world_size: int) -> None:
    """Fail unless microbatch x world_size x GA equals ``train.global_batch_size`` (when set)."""
    t = cfg.train
    if t.global_batch_size is None:
        return
    per_step = t.microbatch_size * world_size
    total = per_step * t.gradient_accumulation_steps
    if total == t.global_batch_size:
        return
    if t.global_batch_size % per_step == 0:
        fix = f"set train.gradient_accumulation_steps={t.global_batch_size // per_step}"
    else:
        fix = (
            f"change train.microbatch_size so that it x {world_size} divides "
            f"{t.global_batch_size}, or unset train.global_batch_size"
        )
    raise ConfigError(
        f"train.global_batch_size={t.global_batch_size} but train.microbatch_size "
        f"{t.microbatch_size} x world size {world_size} x train.gradient_accumulation_steps "
        f"{t.gradient_accumulation_steps} = {total}; {fix}"
    )


