"""The steps a notebook calls: prepare data, encode task samples, train a model, predict.

Kept here so notebooks stay thin (prose plus one call per step) and two notebooks never carry
copies of the same code. Everything learned from data (bins, vocabulary, count-model C, neural
weights) is fitted on the train split; the tuning split chooses thresholds and C; held_out is only
scored.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import meds
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from repro.config import ParamsError, RunParams, from_dict, load_params
from repro.data.dataset import SequenceDataset
from repro.data.meds import SUBJECT, MedsDataset, load_meds
from repro.data.synthetic import GENERATOR_VERSION, true_probabilities, write_synthetic_meds
from repro.data.tasks import LABEL_PREFIX, label_columns
from repro.data.tokenizer import CLS, N_TOKEN_TYPES, Encoded, Timelines, Tokenizer
from repro.train import TrainResult, fit, predict, resolve_device

SPLITS = (meds.train_split, meds.tuning_split, meds.held_out_split)


def project_root(start: Path | None = None) -> Path:
    """The directory holding pyproject.toml, so notebooks opened from notebooks/ find params/ too."""
    here = (start or Path.cwd()).resolve()
    for p in (here, *here.parents):
        if (p / "pyproject.toml").is_file() and (p / "repro").is_dir():
            return p
    return Path.cwd().resolve()


def resolve(path: str | Path) -> Path:
    """A path relative to the project root unless absolute."""
    p = Path(path)
    return p if p.is_absolute() else project_root() / p


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

    @property
    def synthetic(self) -> bool:
        return self.params.data.synthetic and not self.params.data.meds_dir


def check_cohort(prep: Prepared) -> str:
    """One line on subjects without a visit (they are dropped from every task); a ParamsError naming the
    task, the split and the code patterns when a task of the run has no sample left in a split."""
    n_subjects = len(prep.split_of)
    with_visit = int((prep.n_visits.reindex(list(prep.split_of), fill_value=0) > 0).sum())
    codes = prep.params.data.codes
    for task in prep.params.tasks:
        df = prep.labels.get(task)
        for split in (meds.train_split, meds.held_out_split):
            n = 0 if df is None else int(df["subject_id"].map(prep.split_of).eq(split).sum())
            if n == 0:
                raise ParamsError(
                    f"task {task}: no sample in the {split} split after its filters ({with_visit} of "
                    f"{n_subjects} subjects have a visit from data.codes.visit_start={codes.visit_start!r} to "
                    f"visit_end={codes.visit_end!r}); fix data.codes or remove {task} from tasks"
                )
    return (
        f"{n_subjects - with_visit:,} of {n_subjects:,} subjects have no visit ({codes.visit_start!r} ... "
        f"{codes.visit_end!r}) and are dropped from every task"
    )


def synthetic_dir(params: RunParams) -> Path:
    """Where the embedded synthetic cohort of these parameters lives (shared by runs, deterministic)."""
    d = params.data
    name = f"synthetic-v{GENERATOR_VERSION}-n{d.n_subjects}-seed{d.generator_seed}-shard{d.shard_size}"
    return resolve("outputs/.cache") / name


def ensure_meds(params: RunParams, data_dir: str | Path | None = None) -> Path:
    """The MEDS directory to use: `data_dir`, else params' meds_dir, else the synthetic cohort (generated once)."""
    if data_dir:
        return resolve(data_dir)
    if params.data.meds_dir:
        return resolve(params.data.meds_dir)
    out = synthetic_dir(params)
    if not out.is_dir():
        d = params.data
        # Shards in parallel processes for large cohorts (the data do not depend on the worker count).
        workers = data_workers() or (min(os.cpu_count() or 1, 8) if d.n_subjects >= 10_000 else 1)
        write_synthetic_meds(
            out,
            d.n_subjects,
            d.generator_seed,
            d.shard_size,
            d.split_fractions,
            progress=True,
            workers=workers,
        )
    return out


