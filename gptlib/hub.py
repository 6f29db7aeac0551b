"""Models in: any GPT-2-style checkpoint, from a folder or the Hugging Face Hub.

(Datasets come in through :func:`gptlib.sources.resolve_dataset`; a run's model goes out through
:mod:`gptlib.publish`.) :func:`load_model` builds a :class:`~gptlib.model.GPTModel` from a local
folder or a Hub repo holding this project's layout, the series' layout (``model.json``) or the
Hugging Face ``gpt2`` transformers layout (OpenAI's GPT-2 weights), detected from the files.

A token comes only from the environment (``HF_TOKEN``) or ``hf auth login``: no function takes one.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from gptlib import checkpoint as ckpt
from gptlib.config import ConfigError, ModelConfig, RunConfig, apply_delta
from gptlib.data import DataError
from gptlib.device import pick_device
from gptlib.evals import EvalResult, evaluate_model
from gptlib.model import GPTModel
from gptlib.presets import load_config, resolve_config
from gptlib.rundir import read_json_object
from gptlib.sources import hf_offline, open_tokenizer
from gptlib.tokenizer import BPE_FILE, BPETokenizer, GPT2Tokenizer, Tokenizer

__all__ = [
    "HubError",
    "load_model",
    "model_folder",
    "detect_layout",
    "gpt2_model_config",
    "gpt2_state_dict",
    "evaluate_source",
    "load_tokenizer",
    "build_model",
]

WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
# What a model download fetches: the config files of every layout and the safetensors weights.
MODEL_PATTERNS = ["config.json", "model.json", "config.yaml", WEIGHTS, SHARD_INDEX, "model-*.safetensors",
                  BPE_FILE]
GPTLIB_MODEL_TYPE = "gptlib"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+|[A-Za-z0-9][\w.-]*")


class HubError(DataError):
    """A model source or Hub transfer that cannot work: says which file or repo and why."""


def error_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


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

    cache_only = hf_offline()
    try:
        folder = snapshot_download(
            repo_id=repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=MODEL_PATTERNS,
            local_files_only=cache_only,
        )
    except Exception as e:
        if cache_only:
            raise HubError(
                f"model {repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
                f"download it while online (hf download {repo_id} config.json model.safetensors) "
                "or unset HF_HUB_OFFLINE (no local folder of that name either)"
            ) from e
        raise HubError(
            f"could not download model {repo_id} (no local folder of that name either): {error_line(e)}"
        ) from e
    return Path(folder)


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
        model_type = read_json_object(folder / "config.json", HubError).get("model_type", GPTLIB_MODEL_TYPE)
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
            index = read_json_object(folder / SHARD_INDEX, HubError)
            shards = sorted(set(index.get("weight_map", {}).values()))
            if any(Path(str(shard)).name != shard for shard in shards):
                raise HubError(f"{folder / SHARD_INDEX}: shard names must be file names in {folder}")
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_file(str(folder / shard)))
            return state
    except (OSError, SafetensorError) as e:
        raise HubError(f"{folder}: cannot read the safetensors weights ({error_line(e)})") from e
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


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str) -> GPTModel:
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
        return build_model(cfg.model, _read_weights(path), str(path))
    if layout == "checkpoint":
        ckpt.verify_checkpoint(folder)
        cfg = load_config(folder.parent.parent / "config.yaml")
        return build_model(cfg.model, _read_weights(folder), str(folder))
    state = _read_weights(folder)
    if layout == "gpt2":
        config_file = folder / "config.json"
        model_cfg = gpt2_model_config(read_json_object(config_file, HubError), str(config_file))
        return build_model(model_cfg, gpt2_state_dict(state, model_cfg, str(folder / WEIGHTS)), str(folder))
    if layout == "series":
        values = read_json_object(folder / "model.json", HubError)
        if "tie_weights" not in values and _tied_from_file(state):
            values["tie_weights"] = True
        return build_model(_model_config(values, str(folder / "model.json")), state, str(folder))
    if (folder / "config.json").is_file():  # gptlib publish
        values = read_json_object(folder / "config.json", HubError)
        values.pop("model_type", None)
        return build_model(_model_config(values, str(folder / "config.json")), state, str(folder))
    return build_model(load_config(folder / "config.yaml").model, state, str(folder))


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
    :func:`gptlib.publish.publish_run`; the series' ``model.json`` + ``model.safetensors`` (book names, the
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
