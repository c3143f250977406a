"""The run directory: its files, the checkpoint schema, and how the other stages find a run.

    runs/<name>/
      .pipeline-run      marker (MARKER): `pipeline train` made this folder and may write into it; it refuses
                         any other non-empty folder (check_run_dir) rather than overwrite a user's files
      .lock              held (flock) by the process training this run: a second one is refused
      config.json        the run's settings (train + decoder), its features (paths + provenance), vocab
                         size; rewritten whenever `--resume` changes a setting
      vocab.json         the vocabulary (text.Vocab)
      best.pt, last.pt   checkpoint dicts (state.TrainState.to_checkpoint builds them, in one place);
                         best.pt is written before last.pt, so last.pt never records a best epoch
                         that best.pt does not hold
      log.jsonl, log.csv one line per epoch (LOG_FIELDS), curves.png
      results_<split>.<decoding>.json, scores_<split>.<decoding>.json   from `pipeline score`, one pair
                         per decoding (`decoding_name`: results_val.beam3_ln0.7.json); runs scored
                         before that hold results_<split>.json, scores_<split>.json

A checkpoint's `features` is a list of {"path", "provenance"}: one entry per feature cache the
decoder reads (several for a fused run, whose annotation vectors are the caches' concatenated).
`format_version` is CHECKPOINT_FORMAT; `load_checkpoint` upgrades older dicts.

Imports flow one way: runs.py uses model/text/cache; train, score, caption and browse use runs.py.
"""
from __future__ import annotations

import contextlib
import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeline.errors import UserError
from pipeline.fileio import FileLock, atomic_write, is_own_dir, torch_load, write_json, write_text

CHECKPOINT_FORMAT = 2
MARKER = ".pipeline-run"
LOG_FIELDS = ("epoch", "step", "objective", "loss", "nll", "reg", "reward", "lr", "bleu1", "bleu2", "bleu3",
              "bleu4", "cider", "select", "best", "train_s", "val_s", "captions_per_s", "time")


# -- checkpoints ----------------------------------------------------------------------------------
def save_checkpoint(ckpt: dict, path: Path) -> None:
    import torch
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


# The keys of a checkpoint (state.TrainState.to_checkpoint); one outside these is refused, naming the file.
CHECKPOINT_KEYS = frozenset({
    "format_version", "model", "optimizer", "scheduler", "rng", "epoch", "batch_in_epoch", "step", "best_score",
    "best_epoch", "bad_epochs", "history", "epoch_acc", "select_metric", "vocab", "decoder_config", "train_config",
    "features", "feature_dim", "num_regions"})
OPTIONAL_KEYS = frozenset({"code_version", "finished", "init_from", "compute",   # absent from some older files
                           "ema",                                                # only with --ema (ema.py)
                           "average"})                 # only in `pipeline average`'s mean decoder (inference/average.py)


