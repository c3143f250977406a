"""The run directory: its files, the checkpoint schema, and how the other stages find a run.

    runs/<name>/
      .lock              held (flock) by the process training this run: a second one is refused
      config.json        the run's settings (train + decoder), its features (paths + provenance), vocab
                         size; rewritten whenever `--resume` changes a setting
      vocab.json         the vocabulary (text.Vocab)
      best.pt, last.pt   checkpoint dicts (train.TrainState.to_checkpoint builds them, in one place);
                         best.pt is written before last.pt, so last.pt never records a best epoch
                         that best.pt does not hold
      log.jsonl, log.csv one line per epoch (LOG_FIELDS), curves.png
      results_<split>.json, scores_<split>.json   from `pipeline score`

A checkpoint's `features` is a list of {"path", "provenance"}: one entry per feature cache the
decoder reads (several for a fused run, whose annotation vectors are the caches' concatenated).
`format_version` is CHECKPOINT_FORMAT; `load_checkpoint` upgrades older dicts.

Imports flow one way: runs.py uses model/text/store; train, score, caption and browse use runs.py.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeline.errors import UserError
from pipeline.fileio import FileLock, atomic_write, write_text

CHECKPOINT_FORMAT = 2
LOG_FIELDS = ("epoch", "step", "objective", "loss", "nll", "reg", "reward", "lr", "bleu1", "bleu2", "bleu3",
              "bleu4", "cider", "select", "best", "train_s", "val_s", "captions_per_s", "time")


# -- checkpoints ----------------------------------------------------------------------------------
def save_checkpoint(ckpt: dict, path: Path) -> None:
    import torch
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint dict, upgraded to CHECKPOINT_FORMAT."""
    import torch
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint. Train first (`pipeline train`), or check --run.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises many kinds for a bad file)
        raise UserError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e}).") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path}: not a checkpoint written by `pipeline train`.")
    version = int(ckpt.get("format_version", 1))
    if version > CHECKPOINT_FORMAT:
        raise UserError(f"{path}: checkpoint format {version} is newer than this code's ({CHECKPOINT_FORMAT}); "
                        f"update the pipeline package.")
    if version < 2:   # format 1: one cache (features_path, provenance); best_score was val BLEU-4
        ckpt["features"] = [{"path": ckpt.pop("features_path", ""), "provenance": ckpt.pop("provenance", None)}]
        ckpt.setdefault("select_metric", "bleu4")
        tc = ckpt.get("train_config", {})
        tc["features"] = [tc["features"]] if isinstance(tc.get("features"), str) else tc.get("features", [])
        ckpt.setdefault("epoch_acc", {})
        for k, v in {"reward": 0.0}.items():
            ckpt["epoch_acc"].setdefault(k, v)
        ckpt["format_version"] = CHECKPOINT_FORMAT
    return ckpt


def checkpoint_features(ckpt: dict) -> list[dict]:
    """[{"path", "provenance"}] of the caches a run reads, in concatenation order."""
    return list(ckpt.get("features") or [])


# -- locating runs --------------------------------------------------------------------------------
def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "best.pt").exists() or (run_dir / "last.pt").exists()


def latest_run(runs_dir: str | Path = "runs") -> Path:
    """The run under `runs_dir` whose newest checkpoint (best.pt or last.pt) was written last."""
    runs_dir = Path(runs_dir)
    cands = [p for name in ("best.pt", "last.pt") for p in runs_dir.glob(f"*/{name}")] if runs_dir.is_dir() else []
    if not cands:
        raise UserError(f"{runs_dir}/: no trained run (no */best.pt or */last.pt). Train one with "
                        f"`pipeline train` or pass --run DIR.")
    return max(cands, key=lambda p: p.stat().st_mtime).parent


def resolve_run(run: str | Path | None) -> Path:
    if run is None:
        return latest_run()
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{run}: no such run directory. Pass a directory made by `pipeline train`, "
                        f"e.g. --run runs/NAME.")
    if not has_checkpoint(run):
        raise UserError(f"{run}: not a run directory (no best.pt/last.pt). Pass a directory made by "
                        f"`pipeline train`, e.g. --run runs/NAME.")
    return run


@dataclass
class LoadedRun:
    run_dir: Path
    model: object         # model.Decoder in eval mode
    vocab: object         # text.Vocab
    ckpt: dict
    which: str            # "best" | "last"

    @property
    def features(self) -> list[dict]:
        return checkpoint_features(self.ckpt)


