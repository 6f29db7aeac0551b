"""Models out: a run's checkpoint as a Hugging Face model repo (``gptlib publish``).

:func:`build_folder` writes ``model.safetensors``, ``config.json``, the model card ``README.md`` and
the loss chart into an upload folder; :func:`upload` sends it. A token comes only from the
environment (``HF_TOKEN``) or ``hf auth login``: no function here takes one, and none is written.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file, save_file

from gptlib import checkpoint as ckpt
from gptlib.config import RunConfig
from gptlib.data import DataError
from gptlib.display import format_duration
from gptlib.hub import GPTLIB_MODEL_TYPE, WEIGHTS, HubError, build_model, error_line
from gptlib.model import count_parameters
from gptlib.presets import baseline_changes, load_config
from gptlib.rundir import read_summary
from gptlib.sources import hf_offline, open_tokenizer
from gptlib.tokenizer import BPE_FILE, BPETokenizer, GPT2Tokenizer, Tokenizer

__all__ = ["build_folder", "model_card", "publish_run", "upload"]

PUBLISH_FILES = (WEIGHTS, "config.json", "README.md", "loss.png", "loss.html", BPE_FILE)
PROJECT_URL = "https://github.com/gpjt/ddp-base-model-from-scratch"  # the series' code


def _check_repo_id(repo_id: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo_id) or ".." in repo_id:
        raise HubError(f"repo id {repo_id!r} must be <owner>/<name> (letters, digits, '-', '_', '.')")


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _png(fig: Any) -> tuple[bytes | None, str | None]:
    """(PNG bytes, None) through plotly's static exporter, or (None, why it is unavailable)."""
    if importlib.util.find_spec("kaleido") is None:
        return None, "the static image exporter kaleido is not installed"
    try:
        return fig.to_image(format="png", width=1000, height=460), None
    except Exception as e:  # e.g. kaleido without the browser it drives
        return None, f"static image export failed: {error_line(e)}"


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
    diff = baseline_changes(cfg, str(summary.get("device", "cpu")).split(":")[0])
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
    summary = read_summary(run_dir)
    chart = _chart(run_dir, folder)
    n_params = count_parameters(build_model(cfg.model, state, str(path)))
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
    if hf_offline():
        raise HubError(f"HF_HUB_OFFLINE is set: cannot upload {folder} to {repo_id} (use --dry-run)")
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=message or "Upload a gptlib run")
    except Exception as e:  # authentication, network, permissions ...
        raise HubError(f"could not upload {folder} to {repo_id}: {error_line(e)}") from e
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

