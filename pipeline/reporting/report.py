"""One table over runs (data, backbone, attention, decoding, val/test metrics, diversity, epochs, compute) + val
BLEU-4 curves. A run scored with several decodings (`pipeline score` writes scores_<split>.<decoding>.json,
runs.decoding_name) has one row per decoding; an older run's scores_<split>.json is named by the settings
it records.

Compute: training minutes (wall) and CPU / GPU hours summed over the finished epochs of log.jsonl
(train.py records them per epoch; older logs give minutes from train_s + val_s and no CPU hours, and a
run resumed from a checkpoint that predates the recording shows its CPU hours with a ">=" since only part
of it was counted); "extract min": the wall minutes recorded in the run's cache(s) (`compute`
attribute, summed over a fused run's caches; empty when a cache is not found or predates it).
Energy ("kWh", "extract kWh"): an estimate from those CPU and GPU seconds, provenance.energy_kwh (its
per-core and per-GPU power figures are defined there, once).

--by-seed (make_report(by_seed=True), aggregate_seeds): runs that differ only in their seed (`identity`:
the same training settings, less NOT_IDENTITY, decoder settings, caches' provenance and --init-from) and
scored with the same decoding are one row: each score and diversity column the mean ± the sample
standard deviation (n-1) over the seeds, the seeds listed, compute columns summed over the seeds (what
the group cost)."""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple, Sequence

from pipeline.cache.identity import PROVENANCE_KEYS, normalized
from pipeline.config import DecoderConfig, TrainConfig
from pipeline.errors import UserError
from pipeline.provenance import CPU_WATTS_PER_CORE, GPU_WATTS, energy_kwh
from pipeline.training.runs import read_config, read_log, scored_decodings
from pipeline.reporting.viz import plot_bleu4

COLUMNS = ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
DIVERSITY = (("vocab_size", "vocab", 1, 0), ("novel", "novel %", 100, 1), ("distinct_1", "dist-1", 1, 3),
             ("distinct_2", "dist-2", 1, 3), ("mean_length", "len", 1, 1))   # key, header, scale, decimals
SPICE = "SPICE"     # a column only when some run was scored with the SPICE jars installed (make spice)
# Training settings that do not change what a run learns (where and how fast it ran, how its work was cut
# into sessions; the caches are compared by provenance, not path): with `seed`, left out of `identity`.
NOT_IDENTITY = ("seed", "features", "device", "threads", "in_ram", "num_workers", "val_batch_size", "log_every",
                "max_minutes", "max_steps", "weights_dir")


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
           "decoding": decoding, "beam": None, "val": {}, "test": {}, "diversity": {}, **compute_of(log, cfg),
           "seed": (cfg.get("train") or {}).get("seed"), "identity": identity(cfg)}
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


def identity(cfg: dict) -> str | None:
    """What a run trained, less its seed: its training settings (less NOT_IDENTITY; older runs' missing ones
    filled as config.from_dict does), decoder settings, caches' provenance (PROVENANCE_KEYS) and the run it
    started from; runs with equal identities differ only in their seed. None without a config.json."""
    if not cfg.get("train"):
        return None
    train = {k: v for k, v in _settings(TrainConfig, cfg["train"]).items() if k not in NOT_IDENTITY}
    provs = [{k: normalized((f.get("provenance") or {}).get(k)) for k in PROVENANCE_KEYS}
             for f in cfg.get("features") or []]
    init = {k: v for k, v in (cfg.get("init_from") or {}).items() if k != "code_version"}
    return json.dumps({"train": train, "decoder": _settings(DecoderConfig, cfg.get("decoder") or {}),
                       "features": provs, "init_from": init}, sort_keys=True, default=str)


def _settings(cls, saved: dict) -> dict:
    """A saved settings dict as the code reads it (LEGACY values for missing keys); as saved if it refuses."""
    try:
        return asdict(cls.from_dict(saved))
    except (UserError, TypeError):
        return dict(saved)


