"""Evaluating a trained run: test loss on the held-out slice and the smoke-test generation.

Test loss (the series' measure): the mean of per-batch mean cross-entropies over ``eval.batches``
batches of the dataset's *validation* split, starting at token ``eval.start_token``. Batch ``i`` is
``eval.batch_size`` consecutive, non-overlapping windows of ``context_length`` tokens starting at
``start_token + i * batch_size * context_length``, targets shifted by one token (the training
batch layout). ``eval.batches = -1`` takes as many whole batches as the split holds.

The model runs in eval mode (dropout off) under ``torch.inference_mode``. Precision follows the
run: bf16 runs evaluate under bf16 autocast, fp16 runs under fp16 autocast on CUDA (fp32 on a CPU,
which has no fast fp16), fp32 runs in fp32 with TF32 off; under ``train.protocol: series`` every
run is scored under fp16 autocast, as the series' test_loss.py does. Logits are cast to fp32
before the cross-entropy.

Reference points, on the same test slice: the *uniform* loss ln(V) of guessing every one of the
tokenizer's V tokens alike, and the *unigram* loss: the cross-entropy of the slice's targets under
the token frequencies of the whole training split, add-0.5 smoothed ((count + 0.5) / (N + 0.5 V)).
A model below the unigram level has learned more than how often each token occurs.

Smoke test: the prompt ``eval.smoke_prompt`` continued by ``eval.smoke_tokens`` tokens with top-k
``eval.smoke_top_k`` and temperature ``eval.smoke_temperature`` (0 = greedy), as in the book's
``generate``. Sampling draws from a local ``torch.Generator`` seeded with ``eval.smoke_seed`` on
the CPU, so the text is reproducible and the global RNG is left untouched.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from gptlib import checkpoint as ckpt
from gptlib import rundir
from gptlib.config import RunConfig
from gptlib.data import BatchReader, DataError, TokenFile
from gptlib.device import autocast_context, pick_device, resolve_precision
from gptlib.model import GPTModel, load_weights
from gptlib.presets import load_config
from gptlib.sources import dataset_split, open_tokenizer
from gptlib.tokenizer import Tokenizer

__all__ = [
    "EvalResult",
    "eval_precision",
    "load_run",
    "validation_reader",
    "slice_loss",
    "unigram_loss",
    "generate",
    "smoke_test",
    "evaluate_run",
    "evaluate_model",
]


@dataclass
class EvalResult:
    """What :func:`evaluate_run` measured (also merged into summary.json)."""

    test_loss: float
    smoke_text: str
    eval_checkpoint: str  # the checkpoint directory evaluated, e.g. "step-28"
    eval_batches: int
    eval_tokens: int
    eval_precision: str
    unigram_loss: float  # the same slice under the training split's token frequencies
    uniform_loss: float  # ln(tokenizer vocabulary)

    def lines(self) -> list[str]:
        """Human-readable lines, the loss to 6 decimals as the series prints it."""
        return [
            f"Test loss: {self.test_loss:.6f} (checkpoint {self.eval_checkpoint}, "
            f"{self.eval_batches:,} batches, {self.eval_tokens:,} tokens, {self.eval_precision})",
            reference_line(self.test_loss, self.unigram_loss, self.uniform_loss),
            f"Smoke test: {self.smoke_text}",
        ]


def reference_line(loss: float, unigram: float, uniform: float) -> str:
    """Where a test loss stands against the unigram and uniform levels of its slice."""
    gap = unigram - loss
    where = f"{gap:.3f} nats below" if gap > 0 else f"{-gap:.3f} nats above"
    return (f"Unigram level of the same tokens: {unigram:.4f} ({where} it); uniform guess: "
            f"{uniform:.4f}")


def eval_precision(precision: str, device: torch.device, protocol: str = "gptlib") -> str:
    """The precision the test loss uses for a run trained in ``precision`` (see the module doc):
    under ``protocol: series`` always fp16 autocast, as the series' test_loss.py scores every
    model (its no-AMP run too)."""
    if protocol == "series":
        return "fp16"
    if precision == "fp16" and device.type != "cuda":
        return "fp32"
    return precision


def load_run(
    run_dir: str | Path, checkpoint: str = "best", device: torch.device | str | None = None
) -> tuple[RunConfig, GPTModel, Path]:
    """(config, model in eval mode on ``device``, checkpoint directory) of a run's checkpoint.

    The checkpoint's files are verified against their recorded sha256 first. Building the model
    does not consume the global RNG.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ckpt.CheckpointError(f"run directory {run_dir} does not exist")
    if not (run_dir / "config.yaml").is_file():
        raise ckpt.CheckpointError(f"{run_dir} is not a run directory (it has no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    path = ckpt.resolve_checkpoint(run_dir, checkpoint)
    ckpt.verify_checkpoint(path)
    device = pick_device(cfg.train.device) if device is None else torch.device(device)
    with torch.random.fork_rng(devices=[]):
        model = GPTModel(cfg.model)
    load_weights(model, path / ckpt.MODEL_FILE)
    return cfg, model.to(device).eval(), path


def validation_reader(cfg: RunConfig, batches: int | None = None) -> tuple[BatchReader, int]:
    """(reader of the held-out validation batches, number of batches to evaluate).

    ``batches`` overrides ``eval.batches`` (-1 = every whole batch from ``eval.start_token``).
    """
    e = cfg.eval
    batches = e.batches if batches is None else batches
    if batches != -1 and batches < 1:
        raise DataError(f"eval batches={batches} must be -1 (all whole batches) or >= 1")
    split = dataset_split(cfg.train.dataset, "validation")
    batch_tokens = e.batch_size * cfg.model.context_length
    available = max(0, (len(split) - e.start_token - 1) // batch_tokens)
    need = f"{batches:,} batches" if batches != -1 else "at least 1 batch"
    if available == 0 or batches > available:
        raise DataError(
            f"validation split {split.path} has {len(split):,} tokens: from eval.start_token="
            f"{e.start_token:,} it holds {available:,} whole batches of {e.batch_size} x "
            f"{cfg.model.context_length} tokens, but the test loss needs {need}; lower "
            "eval.batches / eval.start_token / eval.batch_size or use a larger dataset"
        )
    reader = BatchReader(split, e.batch_size, cfg.model.context_length, 1, 1, e.start_token)
    return reader, available if batches == -1 else batches


@functools.lru_cache(maxsize=4)
def _token_counts(path: Path, size: int, mtime_ns: int, vocab: int) -> np.ndarray:
    """Occurrences of every id in a token file, read in chunks (never the whole file at once)."""
    tokens = TokenFile(path)
    counts = np.zeros(vocab, dtype=np.int64)
    chunk = 1 << 24
    for start in range(0, len(tokens), chunk):
        ids = tokens.read(start, min(chunk, len(tokens) - start)).numpy()
        if ids.min() < 0 or ids.max() >= vocab:
            raise DataError(f"token file {path} holds ids outside [0, {vocab}) of its tokenizer")
        counts += np.bincount(ids, minlength=vocab)
    return counts


def unigram_loss(cfg: RunConfig, batches: int | None = None) -> tuple[float, float]:
    """(unigram loss, uniform loss) of the test slice ``slice_loss`` scores (see the module doc)."""
    vocab = open_tokenizer(cfg.train.dataset).n_vocab
    train = dataset_split(cfg.train.dataset, "train").path
    stat = train.stat()
    counts = _token_counts(train.resolve(), stat.st_size, stat.st_mtime_ns, vocab)
    log_p = np.log(counts + 0.5) - math.log(counts.sum() + 0.5 * vocab)
    reader, n = validation_reader(cfg, batches)
    # The slice's targets: batch i covers tokens [s_i + 1, s_i + 1 + rows) with s_i consecutive.
    targets = reader.token_file.read(cfg.eval.start_token + 1, n * reader.block_tokens).numpy()
    if targets.min() < 0 or targets.max() >= vocab:
        raise DataError(f"validation split {reader.token_file.path} holds ids outside [0, {vocab})")
    return float(-log_p[targets].mean()), math.log(vocab)


def _autocast(cfg: RunConfig, device: torch.device) -> tuple[contextlib.AbstractContextManager, str]:
    precision = eval_precision(cfg.train.precision, device, cfg.train.protocol)
    return autocast_context(precision, device), precision


def slice_loss(
    model: GPTModel, cfg: RunConfig, batches: int | None = None
) -> tuple[float, int, str]:
    """(test loss, batches evaluated, precision used) of ``model`` on the held-out slice."""
    device = next(model.parameters()).device
    reader, n = validation_reader(cfg, batches)
    autocast, precision = _autocast(cfg, device)
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    with torch.inference_mode():
        for i in range(n):
            inputs, targets = reader.get(i, 0, 0)
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            with autocast:
                loss = model(inputs, targets)  # fp32 mean, without the logits tensor
            total += loss.double()
    return (total / n).item(), n, precision



def generate(
    model: GPTModel,
    ids: torch.Tensor,
    new_tokens: int,
    top_k: int = 0,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    n_vocab: int | None = None,
) -> torch.Tensor:
    """The book's ``generate``: extend ``ids`` [1, n] by ``new_tokens`` tokens.

    Top-k keeps the k largest logits (0 = all), temperature 0 takes the argmax; otherwise the next
    token is drawn on the CPU from ``generator``. Entries past the tokenizer's ``n_vocab`` (a
    padded vocabulary) are never chosen.
    """
    context = model.cfg.context_length
    n_vocab = model.cfg.vocab_size if n_vocab is None else n_vocab
    for _ in range(new_tokens):
        logits = model(ids[:, -context:])[:, -1, :].float().cpu()
        logits[:, n_vocab:] = float("-inf")
        if top_k:
            threshold = torch.topk(logits, min(top_k, n_vocab)).values[:, -1:]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_id = torch.multinomial(probs, 1, generator=generator)
        else:
            next_id = logits.argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, next_id.to(ids.device)], dim=1)
    return ids


