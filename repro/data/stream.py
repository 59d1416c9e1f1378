"""The data path at MIMIC-IV scale: validate, label, fit and tokenize MEDS shard by shard.

Why: full MIMIC-IV in MEDS is several hundred million events; holding them in one DataFrame needs a
big-memory node. MEDS keeps each subject in one shard, and every quantity here is per subject
except three train-split summaries (quantile bins, vocabulary, the `conditions` groups), which are
merged from small per-shard summaries. So each shard is read, validated and processed on its own,
in worker processes, and memory is bounded by the largest shard, not by the dataset.

Per shard, codes stay dictionary-encoded: regular expressions and vocabulary look-ups run once per
distinct code and map to events by index; visits, visit membership, quantile bins and the token
layout are numpy array operations (no per-event Python).

Passes (`prepare_data`):

1. every shard: validate, label (visits, deaths, task rows), and for train subjects collect the fit
   summary: per-code plain token counts and each lab code's distinct values with their counts;
2. merge: exact quantile bins (`quantile_edges_from_counts`, bit for bit `np.quantile` on the expanded
   values), clinical bins from `metadata/codes.parquet` when asked for, each lab code's value statistics
   (`value_summary` on the same (value, count) pairs: train min, max, mean, std), the vocabulary, the
   `conditions` groups (counts on train, as `build_task`);
3. every shard: tokenize with the fitted tokenizer, written atomically to `shards/<i>.npz`;
4. assemble the shard files into one memory-mapped `Timelines` (shard by shard, subjects sorted within
   a shard); each subject's tokens and side arrays are identical to `Tokenizer.timelines` on all events.

Memory of the fit summary: 16 bytes per distinct (lab code, value) pair of the train split (32 while
merging), not per event. Lab values are recorded at fixed precision, so the pairs are few: 71k for 17M
synthetic train events (the benchmark prints the number). The bound is the number of distinct pairs;
at worst, every value distinct, it is 16 bytes per train lab value.

Everything is cached under `<cache_root>/tokenized-<key>/`, keyed by the data files' (path, size,
mtime), the tokenizer's fit parameters, the code patterns, the tasks and `STREAM_VERSION`; a second
run memory-maps the result, and an interrupted run reuses the shards it had finished.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import meds
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from repro.config import CodePatterns, TokenizerParams, atomic_path, write_text_atomic
from repro.data.meds import (
    SUBJECT,
    MedsDataset,
    MedsError,
    read_reference_ranges,
    read_shard_arrays,
)
from repro.data.shard_labels import (
    _group_starts,
    code_table,
    finish_labels,
    label_shard,
    shard_subjects,
    shard_visits,
)
from repro.data.shard_tokens import FitAccumulator, fit_summary_shard, tokenize_shard
from repro.data.timelines import (
    Timelines,
    assemble_timelines,
    open_timelines,
    save_timelines,
)
from repro.data.tokenizer import Tokenizer

STREAM_VERSION = 2  # bump when the cached outputs of this module change


SMALL_DATA_BYTES = 16 * 2**20  # below this much parquet, worker processes cost more than they save


_WORKER: dict[str, Any] = {}


def _worker_tokenizer(cfg: dict) -> Tokenizer:
    """The fitted tokenizer (from its file) or a bare one for code typing; loaded once per process."""
    path = cfg.get("tokenizer_path")
    if path:
        st = os.stat(path)
        key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    else:
        key = json.dumps([cfg["params"], cfg["patterns"]], sort_keys=True)
    tok = _WORKER.get(key)
    if tok is None:
        if path:
            tok = Tokenizer.load(path)
        else:
            tok = Tokenizer(TokenizerParams(**cfg["params"]), CodePatterns(**cfg["patterns"]))
        _WORKER.clear()
        _WORKER[key] = tok
    return tok


def _worker_train_ids(root: str) -> np.ndarray:
    key = f"train:{root}"
    if key not in _WORKER:
        splits = pq.read_table(Path(root) / meds.subject_splits_filepath).to_pandas()
        _WORKER[key] = np.sort(splits.loc[splits["split"] == meds.train_split, SUBJECT].to_numpy(np.int64))
    return _WORKER[key]


def _pass_job(path: str, cfg: dict) -> dict:
    """Read + validate one shard; optionally label it, summarise it for the fit, tokenize it to a file."""
    clock = {}
    t0 = time.perf_counter()
    sh = read_shard_arrays(Path(path))
    out: dict[str, Any] = {"n": len(sh), "subjects": shard_subjects(sh)}
    clock["read_validate"] = time.perf_counter() - t0
    if not (cfg.get("label") or cfg.get("fit") or cfg.get("tokenize_to")):
        out["clock"] = clock
        return out
    t0 = time.perf_counter()
    tok = _worker_tokenizer(cfg)
    ct = code_table(sh.dictionary, tok)
    starts = _group_starts(sh)
    v = shard_visits(sh, ct, starts)
    clock["visits"] = time.perf_counter() - t0
    if cfg.get("label"):
        t0 = time.perf_counter()
        out["labels"] = label_shard(sh, ct, v, cfg["tasks"])
        clock["label"] = time.perf_counter() - t0
    if cfg.get("fit"):
        t0 = time.perf_counter()
        out["fit"] = fit_summary_shard(sh, ct, v, starts, tok, _worker_train_ids(cfg["root"]))
        clock["fit"] = time.perf_counter() - t0
    if cfg.get("tokenize_to"):
        t0 = time.perf_counter()
        tl = tokenize_shard(sh, ct, v, starts, tok)
        save_timelines(tl, Path(cfg["tokenize_to"]))
        out["tokens"] = len(tl.token_ids)
        out["stats"] = tl.stats
        clock["tokenize"] = time.perf_counter() - t0
    out["clock"] = clock
    return out


def _num_rows(path: Path) -> int:
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # noqa: BLE001 - the job itself reports an unreadable file with its name
        return 0


def default_workers(dataset: MedsDataset) -> int:
    """1 for small data (process start-up would dominate), else one per core, at most one per shard."""
    size = sum(p.stat().st_size for p in dataset.shards)
    if size < SMALL_DATA_BYTES:
        return 1
    return max(1, min(os.cpu_count() or 1, len(dataset.shards)))


class ShardRunner:
    """Runs per-shard jobs in `workers` spawned processes (or in this process when workers == 1).

    Results come back in shard order whatever order they finish in; a progress bar counts events.
    """

    def __init__(self, workers: int = 1, progress: bool = True) -> None:
        self.workers = max(1, int(workers))
        self.progress = progress
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> ShardRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def map(self, paths: list[Path], cfgs: list[dict], desc: str) -> list[dict]:
        from tqdm import tqdm

        sizes = [_num_rows(p) for p in paths]
        bar = tqdm(
            total=sum(sizes), desc=desc, unit="ev", unit_scale=True, disable=not self.progress, leave=False
        )
        results: list[dict | None] = [None] * len(paths)
        try:
            if self.workers == 1:
                for i, (p, c) in enumerate(zip(paths, cfgs)):
                    results[i] = _pass_job(str(p), c)
                    bar.update(sizes[i])
            else:
                if self._pool is None:
                    self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
                futures = {
                    self._pool.submit(_pass_job, str(p), c): i for i, (p, c) in enumerate(zip(paths, cfgs))
                }
                for f in as_completed(futures):
                    i = futures[f]
                    results[i] = f.result()
                    bar.update(sizes[i])
        finally:
            bar.close()
        return results  # type: ignore[return-value]


def check_subjects(dataset: MedsDataset, results: list[dict]) -> None:
    """Cross-shard checks of `read_events`: a subject lives in one shard and has a split."""
    sids = np.concatenate([r["subjects"] for r in results]) if results else np.zeros(0, np.int64)
    shard_of = np.repeat(np.arange(len(results)), [len(r["subjects"]) for r in results])
    order = np.argsort(sids, kind="stable")
    s, sh = sids[order], shard_of[order]
    dup = np.flatnonzero(s[1:] == s[:-1])
    if len(dup):
        k = dup[np.argmin(sh[dup + 1])]
        raise MedsError(
            f"{dataset.shards[sh[k + 1]]}: subject {int(s[k])} also appears in {dataset.shards[sh[k]]}; "
            "MEDS keeps a subject in one shard"
        )
    unknown = np.setdiff1d(sids, dataset.splits[SUBJECT].to_numpy())
    if len(unknown):
        raise MedsError(
            f"{dataset.root / meds.subject_splits_filepath}: {len(unknown)} subjects in the data have no split "
            f"(e.g. {int(unknown[0])})"
        )


def _cfg(params: TokenizerParams, patterns: CodePatterns, **kw) -> dict:
    return {"params": asdict(params), "patterns": asdict(patterns), **kw}


@dataclass
class StageResult:
    """What one pass over the shards did: events, wall time, workers and per-step busy seconds in workers."""

    stage: str
    events: int
    wall: float
    workers: int
    busy: dict[str, float] = field(default_factory=dict)


def _busy(results: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in results:
        for k, v in r["clock"].items():
            out[k] = out.get(k, 0.0) + v
    return out


def validate_dataset(dataset: MedsDataset, runner: ShardRunner) -> StageResult:
    """Read and validate every shard (and the cross-shard rules) without keeping any events."""
    t0 = time.perf_counter()
    res = runner.map(dataset.shards, [{}] * len(dataset.shards), "validate")
    check_subjects(dataset, res)
    return StageResult(
        "validate", sum(r["n"] for r in res), time.perf_counter() - t0, runner.workers, _busy(res)
    )


def label_dataset(
    dataset: MedsDataset, patterns: CodePatterns, tasks: list[str], runner: ShardRunner
) -> tuple[dict[str, pd.DataFrame], pd.Series, StageResult]:
    """Task labels of every shard's subjects; equal to `build_task` on all events."""
    t0 = time.perf_counter()
    cfg = _cfg(TokenizerParams(), patterns, label=True, tasks=list(tasks))
    res = runner.map(dataset.shards, [cfg] * len(dataset.shards), "label")
    check_subjects(dataset, res)
    labels = finish_labels([r["labels"] for r in res], list(tasks), dataset.subjects(meds.train_split))
    n_visits = _n_visits(res)
    stage = StageResult(
        "label", sum(r["n"] for r in res), time.perf_counter() - t0, runner.workers, _busy(res)
    )
    return labels, n_visits, stage


