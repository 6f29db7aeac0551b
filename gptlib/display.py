"""How figures read on a page or a terminal line."""

from __future__ import annotations

import datetime
import math


def format_duration(seconds: float | None) -> str:
    """`H:MM:SS`, rounded to the second; "—" when there is no figure."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "—"
    return str(datetime.timedelta(seconds=round(float(seconds))))
