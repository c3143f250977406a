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
    """Lay out, write (creating the folder) and close `fig`; returns the path."""
    plt = plt_agg()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
