"""Tests for repro.evaluation.metrics: sklearn agreement, degenerate labels, validation threshold, CI output shape."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, brier_score_loss, f1_score, roc_auc_score

from repro.evaluation.metrics import (
    binary_metrics,
    choose_threshold,
    evaluate_predictions,
    metrics_table,
    oracle_metrics,
)

N_BOOT = 200


def _frame(n=300, seed=0, signal=1.5, rows_per_subject=2, offset=0):
    rng = np.random.default_rng(seed)
    p = 1 / (1 + np.exp(-rng.normal(-0.5, 1.5, n)))
    y = (rng.random(n) < p).astype(int)
    score = 1 / (1 + np.exp(-(signal * (p - 0.3) + rng.normal(0, 0.5, n))))
    subj = offset + np.arange(n) // rows_per_subject
    return pd.DataFrame({"subject_id": subj, "label": y, "score": score, "true_prob": p})


def test_binary_metrics_match_sklearn():
    df = _frame()
    y, s = df["label"].to_numpy(), df["score"].to_numpy()
    m = binary_metrics(y, s, threshold=0.4)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert m["auprc"] == pytest.approx(average_precision_score(y, s))
    assert m["f1"] == pytest.approx(f1_score(y, s >= 0.4))
    assert m["brier"] == pytest.approx(brier_score_loss(y, s))
    assert m["prevalence"] == pytest.approx(y.mean()) and m["n"] == len(y) and m["undefined"] == []
    assert 0 <= m["ece"] <= 1


@pytest.mark.parametrize("label", [0, 1])
def test_single_class_gives_nan_and_reason(label):
    m = binary_metrics(np.full(10, label), np.linspace(0, 1, 10), 0.5)
    assert np.isnan(m["auroc"]) and np.isnan(m["auprc"])
    assert any(u.startswith("auroc:") for u in m["undefined"])
    assert np.isfinite(m["brier"]) and m["prevalence"] == label


def test_empty_and_non_probability_scores_do_not_crash():
    m = binary_metrics([], [], 0.5)
    assert m["n"] == 0 and np.isnan(m["auroc"]) and m["undefined"]
    m = binary_metrics([0, 1, 0, 1], [-2.0, 3.0, -1.0, 0.5], 0.0)
    assert m["auroc"] == 1.0 and np.isnan(m["brier"]) and any("brier" in u for u in m["undefined"])


def test_bad_labels_raise():
    with pytest.raises(ValueError, match="0/1"):
        binary_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        binary_metrics([0, 1], [0.1, np.nan])


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(2, 60),
    seed=st.integers(0, 2**32 - 1),
    decimals=st.sampled_from([1, 2, 6]),
)
def test_threshold_maximises_f1_on_val(n, seed, decimals):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[0] = 1
    s = np.round(rng.random(n) * 0.7 + 0.3 * y, decimals)
    t = choose_threshold(y, s)
    best = max(f1_score(y, s >= c, zero_division=0) for c in np.unique(s))
    assert f1_score(y, s >= t, zero_division=0) == pytest.approx(best)


def test_threshold_without_val_positives_warns():
    with pytest.warns(UserWarning, match="no positives"):
        assert choose_threshold([0, 0, 0], [0.1, 0.2, 0.3]) == 0.5


def test_evaluate_predictions_shape_threshold_from_val_and_repeatable():
    val, test = _frame(seed=1), _frame(seed=2, offset=10_000)
    out = evaluate_predictions(val, test, n_boot=N_BOOT, seed=0)
    assert set(out) == {"auroc", "auprc", "f1", "brier", "ece", "prevalence"}
    for d in out.values():
        assert {"estimate", "lo", "hi", "n_dropped", "flagged"} <= set(d)
        assert d["lo"] - 1e-12 <= d["estimate"] <= d["hi"] + 1e-12
        assert d["n_valid"] == N_BOOT
    t = out["f1"]["threshold"]
    assert t == choose_threshold(val["label"], val["score"])
    assert out["f1"]["estimate"] == pytest.approx(f1_score(test["label"], test["score"] >= t))
    assert out["auroc"]["estimate"] == pytest.approx(roc_auc_score(test["label"], test["score"]))
    assert out == evaluate_predictions(val, test, n_boot=N_BOOT, seed=0)


def test_clustering_widens_ci_when_subject_rows_are_duplicated():
    base = _frame(n=200, seed=3, rows_per_subject=1)
    dup = pd.concat([base] * 4, ignore_index=True)  # each subject 4 identical rows
    clustered = evaluate_predictions(base, dup, n_boot=N_BOOT, seed=0)["auroc"]
    as_rows = evaluate_predictions(base, dup.assign(subject_id=np.arange(len(dup))), n_boot=N_BOOT, seed=0)
    width = clustered["hi"] - clustered["lo"]
    assert width > 1.5 * (as_rows["auroc"]["hi"] - as_rows["auroc"]["lo"])


def test_single_class_test_split_does_not_crash():
    val = _frame(seed=1)
    test = _frame(seed=2).assign(label=0)
    out = evaluate_predictions(val, test, n_boot=50, seed=0)
    assert np.isnan(out["auroc"]["estimate"]) and "single class" in out["auroc"]["undefined"]
    assert out["auroc"]["n_dropped"] == 50 and out["auroc"]["flagged"]
    assert np.isfinite(out["brier"]["estimate"])


def test_missing_columns_raise():
    with pytest.raises(ValueError, match="subject_id"):
        evaluate_predictions(_frame(), _frame().drop(columns="subject_id"), n_boot=10)


def test_oracle_is_a_ceiling_on_average():
    df = _frame(n=2000, seed=4, signal=0.5)
    oracle = oracle_metrics(df, n_boot=N_BOOT, seed=0)
    assert set(oracle) == {"auroc", "auprc", "brier", "ece"}
    model = evaluate_predictions(df, df, n_boot=N_BOOT, seed=0)
    assert oracle["auroc"]["estimate"] > model["auroc"]["estimate"]
    assert oracle["ece"]["estimate"] < 0.05  # the true risk is calibrated up to sampling noise
    assert oracle["auroc"]["lo"] <= oracle["auroc"]["estimate"] <= oracle["auroc"]["hi"]


def test_metrics_table_format():
    val, test = _frame(seed=1), _frame(seed=2)
    results = {
        "EHRMamba": evaluate_predictions(val, test, n_boot=N_BOOT, seed=0),
        "oracle": oracle_metrics(test, n_boot=N_BOOT, seed=0),
    }
    table = metrics_table(results)
    assert list(table.index) == ["EHRMamba", "oracle"] and table.index.name == "model"
    cell = table.loc["EHRMamba", "AUROC (95% CI)"]
    assert re.fullmatch(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", cell)
    assert table.loc["EHRMamba", "auroc"] == pytest.approx(results["EHRMamba"]["auroc"]["estimate"])
    assert table.loc["oracle", "F1 (95% CI)"] == "not thresholded" and np.isnan(table.loc["oracle", "f1"])
    assert {"auroc_lo", "auroc_hi", "flags"} <= set(table.columns)
