"""The data path at MIMIC-IV scale: validate, label, fit and tokenize MEDS shard by shard.

Why: full MIMIC-IV in MEDS is several hundred million events; holding them in one DataFrame needs a
big-memory node. MEDS keeps each subject in one shard, and every quantity here is per subject
except three train-split summaries (quantile bins, vocabulary, the `conditions` groups), which are
merged from small per-shard summaries. So each shard is read, validated and processed on its own,
in worker processes, and memory is bounded by the largest shard, not by the dataset.

Per shard, codes stay dictionary-encoded: regular expressions and vocabulary look-ups run once per
distinct code and map to events by index; visits, visit membership, quantile bins and the token
layout are numpy array operations (no per-event Python).

Passes (`prepare_data`):

1. every shard: validate, label (visits, deaths, task rows), and for train subjects collect the fit
   summary: per-code plain token counts and each lab code's distinct values with their counts;
2. merge: exact quantile bins (`quantile_edges_from_counts`, bit for bit `np.quantile` on the expanded
   values), clinical bins from `metadata/codes.parquet` when asked for, each lab code's value statistics
   (`value_summary` on the same (value, count) pairs: train min, max, mean, std), the vocabulary, the
   `conditions` groups (counts on train, as `build_task`);
3. every shard: tokenize with the fitted tokenizer, written atomically to `shards/<i>.npz`;
4. assemble the shard files into one memory-mapped `Timelines` (shard by shard, subjects sorted within
   a shard); each subject's tokens and side arrays are identical to `Tokenizer.timelines` on all events.

Memory of the fit summary: 16 bytes per distinct (lab code, value) pair of the train split (32 while
merging), not per event. Lab values are recorded at fixed precision, so the pairs are few: 71k for 17M
synthetic train events (the benchmark prints the number). The bound is the number of distinct pairs;
at worst, every value distinct, it is 16 bytes per train lab value.

Everything is cached under `<cache_root>/tokenized-<key>/`, keyed by the data files' (path, size,
mtime), the tokenizer's fit parameters, the code patterns, the tasks and `STREAM_VERSION`; a second
run memory-maps the result, and an interrupted run reuses the shards it had finished.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import multiprocessing as mp
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import meds
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from repro.config import CodePatterns, TokenizerParams
from repro.data.meds import (
    SUBJECT,
    TIME,
    MedsDataset,
    MedsError,
    ShardArrays,
    read_reference_ranges,
    read_shard_arrays,
)
from repro.data.tasks import LABEL_PREFIX, TASKS, conditions
from repro.data.tokenizer import (
    INTERVALS,
    K_EVENT,
    K_INTERVAL,
    K_REG,
    K_VE,
    K_VS,
    REG,
    T_INTERVAL,
    T_LAB,
    T_SPECIAL,
    T_VISIT,
    UNK,
    US_PER_DAY,
    US_PER_YEAR,
    VALUE_ARRAYS,
    VE,
    VS,
    Timelines,
    Tokenizer,
    TokenizerStats,
    bin_token,
    clinical_edges,
    insert_gap_tokens,
    quantile_edges_from_counts,
    soft_weights,
    value_summary,
    zscores,
)

STREAM_VERSION = 2  # bump when the cached outputs of this module change
N_CONDITION_GROUPS = inspect.signature(conditions).parameters["n_groups"].default
TIMELINE_ARRAYS = ("token_ids", "types", "kinds", "avail_us", "ages")
ARRAY_DTYPES = {
    "token_ids": np.int32,
    "types": np.int8,
    "kinds": np.int8,
    "avail_us": np.int64,
    "ages": np.float32,
    "values": np.float32,  # xval only
    "mix_ids": np.int32,  # soft only
    "mix_w": np.float32,  # soft only
}
SMALL_DATA_BYTES = 16 * 2**20  # below this much parquet, worker processes cost more than they save


# -- code tables ---------------------------------------------------------------------------------------


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
    )


# -- visits ----------------------------------------------------------------------------------------------


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


# -- labels ----------------------------------------------------------------------------------------------


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
    frames = {name: TASKS[name](visits, deaths) for name in tasks if name != "conditions"}
    base = present = None
    if "conditions" in tasks:
        # The same samples as readmission_1m: predicted at the second-to-last discharge.
        base = TASKS["readmission_1m"](visits, deaths).drop(columns="label")
        present = _present_groups(sh, ct, v)
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


# -- fit summary -------------------------------------------------------------------------------------------

_SIGN = np.uint32(0x80000000)


def _sortable(values: np.ndarray) -> np.ndarray:
    """float32 -> uint32 whose unsigned order is the numeric order (NaN excluded; -0.0 folded into 0.0)."""
    bits = (values.astype(np.float32) + np.float32(0.0)).view(np.uint32)
    return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def _unsortable(keys: np.ndarray) -> np.ndarray:
    keys = keys.astype(np.uint32)
    return np.where(keys & _SIGN, keys ^ _SIGN, ~keys).view(np.float32)


@dataclass
class FitSummary:
    """One shard's contribution to the tokenizer fit (train subjects' in-visit events only)."""

    dictionary: list[str]
    plain_codes: np.ndarray  # int32 dictionary index of codes counted as plain tokens
    plain_counts: np.ndarray  # int64
    value_keys: np.ndarray  # uint64: dictionary index << 32 | sortable float32 bits of a lab value
    value_counts: np.ndarray  # int64


def _kept_events(sh: ShardArrays, ct: CodeTable, v: ShardVisits, starts: np.ndarray, families: np.ndarray):
    """Rows that become event tokens (timed, in a tokenized family, inside a visit) and their visit index.

    As `Tokenizer._stream_events`: an event belongs to the last visit admitted at or before its time
    (same subject) if it is not after that visit's discharge. Returns (rows, visit index, n in family).
    """
    t = sh.time
    keep = (t >= 0) & families[ct.types[sh.code]]
    rows = np.flatnonzero(keep)
    n_family = len(rows)
    if n_family == 0 or len(v.rows) == 0:
        return rows[:0], np.zeros(0, np.int64), n_family
    # Last row of each event's (subject, time) run: a visit admitted at the same time on a later row counts.
    g = np.searchsorted(starts, rows, side="right")
    last = np.where(g < len(starts), starts[np.minimum(g, len(starts) - 1)] - 1, len(sh) - 1)
    vi = np.searchsorted(v.rows, last, side="right") - 1
    vc = np.maximum(vi, 0)
    ok = (vi >= 0) & (v.subject[vc] == sh.subject_id[rows]) & (t[rows] <= v.discharge[vc])
    return rows[ok], vi[ok], n_family


def _family_mask(tok: Tokenizer) -> np.ndarray:
    mask = np.zeros(256, dtype=bool)
    mask[list(tok._families())] = True
    return mask


def _subject_mask(sh: ShardArrays, subjects: np.ndarray) -> np.ndarray:
    """Rows whose subject is in the sorted array `subjects` (looked up once per subject block)."""
    n = len(sh)
    if n == 0:
        return np.zeros(0, bool)
    first = np.ones(n, dtype=bool)
    first[1:] = sh.subject_id[1:] != sh.subject_id[:-1]
    bstart = np.flatnonzero(first)
    sid = sh.subject_id[bstart]
    k = np.minimum(np.searchsorted(subjects, sid), max(len(subjects) - 1, 0))
    hit = (subjects[k] == sid) if len(subjects) else np.zeros(len(sid), bool)
    return np.repeat(hit, np.diff(np.append(bstart, n)))


def fit_summary_shard(
    sh: ShardArrays, ct: CodeTable, v: ShardVisits, starts: np.ndarray, tok: Tokenizer, train_ids: np.ndarray
) -> FitSummary:
    """Counts and lab values of train subjects' event tokens in one shard (what `Tokenizer.fit` needs)."""
    rows, _, _ = _kept_events(sh, ct, v, starts, _family_mask(tok))
    rows = rows[_subject_mask(sh, train_ids)[rows]]
    code = sh.code[rows]
    val = sh.numeric_value[rows]
    valued = (ct.types[code] == T_LAB) & ~np.isnan(val)
    plain = np.bincount(code[~valued], minlength=len(sh.dictionary))
    nz = np.flatnonzero(plain)
    keys = (code[valued].astype(np.uint64) << np.uint64(32)) | _sortable(val[valued]).astype(np.uint64)
    uk, uc = np.unique(keys, return_counts=True)
    return FitSummary(sh.dictionary, nz.astype(np.int32), plain[nz].astype(np.int64), uk, uc.astype(np.int64))


