"""A papermill I/O handler that creates a missing output folder under ``outputs/``.

papermill refuses to write ``outputs/tiny/baseline/train.ipynb`` before ``outputs/tiny/baseline``
exists, which is every first run. Registered for the path prefix ``outputs/`` (the entry point
group ``papermill.io`` in pyproject.toml), this handler makes the folder first; every other path
keeps papermill's own handler.
"""

from __future__ import annotations

import os

from papermill.iorw import LocalHandler


class OutputsHandler(LocalHandler):
    """papermill's local file handler, creating the output notebook's folder when missing."""

    def write(self, buf: str, path: str) -> None:
        folder = os.path.dirname(path)
        if folder:
            base = self._cwd or os.getcwd()
            os.makedirs(os.path.join(base, folder), exist_ok=True)
        super().write(buf, path)


outputs_handler = OutputsHandler()  # what the entry point names: papermill calls its methods
