"""Figures for the benchmark and fidelity reports, drawn off-screen with matplotlib."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["figure"]


@contextlib.contextmanager
def figure(path: str | Path, dpi: int, **subplots: Any) -> Iterator[Any]:
    """The axes of ``plt.subplots(**subplots)``; when the block ends the figure is laid out, written to
    ``path`` and closed (closed on an error too). Draws with Agg: no display is needed.

    Example:
        >>> with figure(out_dir / "speedup.png", dpi=130, figsize=(5, 3.6)) as ax:  # doctest: +SKIP
        ...     ax.plot(sizes, sizes, "k--")
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**subplots)
    try:
        yield axes
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