def smoke_test(model: GPTModel, cfg: RunConfig, seed: int | None = None,
               tokenizer: Tokenizer | None = None) -> str:
    """The prompt and its continuation as one text (the series' smoke test), reproducibly, in the
    tokenizer of the run's dataset unless another is given."""
    e = cfg.eval
    tokenizer = open_tokenizer(cfg.train.dataset) if tokenizer is None else tokenizer
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(e.smoke_seed if seed is None else seed)
    ids = torch.tensor([tokenizer.encode(e.smoke_prompt)], device=device)
    # The series samples in fp32 (its test_smoke.py has no autocast); gptlib as it evaluates.
    autocast = contextlib.nullcontext() if cfg.train.protocol == "series" else _autocast(cfg, device)[0]
    model.eval()
    with torch.inference_mode(), autocast:
        out = generate(model, ids, e.smoke_tokens, e.smoke_top_k, e.smoke_temperature, generator,
                       tokenizer.n_vocab)
    return tokenizer.decode(out[0].cpu())


def evaluate_run(
    run_dir: str | Path,
    checkpoint: str | None = None,
    batches: int | None = None,
    device: torch.device | str | None = None,
    write: bool = True,
) -> EvalResult:
    """Test loss, its reference levels and the smoke test of one checkpoint of a run (default: the
    config's ``eval.checkpoint``), recorded in summary.json if ``write``: under ``evaluations``
    by checkpoint always, and as the run's result (the top-level ``test_loss`` ...) only when it
    is the evaluation the config asks for (its ``eval.checkpoint``, all of ``eval.batches``)."""
    config = Path(run_dir) / "config.yaml"
    default = load_config(config).eval.checkpoint if config.is_file() else "best"
    cfg, model, path = load_run(run_dir, checkpoint or default, device)
    loss, n, precision = slice_loss(model, cfg, batches)
    unigram, uniform = unigram_loss(cfg, batches)
    result = EvalResult(
        test_loss=loss,
        smoke_text=smoke_test(model, cfg),
        eval_checkpoint=path.name,
        eval_batches=n,
        eval_tokens=n * cfg.eval.batch_size * cfg.model.context_length,
        eval_precision=precision,
        unigram_loss=unigram,
        uniform_loss=uniform,
    )
    if write:
        primary = path == ckpt.resolve_checkpoint(run_dir, default) and batches in (None, cfg.eval.batches)
        rundir.record_evaluation(Path(run_dir), asdict(result), primary)
    return result


