"""What the synthetic cohort's known truth says: the ceiling per task, the signal each mortality mechanism
carries, and how much of each mechanism's signal a model recovered.

A mechanism's signal in a model's scores: among the held-out samples where the mechanism can act, the AUROC
of the scores for telling its high-risk side from its low-risk side (insulin before against after the high
potassium, creatinine rising against falling, ...). The mechanisms are drawn independently of each other, so
a model blind to one scores 0.5 on it whatever else it reads. The share recovered is that AUROC's distance
from 0.5 over the true probability's on the same samples: 1 when the model separates the two sides as much
as the truth does, 0 when not at all (above 1 when a model leans on that mechanism more than the truth
does, for example because it reads little else).
"""

from __future__ import annotations

from collections.abc import Callable

import meds
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from repro.config import MECHANISM_NAMES
from repro.data.meds import SUBJECT
from repro.data.synthetic import check_mechanisms
from repro.data.tasks import label_columns

_Split = Callable[[pd.DataFrame], tuple[np.ndarray, np.ndarray]]


def _f(truth: pd.DataFrame, name: str) -> np.ndarray:
    return truth[f"feature_{name}"].to_numpy(dtype=np.float64)


# mechanism -> (samples where it can act, its high-risk side); the descriptions go to the report
SIDES: dict[str, tuple[str, _Split]] = {
    "count": (
        "any admission in the year before against none",
        lambda t: (np.ones(len(t), bool), _f(t, "recent_admissions") > 0),
    ),
    "long_range": (
        "heart failure (furosemide in the first admission) against none",
        lambda t: (np.ones(len(t), bool), _f(t, "chronic_hf") > 0),
    ),
    "order": (
        "stays with a high potassium: insulin before it against after it",
        lambda t: (_f(t, "hyperkalemia") > 0, _f(t, "insulin_before") > 0),
    ),
    "trend": (
        "creatinine rising against falling over the first 20 h",
        lambda t: (np.ones(len(t), bool), _f(t, "creatinine_slope") > 0),
    ),
    "timing": (
        "vancomycin later against sooner than 7 h after the lactate",
        lambda t: (np.ones(len(t), bool), _f(t, "antibiotic_delay_h") > 7.0),
    ),
    "interaction": (
        "warfarin and ciprofloxacin both or neither against one alone",
        lambda t: (np.ones(len(t), bool), _f(t, "warfarin") == _f(t, "ciprofloxacin")),
    ),
}
assert tuple(SIDES) == MECHANISM_NAMES


def auroc_or_nan(y: np.ndarray, s: np.ndarray) -> float:
    """AUROC of scores `s` for binary `y`; NaN where `y` holds one class (a side with no sample)."""
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")


def mortality_logit(truth: pd.DataFrame, without: str | None = None) -> np.ndarray:
    """The mechanisms' summed logit (the intercept left out: it changes no ranking), optionally without one."""
    return sum(
        (truth[f"feature_z_{m}"].to_numpy(dtype=np.float64) for m in MECHANISM_NAMES if m != without),
        start=np.zeros(len(truth)),
    )


def mechanism_table(prep) -> pd.DataFrame:
    """Per mechanism: strength, the sides compared, the share of mortality_1m samples where it acts, and its
    signal in the truth: the oracle's AUROC with and without it, on every mortality_1m sample of the run.

    Real data have no known truth: one row saying so.
    """
    if prep.truth is None or "mortality_1m" not in prep.labels:
        return pd.DataFrame({"note": ["no known truth (real data, or no mortality_1m task)"]})
    strengths = check_mechanisms(prep.params.data.mechanisms)
    labels = prep.labels["mortality_1m"]
    t = prep.truth.set_index(SUBJECT).loc[labels[SUBJECT]].reset_index()
    y = labels["label"].to_numpy()
    full = auroc_or_nan(y, mortality_logit(t))
    rows = []
    for m, (side, split) in SIDES.items():
        where, _ = split(t)
        without = auroc_or_nan(y, mortality_logit(t, without=m))
        rows.append(
            {
                "mechanism": m,
                "strength": strengths[m],
                "sides compared": side,
                "samples where it acts": f"{where.mean():.0%}",
                "oracle AUROC": full,
                "oracle AUROC without it": without,
                "its signal (AUROC lost)": full - without,
            }
        )
    return pd.DataFrame(rows)


