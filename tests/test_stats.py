"""Tests for repro.evaluation (batched_metrics, bootstrap, significance): the vectorised engine against sklearn, pairing, p-values, BH, verdicts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, brier_score_loss, f1_score, roc_auc_score

from repro.evaluation.batched_metrics import weighted_metrics
from repro.evaluation.bootstrap import (
    bootstrap_pvalue,
    cluster_bootstrap_indices,
    cluster_bootstrap_weights,
    paired_bootstrap,
    percentile_ci,
)
from repro.evaluation.significance import (
    VERDICT_RULE,
    aggregate_seeds,
    benjamini_hochberg,
    paired_permutation_test,
    verdict,
)

N_BOOT = 200


def _long(y, subjects, **scores) -> pd.DataFrame:
    return pd.concat(
        [
            pd.DataFrame({"subject_id": subjects, "label": y, "model": m, "score": s})
            for m, s in scores.items()
        ],
        ignore_index=True,
    )


def _data(n=400, n_subjects=150, seed=0, decimals=None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = 1 / (1 + np.exp(-(1.2 * y + rng.normal(size=n))))
    if decimals is not None:  # many ties
        s = np.round(s, decimals)
    return y, s, rng.integers(0, n_subjects, n)


# ---------------------------------------------------------------- engine vs sklearn
@pytest.mark.parametrize("decimals", [None, 1, 2])
@pytest.mark.parametrize("n", [30, 500])
def test_weighted_metrics_match_sklearn_on_resampled_rows(decimals, n):
    y, s, subj = _data(n=n, n_subjects=max(10, n // 3), decimals=decimals)
    idx = cluster_bootstrap_indices(subj, 25, np.random.default_rng(1))
    w = np.concatenate(list(cluster_bootstrap_weights(subj, 25, np.random.default_rng(1))))
    got = weighted_metrics(y, s, w, names=("auroc", "auprc", "f1", "brier", "prevalence"), threshold=0.45)
    for b, i in enumerate(idx):
        if len(np.unique(y[i])) < 2:
            assert np.isnan(got["auroc"][b]) and np.isnan(got["auprc"][b])
            continue
        np.testing.assert_allclose(got["auroc"][b], roc_auc_score(y[i], s[i]), rtol=0, atol=1e-12)
        np.testing.assert_allclose(got["auprc"][b], average_precision_score(y[i], s[i]), rtol=0, atol=1e-12)
        np.testing.assert_allclose(got["f1"][b], f1_score(y[i], s[i] >= 0.45, zero_division=0), atol=1e-12)
        np.testing.assert_allclose(got["brier"][b], brier_score_loss(y[i], s[i]), atol=1e-12)
        np.testing.assert_allclose(got["prevalence"][b], y[i].mean(), atol=1e-12)


def test_weighted_metrics_per_row_scores_match_sklearn():
    y, s, _ = _data(n=200, decimals=1)
    rng = np.random.default_rng(3)
    rows = np.stack([s, s[::-1], rng.random(200), np.round(rng.random(200), 1)])
    got = weighted_metrics(y, rows, None, names=("auroc", "auprc", "brier", "ece"))
    np.testing.assert_allclose(got["auroc"], [roc_auc_score(y, r) for r in rows], atol=1e-12)
    np.testing.assert_allclose(got["auprc"], [average_precision_score(y, r) for r in rows], atol=1e-12)
    np.testing.assert_allclose(got["brier"], [brier_score_loss(y, r) for r in rows], atol=1e-12)
    ece_one = [weighted_metrics(y, r, names=("ece",))["ece"][0] for r in rows]
    np.testing.assert_allclose(got["ece"], ece_one, atol=1e-12)


def test_ece_of_calibrated_constant_is_zero_and_logits_are_undefined():
    y = np.array([0, 1] * 50)
    assert weighted_metrics(y, np.full(100, 0.5), names=("ece",))["ece"][0] == pytest.approx(0.0)
    out = weighted_metrics(y, np.linspace(-3, 3, 100), names=("brier", "ece"))
    assert np.isnan(out["brier"][0]) and np.isnan(out["ece"][0])


def test_unknown_metric_name_raises():
    with pytest.raises(ValueError, match="unknown vectorised metric"):
        weighted_metrics([0, 1], [0.1, 0.9], names=("accuracy",))


# ---------------------------------------------------------------- resampling
@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=30),
    seed=st.integers(0, 2**32 - 1),
)
def test_cluster_bootstrap_keeps_subject_rows_together(sizes, seed):
    subjects = np.repeat(np.arange(len(sizes)) * 7 + 3, sizes)  # non-contiguous ids
    perm = np.random.default_rng(seed).permutation(subjects.size)
    subjects = subjects[perm]  # rows of a subject scattered in the input
    idx_list = cluster_bootstrap_indices(subjects, 5, np.random.default_rng(seed))
    weights = np.concatenate(list(cluster_bootstrap_weights(subjects, 5, np.random.default_rng(seed))))
    for idx, w in zip(idx_list, weights, strict=True):
        counts = np.bincount(idx, minlength=subjects.size)
        np.testing.assert_array_equal(counts, w)  # same resamples from both APIs
        drawn = 0
        for sid in np.unique(subjects):
            rows = np.flatnonzero(subjects == sid)
            assert len(set(counts[rows])) == 1  # every row of a subject drawn equally often
            drawn += counts[rows[0]]
        assert drawn == len(sizes)  # as many subjects drawn as exist
        # each drawn subject's rows sit together: run boundaries only between different subjects
        runs = subjects[idx]
        n_runs = 1 + int((runs[1:] != runs[:-1]).sum()) if runs.size else 0
        assert n_runs <= len(sizes)


def test_weights_do_not_depend_on_chunking(monkeypatch):
    from repro.evaluation import bootstrap

    subj = np.arange(300) // 2
    full = np.concatenate(list(cluster_bootstrap_weights(subj, 50, np.random.default_rng(7))))
    monkeypatch.setattr(bootstrap, "_MAX_CELLS", 300 * 7)  # chunks of 7 resamples
    chunked = np.concatenate(list(bootstrap.cluster_bootstrap_weights(subj, 50, np.random.default_rng(7))))
    np.testing.assert_array_equal(full, chunked)


# ---------------------------------------------------------------- paired bootstrap
def test_identical_models_difference_is_zero_and_p_is_one():
    y, s, subj = _data()
    df = _long(y, subj, a=s, b=s.copy())
    out = paired_bootstrap(df, ["a", "b"], "auroc", n_boot=N_BOOT, seed=0)
    diff = out[out["kind"] == "difference"].iloc[0]
    assert diff["lo"] <= 0 <= diff["hi"]
    assert diff["estimate"] == 0 and diff["p_value"] == 1.0
    assert paired_permutation_test(y, s, s, "auroc", n_perm=N_BOOT, seed=0, clusters=subj) == pytest.approx(
        1.0
    )


def test_model_better_on_every_patient_gives_small_p_and_ci_above_zero():
    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 2, n)
    subj = np.arange(n) // 2
    good = np.where(y == 1, 0.8, 0.2) + rng.normal(0, 0.01, n)  # separates perfectly
    bad = np.clip(0.5 + 0.1 * (y - 0.5) + rng.normal(0, 0.3, n), 0, 1)
    df = _long(y, subj, good=good, bad=bad)
    out = paired_bootstrap(df, ["good", "bad"], "auroc", n_boot=N_BOOT, seed=0)
    diff = out[out["kind"] == "difference"].iloc[0]
    assert diff["lo"] > 0 and diff["p_value"] <= 2 / (N_BOOT + 1) + 1e-12
    p = paired_permutation_test(y, good, bad, "auroc", n_perm=N_BOOT, seed=0, clusters=subj)
    assert p == pytest.approx(1 / (N_BOOT + 1))
    assert verdict(diff["lo"], diff["hi"], p) == "supported"
    assert verdict(-diff["hi"], -diff["lo"], p) == "not supported"


def test_paired_bootstrap_fixed_seed_repeats_exactly_and_seed_matters():
    y, s, subj = _data()
    df = _long(y, subj, a=s, b=np.clip(s + np.random.default_rng(1).normal(0, 0.2, s.size), 0, 1))
    first = paired_bootstrap(df, ["a", "b"], "auprc", n_boot=N_BOOT, seed=11)
    pd.testing.assert_frame_equal(first, paired_bootstrap(df, ["a", "b"], "auprc", n_boot=N_BOOT, seed=11))
    assert not first.equals(paired_bootstrap(df, ["a", "b"], "auprc", n_boot=N_BOOT, seed=12))


def test_callable_metric_uses_the_same_resamples_as_named_metric():
    y, s, subj = _data(n=200, n_subjects=80)
    df = _long(y, subj, a=s, b=s[::-1].copy())
    named = paired_bootstrap(df, ["a", "b"], "auroc", n_boot=60, seed=3)
    called = paired_bootstrap(df, ["a", "b"], roc_auc_score, n_boot=60, seed=3)
    assert set(called["metric"]) == {"roc_auc_score"}
    cols = ["estimate", "lo", "hi", "p_value"]
    np.testing.assert_allclose(named[cols].to_numpy(), called[cols].to_numpy(), atol=1e-12)


def test_row_id_pairs_rows_regardless_of_order():
    y, s, subj = _data(n=120, n_subjects=50)
    df = _long(y, subj, a=s, b=np.sqrt(s))
    df["row_id"] = np.tile(np.arange(120), 2)
    shuffled = df.sample(frac=1.0, random_state=0)
    a = paired_bootstrap(df, ["a", "b"], "auroc", n_boot=50, seed=0)
    b = paired_bootstrap(shuffled, ["a", "b"], "auroc", n_boot=50, seed=0)
    np.testing.assert_allclose(a["estimate"], b["estimate"])


def test_unpaired_rows_raise():
    y, s, subj = _data(n=50, n_subjects=20)
    df = _long(y, subj, a=s, b=s)
    df.loc[df.index[-1], "subject_id"] = -1
    with pytest.raises(ValueError, match="do not match"):
        paired_bootstrap(df, ["a", "b"], n_boot=10)
    with pytest.raises(ValueError, match="no rows"):
        paired_bootstrap(df, ["a", "zzz"], n_boot=10)
    with pytest.raises(ValueError, match="lacks column"):
        paired_bootstrap(df.drop(columns="label"), ["a", "b"], n_boot=10)


def test_undefined_resamples_are_dropped_counted_and_flagged():
    # 1 positive among 40 single-row subjects: about (39/40)^40 = 36% of resamples draw no positive
    y = np.zeros(40, dtype=int)
    y[17] = 1
    s = np.linspace(0, 1, 40)
    out = paired_bootstrap(_long(y, np.arange(40), a=s), ["a"], "auroc", n_boot=N_BOOT, seed=0).iloc[0]
    assert out["n_dropped"] > 0.1 * N_BOOT and out["flagged"]
    assert out["n_valid"] + out["n_dropped"] == N_BOOT
    assert np.isfinite(out["lo"]) and np.isfinite(out["hi"])
    ci = percentile_ci([np.nan] * 5)
    assert np.isnan(ci["lo"]) and ci["n_dropped"] == 5 and ci["flagged"]


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(20, 120),
    seed=st.integers(0, 2**32 - 1),
    signal=st.floats(0, 3),
    rows_per_subject=st.integers(1, 3),
)
def test_ci_contains_point_estimate(n, seed, signal, rows_per_subject):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:3], y[3:6] = 0, 1  # both classes, a few of each
    s = 1 / (1 + np.exp(-(signal * y + rng.normal(size=n))))
    subj = np.arange(n) // rows_per_subject
    row = paired_bootstrap(_long(y, subj, m=s), ["m"], "auroc", n_boot=N_BOOT, seed=seed % 1000).iloc[0]
    assert row["estimate"] == pytest.approx(roc_auc_score(y, s))
    assert row["lo"] - 1e-12 <= row["estimate"] <= row["hi"] + 1e-12


def test_bootstrap_pvalue_formula():
    d = np.array([-1.0] * 10 + [1.0] * 89 + [np.nan])
    # (1 + 10) / 100 is the smaller tail; doubled
    assert bootstrap_pvalue(d) == pytest.approx(2 * 11 / 100)
    assert np.isnan(bootstrap_pvalue([np.nan]))


# ---------------------------------------------------------------- permutation test
def _null_pair(rng, n_subjects=80, rows=3):
    """Two models of equal skill on clustered rows: each model's error is shared by a patient's rows."""
    subjects = np.repeat(np.arange(n_subjects), rows)
    y = np.repeat(rng.integers(0, 2, n_subjects), rows)
    a = 0.5 * y + np.repeat(rng.normal(0, 1, n_subjects), rows) + rng.normal(0, 0.3, y.size)
    b = 0.5 * y + np.repeat(rng.normal(0, 1, n_subjects), rows) + rng.normal(0, 0.3, y.size)
    return y, a, b, subjects


def null_rejection_rate(reps=300, clustered=True, seed=5) -> float:
    rng = np.random.default_rng(seed)
    ps = []
    for rep in range(reps):
        y, a, b, subjects = _null_pair(rng)
        clusters = subjects if clustered else None
        ps.append(paired_permutation_test(y, a, b, "auroc", n_perm=200, seed=rep, clusters=clusters))
    ps = np.array(ps)
    assert ((ps > 0) & (ps <= 1)).all()
    return float(np.mean(ps < 0.05))


def test_permutation_test_rejects_at_its_level_under_the_null():
    # 300 null pairs: the rate of p < 0.05 has sd 0.013 at 0.05; 0.08 is 2.4 sd above. Swapping rows instead
    # of patients (the clusters ignored) rejects about 0.2 of them here, and fails this test.
    assert null_rejection_rate() <= 0.08


def test_permutation_test_callable_matches_named():
    y, s, subj = _data(n=80, n_subjects=30)
    other = np.clip(s + np.random.default_rng(0).normal(0, 0.2, 80), 0, 1)
    p_named = paired_permutation_test(y, s, other, "auroc", n_perm=40, seed=2, clusters=subj)
    p_call = paired_permutation_test(y, s, other, roc_auc_score, n_perm=40, seed=2, clusters=subj, ranks=True)
    assert p_named == pytest.approx(p_call)


@pytest.mark.parametrize("metric", ["auroc", "auprc"])
def test_permutation_test_rank_metrics_equal_sklearn_on_tied_scores(metric):
    # the named rank metrics weight 2n stacked scores instead of sorting each permutation: same p as sklearn's
    rng = np.random.default_rng(3)
    n = 300
    y = (rng.random(n) < 0.3).astype(int)
    a = np.round(rng.random(n) * 0.5 + 0.3 * y, 2)  # two decimals: many ties, within and across models
    b = np.round(a + rng.normal(0, 0.08, n), 2)
    clusters = rng.integers(0, 120, n)
    fn = {"auroc": roc_auc_score, "auprc": average_precision_score}[metric]
    p_named = paired_permutation_test(y, a, b, metric, n_perm=300, seed=4, clusters=clusters)
    p_call = paired_permutation_test(y, a, b, fn, n_perm=300, seed=4, clusters=clusters, ranks=True)
    assert p_named == p_call and 1 / 301 < p_named < 1  # not at either end: the comparison is not trivial


def test_cluster_kernel_auroc_equals_the_row_path_on_clustered_tied_data(monkeypatch):
    # several rows per patient (as the conditions task): bootstrap and permutation AUROC go through the
    # cluster kernel; the resamples are the same draws and the values match the row path exactly
    from repro.evaluation import bootstrap, significance

    rng = np.random.default_rng(7)
    n, n_clusters = 600, 150
    clusters = rng.integers(0, n_clusters, n)
    y = (rng.random(n) < 0.25).astype(int)
    a = np.round(rng.random(n) * 0.5 + 0.25 * y, 2)
    b = np.round(rng.random(n) * 0.5 + 0.22 * y, 2)  # about as good as a: p away from both ends
    assert bootstrap._kernel_ok(y, n_clusters) and not bootstrap._kernel_ok(y[:100], 100)
    rows = bootstrap.bootstrap_metrics(y, {"a": a, "b": b}, clusters, ("auroc",), 300, 3)
    kern = bootstrap.bootstrap_auroc(y, {"a": a, "b": b}, clusters, 300, 3)
    for m in "ab":
        np.testing.assert_allclose(kern[m], rows[m]["auroc"], rtol=0, atol=1e-12)
    taken = []
    real = significance._permutation_auroc
    monkeypatch.setattr(
        significance, "_permutation_auroc", lambda *a_, **k: taken.append(1) or real(*a_, **k)
    )
    p_kernel = paired_permutation_test(y, a, b, "auroc", n_perm=400, seed=5, clusters=clusters)
    p_rows = paired_permutation_test(
        y, a, b, roc_auc_score, n_perm=400, seed=5, clusters=clusters, ranks=True
    )
    assert taken and p_kernel == p_rows and 1 / 401 < p_kernel < 1


@pytest.mark.parametrize("metric", ["auroc", "auprc"])
def test_permutation_p_ignores_a_monotone_map_of_one_models_scores(metric):
    # a rank metric is the same for sigmoid(z) and sigmoid(z + 3), so its p must be too: swapping raw
    # scores mixed the two scales in every permuted arm (a shift took p from 0.05 to 0.69)
    rng = np.random.default_rng(11)
    n = 1500
    y = (rng.random(n) < 0.15).astype(int)
    z = rng.normal(size=n) + y
    a = z + 0.3 * rng.normal(size=n)
    b = z + 0.3 * np.random.default_rng(2).normal(size=n) + 0.1 * y
    clusters = rng.integers(0, 600, n)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    p = [
        paired_permutation_test(
            y, sig(a - 2), sig(b - 2 + shift), metric, n_perm=400, seed=1, clusters=clusters
        )
        for shift in (0.0, 3.0)
    ]
    assert p[0] == p[1] < 0.05
    raw = paired_permutation_test(
        y, sig(a - 2), sig(b + 1), metric, n_perm=400, seed=1, clusters=clusters, ranks=False
    )
    assert raw > 0.1  # the old exchange on raw scores loses the difference


# ---------------------------------------------------------------- BH, seeds, verdicts
def test_benjamini_hochberg_hand_example():
    # sorted p: 0.005, 0.01, 0.03, 0.04 -> p*m/rank = 0.02, 0.02, 0.04, 0.04 (already monotone)
    np.testing.assert_allclose(benjamini_hochberg([0.01, 0.04, 0.03, 0.005]), [0.02, 0.04, 0.04, 0.02])
    # monotonicity step: 0.01*3/1=0.03, 0.02*3/2=0.03, 0.025*3/3=0.025 -> min from the top: 0.025 for all
    np.testing.assert_allclose(benjamini_hochberg([0.02, 0.01, 0.025]), [0.025, 0.025, 0.025])
    out = benjamini_hochberg([0.01, np.nan, 0.04])
    assert np.isnan(out[1]) and out[0] == pytest.approx(0.02) and out[2] == pytest.approx(0.04)
    assert benjamini_hochberg([]).shape == (0,)


def test_aggregate_seeds():
    df = pd.DataFrame({"model": ["a"] * 3 + ["b"] * 3, "seed": [0, 1, 2] * 2, "estimate": [1, 2, 3, 5, 5, 5]})
    out = aggregate_seeds(df, ["model"]).set_index("model")
    assert out.loc["a", "mean"] == 2 and out.loc["a", "sd"] == 1 and out.loc["b", "sd"] == 0
    assert out.loc["a", "n_seeds"] == 3 and out.loc["b", "max"] == 5


@pytest.mark.parametrize(
    ("lo", "hi", "p", "margin", "expected"),
    [
        (0.01, 0.05, 0.01, 0.0, "supported"),
        (0.01, 0.05, 0.20, 0.0, "inconclusive"),  # CI above 0 but p_adj not below alpha
        (0.01, 0.05, 0.01, 0.02, "inconclusive"),  # CI not wholly above the margin
        (0.03, 0.05, 0.01, 0.02, "supported"),
        (-0.05, -0.01, 0.01, 0.0, "not supported"),  # baseline better
        (-0.05, -0.01, 0.30, 0.0, "inconclusive"),  # baseline better before, not after the BH correction
        (-0.01, 0.01, 0.50, 0.02, "not supported"),  # within the margin: no meaningful gain
        (-0.01, 0.03, 0.50, 0.02, "inconclusive"),
        (np.nan, np.nan, np.nan, 0.0, "inconclusive"),
    ],
)
def test_verdict_rule(lo, hi, p, margin, expected):
    assert verdict(lo, hi, p, margin=margin) == expected


def test_verdict_lower_is_better_and_rule_text_in_docstring():
    # Brier: new - baseline = [-0.03, -0.01] means new is better
    assert verdict(-0.03, -0.01, 0.001, higher_is_better=False) == "supported"
    assert " ".join(VERDICT_RULE.split()) in " ".join(verdict.__doc__.split())
    with pytest.raises(ValueError, match="margin"):
        verdict(0, 1, 0.1, margin=-1)


@pytest.mark.parametrize("two_d", [False, True])
def test_rank_metrics_in_torch_match_numpy(two_d):
    """The GPU path (here torch on the CPU) gives the numpy engine's AUROC exactly and its AP to 1e-12,
    on tied scores, zero weights and resamples with one class."""
    from repro.evaluation import batched_metrics

    rng = np.random.default_rng(3)
    n, k = 400, 300
    y = (rng.random(n) < 0.3).astype(float)
    s = np.round(rng.random((k, n) if two_d else n), 2)  # many ties
    w = rng.poisson(1.0, size=(k, n)).astype(float)
    w[0] = w[0] * (1 - y)  # one resample with negatives only: undefined
    pos, neg = w @ y, w.sum(1) - w @ y
    want = batched_metrics._ranked_metrics(y, s, w, pos, neg, unweighted=False)
    got = batched_metrics._ranked_metrics_torch(y, s, w, pos, neg, False, "cpu")
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-12)
    assert np.isnan(got[0][0]) and np.isnan(got[1][0])


def test_permutation_and_bootstrap_are_the_same_on_the_torch_path():
    from repro.evaluation import batched_metrics, bootstrap, significance

    rng = np.random.default_rng(4)
    n = 600
    y = (rng.random(n) < 0.25).astype(float)
    a, b = y * 0.3 + rng.random(n), rng.random(n)
    ids = np.arange(n) // 2  # two rows per patient
    want = significance.paired_permutation_test(y, a, b, "auroc", 400, 0)
    wb = bootstrap.bootstrap_metrics(y, {"a": a, "b": b}, ids, ["auroc", "auprc"], n_boot=300, seed=1)
    batched_metrics.set_stats_device("cpu")
    try:
        assert significance.paired_permutation_test(y, a, b, "auroc", 400, 0) == want
        gb = bootstrap.bootstrap_metrics(y, {"a": a, "b": b}, ids, ["auroc", "auprc"], n_boot=300, seed=1)
    finally:
        batched_metrics.set_stats_device("auto")
    for m in ("a", "b"):
        np.testing.assert_array_equal(gb[m]["auroc"], wb[m]["auroc"])
        np.testing.assert_allclose(gb[m]["auprc"], wb[m]["auprc"], rtol=0, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rank_metrics_on_cuda_match_numpy():
    from repro.evaluation import batched_metrics

    rng = np.random.default_rng(5)
    y = (rng.random(3000) < 0.2).astype(float)
    s = np.round(rng.random(3000), 3)
    w = rng.poisson(1.0, size=(500, 3000)).astype(float)
    pos, neg = w @ y, w.sum(1) - w @ y
    batched_metrics.set_stats_device(None)  # numpy
    try:
        want = batched_metrics._ranked_metrics(y, s, w, pos, neg, unweighted=False)
    finally:
        batched_metrics.set_stats_device("auto")
    got = batched_metrics._ranked_metrics_torch(y, s, w, pos, neg, False, "cuda")
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-12)


@pytest.mark.slow
def test_the_whole_procedure_rarely_calls_a_null_pair_supported():
    """Issue 21: null pairs (equal true AUROC, correlated scores, three seeds) through the report's
    procedure; fails when more than 7 % are called supported. Measured with the seed-calibrated interval:
    2 of 300 (0.007, Wilson 95 % CI 0.002-0.024). The same check on a planted defect (a 50 % CI and alpha 0.5
    in place of the report's 95 % and 0.05) called 19 of 100 supported (0.19), so the threshold can be
    crossed."""
    from repro.evaluation.null_simulation import false_positive_rate

    fp = false_positive_rate(300, 200, 200, seed=5)
    assert fp["rate"] <= 0.07, fp
    planted = false_positive_rate(100, 200, 200, alpha=0.5, ci=0.5, seed=6)
    assert planted["rate"] > 0.07, planted


@pytest.mark.slow
def test_seeds_that_differ_in_quality_do_not_make_claims(monkeypatch):
    """Null pairs whose three seeds each weigh the signal by their own factor (1 + N(0, 0.4)): one seed's
    AUROC moves on every patient (per-seed AUROC sd about 0.045). Any claim (supported or not supported)
    at most 7 % of pairs. Measured: 8 of 200 (0.040). The planted defect is the interval before this
    check, the two-level bootstrap alone: 27 of 200 (0.135), since three seeds resampled with replacement
    understate their spread."""
    from repro.evaluation import results
    from repro.evaluation.null_simulation import false_positive_rate

    kw = {"n_patients": 1000, "prevalence": 0.1, "seed_quality_sd": 0.4}
    fp = false_positive_rate(200, 200, 200, seed=7, **kw)
    assert fp["any claim"] <= 0.07, fp

    def bootstrap_only(est, boot, lo, hi, seeds_a, seeds_b, ci):
        return {"lo": lo, "hi": hi, "se": (hi - lo) / 3.92, "df": np.inf}

    monkeypatch.setattr(results, "seed_calibrated_interval", bootstrap_only)
    planted = false_positive_rate(200, 200, 200, seed=7, **kw)
    assert planted["any claim"] > 0.07, planted


def test_seed_calibrated_interval_ignores_undefined_resamples():
    from repro.evaluation.significance import seed_calibrated_interval

    boot = np.array([-0.01, 0.01, np.nan, -0.012, 0.012])
    r = seed_calibrated_interval(0.0, boot, -0.01, 0.01, np.array([0.83, 0.82, 0.81]), np.array([0.8] * 3))
    clean = seed_calibrated_interval(
        0.0, boot[np.isfinite(boot)], -0.01, 0.01, np.array([0.83, 0.82, 0.81]), np.array([0.8] * 3)
    )
    assert r == clean and r["hi"] > 0.03  # the seeds widen it; the undefined resample is left out
    gone = seed_calibrated_interval(np.nan, boot, np.nan, np.nan, np.array([0.8]), np.array([0.8]))
    assert np.isnan(gone["lo"]) and np.isnan(gone["df"])


@pytest.mark.slow  # several processes (pyproject: slow)
def test_null_simulation_in_processes_gives_the_in_process_result():
    """The report's table computes its verdicts in spawned processes: the pairs are drawn before they
    are handed out, so the rate must equal the one computed in this process."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from repro.evaluation.null_simulation import false_positive_rate

    kw = {"n_patients": 120, "prevalence": 0.3}
    alone = false_positive_rate(6, 20, 20, alpha=0.5, ci=0.5, seed=3, **kw)
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        split = false_positive_rate(6, 20, 20, alpha=0.5, ci=0.5, seed=3, pool=pool, **kw)
    assert split == alone
    assert alone["any claim"] > 0  # a planted loose rule, so the verdicts compared are not all the same


def test_paired_comparisons_in_threads_give_the_one_thread_result(monkeypatch):
    """`paired_comparisons` computes its comparisons in threads; each is seeded on its own, so the frame
    must not depend on how many run at once."""
    from repro.evaluation import results
    from repro.evaluation.null_simulation import null_pair

    rng = np.random.default_rng(4)
    frames = []
    for k in range(3):
        p = null_pair(rng, n_patients=150, prevalence=0.3)
        frames.append(p.assign(task=f"task{k}"))
    preds = pd.concat(frames, ignore_index=True)
    pairs = [("a", "b"), ("b", "a")]
    monkeypatch.setattr(results, "COMPARE_THREADS", 1)
    alone = results.paired_comparisons(preds, pairs, 50, 0.95, n_perm=50)
    monkeypatch.setattr(results, "COMPARE_THREADS", 3)
    threaded = results.paired_comparisons(preds, pairs, 50, 0.95, n_perm=50)
    pd.testing.assert_frame_equal(alone, threaded)
    assert len(alone) == 6 and alone["ΔAUROC"].round(12).abs().nunique() == 3  # 3 tasks x both directions
