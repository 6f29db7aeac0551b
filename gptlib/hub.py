"""Hugging Face Hub: datasets in, a run's model out, any GPT-2 checkpoint in.

* Datasets: ``dataset: hf:<owner>/<name>`` resolves in :func:`gptlib.sources.resolve_dataset` (its two
  token files, downloaded once per machine into ``$GPTLIB_CACHE``; ``HF_HUB_OFFLINE`` honoured).
* Models out: :func:`publish_run` assembles ``model.safetensors``, ``config.json`` and a model card
  ``README.md`` from a run directory and uploads the folder (``gptlib publish``).
* Models in: :func:`load_model` builds a :class:`~gptlib.model.GPTModel` from a local folder or a
  Hub repo holding this project's layout, the series' layout (``model.json``) or the Hugging Face
  ``gpt2`` transformers layout (OpenAI's GPT-2 weights), detected from the files.

A token comes only from the environment (``HF_TOKEN``) or ``hf auth login``: no function here takes
one, and none is ever written to a file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptlib import checkpoint as ckpt
from gptlib.config import ConfigError, ModelConfig, RunConfig, apply_delta, config_changes
from gptlib.data import DataError
from gptlib.device import pick_device, resolve_precision
from gptlib.display import format_duration
from gptlib.evals import EvalResult, evaluate_model
from gptlib.model import GPTModel, count_parameters
from gptlib.presets import load_config, resolve_config
from gptlib.sources import env_true, open_tokenizer
from gptlib.tokenizer import BPE_FILE, BPETokenizer, GPT2Tokenizer, Tokenizer

__all__ = [
    "HubError",
    "load_model",
    "model_folder",
    "detect_layout",
    "gpt2_model_config",
    "gpt2_state_dict",
    "evaluate_source",
    "build_folder",
    "model_card",
    "publish_run",
    "load_tokenizer",
    "upload",
]

WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
# What a model download fetches: the config files of every layout and the safetensors weights.
MODEL_PATTERNS = ["config.json", "model.json", "config.yaml", WEIGHTS, SHARD_INDEX, "model-*.safetensors",
                  BPE_FILE]
PUBLISH_FILES = ("model.safetensors", "config.json", "README.md", "loss.png", "loss.html", BPE_FILE)
GPTLIB_MODEL_TYPE = "gptlib"
PROJECT_URL = "https://github.com/gpjt/ddp-base-model-from-scratch"  # the series' code
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+|[A-Za-z0-9][\w.-]*")


class HubError(DataError):
    """A model source or Hub transfer that cannot work: says which file or repo and why."""


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or env_true("HF_HUB_OFFLINE")


# ---------------------------------------------------------------------------------------------
# Models in: source -> folder -> layout -> GPTModel
# ---------------------------------------------------------------------------------------------


def model_folder(source: str | Path, revision: str | None = None, cache_dir: Path | None = None) -> Path:
    """A local folder as it is, or a Hub model repo id (optionally ``hf:``-prefixed) downloaded
    into the Hugging Face cache (only config and safetensors files; the cache alone when
    ``HF_HUB_OFFLINE`` is set)."""
    text = str(source)
    path = Path(text).expanduser()
    if not text.startswith("hf:") and path.exists():
        if not path.is_dir():
            raise HubError(f"model source {path} is a file; give the folder that holds it")
        return path
    repo_id = text.removeprefix("hf:")
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise HubError(f"model source {text!r} is neither an existing folder nor a Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download

    offline = _offline()
    try:
        folder = snapshot_download(
            repo_id=repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=MODEL_PATTERNS,
            local_files_only=offline,
        )
    except Exception as e:
        if offline:
            raise HubError(
                f"model {repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
                f"download it while online (hf download {repo_id} config.json model.safetensors) "
                "or unset HF_HUB_OFFLINE (no local folder of that name either)"
            ) from e
        raise HubError(
            f"could not download model {repo_id} (no local folder of that name either): {_first_line(e)}"
        ) from e
    return Path(folder)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HubError(f"{path}: not readable JSON ({_first_line(e)})") from e
    if not isinstance(data, dict):
        raise HubError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _is_checkpoint_dir(folder: Path) -> bool:
    return (folder / "meta.json").is_file() and (folder.parent.parent / "config.yaml").is_file() \
        and folder.parent.name == "checkpoints"


def detect_layout(folder: Path) -> str:
    """``run`` (a run directory), ``checkpoint`` (a run's ``checkpoints/step-N``), ``gptlib``
    (config.json from ``publish``, or config.yaml beside the weights), ``series`` (model.json) or
    ``gpt2`` (a transformers GPT-2 config.json); a HubError names what was found otherwise."""
    folder = Path(folder)
    if (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir():
        return "run"
    if _is_checkpoint_dir(folder):
        return "checkpoint"
    if (folder / "config.json").is_file():
        model_type = _read_json(folder / "config.json").get("model_type", GPTLIB_MODEL_TYPE)
        if model_type == "gpt2":
            return "gpt2"
        if model_type == GPTLIB_MODEL_TYPE:
            return "gptlib"
        raise HubError(
            f"{folder / 'config.json'}: model_type {model_type!r} is not supported; "
            "allowed: gpt2 (Hugging Face GPT-2) or gptlib"
        )
    if (folder / "model.json").is_file():
        return "series"
    if (folder / "config.yaml").is_file():
        return "gptlib"
    found = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
    raise HubError(
        f"{folder}: unknown model layout (found {found}); expected model.safetensors with config.json "
        "(gptlib publish or Hugging Face gpt2) or model.json (the series), or a gptlib run directory"
    )


def _model_config(values: dict[str, Any], source: str) -> ModelConfig:
    """A validated ModelConfig from model keys (unknown keys and bad values name ``source``)."""
    cfg = RunConfig().to_dict()
    try:
        apply_delta(cfg, {"model": values}, source=f"{source}: ", allow_nproc=False)
        return RunConfig.from_dict(cfg).model
    except ConfigError as e:
        raise HubError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors (or of the shards a model.safetensors.index.json lists)."""
    try:
        if (folder / WEIGHTS).is_file():
            return load_file(str(folder / WEIGHTS))
        if (folder / SHARD_INDEX).is_file():
            shards = sorted(set(_read_json(folder / SHARD_INDEX).get("weight_map", {}).values()))
            if any(Path(str(shard)).name != shard for shard in shards):
                raise HubError(f"{folder / SHARD_INDEX}: shard names must be file names in {folder}")
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_file(str(folder / shard)))
            return state
    except (OSError, SafetensorError) as e:
        raise HubError(f"{folder}: cannot read the safetensors weights ({_first_line(e)})") from e
    pickles = [p.name for p in folder.glob("*.bin")]
    hint = f" (only {', '.join(pickles)}: convert it to safetensors)" if pickles else ""
    raise HubError(f"{folder}: no {WEIGHTS}{hint}")


