"""Paired permutation tests, Benjamini-Hochberg and the comparison verdict rule."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from repro.evaluation.batched_metrics import MetricFn, _safe_call, check_binary_inputs, metric_values
from repro.evaluation.bootstrap import (
    _MAX_KERNEL_CLUSTERS,
    _chunk_sizes,
    _cluster_codes,
    _kernel_ok,
    auroc_kernel,
)

VERDICT_RULE = (
    "Let d = new - baseline (for metrics where lower is better, baseline - new), with its two-level bootstrap CI "
    "[lo, hi] (each model's training seeds resampled, then patients; widened to d -/+ t(df) SE where that is "
    "wider, SE and df from the patients' and the seeds' shares of its variance) and p_adj, the "
    "Benjamini-Hochberg adjusted "
    "p-value of a paired permutation test on the seed-averaged scores (the two models' within-model score ranks "
    "swapped within a random half of the patients). "
    "Supported: lo > margin and p_adj < alpha (the whole CI shows an improvement larger than the margin, "
    "and the improvement survives the multiple-comparison correction). "
    "Not supported: hi < margin and, when the margin is 0, p_adj < alpha (the CI rules out an improvement as "
    "large as the margin; with margin 0 the baseline is significantly better after the same correction). "
    "Inconclusive: anything else, including missing values."
)
# Two labels that replace the rule's verdict (applied by repro.evaluation.results.paired_comparisons)
LABEL_RULE = (
    "One seed: either model was trained with a single seed; the CI resamples patients but not training, so a "
    "rerun can move the difference beyond it, and such a comparison is never supported. "
    "Underpowered: an inconclusive comparison whose minimum detectable difference, (t(df, 1 - alpha/2) + "
    "t(df, 0.8)) times the standard error of d, exceeds the effect of interest: it could not "
    "have found an effect of that size, so its silence says nothing. "
    "Undertrained: a training run behind either model on the task (its pretraining or its finetuning, any "
    "seed) ended while still improving (no early stop, and its best validation improved by more than 0.5 % "
    "over the steps that carried the last 20 % of its learning rate: under linear decay to zero, the last "
    "45 % of its steps); a difference between models short of their plateau says nothing about "
    "the architectures, so the comparison gets no verdict."
)
ONE_SEED = "one seed"
UNDERPOWERED = "underpowered"
UNDERTRAINED = "undertrained"


def min_detectable(se: float, df: float = np.inf, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true difference a paired comparison would detect with `power` at level `alpha`: the
    standard error of the difference times t(df, 1 - alpha/2) + t(df, power) (the normal quantiles when df
    is infinite). Its n, prevalence, the models' correlation and the spread of their seeds all act through
    the standard error, and few seeds through df.

    >>> round(min_detectable(0.02), 3), round(min_detectable(0.02, df=4), 3)
    (0.056, 0.074)
    """
    from scipy.stats import t

    return float(se * (t.ppf(1 - alpha / 2, df) + t.ppf(power, df)))


