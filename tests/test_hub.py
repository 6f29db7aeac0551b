"""Hugging Face Hub, offline: hf: datasets from a Hub-like layout, publish (dry run and a recorded
upload), and loading this project's, the series' and transformers' GPT-2 checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from runs import cli, micro
from safetensors.torch import load_file, save_file

from gptlib import config, evals, hub, presets, publish
from gptlib.config import ModelConfig
from gptlib.data import DataError
from gptlib.model import GPTModel
from gptlib.sources import dataset_split, resolve_dataset

FAKE_TOKEN = "hf_gptlibTestTokenThatMustNeverBeWritten42"
DATASET_REPO = "someone/sentences"
MODEL_REPO = "someone/micro-clipped"
SHA = "0123456789abcdef0123456789abcdef01234567"


def one_line(message: str) -> str:
    assert "\n" not in message.strip(), message
    return message.strip()


def logits(model: torch.nn.Module, seed: int = 0, context: int = 16) -> torch.Tensor:
    ids = torch.randint(0, 50257, (2, context), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)


def hf_cache_repo(cache: Path, kind: str, repo_id: str, files: dict[str, Path]) -> Path:
    """Lay `files` out as the Hugging Face cache does (blobs, a snapshot of symlinks, refs/main)."""
    repo = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / SHA
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        blob = repo / "blobs" / f"blob-{name}"
        shutil.copyfile(source, blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    return snapshot


# ------------------------------------------------------------------ a run on an hf: dataset, offline


@pytest.fixture(scope="module")
def hub_env(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A `micro` scale (tests/runs.py's micro config) reading hf:someone/sentences, whose files sit
    in GPTLIB_CACHE as `hf download --local-dir` leaves them; env for the CLI: offline, fake token."""
    root = tmp_path_factory.mktemp("hub")
    params = root / "parameters"
    shutil.copytree(config.PARAMETERS_DIR / "interventions", params / "interventions")
    scale: dict = {"nproc": 1, "eval": {"start_token": 0, "batches": -1, "batch_size": 8}}
    for key, value in micro(f"hf:{DATASET_REPO}").items():  # type: ignore[arg-type]
        section, name = key.split(".")
        scale.setdefault(section, {})[name] = value
    (params / "scales").mkdir()
    (params / "scales" / "micro.yaml").write_text(yaml.safe_dump(scale))
    cache = root / "gptlib-cache"
    local = cache / "datasets" / "hf" / DATASET_REPO.replace("/", "--")
    (local / ".cache" / "huggingface" / "download").mkdir(parents=True)
    for name in ("train.safetensors", "validation.safetensors"):
        shutil.copyfile(dataset / name, local / name)
        (local / ".cache" / "huggingface" / "download" / f"{name}.metadata").write_text(f"{SHA}\netag\n0\n")
    env = {**os.environ, "GPTLIB_PARAMETERS": str(params), "GPTLIB_CACHE": str(cache),
           "HF_HUB_CACHE": str(root / "hf-cache"), "HF_HUB_OFFLINE": "1", "HF_TOKEN": FAKE_TOKEN}
    return {"root": root, "params": params, "cache": cache, "local": local, "env": env}


@pytest.fixture(scope="module")
def run(hub_env: dict) -> Path:
    """A micro run trained (gradient-clipping) and evaluated with the CLI, offline."""
    run_dir = hub_env["root"] / "runs" / "micro-clip"
    trained = cli("train", "--scale", "micro", "--intervention", "gradient-clipping",
                  "--run-dir", run_dir, env=hub_env["env"])
    assert trained.returncode == 0, trained.stderr + trained.stdout
    evaluated = cli("eval", run_dir, env=hub_env["env"])
    assert evaluated.returncode == 0, evaluated.stderr
    return run_dir


