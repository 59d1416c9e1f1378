"""Metrics of many bootstrap resamples at once: a resample is a row of integer weights (how many times
each row was drawn), so AUROC / AUPRC / F1 / Brier / ECE of hundreds of resamples cost one sort per
model instead of one sklearn call per resample; in numpy, or in float64 torch on a GPU.

Vectorised metrics are named by string: "auroc", "auprc", "f1" (needs a threshold), "brier", "ece",
"prevalence". Any other metric can be passed as a plain callable ``f(y_true, y_score) -> float``; it is
then evaluated resample by resample (correct, slower)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

MetricFn = str | Callable[[np.ndarray, np.ndarray], float]


VECTOR_METRICS = ("auroc", "auprc", "f1", "brier", "ece", "prevalence")


ECE_BINS = 10


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
