"""Measure how closely gptlib follows the series' own code, step by step, on a micro config.

    .venv/bin/python scripts/series_agreement.py SERIES_DIR [--steps 12] [--ga 2]

SERIES_DIR holds ddp_train.py, gpt.py and checkpointing.py of gpjt/ddp-base-model-from-scratch
(e.g. `git clone https://github.com/gpjt/ddp-base-model-from-scratch && git checkout b314784`).
Both sides train the same micro GPT (fp32, CPU, dropout 0, plain data, same seed) on the same
tokens, with 1 and with 2 gloo ranks: the series by calling its `ddp_train.train` (its loop, its
model, plain AdamW), gptlib with `gptlib train --set train.protocol=series`. Printed: the largest
difference of rank 0's micro-batch losses per step, of the final weights, and of the test loss
the series' scorer (fp16 autocast, mean of per-batch losses) gives gptlib's final weights against
gptlib's own. Nothing here is a test: it needs the series' files, which the project does not ship.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Every effort moves you closer.",
             "A checkpoint is written to a temporary directory and renamed.",
             "Loss spikes are rare events in a long training run."]
MODEL = {"vocab_size": 50257, "context_length": 16, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
         "drop_rate": 0.0, "qkv_bias": False}


def _stub_matplotlib() -> None:
    """ddp_train imports matplotlib for its charts, which this measurement never draws."""
    plt = types.ModuleType("matplotlib")
    for name in ("pyplot", "font_manager", "ticker"):
        sub = types.ModuleType(f"matplotlib.{name}")
        setattr(plt, name, sub)
        sys.modules[f"matplotlib.{name}"] = sub
    sys.modules["matplotlib.ticker"].MaxNLocator = object  # type: ignore[attr-defined]
    sys.modules["matplotlib"] = plt


def _series_rank(rank: int, world: int, series: Path, data: Path, train: dict, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    _stub_matplotlib()
    sys.path.insert(0, str(series))
    import ddp_train
    from gpt import GPTModel

    torch.manual_seed(train.get("random_seed", 42))  # as its main(): seed, then the model
    model = GPTModel(MODEL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train["learning_rate"],
                                  weight_decay=train["weight_decay"])
    losses: list[float] = []
    score = ddp_train.calculate_loss

    def recording(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = score(logits, targets)
        losses.append(loss.item())
        return loss

    ddp_train.calculate_loss = recording
    ga = train["gradient_accumulation_steps"]
    train_ds = ddp_train.load_dataset(data, "train", train["min_train_tokens"], 0, world,
                                      train["microbatch_size"], ga, MODEL["context_length"])
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ddp_train.train(out, ddp, optimizer, None, None, None, train_ds, 0, None, 10**9, False, ga,
                    do_checkpoints=False)
    if rank == 0:
        (out / "series-losses.json").write_text(json.dumps(losses))
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("mask")},
                  str(out / "series-model.safetensors"))
    dist.destroy_process_group()


def _series_test_loss(series: Path, weights: dict[str, torch.Tensor], data: Path) -> float:
    """test_loss.py's scoring: eval mode, fp16 autocast, the mean of per-batch mean losses."""
    _stub_matplotlib()
    sys.path.insert(0, str(series))
    import ddp_train
    from gpt import GPTModel

    model = GPTModel(MODEL)
    model.load_state_dict(weights, strict=False)
    test_ds = ddp_train.load_dataset(data, "validation", 20 * 6 * MODEL["context_length"], 0, 1, 6,
                                     1, MODEL["context_length"])
    model.eval()
    losses = []
    with torch.inference_mode(), torch.amp.autocast(device_type="cpu", dtype=torch.float16):
        for inputs, targets in test_ds:
            losses.append(ddp_train.calculate_loss(model(inputs.long()), targets.long()).item())
    return sum(losses) / len(losses)


def _gptlib_run(out: Path, data: Path, world: int, train: dict) -> Path:
    run = out / f"gptlib-{world}"
    sets = {**{f"model.{k}": v for k, v in MODEL.items()}, "train.dataset": str(data),
            "train.protocol": "series", "train.precision": "fp32", "train.device": "cpu",
            "train.microbatch_size": train["microbatch_size"],
            "train.gradient_accumulation_steps": train["gradient_accumulation_steps"],
            "train.min_train_tokens": train["min_train_tokens"], "train.checkpoint_interval": 10**6,
            "train.learning_rate": train["learning_rate"], "train.weight_decay": train["weight_decay"],
            "train.log_interval": 1, "eval.start_token": 0, "eval.batches": 20, "eval.batch_size": 6,
            "eval.smoke_prompt": "Every effort moves you"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    subprocess.run([sys.executable, "-m", "gptlib", "train", "--nproc", str(world), "--run-dir",
                    str(run), *args], check=True, capture_output=True, text=True)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("series", type=Path, help="a folder with the series' ddp_train.py and gpt.py")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--ga", type=int, default=2)
    args = parser.parse_args()
    from gptlib.data import write_token_file
    from gptlib.tokenizer import get_tokenizer

    enc = get_tokenizer()
    gen = torch.Generator().manual_seed(0)
    tokens = [t for i in torch.randint(0, len(SENTENCES), (3000,), generator=gen).tolist()
              for t in enc.encode(" " + SENTENCES[i])]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_token_file(data / "train.safetensors", tokens)
        write_token_file(data / "validation.safetensors", tokens[-4000:])
        for world in (1, 2):
            train = {"microbatch_size": 2, "gradient_accumulation_steps": args.ga,
                     "min_train_tokens": args.steps * 2 * args.ga * world * MODEL["context_length"],
                     "learning_rate": 4e-4, "weight_decay": 0.1}
            out = Path(tmp) / f"series-{world}"
            out.mkdir()
            mp.spawn(_series_rank, args=(world, args.series, data, train, out), nprocs=world)
            run = _gptlib_run(Path(tmp), data, world, train)
            theirs = json.loads((out / "series-losses.json").read_text())
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            ours = [v for r in records for v in r["rank0_losses"]]
            assert len(ours) == len(theirs), (len(ours), len(theirs))
            loss_gap = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
            latest = (run / "checkpoints" / "latest").read_text().strip()
            mine = load_file(str(run / "checkpoints" / latest / "model.safetensors"))
            series_weights = load_file(str(out / "series-model.safetensors"))
            weight_gap = max((mine[k] - series_weights[k]).abs().max().item() for k in mine)
            summary = json.loads((run / "summary.json").read_text())
            scored = _series_test_loss(args.series, mine, data)
            print(f"{world} rank(s), GA {args.ga}, {len(records)} steps: rank-0 micro-batch losses "
                  f"agree to {loss_gap:.1e} (max |diff|), final weights to {weight_gap:.1e}; test loss "
                  f"gptlib {summary['test_loss']:.6f} ({summary['eval_precision']}), the series' scorer "
                  f"{scored:.6f} (|diff| {abs(scored - summary['test_loss']):.1e})")


if __name__ == "__main__":
    main()
