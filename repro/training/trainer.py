"""The jobs layer's trainer: one (model, task, seed) run at a time, pretrained backbones and encoded
samples kept in memory, finished runs cached under work/runs/ by params hash."""

from __future__ import annotations

import dataclasses
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import meds
import numpy as np
import pandas as pd
import torch

from repro.config import TrainParams, atomic_path, resolve
from repro.data.dataset import SequenceDataset
from repro.data.tasks import label_columns
from repro.data.tokenizer import Encoded
from repro.training.loop import (
    TrainResult,
    features,
    fit,
    predict,
    resolve_device,
    row_losses,
    unigram_losses,
    val_subset,
)
from repro.training.prepare import (
    Prepared,
    encode_samples,
    input_len,
    long_predictions,
    mpf_dataset,
    pretrain_samples,
    sized_kwargs,
)


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

    def __init__(
        self, prep: Prepared, work_dir: str | Path, progress: bool = True, device: str | None = None
    ) -> None:
        self.prep = prep
        self.work_dir = resolve(work_dir)
        self.device = resolve_device(device or prep.params.device)  # the plan, which never trains: "cpu"
        self.progress = progress
        self._pretrained: dict[tuple[str, int], tuple[dict, TrainResult | None]] = {}
        self._data: dict[tuple, tuple[list[Encoded], pd.DataFrame]] = {}
        self._pretrain: dict[tuple[str, int | None], list[Encoded]] = {}
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

    def _pretrain_items(self, split: str = meds.train_split, max_len: int | None = None) -> list[Encoded]:
        if (split, max_len) not in self._pretrain:
            self._pretrain[split, max_len] = pretrain_samples(self.prep, split, max_len)
        return self._pretrain[split, max_len]

    def input_len(self, name: str) -> int | None:
        """The tokens `name` reads when the params give it its own length (params.input_lengths), else None:
        the run's tokenizer.max_len, whose encoded samples every such model shares."""
        n = input_len(self.prep.params, name)
        return None if n == self.prep.params.tokenizer.max_len else n

    def _val(self, data: SequenceDataset) -> SequenceDataset:
        """The fixed subset of a tuning-split dataset that validates a run."""
        return val_subset(data, self.prep.params.train.val_samples)

    def build_kwargs(self, name: str) -> dict[str, Any]:
        """The backbone's build arguments; matched to EHRMamba's parameter count when params.match_params."""
        if name not in self._kwargs:
            self._kwargs[name] = sized_kwargs(self.prep.params, name, self.prep.tokenizer.vocab_size)
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
            tp = self.prep.params.train.for_model(name)
            n = self.input_len(name)
            data = SequenceDataset(self._pretrain_items(meds.train_split, n))
            steps = tp.steps("pretrain", len(data))
            if objective and steps:
                res = fit(
                    model,
                    data,
                    tp,
                    objective,
                    steps,
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
                    val=self._val(SequenceDataset(self._pretrain_items(meds.tuning_split, n))),
                )
            self._pretrained[key] = (
                {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                res,
            )
        state, res = self._pretrained[key]
        model = self.build(name, seed)
        model.load_state_dict(state)
        return model, res

    def heldout_losses(self, name: str, seed: int) -> tuple[str, np.ndarray, np.ndarray] | None:
        """(objective, loss sum, loss count per held-out patient) of backbone ``name`` after pretraining,
        against its own objective (CLM or MLM); None when it was not pretrained (the LSTM, a zero budget).
        Loads the pretrained checkpoint, so a notebook after the training pool recomputes nothing."""
        model, res = self.pretrained(name, seed)
        objective = getattr(model.backbone, "pretrain_objective", "clm" if model.causal else "mlm")
        if not objective or res is None:
            return None
        data = SequenceDataset(self._pretrain_items(meds.held_out_split, self.input_len(name)))
        tp = self.prep.params.train.for_model(name)
        sums, counts = row_losses(
            model.to(self.device), data, objective, self.device, tp.eval_batch_size, tp.mlm_probability
        )
        return objective, sums, counts

    def unigram_losses(
        self, objective: str, max_len: int | None = None
    ) -> tuple[str, np.ndarray, np.ndarray]:
        """(objective, loss sum, scored tokens per held-out patient) of the train split's token frequencies
        on the tokens ``objective`` scores (``loop.unigram_losses``), over histories cut at ``max_len`` (a
        backbone's own input length, ``input_len``; None: the run's): the baseline of the pretraining table."""
        from repro.data.vocab import SPECIALS

        train, held = (
            [e.input_ids for e in self._pretrain_items(s, max_len)]
            for s in (meds.train_split, meds.held_out_split)
        )
        sums, counts = unigram_losses(train, held, self.prep.tokenizer.vocab_size, objective, len(SPECIALS))
        return objective, sums, counts

    def probes(self, name: str, task: str, seed: int) -> list[ModelRun]:
        """Frozen-representation probes of backbone ``name`` after pretraining on ``task``: one run per
        pooling of ``probes.poolings`` (model ``name+probe:<pooling>``), an L2 logistic regression per label
        fitted on train features with C chosen on tuning (``baselines.probe``), scored on tuning and
        held_out. Features come from the finetuning inputs (cut before the prediction time) in one pass per
        split; none for a backbone that was not pretrained. Cached under work/runs/ like every run."""
        return self._cached(job_key((name, PROBES + task, seed)), lambda: self._probes(name, task, seed))

    def _probes(self, name: str, task: str, seed: int) -> list[ModelRun]:
        from repro.models.baselines import probe

        t0 = time.perf_counter()
        model, pre = self.pretrained(name, seed)
        if pre is None:
            return []
        n, bs = self.input_len(name), self.prep.params.train.eval_batch_size
        split = {}
        for s in (meds.train_split, meds.tuning_split, meds.held_out_split):
            items, df = self.samples(task, s, max_len=n)
            split[s] = (features(model, SequenceDataset(items), self.device, bs), df)
        cols = label_columns(split[meds.train_split][1])
        seconds = (time.perf_counter() - t0) / len(self.prep.params.probes.poolings)
        runs = []
        for pooling in self.prep.params.probes.poolings:
            t1 = time.perf_counter()
            (x_tr, df_tr), (x_tu, df_tu) = (
                (split[s][0][pooling], split[s][1]) for s in (meds.train_split, meds.tuning_split)
            )
            fitted = [
                probe(
                    x_tr, df_tr[c].to_numpy(), x_tu, df_tu[c].to_numpy(), self.prep.params.probes.grid, seed
                )[0]
                for c in cols
            ]
            frames = [
                long_predictions(df, np.column_stack([m.predict_proba(x[pooling])[:, 1] for m in fitted]))
                for x, df in (split[meds.tuning_split], split[meds.held_out_split])
            ]
            runs.append(
                ModelRun(
                    model=f"{name}+probe:{pooling}",
                    task=task,
                    seed=seed,
                    predictions=pd.concat(frames, ignore_index=True),
                    n_params=len(cols) * (x_tr.shape[1] + 1),
                    kernel_path="sklearn probe",
                    pretrain=pre,
                    finetune=None,
                    seconds=seconds + time.perf_counter() - t1,
                    mode="probe",
                )
            )
        return runs

    def forecasts(self, name: str, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(generated, true) ids [n, max horizon] of causal backbone ``name`` after CLM pretraining on the
        first ``probes.forecast_patients`` held-out histories long enough (``forecast.forecast``); None for
        a backbone that was not pretrained by next-token prediction. Cached under work/runs/."""
        return self._cached(job_key((name, FORECAST, seed)), lambda: self._forecasts(name, seed))

    def _forecasts(self, name: str, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
        from repro.training.forecast import forecast, history_end, token_types

        model, pre = self.pretrained(name, seed)
        objective = getattr(model.backbone, "pretrain_objective", "clm" if model.causal else "mlm")
        pp = self.prep.params.probes
        if pre is None or objective != "clm" or not pp.forecast_patients:
            return None
        k = max(pp.forecast_horizons)
        n = self.input_len(name)
        held = [h for e in self._pretrain_items(meds.held_out_split, n) if len(h := history_end(e)) >= k + 2]
        types = token_types(self._pretrain_items(meds.train_split, n), self.prep.tokenizer.vocab_size)
        return forecast(
            model, held[: pp.forecast_patients], k, types, self.device, self.prep.params.train.eval_batch_size
        )

    def run_job(self, job: tuple[str, str, int]):
        """A (model, task, seed) job; task "mpf" returns the model's multitask runs (dict by task).

        The training pool also hands out stages that only need the pretrained backbone: PRETRAIN (trains
        or loads it; returns None), PROBES + task (``probes``) and FORECAST (``forecasts``)."""
        name, task, seed = job
        if task == PRETRAIN:
            self.pretrained(name, seed)
            return None
        if task == FORECAST:
            return self.forecasts(name, seed)
        if task.startswith(PROBES):
            return self.probes(name, task.removeprefix(PROBES), seed)
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
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            pickle.dump({"params_hash": self.prep.params.hash(), "value": value}, f)
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

    def finetune(
        self,
        model,
        name: str,
        train: SequenceDataset,
        tune: SequenceDataset,
        seed: int,
        checkpoint: Path | None = None,
        desc: str = "",
        max_steps: int | None = None,
    ) -> TrainResult:
        """Finetune `model` (backbone `name`, its head already sized) on labelled `train` with `name`'s
        finetuning settings, validating on the fixed subset of `tune`; `max_steps` caps the budget."""
        tp = self.prep.params.train.for_model(name).finetuning()
        steps = tp.steps("finetune", len(train))
        return fit(
            model,
            train,
            tp,
            "classify",
            min(steps, max_steps) if max_steps else steps,
            tp.finetune_lr,
            seed + 1000,
            self.device,
            checkpoint=checkpoint,
            progress=self.progress,
            desc=desc,
            val=self._val(tune),
        )

    def run(self, name: str, task: str, seed: int) -> ModelRun:
        """Train model `name` on `task` with `seed`; score tuning and held_out. "multibird" is BigBird + MPF."""
        if name == "multibird":
            return dataclasses.replace(self.run_mpf("bigbird", seed)[task], model="multibird")
        return self._cached(job_key((name, task, seed)), lambda: self._run(name, task, seed))

    def _run(self, name: str, task: str, seed: int) -> ModelRun:
        t0 = time.perf_counter()
        # counts + LR reads the run's max_len window, as every sequence model without its own input length
        # (DESIGN.md section 7)
        n = None if name == "count_lr" else self.input_len(name)
        tr_items, tr_df = self.samples(task, meds.train_split, max_len=n)
        cols = label_columns(tr_df)
        frames = []
        if name == "count_lr":
            from repro.models.baselines import CountLogistic, count_matrix

            vocab = self.prep.tokenizer.vocab_size
            tu_items, tu_df = self.samples(task, meds.tuning_split)
            ho_items, ho_df = self.samples(task, meds.held_out_split)
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
            tp = self.prep.params.train.for_model(name).finetuning()
            tu_items, tu_df = self.samples(task, meds.tuning_split, max_len=n)
            ft = self.finetune(
                model,
                name,
                SequenceDataset(tr_items, tr_df[cols].to_numpy()),
                SequenceDataset(tu_items, tu_df[cols].to_numpy()),
                seed,
                checkpoint=self.work_dir / f"{name}-seed{seed}-{task}-finetune.pt",
                desc=f"finetune {name} {task} s{seed}",
            )
            for split in (meds.tuning_split, meds.held_out_split):
                items, df = self.samples(task, split, max_len=n)
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
        n = self.input_len(name)
        data, spans = mpf_dataset({t: self.samples(t, meds.train_split, prompt, n) for t in tasks})
        val, _ = mpf_dataset({t: self.samples(t, meds.tuning_split, prompt, n) for t in tasks})
        model.set_n_outputs(data.labels.shape[1])
        # BigBird's MPF run is MultiBird: its own settings (params.train.per_model.multibird) win
        tp = self.prep.params.train.for_model(
            name, *(["multibird"] if name == "bigbird" else [])
        ).finetuning()
        # a fixed step budget is per task, so MPF gets the single-task runs' total; an epoch budget over the
        # pooled samples is that total already
        steps = mpf_steps(tp, len(data), len(tasks))
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
            val=self._val(val),
        )
        out = {}
        for task in tasks:
            frames = []
            for split in (meds.tuning_split, meds.held_out_split):
                it, df = self.samples(task, split, prompt, n)
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


def mpf_steps(tp: TrainParams, n_samples: int, n_tasks: int) -> int:
    """MPF's finetuning steps: a fixed step budget is per task, so MPF gets the single-task runs' total; an
    epoch budget over the pooled samples is that total already."""
    if tp.finetune_steps is not None:
        return tp.finetune_steps * n_tasks
    return tp.steps("finetune", n_samples)


# Job "tasks" that are stages of a pretrained backbone rather than finetuning runs (``Trainer.run_job``).
PRETRAIN, FORECAST, PROBES = "pretrain", "forecast", "probes:"


def job_key(job: tuple[str, str, int]) -> str:
    """File stem of a (model, task, seed) job's cached run under work/runs/ (MultiBird is BigBird's MPF run).

    >>> job_key(("multibird", "los_1w", 0)), job_key(("ehrmamba", "probes:mortality_1m", 1))
    ('bigbird-mpf-seed0', 'ehrmamba-mortality_1m-seed1-probes')
    """
    name, task, seed = job
    if name == "multibird":
        name, task = "bigbird", "mpf"
    if task.startswith(PROBES):
        return f"{name}-{task.removeprefix(PROBES)}-seed{seed}-probes"
    return f"{name}-{task}-seed{seed}"


def _load_cached(path: Path, params_hash: str):
    """The cached run at `path` when it was made with these params, else None.

    A file pickled by an older layout of the package (its classes under module paths that no longer
    exist) counts as not cached: the run is trained again rather than the notebook failing on it.
    """
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            blob = pickle.load(f)
    except (ImportError, AttributeError):
        return None
    return blob["value"] if blob.get("params_hash") == params_hash else None
