"""One MEDS shard's part of the tokenizer: the train-split fit summary (per-code counts, each lab code's
distinct values with their counts) and the shard's tokenized timelines under the fitted tokenizer."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from repro.config import CodePatterns, TokenizerParams
from repro.data.meds import (
    ShardArrays,
)
from repro.data.shard_labels import (
    CodeTable,
    ShardVisits,
    _first_time_per_subject,
    _run_position,
    shard_subjects,
)
from repro.data.timelines import Timelines, TokenizerStats, insert_gap_tokens
from repro.data.tokenizer import Tokenizer
from repro.data.values import clinical_edges, quantile_edges_from_counts, soft_weights, value_summary, zscores
from repro.data.vocab import (
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
    VE,
    VS,
    bin_token,
)

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
