"""Shared statistics: patient-clustered bootstrap, paired comparisons, permutation tests, BH, verdicts.

Why it looks like this: the report compares several models scored on the same patients, so every CI and
every difference must come from the same resampled patients (paired), and patients, not rows, are the unit
of resampling (one patient can contribute several prediction rows). A bootstrap resample is held as a row of
integer weights (how many times each row was drawn), which lets AUROC / AUPRC / F1 / Brier / ECE be computed
for hundreds of resamples at once with one sort per model instead of one sklearn call per resample.

Vectorised metrics are named by string: "auroc", "auprc", "f1" (needs a threshold), "brier", "ece",
"prevalence". Any other metric can be passed as a plain callable ``f(y_true, y_score) -> float``; it is then
evaluated resample by resample (correct, slower).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata

MetricFn = str | Callable[[np.ndarray, np.ndarray], float]

VECTOR_METRICS = ("auroc", "auprc", "f1", "brier", "ece", "prevalence")
ECE_BINS = 10
# a metric whose resample distribution lost more than this fraction to undefined values (single class) is flagged
MAX_DROPPED_FRACTION = 0.10
# cells (resamples x rows) handled per chunk: bounds memory at ~10 float64 arrays of this size (~80 MB)
_MAX_CELLS = 1_000_000

VERDICT_RULE = (
    "Let d = new - baseline (for metrics where lower is better, baseline - new), with its paired bootstrap CI "
    "[lo, hi] (patients resampled) and p_adj, the Benjamini-Hochberg adjusted p-value of a paired permutation "
    "test (the two models' within-model score ranks swapped within a random half of the patients). "
    "Supported: lo > margin and p_adj < alpha (the whole CI shows an improvement larger than the margin, "
    "and the improvement survives the multiple-comparison correction). "
    "Not supported: hi < margin and, when the margin is 0, p_adj < alpha (the CI rules out an improvement as "
    "large as the margin; with margin 0 the baseline is significantly better after the same correction). "
    "Inconclusive: anything else, including missing values."
)


# --------------------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------------------
def check_binary_inputs(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    """Return labels and scores as float arrays, or raise ValueError naming what is wrong.

    >>> check_binary_inputs([0, 1], [0.2, 0.9])[0]
    array([0., 1.])
    >>> check_binary_inputs([0, 2], [0.2, 0.9])
    Traceback (most recent call last):
    ...
    ValueError: labels must be 0/1, got values [0. 2.]
    """
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"labels must be 0/1, got values {np.unique(y)[:10]}")
    if not np.isfinite(s).all():
        raise ValueError(f"scores must be finite, got {int((~np.isfinite(s)).sum())} non-finite values")
    return y, s


# --------------------------------------------------------------------------------------------------------
# vectorised, weighted metrics (the engine)
# --------------------------------------------------------------------------------------------------------
def _gather(arr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return arr[:, idx] if idx.ndim == 1 else np.take_along_axis(arr, idx, axis=1)


def _ranked_metrics(
    y: np.ndarray, s: np.ndarray, w: np.ndarray, pos: np.ndarray, neg: np.ndarray, unweighted: bool
) -> tuple[np.ndarray, np.ndarray]:
    """AUROC (ties count 1/2, as sklearn) and average precision (as sklearn) for each weight row.

    Rows are sorted by score, descending; tied scores form one threshold group. A positive row's AUROC credit
    is the negative weight strictly below its group plus half the negative weight inside it; its AP credit is
    the precision at the end of its group. On a GPU node the same arithmetic runs in torch on the GPU, which
    otherwise sits idle through the statistics (`_ranked_metrics_torch`).
    """
    dev = stats_device()
    if dev is not None and w.size >= _GPU_MIN_CELLS:
        return _ranked_metrics_torch(y, s, w, pos, neg, unweighted, dev)
    n = y.shape[0]
    if s.ndim == 1:
        order = np.argsort(-s, kind="stable")
        ss = s[order]
        ys = y[order][None, :]
        ws = w[:, order]
        is_end = np.empty(n, dtype=bool)
        pos_idx = np.arange(n)
    else:
        order = np.argsort(-s, axis=1, kind="stable")
        ss = np.take_along_axis(s, order, axis=1)
        ys = y[order]
        ws = w if unweighted else np.take_along_axis(w, order, axis=1)
        is_end = np.empty(ss.shape, dtype=bool)
        pos_idx = np.broadcast_to(np.arange(n), ss.shape)
    is_end[..., :-1] = ss[..., :-1] != ss[..., 1:]
    is_end[..., -1] = True
    is_start = np.empty_like(is_end)
    is_start[..., 0] = True
    is_start[..., 1:] = is_end[..., :-1]
    end = np.flip(np.minimum.accumulate(np.flip(np.where(is_end, pos_idx, n), -1), axis=-1), -1)
    start = np.maximum.accumulate(np.where(is_start, pos_idx, 0), axis=-1)

    wp = ws * ys
    wn = ws - wp
    tp = np.cumsum(wp, axis=1)
    fp = np.cumsum(wn, axis=1)
    tp_end = _gather(tp, end)
    fp_end = _gather(fp, end)
    fp0 = np.concatenate([np.zeros((fp.shape[0], 1)), fp], axis=1)
    fp_before = _gather(fp0, start)  # fp0[:, start] = negatives in earlier (higher-score) groups
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (wp * (neg[:, None] - 0.5 * (fp_end + fp_before))).sum(axis=1) / (pos * neg)
        denom = tp_end + fp_end
        prec = np.divide(tp_end, denom, out=np.zeros_like(denom), where=denom > 0)
        ap = (wp * prec).sum(axis=1) / pos
    undefined = (pos <= 0) | (neg <= 0)
    auc[undefined] = np.nan
    ap[undefined] = np.nan
    return auc, ap


# where resampled ranks are computed: None (numpy) or a torch device; "auto" picks CUDA when torch sees one
_STATS_DEVICE: object = "auto"
_GPU_MIN_CELLS = 100_000  # below this a chunk is cheaper in numpy than a round trip to the GPU


def set_stats_device(device: str | None) -> None:
    """ "auto" (CUDA when available), "cuda", "cpu" (torch on the CPU, for tests) or None (numpy)."""
    global _STATS_DEVICE
    _STATS_DEVICE = device


def stats_device():
    """The torch device the rank statistics run on, or None for numpy."""
    global _STATS_DEVICE
    if _STATS_DEVICE is None:
        return None
    import torch

    if _STATS_DEVICE == "auto":
        _STATS_DEVICE = "cuda" if torch.cuda.is_available() else None
    return None if _STATS_DEVICE is None else torch.device(_STATS_DEVICE)


def _ranked_metrics_torch(
    y: np.ndarray, s: np.ndarray, w: np.ndarray, pos: np.ndarray, neg: np.ndarray, unweighted: bool, dev
) -> tuple[np.ndarray, np.ndarray]:
    """`_ranked_metrics` in float64 torch: weights are integer counts, so the cumulative sums and AUROC are
    exact in either; AP divides, and may differ from numpy in the last bits (summation order)."""
    import torch

    f64 = torch.float64

    def put(a: np.ndarray):  # torch wants writable, contiguous arrays (broadcast views are neither)
        return torch.as_tensor(np.require(a, np.float64, ["C", "W"]), device=dev)

    yt, st, wt = put(y), put(s), put(w)
    n = yt.shape[0]
    if st.ndim == 1:
        order = torch.sort(-st, stable=True).indices
        ss = st[order][None, :]
        ys = yt[order][None, :]
        ws = wt[:, order]
    else:
        order = torch.sort(-st, dim=1, stable=True).indices
        ss = torch.gather(st, 1, order)
        ys = yt[order]
        ws = wt if unweighted else torch.gather(wt, 1, order)
    idx = torch.arange(n, device=dev).expand(ss.shape)
    is_end = torch.ones(ss.shape, dtype=torch.bool, device=dev)
    is_end[:, :-1] = ss[:, :-1] != ss[:, 1:]
    is_start = torch.ones_like(is_end)
    is_start[:, 1:] = is_end[:, :-1]
    end = torch.flip(torch.cummin(torch.flip(torch.where(is_end, idx, n), [1]), dim=1).values, [1])
    start = torch.cummax(torch.where(is_start, idx, 0), dim=1).values
    wp = ws * ys
    wn = ws - wp
    tp = torch.cumsum(wp, dim=1)
    fp = torch.cumsum(wn, dim=1)
    rows = fp.shape[0]
    tp_end = torch.gather(tp, 1, end.expand(rows, n))
    fp_end = torch.gather(fp, 1, end.expand(rows, n))
    fp0 = torch.cat([torch.zeros((rows, 1), dtype=f64, device=dev), fp], dim=1)
    fp_before = torch.gather(fp0, 1, start.expand(rows, n))
    post, negt = put(pos), put(neg)
    auc = (wp * (negt[:, None] - 0.5 * (fp_end + fp_before))).sum(dim=1) / (post * negt)
    denom = tp_end + fp_end
    prec = torch.where(denom > 0, tp_end / torch.where(denom > 0, denom, 1.0), 0.0)
    ap = (wp * prec).sum(dim=1) / post
    undefined = (post <= 0) | (negt <= 0)
    auc = torch.where(undefined, torch.nan, auc)
    ap = torch.where(undefined, torch.nan, ap)
    return auc.cpu().numpy(), ap.cpu().numpy()


def _weighted_sum(w: np.ndarray, v: np.ndarray) -> np.ndarray:
    """sum_i w[k, i] * v[(k,) i] for a shared 1-D v (matmul) or a per-row 2-D v."""
    return w @ v if v.ndim == 1 else (w * v).sum(axis=1)


def weighted_metrics(
    y: np.ndarray,
    scores: np.ndarray,
    weights: np.ndarray | None = None,
    names: Sequence[str] = ("auroc", "auprc"),
    threshold: float = 0.5,
) -> dict[str, np.ndarray]:
    """Metrics for many weighted samples at once; a bootstrap resample is a row of row-multiplicities.

    y: (n,) 0/1 labels. scores: (n,) shared by every sample, or (k, n) one score row per sample (permutations).
    weights: (k, n) non-negative weights (integer counts reproduce sklearn on the duplicated rows), or None for 1.
    Returns {name: (k,) array}. AUROC/AUPRC are nan when a sample has a single class; Brier/ECE are nan when
    scores leave [0, 1]; F1 predicts positive when score >= threshold and is 0 when it has no true positive.
    """
    unknown = set(names) - set(VECTOR_METRICS)
    if unknown:
        raise ValueError(f"unknown vectorised metric(s) {sorted(unknown)}; choose from {VECTOR_METRICS}")
    y = np.asarray(y, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    n = y.shape[0]
    if weights is None:
        w = np.ones((1 if s.ndim == 1 else s.shape[0], n))
    else:
        w = np.asarray(weights, dtype=np.float64)
    tot = w.sum(axis=1)
    pos = w @ y
    neg = tot - pos
    out: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        if "auroc" in names or "auprc" in names:
            auc, ap = _ranked_metrics(y, s, w, pos, neg, unweighted=weights is None)
            out |= {"auroc": auc, "auprc": ap}
        if "f1" in names:
            pred = (s >= threshold).astype(np.float64)
            tp = _weighted_sum(w, pred * y)
            fp = _weighted_sum(w, pred * (1.0 - y))
            denom = 2 * tp + fp + (pos - tp)
            out["f1"] = np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)
            out["f1"][tot <= 0] = np.nan
        is_prob = bool(((s >= 0) & (s <= 1)).all())
        if "brier" in names:
            out["brier"] = _weighted_sum(w, (s - y) ** 2) / tot if is_prob else np.full(w.shape[0], np.nan)
        if "ece" in names:
            if not is_prob:
                out["ece"] = np.full(w.shape[0], np.nan)
            else:
                bins = np.minimum((s * ECE_BINS).astype(np.int64), ECE_BINS - 1)
                resid = y - s
                if s.ndim == 1:
                    onehot = np.zeros((n, ECE_BINS))
                    onehot[np.arange(n), bins] = resid
                    out["ece"] = np.abs(w @ onehot).sum(axis=1) / tot
                else:
                    gap = sum(
                        np.abs((w * np.where(bins == b, resid, 0.0)).sum(axis=1)) for b in range(ECE_BINS)
                    )
                    out["ece"] = gap / tot
        if "prevalence" in names:
            out["prevalence"] = pos / tot
    return {k: out[k] for k in names}


def metric_values(y: np.ndarray, scores: np.ndarray, metric_fn: MetricFn, weights=None, **kw) -> np.ndarray:
    """One metric for each weight row (named metric) or for the single unweighted sample (callable)."""
    if isinstance(metric_fn, str):
        return weighted_metrics(y, scores, weights, names=(metric_fn,), **kw)[metric_fn]
    if weights is not None:
        raise ValueError("a callable metric is evaluated on index resamples, not weights")
    return np.array([_safe_call(metric_fn, y, scores)])


def _safe_call(fn: Callable, y: np.ndarray, s: np.ndarray) -> float:
    """A callable metric that raises on a degenerate resample (sklearn: one class) counts as undefined."""
    try:
        return float(fn(y, s))
    except ValueError:
        return float("nan")


def _metric_name(metric_fn: MetricFn) -> str:
    return metric_fn if isinstance(metric_fn, str) else getattr(metric_fn, "__name__", repr(metric_fn))


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

    Let d = new - baseline (for metrics where lower is better, baseline - new), with its paired bootstrap CI
    [lo, hi] (patients resampled) and p_adj, the Benjamini-Hochberg adjusted p-value of a paired permutation
    test (the two models' within-model score ranks swapped within a random half of the patients). Supported: lo > margin and p_adj < alpha (the
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
