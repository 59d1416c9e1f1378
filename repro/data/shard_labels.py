"""One MEDS shard's visits and task labels, computed on dictionary-encoded codes: each regular expression
runs once per distinct code, and visits and labels are numpy operations over the shard's events."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from repro.data.meds import (
    SUBJECT,
    TIME,
    ShardArrays,
)
from repro.data.tasks import CONDITION_TASKS, LABEL_PREFIX, TASKS, condition_task, conditions
from repro.data.tokenizer import Tokenizer

N_CONDITION_GROUPS = inspect.signature(conditions).parameters["n_groups"].default


@dataclass
class CodeTable:
    """What each distinct code of a shard means, from the run's code patterns (one regex pass per code)."""

    types: np.ndarray  # int8 token type
    start: np.ndarray  # bool: opens a visit
    end: np.ndarray  # bool: closes a visit
    died: np.ndarray  # bool: discharge disposition "died"
    death: np.ndarray  # bool
    birth: np.ndarray  # bool
    group: np.ndarray  # object: diagnosis group (the pattern's capture group) or None
    condition_patterns: dict[str, str]  # the paper's condition tasks: task -> pattern over groups


def code_table(dictionary: list[str], tok: Tokenizer) -> CodeTable:
    """Classify a shard's distinct codes with the tokenizer's family patterns and the visit/death patterns.

    Matching is `re.search`, as pandas' `str.contains` / `str.extract` in `repro.data.tasks`.
    """
    p = tok.patterns

    def flags(pattern: str) -> np.ndarray:
        rx = re.compile(pattern)
        return np.fromiter((rx.search(c) is not None for c in dictionary), dtype=bool, count=len(dictionary))

    grx = re.compile(p.diagnosis_group)
    groups = []
    for c in dictionary:
        m = grx.search(c)
        groups.append(m.group(1) if m is not None else None)
    return CodeTable(
        types=tok.code_types(dictionary),
        start=flags(p.visit_start),
        end=flags(p.visit_end),
        died=flags(p.died_in_hospital),
        death=flags(p.death),
        birth=flags(p.birth),
        group=np.array(groups, dtype=object),
        condition_patterns={name: getattr(p, name) for name in CONDITION_TASKS},
    )


@dataclass
class ShardVisits:
    """Kept visits of a shard in row order (subjects contiguous, visits by admission time)."""

    rows: np.ndarray  # row of each visit's admission code (ascending)
    subject: np.ndarray
    admit: np.ndarray
    discharge: np.ndarray
    died: np.ndarray
    visit_no: np.ndarray

    def frame(self) -> pd.DataFrame:
        """The visits as `repro.data.tasks.find_visits` returns them (sorted by subject, then admission)."""
        order = np.argsort(self.subject, kind="stable")
        return pd.DataFrame(
            {
                SUBJECT: self.subject[order].astype(np.int64),
                "admit": self.admit[order].astype(np.int64),
                "discharge": self.discharge[order].astype(np.int64),
                "died_in_hospital": self.died[order].astype(bool),
                "visit_no": self.visit_no[order].astype(np.int64),
            }
        )


def _group_starts(sh: ShardArrays) -> np.ndarray:
    """First row of each run of equal (subject, time); rows are sorted by time within a subject."""
    n = len(sh)
    if n == 0:
        return np.zeros(0, np.int64)
    new = np.empty(n, dtype=bool)
    new[0] = True
    np.not_equal(sh.subject_id[1:], sh.subject_id[:-1], out=new[1:])
    new[1:] |= sh.time[1:] != sh.time[:-1]
    return np.flatnonzero(new)


def shard_subjects(sh: ShardArrays) -> np.ndarray:
    """Sorted subject ids of a shard (subjects are contiguous, so one id per block is read)."""
    sid = sh.subject_id
    if len(sid) == 0:
        return np.zeros(0, np.int64)
    first = np.ones(len(sid), dtype=bool)
    first[1:] = sid[1:] != sid[:-1]
    return np.sort(sid[first])


def _run_position(keys: np.ndarray) -> np.ndarray:
    """0-based position of each element within its run of equal consecutive keys (groupby cumcount)."""
    n = len(keys)
    if n == 0:
        return np.zeros(0, np.int64)
    first = np.empty(n, dtype=bool)
    first[0] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    idx = np.arange(n)
    return idx - np.maximum.accumulate(np.where(first, idx, 0))


def shard_visits(sh: ShardArrays, ct: CodeTable, starts: np.ndarray) -> ShardVisits:
    """Hospital admissions, exactly as `find_visits`: each start paired with the first end at or after its
    time (same subject); a start whose end falls after the next start is dropped.
    """
    sid, t, code = sh.subject_id, sh.time, sh.code
    timed = t >= 0
    s_rows = np.flatnonzero(timed & ct.start[code])
    e_rows = np.flatnonzero(timed & ct.end[code])
    if len(s_rows) == 0 or len(e_rows) == 0:
        z = np.zeros(0, np.int64)
        return ShardVisits(z, z, z, z, np.zeros(0, bool), z)
    # The first row of the start's (subject, time) run: an end at the same time but an earlier row counts.
    first = starts[np.searchsorted(starts, s_rows, side="right") - 1]
    j = np.searchsorted(e_rows, first, side="left")
    has = j < len(e_rows)
    e = e_rows[np.minimum(j, len(e_rows) - 1)]
    has &= sid[e] == sid[s_rows]
    discharge = t[e]
    same_next = np.zeros(len(s_rows), dtype=bool)
    same_next[:-1] = sid[s_rows[1:]] == sid[s_rows[:-1]]
    next_admit = np.zeros(len(s_rows), dtype=np.int64)
    next_admit[:-1] = t[s_rows[1:]]
    ok = has & (~same_next | (discharge <= next_admit))
    rows = s_rows[ok]
    subject = sid[rows]
    return ShardVisits(
        rows=rows,
        subject=subject,
        admit=t[rows],
        discharge=discharge[ok],
        died=ct.died[code[e[ok]]],
        visit_no=_run_position(subject),
    )