def load_checkpoint(path: Path, *, mmap: bool = False) -> dict:
    """A checkpoint dict, upgraded to CHECKPOINT_FORMAT; a file that is not one (a key missing or
    unknown, settings this code does not know, pickled objects) is one UserError naming it.
    mmap: tensors mapped, not read (to compare checkpoints cheaply)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint. Train first (`pipeline train`), or check --run.")
    try:
        ckpt = torch_load(path, "checkpoint", mmap=mmap)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001  (torch raises many kinds for a bad file)
        raise UserError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e}).") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path}: not a checkpoint written by `pipeline train`.")
    if "format_version" not in ckpt and "features_path" not in ckpt:
        raise UserError(f"{path}: has no format_version and is not a format-1 checkpoint (no features_path); "
                        f"it was not written by `pipeline train`, or was edited. Retrain, or restore the file.")
    try:
        version = int(ckpt.get("format_version", 1))
    except (TypeError, ValueError):
        raise UserError(f"{path}: format_version {ckpt['format_version']!r} is not a number.") from None
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
    _check_keys(ckpt, path)
    return ckpt


def _check_keys(ckpt: dict, path: Path) -> None:
    """Every key a checkpoint needs, none it cannot hold, and decoder/training settings this code knows."""
    from pipeline.config import DecoderConfig, TrainConfig
    missing = sorted(CHECKPOINT_KEYS - set(ckpt))
    unknown = sorted(set(ckpt) - CHECKPOINT_KEYS - OPTIONAL_KEYS)
    if missing or unknown:
        raise UserError(f"{path}: not a checkpoint of this code ("
                        + "; ".join(([f"missing {', '.join(missing)}"] if missing else [])
                                    + ([f"unknown key(s) {', '.join(unknown)}"] if unknown else []))
                        + "). It was edited, or written by other code; retrain, or restore the file.")
    for key, cls in (("decoder_config", DecoderConfig), ("train_config", TrainConfig)):
        if not isinstance(ckpt[key], dict):
            raise UserError(f"{path}: {key} is a {type(ckpt[key]).__name__}, not a dict of settings.")
        try:
            cls.from_dict(ckpt[key])
        except UserError as e:
            raise UserError(f"{path}: {key}: {e}") from None
        except TypeError as e:      # a wrong type that the dataclass cannot even hold
            raise UserError(f"{path}: {key}: {e}.") from None


class Finished(UserError):
    """A `--resume` of a run with nothing left to train; `train` prints it and returns `summary`."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def refuse_finished(ckpt: dict, cfg, run_dir: Path) -> None:
    """Raise Finished when the run has nothing left to train under `cfg` (its settings with the resume's
    changes): it is finished, and this is how to train more."""
    epoch, bad = ckpt["epoch"], ckpt["bad_epochs"]
    if ckpt["batch_in_epoch"] or (epoch < cfg.epochs and bad < cfg.patience):
        return
    why = (f"all {cfg.epochs} epochs are trained" if epoch >= cfg.epochs else
           f"it early-stopped after epoch {epoch} (no val {cfg.metric} gain for {bad} epochs, --patience {cfg.patience})")
    more = ([f"--epochs {epoch + 5}"] if epoch >= cfg.epochs else []) + \
           ([f"--patience {bad + 2}"] if bad >= cfg.patience else [])
    raise Finished(f"{run_dir} is finished: {why}; best val {cfg.metric} {ckpt['best_score']:.4f} at epoch "
                   f"{ckpt['best_epoch']} (best.pt). Nothing to do. To train it further: pipeline train --run "
                   f"{run_dir} --resume {' '.join(more)}; or start a new run from its weights: --init-from {run_dir}.",
                   {"run": str(run_dir), "epoch": epoch, "step": ckpt["step"], "best_score": ckpt["best_score"],
                    "best_epoch": ckpt["best_epoch"], "select_metric": cfg.metric, "stopped": "finished",
                    "history": ckpt["history"]})


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
    from pipeline.decoder.model import DecoderConfig
    from pipeline.data.text import Vocab

    run_dir = resolve_run(run)
    if which not in (None, "best", "last"):
        raise UserError(f"which must be 'best' or 'last', not {which!r}.")
    if which is None:
        which = "best" if (run_dir / "best.pt").exists() else "last"
        if which == "last":
            log(f"note: {run_dir} has no best.pt yet (no epoch finished); using last.pt.")
    ckpt = load_checkpoint(run_dir / f"{which}.pt")
    from pipeline.decoder.topped import build_decoder   # a cache of an earlier layer: the decoder + its fine-tuned top
    model = build_decoder(DecoderConfig.from_dict(ckpt["decoder_config"]), len(ckpt["vocab"]["itos"]),
                          ckpt["feature_dim"], [f.get("provenance") for f in checkpoint_features(ckpt)])
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
    from pipeline.cache.readers import open_features
    st = open_features(feature_paths(ckpt, run_dir, override))
    check_features(ckpt, st, where=str(run_dir))
    return st


