"""Task labels with explicit prediction times (DESIGN.md section 5).

Inputs for a prediction use only events strictly before its prediction time, and never death or
discharge-disposition codes (see `repro.data.tokenizer`). Prediction times here are therefore
exclusive: a discharge-time prediction sees nothing stamped at discharge (ICD codes, DRG, the
disposition), which is where MIMIC-IV MEDS puts its leakage traps.

One sample per subject, at the subject's last admission: the cohort is chosen without looking at the
outcome, and the patient-clustered bootstrap then clusters trivially.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from repro.config import CONDITION_TASKS, CodePatterns
from repro.data.meds import CODE, SUBJECT, TIME

US_PER_HOUR = 3_600_000_000
US_PER_DAY = 24 * US_PER_HOUR


def _match(codes: pd.Series, pattern: str) -> np.ndarray:
    return codes.str.contains(re.compile(pattern), na=False).to_numpy()


def find_visits(events: pd.DataFrame, patterns: CodePatterns) -> pd.DataFrame:
    """Hospital admissions: each visit-start code paired with the next visit-end code of that subject.

    Returns subject_id, admit, discharge (int64 us), died_in_hospital, visit_no (0-based per subject).
    A start with no end before the next start is dropped (an unclosed stay cannot be tokenized).
    """
    timed = events[events[TIME] >= 0]
    is_start = _match(timed[CODE], patterns.visit_start)
    is_end = _match(timed[CODE], patterns.visit_end)
    starts = timed.loc[is_start, [SUBJECT, TIME]].rename(columns={TIME: "admit"})
    ends = timed.loc[is_end, [SUBJECT, TIME, CODE]].rename(columns={TIME: "discharge"})
    ends["died_in_hospital"] = _match(ends[CODE], patterns.died_in_hospital)
    if starts.empty or ends.empty:
        return pd.DataFrame(
            {
                SUBJECT: pd.Series(dtype=np.int64),
                "admit": pd.Series(dtype=np.int64),
                "discharge": pd.Series(dtype=np.int64),
                "died_in_hospital": pd.Series(dtype=bool),
                "visit_no": pd.Series(dtype=np.int64),
            }
        )
    starts = starts.sort_values("admit", kind="stable")
    ends = ends.sort_values("discharge", kind="stable")
    v = pd.merge_asof(
        starts,
        ends[[SUBJECT, "discharge", "died_in_hospital"]],
        left_on="admit",
        right_on="discharge",
        by=SUBJECT,
        direction="forward",
    )
    v = v.sort_values([SUBJECT, "admit"], kind="stable").reset_index(drop=True)
    next_admit = v.groupby(SUBJECT)["admit"].shift(-1)
    ok = v["discharge"].notna() & (next_admit.isna() | (v["discharge"] <= next_admit))
    v = v[ok].copy()
    v["discharge"] = v["discharge"].astype(np.int64)
    v["died_in_hospital"] = v["died_in_hospital"].astype(bool)
    v["visit_no"] = v.groupby(SUBJECT).cumcount().astype(np.int64)
    return v.reset_index(drop=True)


def death_times(events: pd.DataFrame, patterns: CodePatterns) -> pd.Series:
    """Earliest death time per subject (int64 us), from the death code pattern."""
    d = events[_match(events[CODE], patterns.death) & (events[TIME] >= 0)]
    return d.groupby(SUBJECT)[TIME].min()


def _last_visits(visits: pd.DataFrame) -> pd.DataFrame:
    return visits.groupby(SUBJECT, sort=True).tail(1).reset_index(drop=True)


def mortality_1m(visits: pd.DataFrame, deaths: pd.Series, days: int = 30) -> pd.DataFrame:
    """Death in the last admission or within `days` (30) days after its discharge; predicted at discharge.

    Out-of-hospital deaths in MIMIC-IV carry a date only (00:00), so a death dated on the admission
    day still counts; the window is [admit day start, discharge + `days` days], with no hole.
    """
    last = _last_visits(visits)
    death = last[SUBJECT].map(deaths)
    admit_day = last["admit"] - last["admit"] % US_PER_DAY
    in_window = death.notna() & (death >= admit_day) & (death <= last["discharge"] + days * US_PER_DAY)
    label = last["died_in_hospital"] | in_window
    return pd.DataFrame(
        {
            SUBJECT: last[SUBJECT].to_numpy(),
            "prediction_time": last["discharge"].to_numpy(),
            "admit": last["admit"].to_numpy(),
            "discharge": last["discharge"].to_numpy(),
            "label": label.to_numpy().astype(np.int64),
        }
    )


def mortality_32d(visits: pd.DataFrame, deaths: pd.Series) -> pd.DataFrame:
    """The paper's mortality: death within 32 days after the last event of the history, which here is the
    last admission's discharge (death in that stay counts); predicted at that discharge."""
    return mortality_1m(visits, deaths, days=32)