def _n_visits(res: list[dict]) -> pd.Series:
    parts = [r["labels"].n_visits for r in res if len(r["labels"].n_visits)]
    if not parts:
        return pd.Series(dtype=np.int64, index=pd.Index([], dtype=np.int64, name=SUBJECT))
    return pd.concat(parts).sort_index()


def train_shards(dataset: MedsDataset) -> list[Path]:
    """Shards that hold at least one train subject (reads only their subject_id column)."""
    train = np.sort(dataset.subjects(meds.train_split).astype(np.int64))
    out = []
    for p in dataset.shards:
        sid = pq.read_table(p, columns=[SUBJECT]).column(SUBJECT).to_numpy()
        if np.isin(np.unique(sid), train).any():
            out.append(p)
    return out


def _ranges(dataset: MedsDataset, params: TokenizerParams) -> dict[str, tuple[float, float]]:
    """Reference ranges from the dataset's code metadata, read only when clinical bins are asked for."""
    return read_reference_ranges(dataset.root) if params.bins == "clinical" else {}


def fit_tokenizer(
    dataset: MedsDataset, params: TokenizerParams, patterns: CodePatterns, runner: ShardRunner
) -> tuple[Tokenizer, StageResult, int]:
    """Quantile bins and vocabulary from the train split in one pass; returns (tokenizer, stage, distinct values)."""
    t0 = time.perf_counter()
    cfg = _cfg(params, patterns, fit=True, root=str(dataset.root))
    paths = train_shards(dataset)
    res = runner.map(paths, [cfg] * len(paths), "fit (train)")
    acc = FitAccumulator()
    for r in res:
        acc.add(r["fit"])
    tok = acc.tokenizer(params, patterns, _ranges(dataset, params))
    stage = StageResult("fit", sum(r["n"] for r in res), time.perf_counter() - t0, runner.workers, _busy(res))
    return tok, stage, acc.distinct_values