def check_features(ckpt: dict, st, *, where: str) -> None:
    """Refuse a store whose caches were made by something else than the run's."""
    from pipeline.cache.identity import check_same_provenance
    recorded = checkpoint_features(ckpt)
    if len(recorded) != len(st.provenances):
        raise UserError(f"{where}: the run reads {len(recorded)} feature file(s), not {len(st.provenances)}.")
    for f, found, path in zip(recorded, st.provenances, st.paths):
        if f.get("provenance"):
            check_same_provenance(f["provenance"], found, what=f"features file {path}", where=where)
    if (st.num_regions, st.feature_dim) != (ckpt["num_regions"], ckpt["feature_dim"]):
        raise UserError(f"{where}: features {', '.join(map(str, st.paths))} are {st.num_regions}x{st.feature_dim}, "
                        f"the run was trained on {ckpt['num_regions']}x{ckpt['feature_dim']}.")


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold a run while this process trains it (yields the FileLock), after refusing a folder not made by
    `pipeline train` (check_run_dir), a second trainer, a last.pt of another run; marks the folder (MARKER)."""
    check_run_dir(run_dir := Path(run_dir))
    with FileLock(run_dir / ".lock", f"run {run_dir}") as lock:
        check_run_files(run_dir)
        if new := not (run_dir / MARKER).is_file() or (run_dir / MARKER).is_symlink():
            write_json(run_dir / MARKER, {"made_by": "pipeline train", "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        try:
            yield lock
        finally:      # nothing written after all (a refused setting): the folder is left as it was found
            if new and sorted(q.name for q in run_dir.iterdir()) == sorted((".lock", MARKER)):
                (run_dir / MARKER).unlink()


def check_run_dir(run_dir: Path) -> None:
    """Refuse a --run that exists, is not empty and holds no MARKER (a user's folder: its config.json, log.csv
    would be overwritten); a run made before the marker still counts (a pid in its .lock, or a checkpoint)."""
    lock = run_dir / ".lock"
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if lock.is_file() and not lock.is_symlink() and lock.read_bytes()[:64].decode().strip().isdigit():
            return
    if is_own_dir(run_dir, MARKER) or run_dir.is_dir() and any(
            not (run_dir / n).is_symlink() and _identity(run_dir / n) for n in ("last.pt", "best.pt")):
        return
    raise UserError(f"--run {run_dir}: " + (f"is a folder that `pipeline train` did not make (no {MARKER} in it)" if
                    run_dir.is_dir() else "is not a folder") + "; training would overwrite the files there (config"
                    ".json, log.csv, ...). Pass a new or empty folder (e.g. --run runs/NAME), or move those files away.")


def check_run_files(run_dir: Path) -> None:
    """Refuse a last.pt of another run (other sizes or words than best.pt's, or config.json's before a best.pt):
    a resume would rewrite config.json to it while best.pt stays the other model. Nothing is written before."""
    last, other = run_dir / "last.pt", run_dir / "best.pt"
    if not last.is_file():
        return
    found, ref = _identity(last, quiet=False), _identity(other, quiet=False) if other.is_file() else None
    if ref is None:
        other, cfg = run_dir / "config.json", read_config(run_dir)
        with contextlib.suppress(UserError, TypeError, AttributeError, KeyError, ValueError):
            ref = _identity({"decoder_config": cfg["decoder"], "vocab_size": int(cfg["vocab_size"])})
    diff = [f"{k} {found[k]} ({other.name}: {v})" for k, v in (ref or {}).items() if v is not None and found[k] != v]
    if diff:
        raise UserError(f"{last}: is not this run's checkpoint (copied from another run?): its {'; '.join(diff[:2])}. "
                        f"Nothing was written. Put back the run's own last.pt, or train that run in a folder of its "
                        f"own (--init-from {last.parent} starts a new run from a run's weights).")


def _identity(ckpt: dict | Path, quiet: bool = True) -> dict | None:
    """What no resume changes, of a checkpoint or its file (None, if quiet, for one that is not of this code):
    the decoder's non-default settings, the vocabulary's size and words, the features' size."""
    import hashlib
    from pipeline.config import DecoderConfig, defaults
    with contextlib.suppress(UserError) if quiet else contextlib.nullcontext():
        ckpt = load_checkpoint(ckpt, mmap=True) if isinstance(ckpt, Path) and ckpt.is_file() else ckpt
    if not isinstance(ckpt, dict):
        return None
    dc, base = DecoderConfig.from_dict(ckpt["decoder_config"]).to_dict(), defaults(DecoderConfig)
    itos = (ckpt.get("vocab") or {}).get("itos")
    return {"decoder settings": ", ".join(f"{k}={v}" for k, v in sorted(dc.items()) if v != base.get(k)) or "defaults",
            "vocabulary size": len(itos) if itos else ckpt.get("vocab_size"),
            "vocabulary words (sha256)": hashlib.sha256("\n".join(itos).encode()).hexdigest()[:12] if itos else None,
            "features": f"{ckpt['num_regions']}x{ckpt['feature_dim']}" if "feature_dim" in ckpt else None}


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


