"""A run's training curves (curves.png) from its log.jsonl: losses in one panel, val metrics in another.
The picture is written like every file of a run (figures.save_figure: atomically, never through a link
planted at its name)."""
from __future__ import annotations

from pathlib import Path

from pipeline.figures import plt_agg as _plt, save_figure as _save
from pipeline.training.runs import read_log

# The fields train.py logs per epoch (runs.LOG_FIELDS): losses on the left, val metrics on the right.
LOSSES = ("loss", "nll", "reward")
METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "cider")


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Training curves of one run from its log.jsonl: losses in one panel, val metrics in another."""
    rows = read_log(run_dir)
    if not rows:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    x = [r.get("epoch", i + 1) for i, r in enumerate(rows)]
    for ax, keys, title in ((axes[0], LOSSES, "loss"), (axes[1], METRICS, "validation metrics")):
        drawn = 0
        for k in keys:
            pts = [(xi, r[k]) for xi, r in zip(x, rows) if isinstance(r.get(k), (int, float)) and
                   not (k == "reward" and r.get("objective") != "scst")]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=k)
                drawn += 1
        ax.set_xlabel("epoch")
        ax.set_title(title)
        if drawn:
            ax.legend(fontsize=8)
    fig.suptitle(Path(run_dir).name)
    return _save(fig, out or Path(run_dir) / "curves.png")
