"""Task labels: prediction times, windows without holes, LOS in hours, groups chosen on train only."""

from __future__ import annotations

import numpy as np
import pandas as pd
from conftest import hand_events, ts

from repro.config import CodePatterns
from repro.data.tasks import (
    CONDITION_TASKS,
    LABEL_PREFIX,
    build_task,
    label_columns,
    los_1w,
    mortality_1m,
    mortality_32d,
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


def test_paper_mortality_counts_deaths_up_to_32_days_after_the_last_discharge():
    t0 = ts("2150-01-01")
    rows = [(sid, t0, t0 + 2 * D) for sid in range(4)]
    deaths = pd.Series(
        {0: t0 + 2 * D + 29 * D, 1: t0 + 2 * D + 31 * D, 2: t0 + 2 * D + 32 * D, 3: t0 + 2 * D + 33 * D}
    )
    paper = mortality_32d(visits(rows), deaths).set_index("subject_id")
    ours = mortality_1m(visits(rows), deaths).set_index("subject_id")
    assert paper["label"].tolist() == [1, 1, 1, 0] and ours["label"].tolist() == [1, 0, 0, 0]
    assert (paper["prediction_time"] == t0 + 2 * D).all()  # the last event: the discharge


def _two_stays(sid: int, first_dx: str, last_dx: str, t0: int) -> list[tuple]:
    """A subject with a diagnosis stamped at each of two discharges."""
    return [
        (sid, t0, "HOSPITAL_ADMISSION//EW EMER.//EMERGENCY ROOM"),
        (sid, t0 + 2 * D, f"DIAGNOSIS//ICD//{first_dx}"),
        (sid, t0 + 2 * D, "HOSPITAL_DISCHARGE//HOME"),
        (sid, t0 + 40 * D, "HOSPITAL_ADMISSION//EW EMER.//EMERGENCY ROOM"),
        (sid, t0 + 43 * D, f"DIAGNOSIS//ICD//{last_dx}"),
        (sid, t0 + 43 * D, "HOSPITAL_DISCHARGE//HOME"),
    ]


def test_paper_condition_tasks_read_their_codes_in_the_last_admission_only():
    t0 = ts("2150-01-01")
    dx = {  # subject: (diagnosis of the first stay, of the last stay)
        1: ("10//K219", "10//I10"),  # essential hypertension (ICD-10)
        2: ("10//K219", "9//4019"),  # essential hypertension (ICD-9)
        3: ("10//K219", "10//I132"),  # hypertensive heart and kidney disease
        4: ("10//K219", "10//E871"),  # hyposmolality: fluid / electrolyte
        5: ("10//K219", "9//2761"),  # the same in ICD-9
        6: ("10//K219", "10//E785"),  # hyperlipidaemia
        7: ("10//K219", "9//2724"),  # the same in ICD-9
        8: ("10//I10", "10//K219"),  # hypertension in the first stay only: not a positive
        9: ("10//K219", "10//I20"),  # angina: none of the three
    }
    rows = [r for sid, (a, b) in dx.items() for r in _two_stays(sid, a, b, t0)]
    ev = pd.DataFrame(
        {
            "subject_id": np.array([r[0] for r in rows], np.int64),
            "time": np.array([r[1] for r in rows], np.int64),
            "code": [r[2] for r in rows],
            "numeric_value": np.full(len(rows), np.nan, np.float32),
        }
    )
    got = {name: build_task(name, ev, P).set_index("subject_id") for name in CONDITION_TASKS}
    positives = {name: sorted(g.index[g["label"] == 1]) for name, g in got.items()}
    assert positives == {
        "condition_hypertension": [1, 2, 3],
        "condition_fluid_electrolyte": [4, 5],
        "condition_lipoid": [6, 7],
    }
    for g in got.values():  # predicted at the first discharge: the stay holding the diagnosis is not input
        assert (g["prediction_time"] == t0 + 2 * D).all() and len(g) == len(dx)