def tokenize_dataset(
    dataset: MedsDataset,
    tok: Tokenizer,
    out_dir: Path,
    runner: ShardRunner,
    shards: list[int] | None = None,
) -> tuple[list[Path], StageResult]:
    """Tokenize shards into `out_dir/<i>.npz` (atomic; existing files are reused, so a rerun resumes)."""
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_path = out_dir / "tokenizer.json"
    tok.save(tok_path)
    idx = list(range(len(dataset.shards))) if shards is None else list(shards)
    files = [out_dir / f"{i:05d}.npz" for i in idx]
    todo = [k for k, f in enumerate(files) if not f.is_file()]
    cfgs = [
        _cfg(tok.params, tok.patterns, tokenizer_path=str(tok_path), tokenize_to=str(files[k])) for k in todo
    ]
    res = runner.map([dataset.shards[idx[k]] for k in todo], cfgs, "tokenize")
    stage = StageResult(
        "tokenize", sum(r["n"] for r in res), time.perf_counter() - t0, runner.workers, _busy(res)
    )
    return files, stage


@dataclass
class PreparedData:
    """Everything `repro.training.prepare.prepare` needs from the data, built once and cached."""

    tokenizer: Tokenizer
    timelines: Timelines
    labels: dict[str, pd.DataFrame]  # subject_id, prediction_time, admit, discharge, label(s)
    n_visits: pd.Series
    n_events: int
    seconds: dict[str, float]
    cache_dir: Path | None = None
    cache_hit: bool = False


