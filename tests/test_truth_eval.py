"""Scoring against the known truth: macro averages over labels, their paired tests, mechanism recovery."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from repro.data.tasks import null_labels
from repro.evaluation import significance
from repro.evaluation.bootstrap import bootstrap_metrics, two_level_paired_auroc
from repro.evaluation.metrics import macro_evaluate
from repro.evaluation.truth import SIDES, recovery


def _labels(n=150, k=4, seed=0):
    rng = np.random.default_rng(seed)
    subjects = np.arange(n) + 100
    out = []
    for g in range(k):
        y = (rng.random(n) < 0.2 + 0.1 * g).astype(int)
        a = y * 1.0 + rng.normal(0, 1.0, n)
        b = y * 0.8 + rng.normal(0, 1.0, n) + 0.3 * a
        out.append((y, subjects, a, b))
    return out


def test_macro_difference_is_the_mean_of_per_label_differences_on_shared_resamples():
    """With one seed per model the two-level bootstrap is the patient bootstrap: the macro difference of each
    resample is the mean of the per-label differences on the same resampled patients."""
    labels = _labels()
    est, d = two_level_paired_auroc([(y, s, a[None], b[None]) for y, s, a, b in labels], n_boot=200, seed=3)
    want = np.mean([roc_auc_score(y, a) - roc_auc_score(y, b) for y, _, a, b in labels])
    assert est == pytest.approx(want, abs=1e-12)
    # the same patient draws as the plain patient bootstrap (one chunk here; its cluster counts come first)
    per_label = [bootstrap_metrics(y, {"a": a, "b": b}, s, ("auroc",), 200, 3) for y, s, a, b in labels]
    boot = np.mean([r["a"]["auroc"] - r["b"]["auroc"] for r in per_label], axis=0)
    np.testing.assert_allclose(d, boot, atol=1e-12)


def test_two_level_bootstrap_on_a_hand_computed_case():
    """Model a has two seeds, one ranking every patient right (AUROC 1), one every patient wrong (AUROC 0);
    their average is constant (AUROC 1/2). Model b has one seed of constant scores (AUROC 1/2). Resampling
    seeds gives a's ensemble AUROC 1 (both draws the first seed, probability 1/4), 0 (1/4) or 1/2 (1/2),
    whatever patients are drawn, so the differences are +1/2, -1/2 and 0 with those probabilities; a
    patient-only bootstrap would see 0 every time."""
    y = np.array([1, 0] * 30, dtype=float)
    subjects = np.arange(60)
    a = np.stack([y, 1.0 - y])
    b = np.full((1, 60), 0.3)
    est, d = two_level_paired_auroc([(y, subjects, a, b)], n_boot=4000, seed=1)
    assert est == pytest.approx(0.0)
    shares = [np.mean(np.isclose(d, v)) for v in (0.5, -0.5, 0.0)]
    assert shares == pytest.approx([0.25, 0.25, 0.5], abs=0.03) and sum(shares) == pytest.approx(1.0)


def test_macro_permutation_kernel_equals_the_row_path(monkeypatch):
    labels = [(y, a, b) for y, _, a, b in _labels()]
    clusters = _labels()[0][1]
    p_kernel = significance.macro_permutation_test(labels, clusters, n_perm=300, seed=4)
    monkeypatch.setattr(significance, "_MAX_KERNEL_CLUSTERS", 0)
    p_rows = significance.macro_permutation_test(labels, clusters, n_perm=300, seed=4)
    assert p_kernel == pytest.approx(p_rows, abs=1e-12)
    same = [(y, a, a + 0.0) for y, a, _ in labels]
    assert significance.macro_permutation_test(same, clusters, n_perm=100, seed=0) == 1.0


def test_macro_evaluate_never_pools_the_labels():
    # label "x" is common and "y" rare; a score equal to each label's prevalence ignores the patient
    n = 200
    rng = np.random.default_rng(1)
    rows = []
    for target, rate in (("x", 0.6), ("y", 0.05)):
        y = (rng.random(n) < rate).astype(int)
        y[:2] = [0, 1]
        rows.append(pd.DataFrame({"subject_id": np.arange(n), "target": target, "label": y, "score": rate}))
    test = pd.concat(rows, ignore_index=True)
    pooled = roc_auc_score(test["label"], test["score"])
    res = macro_evaluate(test, test, n_boot=50)
    assert pooled > 0.7 and res["auroc"]["estimate"] == pytest.approx(0.5)
    assert res["n_labels"] == 2


def test_null_labels_are_a_fixed_hash_of_the_subject():
    ids = np.arange(50_000) * 7 + 10_000_000
    y = null_labels(ids)
    assert abs(y.mean() - 0.2) < 0.01
    np.testing.assert_array_equal(y, null_labels(ids))
    assert abs(np.corrcoef(y, ids % 2)[0, 1]) < 0.02


def _truth(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    t = pd.DataFrame(
        {
            "subject_id": np.arange(n),
            "feature_recent_admissions": rng.integers(0, 4, n).astype(float),
            "feature_chronic_hf": (rng.random(n) < 0.25).astype(float),
            "feature_hyperkalemia": (rng.random(n) < 0.5).astype(float),
            "feature_insulin_before": 0.0,
            "feature_creatinine_slope": rng.normal(size=n),
            "feature_antibiotic_delay_h": rng.uniform(0.5, 13.5, n),
            "feature_warfarin": (rng.random(n) < 0.5).astype(float),
            "feature_ciprofloxacin": (rng.random(n) < 0.5).astype(float),
        }
    )
    t["feature_insulin_before"] = t["feature_hyperkalemia"] * (rng.random(n) < 0.5)
    return t


def test_recovery_is_one_for_the_truth_and_near_zero_for_a_blind_model():
    t = _truth()
    truth_logit = (
        t["feature_recent_admissions"]
        + 2 * t["feature_chronic_hf"]
        + np.where(t["feature_hyperkalemia"] > 0, np.where(t["feature_insulin_before"] > 0, 1.2, -1.2), 0)
        + t["feature_creatinine_slope"]
        + (t["feature_antibiotic_delay_h"] - 7) / 3.75
        + np.where(t["feature_warfarin"] == t["feature_ciprofloxacin"], 1.0, -1.0)
    )
    counts_only = t["feature_recent_admissions"] + 2 * t["feature_chronic_hf"]  # what counts can read
    preds = pd.concat(
        [
            pd.DataFrame({"model": m, "subject_id": t["subject_id"], "score": s, "true_prob": truth_logit})
            for m, s in (("truth", truth_logit), ("counts", counts_only))
        ]
    ).assign(task="mortality_1m", split="held_out")
    share = recovery(t, preds).set_index(["model", "mechanism"])["share recovered"]
    assert np.allclose(share["truth"], 1.0)
    for m in SIDES:
        if m in ("count", "long_range"):
            assert share["counts", m] > 1.0  # it leans on what it reads more than the truth does
        else:
            assert abs(share["counts", m]) < 0.15, m
    assert recovery(None, preds).empty


def test_recovery_by_seed_shows_each_seed_apart():
    from repro.evaluation.truth import recovery_by_seed

    t = _truth()
    xor = np.where(t["feature_warfarin"] == t["feature_ciprofloxacin"], 1.0, -1.0)
    frames = [
        pd.DataFrame(
            {"model": "bigbird", "subject_id": t["subject_id"], "score": s, "true_prob": xor, "seed": seed}
        )
        for seed, s in ((1, np.zeros(len(t)) + t["feature_creatinine_slope"]), (0, xor))
    ]  # seed 0 reads the interaction, seed 1 only the trend
    preds = pd.concat(frames).assign(task="mortality_1m", split="held_out")
    table = recovery_by_seed(t, preds, {"bigbird": "BigBird"}).set_index("model")
    assert table.loc["BigBird", "seeds"] == "0, 1"
    first, second = (float(x) for x in table.loc["BigBird", "interaction"].split(", "))
    assert first == pytest.approx(1.0) and abs(second) < 0.15  # in seed order, not averaged away
    assert recovery_by_seed(None, preds, {}).empty
