"""The synthetic cohort: valid MEDS, deterministic, planted prevalence, truth consistent with task labels."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from repro.config import CodePatterns
from repro.data.meds import load_meds, read_events
from repro.data.synthetic import GENERATOR_VERSION, generate_subject, true_probabilities, write_synthetic_meds
from repro.data.tasks import build_task


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "meds"
    write_synthetic_meds(root, 1500, seed=3, shard_size=400)
    return root


def _digest(root):
    h = hashlib.sha256()
    for p in sorted((root / "data").rglob("*.parquet")):
        h.update(pq.read_table(p).to_pandas().to_csv().encode())
    return h.hexdigest()


def test_valid_meds_and_one_subject_per_shard(cohort):
    ds = load_meds(cohort)
    ev = read_events(ds)  # validates order, contiguity and one shard per subject
    assert ev["subject_id"].nunique() == 1500
    assert set(ds.splits["split"]) == {"train", "tuning", "held_out"}


def test_deterministic(tmp_path):
    a = write_synthetic_meds(tmp_path / "a", 60, seed=11, shard_size=25)
    b = write_synthetic_meds(tmp_path / "b", 60, seed=11, shard_size=25)
    assert _digest(a) == _digest(b)
    c1, _ = generate_subject(11, 5)
    c2, _ = generate_subject(11, 5)
    np.testing.assert_array_equal(c1["time"], c2["time"])


def test_same_time_events_carry_no_order(cohort):
    """Lab panels are written creatinine first; after the generator, a panel's order says nothing."""
    ev = read_events(load_meds(cohort))
    labs = ev[ev["code"].str.startswith("LAB//")]
    panels = labs.groupby(["subject_id", "time"])["code"]
    size, first = panels.size(), panels.first()
    has_creatinine = panels.agg(lambda c: "LAB//50912//mg/dL" in set(c))
    keep = size >= 2
    creatinine_first = (first[keep] == "LAB//50912//mg/dL").mean()
    expected = (has_creatinine[keep] / size[keep]).mean()  # chance: one of the panel's codes comes first
    assert keep.sum() > 1000
    assert abs(creatinine_first - expected) < 0.05, (creatinine_first, expected)


# The first 20 subjects of seed 7, per generator version: data that change without a new version would be
# mixed with cohorts cached under the old one (outputs/.cache is keyed by the version).
DIGESTS = {6: "8ce2799456d8fa43"}


def test_generator_version_names_its_data():
    h = hashlib.sha256()
    for i in range(20):
        cols, _ = generate_subject(7, i)
        for k in ("time", "code", "numeric_value"):
            h.update(np.asarray(cols[k]).astype(str).tobytes())
    assert h.hexdigest()[:16] == DIGESTS.get(GENERATOR_VERSION), (
        "the generated data changed: bump GENERATOR_VERSION"
    )


def test_refuses_to_overwrite(tmp_path):
    write_synthetic_meds(tmp_path / "a", 20, seed=1)
    with pytest.raises(FileExistsError):
        write_synthetic_meds(tmp_path / "a", 20, seed=1)


def test_prevalence_and_truth_match_labels(cohort):
    ev = read_events(load_meds(cohort))
    truth = pq.read_table(cohort / "truth" / "last_admission.parquet").to_pandas()
    probs = true_probabilities(truth)
    labels = build_task("mortality_1m", ev, CodePatterns()).set_index("subject_id")
    assert 0.07 < labels["label"].mean() < 0.14  # about 10 %
    assert 0.07 < probs["mortality_1m"].mean() < 0.14
    # The task code recovers the generator's last admission, and labels follow the true probability.
    t = truth.set_index("subject_id")
    assert (labels["prediction_time"] == t["discharge_time"].astype("int64").reindex(labels.index)).all()
    p = np.asarray(probs["mortality_1m"])
    y = labels["label"].reindex(truth["subject_id"]).to_numpy()
    assert y[p > np.quantile(p, 0.8)].mean() > 2 * y[p < np.quantile(p, 0.5)].mean()


def test_long_tailed_histories(cohort):
    ev = read_events(load_meds(cohort))
    per_subject = ev.groupby("subject_id").size()
    assert per_subject.max() > 10 * per_subject.median()


def test_leakage_traps_present(cohort):
    ev = read_events(load_meds(cohort))
    codes = set(ev["code"])
    assert "HOSPITAL_DISCHARGE//DIED" in codes and "MEDS_DEATH" in codes
    assert any(c.startswith("DIAGNOSIS//ICD//10//") for c in codes)
    deaths = ev[ev["code"] == "MEDS_DEATH"]
    assert (deaths["time"] % 86_400_000_000 == 0).any()  # out-of-hospital: date only