def load_run_params(params_file: str | Path, data_dir: str | None = None) -> RunParams:
    """Params of a notebook run; `data_dir` (the CLI's --data) switches to real-data mode."""
    params = load_params(resolve(params_file))
    if data_dir:
        params.data.synthetic = False
        params.data.meds_dir = str(data_dir)
    if not params.data.synthetic and not params.data.meds_dir:
        raise ParamsError(
            f"{params_file}: data.synthetic is false but data.meds_dir is not set; pass --data MEDS_DIR"
        )
    return params


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
    labels = {}
    truth = None
    truth_path = root / "truth" / "last_admission.parquet"
    if truth_path.is_file():
        truth = pq.read_table(truth_path).to_pandas()
        probs = true_probabilities(truth)
    for task in params.tasks:
        df = data.labels[task].copy()
        df["split"] = df[SUBJECT].map(split_of)
        if truth is not None:
            _attach_truth(df, task, truth, probs)
        labels[task] = df.reset_index(drop=True)
    seconds = dict(data.seconds)
    seconds["prepare_total"] = time.perf_counter() - t0
    return Prepared(
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
    )


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
    tok = prep.tokenizer
    if max_len is not None:
        tok = copy.copy(tok)
        tok.params = dataclasses.replace(tok.params, max_len=max_len)
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


def pretrain_samples(prep: Prepared) -> list[Encoded]:
    """Train subjects' most recent `max_len` tokens of their whole history (no labels, no other split)."""
    index = prep.timelines.index()
    ids = [s for s in prep.dataset.subjects(meds.train_split) if int(s) in index]
    return [prep.tokenizer.encode(prep.timelines, index[int(s)]) for s in ids]


def model_kwargs(params: RunParams, name: str) -> dict[str, Any]:
    """Build arguments of a backbone: the params' size block plus what the tokenizer fixes."""
    kw = dict(params.model_sizes.get(name, {}))
    kw.update(n_types=N_TOKEN_TYPES, max_visits=params.tokenizer.max_visits)
    if name in LENGTH_BOUND:
        kw.setdefault("max_len", params.tokenizer.max_len)
    if params.tokenizer.values == "xval":
        kw["value_head"] = True  # xVal pretrains a numeric head beside the token head
    return kw


LENGTH_BOUND = ("cehr_bert", "bigbird", "transformer")


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


@dataclass
class ModelRun:
    """One model, one task, one seed: predictions on tuning and held_out, and how it was trained."""

    model: str
    task: str
    seed: int
    predictions: pd.DataFrame  # subject_id, split, target, label, score (+ true_prob when known)
    n_params: int
    kernel_path: str
    pretrain: TrainResult | None
    finetune: TrainResult | None
    seconds: float
    mode: str = "single-task"  # or "MPF"


