"""Notebook 05: the same models under other input representations (tokenizer variants).

Each variant replaces some `tokenizer.*` fields of the run (params `representations.variants`); the run's
own tokenizer is "default". A variant gets its own tokenizer fit on the train split, its own prepared data
(cached by tokenizer parameters) and its own training folder, and keeps the run's max_len, steps, batch
size and model sizes: the same token budget, so a representation that spends more tokens per event sees
less history. The default variant's runs are the H1 runs when notebook 01 ran in the same run folder.

Predictions carry `model` = "<backbone>|<variant>", so the paired statistics of `repro.evaluation.results` compare
any of them with EHRMamba under the default representation.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import meds
import numpy as np
import pandas as pd

from repro.config import RunParams
from repro.data.tokenizer import representation_stats
from repro.training.grid import run_plans
from repro.training.prepare import Prepared, encode_samples, prepare
from repro.training.trainer import ModelRun

DEFAULT = "default"


SEP = "|"


REFERENCE = f"ehrmamba{SEP}{DEFAULT}"


def variant_params(params: RunParams, variant: str) -> RunParams:
    """The run's params with `variant`'s tokenizer (the default variant: the run's params unchanged)."""
    if variant == DEFAULT:
        return params
    return dataclasses.replace(params, tokenizer=params.representations.tokenizer(params.tokenizer, variant))


def variants(params: RunParams) -> list[str]:
    return [DEFAULT, *params.representations.variants]


def slug(variant: str) -> str:
    """A folder name for a variant's training runs."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", variant).strip("-") or "variant"


def key(model: str, variant: str) -> str:
    return f"{model}{SEP}{variant}"


def history_fit(prep: Prepared, task: str) -> float:
    """Share of the task's held-out samples whose history before the prediction time is longer than max_len."""
    huge = prep.params.tokenizer.max_len * 10_000
    items, _ = encode_samples(prep, task, meds.held_out_split, max_len=huge)
    if not items:
        return float("nan")
    return float(np.mean([len(e) > prep.params.tokenizer.max_len for e in items]))


def variant_plans(
    params: RunParams, data_dir: str | None, work_dir: str | Path
) -> tuple[dict[str, Prepared], list]:
    """Each variant's prepared data and training plan (prepared data, work folder, jobs) for notebook 05:
    `representations.models` x tasks x seeds; the default tokens train in the run's own work folder."""
    rep = params.representations
    jobs = [(m, t, s) for s in rep.seeds for m in rep.models for t in rep.tasks]
    preps = {v: prepare(variant_params(params, v), data_dir, progress=False) for v in variants(params)}
    plans = [
        (prep, Path(work_dir) if v == DEFAULT else Path(work_dir) / "representations" / slug(v), jobs)
        for v, prep in preps.items()
    ]
    return preps, plans


def run_variants(
    params: RunParams, data_dir: str | None, work_dir: str | Path, workers: int = 1
) -> tuple[list[ModelRun], pd.DataFrame]:
    """Train `representations.models` x tasks x seeds under every variant; return the runs (model renamed
    "<backbone>|<variant>") and one row of representation statistics per variant."""
    preps, plans = variant_plans(params, data_dir, work_dir)
    runs, rows = [], []
    for (variant, prep), done in zip(preps.items(), run_plans(plans, workers), strict=True):
        runs += [dataclasses.replace(r, model=key(r.model, variant)) for r in done]
        train = prep.dataset.splits.loc[
            prep.dataset.splits["split"] == meds.train_split, "subject_id"
        ].to_numpy()
        stats = representation_stats(prep.timelines, prep.tokenizer, subjects=train)
        rows.append(
            {
                "representation": variant,
                **{k: stats[k] for k in ("values", "bins", "n_bins", "time_tokens", "vocab_size")},
                "tokens per subject (mean)": stats["length_mean"],
                "median": stats["length_median"],
                "p90": stats["length_p90"],
                "held-out histories cut at max_len": history_fit(prep, params.representations.tasks[0]),
            }
        )
    return runs, pd.DataFrame(rows)


def prepare_variants(params: RunParams, data_dir: str | None = None) -> list[str]:
    """Tokenize the data under every variant now, so notebook 05 finds them cached (`repro prepare`)."""
    lines = []
    for v in variants(params):
        prep = prepare(variant_params(params, v), data_dir, progress=False)
        lines.append(
            f"representation {v!r}: vocabulary {prep.tokenizer.vocab_size}, cached in {prep.cache_dir}"
        )
        del prep
    return lines


def pairs(params: RunParams) -> list[tuple[str, str]]:
    """(variant combination, EHRMamba default) for every combination but the reference itself."""
    rep = params.representations
    out = [(key(m, v), REFERENCE) for v in variants(params) for m in rep.models]
    return [p for p in out if p[0] != REFERENCE]
