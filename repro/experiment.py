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

from repro.config import NEURAL_MODELS, RunParams, load_params
from repro.data.dataset import SequenceDataset
from repro.data.meds import SUBJECT, MedsDataset, load_meds, read_events
from repro.data.synthetic import true_probabilities, write_synthetic_meds
from repro.data.tasks import build_task, find_visits
from repro.data.tokenizer import N_TOKEN_TYPES, Encoded, Timelines, Tokenizer
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

    @property
    def synthetic(self) -> bool:
        return self.params.data.synthetic and not self.params.data.meds_dir


def synthetic_dir(params: RunParams) -> Path:
    """Where the embedded synthetic cohort of these parameters lives (shared by runs, deterministic)."""
    d = params.data
    return (
        resolve("outputs/.cache") / f"synthetic-v1-n{d.n_subjects}-seed{d.generator_seed}-shard{d.shard_size}"
    )


def ensure_meds(params: RunParams, data_dir: str | Path | None = None) -> Path:
    """The MEDS directory to use: `data_dir`, else params' meds_dir, else the synthetic cohort (generated once)."""
    if data_dir:
        return resolve(data_dir)
    if params.data.meds_dir:
        return resolve(params.data.meds_dir)
    out = synthetic_dir(params)
    if not out.is_dir():
        d = params.data
        write_synthetic_meds(
            out, d.n_subjects, d.generator_seed, d.shard_size, d.split_fractions, progress=True
        )
    return out


def load_run_params(params_file: str | Path, data_dir: str | None = None) -> RunParams:
    """Params of a notebook run; `data_dir` (the CLI's --data) switches to real-data mode."""
    params = load_params(resolve(params_file))
    if data_dir:
        params.data.synthetic = False
        params.data.meds_dir = str(data_dir)
    return params


def prepare(params: RunParams, data_dir: str | Path | None = None) -> Prepared:
    """Validate the MEDS data, fit the tokenizer on train, build timelines and task labels."""
    t0 = time.perf_counter()
    root = ensure_meds(params, data_dir)
    dataset = load_meds(root)
    events = read_events(dataset)
    t1 = time.perf_counter()
    split_of = dict(zip(dataset.splits[SUBJECT].astype(int), dataset.splits["split"]))
    train_ids = dataset.subjects(meds.train_split)
    train_events = events[events[SUBJECT].isin(train_ids)]
    tok = Tokenizer.fit(train_events, params.tokenizer, params.data.codes)
    timelines = tok.timelines(events)
    t2 = time.perf_counter()
    visits = find_visits(events, params.data.codes)
    labels = {}
    truth = None
    truth_path = root / "truth" / "last_admission.parquet"
    if truth_path.is_file():
        truth = pq.read_table(truth_path).to_pandas()
        probs = true_probabilities(truth)
    for task in params.tasks:
        df = build_task(task, events, params.data.codes, visits)
        df["split"] = df[SUBJECT].map(split_of)
        if truth is not None:
            df["true_prob"] = df[SUBJECT].map(pd.Series(probs[task], index=truth[SUBJECT].to_numpy()))
        labels[task] = df.reset_index(drop=True)
    t3 = time.perf_counter()
    return Prepared(
        params=params,
        meds_dir=root,
        dataset=dataset,
        tokenizer=tok,
        timelines=timelines,
        split_of=split_of,
        labels=labels,
        n_visits=visits.groupby(SUBJECT).size(),
        n_events=len(events),
        seconds={"read_validate": t1 - t0, "tokenize": t2 - t1, "label": t3 - t2},
    )


def encode_samples(
    prep: Prepared, task: str, split: str, first_token: str = "cls", max_len: int | None = None
) -> tuple[list[Encoded], pd.DataFrame]:
    """Token sequences of a task's samples in one split, each cut strictly before its prediction time."""
    df = prep.labels[task]
    df = df[df["split"] == split].reset_index(drop=True)
    index = prep.timelines.index()
    tok = prep.tokenizer
    first = tok.task_token_id(task) if first_token == "task" else 2
    if max_len is not None:
        tok = copy.copy(tok)
        tok.params = dataclasses.replace(tok.params, max_len=max_len)
    items = [
        tok.encode(prep.timelines, index[int(s)], int(t), first)
        for s, t in zip(df[SUBJECT], df["prediction_time"])
    ]
    return items, df


def pretrain_samples(prep: Prepared) -> list[Encoded]:
    """Train subjects' most recent `max_len` tokens of their whole history (no labels, no other split)."""
    index = prep.timelines.index()
    ids = [s for s in prep.dataset.subjects(meds.train_split) if int(s) in index]
    return [prep.tokenizer.encode(prep.timelines, index[int(s)]) for s in ids]


