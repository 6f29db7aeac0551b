"""A run directory's files, and the one place that reads and writes them.

    RUN_DIR/config.yaml      the resolved configuration
    RUN_DIR/metrics.jsonl    one record per optimizer step (rank 0)
    RUN_DIR/spikes.json      the loss spikes found so far
    RUN_DIR/summary.json     status, end-of-run figures and evaluations, merged key by key
    RUN_DIR/checkpoints/     see gptlib.checkpoint
    RUN_DIR/logs/rank-N.log  every line a rank logged, tracebacks included
"""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import torch

from gptlib.checkpoint import write_text_atomic
from gptlib.config import ConfigError, one_line
from gptlib.paths import short_path

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SPIKES = "spikes.json"
SUMMARY = "summary.json"
# Files a run writes into its directory; --overwrite removes exactly these (never train.ipynb,
# which papermill may be writing at that moment).
RUN_FILES = (CONFIG, METRICS, SPIKES, SUMMARY, "checkpoints", "logs", "charts", "publish")


class RunFileError(ConfigError):
    """A run file that exists but does not hold what gptlib writes there."""


def read_json(path: str | Path, default: object = None) -> object:
    """The JSON in `path`, or `default` when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def read_json_object(path: str | Path, error: type[Exception]) -> dict:
    """The JSON object in `path`; anything else (missing, unreadable, not JSON, not an object)
    raises `error` with a one-line message naming the file."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise error(f"{short_path(path)}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise error(f"{short_path(path)}: not UTF-8 text, so not JSON") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise error(f"{short_path(path)}: invalid JSON ({one_line(e)})") from None
    if not isinstance(data, dict):
        raise error(f"{short_path(path)}: expected a JSON object, got {type(data).__name__}")
    return data


def read_summary(run_dir: str | Path) -> dict:
    """A run's summary.json ({} when it has none or it cannot be read)."""
    summary = read_json(Path(run_dir) / SUMMARY, {})
    return summary if isinstance(summary, dict) else {}


def merge_summary(run_dir: str | Path, values: dict) -> None:
    """Write `values` into summary.json, keeping the keys it already holds (atomic)."""
    path = Path(run_dir) / SUMMARY
    previous = read_summary(run_dir)  # {} for a garbage file, which this write replaces
    write_text_atomic(path, json.dumps({**previous, **values}, indent=2) + "\n")


def record_evaluation(run_dir: str | Path, result: dict, primary: bool) -> None:
    """Store an evaluation under summary.json's ``evaluations`` (by checkpoint, with its batch
    count when it did not score the whole slice the config asks for); the ``primary`` one is also
    the run's result (``test_loss``, ``eval_checkpoint`` ... at the top level)."""
    key = result["eval_checkpoint"] + ("" if primary else f" ({result['eval_batches']:,} batches)")
    evaluations = {**read_summary(run_dir).get("evaluations", {}), key: result}
    merge_summary(run_dir, {**(result if primary else {}), "evaluations": evaluations})


def read_status(run_dir: str | Path) -> str:
    """summary.json's status, or "no summary"."""
    summary = read_json(Path(run_dir) / SUMMARY)
    return summary.get("status", "unknown") if isinstance(summary, dict) else "no summary"


def read_spikes(run_dir: str | Path) -> list[dict]:
    """spikes.json's entries, leniently ([] for a missing or garbage file): for charts."""
    spikes = read_json(Path(run_dir) / SPIKES, [])
    return [s for s in spikes if isinstance(s, dict)] if isinstance(spikes, list) else []


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _spike_is_valid(spike: object) -> bool:
    if not isinstance(spike, dict) or not isinstance(spike.get("step"), int):
        return False
    windows = spike.get("windows")
    return (all(_number(spike.get(key)) for key in ("loss", "level", "lr"))
            and isinstance(windows, dict)
            and all(isinstance(w, list) and all(isinstance(i, int) for i in w)
                    for w in windows.values()))


def load_spikes(run_dir: str | Path) -> list[dict]:
    """spikes.json's entries, strictly ([] when there is no file): anything but the list of spikes
    a run writes is one RunFileError naming the file. For the spike analysis and a resume."""
    path = Path(run_dir) / SPIKES
    if not path.exists():
        return []
    try:
        spikes = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RunFileError(f"{short_path(path)}: not readable JSON ({one_line(error)})") from None
    if not isinstance(spikes, list):
        raise RunFileError(f"{short_path(path)}: expected a list of spikes, got {type(spikes).__name__}")
    bad = next((i for i, spike in enumerate(spikes) if not _spike_is_valid(spike)), None)
    if bad is not None:
        raise RunFileError(f"{short_path(path)}: entry {bad} is not a spike gptlib wrote (needs step, "
                           "loss, level, lr and windows)")
    return spikes


def versions() -> dict:
    """The library versions a run records in its summary."""
    import tiktoken

    from gptlib import __version__

    return {
        "gptlib": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tiktoken": tiktoken.__version__,
        "cuda": torch.version.cuda,
    }


def git_commit() -> str | None:
    """The commit of the gptlib checkout that trained, when it is one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def end_of_run_lines(summary: dict) -> list[str]:
    """The series' closing lines."""
    return [
        f"Training complete in {summary['wall_time_s']:.2f} seconds",
        f"Tokens seen: {summary['tokens_seen']:,}",
        f"Throughput: {summary['tokens_per_s']:,.0f} tokens/second",
        f"Final train loss: {summary['final_train_loss']:.3f}",
    ]
