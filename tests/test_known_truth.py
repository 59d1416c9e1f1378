"""The known-truth cohort's contracts (DESIGN.md section 4), on a large generated sample.

(a) No leak: a gradient-boosted model given every token count, timing features and the true probability
    does not beat the true probability's AUROC beyond its CI, on any task.
(b) Each mortality mechanism carries signal: switching it off in the generator lowers the oracle's AUROC.
(c) The null task's labels are independent of the history.
Plus: counts can read at most half of the oracle's lift on mortality_1m, and a model that reads order, values,
times and the whole history (six features read off the events) reaches the oracle.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from repro.config import CodePatterns
from repro.data.meds import load_meds, read_events
from repro.data.synthetic import (
    B0,
    IN_HOSPITAL_SHIFT,
    MECHANISMS,
    generate_subject,
    mechanism_logits,
    true_probabilities,
    write_synthetic_meds,
)
from repro.data.tasks import build_task
from repro.evaluation.truth import mortality_logit

pytestmark = pytest.mark.slow
N = 4000
US_PER_HOUR = 3_600_000_000


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = write_synthetic_meds(tmp_path_factory.mktemp("truth") / "meds", N, seed=21, shard_size=1000)
    ds = load_meds(root)
    events = read_events(ds)
    truth = pq.read_table(root / "truth" / "last_admission.parquet").to_pandas()
    return ds, _tokens(events), truth


def _tokens(events: pd.DataFrame) -> pd.DataFrame:
    """Events as the tokens a model reads: a lab carries its code's quintile of value; codes seen fewer than
    50 times (the per-stay DRG numbers, stamped at discharge) share one column, "rare"."""
    ev = events.copy()
    has = ev["numeric_value"].notna()
    q = ev[has].groupby("code")["numeric_value"].rank(pct=True).mul(5).clip(upper=4.999).astype(int)
    ev.loc[has, "code"] = ev.loc[has, "code"] + "//Q" + q.astype(str)
    counts = ev["code"].value_counts()
    ev.loc[ev["code"].map(counts).to_numpy() < 50, "code"] = "rare"
    return ev


def _features(events: pd.DataFrame, samples: pd.DataFrame) -> pd.DataFrame:
    """Every token's count strictly before each sample's prediction time, over the whole history and in the
    stay of the prediction, plus timing features."""
    ev = events.merge(samples[["subject_id", "prediction_time", "admit"]], on="subject_id")
    t = ev["time"].astype("int64")
    ev = ev[t < ev["prediction_time"]]
    t = ev["time"].astype("int64")
    counts = ev.groupby(["subject_id", "code"]).size().unstack(fill_value=0)
    in_stay = ev[t >= ev["admit"]]
    stay_counts = in_stay.groupby(["subject_id", "code"]).size().unstack(fill_value=0).add_prefix("stay:")
    timing = pd.DataFrame(
        {
            "events": ev.groupby("subject_id").size(),
            "events_in_stay": in_stay.groupby("subject_id").size(),
            "hours_seen_of_stay": (in_stay["time"].astype("int64") - in_stay["admit"])
            .groupby(in_stay["subject_id"])
            .max()
            / US_PER_HOUR,
            "admissions": ev[ev["code"].str.startswith("HOSPITAL_ADMISSION")].groupby("subject_id").size(),
            "history_days": (ev["prediction_time"] - t).groupby(ev["subject_id"]).max() / (24 * US_PER_HOUR),
        }
    )
    out = counts.join(stay_counts, how="outer").join(timing, how="outer")
    return out.reindex(samples["subject_id"]).fillna(0.0)


def _auroc_ci(y: np.ndarray, s: np.ndarray, n_boot: int = 400, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        if 0 < y[i].sum() < len(i):
            vals.append(roc_auc_score(y[i], s[i]))
    return float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))


TASKS = ["mortality_1m", "inhospital_mortality_24h", "los_1w", "readmission_1m", "null_task", "conditions"]


@pytest.mark.parametrize("task", TASKS)
def test_no_model_of_counts_and_timing_beats_the_truth(cohort, task):
    ds, events, truth = cohort
    probs = true_probabilities(truth)
    samples = build_task(task, events, CodePatterns(), train_subjects=ds.subjects("train"))
    ids = truth["subject_id"].to_numpy()
    if task == "conditions":  # two labels of different prevalence stand for the twenty
        cols = {"label::10//I10": probs["conditions"]["I10"], "label::10//E78": probs["conditions"]["E78"]}
    else:
        cols = {"label": probs[task]}
    x = _features(events, samples)
    half = np.arange(len(samples)) % 2 == 0
    for col, p in cols.items():
        y = samples[col].to_numpy()
        tp = pd.Series(p, index=ids).reindex(samples["subject_id"]).to_numpy()
        xx = x.assign(true_prob=tp).to_numpy()
        gbm = HistGradientBoostingClassifier(max_iter=150, learning_rate=0.05, random_state=0).fit(
            xx[half], y[half]
        )
        got = roc_auc_score(y[~half], gbm.predict_proba(xx[~half])[:, 1])
        truth_auc = roc_auc_score(y[~half], tp[~half])
        lo, hi = _auroc_ci(y[~half], tp[~half])
        assert got <= hi, (
            f"{task} {col}: counts + timing + truth reach {got:.3f} > the truth's {truth_auc:.3f} [{lo:.3f}, {hi:.3f}]"
        )


def _expected_auroc(p: np.ndarray, s: np.ndarray) -> float:
    """AUROC of scores s expected over labels drawn from p (no label noise in the comparison)."""
    order = np.argsort(s, kind="stable")
    p, s = p[order], s[order]
    neg_below = np.cumsum(1 - p) - (1 - p)  # expected negatives scored strictly below (no ties in s)
    num = float((p * neg_below).sum())
    den = float(p.sum() * (1 - p).sum() - (p * (1 - p)).sum())
    return num / den


def _mortality_p(logit: np.ndarray) -> np.ndarray:
    p_in = 1 / (1 + np.exp(-(logit + IN_HOSPITAL_SHIFT)))
    return p_in + (1 - p_in) / (1 + np.exp(-logit))


def test_switching_any_mechanism_off_lowers_the_ceiling(cohort):
    _, _, truth = cohort
    full = _mortality_p(B0 + mortality_logit(truth))
    base = _expected_auroc(full, full)
    for m in MECHANISMS:
        without = _mortality_p(B0 + mortality_logit(truth, without=m))
        assert _expected_auroc(without, without) < base - 0.002, m


def test_a_mechanism_switched_off_leaves_the_events_and_takes_out_its_term():
    for m in MECHANISMS:
        a_cols, a = generate_subject(5, 17)
        b_cols, b = generate_subject(5, 17, {m: 0.0})
        before = a_cols["time"] < a.discharge_us  # the outcome shows only from the last discharge on
        for col in ("time", "code", "numeric_value"):
            np.testing.assert_array_equal(a_cols[col][before], b_cols[col][b_cols["time"] < b.discharge_us])
        z_a = mechanism_logits(a.features, MECHANISMS)
        logit_b = np.log(b.p_post_30d / (1 - b.p_post_30d))
        assert logit_b == pytest.approx(B0 + sum(z_a.values()) - z_a[m], abs=1e-9)


def test_null_labels_are_independent_of_the_history(cohort):
    _, events, truth = cohort
    null = build_task("null_task", events, CodePatterns())
    assert abs(null["label"].mean() - 0.2) < 0.03
    p = pd.Series(true_probabilities(truth)["mortality_1m"], index=truth["subject_id"]).reindex(
        null["subject_id"]
    )
    y = null["label"].to_numpy()
    lo, hi = _auroc_ci(y, p.to_numpy())
    assert lo < 0.5 < hi


def test_counts_read_at_most_half_of_the_oracle_lift_on_mortality(cohort):
    ds, events, truth = cohort
    samples = build_task("mortality_1m", events, CodePatterns())
    x = np.log1p(_features(events, samples).to_numpy())
    y = samples["label"].to_numpy()
    half = np.arange(len(samples)) % 2 == 0
    lr = LogisticRegression(C=0.1, max_iter=3000).fit(x[half], y[half])
    counts = roc_auc_score(y[~half], lr.predict_proba(x[~half])[:, 1])
    p = pd.Series(true_probabilities(truth)["mortality_1m"], index=truth["subject_id"]).reindex(
        samples["subject_id"]
    )
    oracle = roc_auc_score(y[~half], p.to_numpy()[~half])
    assert counts - 0.5 <= 0.5 * (oracle - 0.5), (counts, oracle)


def _mechanism_features(events: pd.DataFrame, samples: pd.DataFrame) -> np.ndarray:
    """What a model that reads order, values, times and the whole history can see, read off the events."""
    ev = events.merge(samples[["subject_id", "admit", "prediction_time"]], on="subject_id")
    t = ev["time"].astype("int64")
    ev = ev[t < ev["prediction_time"]].assign(h=(t - ev["admit"]) / US_PER_HOUR)
    stay = ev[ev["h"] >= 0]

    def first(mask: pd.Series) -> pd.Series:
        return stay[mask].groupby("subject_id")["h"].min()

    code = stay["code"]
    t_k = first(code.str.startswith("LAB//50971//") & (stay["numeric_value"] >= 6.0))
    t_ins = first(code.str.startswith("MEDICATION//Insulin"))
    order = np.sign(t_k - t_ins).reindex(samples["subject_id"]).fillna(0.0)  # +1: insulin before
    cr = stay[code.str.startswith("LAB//50912//") & (stay["h"] < 21)]
    slope = cr.groupby("subject_id").apply(
        lambda g: np.polyfit(g["h"], g["numeric_value"], 1)[0], include_groups=False
    )
    delay = first(code.str.startswith("MEDICATION//Vancomycin")) - first(code.str.startswith("LAB//50813//"))
    war = (
        first(code.str.startswith("MEDICATION//Warfarin"))
        .notna()
        .reindex(samples["subject_id"], fill_value=False)
    )
    cip = (
        first(code.str.startswith("MEDICATION//Cipro"))
        .notna()
        .reindex(samples["subject_id"], fill_value=False)
    )
    adm = ev[ev["code"].str.startswith("HOSPITAL_ADMISSION") & (ev["h"] < 0) & (ev["h"] >= -365 * 24)]
    recent = adm.groupby("subject_id").size().reindex(samples["subject_id"], fill_value=0).clip(upper=5)
    furosemide = ev[ev["code"].str.startswith("MEDICATION//Furosemide")].groupby("subject_id").size() > 0
    cols = [
        order.to_numpy(),
        slope.reindex(samples["subject_id"]).fillna(0.0).to_numpy(),
        delay.reindex(samples["subject_id"]).fillna(7.0).to_numpy(),
        np.where(war.to_numpy() == cip.to_numpy(), 1.0, -1.0),
        recent.to_numpy(dtype=float),
        furosemide.reindex(samples["subject_id"], fill_value=False).to_numpy(dtype=float),
    ]
    return np.column_stack(cols)


def test_a_model_reading_order_values_times_and_history_reaches_the_oracle(cohort):
    _, events, truth = cohort
    samples = build_task("mortality_1m", events, CodePatterns())
    x = _mechanism_features(events, samples)
    y = samples["label"].to_numpy()
    half = np.arange(len(samples)) % 2 == 0
    lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x[half], y[half])
    score = lr.predict_proba(x[~half])[:, 1]
    p = pd.Series(true_probabilities(truth)["mortality_1m"], index=truth["subject_id"])
    p = p.reindex(samples["subject_id"]).to_numpy()[~half]
    # expected over label draws from the truth, so only the fit's own error separates the two
    got, ceiling = _expected_auroc(p, score), _expected_auroc(p, p)
    print(f"fitted on what the events show: {got:.3f}; the truth: {ceiling:.3f}")
    assert got >= ceiling - 0.02, (got, ceiling)
