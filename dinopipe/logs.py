"""Logging set-up for workflow scripts and the command line."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def logged(path: str | Path | None, level: int = logging.INFO) -> Iterator[logging.Logger]:
    """Route logging to ``path`` (and stderr) for the duration.

    An exception raised inside is written to the log with its traceback and re-raised,
    so a failed rule's log says why it failed.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, mode="w"))
    root = logging.getLogger()
    old = (root.level, list(root.handlers))
    root.handlers = []
    for h in handlers:
        h.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(h)
    root.setLevel(level)
    log = logging.getLogger("dinopipe")
    try:
        yield log
    except Exception:
        log.exception("failed")
        raise
    finally:
        for h in handlers:
            h.close()
        root.setLevel(old[0])
        root.handlers = old[1]