# -- files per decoding ------------------------------------------------------------------------------
# The ScoreConfig settings that change the captions, as parts of a results file's name, in this order:
# (field, abbreviation, the value left out of the name, labels of some values). beam and ln are always
# named (None); another setting only when it differs from the value left out: the default when names
# were introduced, fixed here, so a name keeps its meaning when a default changes. A bool is named by
# its abbreviation when on, "no" + it when off. A new ScoreConfig field joins DECODING, or NOT_DECODING
# when it changes only speed or output (tests/test_score.py fails on a field in neither).
DECODING = (("beam", "beam", None, {}), ("length_norm", "ln", None, {}), ("max_len", "len", 0, {0: "auto"}),
            ("block_trigrams", "blocktri", True, {}), ("suppress_unk", "maskunk", True, {}),
            ("remove_bad_endings", "rmbadend", False, {}), ("hard_context", "ctx", "expected", {}))
NOT_DECODING = ("split", "batch_size", "device", "workers", "progress")
# what a scores file written before a setting existed decoded with (it does not record the setting)
RECORDED_BEFORE = {"length_norm": 0.0, "max_len": 20, "block_trigrams": False, "suppress_unk": False,
                   "remove_bad_endings": False, "hard_context": "expected"}


def decoding_name(settings) -> str:
    """'beam3_ln0.7' (then e.g. '_len30_noblocktri'): the decoding a results file holds, from a ScoreConfig
    or from the settings a scores file records (a setting it lacks: RECORDED_BEFORE)."""
    get = settings.get if isinstance(settings, dict) else (lambda k, d=None: getattr(settings, k, d))
    parts = []
    for field, abbr, omitted, labels in DECODING:
        v = get(field, RECORDED_BEFORE.get(field))
        if omitted is not None and v == omitted:
            continue
        if isinstance(v, bool):
            parts.append(abbr if v else "no" + abbr)
        else:
            v = labels.get(v, f"{v:g}" if isinstance(v, float) else v)
            parts.append(f"{abbr}{v}")
    return "".join(c if c.isalnum() or c in ".+-_" else "-" for c in "_".join(parts))


def results_path(out_dir: Path, split: str, settings) -> Path:
    """results_<split>.<decoding>.json: the COCO captions `pipeline score` writes for one decoding."""
    return Path(out_dir) / f"results_{split}.{decoding_name(settings)}.json"


def scores_path(out_dir: Path, split: str, settings) -> Path:
    """scores_<split>.<decoding>.json: the metrics (and the settings) of that decoding."""
    return Path(out_dir) / f"scores_{split}.{decoding_name(settings)}.json"


def scored_decodings(run_dir: Path) -> list[tuple[str, str, dict, Path]]:
    """(split, decoding name, scores, path) of every scores file of a run, sorted; a scores_<split>.json
    written before files were named by decoding is named by the settings it records."""
    out = []
    for p in sorted(Path(run_dir).glob("scores_*.json")):
        split, _, name = p.name[len("scores_"):-len(".json")].partition(".")
        try:
            s = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(s, dict):
            out.append((split, name or decoding_name(s), s, p))
    return out


def find_results(run_dir: Path, split: str, settings) -> Path | None:
    """The results file of this decoding of `split`, if `pipeline score` wrote one (also an older
    results_<split>.json whose scores file records the same decoding)."""
    path = results_path(run_dir, split, settings)
    if path.exists():
        return path
    old = Path(run_dir) / f"results_{split}.json"
    match = [1 for sp, name, _, p in scored_decodings(run_dir)
             if sp == split and p.name == f"scores_{split}.json" and name == decoding_name(settings)]
    return old if match and old.exists() else None


def read_results(path: Path) -> dict[str, str]:
    """{image id (as a string): caption} of a COCO results file; {} if it cannot be read."""
    try:
        res = json.loads(Path(path).read_text())
        return {str(r["image_id"]): r["caption"] for r in res}
    except (OSError, json.JSONDecodeError, TypeError, KeyError):
        return {}


def check_against_results(run_dir: Path, split: str, settings, image_ids, captions) -> tuple[Path | None, int]:
    """(the results file `pipeline score` wrote for this decoding, or None; how many of `captions` differ
    from it): browse shows whether its captions are the ones scored (a run trained on since differs)."""
    path = find_results(run_dir, split, settings)
    if path is None:
        return None, 0
    scored = read_results(path)
    return path, sum(scored.get(str(i)) != c for i, c in zip(image_ids, captions))