def _tied_from_file(state: dict[str, torch.Tensor]) -> bool:
    """A file that stores the shared embedding once (under either name) comes from a tied model."""
    return ("out_head.weight" in state) != ("tok_emb.weight" in state)


def _load_state(model: GPTModel, state: dict[str, torch.Tensor], source: str) -> GPTModel:
    """Strict load with a one-line error naming missing, unexpected and mis-shaped tensors."""
    state = {k: v for k, v in state.items() if not k.endswith(".att.mask")}  # the book's buffers
    if model.cfg.tie_weights:
        for name, twin in (("out_head.weight", "tok_emb.weight"), ("tok_emb.weight", "out_head.weight")):
            if name not in state and twin in state:
                state[name] = state[twin]
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected),
                                      ("shape", shapes)) if items]
        raise HubError(f"{source}: the weights do not fit the model config ({'; '.join(parts)})")
    model.load_state_dict(state, strict=True)
    return model


def _build(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str) -> GPTModel:
    with torch.random.fork_rng(devices=[]):  # building the model leaves the global RNG alone
        model = GPTModel(cfg)
    return _load_state(model, state, source)


# --- the Hugging Face transformers GPT-2 layout


def gpt2_model_config(config: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The ModelConfig of a transformers ``GPT2Config`` dict; refuses variants this model cannot
    compute (other activations, layer-norm epsilon, MLP width or attention scaling)."""
    if config.get("model_type") != "gpt2":
        raise HubError(f"{source}: model_type {config.get('model_type')!r} is not gpt2")
    emb = config.get("n_embd", 768)
    checks = [
        (config.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
         f"activation_function {config.get('activation_function')!r} (allowed: gelu_new)"),
        (math.isclose(config.get("layer_norm_epsilon", 1e-5), 1e-5, rel_tol=1e-6),
         f"layer_norm_epsilon {config.get('layer_norm_epsilon')} (allowed: 1e-05)"),
        (config.get("n_inner") in (None, 4 * emb), f"n_inner {config.get('n_inner')} (allowed: 4 x n_embd)"),
        (config.get("scale_attn_weights", True), "scale_attn_weights false"),
        (not config.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx true"),
        (not config.get("add_cross_attention", False), "add_cross_attention true"),
    ]
    for ok, what in checks:
        if not ok:
            raise HubError(f"{source}: unsupported GPT-2 variant: {what}")
    values = {
        "vocab_size": config.get("vocab_size", 50257),
        "context_length": config.get("n_positions", config.get("n_ctx", 1024)),
        "emb_dim": emb,
        "n_heads": config.get("n_head", 12),
        "n_layers": config.get("n_layer", 12),
        "drop_rate": float(config.get("resid_pdrop", 0.1)),
        "qkv_bias": True,  # c_attn has a bias
        "tie_weights": bool(config.get("tie_word_embeddings", True)),
    }
    return _model_config(values, source)


def gpt2_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig, source: str = "model.safetensors",
                    ) -> dict[str, torch.Tensor]:
    """transformers GPT-2 tensors (``transformer.``-prefixed or not) under the book's names.

    Conv1D weights are stored [in, out] and are transposed; the fused ``c_attn`` is split into
    W_query / W_key / W_value (weights and biases); ``attn.bias`` / ``attn.masked_bias`` buffers
    are dropped; ``lm_head.weight`` becomes ``out_head.weight`` (absent when tied)."""
    names = {}
    for key, value in hf.items():
        name = key.removeprefix("transformer.")
        if not re.fullmatch(r"h\.\d+\.attn\.(bias|masked_bias)", name):
            names[name] = value

    def take(name: str) -> torch.Tensor:
        if name not in names:
            raise HubError(f"{source}: GPT-2 tensor {name} is missing")
        return names.pop(name)

    def conv(name: str) -> torch.Tensor:
        return take(name).t().contiguous()

    state = {"tok_emb.weight": take("wte.weight"), "pos_emb.weight": take("wpe.weight")}
    for i in range(cfg.n_layers):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        queries, keys, values = conv(h + "attn.c_attn.weight").chunk(3, dim=0)
        q_bias, k_bias, v_bias = take(h + "attn.c_attn.bias").chunk(3, dim=0)
        for proj, weight, bias in (("W_query", queries, q_bias), ("W_key", keys, k_bias),
                                   ("W_value", values, v_bias)):
            state[f"{b}att.{proj}.weight"], state[f"{b}att.{proj}.bias"] = weight, bias
        state[b + "att.out_proj.weight"] = conv(h + "attn.c_proj.weight")
        state[b + "att.out_proj.bias"] = take(h + "attn.c_proj.bias")
        state[b + "ff.layers.0.weight"] = conv(h + "mlp.c_fc.weight")
        state[b + "ff.layers.0.bias"] = take(h + "mlp.c_fc.bias")
        state[b + "ff.layers.2.weight"] = conv(h + "mlp.c_proj.weight")
        state[b + "ff.layers.2.bias"] = take(h + "mlp.c_proj.bias")
        for norm, ln in (("norm1", "ln_1"), ("norm2", "ln_2")):
            state[f"{b}{norm}.scale"] = take(f"{h}{ln}.weight")
            state[f"{b}{norm}.shift"] = take(f"{h}{ln}.bias")
    state["final_norm.scale"], state["final_norm.shift"] = take("ln_f.weight"), take("ln_f.bias")
    head = names.pop("lm_head.weight", None)
    if head is not None:
        state["out_head.weight"] = head
    elif not cfg.tie_weights:
        raise HubError(f"{source}: lm_head.weight is missing and config.json says tie_word_embeddings false")
    if names:
        extra = sorted(names)
        raise HubError(f"{source}: unexpected GPT-2 tensors {', '.join(extra[:4])}"
                       f"{' ...' if len(extra) > 4 else ''} (more layers than n_layer?)")
    return state


# --- loading


def _load_folder(folder: Path, layout: str, checkpoint: str) -> GPTModel:
    if layout == "run":
        cfg = load_config(folder / "config.yaml")
        path = ckpt.resolve_checkpoint(folder, checkpoint)
        ckpt.verify_checkpoint(path)
        return _build(cfg.model, _read_weights(path), str(path))
    if layout == "checkpoint":
        ckpt.verify_checkpoint(folder)
        cfg = load_config(folder.parent.parent / "config.yaml")
        return _build(cfg.model, _read_weights(folder), str(folder))
    state = _read_weights(folder)
    if layout == "gpt2":
        model_cfg = gpt2_model_config(_read_json(folder / "config.json"), str(folder / "config.json"))
        return _build(model_cfg, gpt2_state_dict(state, model_cfg, str(folder / WEIGHTS)), str(folder))
    if layout == "series":
        values = _read_json(folder / "model.json")
        if "tie_weights" not in values and _tied_from_file(state):
            values["tie_weights"] = True
        return _build(_model_config(values, str(folder / "model.json")), state, str(folder))
    if (folder / "config.json").is_file():  # gptlib publish
        values = _read_json(folder / "config.json")
        values.pop("model_type", None)
        return _build(_model_config(values, str(folder / "config.json")), state, str(folder))
    return _build(load_config(folder / "config.yaml").model, state, str(folder))


def load_model(
    source: str | Path,
    checkpoint: str = "best",
    device: torch.device | str = "cpu",
    revision: str | None = None,
    cache_dir: Path | None = None,
) -> GPTModel:
    """A GPTModel in eval mode from a local folder or a Hub model repo id.

    The folder holds one of: a gptlib run directory (``checkpoint`` picks best / latest /
    step-N) or one of its checkpoint directories; ``model.safetensors`` + ``config.json`` from
    :func:`publish_run`; the series' ``model.json`` + ``model.safetensors`` (book names, the
    book's ``att.mask`` buffers ignored); or a transformers GPT-2 ``config.json`` +
    ``model.safetensors`` (OpenAI's ``openai-community/gpt2`` and its kin), converted. Building the
    model does not consume the global RNG.
    """
    folder = model_folder(source, revision, cache_dir)
    model = _load_folder(folder, detect_layout(folder), checkpoint)
    return model.to(device).eval()


def load_tokenizer(source: str | Path, revision: str | None = None,
                   cache_dir: Path | None = None) -> Tokenizer:
    """The tokenizer of a model source: the run's dataset tokenizer for a run directory, the
    `tokenizer.json` a published folder or repo ships (a fitted BPE), else GPT-2."""
    folder = model_folder(source, revision, cache_dir)
    if (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir():
        return open_tokenizer(load_config(folder / "config.yaml").train.dataset)
    if (folder / BPE_FILE).is_file():
        return BPETokenizer.from_file(folder / BPE_FILE)
    return GPT2Tokenizer()


def evaluate_source(
    source: str | Path,
    scale: str,
    checkpoint: str = "best",
    batches: int | None = None,
    device: torch.device | str | None = None,
) -> EvalResult:
    """Test loss and smoke test of any model source on the test slice of ``scale`` (its dataset,
    eval settings, context length and precision); nothing is written. Returns an EvalResult whose
    ``eval_checkpoint`` is the source."""
    cfg = resolve_config(scale)
    device = pick_device(cfg.train.device) if device is None else torch.device(device)
    model = load_model(source, checkpoint, device)
    return evaluate_model(model, cfg, batches, label=str(source))


# ---------------------------------------------------------------------------------------------
# Models out: a run -> folder (weights, config.json, model card) -> the Hub
# ---------------------------------------------------------------------------------------------


def _check_repo_id(repo_id: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo_id) or ".." in repo_id:
        raise HubError(f"repo id {repo_id!r} must be <owner>/<name> (letters, digits, '-', '_', '.')")


def _resolved_precision(precision: str, device_type: str) -> str:
    """``auto`` as the launcher resolved it on the run's device type, when this machine can tell
    (else ``auto`` stays); other precisions as they are."""
    if precision != "auto" or (device_type == "cuda" and not torch.cuda.is_available()):
        return precision
    try:
        return resolve_precision(precision, torch.device(device_type))
    except Exception:  # an unknown device type
        return precision


def config_diff(cfg: RunConfig, device_type: str = "cpu") -> list[tuple[str, Any, Any]] | None:
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


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _png(fig: Any) -> tuple[bytes | None, str | None]:
    """(PNG bytes, None) through plotly's static exporter, or (None, why it is unavailable)."""
    if importlib.util.find_spec("kaleido") is None:
        return None, "the static image exporter kaleido is not installed"
    try:
        return fig.to_image(format="png", width=1000, height=460), None
    except Exception as e:  # e.g. kaleido without the browser it drives
        return None, f"static image export failed: {_first_line(e)}"


def _chart(run_dir: Path, folder: Path) -> str:
    """Write loss.png or, when no PNG can be made, loss.html; returns the card's markdown for it."""
    from gptlib.charts import loss_chart

    if not (run_dir / "metrics.jsonl").is_file():
        return "No chart: the run directory has no metrics.jsonl."
    fig = loss_chart(run_dir)
    png, why = _png(fig)
    if png is None:
        fig.write_html(folder / "loss.html", include_plotlyjs="cdn", include_mathjax=False)
        return f"No PNG here ({why}); the interactive chart is [loss.html](loss.html)."
    (folder / "loss.png").write_bytes(png)
    return "![Training loss: per step, checkpoint-period min-max band and average](loss.png)"


def _num(value: Any, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def model_card(repo_id: str, checkpoint: str, cfg: RunConfig, summary: dict[str, Any],
               n_params: int, chart: str, tokenizer: Tokenizer | None = None) -> str:
    """The README.md of a published run: what was trained, how it did, how to load it."""
    m, t = cfg.model, cfg.train
    tokenizer = GPT2Tokenizer() if tokenizer is None else tokenizer
    fitted = isinstance(tokenizer, BPETokenizer)
    tokenizer_note = " (fitted to the training data; `tokenizer.json` in this repo)" if fitted else ""
    files_note = f" and `{BPE_FILE}` (the tokenizer, Hugging Face `tokenizers` format)" if fitted else ""
    names = " + ".join(cfg.interventions) or "none (the scale's baseline)"
    dataset = t.dataset.removeprefix("hf:") if t.dataset.startswith("hf:") else None
    front = {"library_name": "gptlib", "pipeline_tag": "text-generation",
             "tags": ["gptlib", "gpt2", "from-scratch", *cfg.interventions]}
    if dataset:
        front["datasets"] = [dataset]
    evaluated = summary.get("eval_checkpoint")
    test = "not measured yet (run `gptlib eval RUN_DIR` before publishing)"
    if summary.get("test_loss") is not None:
        test = (f"{summary['test_loss']:.6f} (checkpoint {evaluated}, "
                f"{_num(summary.get('eval_batches'), ',')} batches, {_num(summary.get('eval_tokens'), ',')} "
                f"tokens, {summary.get('eval_precision', '?')})")
        if evaluated != checkpoint:
            test += f"; the published weights are {checkpoint}"
    wall = summary.get("wall_time_s")
    rows = [
        ("Test loss", test),
        ("Final train loss", _num(summary.get("final_train_loss"), ".3f")),
        ("Tokens seen", _num(summary.get("tokens_seen"), ",")),
        ("Wall time", "n/a" if wall is None else f"{wall:.2f} s ({format_duration(wall)})"),
        ("Throughput", _num(summary.get("tokens_per_s"), ",.0f", " tokens/s")),
        ("MFU", "n/a" if summary.get("mfu") is None else f"{100 * summary['mfu']:.1f}%"),
        ("Hardware", f"world size {summary.get('world_size', '?')}, device {summary.get('device', '?')} "
                     f"(rank 0), precision {summary.get('precision', t.precision)}"),
        ("Best checkpoint", f"step-{summary['best_step']}" if summary.get("best_step") else "n/a"),
        ("Loss spikes / skipped steps", f"{summary.get('spike_count', 'n/a')} / "
                                        f"{summary.get('skipped_steps', 'n/a')}"),
        ("Run status", str(summary.get("status", "unknown"))),
    ]
    diff = config_diff(cfg, str(summary.get("device", "cpu")).split(":")[0])
    if diff is None:
        changes = f"Scale `{cfg.scale}` is not a preset of this checkout, so no baseline to compare."
    elif not diff:
        changes = f"None: this is the `{cfg.scale}` baseline configuration."
    else:
        changes = "| setting | baseline | this run |\n|---|---|---|\n" + "\n".join(
            f"| `{k}` | `{_yaml_value(b)}` | `{_yaml_value(v)}` |" for k, b, v in diff)
    versions = summary.get("versions") or {}
    software = ", ".join(f"{k} {v}" for k, v in versions.items() if v) or "unknown"
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {repo_id.split('/')[-1]}

A GPT-2-style base model trained from scratch with **gptlib**, which reproduces Giles Thomas's
"Writing an LLM from scratch, part 32" interventions series ([code]({PROJECT_URL})) on the
`GPTModel` of Sebastian Raschka's *Build a Large Language Model (from Scratch)*.

- Run: `{cfg.scale}/{cfg.run_name}`; interventions: {names}; seed {t.random_seed}
- Model: {n_params:,} parameters; {m.n_layers} layers, {m.n_heads} heads, embedding {m.emb_dim},
  context {m.context_length}, vocabulary {m.vocab_size}, dropout {m.drop_rate}, qkv bias {m.qkv_bias},
  tied embeddings {m.tie_weights}
- Weights: checkpoint `{checkpoint}` of the run
- Data: `{t.dataset}`, tokenizer {tokenizer.name}{tokenizer_note}

## Results

| | |
|---|---|
{table}

## Configuration

Differences from the `{cfg.scale}` baseline (scale preset, no interventions):

{changes}

<details><summary>Full config.yaml</summary>

```yaml
{cfg.to_yaml().strip()}
```

</details>

## Training loss

{chart}

## Use

```python
from gptlib.hub import load_model
from gptlib.hub import load_model, load_tokenizer
from gptlib.evals import generate
import torch

model = load_model("{repo_id}")  # a gptlib GPTModel (the book's parameter names), eval mode
tokenizer = load_tokenizer("{repo_id}")  # {tokenizer.name}
prompt = torch.tensor([tokenizer.encode({cfg.eval.smoke_prompt!r})])
ids = generate(model, prompt, {cfg.eval.smoke_tokens}, top_k={cfg.eval.smoke_top_k},
               temperature={cfg.eval.smoke_temperature}, n_vocab=tokenizer.n_vocab)
print(tokenizer.decode(ids[0]))
```

Files: `model.safetensors` (the book's parameter names; a tied head is stored once),
`config.json` (the model config: `model_type` "{GPTLIB_MODEL_TYPE}" and gptlib's `ModelConfig`){files_note}.
Score it on another test set with `gptlib eval {repo_id} --scale <scale>`.

Software: {software}; git commit {summary.get('git_commit') or 'unknown'}.
"""


def build_folder(run_dir: str | Path, repo_id: str, checkpoint: str = "best", out: str | Path | None = None,
                 ) -> Path:
    """Write a run's upload folder (default ``RUN_DIR/publish``): model.safetensors, config.json,
    README.md and loss.png (or loss.html). Refuses a folder holding other files."""
    run_dir = Path(run_dir)
    _check_repo_id(repo_id)
    if not (run_dir / "config.yaml").is_file():
        raise HubError(f"{run_dir} is not a run directory (it has no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    path = ckpt.resolve_checkpoint(run_dir, checkpoint)
    ckpt.verify_checkpoint(path)
    folder = run_dir / "publish" if out is None else Path(out)
    if folder.exists():
        others = sorted(p.name for p in folder.iterdir() if p.name not in PUBLISH_FILES)
        if others:
            raise HubError(f"{folder} holds other files ({', '.join(others[:4])}); choose an empty --out")
    folder.mkdir(parents=True, exist_ok=True)
    for name in PUBLISH_FILES:
        (folder / name).unlink(missing_ok=True)
    state = load_file(str(path / ckpt.MODEL_FILE))
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    config = {"model_type": GPTLIB_MODEL_TYPE, **dataclasses.asdict(cfg.model)}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    chart = _chart(run_dir, folder)
    n_params = count_parameters(_build(cfg.model, state, str(path)))
    try:
        tokenizer = open_tokenizer(cfg.train.dataset)
    except DataError as e:  # the dataset is not on this machine: fine for GPT-2 tokens
        if summary.get("tokenizer", "gpt2") != "gpt2":
            raise HubError(f"cannot publish {run_dir}: its tokenizer ({summary['tokenizer']}) is the "
                           f"tokenizer.json of dataset {cfg.train.dataset}, which is not available "
                           f"here ({e})") from None
        tokenizer = GPT2Tokenizer()
    if isinstance(tokenizer, BPETokenizer):
        tokenizer.save(folder / BPE_FILE)
    card = model_card(repo_id, path.name, cfg, summary, n_params, chart, tokenizer)
    (folder / "README.md").write_text(card)
    return folder


def upload(folder: str | Path, repo_id: str, private: bool = False, message: str | None = None) -> str:
    """Create the model repo if needed (``private`` applies to a new repo) and upload ``folder``;
    returns the repo URL. Authenticates with HF_TOKEN or the ``hf auth login`` token."""
    from huggingface_hub import HfApi

    _check_repo_id(repo_id)
    if _offline():
        raise HubError(f"HF_HUB_OFFLINE is set: cannot upload {folder} to {repo_id} (use --dry-run)")
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=message or "Upload a gptlib run")
    except Exception as e:  # authentication, network, permissions ...
        raise HubError(f"could not upload {folder} to {repo_id}: {_first_line(e)}") from e
    return f"https://huggingface.co/{repo_id}"


def publish_run(
    run_dir: str | Path,
    repo_id: str,
    checkpoint: str = "best",
    private: bool = False,
    dry_run: bool = False,
    out: str | Path | None = None,
) -> Path:
    """Build the upload folder of a run's checkpoint (:func:`build_folder`) and, unless
    ``dry_run``, upload it to model repo ``repo_id``; returns the folder."""
    folder = build_folder(run_dir, repo_id, checkpoint, out)
    if not dry_run:
        cfg = load_config(Path(run_dir) / "config.yaml")
        upload(folder, repo_id, private, f"Upload {cfg.scale}/{cfg.run_name} ({checkpoint}) with gptlib")
    return folder

