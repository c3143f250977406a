"""matplotlib on the Agg backend (no display) and one way to save a figure: what every picture of the
pipeline (training curves, attention maps, report plots) shares."""
from __future__ import annotations

from pathlib import Path


def plt_agg():
    """matplotlib.pyplot with the Agg backend (imported on first use: `pipeline --help` stays fast)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, out) -> Path:
    """Lay out, write (creating the folder) and close `fig`; returns the path. The file is written like
    every other (fileio.atomic_write): whole or not at all, and never through a link planted at `out`."""
    from pipeline.fileio import atomic_write
    plt = plt_agg()
    out = Path(out)
    try:
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda tmp: fig.savefig(tmp, format=out.suffix[1:].lower() or "png", dpi=100))
    finally:
        plt.close(fig)
    return out
