"""Loss-spike forensics: which data was in the step where the loss jumped, and how badly each of
its sequences scores.

`spikes.json` (written during training) holds, for every spike, the step, its loss, the rolling level,
the pre-clip gradient norm, the LR and the dataset window numbers of every micro-batch on every rank.
Here each of those windows is scored on its own by the checkpoint the spiking step started from (the
newest one at or before it), so a spike caused by one bad sequence shows that sequence far above
the others, while an optimisation event shows them all high together.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from gptlib import checkpoint as ckpt
from gptlib.data import BatchReader
from gptlib.evals import load_run
from gptlib.presets import load_config
from gptlib.rundir import load_spikes
from gptlib.sources import dataset_split, open_tokenizer


@dataclass
class WindowScore:
    rank: int
    window: int
    loss: float
    text: str


@dataclass
class SpikeReport:
    step: int
    loss: float
    level: float | None
    grad_norm: float | None
    lr: float
    clipped: bool
    checkpoint: str
    windows: list[WindowScore] = field(default_factory=list)  # worst first

    @property
    def median_window_loss(self) -> float:
        losses = sorted(w.loss for w in self.windows)
        return losses[len(losses) // 2]


def checkpoint_before(run_dir: Path, step: int) -> str:
    """The newest checkpoint written at or before optimizer step `step` (0-based): the weights that
    step started from. The first checkpoint when the spike came earlier than any."""
    names = ckpt.list_checkpoints(run_dir)
    if not names:
        raise ckpt.CheckpointError(f"{run_dir} has no checkpoints to score the spikes with")
    before = [n for n in names if int(n.split("-")[1]) <= step]
    return before[-1] if before else names[0]


def window_losses(model: torch.nn.Module, reader: BatchReader, windows: list[int],
                  device: torch.device) -> list[float]:
    """Mean cross-entropy of each window on its own (fp32, eval mode)."""
    tokens = torch.stack([reader.window_tokens(w) for w in windows]).to(device)
    with torch.inference_mode():
        logits = model(tokens[:, :-1]).float()
        losses = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    return losses.mean(dim=1).tolist()


def analyse(run_dir: str | Path, device: str | None = None) -> list[SpikeReport]:
    """Score every window of every recorded spike; windows sorted worst first."""
    run_dir = Path(run_dir)
    spikes = load_spikes(run_dir)
    if not spikes:
        return []
    cfg = load_config(run_dir / "config.yaml")
    t = cfg.train
    world_size = len(spikes[0]["windows"])
    reader = BatchReader(dataset_split(t.dataset, "train"),
                         t.microbatch_size, cfg.model.context_length, t.gradient_accumulation_steps,
                         world_size, t.start_train_token)
    tokenizer = open_tokenizer(t.dataset)
    reports, models = [], {}
    for spike in spikes:
        name = checkpoint_before(run_dir, spike["step"])
        if name not in models:
            models[name] = load_run(run_dir, name, device)[1]
        model = models[name]
        device_of_model = next(model.parameters()).device
        pairs = [(int(rank), w) for rank, ws in spike["windows"].items() for w in ws]
        losses = window_losses(model, reader, [w for _, w in pairs], device_of_model)
        scores = [WindowScore(rank, w, loss, tokenizer.decode(reader.window_tokens(w)[:-1].tolist()))
                  for (rank, w), loss in zip(pairs, losses, strict=True)]
        reports.append(SpikeReport(
            spike["step"], spike["loss"], spike["level"], spike.get("grad_norm"), spike["lr"],
            spike["clipped"], name, sorted(scores, key=lambda s: -s.loss)))
    return reports


def format_reports(reports: list[SpikeReport], top: int = 3, chars: int = 300) -> str:
    """A readable account of each spike and its worst sequences."""
    if not reports:
        return "No loss spikes were recorded."
    lines = []
    for r in reports:
        level = f"{r.level:.4f}" if r.level is not None else "?"
        norm = f"{r.grad_norm:.3f}" if r.grad_norm is not None else "non-finite"
        lines.append(
            f"Spike at step {r.step:,}: loss {r.loss:.4f} (rolling level {level}), grad norm "
            f"{norm}{' (clipped)' if r.clipped else ''}, lr {r.lr:.2e}; sequences scored with "
            f"{r.checkpoint}, median {r.median_window_loss:.4f}")
        for s in r.windows[:top]:
            text = s.text if len(s.text) <= chars else s.text[:chars] + "…"
            lines.append(f"  rank {s.rank} window {s.window:,}: loss {s.loss:.4f}")
            lines.append("    " + repr(text))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gptlib spikes", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory with spikes.json")
    parser.add_argument("--top", type=int, default=3, help="worst sequences shown per spike")
    parser.add_argument("--chars", type=int, default=300, help="characters of text per sequence")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the run's)")


def run(args: argparse.Namespace) -> int:
    if not (args.run_dir / "config.yaml").is_file():
        raise ckpt.CheckpointError(f"{args.run_dir} is not a run directory (no config.yaml)")
    if not (args.run_dir / "spikes.json").is_file():
        raise ckpt.CheckpointError(f"{args.run_dir} has no spikes.json: the run has not logged a step "
                                   "yet (spike detection writes it at the first progress line)")
    print(format_reports(analyse(args.run_dir, args.device), args.top, args.chars))
    return 0
