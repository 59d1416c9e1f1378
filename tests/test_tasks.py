"""Task labels: prediction times, windows without holes, LOS in hours, groups chosen on train only."""

from __future__ import annotations

import numpy as np
import pandas as pd
from conftest import hand_events, ts

from repro.config import CodePatterns
from repro.data.tasks import (
    LABEL_PREFIX,
    build_task,
    label_columns,
    los_1w,
    readmission_1m,
)

P = CodePatterns()
H = 3_600_000_000
D = 24 * H


def visits(rows):
    """Visits frame from (subject, admit_us, discharge_us)."""
    return pd.DataFrame(
        {
            "subject_id": np.array([r[0] for r in rows], np.int64),
            "admit": np.array([r[1] for r in rows], np.int64),
            "discharge": np.array([r[2] for r in rows], np.int64),
            "died_in_hospital": False,
            "visit_no": 0,
        }
    )


def test_readmission_window_has_no_hole():
    t0 = ts("2150-01-01")
    rows = []
    for sid, gap in enumerate([28.5 * D, 29.5 * D, 30 * D, 30 * D + 1]):
        rows += [(sid, t0, t0 + 2 * D), (sid, t0 + 2 * D + gap, t0 + 3 * D + gap)]
    got = readmission_1m(visits(rows), pd.Series(dtype=np.int64)).set_index("subject_id")
    assert got["label"].tolist() == [1, 1, 1, 0]
    assert (got["prediction_time"] == t0 + 2 * D).all()


def test_los_in_hours_not_tokens():
    t0 = ts("2150-01-01")
    rows = [(1, t0, t0 + 23 * H), (2, t0, t0 + 7 * D), (3, t0, t0 + 7 * D + 1), (4, t0, t0 + 30 * H)]
    got = los_1w(visits(rows), pd.Series(dtype=np.int64)).set_index("subject_id")
    assert 1 not in got.index  # shorter than 24 h: not in the cohort
    assert got["label"].to_dict() == {2: 0, 3: 1, 4: 0}
    assert (got["prediction_time"] == t0 + 24 * H).all()


def test_hand_built_readmission_and_los():
    ev = hand_events()
    r = build_task("readmission_1m", ev, P).set_index("subject_id")
    assert r["label"].to_dict() == {1: 1}  # 17 days after the first discharge
    assert r.loc[1, "prediction_time"] == ts("2150-01-03T08:00")
    los = build_task("los_1w", ev, P).set_index("subject_id")
    assert los["label"].to_dict() == {1: 0, 3: 0}


def test_conditions_groups_chosen_on_train_only():
    ev = hand_events()
    extra = pd.DataFrame(
        {
            "subject_id": [3],
            "time": [ts("2152-01-05T08:00")],
            "code": ["DIAGNOSIS//ICD//10//J449"],
            "numeric_value": np.array([np.nan], np.float32),
        }
    )
    ev = pd.concat([ev, extra]).sort_values(["subject_id", "time"], kind="stable").reset_index(drop=True)
    got = build_task("conditions", ev, P, train_subjects=np.array([1, 2]))
    assert label_columns(got) == [f"{LABEL_PREFIX}10//N17"]  # J44 appears only in held_out: not a target
    assert got.set_index("subject_id").loc[1, f"{LABEL_PREFIX}10//N17"] == 1
    assert got.set_index("subject_id").loc[1, "prediction_time"] == ts("2150-01-03T08:00")


def test_label_columns_binary():
    assert label_columns(build_task("mortality_1m", hand_events(), P)) == ["label"]
