"""Helpers for the workbook tests: a micro run trained in this process, papermill, notebook outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gptlib.launch import prepare_run
from gptlib.train import RankContext, train


def train_in_process(run_dir: Path, overrides: dict, intervention: str = "baseline") -> Path:
    """Train a run as a world of one in this process (no torchrun start-up); returns its dir."""
    cfg, path, _ = prepare_run(intervention=intervention, overrides=overrides, run_dir=run_dir)
    dist.init_process_group("gloo", init_method=f"file://{path}/.pg-store", rank=0, world_size=1)
    try:
        (path / "logs").mkdir(exist_ok=True)
        train(cfg, path, None, RankContext(0, 1, 0, torch.device("cpu"), path / "logs" / "rank-0.log"))
    finally:
        dist.destroy_process_group()
    return path


def ensure_python3_kernel() -> None:
    """Make sure papermill's kernel `python3` exists and runs this interpreter (a clean venv may
    have no kernelspec; jupyter_client then falls back to ipykernel's own, which is fine)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        from ipykernel.kernelspec import install

        install(prefix=__import__("sys").prefix)


def execute(source: Path, output: Path, parameters: dict[str, Any], cwd: Path) -> dict:
    """Run a notebook with papermill's Python API; returns the saved output notebook as JSON."""
    import papermill

    output.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(source), str(output), parameters=parameters,
                               kernel_name="python3", progress_bar=False, cwd=str(cwd))
    return json.loads(output.read_text())


def outputs(nb: dict) -> list[dict]:
    """Every output of every code cell, in order."""
    return [o for cell in nb["cells"] if cell["cell_type"] == "code" for o in cell.get("outputs", [])]


def text_of(output: dict, mime: str = "text/plain") -> str:
    """An output's text (stream text or one mimetype of display data)."""
    value = output.get("text") if output["output_type"] == "stream" else output.get("data", {}).get(mime)
    if value is None:
        return ""
    return "".join(value) if isinstance(value, list) else str(value)