def model_kwargs(params: RunParams, name: str, vocab_size: int) -> dict[str, Any]:
    """Build arguments of a neural model: the params' size block plus what the tokenizer fixes."""
    kw = dict(params.model_sizes.get(name, {}))
    kw.update(n_types=N_TOKEN_TYPES, max_visits=params.tokenizer.max_visits)
    if name == "cehr_bert":
        kw.setdefault("max_len", params.tokenizer.max_len)
    return kw


@dataclass
class ModelRun:
    """One model, one task, one seed: predictions on tuning and held_out, and how it was trained."""

    model: str
    task: str
    seed: int
    predictions: pd.DataFrame  # subject_id, split, label, score (+ true_prob when known)
    n_params: int
    kernel_path: str
    pretrain: TrainResult | None
    finetune: TrainResult | None
    seconds: float


class Trainer:
    """Trains each neural model once per seed (pretraining), then finetunes per task; caches the pretrained weights."""

    def __init__(self, prep: Prepared, work_dir: str | Path, progress: bool = True) -> None:
        self.prep = prep
        self.work_dir = resolve(work_dir)
        self.device = resolve_device(prep.params.device)
        self.progress = progress
        self._pretrained: dict[tuple[str, int], tuple[dict, TrainResult]] = {}
        self._data: dict[tuple[str, str], tuple[list[Encoded], pd.DataFrame]] = {}
        if prep.params.train.num_threads:
            torch.set_num_threads(prep.params.train.num_threads)

    def _samples(self, task: str, split: str) -> tuple[list[Encoded], pd.DataFrame]:
        key = (task, split)
        if key not in self._data:
            self._data[key] = encode_samples(self.prep, task, split)
        return self._data[key]

    def _build(self, name: str):
        from repro.models.registry import build_model

        return build_model(
            name,
            self.prep.tokenizer.vocab_size,
            **model_kwargs(self.prep.params, name, self.prep.tokenizer.vocab_size),
        )

    def pretrained(self, name: str, seed: int):
        """Model `name` after CLM (causal) or MLM (encoder) pretraining on the train split."""
        key = (name, seed)
        if key not in self._pretrained:
            torch.manual_seed(seed)
            model = self._build(name)
            objective = "clm" if model.causal else "mlm"
            tp = self.prep.params.train
            res = fit(
                model,
                SequenceDataset(pretrain_samples(self.prep)),
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
                    **model_kwargs(self.prep.params, name, self.prep.tokenizer.vocab_size),
                },
                progress=self.progress,
                desc=f"pretrain {name} s{seed}",
            )
            self._pretrained[key] = (
                {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                res,
            )
        state, res = self._pretrained[key]
        model = self._build(name)
        model.load_state_dict(state)
        return model, res

    def run(self, name: str, task: str, seed: int) -> ModelRun:
        """Train model `name` on `task` with `seed`; score tuning and held_out."""
        t0 = time.perf_counter()
        tr_items, tr_df = self._samples(task, meds.train_split)
        frames = []
        if name == "count_lr":
            from repro.models.baselines import CountLogistic

            full = self.prep.params.tokenizer.max_len * 1000
            tr_full, _ = encode_samples(self.prep, task, meds.train_split, max_len=full)
            tu_full, tu_df = encode_samples(self.prep, task, meds.tuning_split, max_len=full)
            model = CountLogistic(self.prep.tokenizer.vocab_size, seed=seed)
            model.fit(tr_full, tr_df["label"].to_numpy(), tu_full, tu_df["label"].to_numpy())
            for split in (meds.tuning_split, meds.held_out_split):
                items, df = encode_samples(self.prep, task, split, max_len=full)
                frames.append(df.assign(score=model.predict(items)))
            pre = ft = None
            n_params, kernel = model.n_params(), "sklearn"
        elif name in NEURAL_MODELS:
            model, pre = self.pretrained(name, seed)
            model.set_n_outputs(1)
            tp = self.prep.params.train
            ft = fit(
                model,
                SequenceDataset(tr_items, tr_df["label"].to_numpy()),
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
                items, df = self._samples(task, split)
                frames.append(
                    df.assign(score=predict(model, SequenceDataset(items), self.device, tp.eval_batch_size))
                )
            n_params, kernel = model.n_params(), model.kernel_path
        else:
            raise ValueError(f"unknown model {name!r}")
        preds = pd.concat(frames, ignore_index=True)
        keep = [c for c in (SUBJECT, "split", "label", "score", "true_prob") if c in preds.columns]
        return ModelRun(name, task, seed, preds[keep], n_params, kernel, pre, ft, time.perf_counter() - t0)


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
