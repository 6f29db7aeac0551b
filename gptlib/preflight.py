"""What the launcher checks before any worker starts, so that a bad input costs seconds, not the
hours a full-scale run takes to reach the step that would fail: the run folder (a name, writable,
a gptlib run before ``--overwrite`` removes anything), disk space, memory, process count, the token
ids of both splits, the evaluation slice, and a resume target's files.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from gptlib import checkpoint as ckpt
from gptlib import rundir
from gptlib.config import ConfigError, RunConfig
from gptlib.data import DataError, TokenFile
from gptlib.metrics import read_metrics
from gptlib.model import GPTModel, count_parameters
from gptlib.paths import short_path

FULL_PASS_TOKENS = 50_000_000  # token files up to this size get every id checked; larger ones a sample
SAMPLE_TOKENS = 4_000_000  # ... spread over the file in 64 stretches
BOOLEAN_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def parse_bool(name: str, value: object) -> bool:
    """A yes/no parameter, strictly: a bool, or true/false/yes/no/1/0 in any case; else one line."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in BOOLEAN_WORDS:
        return BOOLEAN_WORDS[value.strip().lower()]
    raise ConfigError(f"{name}={value!r}: not a yes/no value; allowed: true, false, yes, no, 1, 0")


def run_dir_path(run_dir: str | Path) -> Path:
    """The run directory named, refusing an empty name (which would train into the current folder)."""
    if not isinstance(run_dir, str | os.PathLike):
        raise ConfigError(f"run_dir={run_dir!r}: expected a folder path as text (papermill: pass it "
                          "with -r run_dir ... to keep it a string)")
    if not str(run_dir).strip():
        raise ConfigError("run_dir is empty: name a folder for the run (or leave it unset for "
                          "outputs/<scale>/<run-name>)")
    return Path(run_dir)