def seed_calibrated_interval(
    est: float,
    patient_boot: np.ndarray,
    lo: float,
    hi: float,
    jack_a: np.ndarray,
    jack_b: np.ndarray,
    ci: float = 0.95,
) -> dict[str, float]:
    """The two-level bootstrap interval [lo, hi] of d = a - b, widened where few training seeds leave it
    too narrow; returns lo, hi, the standard error of d and its degrees of freedom.

    Why: resampling k seeds with replacement shows (k - 1) / k of their variance and reads it with normal
    quantiles where a t with k - 1 df belongs. On simulated null pairs whose seeds shift a model's quality
    as a whole (per-seed AUROC sd 0.018, 0.023 and 0.040, as BigBird's and CEHR-BERT's seeds spread in the
    default runs; three seeds, 2,000 patients, 200 pairs each), the bootstrap interval let the procedure
    claim a difference for 0.090, 0.100 and 0.145 of pairs, this one for 0.035, 0.035 and 0.020 (README,
    "Seeds and the verdict rule"; measured before the patient part shared the two-level resamples).

    The variance of d adds a patient part, the variance of `patient_boot` (d over patient resamples with
    each model's seed ensemble fixed), and a seed part per model, the jackknife variance of its ensemble's
    metric over its k seeds, (k - 1) / k * sum((m_i - mean m)^2), from `jack_a` / `jack_b`: the metric of
    each leave-one-seed-out ensemble on the same patients (one value: no seed part). The jackknife reads
    what a seed moves in the ensemble: seeds that err on different patients average out there and add
    little, seeds that learned more or less of the signal do not. The interval d -/+ t(df) * SE, with df
    by Welch-Satterthwaite (k - 1 per model, the patient part counted as known), replaces [lo, hi] on each
    side where it reaches further. The standard error returned is the one the final interval implies (the
    larger of SE and its half-width over t(df)), so a minimum detectable difference read from it never
    claims more power than the interval has.

    Three seeds of a at 0.80, 0.82, 0.84 (leave-one-out means 0.83, 0.82, 0.81) and of b all at 0.80,
    with patients that add little: SE 0.02 / sqrt(3), df 2, and t(2, 0.975) = 4.30 widens +/-0.001 to
    +/-0.050.

    >>> r = seed_calibrated_interval(0.0, np.array([-0.0001, 0.0001]), -0.001, 0.001,
    ...                              np.array([0.83, 0.82, 0.81]), np.array([0.8, 0.8, 0.8]))
    >>> round(r["df"], 1), round(r["se"], 4), round(r["lo"], 3), round(r["hi"], 3)
    (2.0, 0.0115, -0.05, 0.05)
    """
    from scipy.stats import t

    def jackknife(m: np.ndarray) -> tuple[float, float]:  # (variance, its Welch-Satterthwaite term)
        k = len(m)
        v = (k - 1) / k * float(np.sum((m - np.mean(m)) ** 2)) if k > 1 else 0.0
        return v, (v**2 / (k - 1) if k > 1 else 0.0)

    (va, ta), (vb, tb) = jackknife(jack_a), jackknife(jack_b)
    finite = patient_boot[np.isfinite(patient_boot)]  # as percentile_ci: resamples where d is undefined drop
    v_patients = float(np.var(finite, ddof=1)) if len(finite) > 1 else 0.0
    var = v_patients + va + vb
    df = var**2 / (ta + tb) if ta + tb > 0 else np.inf
    q = float(t.ppf(0.5 + ci / 2, df))
    half = q * var**0.5
    if not (np.isfinite(half) and np.isfinite(est)):  # an undefined metric: no interval, never a verdict
        return {"lo": np.nan, "hi": np.nan, "se": np.nan, "df": np.nan}
    lo, hi = min(lo, est - half), max(hi, est + half)
    # the SE the interval implies: the bootstrap side can reach further than the t interval's
    se = max(var**0.5, (hi - lo) / (2 * q)) if np.isfinite(hi - lo) else var**0.5
    return {"lo": lo, "hi": hi, "se": se, "df": float(df)}


def paired_permutation_test(
    y,
    score_a,
    score_b,
    metric_fn: MetricFn = "auroc",
    n_perm: int = 2000,
    seed: int = 0,
    clusters=None,
    ranks: bool | None = None,
) -> float:
    """Two-sided paired permutation p-value for metric(a) - metric(b) != 0.

    Under the null the two models are exchangeable within a patient, so each permutation swaps the two
    models' scores for all rows of a random half (coin flip per cluster; per row when clusters is None).
    p = (b + 1) / (n_perm + 1), b = #{|d_perm| >= |d_obs|}. nan if the metric is undefined on the data.

    ranks (default: True for "auroc" and "auprc"): swap each model's within-model ranks (rank / n, ties
    averaged) instead of its raw scores, as Venkatraman and Begg's paired ROC test does. Rank metrics do
    not change under a monotone map of one model's scores, so d_obs stays the same; raw scores on two
    scales (one model's probabilities shifted) would make every swapped arm a mix of scales, widen the null
    and inflate p (a pure shift of one model took p from 0.05 to 0.69 in a check). Keep ranks=False for
    metrics that read the scores' scale (Brier).
    """
    y, sa = check_binary_inputs(y, score_a)
    _, sb = check_binary_inputs(y, score_b)
    ranked = metric_fn in ("auroc", "auprc")  # named rank metrics: the same in any monotone map of the scores
    if ranked if ranks is None else ranks:
        sa, sb = _unit_ranks(sa), _unit_ranks(sb)
    codes, n_clusters = _cluster_codes(clusters, y.shape[0])
    d_obs = float(metric_values(y, sa, metric_fn)[0] - metric_values(y, sb, metric_fn)[0])
    if np.isnan(d_obs):
        return float("nan")
    rng = np.random.default_rng(seed)
    tol = 1e-12 * max(1.0, abs(d_obs))
    hits = 0
    if metric_fn == "auroc" and _kernel_ok(y, n_clusters):
        return _permutation_auroc(y, sa, sb, codes, n_clusters, n_perm, rng, d_obs, tol)
    # Rank metrics: a permuted arm is a 0/1 weighting of the 2n stacked scores (a's rows, then b's), so one
    # sort serves every permutation and each costs cumulative sums, not a sort of its own.
    y2, s2 = np.concatenate([y, y]), np.concatenate([sa, sb])
    for k in _chunk_sizes(n_perm, 2 * y.shape[0] if ranked else y.shape[0]):
        flip = rng.integers(0, 2, size=(k, n_clusters)).astype(bool)[:, codes]
        if ranked:
            wa = np.concatenate([~flip, flip], axis=1).astype(np.float64)
            d = metric_values(y2, s2, metric_fn, weights=wa) - metric_values(
                y2, s2, metric_fn, weights=1.0 - wa
            )
            hits += int((np.abs(d) >= abs(d_obs) - tol).sum())
            continue
        pa, pb = np.where(flip, sb, sa), np.where(flip, sa, sb)
        if isinstance(metric_fn, str):
            d = metric_values(y, pa, metric_fn) - metric_values(y, pb, metric_fn)
        else:
            d = np.array(
                [_safe_call(metric_fn, y, pa[i]) - _safe_call(metric_fn, y, pb[i]) for i in range(k)]
            )
        hits += int((np.abs(d) >= abs(d_obs) - tol).sum())
    return (hits + 1) / (n_perm + 1)


