"""Prepared data of a run and the samples the training jobs read: validate and tokenize the MEDS data,
attach the known truth, encode each task's samples strictly before their prediction time.

Everything learned from data (bins, vocabulary) is fitted on the train split; the tuning split chooses
thresholds and C; held_out is only scored."""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import meds
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from repro.config import SPLIT_FRACTIONS, ParamsError, RunParams, resolve
from repro.data.dataset import SequenceDataset
from repro.data.meds import SUBJECT, MedsDataset, load_meds
from repro.data.synthetic import (
    GENERATOR_VERSION,
    MECHANISMS,
    check_mechanisms,
    split_counts,
    true_probabilities,
    write_synthetic_meds,
)
from repro.data.tasks import LABEL_PREFIX, hash_unit, label_columns
from repro.data.timelines import Timelines
from repro.data.tokenizer import Encoded, Tokenizer
from repro.data.vocab import CLS, N_TOKEN_TYPES
from repro.training.locks import file_lock

SPLITS = (meds.train_split, meds.tuning_split, meds.held_out_split)
PRETRAIN_ONLY_SALT = 0x57_28_15  # the paper's 57 / 28 / 15 split


@dataclass
class Prepared:
    """Data of one run after validation, tokenizer fitting and labelling."""

    params: RunParams
    meds_dir: Path
    dataset: MedsDataset
    tokenizer: Tokenizer
    timelines: Timelines
    split_of: dict[int, str]
    labels: dict[str, pd.DataFrame]
    n_visits: pd.Series
    n_events: int
    seconds: dict[str, float] = field(default_factory=dict)
    cache_dir: Path | None = None  # where the tokenized data are cached (None: built in memory)
    truth: pd.DataFrame | None = None  # the synthetic generator's truth per subject (None on real data)
    dropped_labels: dict[str, pd.DataFrame] = field(default_factory=dict)  # task -> labels left out, counts
    dropped_tasks: dict[str, str] = field(default_factory=dict)  # task -> why (eval.untrainable: drop)
    pretrain_only: frozenset[int] = frozenset()  # train patients that only pretrain (data.pretrain_only)

    @property
    def synthetic(self) -> bool:
        return self.params.data.synthetic and not self.params.data.meds_dir


def label_counts(prep: Prepared) -> pd.DataFrame:
    """Samples and positives per split for every task and label of the run (aggregates only): what the
    pre-flight prints and checks before any training."""
    rows = []
    for task in prep.params.tasks:
        df = prep.labels.get(task)
        if df is None or not _has_label(df):
            continue
        for col in label_columns(df):
            n = df.groupby("split")[col].count().reindex(SPLITS, fill_value=0)
            pos = df.groupby("split")[col].sum().reindex(SPLITS, fill_value=0)
            row = {"task": task, "label": "" if col == "label" else col.removeprefix(LABEL_PREFIX)}
            row |= {f"samples {k}": int(v) for k, v in n.items()}
            row |= {f"positives {k}": int(v) for k, v in pos.items()}
            rows.append(row)
    return pd.DataFrame(rows)


def preflight_lines(counts: pd.DataFrame) -> list[str]:
    """One line per task: samples and positives per split (a multi-label task: its labels and their fewest
    positives per split)."""
    lines = []
    for task, g in counts.groupby("task", sort=False):
        n = " / ".join(str(int(g[f"samples {k}"].iloc[0])) for k in SPLITS)
        if len(g) == 1 and g["label"].iloc[0] == "":
            pos = " / ".join(str(int(g[f"positives {k}"].iloc[0])) for k in SPLITS)
            lines.append(f"{task}: samples {n}, positives {pos} ({' / '.join(SPLITS)})")
        else:
            low = " / ".join(str(int(g[f"positives {k}"].min())) for k in SPLITS)
            lines.append(
                f"{task}: samples {n}, {len(g)} labels, fewest positives of a label {low} ({' / '.join(SPLITS)})"
            )
    return lines


def _has_label(df: pd.DataFrame) -> bool:
    """Whether a task frame kept a label column (a multi-label task may have lost all of them)."""
    return any(c.startswith(LABEL_PREFIX) or c == "label" for c in df.columns)