def _first_time_per_subject(sh: ShardArrays, flag: np.ndarray) -> pd.Series:
    """Earliest timed row per subject among rows whose code is flagged (as `death_times`)."""
    rows = np.flatnonzero((sh.time >= 0) & flag[sh.code])
    df = pd.DataFrame({SUBJECT: sh.subject_id[rows], TIME: sh.time[rows]})
    return df.groupby(SUBJECT)[TIME].min()


@dataclass
class ShardLabels:
    """Task rows of one shard; `conditions` waits for its groups, chosen on train over all shards."""

    frames: dict[str, pd.DataFrame]
    conditions_base: pd.DataFrame | None  # subject_id, prediction_time, admit, discharge
    present: pd.DataFrame | None  # subject_id, group: diagnosis groups in each subject's last admission
    n_visits: pd.Series


def label_shard(sh: ShardArrays, ct: CodeTable, v: ShardVisits, tasks: list[str]) -> ShardLabels:
    """`build_task` for each task on one shard's subjects (identical rows, since tasks are per subject)."""
    visits = v.frame()
    deaths = _first_time_per_subject(sh, ct.death)
    frames = {name: TASKS[name](visits, deaths) for name in tasks if name in TASKS}
    base = present = None
    if "conditions" in tasks or set(tasks) & set(CONDITION_TASKS):
        # The same samples as readmission_1m: predicted at the second-to-last discharge.
        base = TASKS["readmission_1m"](visits, deaths).drop(columns="label")
        present = _present_groups(sh, ct, v)
        # one shard holds every event of its subjects, so the paper's condition tasks are labelled here
        for name in set(tasks) & set(CONDITION_TASKS):
            frames[name] = condition_task(base, present, ct.condition_patterns[name])
    return ShardLabels(frames, base, present, visits.groupby(SUBJECT).size())


def _present_groups(sh: ShardArrays, ct: CodeTable, v: ShardVisits) -> pd.DataFrame:
    """As `repro.data.tasks.condition_groups`: (subject, group) pairs inside the subject's last admission."""
    has_group = np.fromiter((g is not None for g in ct.group), dtype=bool, count=len(ct.group))
    rows = np.flatnonzero(has_group[sh.code])
    if len(v.subject):
        last = np.ones(len(v.subject), dtype=bool)
        last[:-1] = v.subject[1:] != v.subject[:-1]
        ls, la, ld = v.subject[last], v.admit[last], v.discharge[last]
        order = np.argsort(ls)
        ls, la, ld = ls[order], la[order], ld[order]
        sid = sh.subject_id[rows]
        k = np.minimum(np.searchsorted(ls, sid), len(ls) - 1)
        t = sh.time[rows]
        inside = (ls[k] == sid) & (t >= la[k]) & (t <= ld[k])
        rows = rows[inside]
    else:
        rows = rows[:0]
    df = pd.DataFrame({SUBJECT: sh.subject_id[rows], "group": pd.Series(list(ct.group[sh.code[rows]]))})
    return df.drop_duplicates().reset_index(drop=True)


def finish_labels(
    parts: list[ShardLabels], tasks: list[str], train_ids: np.ndarray
) -> dict[str, pd.DataFrame]:
    """Concatenate shards' task rows (sorted by subject, as `build_task`) and label `conditions`.

    The `conditions` groups are the 20 most frequent among train subjects' last admissions, counted
    over all shards in shard order, exactly as `repro.data.tasks.conditions` does on all events.
    """
    out = {}
    for name in tasks:
        if name == "conditions":
            continue
        df = pd.concat([p.frames[name] for p in parts], ignore_index=True)
        out[name] = df.sort_values(SUBJECT, kind="stable").reset_index(drop=True)
    if "conditions" in tasks:
        present = pd.concat([p.present for p in parts], ignore_index=True)
        base = pd.concat([p.conditions_base for p in parts], ignore_index=True)
        base = base.sort_values(SUBJECT, kind="stable").reset_index(drop=True)
        train_present = present[present[SUBJECT].isin(set(int(s) for s in train_ids))]
        counts = train_present["group"].value_counts()
        chosen = sorted(counts.index[:N_CONDITION_GROUPS], key=lambda g: (-counts[g], g))
        sids = base[SUBJECT].to_numpy()
        for g in chosen:
            having = present.loc[present["group"] == g, SUBJECT].to_numpy()
            base[f"{LABEL_PREFIX}{g}"] = np.isin(sids, having).astype(np.int64)
        out["conditions"] = base
    return {name: out[name] for name in tasks}
