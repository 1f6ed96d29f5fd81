"""The training curve: one writer, one reader and one plot of ``loss_curve.tsv``.

``loss_curve.tsv`` has the columns ``step``, ``train_loss``, ``val_loss``, ``val_bacc``, ``lr``
and one ``val_bacc_<channel>`` per affinity offset (``1_0_0`` for offset (z, y, x) = (1, 0, 0))
or per class (its name, e.g. ``val_bacc_mito``; ``class<c>`` for targets without names); cells are empty where a step has no value (validation runs every
``validate_every`` steps). Training writes it (:func:`write_curve`), the report plots it
(:func:`plot_curve_file`), benchmarks and tests read it (:func:`read_curve`).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinopipe.atomic import atomic_output

Row = tuple[int, float | None, float | None, float | None, float | None, tuple[float, ...] | None]
"""(step, train_loss, val_loss, val_bacc, lr, per-channel val_bacc)."""

#: The fixed columns of ``loss_curve.tsv`` (per-channel ``val_bacc_<channel>`` columns follow).
CURVE_COLUMNS = ("step", "train_loss", "val_loss", "val_bacc", "lr")


def channel_names(offsets: Sequence[Sequence[int]], num_classes: int | None = None,
                  class_names: Sequence[str] | None = None) -> list[str]:
    """Names of the per-channel validation columns: ``1_0_0`` per offset (z, y, x), or per class
    its name (``class_names``, one per class) or, for targets that record no names, ``class<c>``."""
    if num_classes:
        if class_names is not None and len(class_names) == num_classes:
            return [str(n) for n in class_names]
        return [f"class{c}" for c in range(num_classes)]
    return ["_".join(str(int(v)) for v in o) for o in offsets]


def write_curve(path: str | Path, rows: Sequence[Row], channels: Sequence[str] = ()) -> None:
    """Write ``rows`` as ``loss_curve.tsv`` (atomically); ``channels`` name the per-channel columns."""

    def fmt(value: float | None) -> str:
        return "" if value is None else f"{value:.8g}"

    def cells(r: Sequence[Any]) -> list[Any]:
        per = r[5] if len(r) > 5 and r[5] is not None else [None] * len(channels)
        return [*r[1:5], *per]

    header = [*CURVE_COLUMNS, *(f"val_bacc_{c}" for c in channels)]
    lines = ["\t".join(header)] + [f"{r[0]}\t" + "\t".join(fmt(v) for v in cells(r)) for r in rows]
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def read_curve(path: str | Path) -> list[dict[str, str]]:
    """The rows of a ``loss_curve.tsv`` as dicts of strings (empty string: no value).

    Raises:
        ValueError: the file is not a loss curve (no ``step`` column), naming it.
    """
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise ValueError(f"{path}: expected a TSV with the columns {list(CURVE_COLUMNS)}")
        return list(reader)


def curve_rows(path: str | Path) -> list[Row]:
    """The rows of a ``loss_curve.tsv`` as :data:`Row` tuples (non-finite values as None)."""

    def num(value: str | None) -> float | None:
        if value in (None, ""):
            return None
        v = float(value)
        return v if math.isfinite(v) else None

    rows: list[Row] = []
    for r in read_curve(path):
        per = tuple(num(v) for k, v in r.items() if k.startswith("val_bacc_"))
        rows.append((int(r["step"]), num(r.get("train_loss")), num(r.get("val_loss")), num(r.get("val_bacc")),
                     num(r.get("lr")), per if any(v is not None for v in per) else None))  # type: ignore[arg-type]
    return rows


def plot_curve(path: str | Path, rows: Sequence[Row]) -> None:
    """Loss curve PNG (written atomically): train loss, its running mean and the validation loss
    against the step; the validation balanced accuracy beside it (0.5: chance)."""
    import matplotlib  # heavy, and only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r[0] for r in rows if r[1] is not None])
    train_loss = np.array([r[1] for r in rows if r[1] is not None], dtype=float)
    val = [(r[0], r[2], r[3]) for r in rows if r[2] is not None]
    fig, (ax, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if len(steps):
        ax.plot(steps, train_loss, color="C0", alpha=0.3, lw=0.8, label="train (per step)")
        window = max(1, len(steps) // 20)
        smooth = np.convolve(train_loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color="C0", label=f"train (mean of {window})")
    if val:
        ax.plot([v[0] for v in val], [v[1] for v in val], "o-", color="C1", label="validation")
        ax_acc.plot([v[0] for v in val if v[2] is not None], [v[2] for v in val if v[2] is not None], "o-",
                    color="C2")
    if not len(steps) and not val:
        ax.text(0.5, 0.5, "no loss values", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="step", ylabel="loss", title="loss")
    if len(steps) or val:
        ax.legend()
    ax_acc.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax_acc.set(xlabel="step", ylabel="balanced accuracy", title="validation balanced accuracy (0.5: chance)",
               ylim=(0, 1))
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_curve_file(curve_tsv: str | Path, out_png: str | Path) -> None:
    """Plot a ``loss_curve.tsv`` into a PNG (the report's loss curve)."""
    plot_curve(out_png, curve_rows(curve_tsv))
