"""`gptlib bench --tiny`: the miniature's training speed against the earlier tiny shape, side by side.

Three gptlib training steps (the loop's own `micro_batch_loss`, fused AdamW, bf16 autocast where the
CPU has it), each side in fresh processes, rounds alternating the order (`gptlib.bench`'s
machinery):

* `previous tiny`: the earlier default shape -- GPT-2's 50,257-token head, 4 layers x 4 heads x 128,
  context 128, micro-batch 8 -- with torch's own CPU dropout;
* `tiny, torch dropout`: the `tiny` scale's shape with torch's CPU dropout;
* `tiny`: the `tiny` scale as it trains.

Tokens of the two tokenizers differ in length, so the table also gives the corpus text each side
reads per second: tokens/s x the characters per token of its tokenizer on the built-in corpus's
validation split (decoded, then re-encoded with GPT-2).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from gptlib.bench import measure_sides
from gptlib.config import ModelConfig
from gptlib.presets import resolve_config

PREVIOUS_TINY = ModelConfig(vocab_size=50257, context_length=128, emb_dim=128, n_heads=4, n_layers=4,
                            drop_rate=0.1)
PREVIOUS_MICROBATCH = 8


def chars_per_token() -> dict[str, float]:
    """Characters per token of the tiny scale's BPE and of GPT-2 on the built-in validation text."""
    from gptlib.sources import dataset_split, open_tokenizer
    from gptlib.tokenizer import GPT2Tokenizer

    cfg = resolve_config("tiny")
    bpe = open_tokenizer(cfg.train.dataset)
    split = dataset_split(cfg.train.dataset, "validation")
    ids = split.read(0, len(split)).tolist()
    text = bpe.decode(ids)
    gpt2 = sum(len(doc) for doc in GPT2Tokenizer().encode_documents(text.split("<|endoftext|>")))
    return {"tiny": len(text) / len(ids), "gpt2": len(text) / gpt2}


def run(rounds: int = 3, steps: int = 30, warmup: int = 5, json_path: Path | None = None,
        verbose: bool = True) -> dict:
    """Measure the three sides (progress on stderr); the JSON-ready result, also written to
    `json_path` when given."""
    from gptlib.device import cpu_has_bf16

    tiny = resolve_config("tiny")
    precision = "bf16" if cpu_has_bf16() else "fp32"
    base = {"task": "train", "device": "cpu", "seed": 42, "verbose": False, "precision": precision,
            "steps": steps, "warmup": warmup, "compile": False, "learning_rate": 4e-4,
            "weight_decay": 0.1, "side": "gptlib"}
    specs = {
        "previous tiny": {**base, "model": dataclasses.asdict(PREVIOUS_TINY),
                          "microbatch": PREVIOUS_MICROBATCH, "ablate": ["fast-dropout"]},
        "tiny, torch dropout": {**base, "model": dataclasses.asdict(tiny.model),
                                "microbatch": tiny.train.microbatch_size, "ablate": ["fast-dropout"]},
        "tiny": {**base, "model": dataclasses.asdict(tiny.model),
                 "microbatch": tiny.train.microbatch_size, "ablate": []},
    }
    def say(message: str) -> None:
        if verbose:
            print(f"bench: {message}", file=sys.stderr, flush=True)

    rows = measure_sides(0, rounds, "training", say, specs)
    per_token = chars_per_token()
    result: dict[str, Any] = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "precision": precision,
                              "rounds": rounds, "steps": steps, "warmup": warmup,
                              "chars_per_token": per_token, "sides": {}}
    for name, row in rows.items():
        chars = per_token["gpt2"] if name == "previous tiny" else per_token["tiny"]
        result["sides"][name] = {
            "model": specs[name]["model"], "microbatch": specs[name]["microbatch"],
            "ablate": specs[name]["ablate"], "tokens_per_s": row["tokens_per_s"],
            "chars_per_s": row["tokens_per_s"] * chars, "cpu_use": row["cpu_use"],
            "median_step_s": row["median_s"], "peak_rss_mb": row["peak_rss_mb"]}
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def format_table(result: dict) -> str:
    sides = result["sides"]
    before = sides["previous tiny"]
    lines = [f"tiny training step, {result['precision']}, {result['rounds']} rounds x {result['steps']} "
             f"timed steps per side (medians)",
             f"{'side':<22}{'vocab':>7}{'emb':>5}{'tokens/s':>10}{'chars/s':>10}{'CPU':>6}"
             f"{'vs previous':>13}"]
    for name, row in sides.items():
        m = row["model"]
        lines.append(f"{name:<22}{m['vocab_size']:>7}{m['emb_dim']:>5}{row['tokens_per_s']:>10,.0f}"
                     f"{row['chars_per_s']:>10,.0f}{100 * row['cpu_use']:>5.0f}%"
                     f"{row['tokens_per_s'] / before['tokens_per_s']:>12.2f}x")
    fast, torch_dropout = sides["tiny"], sides["tiny, torch dropout"]
    lines.append(f"fast CPU dropout alone: {fast['tokens_per_s'] / torch_dropout['tokens_per_s']:.2f}x; "
                 f"characters per token: tiny's BPE {result['chars_per_token']['tiny']:.2f}, "
                 f"GPT-2 {result['chars_per_token']['gpt2']:.2f}")
    return "\n".join(lines)