class FitAccumulator:
    """Merges shards' fit summaries in bounded memory: one entry per distinct code and (lab code, value)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        self.plain = np.zeros(0, np.int64)
        self.keys = np.zeros(0, np.uint64)
        self.counts = np.zeros(0, np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_n = 0

    def _gid(self, code: str) -> int:
        g = self.index.get(code)
        if g is None:
            g = self.index[code] = len(self.names)
            self.names.append(code)
        return g

    def add(self, s: FitSummary) -> None:
        gid = np.fromiter((self._gid(c) for c in s.dictionary), dtype=np.int64, count=len(s.dictionary))
        if len(self.plain) < len(self.names):
            self.plain = np.concatenate([self.plain, np.zeros(len(self.names) - len(self.plain), np.int64)])
        np.add.at(self.plain, gid[s.plain_codes], s.plain_counts)
        if len(s.value_keys):
            local = (s.value_keys >> np.uint64(32)).astype(np.int64)
            keys = (gid[local].astype(np.uint64) << np.uint64(32)) | (s.value_keys & np.uint64(0xFFFFFFFF))
            self._pending.append((keys, s.value_counts))
            self._pending_n += len(keys)
            if self._pending_n > max(len(self.keys), 1 << 20):
                self._compact()

    def _compact(self) -> None:
        if not self._pending:
            return
        keys = np.concatenate([self.keys, *(k for k, _ in self._pending)])
        counts = np.concatenate([self.counts, *(c for _, c in self._pending)])
        self.keys, inv = np.unique(keys, return_inverse=True)
        self.counts = np.bincount(inv, weights=counts, minlength=len(self.keys)).astype(np.int64)
        self._pending, self._pending_n = [], 0

    @property
    def distinct_values(self) -> int:
        self._compact()
        return len(self.keys)

    def tokenizer(
        self,
        params: TokenizerParams,
        patterns: CodePatterns,
        ref_ranges: dict[str, tuple[float, float]] | None = None,
    ) -> Tokenizer:
        """Bins, value statistics and vocabulary as `Tokenizer.fit` on all train events: the same state.

        `ref_ranges` (from `read_reference_ranges`) give clinical bins when `params.bins == "clinical"`.
        """
        self._compact()
        plain = np.zeros(len(self.names), np.int64)
        plain[: len(self.plain)] = self.plain
        gids = (self.keys >> np.uint64(32)).astype(np.int64)
        values = _unsortable(self.keys & np.uint64(0xFFFFFFFF))
        bounds = np.flatnonzero(np.diff(gids)) + 1
        starts = np.concatenate([[0], bounds]).astype(np.int64)
        ends = np.concatenate([bounds, [len(gids)]]).astype(np.int64)
        ranges = (ref_ranges or {}) if params.bins == "clinical" else {}
        counts: Counter[str] = Counter()
        bins: dict[str, np.ndarray] = {}
        clinical: dict[str, tuple[float, float]] = {}
        limits: dict[str, np.ndarray] = {}
        moments: dict[str, np.ndarray] = {}
        for lo, hi in zip(starts.tolist(), ends.tolist()):
            if lo == hi:
                continue
            g = int(gids[lo])
            name = self.names[g]
            u = values[lo:hi].astype(np.float64)
            c = self.counts[lo:hi]
            limits[name], moments[name] = value_summary(u, c)
            edges = np.empty(0)
            if params.values != "xval":
                if name in ranges:
                    clinical[name] = ranges[name]
                    edges = clinical_edges(*ranges[name])
                else:
                    edges = quantile_edges_from_counts(u, c, params.n_bins)
            if len(edges):
                bins[name] = edges
                per_bin = np.bincount(np.searchsorted(edges, u, side="right"), weights=c)
                for b in np.flatnonzero(per_bin):
                    key = bin_token(b + 1) if params.values == "unfused" else f"{name}//Q{b + 1}"
                    counts[key] += int(per_bin[b])
                if params.values == "unfused":
                    counts[name] += int(c.sum())
            else:
                plain[g] += int(c.sum())
        for g in np.flatnonzero(plain):
            counts[self.names[g]] += int(plain[g])
        tok = Tokenizer(params, patterns)
        return Tokenizer(
            params,
            patterns,
            tok._vocabulary(counts),
            {k: bins[k] for k in sorted(bins)},
            clinical={k: clinical[k] for k in sorted(clinical)},
            limits={k: limits[k] for k in sorted(limits)},
            moments={k: moments[k] for k in sorted(moments)},
        )


# -- tokenization ------------------------------------------------------------------------------------------


@dataclass
class _Lookup:
    plain: np.ndarray  # int32 token id of each dictionary code as a plain token
    has_bins: np.ndarray  # bool
    edges: np.ndarray  # [n_dict, max_edges] float64, NaN padded
    bin_ids: np.ndarray  # [n_dict, max_edges + 1] int32 token id of code//Q{b+1}
    n_bins: np.ndarray  # int64 bins of each code (0 without bins)
    bounds: np.ndarray  # soft: [n_dict, max_edges + 2] float64 train min, inner edges, train max
    moments: np.ndarray  # xval: [n_dict, 2] float64 train mean and std, NaN without
    q_ids: np.ndarray  # unfused: int32 token id of [Q{b+1}]


def _lookup(dictionary: list[str], tok: Tokenizer) -> _Lookup:
    n = len(dictionary)
    plain = np.fromiter((tok.stoi.get(c, UNK) for c in dictionary), dtype=np.int32, count=n)
    width = max((len(e) for e in tok.bins.values()), default=0)
    edges = np.full((n, width), np.nan)
    bin_ids = np.full((n, width + 1), UNK, dtype=np.int32)
    has = np.zeros(n, dtype=bool)
    n_bins = np.zeros(n, dtype=np.int64)
    soft = tok.params.values == "soft"
    bounds = np.full((n, width + 2), np.nan)
    moments = np.full((n, 2), np.nan)
    for i, c in enumerate(dictionary):
        m = tok.moments.get(c)
        if m is not None:
            moments[i] = m
        e = tok.bins.get(c)
        if e is None:
            continue
        has[i] = True
        n_bins[i] = len(e) + 1
        edges[i, : len(e)] = e
        bin_ids[i, : len(e) + 1] = [tok.stoi.get(f"{c}//Q{b + 1}", UNK) for b in range(len(e) + 1)]
        if soft:
            lim = tok.limits[c]
            bounds[i, : len(e) + 2] = np.concatenate([[lim[0]], e, [lim[1]]])
    q_ids = np.array([tok.stoi.get(bin_token(b + 1), UNK) for b in range(width + 1)], dtype=np.int32)
    return _Lookup(plain, has, edges, bin_ids, n_bins, bounds, moments, q_ids)


def _interval_ids(days: np.ndarray, tok: Tokenizer) -> np.ndarray:
    """Vectorised `interval_token` -> token ids (same float floor division as Python's)."""
    w = np.floor_divide(np.maximum(days, 0), 7)
    m = np.floor_divide(days, 30)
    names = np.where(
        days < 28,
        np.char.add("[W_", np.nan_to_num(w).astype(np.int64).astype(str)),
        np.where(days < 365, np.char.add("[M_", np.nan_to_num(m).astype(np.int64).astype(str)), "[LT"),
    )
    names = np.char.add(names, "]")
    valid = set(INTERVALS)
    return np.array([tok.stoi[s] if s in valid else UNK for s in names.tolist()], dtype=np.int32)


def tokenize_shard(
    sh: ShardArrays, ct: CodeTable, v: ShardVisits, starts: np.ndarray, tok: Tokenizer
) -> Timelines:
    """`Tokenizer.timelines` of one shard's subjects, with numpy only: the same tokens, side arrays and stats."""
    n = len(sh)
    stats = TokenizerStats(events_in=n)
    subjects = shard_subjects(sh)
    rows, vi, n_family = _kept_events(sh, ct, v, starts, _family_mask(tok))
    stats.events_other_family = n - n_family
    stats.events_outside_visits = n_family - len(rows)
    stats.event_tokens = len(rows)
    mode = tok.params.values
    lut = _lookup(sh.dictionary, tok)
    code = sh.code[rows]
    ev_types = ct.types[code]
    ids = lut.plain[code]
    val = sh.numeric_value[rows]
    n_rows = len(rows)
    extra = np.full(n_rows, -1, np.int32)  # unfused: the bin token after the event (-1: none)
    mix = ids.copy() if mode == "soft" else None
    mix_w = np.zeros(n_rows, np.float64) if mode == "soft" else None
    z = np.full(n_rows, np.nan, np.float64) if mode == "xval" else None
    valued = (ev_types == T_LAB) & ~np.isnan(val)
    if mode == "xval":
        zi = np.flatnonzero(valued & ~np.isnan(lut.moments[code, 0]))
        m = lut.moments[code[zi]]
        z[zi] = zscores(val[zi].astype(np.float64), m[:, 0], m[:, 1])
    lab = valued & lut.has_bins[code]
    if lab.any() and mode != "xval":
        li = np.flatnonzero(lab)
        c = code[li]
        x = val[li].astype(np.float64)
        b = np.zeros(len(li), dtype=np.int64)
        for j in range(lut.edges.shape[1]):
            b += lut.edges[c, j] <= x  # searchsorted(edges, x, "right"); NaN padding never counts
        if mode == "unfused":
            extra[li] = lut.q_ids[b]
        else:
            ids[li] = lut.bin_ids[c, b]
        if mode == "soft":
            nb, w = soft_weights(x, b, lut.bounds[c, b], lut.bounds[c, b + 1], lut.n_bins[c])
            m_ids = lut.bin_ids[c, nb]
            none = (m_ids == UNK) | (ids[li] == UNK) | (w <= 0)
            mix[li] = np.where(none, ids[li], m_ids)
            mix_w[li] = np.where(none, 0.0, w)
    has_extra = extra >= 0
    stats.unk_tokens = int((ids == UNK).sum()) + int((extra[has_extra] == UNK).sum())
    stats.subjects_without_visits = int(len(subjects) - len(np.unique(v.subject)))
    birth = _first_time_per_subject(sh, ct.birth)
    stats.subjects_without_birth = int(len(np.setdiff1d(subjects, birth.index.to_numpy())))

    nv = len(v.rows)
    width = 1 + has_extra.astype(np.int64)  # token slots of each event
    n_ev = np.bincount(vi, weights=width, minlength=nv).astype(np.int64)
    has_gap = np.zeros(nv, dtype=bool)
    if tok.params.time_tokens == "ehrmamba":  # fixed13: gap tokens are inserted at the end
        has_gap[1:] = v.subject[1:] == v.subject[:-1]
    prev_dis = np.full(nv, np.nan)
    prev_dis[1:] = np.where(has_gap[1:], v.discharge[:-1].astype(np.float64), np.nan)
    gap_ids = np.zeros(nv, dtype=np.int32)
    if has_gap.any():
        g = np.flatnonzero(has_gap)
        gap_ids[g] = _interval_ids((v.admit[g] - prev_dis[g]) / US_PER_DAY, tok)
    gap = has_gap.astype(np.int64)
    ntok = gap + 3 + n_ev
    rank_v = np.searchsorted(subjects, v.subject)
    vorder = np.argsort(rank_v, kind="stable")  # subjects sorted by id, visits in order within a subject
    vstart = np.empty(nv, dtype=np.int64)
    vstart[vorder] = np.cumsum(ntok[vorder]) - ntok[vorder]
    total = int(ntok.sum())
    token_ids = np.empty(total, np.int32)
    types = np.empty(total, np.int8)
    kinds = np.empty(total, np.int8)
    avail = np.empty(total, np.int64)

    def put(pos, tid, typ, kind, t):
        token_ids[pos], types[pos], kinds[pos], avail[pos] = tid, typ, kind, t

    g = np.flatnonzero(has_gap)
    put(vstart[g], gap_ids[g], T_INTERVAL, K_INTERVAL, v.admit[g])
    put(vstart + gap, VS, T_VISIT, K_VS, v.admit)
    # Slot of each event within its visit (events of a visit are consecutive rows: vi is non-decreasing).
    before = np.cumsum(width) - width
    first = np.arange(n_rows) - _run_position(vi)
    ev_pos = vstart[vi] + gap[vi] + 1 + before - before[first]
    put(ev_pos, ids, ev_types, K_EVENT, sh.time[rows])
    xi = np.flatnonzero(has_extra)
    put(ev_pos[xi] + 1, extra[xi], T_LAB, K_EVENT, sh.time[rows[xi]])
    put(vstart + gap + 1 + n_ev, VE, T_VISIT, K_VE, v.discharge)
    put(vstart + gap + 2 + n_ev, REG, T_SPECIAL, K_REG, v.discharge)

    birth_v = birth.reindex(v.subject).to_numpy(dtype=np.float64, na_value=np.nan)
    b = np.repeat(birth_v[vorder], ntok[vorder])
    ages = np.where(np.isnan(b), 0.0, (avail - np.nan_to_num(b)) / US_PER_YEAR).astype(np.float32)
    per_subject = np.bincount(rank_v, weights=ntok, minlength=len(subjects)).astype(np.int64)
    tl = Timelines(
        subject_ids=subjects.astype(np.int64),
        offsets=np.concatenate([[0], np.cumsum(per_subject)]).astype(np.int64),
        token_ids=token_ids,
        types=types,
        kinds=kinds,
        avail_us=avail,
        ages=ages,
        stats=stats,
    )
    if mode == "soft":
        tl.mix_ids = token_ids.copy()
        tl.mix_ids[ev_pos] = mix
        tl.mix_w = np.zeros(total, np.float32)
        tl.mix_w[ev_pos] = mix_w
    elif mode == "xval":
        tl.values = np.full(total, np.nan, np.float32)
        tl.values[ev_pos] = z
    if tok.params.time_tokens == "fixed13":
        tl = insert_gap_tokens(tl, tok.gap_ids())
    return tl


# -- per-shard jobs (run in worker processes) ------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _worker_tokenizer(cfg: dict) -> Tokenizer:
    """The fitted tokenizer (from its file) or a bare one for code typing; loaded once per process."""
    path = cfg.get("tokenizer_path")
    if path:
        st = os.stat(path)
        key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    else:
        key = json.dumps([cfg["params"], cfg["patterns"]], sort_keys=True)
    tok = _WORKER.get(key)
    if tok is None:
        if path:
            tok = Tokenizer.load(path)
        else:
            tok = Tokenizer(TokenizerParams(**cfg["params"]), CodePatterns(**cfg["patterns"]))
        _WORKER.clear()
        _WORKER[key] = tok
    return tok


def _worker_train_ids(root: str) -> np.ndarray:
    key = f"train:{root}"
    if key not in _WORKER:
        splits = pq.read_table(Path(root) / meds.subject_splits_filepath).to_pandas()
        _WORKER[key] = np.sort(splits.loc[splits["split"] == meds.train_split, SUBJECT].to_numpy(np.int64))
    return _WORKER[key]


def _pass_job(path: str, cfg: dict) -> dict:
    """Read + validate one shard; optionally label it, summarise it for the fit, tokenize it to a file."""
    clock = {}
    t0 = time.perf_counter()
    sh = read_shard_arrays(Path(path))
    out: dict[str, Any] = {"n": len(sh), "subjects": shard_subjects(sh)}
    clock["read_validate"] = time.perf_counter() - t0
    if not (cfg.get("label") or cfg.get("fit") or cfg.get("tokenize_to")):
        out["clock"] = clock
        return out
    t0 = time.perf_counter()
    tok = _worker_tokenizer(cfg)
    ct = code_table(sh.dictionary, tok)
    starts = _group_starts(sh)
    v = shard_visits(sh, ct, starts)
    clock["visits"] = time.perf_counter() - t0
    if cfg.get("label"):
        t0 = time.perf_counter()
        out["labels"] = label_shard(sh, ct, v, cfg["tasks"])
        clock["label"] = time.perf_counter() - t0
    if cfg.get("fit"):
        t0 = time.perf_counter()
        out["fit"] = fit_summary_shard(sh, ct, v, starts, tok, _worker_train_ids(cfg["root"]))
        clock["fit"] = time.perf_counter() - t0
    if cfg.get("tokenize_to"):
        t0 = time.perf_counter()
        tl = tokenize_shard(sh, ct, v, starts, tok)
        save_timelines(tl, Path(cfg["tokenize_to"]))
        out["tokens"] = len(tl.token_ids)
        out["stats"] = tl.stats
        clock["tokenize"] = time.perf_counter() - t0
    out["clock"] = clock
    return out


def save_timelines(tl: Timelines, path: Path) -> None:
    """One shard's timelines as an uncompressed .npz, written atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                subject_ids=tl.subject_ids,
                offsets=tl.offsets,
                stats=np.array([getattr(tl.stats, k.name) for k in fields(TokenizerStats)], np.int64),
                **{k: getattr(tl, k) for k in _arrays_of(tl)},
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _arrays_of(tl: Timelines) -> list[str]:
    """The per-token arrays a timelines object holds: the core ones and the value arrays of its mode."""
    return [*TIMELINE_ARRAYS, *(k for k in VALUE_ARRAYS if getattr(tl, k) is not None)]


def load_timelines(path: Path) -> Timelines:
    """Read one shard's timelines file (see `save_timelines`)."""
    with np.load(path) as z:
        stats = TokenizerStats(*(int(x) for x in z["stats"]))
        return Timelines(
            subject_ids=z["subject_ids"],
            offsets=z["offsets"],
            stats=stats,
            **{k: z[k] for k in (*TIMELINE_ARRAYS, *VALUE_ARRAYS) if k in z.files},
        )


# -- running passes over shards ----------------------------------------------------------------------------


def _num_rows(path: Path) -> int:
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # noqa: BLE001 - the job itself reports an unreadable file with its name
        return 0


def default_workers(dataset: MedsDataset) -> int:
    """1 for small data (process start-up would dominate), else one per core, at most one per shard."""
    size = sum(p.stat().st_size for p in dataset.shards)
    if size < SMALL_DATA_BYTES:
        return 1
    return max(1, min(os.cpu_count() or 1, len(dataset.shards)))


class ShardRunner:
    """Runs per-shard jobs in `workers` spawned processes (or in this process when workers == 1).

    Results come back in shard order whatever order they finish in; a progress bar counts events.
    """

    def __init__(self, workers: int = 1, progress: bool = True) -> None:
        self.workers = max(1, int(workers))
        self.progress = progress
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> ShardRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def map(self, paths: list[Path], cfgs: list[dict], desc: str) -> list[dict]:
        from tqdm import tqdm

        sizes = [_num_rows(p) for p in paths]
        bar = tqdm(
            total=sum(sizes), desc=desc, unit="ev", unit_scale=True, disable=not self.progress, leave=False
        )
        results: list[dict | None] = [None] * len(paths)
        try:
            if self.workers == 1:
                for i, (p, c) in enumerate(zip(paths, cfgs)):
                    results[i] = _pass_job(str(p), c)
                    bar.update(sizes[i])
            else:
                if self._pool is None:
                    self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
                futures = {
                    self._pool.submit(_pass_job, str(p), c): i for i, (p, c) in enumerate(zip(paths, cfgs))
                }
                for f in as_completed(futures):
                    i = futures[f]
                    results[i] = f.result()
                    bar.update(sizes[i])
        finally:
            bar.close()
        return results  # type: ignore[return-value]


def check_subjects(dataset: MedsDataset, results: list[dict]) -> None:
    """Cross-shard checks of `read_events`: a subject lives in one shard and has a split."""
    sids = np.concatenate([r["subjects"] for r in results]) if results else np.zeros(0, np.int64)
    shard_of = np.repeat(np.arange(len(results)), [len(r["subjects"]) for r in results])
    order = np.argsort(sids, kind="stable")
    s, sh = sids[order], shard_of[order]
    dup = np.flatnonzero(s[1:] == s[:-1])
    if len(dup):
        k = dup[np.argmin(sh[dup + 1])]
        raise MedsError(
            f"{dataset.shards[sh[k + 1]]}: subject {int(s[k])} also appears in {dataset.shards[sh[k]]}; "
            "MEDS keeps a subject in one shard"
        )
    unknown = np.setdiff1d(sids, dataset.splits[SUBJECT].to_numpy())
    if len(unknown):
        raise MedsError(
            f"{dataset.root / meds.subject_splits_filepath}: {len(unknown)} subjects in the data have no split "
            f"(e.g. {int(unknown[0])})"
        )


def _cfg(params: TokenizerParams, patterns: CodePatterns, **kw) -> dict:
    return {"params": asdict(params), "patterns": asdict(patterns), **kw}


@dataclass
class StageResult:
    """What one pass over the shards did: events, wall time, workers and per-step busy seconds in workers."""

    stage: str
    events: int
    wall: float
    workers: int
    busy: dict[str, float] = field(default_factory=dict)


def _busy(results: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in results:
        for k, v in r["clock"].items():
            out[k] = out.get(k, 0.0) + v
    return out


def validate_dataset(dataset: MedsDataset, runner: ShardRunner) -> StageResult:
    """Read and validate every shard (and the cross-shard rules) without keeping any events."""
    t0 = time.perf_counter()
    res = runner.map(dataset.shards, [{}] * len(dataset.shards), "validate")
    check_subjects(dataset, res)
    return StageResult(
        "validate", sum(r["n"] for r in res), time.perf_counter() - t0, runner.workers, _busy(res)
    )


def label_dataset(
    dataset: MedsDataset, patterns: CodePatterns, tasks: list[str], runner: ShardRunner
) -> tuple[dict[str, pd.DataFrame], pd.Series, StageResult]:
    """Task labels of every shard's subjects; equal to `build_task` on all events."""
    t0 = time.perf_counter()
    cfg = _cfg(TokenizerParams(), patterns, label=True, tasks=list(tasks))
    res = runner.map(dataset.shards, [cfg] * len(dataset.shards), "label")
    check_subjects(dataset, res)
    labels = finish_labels([r["labels"] for r in res], list(tasks), dataset.subjects(meds.train_split))
    n_visits = _n_visits(res)
    stage = StageResult(
        "label", sum(r["n"] for r in res), time.perf_counter() - t0, runner.workers, _busy(res)
    )
    return labels, n_visits, stage


def _n_visits(res: list[dict]) -> pd.Series:
    parts = [r["labels"].n_visits for r in res if len(r["labels"].n_visits)]
    if not parts:
        return pd.Series(dtype=np.int64, index=pd.Index([], dtype=np.int64, name=SUBJECT))
    return pd.concat(parts).sort_index()


def train_shards(dataset: MedsDataset) -> list[Path]:
    """Shards that hold at least one train subject (reads only their subject_id column)."""
    train = np.sort(dataset.subjects(meds.train_split).astype(np.int64))
    out = []
    for p in dataset.shards:
        sid = pq.read_table(p, columns=[SUBJECT]).column(SUBJECT).to_numpy()
        if np.isin(np.unique(sid), train).any():
            out.append(p)
    return out


def _ranges(dataset: MedsDataset, params: TokenizerParams) -> dict[str, tuple[float, float]]:
    """Reference ranges from the dataset's code metadata, read only when clinical bins are asked for."""
    return read_reference_ranges(dataset.root) if params.bins == "clinical" else {}


def fit_tokenizer(
    dataset: MedsDataset, params: TokenizerParams, patterns: CodePatterns, runner: ShardRunner
) -> tuple[Tokenizer, StageResult, int]:
    """Quantile bins and vocabulary from the train split in one pass; returns (tokenizer, stage, distinct values)."""
    t0 = time.perf_counter()
    cfg = _cfg(params, patterns, fit=True, root=str(dataset.root))
    paths = train_shards(dataset)
    res = runner.map(paths, [cfg] * len(paths), "fit (train)")
    acc = FitAccumulator()
    for r in res:
        acc.add(r["fit"])
    tok = acc.tokenizer(params, patterns, _ranges(dataset, params))
    stage = StageResult("fit", sum(r["n"] for r in res), time.perf_counter() - t0, runner.workers, _busy(res))
    return tok, stage, acc.distinct_values


def tokenize_dataset(
    dataset: MedsDataset,
    tok: Tokenizer,
    out_dir: Path,
    runner: ShardRunner,
    shards: list[int] | None = None,
) -> tuple[list[Path], StageResult]:
    """Tokenize shards into `out_dir/<i>.npz` (atomic; existing files are reused, so a rerun resumes)."""
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_path = out_dir / "tokenizer.json"
    tok.save(tok_path)
    idx = list(range(len(dataset.shards))) if shards is None else list(shards)
    files = [out_dir / f"{i:05d}.npz" for i in idx]
    todo = [k for k, f in enumerate(files) if not f.is_file()]
    cfgs = [
        _cfg(tok.params, tok.patterns, tokenizer_path=str(tok_path), tokenize_to=str(files[k])) for k in todo
    ]
    res = runner.map([dataset.shards[idx[k]] for k in todo], cfgs, "tokenize")
    stage = StageResult(
        "tokenize", sum(r["n"] for r in res), time.perf_counter() - t0, runner.workers, _busy(res)
    )
    return files, stage


def assemble_timelines(files: list[Path], out_dir: Path | None = None) -> Timelines:
    """One `Timelines` from shard files, shard by shard; memory-mapped `.npy` files when `out_dir` is given.

    Written sequentially, one shard in memory at a time, so memory does not grow with the dataset.
    """
    heads = []
    optional: set[str] | None = None
    for f in files:
        with np.load(f) as z:
            heads.append((len(z["subject_ids"]), int(z["offsets"][-1])))
            present = {k for k in VALUE_ARRAYS if k in z.files}
        if optional is not None and present != optional:
            raise ValueError(
                f"{f}: value arrays {sorted(present)} differ from other shards' {sorted(optional)}"
            )
        optional = present
    n_subjects = sum(h[0] for h in heads)
    n_tokens = sum(h[1] for h in heads)
    names = [*TIMELINE_ARRAYS, *(k for k in VALUE_ARRAYS if k in (optional or set()))]
    dtypes = {k: ARRAY_DTYPES[k] for k in names}
    subject_ids = np.empty(n_subjects, np.int64)
    offsets = np.zeros(n_subjects + 1, np.int64)
    stats = TokenizerStats()
    if out_dir is None:
        arrays = {k: np.empty(n_tokens, d) for k, d in dtypes.items()}
        handles = None
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        handles = {}
        for k, d in dtypes.items():
            fh = open(out_dir / f"{k}.npy", "wb")
            np.lib.format.write_array_header_1_0(
                fh,
                {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(d)),
                    "fortran_order": False,
                    "shape": (n_tokens,),
                },
            )
            handles[k] = fh
    s0 = t0 = 0
    try:
        for f in files:
            tl = load_timelines(f)
            ns, nt = len(tl.subject_ids), int(tl.offsets[-1])
            subject_ids[s0 : s0 + ns] = tl.subject_ids
            offsets[s0 + 1 : s0 + ns + 1] = tl.offsets[1:] + t0
            stats.add(tl.stats)
            for k in dtypes:
                a = getattr(tl, k)
                if handles is None:
                    arrays[k][t0 : t0 + nt] = a
                else:
                    handles[k].write(np.ascontiguousarray(a).tobytes())
            s0, t0 = s0 + ns, t0 + nt
    finally:
        for fh in (handles or {}).values():
            fh.close()
    if out_dir is not None:
        np.save(out_dir / "subject_ids.npy", subject_ids)
        np.save(out_dir / "offsets.npy", offsets)
        (out_dir / "stats.json").write_text(json.dumps(asdict(stats)))
        return open_timelines(out_dir)
    return Timelines(subject_ids=subject_ids, offsets=offsets, stats=stats, **arrays)


def open_timelines(d: Path) -> Timelines:
    """Memory-map an assembled timelines directory (pages load on use; nothing is read up front)."""
    stats = TokenizerStats(**json.loads((d / "stats.json").read_text()))
    names = [*TIMELINE_ARRAYS, *(k for k in VALUE_ARRAYS if (d / f"{k}.npy").is_file())]
    return Timelines(
        subject_ids=np.load(d / "subject_ids.npy"),
        offsets=np.load(d / "offsets.npy"),
        stats=stats,
        **{k: np.load(d / f"{k}.npy", mmap_mode="r") for k in names},
    )


# -- the cached pipeline -------------------------------------------------------------------------------------


@dataclass
class PreparedData:
    """Everything `repro.experiment.prepare` needs from the data, built once and cached."""

    tokenizer: Tokenizer
    timelines: Timelines
    labels: dict[str, pd.DataFrame]  # subject_id, prediction_time, admit, discharge, label(s)
    n_visits: pd.Series
    n_events: int
    seconds: dict[str, float]
    cache_dir: Path | None = None
    cache_hit: bool = False


# max_len and max_visits act at encode time; everything else changes the fit or the timelines.
FIT_FIELDS = ("n_bins", "families", "include_diagnoses", "min_count", "values", "bins", "time_tokens")


def cache_key(dataset: MedsDataset, params: TokenizerParams, patterns: CodePatterns, tasks: list[str]) -> str:
    """Hash of the data files (path, size, mtime), the fit parameters, code patterns, tasks and code version.

    The code metadata file counts when it exists: clinical bins read their reference ranges from it.
    """
    files = [*dataset.shards, dataset.root / meds.subject_splits_filepath]
    if (dataset.root / meds.code_metadata_filepath).is_file():
        files.append(dataset.root / meds.code_metadata_filepath)
    blob = {
        "version": STREAM_VERSION,
        "root": str(Path(dataset.root).resolve()),
        "files": [(str(f.relative_to(dataset.root)), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
        "tokenizer": {k: asdict(params)[k] for k in FIT_FIELDS},
        "patterns": asdict(patterns),
        "tasks": list(tasks),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _save_frame(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _load_cached(d: Path, params: TokenizerParams, patterns: CodePatterns, tasks: list[str]) -> PreparedData:
    t0 = time.perf_counter()
    done = json.loads((d / "done.json").read_text())
    tok = Tokenizer.load(d / "shards" / "tokenizer.json").with_params(params, patterns)
    labels = {t: pd.read_parquet(d / "labels" / f"{t}.parquet") for t in tasks}
    nv = pd.read_parquet(d / "labels" / "n_visits.parquet")
    n_visits = pd.Series(
        nv["n"].to_numpy(np.int64), index=pd.Index(nv[SUBJECT].to_numpy(np.int64), name=SUBJECT)
    )
    tl = open_timelines(d / "timelines")
    os.utime(d / "done.json")  # recently used: survives pruning
    seconds = {**done["seconds"], "cache_hit": 1.0, "load": time.perf_counter() - t0}
    return PreparedData(tok, tl, labels, n_visits, int(done["n_events"]), seconds, d, True)


def prune_cache(cache_root: Path, keep: int = 8) -> None:
    """Remove all but the `keep` most recently used tokenized caches."""
    dirs = [p for p in cache_root.glob("tokenized-*") if (p / "done.json").is_file()]
    dirs.sort(key=lambda p: (p / "done.json").stat().st_mtime, reverse=True)
    for p in dirs[keep:]:
        shutil.rmtree(p, ignore_errors=True)


def prepare_data(
    dataset: MedsDataset,
    params: TokenizerParams,
    patterns: CodePatterns,
    tasks: list[str],
    cache_root: Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> PreparedData:
    """Validate, label, fit on train and tokenize, streaming shard by shard in `workers` processes.

    With `cache_root`, results go to `cache_root/tokenized-<key>/` and a second call with the same data
    and parameters only memory-maps them. Without it, everything stays in memory (small data, tests).
    """
    tasks = list(tasks)
    d = None
    if cache_root is not None:
        d = Path(cache_root) / f"tokenized-{cache_key(dataset, params, patterns, tasks)}"
        if (d / "done.json").is_file():
            return _load_cached(d, params, patterns, tasks)
    workers = default_workers(dataset) if workers is None else workers
    seconds: dict[str, float] = {"workers": float(workers)}
    t_all = time.perf_counter()
    with ShardRunner(workers, progress) as runner:
        # Pass 1: validate + label every shard, fit summary of train subjects' events.
        t0 = time.perf_counter()
        cfg = _cfg(params, patterns, label=True, fit=True, tasks=tasks, root=str(dataset.root))
        res = runner.map(dataset.shards, [cfg] * len(dataset.shards), "validate + label + fit")
        check_subjects(dataset, res)
        wall1 = time.perf_counter() - t0
        busy = _busy(res)
        share = {k: v / max(sum(busy.values()), 1e-9) for k, v in busy.items()}
        seconds["read_validate"] = wall1 * share.get("read_validate", 0.0)
        seconds["label"] = wall1 * (share.get("label", 0.0) + share.get("visits", 0.0))
        t0 = time.perf_counter()
        acc = FitAccumulator()
        for r in res:
            acc.add(r.pop("fit"))
        tok = acc.tokenizer(params, patterns, _ranges(dataset, params))
        labels = finish_labels([r["labels"] for r in res], tasks, dataset.subjects(meds.train_split))
        n_visits = _n_visits(res)
        n_events = sum(r["n"] for r in res)
        del res
        seconds["fit"] = wall1 * share.get("fit", 0.0) + time.perf_counter() - t0
        # Pass 2: tokenize every shard to its own file; then assemble.
        t0 = time.perf_counter()
        tmp_dir = None
        if d is not None:
            shard_dir = d / "shards"
        else:
            tmp_dir = Path(tempfile.mkdtemp(prefix="repro-tokenized-"))
            shard_dir = tmp_dir
        try:
            files, _ = tokenize_dataset(dataset, tok, shard_dir, runner)
            seconds["tokenize"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            if d is None:
                tl = assemble_timelines(files)
            else:
                tl_dir = d / f"timelines.{os.getpid()}.tmp"
                assemble_timelines(files, tl_dir)
                final = d / "timelines"
                try:
                    os.rename(tl_dir, final)
                except OSError:  # another process finished the same (identical) assembly first
                    shutil.rmtree(tl_dir, ignore_errors=True)
                tl = open_timelines(final)
            seconds["assemble"] = time.perf_counter() - t0
        finally:
            if tmp_dir is not None:
                shutil.rmtree(tmp_dir, ignore_errors=True)
    seconds["tokenize"] += seconds["fit"]  # the report's "tokenize" step: fit on train + tokenize
    seconds["total"] = time.perf_counter() - t_all
    if d is not None:
        (d / "labels").mkdir(parents=True, exist_ok=True)
        for t, df in labels.items():
            _save_frame(df, d / "labels" / f"{t}.parquet")
        _save_frame(
            pd.DataFrame({SUBJECT: n_visits.index.to_numpy(np.int64), "n": n_visits.to_numpy(np.int64)}),
            d / "labels" / "n_visits.parquet",
        )
        _write_json(
            {"n_events": n_events, "seconds": seconds, "distinct_lab_values": acc.distinct_values},
            d / "done.json",
        )
        prune_cache(Path(cache_root))
    return PreparedData(tok, tl, labels, n_visits, n_events, seconds, d, False)