def macro_permutation_test(
    labels: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], clusters, n_perm: int = 2000, seed: int = 0
) -> float:
    """paired_permutation_test of the macro AUROC (mean over labels) of two models: one coin flip per patient
    swaps that patient's within-model ranks in every label at once, so the labels' dependence is kept.

    `labels`: one (y, scores a, scores b) per label, rows in the same patient order (`clusters`) in each.
    With few patients the labels' AUROC kernels are summed (each over its positives x negatives), so a
    permutation costs one quadratic form; otherwise each label is scored per permutation.
    """
    codes, n_clusters = _cluster_codes(clusters, labels[0][0].shape[0])
    ranked = [(check_binary_inputs(y, y)[0], _unit_ranks(np.asarray(a, float)), _unit_ranks(np.asarray(b, float)))
              for y, a, b in labels]  # fmt: skip
    d_obs = float(
        np.mean([metric_values(y, a, "auroc")[0] - metric_values(y, b, "auroc")[0] for y, a, b in ranked])
    )
    if np.isnan(d_obs):
        return float("nan")
    rng = np.random.default_rng(seed)
    tol = 1e-12 * max(1.0, abs(d_obs))
    hits = 0
    if n_clusters <= _MAX_KERNEL_CLUSTERS and codes.shape[0] == n_clusters:
        k = {key: np.zeros((n_clusters, n_clusters)) for key in ("aa", "ab", "ba", "bb")}
        for y, a, b in ranked:
            denom = float((y == 1).sum()) * float((y == 0).sum()) * len(ranked)
            for key, (x, z) in {"aa": (a, a), "ab": (a, b), "ba": (b, a), "bb": (b, b)}.items():
                k[key] += auroc_kernel(y, x, z, codes, n_clusters) / denom

        def num(x: np.ndarray, z: np.ndarray) -> np.ndarray:  # x: patients scored by a, z: by b
            return ((x @ k["aa"]) * x + (x @ k["ab"]) * z + (z @ k["ba"]) * x + (z @ k["bb"]) * z).sum(axis=1)

        for m in _chunk_sizes(n_perm, 2 * codes.shape[0] * len(ranked)):  # as below: the same coin flips
            f = rng.integers(0, 2, size=(m, n_clusters)).astype(bool).astype(np.float64)
            d = num(1.0 - f, f) - num(f, 1.0 - f)
            hits += int((np.abs(d) >= abs(d_obs) - tol).sum())
        return (hits + 1) / (n_perm + 1)
    for m in _chunk_sizes(n_perm, 2 * codes.shape[0] * len(ranked)):
        flip = rng.integers(0, 2, size=(m, n_clusters)).astype(bool)[:, codes]
        wa = np.concatenate([~flip, flip], axis=1).astype(np.float64)
        d = np.zeros(m)
        for y, a, b in ranked:
            y2, s2 = np.concatenate([y, y]), np.concatenate([a, b])
            d += metric_values(y2, s2, "auroc", weights=wa) - metric_values(y2, s2, "auroc", weights=1.0 - wa)
        d /= len(ranked)
        hits += int((np.abs(d) >= abs(d_obs) - tol).sum())
    return (hits + 1) / (n_perm + 1)


def _unit_ranks(s: np.ndarray) -> np.ndarray:
    """Ranks scaled to (0, 1], ties averaged: the same order and ties as s, on one scale for every model."""
    return rankdata(s, method="average") / s.shape[0]