def resume_target(resume: object) -> str | None:
    """The checkpoint a run resumes from: None (start afresh), latest, best or step-N."""
    if resume is None or resume == "":
        return None
    if not isinstance(resume, str) or not re.fullmatch(r"latest|best|step-\d+", resume):
        raise ConfigError(f"resume={resume!r}: allowed: latest, best, step-N, or None to start afresh")
    return resume


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_writable(run_dir: Path) -> None:
    """Fail unless the run directory (or the folder it will be created in) accepts files."""
    base = _existing_ancestor(run_dir)
    if not base.is_dir():
        raise ConfigError(f"run directory {run_dir}: {base} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as error:
        raise ConfigError(f"run directory {run_dir} is not writable ({base}: {error.strerror}); "
                          "choose another with --run-dir") from None


def check_overwritable(run_dir: Path) -> list[Path]:
    """The files of a gptlib run that ``--overwrite`` may remove; refuses a folder holding files a
    run writes but no config.yaml gptlib wrote (someone else's folder), naming what is in it."""
    present = [run_dir / name for name in rundir.RUN_FILES if (run_dir / name).exists()]
    config = run_dir / rundir.CONFIG
    written_by_gptlib = config.is_file() and config.read_text(errors="replace").startswith(
        "# gptlib run config:")
    if present and not written_by_gptlib:
        contents = sorted(p.name for p in run_dir.iterdir())
        raise ConfigError(f"{run_dir} is not a gptlib run (no config.yaml written by gptlib) and holds "
                          f"{', '.join(contents[:8])}{' ...' if len(contents) > 8 else ''}: "
                          "--overwrite removes only a run's own files; choose another --run-dir")
    return present


def checkpoint_bytes(cfg: RunConfig) -> int:
    """Size of one checkpoint: fp32 weights plus AdamW's two moments, plus small files."""
    with torch.device("meta"):
        parameters = count_parameters(GPTModel(cfg.model))
    return 3 * 4 * parameters + 1_000_000


def check_disk_space(cfg: RunConfig, run_dir: Path, total_steps: int, start_step: int = 0) -> None:
    """Fail when the checkpoints this run will still write and keep (plus one being written) cannot
    fit; a resume counts only those after its checkpoint (the ones on disk already take their space)."""
    written = math.ceil((total_steps - start_step) / cfg.train.checkpoint_interval)
    keep = cfg.train.keep_checkpoints
    kept = written if keep == -1 else min(written, keep + 1)  # + the best one
    each = checkpoint_bytes(cfg)
    needed = (kept + 1) * each
    free = shutil.disk_usage(_existing_ancestor(run_dir)).free
    if needed > free:
        raise ConfigError(
            f"run directory {run_dir}: the run keeps {kept} checkpoints of {each / 1e9:.2f} GB "
            f"(needs ~{needed / 1e9:.1f} GB) but only {free / 1e9:.1f} GB is free; free space, "
            "choose another --run-dir, or set train.keep_checkpoints=N"
        )


def memory_estimate(cfg: RunConfig) -> int:
    """Bytes one training process needs, roughly: fp32 weights, gradients and AdamW's two moments,
    plus the activations autograd keeps for one micro-batch (about 34 x tokens x width + 5 x heads
    x context^2 x rows per layer at 2 bytes, doubled for fp32; Korthikanti et al. 2022, "Reducing
    Activation Recomputation in Large Transformer Models", sec. 4; flash attention keeps less) and
    the LM head's logits. An upper bound, so a refusal means the run cannot fit."""
    m, t = cfg.model, cfg.train
    with torch.device("meta"):
        parameters = count_parameters(GPTModel(m))
    rows, context = t.microbatch_size, m.context_length
    per_layer = 34 * rows * context * m.emb_dim + 5 * m.n_heads * context**2 * rows
    width = 2 if t.precision in ("fp16", "bf16") else 4
    activations = m.n_layers * per_layer * width // 2
    head = rows * context * (m.vocab_size * width + 2 * m.emb_dim * 4)  # at most a full logits tensor
    return 16 * parameters + activations + head + 400_000_000  # + the interpreter and torch


def check_resources(cfg: RunConfig, world_size: int, device: torch.device) -> None:
    """Refuse a process count the machine lacks, and a run whose estimated memory cannot fit."""
    cpus = os.cpu_count() or 1
    if device.type == "cpu" and world_size > cpus:
        raise ConfigError(f"nproc={world_size} but this machine has {cpus} CPU cores; use at most "
                          f"--nproc {cpus} on the CPU")
    need = memory_estimate(cfg)
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
        where = f"GPU {torch.cuda.get_device_name(device)} ({have / 2**30:.1f} GiB)"
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // world_size
        where = f"this machine's memory ({have * world_size / 2**30:.1f} GiB for {world_size} process(es))"
    if need > have:
        raise ConfigError(
            f"the run needs an estimated {need / 2**30:.1f} GiB per process (model "
            f"{cfg.model.n_layers} x {cfg.model.emb_dim}, context {cfg.model.context_length}, "
            f"micro-batch {cfg.train.microbatch_size}, {cfg.train.precision}) but {where} cannot "
            "hold it; lower train.microbatch_size or model.context_length")


def _ids(tokens: TokenFile) -> tuple[int, int, str]:
    """(min, max, how it was read) of a token file's ids: every id up to FULL_PASS_TOKENS, else a
    sample of SAMPLE_TOKENS in 64 stretches spread over the file."""
    array = tokens.array()
    if len(tokens) <= FULL_PASS_TOKENS:
        return int(array.min()), int(array.max()), "every id"
    stretch = SAMPLE_TOKENS // 64
    starts = np.linspace(0, len(tokens) - stretch, 64).astype(np.int64)
    parts = [array[s : s + stretch] for s in starts]
    return (min(int(p.min()) for p in parts), max(int(p.max()) for p in parts),
            f"a sample of {SAMPLE_TOKENS:,} ids")


def check_token_ids(cfg: RunConfig) -> None:
    """Every id of both splits (a sample of a split over 50M tokens) in [0, model.vocab_size)."""
    from gptlib.sources import dataset_split

    for split in ("train", "validation"):
        tokens = dataset_split(cfg.train.dataset, split)
        low, high, read = _ids(tokens)
        if low < 0 or high >= cfg.model.vocab_size:
            raise DataError(f"{tokens.path}: token ids from {low} to {high} ({read}), outside "
                            f"[0, model.vocab_size={cfg.model.vocab_size}): the dataset does not belong "
                            "to this vocabulary")


def check_eval_slice(cfg: RunConfig) -> None:
    """The held-out slice the run will be scored on fits the validation split."""
    from gptlib.evals import validation_reader

    validation_reader(cfg)


def check_resume(run_dir: Path, resume: str) -> dict:
    """The resume target's meta.json, its files verified (sha256) before any worker loads them."""
    path = ckpt.resolve_checkpoint(run_dir, resume)
    ckpt.verify_checkpoint(path)
    meta = ckpt.read_meta(path)
    count, number = (int,), (int, float)
    expected = {"world_size": count, "skipped_total": count, "wall_time_s": number,
                "tokens_seen": count, "best_loss": (*number, type(None)),
                "best_step": (int, type(None)), "period": (dict,)}
    bad = [key for key, types in expected.items()
           if not isinstance(meta.get(key), types) or isinstance(meta.get(key), bool)]
    if bad:
        raise ckpt.CheckpointError(f"{path / 'meta.json'}: {', '.join(bad)} missing or of the wrong "
                                   "type; resume from another checkpoint")
    return meta


METRIC_FIELDS = {"step": (int,), "tokens": (int,), "loss": (int, float, type(None)),
                 "lr": (int, float), "grad_norm": (int, float, type(None)), "clipped": (bool,),
                 "skipped": (bool,)}


def check_run_files(cfg: RunConfig, run_dir: Path, meta: dict, world_size: int,
                    total_steps: int) -> None:
    """The files a resume carries on from agree with the checkpoint and the config: the checkpoint
    lies within this run's steps and token count, metrics.jsonl holds one record of each step before
    it (of this run's tokens per step), and spikes.json is a list of spikes."""
    step, tokens_per_step = meta["step"], cfg.tokens_per_step(world_size)
    where = f"checkpoint step-{step} of {run_dir}"
    if step > total_steps or meta["tokens_seen"] != step * tokens_per_step:
        raise ConfigError(f"{where} saw {meta['tokens_seen']:,} tokens in {step:,} steps, but this "
                          f"config trains {total_steps:,} steps of {tokens_per_step:,} tokens: it "
                          "belongs to another run")
    path = run_dir / rundir.METRICS
    records = [r for r in read_metrics(path) if isinstance(r, dict)]
    before = [r for r in records if isinstance(r.get("step"), int) and r["step"] < step]
    steps = [r["step"] for r in before]
    if steps != list(range(step)):
        held = f"steps {steps[0]}-{steps[-1]} ({len(steps):,} record(s))" if steps else "no records"
        raise rundir.RunFileError(f"{short_path(path)} holds {held} before {where}, which needs one "
                                  f"record of each of steps 0-{step - 1}: resume from another "
                                  "checkpoint or start again with --overwrite")
    for record in before:
        wrong = [k for k, types in METRIC_FIELDS.items() if not isinstance(record.get(k), types)
                 or (types != (bool,) and isinstance(record.get(k), bool))]
        if wrong or record["tokens"] != (record["step"] + 1) * tokens_per_step:
            raise rundir.RunFileError(
                f"{short_path(path)}: the record of step {record['step']} "
                + (f"has {', '.join(wrong)} missing or of the wrong type" if wrong else
                   f"counts {record['tokens']:,} tokens, not {(record['step'] + 1) * tokens_per_step:,} "
                   f"({tokens_per_step:,} per step in this config)"))
    rundir.load_spikes(run_dir)