def untrainable_tasks(prep: Prepared, counts: pd.DataFrame | None = None) -> dict[str, str]:
    """The run's tasks that cannot be trained or evaluated, each with why (counts, and what to change):
    no sample left in a split (with the visit code patterns that define samples), a binary task with fewer
    than `eval.min_label_positives` positives or negatives in a split, or a multi-label task whose every
    label was left out. `counts`: `label_counts(prep)`, when the caller has it."""
    n_subjects = len(prep.split_of)
    with_visit = int((prep.n_visits.reindex(list(prep.split_of), fill_value=0) > 0).sum())
    codes = prep.params.data.codes
    k = prep.params.eval.min_label_positives
    out: dict[str, str] = {}
    for task in prep.params.tasks:
        df = prep.labels.get(task)
        for split in (meds.train_split, meds.held_out_split):
            n = 0 if df is None else int(df["subject_id"].map(prep.split_of).eq(split).sum())
            if n == 0 and task not in out:
                out[task] = (
                    f"no sample in the {split} split after its filters ({with_visit} of {n_subjects} subjects "
                    f"have a visit from data.codes.visit_start={codes.visit_start!r} to "
                    f"visit_end={codes.visit_end!r}); fix data.codes or remove {task} from tasks"
                )
        if task not in out and df is not None and not _has_label(df):
            out[task] = (
                f"every label has fewer than eval.min_label_positives={k} positives or negatives in a split; "
                f"remove {task} from tasks"
            )
    counts = label_counts(prep) if counts is None else counts
    for r in counts[counts["label"] == ""].to_dict(orient="records") if len(counts) else []:
        pos = [r[f"positives {s}"] for s in SPLITS]
        neg = [r[f"samples {s}"] - p for s, p in zip(SPLITS, pos, strict=True)]
        if min(pos + neg) < k and r["task"] not in out:
            out[r["task"]] = (
                f"cannot be trained or evaluated: positives {' / '.join(map(str, pos))} and negatives "
                f"{' / '.join(map(str, neg))} in {' / '.join(SPLITS)}; every split needs at least "
                f"eval.min_label_positives={k} of each: remove {r['task']} from tasks"
            )
    return out


def check_cohort(prep: Prepared, counts: pd.DataFrame | None = None) -> str:
    """Stop before any training, in one line naming the task and its counts, when a task of the run cannot
    be trained or evaluated (`untrainable_tasks`; with `eval.untrainable: drop`, `prepare` has already left
    such tasks out). Condition labels under the threshold were already left out by `prepare` (listed in the
    report).

    Returns one line on subjects without a visit (they are dropped from every task).
    """
    bad = untrainable_tasks(prep, counts)
    if bad:
        task, why = next(iter(bad.items()))
        raise ParamsError(f"task {task}: {why} (or set eval.untrainable: drop)")
    n_subjects = len(prep.split_of)
    with_visit = int((prep.n_visits.reindex(list(prep.split_of), fill_value=0) > 0).sum())
    codes = prep.params.data.codes
    return (
        f"{n_subjects - with_visit:,} of {n_subjects:,} subjects have no visit ({codes.visit_start!r} ... "
        f"{codes.visit_end!r}) and are dropped from every task"
    )


def drop_untrainable(prep: Prepared) -> Prepared:
    """`prep` without the tasks that cannot be trained (`eval.untrainable: drop`): its params list only the
    others, so every notebook loops over the same tasks, and `dropped_tasks` says why each went."""
    bad = untrainable_tasks(prep)
    if not bad:
        return prep
    kept = [t for t in prep.params.tasks if t not in bad]
    if not kept:
        raise ParamsError(
            f"eval.untrainable: drop leaves no task: {'; '.join(f'{t}: {w}' for t, w in bad.items())}"
        )
    try:
        params = dataclasses.replace(prep.params, tasks=kept)
    except ParamsError as exc:
        raise ParamsError(f"eval.untrainable: drop would drop {list(bad)}, but {exc}") from None
    labels = {t: df for t, df in prep.labels.items() if t in kept}
    return dataclasses.replace(prep, params=params, labels=labels, dropped_tasks=bad)


def synthetic_dir(params: RunParams) -> Path:
    """Where the embedded synthetic cohort of these parameters lives (shared by runs, deterministic)."""
    d = params.data
    name = f"synthetic-v{GENERATOR_VERSION}-n{d.n_subjects}-seed{d.generator_seed}-shard{d.shard_size}"
    strengths = check_mechanisms(d.mechanisms)
    if strengths != MECHANISMS:  # the default cohort keeps its plain name
        name += "-m" + "-".join(f"{k}{v:g}" for k, v in strengths.items())
    counts = split_counts(d.n_subjects, d.split_fractions)  # each subject's split is written into the cohort
    if counts != split_counts(d.n_subjects, SPLIT_FRACTIONS):
        name += "-split" + "-".join(str(c) for c in counts.values())
    return resolve("outputs/.cache") / name