def load_run(run: str | Path | None, which: str | None = None, device="cpu", log=print) -> LoadedRun:
    """A run's decoder (eval mode, on `device`), vocabulary and checkpoint.

    which None: best.pt, or last.pt with one line saying so when no epoch has finished yet."""
    from pipeline.decoder.model import Decoder, DecoderConfig
    from pipeline.data.text import Vocab

    run_dir = resolve_run(run)
    if which not in (None, "best", "last"):
        raise UserError(f"which must be 'best' or 'last', not {which!r}.")
    if which is None:
        which = "best" if (run_dir / "best.pt").exists() else "last"
        if which == "last":
            log(f"note: {run_dir} has no best.pt yet (no epoch finished); using last.pt.")
    ckpt = load_checkpoint(run_dir / f"{which}.pt")
    model = Decoder(DecoderConfig.from_dict(ckpt["decoder_config"]), len(ckpt["vocab"]["itos"]),
                    ckpt["feature_dim"])
    model.load_state_dict(ckpt["model"])
    return LoadedRun(run_dir, model.to(device).eval(), Vocab.from_dict(ckpt["vocab"]), ckpt, which)


def feature_paths(ckpt: dict, run_dir: Path, override: Sequence[str | Path] | None = None) -> list[Path]:
    """The run's feature files: `override` (--features), else the paths recorded in the checkpoint
    (as written, or relative to the run directory or to the folder above runs/)."""
    recorded = checkpoint_features(ckpt)
    if override:
        paths = [Path(p) for p in override]
        for p in paths:
            if not p.exists():
                raise UserError(f"{p}: no such feature file (--features).")
        if recorded and len(paths) != len(recorded):
            raise UserError(f"{run_dir} reads {len(recorded)} feature file(s) "
                            f"({', '.join(str(f['path']) for f in recorded)}); --features gave {len(paths)}.")
        return paths
    if not recorded or not all(f.get("path") for f in recorded):
        raise UserError(f"{run_dir}: the checkpoint does not record its features file; pass --features FILE.")
    out = []
    for f in recorded:
        rec = Path(f["path"])
        for p in (rec, run_dir / rec, run_dir.parent.parent / rec):
            if p.exists():
                out.append(p)
                break
        else:
            raise UserError(f"{run_dir}: its features file {rec} does not exist here; pass --features FILE "
                            f"(made by the same extraction).")
    return out


def open_run_features(ckpt: dict, run_dir: Path, override: Sequence[str | Path] | None = None):
    """The run's feature store (one cache, or the fused caches), checked against the recorded provenance."""
    from pipeline.cache import store
    st = store.open_features(feature_paths(ckpt, run_dir, override))
    check_features(ckpt, st, where=str(run_dir))
    return st


def check_features(ckpt: dict, st, *, where: str) -> None:
    """Refuse a store whose caches were made by something else than the run's."""
    from pipeline.cache import store
    recorded = checkpoint_features(ckpt)
    if len(recorded) != len(st.provenances):
        raise UserError(f"{where}: the run reads {len(recorded)} feature file(s), not {len(st.provenances)}.")
    for f, found, path in zip(recorded, st.provenances, st.paths):
        if f.get("provenance"):
            store.check_same_provenance(f["provenance"], found, what=f"features file {path}", where=where)
    if (st.num_regions, st.feature_dim) != (ckpt["num_regions"], ckpt["feature_dim"]):
        raise UserError(f"{where}: features {', '.join(map(str, st.paths))} are {st.num_regions}x{st.feature_dim}, "
                        f"the run was trained on {ckpt['num_regions']}x{ckpt['feature_dim']}.")


def run_lock(run_dir: Path) -> FileLock:
    return FileLock(Path(run_dir) / ".lock", f"run {run_dir}")


# -- logs -----------------------------------------------------------------------------------------
def write_logs(run_dir: Path, history: list[dict]) -> None:
    """log.jsonl / log.csv rewritten from the history (a resumed run never duplicates)."""
    write_text(run_dir / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))

    def csv_out(tmp: Path):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, LOG_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(history)
    atomic_write(run_dir / "log.csv", csv_out)


def read_log(run_dir: str | Path) -> list[dict]:
    """A run's log.jsonl (one dict per epoch); unreadable lines are skipped."""
    path = Path(run_dir) / "log.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(d, dict):
                rows.append(d)
    return rows


def read_config(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