def test_truth_of_the_other_tasks_matches_their_labels(cohort):
    ds = load_meds(cohort)
    ev = read_events(ds)
    truth = pq.read_table(cohort / "truth" / "last_admission.parquet").to_pandas().set_index("subject_id")
    probs = {k: v for k, v in true_probabilities(truth.reset_index()).items() if k != "conditions"}
    p = pd.DataFrame(probs, index=truth.index)
    readm = build_task("readmission_1m", ev, CodePatterns()).set_index("subject_id")
    # The task's prediction time is the generator's previous discharge, and only multi-admission subjects have it.
    prev = truth["previous_discharge_time"].dropna().astype("int64")
    assert (readm["prediction_time"] == prev.reindex(readm.index)).all()
    for task in ("readmission_1m", "los_1w"):
        lab = build_task(task, ev, CodePatterns()).set_index("subject_id")["label"]
        q = p.loc[lab.index, task]
        assert abs(lab.mean() - q.mean()) < 0.04, task  # calibrated on average
        assert lab[q > q.quantile(0.75)].mean() > 1.5 * lab[q < q.quantile(0.25)].mean(), task
    cond = build_task("conditions", ev, CodePatterns(), train_subjects=ds.subjects("train")).set_index(
        "subject_id"
    )
    tp = true_probabilities(truth.reset_index())["conditions"]["I50"]
    hf = cond["label::10//I50"]
    q = pd.Series(tp, index=truth.index).reindex(hf.index)
    assert abs(hf.mean() - q.mean()) < 0.04


def test_truth_of_the_paper_tasks_matches_their_labels(cohort):
    ev = read_events(load_meds(cohort))
    truth = pq.read_table(cohort / "truth" / "last_admission.parquet").to_pandas()
    probs = true_probabilities(truth)
    assert np.array_equal(probs["mortality_32d"], probs["mortality_1m"])  # no death 31-32 days after
    for task, group in (
        ("condition_hypertension", "I10"),
        ("condition_fluid_electrolyte", "E87"),
        ("condition_lipoid", "E78"),
    ):
        # the generator's one group in each category: the task's truth is that group's
        assert np.allclose(probs[task], probs["conditions"][group]), task
        lab = build_task(task, ev, CodePatterns()).set_index("subject_id")["label"]
        q = pd.Series(probs[task], index=truth["subject_id"]).reindex(lab.index)
        assert abs(lab.mean() - q.mean()) < 0.04, task  # calibrated on average
        assert lab[q > q.median()].mean() > 2 * lab[q <= q.median()].mean(), task


def test_cohort_cache_is_keyed_by_its_splits(tmp_path, monkeypatch):
    """The splits are written into the cohort, so params with other split fractions must not reuse it
    (they once did: a 60 / 10 / 30 default trained on the cached 80 / 10 / 10 cohort), and a folder written
    before the key held the splits is refused, not reused."""
    import shutil
    from pathlib import Path

    import meds

    from repro.config import ParamsError, load_params
    from repro.training.prepare import ensure_meds, synthetic_dir

    smoke = Path(__file__).resolve().parents[1] / "params" / "smoke.yaml"
    monkeypatch.chdir(tmp_path)  # outputs/.cache under tmp_path
    base = {"data.n_subjects": 60, "data.shard_size": 30}
    even = load_params(smoke, base | {"data.split_fractions": [0.8, 0.1, 0.1]})
    other = load_params(smoke, base | {"data.split_fractions": [0.6, 0.1, 0.3]})
    assert "-split" not in synthetic_dir(even).name  # the default keeps its plain name
    first = ensure_meds(even)
    second = ensure_meds(other)
    assert second != first
    splits = pd.read_parquet(second / meds.subject_splits_filepath)["split"].value_counts()
    assert (splits["train"], splits["tuning"], splits["held_out"]) == (36, 6, 18)
    shutil.rmtree(first)  # a stale folder: the plain name, other splits
    shutil.copytree(second, first)
    with pytest.raises(ParamsError, match="split"):
        ensure_meds(even)
    with pytest.raises(ParamsError, match="split_fractions"):
        load_params(smoke, base | {"data.split_fractions": [1.2, -0.1, -0.1]})


def test_two_processes_write_one_cohort_once(tmp_path, monkeypatch):
    """Two runs starting on one empty cache (a notebook beside `repro run`, parallel trials) once raced: the
    slower one's rename failed with "Directory not empty". Now the second waits and reads the first's."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    import repro.training.prepare as prepare_mod
    from repro.config import load_params

    smoke = Path(__file__).resolve().parents[1] / "params" / "smoke.yaml"
    monkeypatch.chdir(tmp_path)
    params = load_params(smoke, {"data.n_subjects": 40, "data.shard_size": 20})
    calls, real = [], prepare_mod.write_synthetic_meds
    lock = threading.Lock()

    def slow_write(*args, **kwargs):
        with lock:
            calls.append(args[0])
        time.sleep(0.5)  # both would be inside the write at once without the lock
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_mod, "write_synthetic_meds", slow_write)
    with ThreadPoolExecutor(2) as pool:
        roots = list(pool.map(lambda _: prepare_mod.ensure_meds(params), range(2)))
    assert roots[0] == roots[1] and len(calls) == 1
