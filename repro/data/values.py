"""Lab values as tokens: quantile and clinical bins fitted on train, soft bin weights, xVal z-scores.

Soft discretization (`soft_mix`): bin k spans [lo_k, hi_k], the outer bins ending at the code's train
minimum and maximum; with t = (v - lo_k) / (hi_k - lo_k) clipped to [0, 1], the neighbour is bin k-1
with weight 0.5 - t below the middle, bin k+1 with t - 0.5 above it, and none (weight 0, `mix_ids` the
token itself) past the outermost bins, in a single or zero-width bin, or when either token is not in
the vocabulary. The model embeds (1 - w) E[id] + w E[mix_id], continuous in v across bin edges."""

from __future__ import annotations

import numpy as np

Z_CLIP = 5.0  # xval: z-scores are clipped to [-Z_CLIP, Z_CLIP]


def quantile_edges(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Inner bin edges (n_bins - 1) from train values; `assign_bins` puts the maximum in the top bin."""
    values = values[~np.isnan(values)]
    if len(values) == 0 or n_bins < 2:
        return np.empty(0, dtype=np.float64)
    return np.quantile(values.astype(np.float64), np.arange(1, n_bins) / n_bins)


def quantile_edges_from_counts(values: np.ndarray, counts: np.ndarray, n_bins: int) -> np.ndarray:
    """`quantile_edges` of the multiset {values[i] repeated counts[i] times}, bit for bit.

    Why: a streaming fit keeps each lab code's distinct values with their counts (lab values are
    recorded at fixed precision, so that is far smaller than the events), and must give exactly the
    edges `np.quantile` gives on the expanded array (a zero edge may differ in sign only: -0.0 == 0.0).
    `values` must be sorted ascending, without NaN.
    This is numpy's default ('linear', Hyndman-Fan 7) rule: virtual index (n - 1) q, then numpy's
    two-sided lerp between the neighbouring order statistics.

    >>> v = np.array([1.0, 2.0, 2.0, 7.0, 7.0, 7.0, 9.0])
    >>> u, c = np.unique(v, return_counts=True)
    >>> bool(np.array_equal(quantile_edges_from_counts(u, c, 5), quantile_edges(v, 5)))
    True
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if n == 0 or n_bins < 2:
        return np.empty(0, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    q = np.arange(1, n_bins) / n_bins
    virtual = (n - 1) * q
    prev = np.floor(virtual)
    above = virtual >= n - 1
    prev_i = np.where(above, n - 1, prev).astype(np.int64)
    next_i = np.where(above, n - 1, prev + 1).astype(np.int64)
    gamma = virtual - np.where(above, -1.0, prev)  # numpy's gamma uses the index -1 above the bounds
    cum = np.cumsum(counts)
    a = values[np.searchsorted(cum, prev_i, side="right")]
    b = values[np.searchsorted(cum, next_i, side="right")]
    with np.errstate(invalid="ignore"):  # inf values give NaN edges, as np.quantile does
        diff = b - a
        out = a + diff * gamma
        np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5)
    return out


def assign_bins(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """0-based bin of each value; values above every edge (the maximum included) go to the top bin.

    >>> assign_bins(np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 2.0]))
    array([0, 1, 2, 2])
    """
    return np.searchsorted(edges, values, side="right")


def clinical_edges(lower: float, upper: float) -> np.ndarray:
    """Inner edges that make `assign_bins` give 0 below `lower`, 1 in [lower, upper] (inclusive), 2 above.

    The limits are compared at float32 precision, MEDS' numeric_value type, so a value written as the
    limit itself is inside the range; `assign_bins` puts a value equal to an edge above it, so the
    upper edge is the next float64 after the upper limit.

    >>> assign_bins(np.array([3.4, 3.5, 5.0, 5.01]), clinical_edges(3.5, 5.0))
    array([0, 1, 1, 2])
    """
    lo = float(np.float32(lower))
    hi = float(np.float32(upper))
    return np.array([lo, np.nextafter(hi, np.inf)], dtype=np.float64)


def value_summary(values: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([min, max], [mean, std]) of the multiset {values[i] repeated counts[i] times}; std is ddof 0.

    Both fits call this on a code's distinct train values (sorted, float64) and their counts, so the
    streaming and the in-memory tokenizer hold the same numbers.

    >>> lim, mom = value_summary(np.array([1.0, 3.0]), np.array([3, 1]))
    >>> lim.tolist(), np.round(mom, 4).tolist()
    ([1.0, 3.0], [1.5, 0.866])
    """
    values = np.asarray(values, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    n = c.sum()
    mean = (values * c).sum() / n
    std = np.sqrt((((values - mean) ** 2) * c).sum() / n)
    return np.array([values.min(), values.max()]), np.array([mean, std])


def soft_weights(
    x: np.ndarray, b: np.ndarray, lo: np.ndarray, hi: np.ndarray, n_bins: np.ndarray | int
) -> tuple[np.ndarray, np.ndarray]:
    """Neighbouring bin (0-based) and its weight for values `x` in bins `b` spanning [lo, hi].

    t = (x - lo) / (hi - lo) clipped to [0, 1]; below the middle the neighbour is b - 1 with weight
    0.5 - t, else b + 1 with t - 0.5. No neighbour (outside the outermost bins, a zero-width bin, a
    weight of 0) gives the bin itself and weight 0.

    >>> nb, w = soft_weights(np.array([1.0, 1.9, 2.0, 2.5]), np.array([0, 0, 1, 1]),
    ...                      np.array([1.0, 1.0, 2.0, 2.0]), np.array([2.0, 2.0, 3.0, 3.0]), 2)
    >>> nb.tolist(), np.round(w, 6).tolist()
    ([0, 1, 0, 1], [0.0, 0.4, 0.5, 0.0])
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    down = t < 0.5
    nb = np.where(down, b - 1, b + 1)
    w = np.where(down, 0.5 - t, t - 0.5)
    ok = (hi > lo) & (nb >= 0) & (nb < n_bins) & (w > 0)
    return np.where(ok, nb, b), np.where(ok, w, 0.0)


def soft_mix(
    values: np.ndarray, edges: np.ndarray, vmin: float, vmax: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bin, neighbouring bin, weight) of one code's values; the outer bins end at the train min and max.

    >>> b, nb, w = soft_mix(np.array([0.0, 4.0, 5.0, 10.0]), np.array([5.0]), 0.0, 10.0)
    >>> b.tolist(), nb.tolist(), np.round(w, 6).tolist()
    ([0, 0, 1, 1], [0, 1, 0, 1], [0.0, 0.3, 0.5, 0.0])
    """
    values = np.asarray(values, dtype=np.float64)
    b = assign_bins(values, edges)
    bounds = np.concatenate([[vmin], edges, [vmax]]).astype(np.float64)
    nb, w = soft_weights(values, b, bounds[b], bounds[b + 1], len(edges) + 1)
    return b, nb, w


def zscores(x: np.ndarray, mean: np.ndarray | float, std: np.ndarray | float) -> np.ndarray:
    """xval value: (x - mean) / std clipped to [-5, 5], 0 where std is 0 (float32).

    >>> zscores(np.array([1.0, 3.0, 100.0]), 2.0, 1.0).tolist()
    [-1.0, 1.0, 5.0]
    """
    std = np.asarray(std, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(std > 0, (np.asarray(x, dtype=np.float64) - mean) / std, 0.0)
    return np.clip(z, -Z_CLIP, Z_CLIP).astype(np.float32)