# max_len and max_visits act at encode time; everything else changes the fit or the timelines.
FIT_FIELDS = ("n_bins", "families", "include_diagnoses", "min_count", "values", "bins", "time_tokens")


def cache_key(dataset: MedsDataset, params: TokenizerParams, patterns: CodePatterns, tasks: list[str]) -> str:
    """Hash of the data files (path, size, mtime), the fit parameters, code patterns, tasks and code version.

    The code metadata file counts when it exists: clinical bins read their reference ranges from it.
    """
    files = [*dataset.shards, dataset.root / meds.subject_splits_filepath]
    if (dataset.root / meds.code_metadata_filepath).is_file():
        files.append(dataset.root / meds.code_metadata_filepath)
    blob = {
        "version": STREAM_VERSION,
        "root": str(Path(dataset.root).resolve()),
        "files": [(str(f.relative_to(dataset.root)), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
        "tokenizer": {k: asdict(params)[k] for k in FIT_FIELDS},
        "patterns": asdict(patterns),
        "tasks": list(tasks),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _write_json(obj: Any, path: Path) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def _save_frame(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def _load_cached(d: Path, params: TokenizerParams, patterns: CodePatterns, tasks: list[str]) -> PreparedData:
    t0 = time.perf_counter()
    done = json.loads((d / "done.json").read_text())
    tok = Tokenizer.load(d / "shards" / "tokenizer.json").with_params(params, patterns)
    labels = {t: pd.read_parquet(d / "labels" / f"{t}.parquet") for t in tasks}
    nv = pd.read_parquet(d / "labels" / "n_visits.parquet")
    n_visits = pd.Series(
        nv["n"].to_numpy(np.int64), index=pd.Index(nv[SUBJECT].to_numpy(np.int64), name=SUBJECT)
    )
    tl = open_timelines(d / "timelines")
    os.utime(d / "done.json")  # recently used: survives pruning
    seconds = {**done["seconds"], "cache_hit": 1.0, "load": time.perf_counter() - t0}
    return PreparedData(tok, tl, labels, n_visits, int(done["n_events"]), seconds, d, True)


def prune_cache(cache_root: Path, keep: int = 8) -> None:
    """Remove all but the `keep` most recently used tokenized caches."""
    dirs = [p for p in cache_root.glob("tokenized-*") if (p / "done.json").is_file()]
    dirs.sort(key=lambda p: (p / "done.json").stat().st_mtime, reverse=True)
    for p in dirs[keep:]:
        shutil.rmtree(p, ignore_errors=True)


def prepare_data(
    dataset: MedsDataset,
    params: TokenizerParams,
    patterns: CodePatterns,
    tasks: list[str],
    cache_root: Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> PreparedData:
    """Validate, label, fit on train and tokenize, streaming shard by shard in `workers` processes.

    With `cache_root`, results go to `cache_root/tokenized-<key>/` and a second call with the same data
    and parameters only memory-maps them. Without it, everything stays in memory (small data, tests).
    """
    tasks = list(tasks)
    d = None
    if cache_root is not None:
        d = Path(cache_root) / f"tokenized-{cache_key(dataset, params, patterns, tasks)}"
        if (d / "done.json").is_file():
            return _load_cached(d, params, patterns, tasks)
    workers = default_workers(dataset) if workers is None else workers
    seconds: dict[str, float] = {"workers": float(workers)}
    t_all = time.perf_counter()
    with ShardRunner(workers, progress) as runner:
        # Pass 1: validate + label every shard, fit summary of train subjects' events.
        t0 = time.perf_counter()
        cfg = _cfg(params, patterns, label=True, fit=True, tasks=tasks, root=str(dataset.root))
        res = runner.map(dataset.shards, [cfg] * len(dataset.shards), "validate + label + fit")
        check_subjects(dataset, res)
        wall1 = time.perf_counter() - t0
        busy = _busy(res)
        share = {k: v / max(sum(busy.values()), 1e-9) for k, v in busy.items()}
        seconds["read_validate"] = wall1 * share.get("read_validate", 0.0)
        seconds["label"] = wall1 * (share.get("label", 0.0) + share.get("visits", 0.0))
        t0 = time.perf_counter()
        acc = FitAccumulator()
        for r in res:
            acc.add(r.pop("fit"))
        tok = acc.tokenizer(params, patterns, _ranges(dataset, params))
        labels = finish_labels([r["labels"] for r in res], tasks, dataset.subjects(meds.train_split))
        n_visits = _n_visits(res)
        n_events = sum(r["n"] for r in res)
        del res
        seconds["fit"] = wall1 * share.get("fit", 0.0) + time.perf_counter() - t0
        # Pass 2: tokenize every shard to its own file; then assemble.
        t0 = time.perf_counter()
        tmp_dir = None
        if d is not None:
            shard_dir = d / "shards"
        else:
            tmp_dir = Path(tempfile.mkdtemp(prefix="repro-tokenized-"))
            shard_dir = tmp_dir
        try:
            files, _ = tokenize_dataset(dataset, tok, shard_dir, runner)
            seconds["tokenize"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            if d is None:
                tl = assemble_timelines(files)
            else:
                tl_dir = d / f"timelines.{os.getpid()}.tmp"
                assemble_timelines(files, tl_dir)
                final = d / "timelines"
                try:
                    os.rename(tl_dir, final)
                except OSError:  # another process finished the same (identical) assembly first
                    shutil.rmtree(tl_dir, ignore_errors=True)
                tl = open_timelines(final)
            seconds["assemble"] = time.perf_counter() - t0
        finally:
            if tmp_dir is not None:
                shutil.rmtree(tmp_dir, ignore_errors=True)
    seconds["tokenize"] += seconds["fit"]  # the report's "tokenize" step: fit on train + tokenize
    seconds["total"] = time.perf_counter() - t_all
    if d is not None:
        (d / "labels").mkdir(parents=True, exist_ok=True)
        for t, df in labels.items():
            _save_frame(df, d / "labels" / f"{t}.parquet")
        _save_frame(
            pd.DataFrame({SUBJECT: n_visits.index.to_numpy(np.int64), "n": n_visits.to_numpy(np.int64)}),
            d / "labels" / "n_visits.parquet",
        )
        _write_json(
            {"n_events": n_events, "seconds": seconds, "distinct_lab_values": acc.distinct_values},
            d / "done.json",
        )
        prune_cache(Path(cache_root))
    return PreparedData(tok, tl, labels, n_visits, n_events, seconds, d, False)
