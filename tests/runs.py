"""Shared helpers for tests that train: a micro config, the CLI, run files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from gptlib import checkpoint as ckpt

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A checkpoint is written to a temporary directory and renamed.",
    "Gradient clipping bounds the global norm of the gradients.",
    "Every effort moves you closer to the goal.",
    "Loss spikes are rare events in a long training run.",
]


def micro(dataset: Path, **changes: object) -> dict:
    """Overrides for a model small enough that a step takes milliseconds."""
    overrides = {
        "model.vocab_size": 50257,  # the test dataset is GPT-2 tokens (the tiny scale's BPE has 1,024)
        "model.context_length": 16, "model.emb_dim": 32, "model.n_heads": 2, "model.n_layers": 2,
        "model.drop_rate": 0.0, "train.dataset": str(dataset), "train.microbatch_size": 2,
        "train.gradient_accumulation_steps": 1, "train.checkpoint_interval": 4,
        "train.min_train_tokens": 8 * 2 * 16, "train.precision": "fp32", "train.log_interval": 2,
        # English sentences, so the series' own smoke test (the tiny scale's prompt is Python)
        "eval.smoke_prompt": "Every effort moves you", "eval.smoke_tokens": 20,
        "eval.smoke_temperature": 1.4,
    }
    overrides.update(changes)
    return overrides


def cli(*args: object, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m gptlib ARGS` in a subprocess, its output captured as text (the one way the tests
    call the CLI; kill tests start it with Popen themselves)."""
    return subprocess.run([sys.executable, "-m", "gptlib", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)


def set_args(overrides: dict) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.resolve_checkpoint(run_dir, "latest") / "model.safetensors"))
