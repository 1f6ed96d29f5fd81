"""Logging set-up for workflow scripts and the command line."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
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
    logging.captureWarnings(True)  # Python warnings (e.g. from torch) reach the log too
    log = logging.getLogger("dinopipe")
    try:
        yield log
    except Exception:
        log.exception("failed")
        raise
    finally:
        for h in handlers:
            h.close()
        logging.captureWarnings(False)
        root.setLevel(old[0])
        root.handlers = old[1]


class Progress:
    """Progress of a long loop as log lines, so that it reaches the rule's log in ``logs/``
    and the cluster job's output alike (a terminal progress bar is invisible in both: no TTY).

    A line at most every ``interval_s`` seconds and one at the end, e.g.
    ``features vol_a: 1536/3072 slices (50 %), 12.3 slices/s, about 2.1 min left (loss 0.41)``.
    Use as a context manager; ``update(n)`` after each piece of work.

    Args:
        total: How many units the loop will do (None: unknown, no percentage or ETA).
        desc: What is being done, e.g. ``"train"`` or ``"features vol_a"``.
        unit: The unit's name, e.g. ``"slice"``, ``"block"``, ``"step"``.
        initial: Units already done (a resumed run); excluded from the rate.
        interval_s: Seconds between lines (0: a line at every update).
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, initial: int = 0,
                 interval_s: float = 30.0, logger: logging.Logger | None = None) -> None:
        self.total, self.desc, self.unit, self.interval_s = total, desc, unit, interval_s
        self.n = self.initial = initial
        self.postfix: dict[str, object] = {}
        self._log = logger or logging.getLogger("dinopipe.progress")
        self._start = self._last = time.monotonic()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_postfix(self, **values: object) -> None:
        """Values shown in brackets after the next lines (e.g. the current loss)."""
        self.postfix = values

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units; log a line when ``interval_s`` has passed since the last."""
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self._log.info("%s", self.line(now))

    def close(self) -> None:
        """Log the final count (once, whatever was logged before)."""
        if self._start is not None:
            self._log.info("%s", self.line(time.monotonic()))
            self._start = None

    def line(self, now: float) -> str:
        """The progress line at time ``now`` (``time.monotonic()`` seconds)."""
        elapsed = now - (self._start if self._start is not None else now)
        done = self.n - self.initial
        plural = "" if self.unit.endswith("s") else "s"
        text = f"{self.desc}: {self.n}"
        if self.total:
            text += f"/{self.total} {self.unit}{plural} ({100 * self.n / self.total:.0f} %)"
        else:
            text += f" {self.unit}{plural}"
        if elapsed > 0 and done > 0:
            rate = done / elapsed
            text += f", {rate:.3g} {self.unit}{plural}/s"
            if self.total and self.n < self.total:
                left = (self.total - self.n) / rate
                text += f", about {left / 60:.1f} min left" if left >= 60 else f", about {left:.0f} s left"
        if self.postfix:
            text += " (" + ", ".join(f"{k} {v}" for k, v in self.postfix.items()) + ")"
        return text
