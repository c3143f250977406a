"""One table over runs (data, backbone, attention, decoding, val/test metrics, diversity, epochs, compute) + val
BLEU-4 curves. A run scored with several decodings (`pipeline score` writes scores_<split>.<decoding>.json,
runs.decoding_name) has one row per decoding; an older run's scores_<split>.json is named by the settings
it records.

Compute: training minutes (wall) and CPU / GPU hours summed over the finished epochs of log.jsonl
(train.py records them per epoch; older logs give minutes from train_s + val_s and no CPU hours, and a
run resumed from a checkpoint that predates the recording shows its CPU hours with a ">=" since only part
of it was counted); "extract min": the wall minutes recorded in the run's cache(s) (`compute`
attribute, summed over a fused run's caches; empty when a cache is not found or predates it)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pipeline.errors import UserError
from pipeline.training.runs import read_config, read_log, scored_decodings
from pipeline.reporting.viz import plot_bleu4

COLUMNS = ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
DIVERSITY = (("vocab_size", "vocab", 1, 0), ("novel", "novel %", 100, 1), ("distinct_1", "dist-1", 1, 3),
             ("distinct_2", "dist-2", 1, 3), ("mean_length", "len", 1, 1))   # key, header, scale, decimals
SPICE = "SPICE"     # a column only when some run was scored with the SPICE jars installed (make spice)


def run_rows(run_dir: Path) -> list[dict]:
    """One row per decoding the run was scored with (val or test; runs.scored_decodings), or one row
    when it was never scored."""
    names = sorted({name for split, name, _, _ in scored_decodings(run_dir) if split in ("val", "test")})
    return [run_row(run_dir, name) for name in names] or [run_row(run_dir)]


def run_row(run_dir: Path, decoding: str | None = None) -> dict:
    """What the report shows for one run and one decoding (runs.decoding_name), from the files train.py
    and score.py write (runs.py); absent pieces stay None."""
    cfg = read_config(run_dir)
    provs = [f.get("provenance") or {} for f in cfg.get("features") or []]
    log = read_log(run_dir)
    row = {"run": run_dir.name,
           "dataset": provs[0].get("dataset") if provs else None,
           "backbone": "+".join(str(p.get("backbone")) for p in provs) or None,   # several: a fused run
           "attention": (cfg.get("decoder") or {}).get("attention"),
           "epochs": log[-1].get("epoch") if log else None,
           "decoding": decoding, "beam": None, "val": {}, "test": {}, "diversity": {}, **compute_of(log, cfg)}
    scored = {}
    for split, name, s, _ in scored_decodings(run_dir):     # a file named by its decoding wins over an older one
        if name == decoding:
            scored.setdefault(split, s)
    for split in ("val", "test"):
        s = scored.get(split)
        if s:
            row[split] = s.get("metrics", {}) or {}
            row["diversity"] = s.get("diversity", {}) if split == "val" else row["diversity"]
            row["beam"] = row["beam"] or s.get("beam")
            if s.get("attention", {}).get("words"):
                row[split] = dict(row[split], att_mass=s["attention"]["mass_in_box"])
    return row


def compute_of(log: list[dict], cfg: dict) -> dict:
    """minutes (training wall), cpu_h, gpu_h (None when no epoch recorded them), cpu_partial (some epochs
    lack them), extract_min (the caches' recorded extraction wall time)."""
    from pipeline.cache.layout import read_attrs
    out = {"minutes": sum(r["wall_s"] if "wall_s" in r else (r.get("train_s") or 0) + (r.get("val_s") or 0)
                          for r in log) / 60 if log else None}
    have = [r for r in log if "cpu_s" in r]
    out["cpu_h"] = sum(r["cpu_s"] for r in have) / 3600 if have else None
    out["gpu_h"] = sum(r.get("gpu_s") or 0 for r in have) / 3600 if have else None
    out["cpu_partial"] = bool(have) and (len(have) < len(log) or any(r.get("compute_partial") for r in have))
    mins = []
    for f in cfg.get("features") or []:
        try:
            c = read_attrs(f.get("path", "")).get("compute") if Path(f.get("path", "")).is_file() else None
        except UserError:
            c = None
        mins.append(c.get("wall_s") / 60 if isinstance(c, dict) and c.get("wall_s") is not None else None)
    out["extract_min"] = sum(mins) if mins and None not in mins else None
    return out


def _fmt(v, scale=1.0, nd=2):
    return "" if v is None else f"{v * scale:.{nd}f}" if isinstance(v, (int, float)) else str(v)


def markdown_table(rows: list[dict]) -> str:
    has_test = any(r["test"] for r in rows)
    has_att = any("att_mass" in r["val"] or "att_mass" in r["test"] for r in rows)
    cols = COLUMNS + ((SPICE,) if any(SPICE in r["val"] or SPICE in r["test"] for r in rows) else ())
    metric_cols = [("val", m) for m in cols] + ([("val", "att_mass")] if has_att else [])
    if has_test:
        metric_cols += [("test", m) for m in cols] + ([("test", "att_mass")] if has_att else [])
    div = [d for d in DIVERSITY if any(r["diversity"].get(d[0]) is not None for r in rows)]
    gpu = any(r.get("gpu_h") for r in rows)
    head = ["run", "dataset", "backbone", "attention", "decoding"] + \
           [f"{s} {m.replace('_', '-').replace('att-mass', 'att.acc')}" for s, m in metric_cols] + \
           [f"val {h}" for _, h, _, _ in div] + ["epochs", "minutes", "CPU h"] + (["GPU h"] if gpu else []) + ["extract min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 5 + ["---:"] * (len(head) - 5)) + "|"]
    for r in rows:
        cells = [r["run"], _fmt(r["dataset"]), _fmt(r["backbone"]), _fmt(r["attention"]), _fmt(r["decoding"])]
        cells += [_fmt(r[s].get(m), 100) for s, m in metric_cols]
        cells += [_fmt(r["diversity"].get(k), scale, nd) for k, _, scale, nd in div]
        cpu = ("≥" if r.get("cpu_partial") else "") + _fmt(r.get("cpu_h"))
        cells += [_fmt(r["epochs"], nd=0), _fmt(r["minutes"], nd=1), cpu if r.get("cpu_h") is not None else ""] + \
                 ([_fmt(r.get("gpu_h"))] if gpu else []) + [_fmt(r.get("extract_min"), nd=1)]
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
    rows = [row for d in dirs for row in run_rows(d)]
    table = markdown_table(rows)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = plot_bleu4({d.name: read_log(d) for d in dirs}, out.with_suffix(".png"))
    text = "# Runs\n\nMetrics x100 (pycocoevalcap, PTB-tokenized, all references); att.acc = attention " \
           "mass inside the named object's box (synthetic data); vocab, novel % (captions that are no training " \
           "reference), dist-1/2, len: the val captions' diversity (docs/scoring.md); minutes, CPU h, GPU h: " \
           "training compute over the finished epochs (≥: part of the run predates compute recording); " \
           "extract min: the cache's extraction wall time.\n\n" + table + "\n"
    if png:
        text += f"\n![val BLEU-4]({png.name})\n"
    out.write_text(text)
    log(table)
    log(f"report: {out}" + (f", val BLEU-4 curves: {png}" if png else " (no BLEU-4 in any log.jsonl: no curves)"))
    return {"rows": rows, "markdown": out, "png": png}