def evaluate_model(
    model: GPTModel, cfg: RunConfig, batches: int | None = None, label: str = "model"
) -> EvalResult:
    """Test loss and smoke test of a model that is not a run's checkpoint (e.g. OpenAI GPT-2 from
    ``gptlib.hub.load_model``) on the test slice of ``cfg`` (a scale's config: its dataset, eval
    settings, context length and precision); nothing is written. ``label`` names the model in
    ``eval_checkpoint``."""
    if model.cfg.context_length < cfg.model.context_length:
        raise DataError(
            f"{label} has context length {model.cfg.context_length}, shorter than the "
            f"{cfg.model.context_length}-token windows of scale {cfg.scale}'s test slice"
        )
    device = next(model.parameters()).device
    cfg = copy.deepcopy(cfg)
    cfg.train.precision = resolve_precision(cfg.train.precision, device)
    loss, n, precision = slice_loss(model, cfg, batches)
    unigram, uniform = unigram_loss(cfg, batches)
    return EvalResult(
        test_loss=loss,
        smoke_text=smoke_test(model, cfg),
        eval_checkpoint=label,
        eval_batches=n,
        eval_tokens=n * cfg.eval.batch_size * cfg.model.context_length,
        eval_precision=precision,
        unigram_loss=unigram,
        uniform_loss=uniform,
    )
