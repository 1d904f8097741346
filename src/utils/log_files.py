"""A log file handler that survives what a run's data and disk throw at it."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


class ResilientFileHandler(logging.FileHandler):
    """FileHandler for a run's log: file names that are not UTF-8 are written escaped, and a log file that
    can no longer be written (a full disk) says so once on stderr and stops, instead of printing a
    traceback for every message."""

    def __init__(self, filename: str, mode: str = "a", delay: bool = False) -> None:
        Path(filename).parent.mkdir(parents=True, exist_ok=True)
        super().__init__(filename, mode=mode, encoding="utf-8", delay=delay, errors="backslashreplace")
        self.broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.broken:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        err = sys.exc_info()[1]
        if isinstance(err, OSError):
            self.broken = True
            print(f"Logging to {self.baseFilename} stopped: {err.strerror or err}.", file=sys.stderr)
            return
        super().handleError(record)