def compute_of(log: list[dict], cfg: dict) -> dict:
    """minutes (training wall), cpu_h, gpu_h, kwh (None when no epoch recorded them), cpu_partial (some
    epochs lack them), extract_min, extract_kwh (the caches' recorded extraction compute, summed)."""
    from pipeline.cache.layout import read_attrs
    out = {"minutes": sum(r["wall_s"] if "wall_s" in r else (r.get("train_s") or 0) + (r.get("val_s") or 0)
                          for r in log) / 60 if log else None}
    have = [r for r in log if "cpu_s" in r]
    total = {"cpu_s": sum(r["cpu_s"] for r in have), "gpu_s": sum(r.get("gpu_s") or 0 for r in have)}
    out["cpu_h"] = total["cpu_s"] / 3600 if have else None
    out["gpu_h"] = total["gpu_s"] / 3600 if have else None
    out["kwh"] = energy_kwh(total) if have else None
    out["cpu_partial"] = bool(have) and (len(have) < len(log) or any(r.get("compute_partial") for r in have))
    caches = []
    for f in cfg.get("features") or []:
        try:
            c = read_attrs(f.get("path", "")).get("compute") if Path(f.get("path", "")).is_file() else None
        except UserError:
            c = None
        caches.append(c if isinstance(c, dict) else {})
    mins = [c["wall_s"] / 60 if c.get("wall_s") is not None else None for c in caches]
    kwh = [energy_kwh(c) for c in caches]
    out["extract_min"] = sum(mins) if mins and None not in mins else None
    out["extract_kwh"] = sum(kwh) if kwh and None not in kwh else None
    return out


# -- --by-seed: the runs of one configuration that differ only in their seed, as one row ----------------
class Stat(NamedTuple):
    """A column over the seeds of a group: mean, sample sd (n-1; None for one value), values, group size."""
    mean: float
    sd: float | None
    n: int
    of: int


def stat(values, of: int) -> Stat | None:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not vals:
        return None
    return Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals), of)


def aggregate_seeds(rows: list[dict]) -> list[dict]:
    """Rows with the same identity and decoding as one (seed_row), in the order of their first row; a row
    without an identity (no config.json) stays alone. Every row gets `seeds`."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["identity"], r["decoding"]) if r.get("identity") else id(r), []).append(r)
    return [dict(g[0], seeds=[g[0].get("seed")]) if len(g) == 1 else seed_row(g) for g in groups.values()]


def seed_row(group: list[dict]) -> dict:
    """One row for the seeds of a configuration: scores and diversity as Stat; epochs as a range; training
    compute summed (≥ when a seed lacks it); extraction compute the first run's (the seeds share caches)."""
    g, n = sorted(group, key=lambda r: (str(r.get("seed")), r["run"])), len(group)
    row = {k: g[0][k] for k in ("dataset", "backbone", "attention", "decoding", "beam", "identity",
                                "extract_min", "extract_kwh")}
    row.update(run=", ".join(r["run"] for r in g), seeds=[r.get("seed") for r in g])
    for part in ("val", "test", "diversity"):
        keys = dict.fromkeys(k for r in g for k in r[part])
        row[part] = {k: stat([r[part].get(k) for r in g], n) for k in keys}
    epochs = sorted({r["epochs"] for r in g if r["epochs"] is not None})
    row["epochs"] = (epochs[0] if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}") if epochs else None
    for k in ("minutes", "cpu_h", "gpu_h", "kwh"):
        vals = [r.get(k) for r in g]
        row[k] = sum(v for v in vals if v is not None) if any(v is not None for v in vals) else None
    row["cpu_partial"] = row["cpu_h"] is not None and any(r.get("cpu_partial") or r.get("cpu_h") is None for r in g)
    return row


def _seeds(seeds: list) -> str:
    return ",".join(map(str, seeds)) + (f" (n={len(seeds)})" if len(seeds) > 1 else "")


def _fmt(v, scale=1.0, nd=2):
    if isinstance(v, Stat):      # a --by-seed group: mean ± sd, and how many seeds had it when not all
        sd = "" if v.sd is None else f" ± {v.sd * scale:.{nd}f}"
        return f"{v.mean * scale:.{nd}f}{sd}" + (f" (n={v.n})" if v.n < v.of else "")
    return "" if v is None else f"{v * scale:.{nd}f}" if isinstance(v, (int, float)) else str(v)


def _kwh(v, partial=False) -> str:
    return "" if v is None else ("≥" if partial else "") + f"{v:.3g}"


