"""Shared fixtures: a hand-built MEDS timeline whose tokens can be written down by hand, and a tiny
project of notebooks for `repro run`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# Console scripts of test-only tools (meds-testing-helpers' build_sample_MEDS_dataset, aces-cli) live
# beside this interpreter; `make test` runs `.venv/bin/python -m pytest` without activating the venv.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")


def ts(s: str) -> int:
    """Microseconds since 1970 for an ISO timestamp."""
    return int(np.datetime64(s, "us").astype(np.int64))


def hand_events() -> pd.DataFrame:
    """Three subjects; subject 1 is the one the tests spell out token by token.

    Subject 1: two admissions 17 days apart, a lab outside any admission, diagnoses and DRG stamped
    at discharge, an in-hospital death in the second admission (both leakage traps present).
    """
    rows = [
        (1, None, "GENDER//F", None),
        (1, "2100-01-01T00:00", "MEDS_BIRTH", None),
        (1, "2150-01-01T08:00", "HOSPITAL_ADMISSION//EW EMER.//EMERGENCY ROOM", None),
        (1, "2150-01-01T09:00", "LAB//A//u", 1.0),
        (1, "2150-01-01T10:00", "MEDICATION//X//Administered//1", None),
        (1, "2150-01-01T12:00", "LAB//A//u", 3.0),
        (1, "2150-01-03T08:00", "DIAGNOSIS//ICD//10//I10", None),
        (1, "2150-01-03T08:00", "DRG//HCFA//100//X", None),
        (1, "2150-01-03T08:00", "HOSPITAL_DISCHARGE//HOME", None),
        (1, "2150-01-10T00:00", "LAB//A//u", 2.0),  # outside any admission: dropped and counted
        (1, "2150-01-20T08:00", "HOSPITAL_ADMISSION//URGENT//TRANSFER FROM HOSPITAL", None),
        (1, "2150-01-20T10:00", "LAB//A//u", 5.0),
        (1, "2150-01-21T12:00", "PROCEDURE//START//1", None),
        (1, "2150-01-21T14:00", "LAB//A//u", 2.0),
        (1, "2150-01-22T08:00", "DIAGNOSIS//ICD//10//N17", None),
        (1, "2150-01-22T08:00", "HOSPITAL_DISCHARGE//DIED", None),
        (1, "2150-01-22T08:00", "MEDS_DEATH", None),
        (2, "2090-06-01T00:00", "MEDS_BIRTH", None),
        (2, "2151-03-01T08:00", "HOSPITAL_ADMISSION//ELECTIVE//PHYSICIAN REFERRAL", None),
        (2, "2151-03-01T09:00", "LAB//A//u", 4.0),
        (2, "2151-03-01T10:00", "LAB//A//u", 6.0),
        (2, "2151-03-01T20:00", "HOSPITAL_DISCHARGE//HOME", None),
        (2, "2151-03-20T00:00", "MEDS_DEATH", None),  # out-of-hospital, date only, 19 days after discharge
        (3, "2080-01-01T00:00", "MEDS_BIRTH", None),
        (3, "2152-01-01T08:00", "HOSPITAL_ADMISSION//EW EMER.//EMERGENCY ROOM", None),
        (3, "2152-01-01T09:00", "LAB//A//u", 100.0),  # held-out extreme value: must not move train bins
        (3, "2152-01-01T10:00", "MEDICATION//NEVER_IN_TRAIN//Administered//9", None),
        (3, "2152-01-05T08:00", "HOSPITAL_DISCHARGE//HOME", None),
        (3, "2152-03-01T00:00", "MEDS_DEATH", None),  # 56 days after discharge: outside the 30-day window
    ]
    return pd.DataFrame(
        {
            "subject_id": np.array([r[0] for r in rows], dtype=np.int64),
            "time": np.array([-1 if r[1] is None else ts(r[1]) for r in rows], dtype=np.int64),
            "code": np.array([r[2] for r in rows], dtype=object),
            "numeric_value": np.array([np.nan if r[3] is None else r[3] for r in rows], dtype=np.float32),
        }
    )


HAND_SPLITS = {1: "train", 2: "train", 3: "held_out"}


def write_meds(root, events: pd.DataFrame, splits: dict[int, str], shard_of=None) -> None:
    """Write events as a MEDS directory (one shard unless `shard_of` maps subject -> shard name)."""
    (root / "data").mkdir(parents=True)
    (root / "metadata").mkdir()
    shard_of = shard_of or (lambda s: "0")
    for shard, df in events.groupby(events["subject_id"].map(shard_of), sort=True):
        t = df["time"].to_numpy()
        table = pa.table(
            {
                "subject_id": pa.array(df["subject_id"].to_numpy(), pa.int64()),
                "time": pa.array(np.where(t < 0, 0, t), pa.int64()).cast(pa.timestamp("us")).to_pylist(),
                "code": pa.array(df["code"].tolist(), pa.string()),
                "numeric_value": pa.array(
                    df["numeric_value"].to_numpy(),
                    pa.float32(),
                    mask=np.isnan(df["numeric_value"].to_numpy()),
                ),
            }
        )
        times = pa.array([None if x < 0 else int(x) for x in t], pa.int64()).cast(pa.timestamp("us"))
        table = table.set_column(1, "time", times)
        pq.write_table(table, root / "data" / f"{shard}.parquet")
    pq.write_table(
        pa.table(
            {
                "subject_id": pa.array(list(splits), pa.int64()),
                "split": pa.array(list(splits.values()), pa.string()),
            }
        ),
        root / "metadata" / "subject_splits.parquet",
    )


@pytest.fixture
def events() -> pd.DataFrame:
    return hand_events()


@pytest.fixture
def meds_dir(tmp_path):
    root = tmp_path / "meds"
    write_meds(root, hand_events(), HAND_SPLITS)
    return root


def tiny_run_project(root: Path, monkeypatch, notebooks: dict[str, str], params_yaml: str) -> Path:
    """A project `repro run` executes in seconds: each notebook a parameters cell then ``body``, the report
    files empty, ``params_yaml`` as tiny.yaml; the pipeline pointed at it, with no cohort to check."""
    from repro.report import pipeline

    (root / "notebooks").mkdir(parents=True)
    head = '# %% tags=["parameters"]\nparams_file = ""\nrun_dir = ""\ndata_dir = ""\n'
    for name, body in notebooks.items():
        (root / "notebooks" / f"{name}.py").write_text(head + "# %%\n" + body)
    for f in pipeline.REPORT_FILES:
        (root / f).write_text("")
    params = root / "tiny.yaml"
    params.write_text(params_yaml)
    monkeypatch.setattr(pipeline, "project_root", lambda: root)
    monkeypatch.setattr(pipeline, "_check_cohort", lambda params, data_dir: [])
    return params