def inhospital_mortality_24h(visits: pd.DataFrame, deaths: pd.Series) -> pd.DataFrame:
    """Death before discharge of the last admission, for stays of >= 24 h; predicted 24 h after admission."""
    last = _last_visits(visits)
    last = last[(last["discharge"] - last["admit"]) >= 24 * US_PER_HOUR].reset_index(drop=True)
    death = last[SUBJECT].map(deaths)
    in_stay = death.notna() & (death >= last["admit"]) & (death <= last["discharge"])
    label = last["died_in_hospital"] | in_stay
    return pd.DataFrame(
        {
            SUBJECT: last[SUBJECT].to_numpy(),
            "prediction_time": (last["admit"] + 24 * US_PER_HOUR).to_numpy(),
            "admit": last["admit"].to_numpy(),
            "discharge": last["discharge"].to_numpy(),
            "label": label.to_numpy().astype(np.int64),
        }
    )


def los_1w(visits: pd.DataFrame, deaths: pd.Series) -> pd.DataFrame:
    """Stay longer than 7 days (measured in hours, not tokens), last admission of >= 24 h; predicted at 24 h.

    The original EHRMamba code measured length of stay in tokens (DESIGN.md section 11).
    """
    last = _last_visits(visits)
    stay_h = (last["discharge"] - last["admit"]) / US_PER_HOUR
    last = last[stay_h >= 24].reset_index(drop=True)
    stay_h = (last["discharge"] - last["admit"]) / US_PER_HOUR
    return pd.DataFrame(
        {
            SUBJECT: last[SUBJECT].to_numpy(),
            "prediction_time": (last["admit"] + 24 * US_PER_HOUR).to_numpy(),
            "admit": last["admit"].to_numpy(),
            "discharge": last["discharge"].to_numpy(),
            "label": (stay_h > 7 * 24).to_numpy().astype(np.int64),
        }
    )


NULL_RATE = 0.2  # P(label 1) of the null task
_NULL_SALT = np.uint64(0x5EED_0F_4E11)


def hash_unit(subject_ids, salt: int) -> np.ndarray:
    """A uniform number in [0, 1) per subject id, a fixed hash (splitmix64's finaliser) of the id and `salt`:
    the same on any data and independent of every event and of which other subjects are present."""
    x = np.asarray(subject_ids, dtype=np.int64).astype(np.uint64) ^ np.uint64(salt)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / 2.0**53


def null_labels(subject_ids) -> np.ndarray:
    """Labels drawn independently of every event: a hash of the subject id below NULL_RATE.

    The same on any data (MIMIC-IV included), and no model sees subject ids, so the true AUROC is 0.5.

    >>> null_labels(np.arange(10_000)).mean().round(2)
    np.float64(0.2)
    """
    return (hash_unit(subject_ids, int(_NULL_SALT)) < NULL_RATE).astype(np.int64)


def null_task(visits: pd.DataFrame, deaths: pd.Series) -> pd.DataFrame:
    """mortality_1m's samples (last admission, predicted at discharge) with labels independent of the history.

    The run's live false-positive check: every comparison on it should come out inconclusive.
    """
    last = _last_visits(visits)
    return pd.DataFrame(
        {
            SUBJECT: last[SUBJECT].to_numpy(),
            "prediction_time": last["discharge"].to_numpy(),
            "admit": last["admit"].to_numpy(),
            "discharge": last["discharge"].to_numpy(),
            "label": null_labels(last[SUBJECT].to_numpy()),
        }
    )


def _second_to_last(visits: pd.DataFrame) -> pd.DataFrame:
    """Each subject's second-to-last admission, with the next admission's start."""
    v = visits.copy()
    v["next_admit"] = v.groupby(SUBJECT)["admit"].shift(-1)
    n = v.groupby(SUBJECT)["admit"].transform("size")
    rank = v.groupby(SUBJECT).cumcount()
    return v[(n >= 2) & (rank == n - 2)].reset_index(drop=True)


def readmission_1m(visits: pd.DataFrame, deaths: pd.Series) -> pd.DataFrame:
    """Next admission within 30 days of the second-to-last discharge; predicted at that discharge.

    The window is (discharge, discharge + 30 days], in microseconds: no 28-29 day hole.
    """
    prev = _second_to_last(visits)
    gap = prev["next_admit"] - prev["discharge"]
    return pd.DataFrame(
        {
            SUBJECT: prev[SUBJECT].to_numpy(),
            "prediction_time": prev["discharge"].to_numpy(),
            "admit": prev["admit"].to_numpy(),
            "discharge": prev["discharge"].to_numpy(),
            "label": (gap <= 30 * US_PER_DAY).to_numpy().astype(np.int64),
        }
    )


