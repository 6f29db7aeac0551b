"""How figures read on a page or a terminal line."""

from __future__ import annotations

import datetime
import math
import sys


def format_duration(seconds: float | None) -> str:
    """`H:MM:SS`, rounded to the second; "—" when there is no figure."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "—"
    return str(datetime.timedelta(seconds=round(float(seconds))))


def in_kernel() -> bool:
    """True inside a Jupyter kernel (where display outputs go to the notebook)."""
    if "IPython" not in sys.modules:
        return False
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def notice(message: str) -> None:
    """A progress or status line: on stderr in a terminal, on stdout inside a Jupyter kernel (where
    stderr renders as an error box, and papermill --log-output logs stdout)."""
    print(message, file=sys.stdout if in_kernel() else sys.stderr, flush=True)