@pytest.fixture(scope="module")
def published(run: Path, hub_env: dict) -> Path:
    out = hub_env["root"] / "publish"
    result = cli("publish", run, MODEL_REPO, "--dry-run", "--out", out, env=hub_env["env"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("nothing uploaded")
    return out


def test_hf_dataset_from_a_local_dir_trains_offline(run: Path, hub_env: dict) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["tokens_seen"] == 8 * 2 * 16
    assert isinstance(summary["test_loss"], float)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["dataset"] == f"hf:{DATASET_REPO}"
    assert resolve_dataset(f"hf:{DATASET_REPO}", hub_env["cache"]) == hub_env["local"]


def test_missing_hf_dataset_offline_is_one_line(hub_env: dict, tmp_path: Path) -> None:
    result = cli("train", "--scale", "micro", "--run-dir", tmp_path / "run",
                 "--set", "train.dataset=hf:someone/missing", env=hub_env["env"])
    assert result.returncode == 2
    message = one_line(result.stderr)
    local = hub_env["cache"] / "datasets" / "hf" / "someone--missing"
    assert message.startswith("error: hf:someone/missing is not cached and HF_HUB_OFFLINE is set")
    assert f"hf download someone/missing train.safetensors validation.safetensors --repo-type dataset " \
           f"--local-dir {local}" in message


def test_hf_dataset_from_the_hugging_face_cache(dataset: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    files = {n: dataset / n for n in ("train.safetensors", "validation.safetensors")}
    snapshot = hf_cache_repo(tmp_path / "hf-cache", "dataset", "someone/cached", files)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_dataset("hf:someone/cached", tmp_path / "gptlib") == snapshot
    monkeypatch.setenv("GPTLIB_CACHE", str(tmp_path / "gptlib"))
    assert dataset_split("hf:someone/cached", "validation").read(0, 5).tolist() == \
        load_file(str(dataset / "validation.safetensors"))["tokens"][:5].tolist()


def test_one_download_per_machine(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    calls: list[str] = []

    def slow_download(**kwargs: object) -> str:
        calls.append(str(kwargs["repo_id"]))
        time.sleep(0.3)
        local_dir = Path(str(kwargs["local_dir"]))
        local_dir.mkdir(parents=True, exist_ok=True)
        for name in ("train.safetensors", "validation.safetensors"):
            shutil.copyfile(dataset / name, local_dir / name)
        return str(kwargs["local_dir"])

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", slow_download)
    results: list[Path] = []
    ranks = [threading.Thread(target=lambda: results.append(resolve_dataset("hf:a/b", tmp_path)))
             for _ in range(3)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join()
    assert calls == ["a/b"]
    assert results == [tmp_path / "datasets" / "hf" / "a--b"] * 3


# ------------------------------------------------------------------ publish


def test_publish_dry_run_round_trips_and_describes_the_run(run: Path, published: Path,
                                                           hub_env: dict) -> None:
    names = {p.name for p in published.iterdir()}
    assert {"model.safetensors", "config.json", "README.md"} <= names
    assert names & {"loss.png", "loss.html"}
    config_json = json.loads((published / "config.json").read_text())
    run_config = yaml.safe_load((run / "config.yaml").read_text())
    assert config_json == {"model_type": "gptlib", **run_config["model"]}

    _, original, _ = evals.load_run(run, "best", "cpu")
    loaded = hub.load_model(published)
    assert loaded.cfg == original.cfg and not loaded.training
    assert torch.equal(logits(loaded), logits(original))

    card = (published / "README.md").read_text()
    s = json.loads((run / "summary.json").read_text())
    for number in (f"{s['test_loss']:.6f}", f"{s['final_train_loss']:.3f}",
                   f"| Tokens seen | {s['tokens_seen']:,} |", f"{s['wall_time_s']:.2f} s",
                   f"{s['tokens_per_s']:,.0f} tokens/s", f"checkpoint {s['eval_checkpoint']}",
                   f"world size {s['world_size']}, device {s['device']}"):
        assert number in card, number
    assert "interventions: gradient-clipping" in card
    assert "| `train.clipping_max_norm` | `null` | `3.5` |" in card
    diff_rows = [line for line in card.splitlines() if line.startswith("| `")]
    assert len(diff_rows) == 1  # the intervention is the only difference from the micro baseline
    assert f'load_model("{MODEL_REPO}")' in card
    assert "loss.png" in card if "loss.png" in names else "[loss.html](loss.html)" in card

    for path in hub_env["root"].rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path


def test_eval_any_source_on_a_scale(run: Path, published: Path, hub_env: dict) -> None:
    result = cli("eval", published, "--scale", "micro", env=hub_env["env"])
    assert result.returncode == 0, result.stderr
    s = json.loads((run / "summary.json").read_text())
    assert result.stdout.startswith(f"Test loss: {s['test_loss']:.6f} ({published} on the micro test slice, "
                                    f"{s['eval_batches']:,} batches")
    assert "\nSmoke test: Every effort moves you" in result.stdout
    missing = cli("eval", "someone/not-cached", "--scale", "micro", env=hub_env["env"])
    assert missing.returncode == 2
    assert one_line(missing.stderr).startswith(
        "error: model someone/not-cached is not in the Hugging Face cache and HF_HUB_OFFLINE is set")


class RecordingApi:
    calls: list[tuple[str, tuple, dict]] = []
    fail = False

    def create_repo(self, *args: object, **kwargs: object) -> str:
        self.calls.append(("create_repo", args, kwargs))
        return f"https://huggingface.co/{args[0]}"

    def upload_folder(self, **kwargs: object) -> None:
        self.calls.append(("upload_folder", (), kwargs))
        if self.fail:
            raise OSError("403 Forbidden\ndetails")


def test_upload_goes_through_hf_api(run: Path, hub_env: dict, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(config, "PARAMETERS_DIR", hub_env["params"])
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setattr(publish, "_png", lambda fig: (b"\x89PNG fake", None))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE is set: cannot upload"):
        publish.publish_run(run, MODEL_REPO, out=tmp_path / "offline")
    assert RecordingApi.calls == []

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    folder = publish.publish_run(run, MODEL_REPO, checkpoint="latest", private=True, out=tmp_path / "up")
    assert folder == tmp_path / "up"
    assert (folder / "loss.png").read_bytes() == b"\x89PNG fake" and not (folder / "loss.html").exists()
    assert "](loss.png)" in (folder / "README.md").read_text()
    (create, args, kwargs), (upload, _, upload_kwargs) = RecordingApi.calls
    assert (create, args, kwargs) == ("create_repo", (MODEL_REPO,),
                                      {"repo_type": "model", "private": True, "exist_ok": True})
    assert upload == "upload_folder"
    assert (upload_kwargs["folder_path"], upload_kwargs["repo_id"]) == (str(folder), MODEL_REPO)
    assert "token" not in kwargs and "token" not in upload_kwargs

    RecordingApi.fail = True
    with pytest.raises(hub.HubError) as error:
        publish.publish_run(run, MODEL_REPO, out=tmp_path / "up")
    assert one_line(str(error.value)).endswith("OSError: 403 Forbidden")
    (tmp_path / "up" / "notes.txt").write_text("mine")
    with pytest.raises(hub.HubError, match=r"holds other files \(notes.txt\); choose an empty --out"):
        publish.publish_run(run, MODEL_REPO, dry_run=True, out=tmp_path / "up")
    with pytest.raises(hub.HubError, match="repo id 'no-owner' must be <owner>/<name>"):
        publish.publish_run(run, "no-owner", dry_run=True)


# ------------------------------------------------------------------ other checkpoints in


def test_transformers_gpt2_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers  # the dev extra's test-only dependency
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, vocab_size=50257,
                                  activation_function="gelu_new", layer_norm_epsilon=1e-5,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # make layer norms and biases non-trivial too
        for param in reference.parameters():
            param.add_(0.1 * torch.randn_like(param))
    reference.save_pretrained(tmp_path / "prefixed", safe_serialization=True)
    expected = reference(torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))).logits

    model = hub.load_model(tmp_path / "prefixed")
    assert model.cfg == ModelConfig(context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0,
                                    qkv_bias=True, tie_weights=True)
    torch.testing.assert_close(logits(model, context=32), expected.detach(), atol=1e-4, rtol=0)

    # OpenAI's upload: unprefixed names, attention-mask buffers, an explicit (tied) lm_head
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tmp_path / "prefixed" / "config.json", bare)
    state = {k.removeprefix("transformer."): v for k, v in load_file(
        str(tmp_path / "prefixed" / "model.safetensors")).items()}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, str(bare / "model.safetensors"))
    torch.testing.assert_close(logits(hub.load_model(bare), context=32), expected.detach(), atol=1e-4, rtol=0)

    # the same repo through the (offline) Hugging Face cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = {n: bare / n for n in ("config.json", "model.safetensors")}
    hf_cache_repo(tmp_path / "hf-cache", "model", "openai-test/gpt2", files)
    from_hub = hub.load_model("openai-test/gpt2", cache_dir=tmp_path / "hf-cache")
    torch.testing.assert_close(logits(from_hub, context=32), expected.detach(), atol=1e-4, rtol=0)
    with pytest.raises(hub.HubError, match="model openai-test/other is not in the Hugging Face cache"):
        hub.load_model("openai-test/other", cache_dir=tmp_path / "hf-cache")

    config_json = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config_json, "activation_function": "relu"}))
    with pytest.raises(hub.HubError, match="unsupported GPT-2 variant: activation_function 'relu'"):
        hub.load_model(bare)


