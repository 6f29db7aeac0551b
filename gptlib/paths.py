"""Where the workbook's folders are: the repository root, its notebooks and the runs' outputs.

Runs land in ``<repo>/outputs/<scale>/<run-name>/`` whatever the current directory is, so the
notebooks and the CLI find the same runs when started from anywhere.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
OUTPUTS_DIR = REPO_ROOT / "outputs"
TRAIN_NOTEBOOK = NOTEBOOKS_DIR / "train.ipynb"
SUMMARY_NOTEBOOK = NOTEBOOKS_DIR / "summary.ipynb"


def short_path(path: str | Path, base: Path = REPO_ROOT) -> str:
    """A path for messages: relative to ``base`` (the repository) when inside it, as the README
    and the notebooks name them (``outputs/tiny/baseline``), else as given."""
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)
