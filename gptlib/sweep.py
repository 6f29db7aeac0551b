"""Sweeps: render ``notebooks/train.ipynb`` with papermill once per run, then the summary notebook.

Runs go one after another (each may use every GPU). Every run's config is resolved before the first
one starts, so a typo in an intervention name or override fails in seconds. A run whose
``summary.json`` says ``completed`` is skipped unless ``force``; any other run directory (failed,
interrupted, partial) is trained again from scratch (``overwrite``). A failing run is reported at
the end and does not stop the others; the summary notebook is rendered in any case into
``outputs/<scale>/summary.ipynb``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptlib.config import ConfigError
from gptlib.display import format_duration
from gptlib.launch import default_run_dir
from gptlib.paths import OUTPUTS_DIR, SUMMARY_NOTEBOOK, TRAIN_NOTEBOOK, short_path
from gptlib.presets import list_interventions, resolve_config
from gptlib.rundir import read_summary

__all__ = ["PlannedRun", "RunOutcome", "parse_interventions", "plan", "render_notebook", "sweep",
           "report_lines"]

KERNEL = "python3"


@dataclass
class PlannedRun:
    """One run of a sweep: what the train notebook gets as parameters, and where it lands."""

    name: str
    intervention: str
    seed: int
    run_dir: Path


@dataclass
class RunOutcome:
    """What happened to one run (or to the summary notebook): completed, skipped or failed."""

    name: str
    status: str
    notebook: Path
    error: str = ""
    seconds: float = 0.0


def parse_interventions(spec: str | Sequence[str]) -> list[str]:
    """``"all"`` (every intervention file, baseline first) or comma-separated names; each name
    may combine interventions with ``+``."""
    if isinstance(spec, str):
        if spec.strip() == "all":
            names = list_interventions()
            return sorted(names, key=lambda n: n != "baseline")
        spec = spec.split(",")
    names = [n.strip() for n in spec if n.strip()]
    if not names:
        raise ConfigError("--interventions: no names given; use all or a,b,c")
    return list(dict.fromkeys(names))


def plan(
    scale: str,
    interventions: str | Sequence[str] = "all",
    seeds: Sequence[int] = (42,),
    overrides: dict[str, Any] | None = None,
    nproc: int | str = "auto",
    outputs: str | Path | None = None,
    every_seed: str | Sequence[str] | None = None,
) -> list[PlannedRun]:
    """Resolve (and so validate) every run of the sweep, seed by seed; duplicates by run name are
    dropped. With ``every_seed`` (names, as ``interventions``), only those interventions run on
    every seed and the others on the first seed alone."""
    names = parse_interventions(interventions)
    repeated = None if every_seed is None else parse_interventions(every_seed)
    for name in repeated or []:
        if name not in names:
            raise ConfigError(f"--every-seed {name!r} is not among the sweep's interventions; "
                              f"allowed: {', '.join(names)}")
    runs: dict[str, PlannedRun] = {}
    for i, seed in enumerate(seeds):
        for intervention in names:
            if i > 0 and repeated is not None and intervention not in repeated:
                continue
            cfg = resolve_config(scale, intervention, seed=seed, overrides=overrides, nproc=nproc)
            run_dir = default_run_dir(cfg, Path(outputs or OUTPUTS_DIR))
            runs.setdefault(cfg.run_name, PlannedRun(cfg.run_name, intervention, seed, run_dir))
    return list(runs.values())


class _LogTail(threading.Thread):
    """Print the lines appended to a log file (started over when the file is replaced)."""

    def __init__(self, path: Path, prefix: str, log: Callable[[str], None]) -> None:
        super().__init__(daemon=True)
        self.path, self.prefix, self.log = path, prefix, log
        self.stopped = threading.Event()
        try:  # lines already there belong to an earlier attempt
            stat = path.stat()
            self.inode, self.offset = stat.st_ino, stat.st_size
        except FileNotFoundError:
            self.inode, self.offset = None, 0

    def poll(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return
        if stat.st_ino != self.inode or stat.st_size < self.offset:
            self.inode, self.offset = stat.st_ino, 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            self.log(self.prefix + line)

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            self.poll()
        self.poll()


def render_notebook(source: Path, output: Path, parameters: dict[str, Any],
                    cwd: str | Path | None = None) -> str:
    """Execute ``source`` with papermill into ``output``; returns "" or the error it stopped on."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        papermill.execute_notebook(str(source), str(output), parameters=parameters,
                                   kernel_name=KERNEL, progress_bar=False, cwd=cwd)
    except PapermillExecutionError as error:
        return f"{error.ename}: {error.evalue}".split("\n")[0]
    except Exception as error:  # kernel died, notebook unreadable, ...
        return f"{type(error).__name__}: {error}".split("\n")[0]
    return ""


