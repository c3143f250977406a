"""One table over runs (data, backbone, attention, beam, val/test metrics, epochs, minutes) + val BLEU-4 curves."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from pipeline.errors import UserError
from pipeline.training.runs import read_config, read_log
from pipeline.reporting.viz import plot_bleu4

COLUMNS = ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
SPICE = "SPICE"     # a column only when some run was scored with the SPICE jars installed (make spice)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def run_row(run_dir: Path) -> dict:
    """What the report shows for one run, from the files train.py and score.py write (runs.py);
    absent pieces stay None."""
    cfg = read_config(run_dir)
    provs = [f.get("provenance") or {} for f in cfg.get("features") or []]
    log = read_log(run_dir)
    row = {"run": run_dir.name,
           "dataset": provs[0].get("dataset") if provs else None,
           "backbone": "+".join(str(p.get("backbone")) for p in provs) or None,   # several: a fused run
           "attention": (cfg.get("decoder") or {}).get("attention"),
           "epochs": log[-1].get("epoch") if log else None,
           "minutes": sum((r.get("train_s") or 0) + (r.get("val_s") or 0) for r in log) / 60 if log else None,
           "beam": None, "val": {}, "test": {}}
    for split in ("val", "test"):
        s = _json(run_dir / f"scores_{split}.json")
        if s:
            row[split] = s.get("metrics", {}) or {}
            row["beam"] = row["beam"] or s.get("beam")
            if s.get("attention", {}).get("words"):
                row[split] = dict(row[split], att_mass=s["attention"]["mass_in_box"])
    return row


def _fmt(v, scale=1.0, nd=2):
    return "" if v is None else f"{v * scale:.{nd}f}" if isinstance(v, (int, float)) else str(v)


def markdown_table(rows: list[dict]) -> str:
    has_test = any(r["test"] for r in rows)
    has_att = any("att_mass" in r["val"] or "att_mass" in r["test"] for r in rows)
    cols = COLUMNS + ((SPICE,) if any(SPICE in r["val"] or SPICE in r["test"] for r in rows) else ())
    metric_cols = [("val", m) for m in cols] + ([("val", "att_mass")] if has_att else [])
    if has_test:
        metric_cols += [("test", m) for m in cols] + ([("test", "att_mass")] if has_att else [])
    head = ["run", "dataset", "backbone", "attention", "beam"] + \
           [f"{s} {m.replace('_', '-').replace('att-mass', 'att.acc')}" for s, m in metric_cols] + ["epochs", "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 5 + ["---:"] * (len(head) - 5)) + "|"]
    for r in rows:
        cells = [r["run"], _fmt(r["dataset"]), _fmt(r["backbone"]), _fmt(r["attention"]), _fmt(r["beam"], nd=0)]
        cells += [_fmt(r[s].get(m), 100) for s, m in metric_cols]
        cells += [_fmt(r["epochs"], nd=0), _fmt(r["minutes"], nd=1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def find_runs(run_dirs: Sequence[str | Path]) -> list[Path]:
    if not run_dirs:
        base = Path("runs")
        found = sorted(p for p in base.glob("*") if p.is_dir()) if base.is_dir() else []
        found = [p for p in found if any((p / f).exists() for f in ("config.json", "log.jsonl", "best.pt", "last.pt"))]
        if not found:
            raise UserError("runs/: no run directories. Train one with `pipeline train`, or pass RUN_DIRS.")
        return found
    out = []
    for d in map(Path, run_dirs):
        if not d.is_dir():
            raise UserError(f"{d}: not a directory (pass run directories like runs/NAME).")
        out.append(d)
    return out


def make_report(run_dirs: Sequence[str | Path], out: str | Path = "runs/report.md", log=print) -> dict:
    dirs = find_runs(run_dirs)
    rows = [run_row(d) for d in dirs]
    table = markdown_table(rows)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = plot_bleu4({d.name: read_log(d) for d in dirs}, out.with_suffix(".png"))
    text = "# Runs\n\nMetrics x100 (pycocoevalcap, PTB-tokenized, all references); att.acc = attention " \
           "mass inside the named object's box (synthetic data).\n\n" + table + "\n"
    if png:
        text += f"\n![val BLEU-4]({png.name})\n"
    out.write_text(text)
    log(table)
    log(f"report: {out}" + (f", val BLEU-4 curves: {png}" if png else " (no BLEU-4 in any log.jsonl: no curves)"))
    return {"rows": rows, "markdown": out, "png": png}