def condition_groups(events: pd.DataFrame, visits: pd.DataFrame, patterns: CodePatterns) -> pd.DataFrame:
    """Diagnosis groups (the pattern's capture group) recorded in each subject's last admission."""
    last = _last_visits(visits)[[SUBJECT, "admit", "discharge"]]
    groups = events[CODE].str.extract(re.compile(patterns.diagnosis_group), expand=False)
    dx = events.loc[groups.notna(), [SUBJECT, TIME]].assign(group=groups[groups.notna()])
    dx = dx.merge(last, on=SUBJECT)
    dx = dx[(dx[TIME] >= dx["admit"]) & (dx[TIME] <= dx["discharge"])]
    return dx[[SUBJECT, "group"]].drop_duplicates()


def conditions(
    visits: pd.DataFrame,
    deaths: pd.Series,
    events: pd.DataFrame,
    patterns: CodePatterns,
    train_subjects: np.ndarray,
    n_groups: int = 20,
) -> pd.DataFrame:
    """Multi-hot of the `n_groups` most frequent diagnosis groups (chosen on train) in the last admission,
    predicted at the discharge of the second-to-last admission. Columns `label::<group>`.
    """
    prev = _second_to_last(visits)
    present = condition_groups(events, visits, patterns)
    train_present = present[present[SUBJECT].isin(set(int(s) for s in train_subjects))]
    counts = train_present["group"].value_counts()
    chosen = sorted(counts.index[:n_groups], key=lambda g: (-counts[g], g))
    out = pd.DataFrame(
        {
            SUBJECT: prev[SUBJECT].to_numpy(),
            "prediction_time": prev["discharge"].to_numpy(),
            "admit": prev["admit"].to_numpy(),
            "discharge": prev["discharge"].to_numpy(),
        }
    )
    hit = set(zip(present[SUBJECT].astype(int), present["group"]))
    for g in chosen:
        out[f"{LABEL_PREFIX}{g}"] = [int((int(s), g) in hit) for s in out[SUBJECT]]
    return out


LABEL_PREFIX = "label::"


def condition_task(base: pd.DataFrame, present: pd.DataFrame, pattern: str) -> pd.DataFrame:
    """One of the paper's condition tasks: a diagnosis group matching `pattern` (a `CodePatterns.condition_*`)
    recorded in the last admission; the samples and prediction time of `conditions` (the second-to-last
    discharge, so the admission that holds the diagnosis is not in the input).

    `base`: readmission_1m's rows without the label; `present`: `condition_groups`.
    """
    rx = re.compile(pattern)
    hit = present.loc[present["group"].map(lambda g: rx.search(g) is not None), SUBJECT].unique()
    return base.assign(label=np.isin(base[SUBJECT].to_numpy(), hit).astype(np.int64))


def label_columns(df: pd.DataFrame) -> list[str]:
    """The label column(s) of a task frame: ["label"] for binary tasks, ["label::<group>", ...] for conditions."""
    multi = [c for c in df.columns if c.startswith(LABEL_PREFIX)]
    return multi or ["label"]


TASKS = {
    "mortality_1m": mortality_1m,
    "inhospital_mortality_24h": inhospital_mortality_24h,
    "los_1w": los_1w,
    "readmission_1m": readmission_1m,
    "null_task": null_task,
    "mortality_32d": mortality_32d,
}


def build_task(
    name: str,
    events: pd.DataFrame,
    patterns: CodePatterns,
    visits: pd.DataFrame | None = None,
    train_subjects: np.ndarray | None = None,
) -> pd.DataFrame:
    """Labels of task `name`: subject_id, prediction_time (exclusive, int64 us), admit, discharge, label(s).

    `conditions` needs `train_subjects`: its groups are chosen on the train split only.
    """
    known = [*TASKS, "conditions", *CONDITION_TASKS]
    if name not in known:
        raise ValueError(f"unknown task {name!r}; known: {sorted(known)}")
    if visits is None:
        visits = find_visits(events, patterns)
    deaths = death_times(events, patterns)
    if name in CONDITION_TASKS:
        base = readmission_1m(visits, deaths).drop(columns="label")
        return condition_task(base, condition_groups(events, visits, patterns), getattr(patterns, name))
    if name == "conditions":
        if train_subjects is None:
            raise ValueError("task conditions: train_subjects is required (groups are chosen on train)")
        return conditions(visits, deaths, events, patterns, train_subjects)
    return TASKS[name](visits, deaths)