class Trainer:
    """Pretrains each neural model once per seed, then finetunes it per task (single-task) or on all tasks at once
    (MPF); caches pretrained weights and encoded samples. Other backbones are matched to EHRMamba's
    parameter count when the params ask for it.
    """

    def __init__(self, prep: Prepared, work_dir: str | Path, progress: bool = True) -> None:
        self.prep = prep
        self.work_dir = resolve(work_dir)
        self.device = resolve_device(prep.params.device)
        self.progress = progress
        self._pretrained: dict[tuple[str, int], tuple[dict, TrainResult | None]] = {}
        self._data: dict[tuple, tuple[list[Encoded], pd.DataFrame]] = {}
        self._pretrain: list[Encoded] | None = None
        self._kwargs: dict[str, dict[str, Any]] = {}
        self._mpf: dict[tuple[str, int], dict[str, ModelRun]] = {}
        self._stored: dict[str, Any] = {}  # runs read from work/runs/, so each file is read once
        if prep.params.train.num_threads:
            torch.set_num_threads(prep.params.train.num_threads)

    def samples(
        self, task: str, split: str, prompt: str | None = None, max_len: int | None = None
    ) -> tuple[list[Encoded], pd.DataFrame]:
        """A split's encoded samples for `task` and their labels, encoded once per Trainer."""
        key = (task, split, prompt, max_len)
        if key not in self._data:
            self._data[key] = encode_samples(self.prep, task, split, prompt, max_len)
        return self._data[key]

    def _pretrain_items(self) -> list[Encoded]:
        if self._pretrain is None:
            self._pretrain = pretrain_samples(self.prep)
        return self._pretrain

    def build_kwargs(self, name: str) -> dict[str, Any]:
        """The backbone's build arguments; matched to EHRMamba's parameter count when params.match_params."""
        if name not in self._kwargs:
            from repro.models.registry import build_model, match_params

            kw = model_kwargs(self.prep.params, name)
            vocab = self.prep.tokenizer.vocab_size
            if self.prep.params.match_params and name != "ehrmamba":
                target = build_model("ehrmamba", vocab, **self.build_kwargs("ehrmamba")).n_params()
                # attention head sizes in multiples of 8 keep the fused attention kernels usable
                kw = match_params(name, target, vocab, step=8 * int(kw.get("n_heads", 1)), **kw)
            self._kwargs[name] = kw
        return self._kwargs[name]

    def build(self, name: str, seed: int):
        """A fresh `name` initialised from `seed`.

        Its size is settled before seeding: matching it to EHRMamba builds models too, which would
        otherwise shift the initialisation the first time only, so a run's weights would depend on what
        its process had built before (the pool's schedule, `train.workers`).
        """
        from repro.models.registry import build_model

        kwargs = self.build_kwargs(name)
        torch.manual_seed(seed)
        return build_model(name, self.prep.tokenizer.vocab_size, **kwargs)

    def pretrained(self, name: str, seed: int):
        """Backbone `name` after its pretraining objective (CLM causal, MLM encoders, none for the LSTM)."""
        key = (name, seed)
        if key not in self._pretrained:
            model = self.build(name, seed)
            objective = getattr(model.backbone, "pretrain_objective", "clm" if model.causal else "mlm")
            res = None
            tp = self.prep.params.train
            if objective and tp.pretrain_steps:
                res = fit(
                    model,
                    SequenceDataset(self._pretrain_items()),
                    tp,
                    objective,
                    tp.pretrain_steps,
                    tp.lr,
                    seed,
                    self.device,
                    checkpoint=self.work_dir / f"{name}-seed{seed}-pretrain.pt",
                    spec={
                        "name": name,
                        "vocab_size": self.prep.tokenizer.vocab_size,
                        **self.build_kwargs(name),
                    },
                    progress=self.progress,
                    desc=f"pretrain {name} s{seed}",
                )
            self._pretrained[key] = (
                {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                res,
            )
        state, res = self._pretrained[key]
        model = self.build(name, seed)
        model.load_state_dict(state)
        return model, res

    def run_job(self, job: tuple[str, str, int]):
        """A (model, task, seed) job; task "mpf" returns the model's multitask runs (dict by task)."""
        name, task, seed = job
        return self.run_mpf(name, seed) if task == "mpf" else self.run(name, task, seed)

    def _cached(self, key: str, compute):
        """Load a finished run from work/runs/ (same params hash) or compute and store it atomically.

        Notebooks of one run share work/, so a model trained for H1 is not trained again for H3.
        """
        value = self.stored(key)
        if value is not None:
            return value
        path = self.work_dir / "runs" / f"{key}.pkl"
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pickle.dump({"params_hash": self.prep.params.hash(), "value": value}, f)
        os.replace(tmp, path)
        return value

    def stored(self, key: str):
        """The run cached under work/runs/<key>.pkl with this run's params hash, else None (not remembered:
        a worker process may write it later)."""
        if key not in self._stored:
            value = _load_cached(self.work_dir / "runs" / f"{key}.pkl", self.prep.params.hash())
            if value is None:
                return None
            self._stored[key] = value
        return self._stored[key]

    def run(self, name: str, task: str, seed: int) -> ModelRun:
        """Train model `name` on `task` with `seed`; score tuning and held_out. "multibird" is BigBird + MPF."""
        if name == "multibird":
            return dataclasses.replace(self.run_mpf("bigbird", seed)[task], model="multibird")
        return self._cached(job_key((name, task, seed)), lambda: self._run(name, task, seed))

    def _run(self, name: str, task: str, seed: int) -> ModelRun:
        t0 = time.perf_counter()
        full = self.prep.params.tokenizer.max_len * 1000 if name == "count_lr" else None  # whole history
        tr_items, tr_df = self.samples(task, meds.train_split, max_len=full)
        cols = label_columns(tr_df)
        frames = []
        if name == "count_lr":
            from repro.models.baselines import CountLogistic, count_matrix

            vocab = self.prep.tokenizer.vocab_size
            tu_items, tu_df = self.samples(task, meds.tuning_split, max_len=full)
            ho_items, ho_df = self.samples(task, meds.held_out_split, max_len=full)
            # one count matrix per split serves every label (conditions has 20)
            x_tr, x_tu = count_matrix(tr_items, vocab), count_matrix(tu_items, vocab)
            fitted = [
                CountLogistic(vocab, seed=seed).fit_counts(
                    x_tr, tr_df[c].to_numpy(), x_tu, tu_df[c].to_numpy()
                )
                for c in cols
            ]
            for x, df in ((x_tu, tu_df), (count_matrix(ho_items, vocab), ho_df)):
                frames.append(long_predictions(df, np.column_stack([m.predict_counts(x) for m in fitted])))
            pre = ft = None
            n_params, kernel = sum(m.n_params() for m in fitted), "sklearn"
        else:
            model, pre = self.pretrained(name, seed)
            model.set_n_outputs(len(cols))
            tp = self.prep.params.train
            ft = fit(
                model,
                SequenceDataset(tr_items, tr_df[cols].to_numpy()),
                tp,
                "classify",
                tp.finetune_steps,
                tp.finetune_lr,
                seed + 1000,
                self.device,
                checkpoint=self.work_dir / f"{name}-seed{seed}-{task}-finetune.pt",
                progress=self.progress,
                desc=f"finetune {name} {task} s{seed}",
            )
            for split in (meds.tuning_split, meds.held_out_split):
                items, df = self.samples(task, split)
                frames.append(
                    long_predictions(
                        df, predict(model, SequenceDataset(items), self.device, tp.eval_batch_size)
                    )
                )
            n_params, kernel = model.n_params(), model.kernel_path
        preds = pd.concat(frames, ignore_index=True)
        return ModelRun(name, task, seed, preds, n_params, kernel, pre, ft, time.perf_counter() - t0)

    def run_mpf(self, name: str, seed: int) -> dict[str, ModelRun]:
        """Multitask prompted finetuning: one run over pooled (patient, task) samples of every task.

        The task token replaces [CLS] (encoders) or the final [REG] (causal models); one head holds every
        task's outputs and each sample's loss covers its own task's columns only. The run gets as many
        steps as the single-task runs together, so the comparison is at equal compute.
        """
        key = (name, seed)
        if key not in self._mpf:
            self._mpf[key] = self._cached(job_key((name, "mpf", seed)), lambda: self._run_mpf(name, seed))
        return self._mpf[key]

    def _run_mpf(self, name: str, seed: int) -> dict[str, ModelRun]:
        t0 = time.perf_counter()
        model, pre = self.pretrained(name, seed)
        prompt = "last" if model.causal else "first"
        tasks = self.prep.params.tasks
        data, spans = mpf_dataset({t: self.samples(t, meds.train_split, prompt) for t in tasks})
        model.set_n_outputs(data.labels.shape[1])
        tp = self.prep.params.train
        steps = tp.finetune_steps * len(tasks)
        ft = fit(
            model,
            data,
            tp,
            "classify",
            steps,
            tp.finetune_lr,
            seed + 2000,
            self.device,
            checkpoint=self.work_dir / f"{name}-seed{seed}-mpf.pt",
            progress=self.progress,
            desc=f"MPF {name} s{seed}",
        )
        out = {}
        for task in tasks:
            frames = []
            for split in (meds.tuning_split, meds.held_out_split):
                it, df = self.samples(task, split, prompt)
                p = predict(model, SequenceDataset(it), self.device, tp.eval_batch_size)[:, spans[task]]
                frames.append(long_predictions(df, p))
            out[task] = ModelRun(
                name,
                task,
                seed,
                pd.concat(frames, ignore_index=True),
                model.n_params(),
                model.kernel_path,
                pre,
                ft,
                time.perf_counter() - t0,
                mode="MPF",
            )
        return out


def job_key(job: tuple[str, str, int]) -> str:
    """File stem of a (model, task, seed) job's cached run under work/runs/ (MultiBird is BigBird's MPF run)."""
    name, task, seed = job
    if name == "multibird":
        name, task = "bigbird", "mpf"
    return f"{name}-{task}-seed{seed}"


def _load_cached(path: Path, params_hash: str):
    """The cached run at `path` when it was made with these params, else None."""
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        blob = pickle.load(f)
    return blob["value"] if blob.get("params_hash") == params_hash else None


def _backbone(model: str) -> str:
    return "bigbird" if model == "multibird" else model


_WORKER_TRAINER: dict[tuple[str, str, str], Trainer] = {}


def _train_group(params_dict: dict, meds_dir: str, work_dir: str, jobs: list[tuple[str, str, int]]) -> None:
    """Worker process: rebuild the prepared data, train a group of jobs, leave results in work/runs/.

    A worker serves many groups: its Trainer (prepared data, encoded samples, pretrained weights) is kept
    for the next group of the same params; on the H200 node each group otherwise re-encoded every task's
    samples (about 10 s of CPU for the default cohort) while the GPU waited.
    """
    params = from_dict(params_dict)
    key = (params.hash(), meds_dir, work_dir)
    if key not in _WORKER_TRAINER:
        _WORKER_TRAINER.clear()
        _WORKER_TRAINER[key] = Trainer(prepare(params, meds_dir), work_dir, progress=False)
    trainer = _WORKER_TRAINER[key]
    torch.set_num_threads(1)  # after Trainer, which applies params.train.num_threads
    for job in jobs:
        trainer.run_job(job)


# Relative wall time of one (backbone, seed) group, from the training table of the H200 default run
# (pretraining plus five finetunes, seconds summed: counts + LR 40 on the CPU, BigBird with its MPF run 30,
# BiLSTM 22, the others 11-14): the pool starts the longest first, so its tail is short.
_GROUP_COST = {"mamba2": 4.0, "count_lr": 3.0, "bigbird": 2.5, "lstm": 1.8}
# Backbones whose kernels Triton compiles and autotunes on first use (on disk since TRITON_CACHE_*): their
# first group pays it, so their other seeds go last, when the tuned kernels are cached.
_TUNED_ONCE = {"mamba2"}


def schedule(groups: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Order (backbone, seed) groups for a pool: longest first, a Triton-tuned backbone's later seeds last.

    >>> schedule([("ehrmamba", 0), ("mamba2", 1), ("lstm", 0), ("mamba2", 0)])
    [('mamba2', 0), ('lstm', 0), ('ehrmamba', 0), ('mamba2', 1)]
    """
    first: dict[str, int] = {}
    for backbone, seed in groups:
        first[backbone] = min(seed, first.get(backbone, seed))
    late = [g for g in groups if g[0] in _TUNED_ONCE and g[1] != first[g[0]]]
    early = [g for g in groups if g not in late]
    return sorted(early, key=lambda g: -_GROUP_COST.get(g[0], 1.0)) + late


Plan = tuple[Prepared, "str | Path", list[tuple[str, str, int]]]


def run_plans(plans: list[Plan], workers: int = 1) -> list[list]:
    """`run_all` for several prepared datasets at once (notebook 05's variants): one pool trains the groups
    of every plan, so a variant with few groups does not leave workers idle. Returns each plan's runs."""
    from tqdm import tqdm

    trainers = [Trainer(prep, work_dir, progress=False) for prep, work_dir, _ in plans]
    pending: dict[tuple[int, str, int], list] = {}
    for i, (_, _, jobs) in enumerate(plans):
        for job in jobs:
            if trainers[i].stored(job_key(job)) is None:  # done runs need no worker
                pending.setdefault((i, _backbone(job[0]), job[2]), []).append(job)
    if workers > 1 and len(pending) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        order = {g: k for k, g in enumerate(schedule(list(dict.fromkeys((b, s) for _, b, s in pending))))}
        keys = sorted(pending, key=lambda k: (order[(k[1], k[2])], k[0]))
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = []
            for k in keys:
                prep, work_dir, _ = plans[k[0]]
                args = (prep.params.to_dict(), str(prep.meds_dir), str(work_dir), pending[k])
                futures.append(pool.submit(_train_group, *args))
            for f in tqdm(as_completed(futures), total=len(futures), desc="training (backbone x seed)"):
                f.result()
    out = []
    for trainer, (_, _, jobs) in zip(trainers, plans, strict=True):
        out.append([trainer.run_job(job) for job in tqdm(jobs, desc="models x tasks x seeds")])
    return out


def run_all(prep: Prepared, work_dir: str | Path, jobs: list[tuple[str, str, int]], workers: int = 1) -> list:
    """Train every (model, task, seed) job (task "mpf": the model's multitask run) and return the runs.

    With workers > 1, groups of jobs that share a pretrained backbone (same backbone and seed) run in
    parallel processes with one torch thread each, which uses small CPUs better than threads inside one
    small model; results go through work/runs/, so the order and the numbers do not depend on `workers`.
    """
    return run_plans([(prep, work_dir, jobs)], workers)[0]


def git_sha(root: Path | None = None) -> str | None:
    """The checked-out commit, with "-dirty" when tracked files differ from it."""
    root = root or project_root()
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def environment() -> dict[str, Any]:
    """Versions and device, for manifests and the report's appendix."""
    import sklearn

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "sklearn": sklearn.__version__,
        "meds": meds.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import mamba_ssm

        info["mamba_ssm"] = mamba_ssm.__version__
    except ImportError:
        info["mamba_ssm"] = None
    return info


def save_json(obj: Any, path: str | Path) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
