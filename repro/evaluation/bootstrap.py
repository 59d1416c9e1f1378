"""Patient-clustered bootstrap: CIs and paired differences from the same resampled patients.

The report compares several models scored on the same patients, so every CI and every difference must
come from the same resampled patients (paired), and patients, not rows, are the unit of resampling (one
patient can contribute several prediction rows)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd

from repro.evaluation.batched_metrics import (
    MetricFn,
    _metric_name,
    _safe_call,
    check_binary_inputs,
    metric_values,
    weighted_metrics,
)

# a metric whose resample distribution lost more than this fraction to undefined values (single class) is flagged
MAX_DROPPED_FRACTION = 0.10


# cells (resamples x rows) handled per chunk: bounds memory at ~10 float64 arrays of this size (~80 MB)
_MAX_CELLS = 1_000_000


# --------------------------------------------------------------------------------------------------------
# resampling
# --------------------------------------------------------------------------------------------------------
def _cluster_codes(cluster_ids, n: int) -> tuple[np.ndarray, int]:
    if cluster_ids is None:
        return np.arange(n), n
    codes, uniques = pd.factorize(np.asarray(cluster_ids), use_na_sentinel=False)
    if codes.shape[0] != n:
        raise ValueError(f"cluster_ids has {codes.shape[0]} entries for {n} rows")
    return codes.astype(np.int64), len(uniques)


def _chunk_sizes(n_boot: int, n_rows: int) -> Iterator[int]:
    k = max(1, _MAX_CELLS // max(n_rows, 1))
    for start in range(0, n_boot, k):
        yield min(k, n_boot - start)


def cluster_bootstrap_weights(
    cluster_ids, n_boot: int, rng: np.random.Generator, n_rows: int | None = None
) -> Iterator[np.ndarray]:
    """Yield (k, n_rows) float arrays of row multiplicities, chunk by chunk, n_boot rows in all.

    Each resample draws as many clusters as there are, with replacement; every row of a drawn cluster gets
    that cluster's draw count. cluster_ids=None makes each row its own cluster (then n_rows is required).
    Consumes rng exactly like cluster_bootstrap_indices, so a seed gives the same resamples in both.
    """
    n = len(cluster_ids) if cluster_ids is not None else int(n_rows)
    codes, _ = _cluster_codes(cluster_ids, n)
    for counts in cluster_bootstrap_counts(cluster_ids, n_boot, rng, n):
        yield counts[:, codes]


def cluster_bootstrap_counts(
    cluster_ids, n_boot: int, rng: np.random.Generator, n_rows: int
) -> Iterator[np.ndarray]:
    """Yield (k, n_clusters) float draw counts per cluster: cluster_bootstrap_weights before it expands them
    to rows (same chunks, same draws from rng)."""
    _, n_clusters = _cluster_codes(cluster_ids, n_rows)
    for k in _chunk_sizes(n_boot, n_rows):
        draws = rng.integers(0, n_clusters, size=(k, n_clusters))
        counts = np.bincount((draws + np.arange(k)[:, None] * n_clusters).ravel(), minlength=k * n_clusters)
        yield counts.reshape(k, n_clusters).astype(np.float64)


# The cluster-kernel AUROC below holds [positives, clusters] and [clusters, clusters] float64 arrays.
_MAX_KERNEL_CLUSTERS = 4000


_MAX_KERNEL_CELLS = 60_000_000


def auroc_kernel(y: np.ndarray, s_pos: np.ndarray, s_neg: np.ndarray, codes: np.ndarray, n_clusters: int):
    """K[c, d] = sum over positives i of cluster c and negatives j of cluster d of [s_i > s_j] + [s_i = s_j] / 2.

    Positives are scored by `s_pos`, negatives by `s_neg` (two models' scores for a paired permutation). Why:
    any cluster-weighted AUROC is then a quadratic form, AUROC(w) = w K w / ((w . pos)(w . neg)) for cluster
    weights w, so thousands of bootstrap or permutation resamples cost matrix products instead of a sort
    each (sklearn's AUROC on the rows repeated by their weights, ties counting 1/2).
    """
    from scipy import sparse

    pos = y == 1
    ps, pc = s_pos[pos], codes[pos]
    order = np.argsort(ps, kind="stable")
    ps, pc = ps[order], pc[order]
    ns, nc = s_neg[~pos], codes[~pos]
    # a negative adds 1/2 to the positives tied with it and 1 to those above it: two half steps of a
    # difference array over the positives in score order, one column per cluster of the negative
    steps = np.zeros((len(ps) + 1, n_clusters))
    np.add.at(steps, (np.searchsorted(ps, ns, side="left"), nc), 0.5)
    np.add.at(steps, (np.searchsorted(ps, ns, side="right"), nc), 0.5)
    below = np.cumsum(steps, axis=0)[:-1]  # [positives, clusters]
    onehot = sparse.csr_matrix((np.ones(len(pc)), (pc, np.arange(len(pc)))), shape=(n_clusters, len(pc)))
    return np.asarray(onehot @ below)


def _kernel_ok(y: np.ndarray, n_clusters: int) -> bool:
    """The kernel pays when clusters hold several rows each (conditions: 20 rows per patient, 10x faster
    on 2,000 patients); with a row per patient a sort per resample is as fast, and lighter."""
    n_pos = int((y == 1).sum())
    return (
        y.shape[0] >= 2 * n_clusters
        and n_clusters <= _MAX_KERNEL_CLUSTERS
        and (n_pos + 1) * n_clusters <= _MAX_KERNEL_CELLS
    )


def _class_counts(y: np.ndarray, codes: np.ndarray, n_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    pos = np.bincount(codes, weights=(y == 1).astype(np.float64), minlength=n_clusters)
    return pos, np.bincount(codes, minlength=n_clusters).astype(np.float64) - pos


def _quadratic_auroc(w: np.ndarray, k: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    n_pos, n_neg = w @ pos, w @ neg
    with np.errstate(invalid="ignore", divide="ignore"):
        out = ((w @ k) * w).sum(axis=1) / (n_pos * n_neg)
    out[(n_pos <= 0) | (n_neg <= 0)] = np.nan
    return out


def bootstrap_auroc(
    y, scores: dict[str, np.ndarray], cluster_ids, n_boot: int, seed: int
) -> dict[str, np.ndarray]:
    """bootstrap_metrics(..., ("auroc",)) through the cluster kernel: the same resamples (same rng draws),
    the same values up to float rounding, in matrix products."""
    y = np.asarray(y, dtype=np.float64)
    codes, n_clusters = _cluster_codes(cluster_ids, y.shape[0])
    kernels = {m: auroc_kernel(y, s, s, codes, n_clusters) for m, s in scores.items()}
    pos, neg = _class_counts(y, codes, n_clusters)
    parts: dict[str, list] = {m: [] for m in scores}
    for w in cluster_bootstrap_counts(cluster_ids, n_boot, np.random.default_rng(seed), y.shape[0]):
        for m, k in kernels.items():
            parts[m].append(_quadratic_auroc(w, k, pos, neg))
    return {m: np.concatenate(v) for m, v in parts.items()}


def cluster_bootstrap_indices(cluster_ids, n_boot: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of n_boot cluster-bootstrap resamples (clusters drawn with replacement, all their rows kept).

    Within a resample the rows of each drawn cluster sit together, in draw order. Use this for arbitrary
    callables; the named metrics use the equivalent weights from cluster_bootstrap_weights.
    """
    ids = np.asarray(cluster_ids)
    codes, n_clusters = _cluster_codes(ids, ids.shape[0])
    order = np.argsort(codes, kind="stable")  # rows grouped by cluster
    sizes = np.bincount(codes, minlength=n_clusters)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    out = []
    for _ in range(n_boot):
        drawn = rng.integers(0, n_clusters, size=n_clusters)
        counts = sizes[drawn]
        ends = np.cumsum(counts)
        # position j of the output belongs to drawn cluster c(j): offsets[c] + (j - first output position of c)
        pos = np.repeat(offsets[drawn] - (ends - counts), counts) + np.arange(ends[-1] if n_clusters else 0)
        out.append(order[pos])
    return out


def percentile_ci(values, ci: float = 0.95) -> dict:
    """Percentile interval of bootstrap values, dropping undefined (nan) ones and saying how many.

    Returns {"lo", "hi", "n_valid", "n_dropped", "flagged"}; flagged when more than MAX_DROPPED_FRACTION of
    the resamples were undefined, because the interval then describes a conditional distribution.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    v = np.asarray(values, dtype=np.float64)
    ok = v[~np.isnan(v)]
    n_dropped = int(v.size - ok.size)
    if ok.size:
        lo, hi = np.quantile(ok, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    else:
        lo = hi = float("nan")
    return {
        "lo": float(lo),
        "hi": float(hi),
        "n_valid": int(ok.size),
        "n_dropped": n_dropped,
        "flagged": bool(v.size and n_dropped > MAX_DROPPED_FRACTION * v.size),
    }


def bootstrap_pvalue(diffs) -> float:
    """Two-sided bootstrap p-value for 'difference != 0'.

    p = min(1, 2 * min((1 + #{d_b <= 0}) / (B + 1), (1 + #{d_b >= 0}) / (B + 1))) over the B defined resampled
    differences d_b: twice the smaller tail mass at zero, i.e. (up to the +1 that keeps p > 0) the smallest
    alpha at which the equal-tailed percentile CI excludes 0.

    >>> bootstrap_pvalue(np.zeros(99))
    1.0
    >>> bootstrap_pvalue(np.ones(99))
    0.02
    """
    d = np.asarray(diffs, dtype=np.float64)
    d = d[~np.isnan(d)]
    if d.size == 0:
        return float("nan")
    b = d.size
    tail = min((1 + (d <= 0).sum()) / (b + 1), (1 + (d >= 0).sum()) / (b + 1))
    return float(min(1.0, 2 * tail))


def bootstrap_metrics(
    y,
    scores: dict[str, np.ndarray],
    cluster_ids,
    names: Sequence[str],
    n_boot: int = 2000,
    seed: int = 0,
    threshold: float | dict[str, float] = 0.5,
) -> dict[str, dict[str, np.ndarray]]:
    """Resampled values {model: {metric: (n_boot,)}} of named metrics, all models on the same resamples."""
    y = np.asarray(y, dtype=np.float64)
    rng = np.random.default_rng(seed)
    thr = threshold if isinstance(threshold, dict) else dict.fromkeys(scores, threshold)
    parts: dict[str, dict[str, list]] = {m: {k: [] for k in names} for m in scores}
    for w in cluster_bootstrap_weights(cluster_ids, n_boot, rng, n_rows=y.shape[0]):
        for m, s in scores.items():
            for k, v in weighted_metrics(y, s, w, names=names, threshold=thr[m]).items():
                parts[m][k].append(v)
    return {m: {k: np.concatenate(v) for k, v in d.items()} for m, d in parts.items()}


# --------------------------------------------------------------------------------------------------------
# paired comparisons
# --------------------------------------------------------------------------------------------------------
def _wide(df: pd.DataFrame, models: Sequence[str]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Long predictions -> labels, subject ids and one aligned score vector per model.

    Rows are paired by a `row_id` column when present, else by order of appearance within each model (then
    subject_id and label must agree row by row).
    """
    missing = {"subject_id", "label", "model", "score"} - set(df.columns)
    if missing:
        raise ValueError(f"predictions frame lacks column(s) {sorted(missing)}")
    present = set(df["model"].unique())  # unique() first: iterating a string column is slow
    absent = [m for m in models if m not in present]
    if absent:
        raise ValueError(f"model(s) {absent} have no rows; present: {sorted(present)}")
    if len(set(models)) != len(models):
        raise ValueError(f"models repeat: {list(models)}")
    parts = {m: df[df["model"] == m] for m in models}
    ref = parts[models[0]]
    if "row_id" in df.columns:
        for m, p in parts.items():
            if p["row_id"].duplicated().any():
                raise ValueError(f"model {m!r} has duplicated row_id values")
            if set(p["row_id"]) != set(ref["row_id"]):
                raise ValueError(f"model {m!r} is not scored on the same row_ids as {models[0]!r}")
        parts = {m: p.set_index("row_id").loc[ref["row_id"]].reset_index() for m, p in parts.items()}
        ref = parts[models[0]]
    for m, p in parts.items():
        if len(p) != len(ref):
            raise ValueError(f"model {m!r} has {len(p)} rows, {models[0]!r} has {len(ref)}: not paired")
        if not (
            np.array_equal(p["subject_id"].to_numpy(), ref["subject_id"].to_numpy())
        ) or not np.array_equal(p["label"].to_numpy(), ref["label"].to_numpy()):
            raise ValueError(f"model {m!r} rows do not match {models[0]!r} (subject_id/label differ)")
    y, _ = check_binary_inputs(ref["label"], ref["label"])
    scores = {m: check_binary_inputs(p["label"], p["score"])[1] for m, p in parts.items()}
    return y, ref["subject_id"].to_numpy(), scores


def paired_scores(
    df: pd.DataFrame, models: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Labels, subject ids and aligned scores of ``models`` from a long frame (pairing as paired_bootstrap)."""
    return _wide(df, models)


def paired_bootstrap(
    df: pd.DataFrame,
    models: list[str],
    metric_fn: MetricFn = "auroc",
    n_boot: int = 2000,
    seed: int = 0,
    ci: float = 0.95,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> pd.DataFrame:
    """Per-model metric with CI, and paired differences a - b with CI and bootstrap p-value, one tidy frame.

    df is long: subject_id, label, model, score (optional row_id to pair rows). Every model is evaluated on the
    same patient-clustered resamples, so a difference's CI reflects only how the models disagree. pairs
    defaults to every (a, b) with a listed before b in models. Resamples where the metric is undefined are
    dropped per model / per difference and counted (see percentile_ci); p_value is bootstrap_pvalue's.

    Columns: kind ("model" | "difference"), model, versus (the b of a difference, "" for a model), metric,
    estimate, lo, hi, p_value (nan for a model), n_valid, n_dropped, flagged.
    """
    y, subjects, scores = _wide(df, models)
    name = _metric_name(metric_fn)
    if isinstance(metric_fn, str):
        if metric_fn == "f1":
            raise ValueError(
                "F1 needs a per-model threshold: pass a callable, e.g. lambda y, s: f1_score(y, s >= t)"
            )
        est = {m: float(metric_values(y, s, metric_fn)[0]) for m, s in scores.items()}
        if metric_fn == "auroc" and _kernel_ok(y, _cluster_codes(subjects, y.shape[0])[1]):
            boots = bootstrap_auroc(y, scores, subjects, n_boot, seed)
        else:
            boots = {
                m: v[metric_fn]
                for m, v in bootstrap_metrics(y, scores, subjects, (metric_fn,), n_boot, seed).items()
            }
    else:
        est = {m: _safe_call(metric_fn, y, s) for m, s in scores.items()}
        idx = cluster_bootstrap_indices(subjects, n_boot, np.random.default_rng(seed))
        boots = {m: np.array([_safe_call(metric_fn, y[i], s[i]) for i in idx]) for m, s in scores.items()}
    rows = []
    for m in models:
        rows.append({"kind": "model", "model": m, "versus": "", "metric": name, "estimate": est[m]})
        rows[-1] |= percentile_ci(boots[m], ci) | {"p_value": float("nan")}
    for a, b in pairs if pairs is not None else itertools.combinations(models, 2):
        if a not in scores or b not in scores:
            raise ValueError(f"pair ({a!r}, {b!r}) names a model not in {models}")
        d = boots[a] - boots[b]
        rows.append(
            {"kind": "difference", "model": a, "versus": b, "metric": name, "estimate": est[a] - est[b]}
        )
        rows[-1] |= percentile_ci(d, ci) | {"p_value": bootstrap_pvalue(d)}
    cols = [
        "kind",
        "model",
        "versus",
        "metric",
        "estimate",
        "lo",
        "hi",
        "p_value",
        "n_valid",
        "n_dropped",
        "flagged",
    ]
    return pd.DataFrame(rows)[cols]


def seed_scores(df: pd.DataFrame, model: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One model's held-out predictions of one label as (labels, subject ids, scores [seeds, rows]), rows
    sorted by subject, so two models' matrices pair row by row."""
    g = df[df["model"] == model]
    wide = g.pivot(index="subject_id", columns="seed", values="score").sort_index()  # raises on a repeat
    if wide.isna().any().any():
        raise ValueError(f"model {model!r}: not every seed scored every subject")
    y = g.groupby("subject_id")["label"].first().reindex(wide.index).to_numpy(np.float64)
    return y, wide.index.to_numpy(), wide.to_numpy(np.float64).T


def two_level_paired_auroc(
    labels: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], n_boot: int = 2000, seed: int = 0
) -> tuple[float, np.ndarray]:
    """The observed difference and its two-level resamples (``paired_auroc_resamples`` without the
    patient-only ones)."""
    est, d, _ = paired_auroc_resamples(labels, n_boot, seed)
    return est, d


def paired_auroc_resamples(
    labels: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], n_boot: int = 2000, seed: int = 0
) -> tuple[float, np.ndarray, np.ndarray]:
    """AUROC of model a's seed ensemble minus model b's (the macro average over labels), and its two-level
    bootstrap: each resample draws each model's training seeds with replacement and averages their scores,
    then draws patients with replacement (clustered), so the interval carries training randomness as well
    as patient sampling. With one seed per model it is the patient bootstrap.

    `labels`: one (y, subject ids, scores a [seeds_a, n], scores b [seeds_b, n]) per label, rows in the same
    subject order in every label. The seed draws and patient draws of a resample are shared by every label
    (one trained model scores all of them). Returns the observed difference, the resampled differences,
    and the differences of the seed ensembles as trained on the same patient resamples (the patient part
    of the variance, for `repro.evaluation.significance.seed_calibrated_interval`).
    """
    ref = labels[0][1]
    if any(not np.array_equal(s, ref) for _, s, _, _ in labels):
        raise ValueError("two-level bootstrap: every label must hold the same subjects in the same order")
    ka, kb = labels[0][2].shape[0], labels[0][3].shape[0]
    ensembles = [(a.mean(0), b.mean(0)) for _, _, a, b in labels]  # each model's seeds as trained
    est = np.mean([metric_values(y, ea, "auroc")[0] - metric_values(y, eb, "auroc")[0]
                   for (y, _, _, _), (ea, eb) in zip(labels, ensembles)])  # fmt: skip
    one_seed = ka == kb == 1  # every seed draw is the ensemble itself: the two parts coincide
    rng = np.random.default_rng(seed)
    codes, _ = _cluster_codes(ref, len(ref))
    out, fixed = [], []
    for counts in cluster_bootstrap_counts(ref, n_boot, rng, len(ref)):
        k = counts.shape[0]
        w = counts[:, codes]
        wa = rng.multinomial(ka, np.full(ka, 1.0 / ka), size=k) / ka  # seed weights of each resample
        wb = rng.multinomial(kb, np.full(kb, 1.0 / kb), size=k) / kb
        d, f = np.zeros(k), np.zeros(k)
        for (y, _, a, b), (ea, eb) in zip(labels, ensembles):
            d += weighted_metrics(y, wa @ a, w, ("auroc",))["auroc"]
            d -= weighted_metrics(y, wb @ b, w, ("auroc",))["auroc"]
            if not one_seed:
                f += weighted_metrics(y, ea, w, ("auroc",))["auroc"]
                f -= weighted_metrics(y, eb, w, ("auroc",))["auroc"]
        out.append(d / len(labels))
        fixed.append(out[-1] if one_seed else f / len(labels))
    return float(est), np.concatenate(out), np.concatenate(fixed)