@pytest.mark.parametrize("tied", [False, True])
def test_series_layout_with_the_books_mask_buffers(tmp_path: Path, tied: bool) -> None:
    from llms_from_scratch.ch04 import GPTModel as BookGPTModel

    values = {"vocab_size": 50257, "context_length": 16, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
              "drop_rate": 0.1, "qkv_bias": True}
    torch.manual_seed(1)
    book = BookGPTModel(values).eval()
    if tied:
        book.out_head.weight = book.tok_emb.weight
    state = {k: v.clone() for k, v in book.state_dict().items()}
    assert "trf_blocks.0.att.mask" in state
    if tied:
        del state["out_head.weight"]  # a tied model's file stores the shared matrix once
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.json").write_text(json.dumps(values))
    model = hub.load_model(tmp_path)
    assert model.cfg == ModelConfig(**values, tie_weights=tied)
    torch.testing.assert_close(logits(model), logits(book), atol=1e-5, rtol=0)


def test_clear_one_line_errors(tmp_path: Path) -> None:
    def error(source: object) -> str:
        with pytest.raises(DataError) as caught:
            hub.load_model(source)  # type: ignore[arg-type]
        return one_line(str(caught.value))

    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.txt").write_text("")
    assert "unknown model layout (found notes.txt)" in error(tmp_path / "odd")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    assert "model_type 'llama' is not supported; allowed: gpt2" in error(tmp_path / "llama")
    series = tmp_path / "series"
    series.mkdir()
    (series / "model.json").write_text(json.dumps({"n_layers": 3, "emb_dim": 32, "n_heads": 2}))
    (series / "pytorch_model.bin").write_bytes(b"")
    assert error(series).endswith("no model.safetensors (only pytorch_model.bin: convert it to safetensors)")
    save_file(GPTModel(ModelConfig(emb_dim=32, n_heads=2, n_layers=2, context_length=16)).state_dict(),
              str(series / "model.safetensors"))
    message = error(series)
    assert "the weights do not fit the model config (missing: trf_blocks.2." in message
    (series / "model.json").write_text(json.dumps({"n_layer": 2}))
    assert "model.n_layer: unknown key" in error(series)
    assert "neither an existing folder nor a Hub repo id" in error(tmp_path / "no" / "such")
    (series / "model.json").write_text(json.dumps({"emb_dim": 32, "n_heads": 2, "n_layers": 2,
                                                   "context_length": 16}))
    with pytest.raises(DataError, match="context length 16, shorter than the 1024-token windows"):
        evals.evaluate_model(hub.load_model(series), presets.resolve_config("gpt2-small-1gpu"))


