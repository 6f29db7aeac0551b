"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from runs import SENTENCES, micro
from workbook import train_in_process

from gptlib.data import write_token_file
from gptlib.tokenizer import get_tokenizer


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Build the built-in corpus (and anything else cached) into a fresh directory per session,
    unless GPTLIB_CACHE is already set, so tests never depend on a user's cache."""
    import os

    os.environ.setdefault("GPTLIB_CACHE", str(tmp_path_factory.mktemp("gptlib-cache")))


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small token dataset of repeated English sentences (learnable, so the loss falls)."""
    directory = tmp_path_factory.mktemp("dataset")
    enc = get_tokenizer()
    gen = torch.Generator().manual_seed(0)
    order = torch.randint(0, len(SENTENCES), (3000,), generator=gen).tolist()
    tokens = [t for i in order for t in enc.encode(" " + SENTENCES[i])]
    write_token_file(directory / "train.safetensors", tokens)
    write_token_file(directory / "validation.safetensors", tokens[:2000])
    return directory


@pytest.fixture(scope="session")
def micro_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """The one way the tests get a trained run in-process: ``micro_run("evals/run", **changes)``
    trains tests/runs.py's micro config plus ``changes`` (on the sentences dataset unless
    ``train.dataset`` is among them) into a fresh folder ending in that relative path."""

    def train(relative: str, **changes: object) -> Path:
        name, _, rest = relative.partition("/")
        run_dir = tmp_path_factory.mktemp(name) / rest if rest else tmp_path_factory.mktemp(name)
        return train_in_process(run_dir, micro(dataset, **changes))

    return train


@pytest.fixture(scope="session")
def python_stdlib(isolated_cache: None) -> tuple[Path, str]:
    """builtin:python-stdlib built once into the session's cache: (dataset dir, what it printed)."""
    import contextlib
    import io

    from gptlib.sources import resolve_dataset

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        directory = resolve_dataset("builtin:python-stdlib")
    return directory, stderr.getvalue()