def meds_location(params: RunParams, data_dir: str | Path | None = None) -> Path:
    """Where the run's MEDS data are: `data_dir`, else params' meds_dir, else the synthetic cohort's cache
    folder. Touches nothing; `ensure_meds` makes sure the data are there."""
    if data_dir:
        return resolve(data_dir)
    if params.data.meds_dir:
        return resolve(params.data.meds_dir)
    return synthetic_dir(params)


def ensure_meds(params: RunParams, data_dir: str | Path | None = None) -> Path:
    """The MEDS directory to use: `data_dir`, else params' meds_dir, else the synthetic cohort (generated once)."""
    out = meds_location(params, data_dir)
    if data_dir or params.data.meds_dir:
        return out
    # two processes starting on one cache (a notebook beside `repro run`, parallel trials) write it once
    with file_lock(out.parent / f".{out.name}.lock"):
        if not out.is_dir():
            _write_synthetic(params, out)
    _check_splits(out, split_counts(params.data.n_subjects, params.data.split_fractions))
    return out


def _write_synthetic(params: RunParams, out: Path) -> None:
    """Generate the cohort the params describe into ``out`` (shards in parallel for large cohorts; the data
    do not depend on the worker count)."""
    d = params.data
    workers = data_workers() or (min(os.cpu_count() or 1, 8) if d.n_subjects >= 10_000 else 1)
    write_synthetic_meds(
        out,
        d.n_subjects,
        d.generator_seed,
        d.shard_size,
        d.split_fractions,
        progress=True,
        workers=workers,
        mechanisms=d.mechanisms,
    )


def _check_splits(root: Path, expected: dict[str, int]) -> None:
    """Refuse a cached cohort whose subjects are split otherwise than the params say (one written before the
    cache was keyed by its splits): training on it would silently use other splits."""
    splits = pq.read_table(root / meds.subject_splits_filepath, columns=["split"]).column("split").to_pandas()
    found = {str(k): int(v) for k, v in splits.value_counts().items()}
    if found != {k: v for k, v in expected.items() if v}:
        raise ParamsError(
            f"{root}: this cached synthetic cohort is split {found}, but data.split_fractions gives {expected}; "
            "it was written by an older repro. Remove the folder and run again"
        )


def data_workers() -> int | None:
    """Worker processes for the data path: `REPRO_DATA_WORKERS` if set, else chosen from the data size."""
    v = os.environ.get("REPRO_DATA_WORKERS")
    return int(v) if v else None


def prepare(
    params: RunParams,
    data_dir: str | Path | None = None,
    workers: int | None = None,
    cache: bool = True,
    progress: bool = True,
) -> Prepared:
    """Validate the MEDS data, fit the tokenizer on train, build timelines and task labels.

    Streams shard by shard in worker processes (`repro.data.stream`), so memory is bounded by the
    largest shard; the result is cached under outputs/.cache/tokenized-<key>/ (key: the data files'
    path, size and mtime, tokenizer fit parameters, code patterns, tasks), and a second call with the
    same data and parameters memory-maps it instead of recomputing.
    """
    from repro.data.stream import prepare_data

    t0 = time.perf_counter()
    root = ensure_meds(params, data_dir)
    dataset = load_meds(root)
    data = prepare_data(
        dataset,
        params.tokenizer,
        params.data.codes,
        list(params.tasks),
        cache_root=resolve("outputs/.cache") if cache else None,
        workers=data_workers() if workers is None else workers,
        progress=progress,
    )
    split_of = dict(zip(dataset.splits[SUBJECT].astype(int), dataset.splits["split"]))
    pretrain_only = pretrain_only_subjects(split_of, params.data.pretrain_only)
    labels = {}
    truth = None
    truth_path = root / "truth" / "last_admission.parquet"
    if truth_path.is_file():
        truth = pq.read_table(truth_path).to_pandas()
        probs = true_probabilities(truth)
    for task in params.tasks:
        df = data.labels[task].copy()
        df["split"] = df[SUBJECT].map(split_of)
        df = df[~df[SUBJECT].isin(pretrain_only)]  # the paper's splits: they only pretrain
        if truth is not None:
            _attach_truth(df, task, truth, probs)
        labels[task] = df.reset_index(drop=True)
    dropped = {}
    for task, df in labels.items():
        labels[task], dropped[task] = drop_thin_labels(df, params.eval.min_label_positives)
    for task, df in labels.items():
        if params.eval.untrainable == "stop" and not _has_label(df):
            raise ParamsError(
                f"task {task}: every label has fewer than eval.min_label_positives="
                f"{params.eval.min_label_positives} positives or negatives in a split; remove {task} from tasks"
            )
    seconds = dict(data.seconds)
    seconds["prepare_total"] = time.perf_counter() - t0
    prep = Prepared(
        params=params,
        meds_dir=root,
        dataset=dataset,
        tokenizer=data.tokenizer,
        timelines=data.timelines,
        split_of=split_of,
        labels=labels,
        n_visits=data.n_visits,
        n_events=data.n_events,
        seconds=seconds,
        cache_dir=data.cache_dir,
        truth=truth,
        dropped_labels={task: d for task, d in dropped.items() if len(d)},
        pretrain_only=pretrain_only,
    )
    return drop_untrainable(prep) if params.eval.untrainable == "drop" else prep