def test_a_fitted_bpe_travels_with_the_run_and_its_published_folder(
        tmp_path: Path, micro_run: Callable[..., Path]) -> None:
    """`gptlib prepare --tokenizer bpe-N`, a run on it, its smoke test and its published folder all
    use that BPE (shipped as tokenizer.json), not GPT-2."""
    from gptlib.tokenizer import BPETokenizer

    texts = [f"class Handler{i}:\n    def reply(self, request):\n        return request.body\n" * 4
             for i in range(30)]
    for i, text in enumerate(texts):
        (tmp_path / f"{i:02d}.txt").write_text(text)
    made = cli("prepare", tmp_path, "--out", tmp_path / "ds", "--tokenizer", "bpe-300",
               "--validation-fraction", "0.2", timeout=120)
    assert made.returncode == 0, made.stderr
    assert "tokenizer bpe-300" in made.stdout and "fitting a 300-token BPE" in made.stderr
    too_small = cli("train", "--run-dir", tmp_path / "x", "--set", f"train.dataset={tmp_path / 'ds'}",
                    "--set", "model.vocab_size=200", timeout=120)
    assert too_small.returncode == 2
    assert too_small.stderr.strip().endswith("set model.vocab_size >= 300")
    run = micro_run("bpe/run", **{"train.dataset": str(tmp_path / "ds"), "model.vocab_size": 300,
                                  "eval.smoke_prompt": "class Handler", "train.min_train_tokens": 4 * 32})
    result = evals.evaluate_run(run, batches=1)
    tokenizer = BPETokenizer.from_file(tmp_path / "ds" / "tokenizer.json")
    assert result.smoke_text.startswith("class Handler")
    _, model, _ = evals.load_run(run)
    ids = evals.generate(model, torch.tensor([tokenizer.encode("class Handler")]), 20, 25, 1.4,
                         torch.Generator().manual_seed(123), tokenizer.n_vocab)
    assert result.smoke_text == tokenizer.decode(ids[0])
    assert result.uniform_loss == pytest.approx(__import__("math").log(300))
    folder = publish.publish_run(run, "someone/bpe-micro", dry_run=True)
    assert (folder / "tokenizer.json").read_bytes() == (tmp_path / "ds" / "tokenizer.json").read_bytes()
    card = (folder / "README.md").read_text()
    assert "tokenizer bpe-300 (fitted to the training data; `tokenizer.json` in this repo)" in card
    assert "tokenizer.encode('class Handler')" in card
    assert hub.load_tokenizer(folder).encode("return request") == tokenizer.encode("return request")
    assert hub.load_tokenizer(run).name == "bpe-300"