def _permutation_auroc(y, sa, sb, codes, n_clusters, n_perm, rng, d_obs: float, tol: float) -> float:
    """paired_permutation_test for AUROC through the cluster kernels: the same coin flips from rng.

    With f the clusters swapped (model b scores arm A there) and u = 1 - f, arm A's AUROC numerator is
    u K_aa u + u K_ab f + f K_ba u + f K_bb f (K_xy: positives scored by x, negatives by y); arm B's swaps
    u and f; both share the denominator (positives x negatives).
    """
    k_aa, k_bb = auroc_kernel(y, sa, sa, codes, n_clusters), auroc_kernel(y, sb, sb, codes, n_clusters)
    k_ab, k_ba = auroc_kernel(y, sa, sb, codes, n_clusters), auroc_kernel(y, sb, sa, codes, n_clusters)
    denom = float((y == 1).sum()) * float((y == 0).sum())

    def num(x: np.ndarray, z: np.ndarray) -> np.ndarray:  # x: clusters scored by a, z: by b
        return ((x @ k_aa) * x + (x @ k_ab) * z + (z @ k_ba) * x + (z @ k_bb) * z).sum(axis=1)

    hits = 0
    for k in _chunk_sizes(n_perm, y.shape[0]):
        f = rng.integers(0, 2, size=(k, n_clusters)).astype(bool).astype(np.float64)
        u = 1.0 - f
        d = (num(u, f) - num(f, u)) / denom
        hits += int((np.abs(d) >= abs(d_obs) - tol).sum())
    return (hits + 1) / (n_perm + 1)


# --------------------------------------------------------------------------------------------------------
# multiplicity, seeds, verdicts
# --------------------------------------------------------------------------------------------------------
def benjamini_hochberg(pvalues) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (scipy.stats.false_discovery_control); nan entries stay nan
    and do not count towards the number of tests.

    >>> benjamini_hochberg([0.01, 0.04, 0.03, 0.005])
    array([0.02, 0.04, 0.04, 0.02])
    >>> benjamini_hochberg([0.5, 1.5])
    Traceback (most recent call last):
    ...
    ValueError: p-values must lie in [0, 1], got [0.5 1.5]
    """
    from scipy.stats import false_discovery_control

    p = np.asarray(pvalues, dtype=np.float64).ravel()
    ok = ~np.isnan(p)
    if ((p[ok] < 0) | (p[ok] > 1)).any():
        raise ValueError(f"p-values must lie in [0, 1], got {p}")
    out = np.full(p.shape, np.nan)
    if ok.any():
        out[ok] = false_discovery_control(p[ok], method="bh")
    return out


def aggregate_seeds(df: pd.DataFrame, by: Sequence[str], value: str = "estimate") -> pd.DataFrame:
    """Mean, sd, min, max and count of `value` over training seeds, per group (the seed spread the report shows)."""
    g = df.groupby(list(by), sort=False)[value]
    out = g.agg(mean="mean", sd="std", min="min", max="max", n_seeds="count").reset_index()
    return out


def verdict(
    diff_lo: float,
    diff_hi: float,
    p_adj: float,
    alpha: float = 0.05,
    margin: float = 0.0,
    higher_is_better: bool = True,
) -> str:
    """Verdict on 'new beats baseline' from the CI of d = new - baseline and its adjusted p-value.

    Let d = new - baseline (for metrics where lower is better, baseline - new), with its two-level bootstrap CI
    [lo, hi] (each model's training seeds resampled, then patients; widened to d -/+ t(df) SE where that is
    wider, SE and df from the patients' and the seeds' shares of its variance) and p_adj, the
    Benjamini-Hochberg adjusted p-value of a paired permutation test on the seed-averaged scores (the two models' within-model score ranks
    swapped within a random half of the patients). Supported: lo > margin and p_adj < alpha (the
    whole CI shows an improvement larger than the margin, and the improvement survives the multiple-comparison
    correction). Not supported: hi < margin and, when the margin is 0, p_adj < alpha (the CI rules out an
    improvement as large as the margin; with margin 0 the baseline is significantly better after the same
    correction). Inconclusive: anything else, including missing values.

    Pass diff_lo/diff_hi of new - baseline as computed; higher_is_better=False flips the sign (Brier, ECE).
    The same text is in VERDICT_RULE for the report.

    >>> verdict(0.01, 0.03, 0.001)
    'supported'
    >>> verdict(-0.03, -0.01, 0.001)
    'not supported'
    >>> verdict(-0.01, 0.02, 0.3)
    'inconclusive'
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    lo, hi = (diff_lo, diff_hi) if higher_is_better else (-diff_hi, -diff_lo)
    if any(v is None or np.isnan(v) for v in (lo, hi)):
        return "inconclusive"
    if lo > margin and p_adj is not None and not np.isnan(p_adj) and p_adj < alpha:
        return "supported"
    if hi < margin and (margin > 0 or (p_adj is not None and not np.isnan(p_adj) and p_adj < alpha)):
        return "not supported"
    return "inconclusive"