def recovery(truth: pd.DataFrame | None, preds: pd.DataFrame, task: str = "mortality_1m") -> pd.DataFrame:
    """Share of each mechanism's signal each model recovered on `task`'s held-out samples.

    `truth`: the generator's truth per subject (None on real data: an empty frame). `preds`: the
    seed-ensembled long frame (model, task, split, subject_id, score, true_prob). Returns one
    row per (model, mechanism) with the model's AUROC on the mechanism's sides, the truth's, and the share.
    """
    test = preds[(preds["task"] == task) & (preds["split"] == meds.held_out_split)]
    if truth is None or test.empty:
        return pd.DataFrame()
    rows = []
    for model, g in test.groupby("model", sort=False):
        t = truth.set_index(SUBJECT).loc[g[SUBJECT]].reset_index()
        for m, (_, split) in SIDES.items():
            where, high = split(t)
            model_auc = auroc_or_nan(high[where], g["score"].to_numpy()[where])
            true_auc = auroc_or_nan(high[where], g["true_prob"].to_numpy()[where])
            rows.append(
                {
                    "model": model,
                    "mechanism": m,
                    "n": int(where.sum()),
                    "model AUROC on its sides": model_auc,
                    "truth AUROC on its sides": true_auc,
                    "share recovered": (model_auc - 0.5) / (true_auc - 0.5),
                }
            )
    return pd.DataFrame(rows)


def recovery_by_seed(
    truth: pd.DataFrame | None, preds: pd.DataFrame, labels: dict[str, str], task: str = "mortality_1m"
) -> pd.DataFrame:
    """Each training seed's share of each mechanism's signal, one cell per model and mechanism ("0.92, 0.88,
    0.95" in seed order), from the per-seed predictions (model, task, seed, split, subject_id, score,
    true_prob); `labels` names the models.

    Why: the seed ensemble can average a mechanism one seed read with one another seed missed, and the
    seeds of a run can agree on a reading that a rerun does not reproduce (BigBird's share of the
    interaction in two default runs with the same settings: 0.92, then 0.08).
    """
    if truth is None or preds.empty:
        return pd.DataFrame()
    seeds = sorted(preds["seed"].unique())
    per_seed = [recovery(truth, preds[preds["seed"] == s], task).assign(seed=s) for s in seeds]
    long = pd.concat([f for f in per_seed if not f.empty], ignore_index=True)
    if long.empty:
        return pd.DataFrame()
    rows = []
    for model, g in long.groupby("model", sort=False):
        row = {
            "model": labels.get(model, model),
            "seeds": ", ".join(str(s) for s in sorted(g["seed"].unique())),
        }
        for m in SIDES:
            shares = g[g["mechanism"] == m].sort_values("seed")["share recovered"]
            row[m] = ", ".join(f"{round(x, 2) + 0.0:.2f}" for x in shares)  # no "-0.00"
        rows.append(row)
    return pd.DataFrame(rows)


def ceiling_table(prep, count_predictions: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per task on held_out: samples, prevalence, the oracle's AUROC and counts + LR's (`count_predictions`:
    task -> a run's long predictions frame). A multi-label task (conditions) gives the macro average over
    its labels."""
    rows = []
    for task in prep.params.tasks:
        df = prep.labels[task]
        test = df[df["split"] == meds.held_out_split]
        oracle = []
        for col in label_columns(test):
            tp = "true_prob" if col == "label" else f"true_prob::{col.removeprefix('label::')}"
            if tp in test:
                oracle.append(auroc_or_nan(test[col].to_numpy(), test[tp].to_numpy()))
        counts = []
        p = count_predictions.get(task)
        if p is not None:
            p = p[p["split"] == meds.held_out_split]
            counts = [
                auroc_or_nan(g["label"].to_numpy(), g["score"].to_numpy()) for _, g in p.groupby("target")
            ]
        rows.append(
            {
                "task": task,
                "held-out samples": len(test),
                "prevalence": float(np.mean(test[label_columns(test)].to_numpy())) if len(test) else np.nan,
                "oracle AUROC": float(np.nanmean(oracle)) if oracle else float("nan"),
                "counts + LR AUROC": float(np.nanmean(counts)) if counts else float("nan"),
            }
        )
    out = pd.DataFrame(rows)
    lift = out["oracle AUROC"] - 0.5
    out["counts + LR share of the oracle's lift"] = (out["counts + LR AUROC"] - 0.5) / lift.where(lift > 0.01)
    return out