def _train_one(run: PlannedRun, scale: str, overrides: dict[str, Any], nproc: int | str,
               log: Callable[[str], None]) -> RunOutcome:
    notebook = run.run_dir / "train.ipynb"
    parameters = {"scale": scale, "intervention": run.intervention, "seed": run.seed,
                  "nproc": nproc, "overrides": overrides, "run_dir": str(run.run_dir),
                  "overwrite": True}
    tail = _LogTail(run.run_dir / "logs" / "rank-0.log", f"  {run.name} | ", log)
    tail.start()
    started = time.monotonic()
    try:
        error = render_notebook(TRAIN_NOTEBOOK, notebook, parameters)
    finally:
        tail.stopped.set()
        tail.join()
    seconds = time.monotonic() - started
    return RunOutcome(run.name, "failed" if error else "completed", notebook, error, seconds)


def sweep(
    scale: str = "tiny",
    interventions: str | Sequence[str] = "all",
    seeds: Sequence[int] = (42,),
    force: bool = False,
    overrides: dict[str, Any] | None = None,
    nproc: int | str = "auto",
    outputs: str | Path | None = None,
    log: Callable[[str], None] = print,
    every_seed: str | Sequence[str] | None = None,
) -> list[RunOutcome]:
    """Train every planned run that is not completed yet, then render the summary notebook.

    Returns one outcome per run and a last one named ``summary`` for the summary notebook.
    """
    overrides = dict(overrides or {})
    outputs = Path(outputs or OUTPUTS_DIR).absolute()
    if outputs.exists() and not outputs.is_dir():
        raise ConfigError(f"--outputs {outputs} is a file; give the folder the runs go in")
    runs = plan(scale, interventions, seeds, overrides, nproc, outputs, every_seed)
    log(f"sweep {scale}: {len(runs)} runs ({', '.join(r.name for r in runs)}) -> {short_path(outputs)}")
    outcomes: list[RunOutcome] = []
    for i, run in enumerate(runs, 1):
        head = f"[{i}/{len(runs)}] {run.name}"
        summary = read_summary(run.run_dir)
        if summary.get("status") == "completed" and not force:
            hint = "" if "test_loss" in summary else \
                f" (not evaluated: gptlib eval {short_path(run.run_dir)})"
            log(f"{head}: completed earlier, skipped{hint}")
            outcomes.append(RunOutcome(run.name, "skipped", run.run_dir / "train.ipynb"))
            continue
        log(f"{head}: training -> {short_path(run.run_dir / 'train.ipynb')}")
        outcome = _train_one(run, scale, overrides, nproc, log)
        test_loss = read_summary(run.run_dir).get("test_loss")
        result = f"test loss {test_loss:.6f}" if outcome.status == "completed" and test_loss else ""
        log(f"{head}: {outcome.status} in {format_duration(outcome.seconds)}"
            + (f", {result}" if result else "") + (f": {outcome.error}" if outcome.error else ""))
        outcomes.append(outcome)

    notebook = outputs / scale / "summary.ipynb"
    log(f"summary -> {short_path(notebook)}")
    error = render_notebook(SUMMARY_NOTEBOOK, notebook,
                            {"scale": scale, "outputs_dir": str(outputs)})
    outcomes.append(RunOutcome("summary", "failed" if error else "completed", notebook, error))
    return outcomes


def report_lines(outcomes: Sequence[RunOutcome]) -> list[str]:
    """The end-of-sweep report: counts, then each failure with the notebook to read."""
    counts = {s: sum(o.status == s for o in outcomes if o.name != "summary")
              for s in ("completed", "skipped", "failed")}
    lines = [f"sweep done: {counts['completed']} trained, {counts['skipped']} skipped, "
             f"{counts['failed']} failed"]
    for o in outcomes:
        if o.status == "failed":
            lines.append(f"  FAILED {o.name}: {o.error} (see {short_path(o.notebook)})")
    return lines