def drop_thin_labels(df: pd.DataFrame, min_positives: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A multi-label task frame without its label columns that have fewer than `min_positives` positives or
    negatives in any split, and those labels with their positives per split (empty if none).

    The same rule on every data set: a label without positives in train cannot be fitted, and one with a
    handful in held_out gives an AUROC no interval can bound.
    """
    rows, gone = [], []
    for col in [c for c in label_columns(df) if c != "label"]:
        pos = df.groupby("split")[col].sum().reindex(SPLITS, fill_value=0)
        neg = df.groupby("split")[col].count().reindex(SPLITS, fill_value=0) - pos
        if min(pos.min(), neg.min()) < min_positives:
            group = col.removeprefix(LABEL_PREFIX)
            rows.append({"label": group, **{f"positives in {k}": int(v) for k, v in pos.items()}})
            gone += [col, f"true_prob::{group}"]
    return df.drop(columns=[c for c in gone if c in df.columns]), pd.DataFrame(rows)


def _attach_truth(df: pd.DataFrame, task: str, truth: pd.DataFrame, probs: dict) -> None:
    """Add the generator's true probability beside each label column (`true_prob` or `true_prob::<group>`)."""
    ids = truth[SUBJECT].to_numpy()
    if task != "conditions":
        df["true_prob"] = df[SUBJECT].map(pd.Series(probs[task], index=ids))
        return
    for col in label_columns(df):
        group = col.removeprefix(LABEL_PREFIX)
        key = group.split("//")[-1]
        if key in probs["conditions"]:
            df[f"true_prob::{group}"] = df[SUBJECT].map(pd.Series(probs["conditions"][key], index=ids))


def input_len(params: RunParams, name: str) -> int:
    """Tokens model `name` reads, the most recent of each history: `params.input_lengths`, else
    tokenizer.max_len (MultiBird reads what BigBird reads; counts + LR always counts tokenizer.max_len)."""
    backbone = "bigbird" if name == "multibird" else name
    return int(params.input_lengths.get(backbone, params.tokenizer.max_len))


def _tokenizer_at(prep: Prepared, max_len: int | None) -> Tokenizer:
    """The run's tokenizer keeping the most recent `max_len` tokens (None: the run's tokenizer.max_len)."""
    if max_len is None or max_len == prep.tokenizer.params.max_len:
        return prep.tokenizer
    tok = copy.copy(prep.tokenizer)
    tok.params = dataclasses.replace(tok.params, max_len=max_len)
    return tok


def encode_samples(
    prep: Prepared, task: str, split: str, prompt: str | None = None, max_len: int | None = None
) -> tuple[list[Encoded], pd.DataFrame]:
    """Token sequences of a task's samples in one split, each cut strictly before its prediction time.

    `prompt` puts the task token where the model pools (MPF): "first" replaces [CLS] (encoders), "last"
    replaces the final [REG] (causal models).
    """
    df = prep.labels[task]
    df = df[df["split"] == split].reset_index(drop=True)
    index = prep.timelines.index()
    tok = _tokenizer_at(prep, max_len)
    task_id = tok.task_token_id(task)
    first = task_id if prompt == "first" else CLS
    items = [
        tok.encode(prep.timelines, index[int(s)], int(t), first)
        for s, t in zip(df[SUBJECT], df["prediction_time"])
    ]
    if prompt == "last":
        for e in items:
            e.input_ids[-1] = task_id
    return items, df


def pretrain_only_subjects(split_of: dict[int, str], fraction: float) -> frozenset[int]:
    """The train patients that only pretrain under the paper's splits: a fixed hash of the subject id
    below `fraction`, so the set does not depend on row order, shards or the other patients.

    >>> ids = {i: "train" for i in range(10_000)} | {-1: "held_out"}
    >>> round(len(pretrain_only_subjects(ids, 0.67)) / 10_000, 2), -1 in pretrain_only_subjects(ids, 0.99)
    (0.67, False)
    """
    if fraction <= 0:
        return frozenset()
    train = np.array([s for s, split in split_of.items() if split == meds.train_split], dtype=np.int64)
    return frozenset(int(s) for s in train[hash_unit(train, PRETRAIN_ONLY_SALT) < fraction])


def pretrain_samples(
    prep: Prepared, split: str = meds.train_split, max_len: int | None = None
) -> list[Encoded]:
    """A split's subjects' most recent `max_len` (default tokenizer.max_len) tokens of their whole history,
    no labels: the train split pretrains (only its pretraining patients under the paper's splits), the
    tuning split validates."""
    index = prep.timelines.index()
    ids = [s for s in prep.dataset.subjects(split) if int(s) in index]
    if split == meds.train_split and prep.pretrain_only:
        ids = [s for s in ids if int(s) in prep.pretrain_only]
    tok = _tokenizer_at(prep, max_len)
    return [tok.encode(prep.timelines, index[int(s)]) for s in ids]


def model_kwargs(params: RunParams, name: str) -> dict[str, Any]:
    """Build arguments of a backbone: the params' size block plus what the tokenizer fixes."""
    kw = dict(params.model_sizes.get(name, {}))
    kw.update(n_types=N_TOKEN_TYPES, max_visits=params.tokenizer.max_visits)
    if name in LENGTH_BOUND:
        kw.setdefault("max_len", input_len(params, name))
    if params.tokenizer.values == "xval":
        kw["value_head"] = True  # xVal pretrains a numeric head beside the token head
    return kw


LENGTH_BOUND = ("cehr_bert", "bigbird", "transformer")


def sized_kwargs(params: RunParams, name: str, vocab_size: int) -> dict[str, Any]:
    """`model_kwargs`, matched to EHRMamba's parameter count when ``params.match_params`` (the comparison
    presets): the size every run of ``name`` trains at, for the trainer and the benchmarks alike."""
    from repro.models.registry import build_model, match_params

    kw = model_kwargs(params, name)
    if params.match_params and name != "ehrmamba":
        target = build_model("ehrmamba", vocab_size, **model_kwargs(params, "ehrmamba")).n_params()
        # attention head sizes in multiples of 8 keep the fused attention kernels usable
        kw = match_params(name, target, vocab_size, step=8 * int(kw.get("n_heads", 1)), **kw)
    return kw


def long_predictions(df: pd.DataFrame, scores: np.ndarray) -> pd.DataFrame:
    """One row per (sample, label column): subject_id, split, target, label, score (+ true_prob)."""
    cols = label_columns(df)
    frames = []
    for j, col in enumerate(cols):
        target = col.removeprefix(LABEL_PREFIX) if col != "label" else "label"
        f = pd.DataFrame(
            {
                SUBJECT: df[SUBJECT].to_numpy(),
                "split": df["split"].to_numpy(),
                "target": target,
                "label": df[col].to_numpy().astype(np.int64),
                "score": scores[:, j],
            }
        )
        tp = "true_prob" if col == "label" else f"true_prob::{target}"
        if tp in df:
            f["true_prob"] = df[tp].to_numpy()
        frames.append(f)
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values([SUBJECT, "target"], kind="stable").reset_index(drop=True)


def mpf_dataset(
    samples: dict[str, tuple[list[Encoded], pd.DataFrame]],
) -> tuple[SequenceDataset, dict[str, slice]]:
    """Pooled (patient, task) samples for MPF: one label row over every task's outputs, masked to its own task.

    Returns the dataset and each task's column span in the shared head.
    """
    spans, start = {}, 0
    for task, (_, df) in samples.items():
        k = len(label_columns(df))
        spans[task] = slice(start, start + k)
        start += k
    items, labels, masks = [], [], []
    for task, (it, df) in samples.items():
        y = np.zeros((len(it), start), np.float32)
        m = np.zeros_like(y)
        y[:, spans[task]] = df[label_columns(df)].to_numpy()
        m[:, spans[task]] = 1.0
        items += it
        labels.append(y)
        masks.append(m)
    return SequenceDataset(items, np.concatenate(labels), np.concatenate(masks)), spans
