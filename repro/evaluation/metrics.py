"""Predictions -> metrics: point estimates, a validation-chosen F1 threshold, and patient-clustered CIs.

Point estimates come from sklearn (the reference everyone knows); bootstrap intervals come from the vectorised
engine in repro.evaluation.batched_metrics, which the tests check against sklearn on the same resampled rows.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    f1_score,
    precision_recall_curve,
    roc_auc_score,
)

from repro.evaluation.batched_metrics import check_binary_inputs, weighted_metrics
from repro.evaluation.bootstrap import bootstrap_metrics, percentile_ci

# metrics evaluate_predictions reports, in table order, with their display names
METRICS = {
    "auroc": "AUROC",
    "auprc": "AUPRC",
    "f1": "F1",
    "brier": "Brier",
    "ece": "ECE",
    "prevalence": "Prevalence",
}


def binary_metrics(y_true, y_score, threshold: float = 0.5) -> dict:
    """AUROC, AUPRC (average precision), F1 at `threshold` (score >= threshold is positive), Brier, ECE,
    prevalence and n for one set of predictions. Never raises on degenerate data: a metric that is undefined
    is nan and `undefined` (always present, possibly empty) lists why.

    >>> m = binary_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    >>> round(m["auroc"], 2), m["undefined"]
    (0.75, [])
    >>> m = binary_metrics([1, 1, 1], [0.2, 0.5, 0.9])
    >>> m["auroc"], m["undefined"]
    (nan, ['auroc: y_true has a single class (1)', 'auprc: y_true has a single class (1)'])
    """
    y, s = check_binary_inputs(y_true, y_score)
    nan = float("nan")
    out = {k: nan for k in METRICS} | {"n": int(y.size), "threshold": float(threshold), "undefined": []}
    if y.size == 0:
        out["undefined"].append("all: no rows")
        return out
    classes = np.unique(y)
    out["prevalence"] = float(y.mean())
    if classes.size == 2:
        out["auroc"] = float(roc_auc_score(y, s))
        out["auprc"] = float(average_precision_score(y, s))
    else:
        why = f"y_true has a single class ({int(classes[0])})"
        out["undefined"] += [f"auroc: {why}", f"auprc: {why}"]
    out["f1"] = float(f1_score(y, s >= threshold, zero_division=0.0))
    if ((s >= 0) & (s <= 1)).all():
        out["brier"] = float(brier_score_loss(y, s))
        out["ece"] = float(weighted_metrics(y, s, names=("ece",))["ece"][0])
    else:
        out["undefined"] += ["brier: scores are not probabilities in [0, 1]", "ece: scores are not in [0, 1]"]
    return out


def choose_threshold(y_true_val, y_score_val) -> float:
    """The score threshold (predict positive when score >= it) that maximises F1 on the validation split.

    Chosen on validation so test F1 is not optimistically tuned. Without validation positives F1 is 0 at every
    threshold; then 0.5 is returned with a warning.
    """
    y, s = check_binary_inputs(y_true_val, y_score_val)
    if y.sum() == 0:
        warnings.warn("no positives in the validation split: F1 threshold set to 0.5", stacklevel=2)
        return 0.5
    precision, recall, thresholds = precision_recall_curve(y, s)
    p, r = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return float(thresholds[int(np.argmax(f1))])


def _check_frame(df: pd.DataFrame, cols: set[str], name: str) -> None:
    missing = cols - set(df.columns)
    if missing:
        raise ValueError(f"{name} frame lacks column(s) {sorted(missing)}; has {list(df.columns)}")


def _with_cis(point: dict, boots: dict[str, np.ndarray], ci: float) -> dict:
    out = {}
    for k, values in boots.items():
        out[k] = {"estimate": point[k]} | percentile_ci(values, ci) | {"ci": ci}
        why = [u for u in point["undefined"] if u.startswith(f"{k}:")]
        if why:
            out[k]["undefined"] = why[0]
    return out


def evaluate_predictions(
    val: pd.DataFrame, test: pd.DataFrame, n_boot: int = 2000, seed: int = 0, ci: float = 0.95
) -> dict:
    """Metrics of one model on one task: F1 threshold from val, every metric on test with a percentile
    bootstrap CI clustered by subject_id (subjects resampled with replacement, all their rows kept).

    Frames have columns subject_id, label, score. Returns {metric: {"estimate", "lo", "hi", "n_valid",
    "n_dropped", "flagged", "ci"}} for auroc, auprc, f1, brier, ece, prevalence; f1 also carries "threshold";
    a metric undefined on test carries "undefined" (why).
    """
    _check_frame(val, {"label", "score"}, "val")
    _check_frame(test, {"subject_id", "label", "score"}, "test")
    threshold = choose_threshold(val["label"], val["score"])
    y, s = check_binary_inputs(test["label"], test["score"])
    point = binary_metrics(y, s, threshold)
    names = tuple(METRICS)
    boots = bootstrap_metrics(y, {"m": s}, test["subject_id"].to_numpy(), names, n_boot, seed, threshold)["m"]
    out = _with_cis(point, boots, ci)
    out["f1"]["threshold"] = threshold
    return out


def oracle_metrics(test: pd.DataFrame, n_boot: int = 2000, seed: int = 0, ci: float = 0.95) -> dict:
    """The ceiling: AUROC, AUPRC, Brier and ECE of the synthetic generator's true probability on the test rows.

    Frame columns label, true_prob (and subject_id to cluster the bootstrap; without it rows are independent).
    Same output shape as evaluate_predictions, for auroc, auprc, brier and ece.
    """
    _check_frame(test, {"label", "true_prob"}, "test")
    y, s = check_binary_inputs(test["label"], test["true_prob"])
    point = binary_metrics(y, s)
    clusters = test["subject_id"].to_numpy() if "subject_id" in test.columns else None
    names = ("auroc", "auprc", "brier", "ece")
    boots = bootstrap_metrics(y, {"oracle": s}, clusters, names, n_boot, seed)["oracle"]
    return _with_cis(point, boots, ci)


def _fmt(d: dict) -> str:
    if d is None:  # not a metric of this row (the oracle's F1: its probabilities are never thresholded)
        return "not thresholded"
    if np.isnan(d.get("estimate", np.nan)):
        return "undefined"
    if np.isnan(d["lo"]):
        return f"{d['estimate']:.3f}"
    return f"{d['estimate']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"


def metrics_table(results: dict[str, dict]) -> pd.DataFrame:
    """One row per model (index "model"): formatted columns like "AUROC (95% CI)" -> "0.812 [0.781, 0.840]",
    then numeric columns auroc, auroc_lo, auroc_hi, ..., and "flags" naming metrics whose CI dropped more than
    10% of resamples as undefined. Input: {model: evaluate_predictions(...) or oracle_metrics(...)}.
    """
    present = [k for k in METRICS if any(k in r for r in results.values())]
    rows = []
    for model, res in results.items():
        ci = next((d.get("ci", 0.95) for d in res.values() if isinstance(d, dict)), 0.95)
        row: dict = {"model": model}
        for k in present:
            row[f"{METRICS[k]} ({ci * 100:g}% CI)"] = _fmt(res.get(k))
        for k in present:
            d = res.get(k) or {}
            row |= {
                k: d.get("estimate", np.nan),
                f"{k}_lo": d.get("lo", np.nan),
                f"{k}_hi": d.get("hi", np.nan),
            }
        row["flags"] = ", ".join(k for k in present if (res.get(k) or {}).get("flagged"))
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def macro_evaluate(
    val: pd.DataFrame, test: pd.DataFrame, n_boot: int = 2000, seed: int = 0, ci: float = 0.95
) -> dict:
    """`evaluate_predictions` of a multi-label task, macro-averaged: each metric per label (F1 at the label's
    own validation threshold), then the mean over labels, with a CI from the same patient resamples for every
    label (one row per patient and label, so equal seeds draw equal weights). Frames add a `target` column.

    Returns evaluate_predictions' shape plus "n_labels"; AUROC is never computed on the pooled rows, where a
    score that ignores the patient (each label's prevalence) would already rank well.
    """
    _check_frame(test, {"subject_id", "label", "score", "target"}, "test")
    names = tuple(METRICS)
    points, boots = [], []
    for target, t in test.sort_values(["target", "subject_id"], kind="stable").groupby("target", sort=True):
        v = val[val["target"] == target]
        threshold = choose_threshold(v["label"], v["score"])
        y, s = check_binary_inputs(t["label"], t["score"])
        points.append(binary_metrics(y, s, threshold))
        boots.append(
            bootstrap_metrics(y, {"m": s}, t["subject_id"].to_numpy(), names, n_boot, seed, threshold)["m"]
        )
    return _macro(points, boots, names, ci)


def macro_oracle_metrics(test: pd.DataFrame, n_boot: int = 2000, seed: int = 0, ci: float = 0.95) -> dict:
    """`oracle_metrics` macro-averaged over a multi-label task's labels (see macro_evaluate)."""
    _check_frame(test, {"subject_id", "label", "true_prob", "target"}, "test")
    names = ("auroc", "auprc", "brier", "ece")
    points, boots = [], []
    for _, t in test.sort_values(["target", "subject_id"], kind="stable").groupby("target", sort=True):
        y, s = check_binary_inputs(t["label"], t["true_prob"])
        points.append(binary_metrics(y, s))
        boots.append(bootstrap_metrics(y, {"o": s}, t["subject_id"].to_numpy(), names, n_boot, seed)["o"])
    return _macro(points, boots, names, ci)


def _macro(points: list[dict], boots: list[dict], names: tuple[str, ...], ci: float) -> dict:
    point = {k: float(np.mean([p[k] for p in points])) for k in names}
    point["undefined"] = [u for p in points for u in p["undefined"]]
    out = _with_cis(point, {k: np.mean([b[k] for b in boots], axis=0) for k in names}, ci)
    out["n_labels"] = len(points)
    return out


def token_loss(
    sums: np.ndarray, counts: np.ndarray, n_boot: int = 2000, ci: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Loss per token over patients, averaged over seeds, with a patient bootstrap CI, and its perplexity.

    ``sums`` / ``counts``: (seeds, patients) loss sums and scored-token counts, the same patients in every
    row. Each resample draws patients with replacement (the same draw for every seed), and its loss is the
    seeds' mean of sum / count: a ratio estimator, so a patient with a long history weighs by its tokens.

    >>> token_loss(np.array([[2.0, 4.0]]), np.array([[1.0, 2.0]]), n_boot=50)["loss"]
    2.0
    """
    from repro.evaluation.bootstrap import cluster_bootstrap_weights, percentile_ci

    sums, counts = np.atleast_2d(sums).astype(float), np.atleast_2d(counts).astype(float)
    if sums.shape != counts.shape or not counts.sum(axis=1).all():
        raise ValueError(f"need (seeds, patients) sums and counts of one shape with tokens, got {sums.shape}")
    point = float(np.mean(sums.sum(1) / counts.sum(1)))
    boots = []
    for w in cluster_bootstrap_weights(None, n_boot, np.random.default_rng(seed), sums.shape[1]):
        boots.append(((w @ sums.T) / np.clip(w @ counts.T, 1e-12, None)).mean(axis=1))
    interval = percentile_ci(np.concatenate(boots), ci)
    return {
        "loss": point,
        "lo": interval["lo"],
        "hi": interval["hi"],
        "perplexity": float(np.exp(point)),
        "perplexity_lo": float(np.exp(interval["lo"])),
        "perplexity_hi": float(np.exp(interval["hi"])),
        "patients": int(sums.shape[1]),
        "tokens": float(counts.sum(1).mean()),
    }


# The EHRMamba paper's Table 5 (../shared/paper/ehrmamba-table1.md): next-k-token test accuracy and cosine
# similarity of EHRMamba on MIMIC-IV.
PAPER_FORECAST = {1: (0.3620, 0.3870), 2: (0.3318, 0.3470), 5: (0.2699, 0.2929), 10: (0.1991, 0.2111)}
FORECAST_DEFINITION = (
    "accuracy@k: the share of the first k generated tokens equal to the true token at the same position; "
    "cosine@k: the cosine similarity of the bags (token counts) of the first k generated and true tokens; "
    "both per patient, then averaged over seeds and patients (the paper does not define them: ours)"
)


def forecast_scores(pred: np.ndarray, true: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per patient: (accuracy@k, cosine@k) of predicted against true ids [n, >= k] (FORECAST_DEFINITION).

    >>> acc, cos = forecast_scores(np.array([[1, 2, 3]]), np.array([[1, 3, 2]]), 3)
    >>> float(acc[0]), round(float(cos[0]), 6)
    (0.3333333333333333, 1.0)
    """
    p, t = pred[:, :k], true[:, :k]
    acc = (p == t).mean(axis=1)
    cos = np.empty(len(p))
    for i in range(len(p)):
        ids = np.union1d(p[i], t[i])
        a = (p[i][:, None] == ids).sum(0).astype(float)
        b = (t[i][:, None] == ids).sum(0).astype(float)
        cos[i] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return acc, cos


def forecast_metrics(
    pred: np.ndarray,
    true: np.ndarray,
    horizons: list[int],
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> list[dict]:
    """One row per horizon: accuracy@k and cosine@k averaged over seeds and patients, patient-bootstrap CIs,
    beside the paper's. ``pred`` [seeds, n, K] and ``true`` [n, K] token ids, K >= every horizon."""
    from repro.evaluation.bootstrap import cluster_bootstrap_weights, percentile_ci

    pred = np.asarray(pred)
    if pred.ndim == 2:
        pred = pred[None]
    rows = []
    for k in horizons:
        per = [forecast_scores(p, true, k) for p in pred]
        acc = np.mean([a for a, _ in per], axis=0)
        cos = np.mean([c for _, c in per], axis=0)
        out = {"next tokens": k, "patients": len(acc)}
        for name, v in (("accuracy", acc), ("cosine", cos)):
            boots = [
                w @ v / w.sum(1)
                for w in cluster_bootstrap_weights(None, n_boot, np.random.default_rng(seed), len(v))
            ]
            interval = percentile_ci(np.concatenate(boots), ci)
            out |= {name: float(v.mean()), f"{name}_lo": interval["lo"], f"{name}_hi": interval["hi"]}
        paper = PAPER_FORECAST.get(k, (np.nan, np.nan))
        out |= {"paper accuracy": paper[0], "paper cosine": paper[1]}
        rows.append(out)
    return rows