def markdown_table(rows: list[dict]) -> str:
    has_test = any(r["test"] for r in rows)
    has_att = any("att_mass" in r["val"] or "att_mass" in r["test"] for r in rows)
    cols = COLUMNS + ((SPICE,) if any(SPICE in r["val"] or SPICE in r["test"] for r in rows) else ())
    metric_cols = [("val", m) for m in cols] + ([("val", "att_mass")] if has_att else [])
    if has_test:
        metric_cols += [("test", m) for m in cols] + ([("test", "att_mass")] if has_att else [])
    div = [d for d in DIVERSITY if any(r["diversity"].get(d[0]) is not None for r in rows)]
    gpu = any(r.get("gpu_h") for r in rows)
    seeds = any("seeds" in r for r in rows)       # aggregate_seeds rows
    left = ["run", "dataset", "backbone", "attention", "decoding"] + (["seeds"] if seeds else [])
    head = left + [f"{s} {m.replace('_', '-').replace('att-mass', 'att.acc')}" for s, m in metric_cols] + \
        [f"val {h}" for _, h, _, _ in div] + ["epochs", "minutes", "CPU h"] + (["GPU h"] if gpu else []) + \
        ["kWh", "extract min", "extract kWh"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] * len(left) + ["---:"] * (len(head) - len(left))) + "|"]
    for r in rows:
        cells = [r["run"], _fmt(r["dataset"]), _fmt(r["backbone"]), _fmt(r["attention"]), _fmt(r["decoding"])]
        cells += [_seeds(r.get("seeds") or [])] if seeds else []
        cells += [_fmt(r[s].get(m), 100) for s, m in metric_cols]
        cells += [_fmt(r["diversity"].get(k), scale, nd) for k, _, scale, nd in div]
        cpu = ("≥" if r.get("cpu_partial") else "") + _fmt(r.get("cpu_h"))
        cells += [_fmt(r["epochs"], nd=0), _fmt(r["minutes"], nd=1), cpu if r.get("cpu_h") is not None else ""]
        cells += [_fmt(r.get("gpu_h"))] if gpu else []
        cells += [_kwh(r.get("kwh"), r.get("cpu_partial")), _fmt(r.get("extract_min"), nd=1),
                  _kwh(r.get("extract_kwh"))]
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


def make_report(run_dirs: Sequence[str | Path], out: str | Path = "runs/report.md", log=print,
                by_seed: bool = False) -> dict:
    """The table (one row per run and decoding; by_seed: the seeds of a configuration as one row) and the
    val BLEU-4 curves of every run."""
    dirs = find_runs(run_dirs)
    rows = [row for d in dirs for row in run_rows(d)]
    rows = aggregate_seeds(rows) if by_seed else rows
    table = markdown_table(rows)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = plot_bleu4({d.name: read_log(d) for d in dirs}, out.with_suffix(".png"))
    text = "# Runs\n\nMetrics x100 (pycocoevalcap, PTB-tokenized, all references); att.acc = attention " \
           "mass inside the named object's box (synthetic data); vocab, novel % (captions that are no training " \
           "reference), dist-1/2, len: the val captions' diversity (docs/scoring.md); minutes, CPU h, GPU h: " \
           "training compute over the finished epochs (≥: part of the run predates compute recording); " \
           "extract min: the cache's extraction wall time; kWh, extract kWh: estimated energy of training and of " \
           f"extraction, CPU-seconds x {CPU_WATTS_PER_CORE:.3g} W per core + GPU-seconds x {GPU_WATTS:.0f} W " \
           "(TDP figures, an estimate: docs/training.md)." + \
           (" Runs that differ only in their seed are one row (--by-seed): scores mean ± sample sd over the " \
            "seeds ((n=k): only k of them have it), compute summed over them." if by_seed else "") + \
           "\n\n" + table + "\n"
    if png:
        text += f"\n![val BLEU-4]({png.name})\n"
    out.write_text(text)
    log(table)
    log(f"report: {out}" + (f", val BLEU-4 curves: {png}" if png else " (no BLEU-4 in any log.jsonl: no curves)"))
    return {"rows": rows, "markdown": out, "png": png}
