"""The EHRMamba / CEHR-BERT token stream with side arrays (DESIGN.md section 6).

`[CLS] [VS] e1 e2 ... [VE] [REG] [W_k|M_k|LT] [VS] ... [VE] [REG]`

Interval tokens sit between a discharge and the next admission (< 28 d `W_{days//7}`, < 365 d
`M_{days//30}`, else `LT`). Lab tokens carry a per-code quantile bin fitted on the train split only
(a value at the maximum falls in the top bin). The vocabulary is fitted on train; unseen codes become
`[UNK]` and are counted. Side arrays per token: type, age (years), time (weeks since 1970), visit
segment (1/2 alternating, 0 outside visits) and visit order.

Work is vectorised per batch of subjects (pandas / numpy): a subject's full timeline is built once
and stored as flat arrays with offsets; a prediction at time T takes the prefix of tokens available
strictly before T, closes an open visit with `[VE] [REG]`, then truncates to the most recent tokens,
snapped to a visit boundary, with `[CLS]` re-prepended.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from repro.config import CodePatterns, TokenizerParams
from repro.data.meds import CODE, SUBJECT, TIME, VALUE
from repro.data.tasks import find_visits

PAD, UNK, CLS, VS, VE, REG, MASK = 0, 1, 2, 3, 4, 5, 6
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[VS]", "[VE]", "[REG]", "[MASK]"]
INTERVALS = [f"[W_{k}]" for k in range(4)] + [f"[M_{k}]" for k in range(13)] + ["[LT]"]
TASK_TOKENS = [
    "[TASK_mortality_1m]",
    "[TASK_inhospital_mortality_24h]",
    "[TASK_los_1w]",
    "[TASK_readmission_1m]",
    "[TASK_conditions]",
]
RESERVED = SPECIALS + INTERVALS + TASK_TOKENS

# Token types (CONTRACTS: 0 pad, 1 special, 2 visit, 3 interval, 4 lab, 5 med, 6 proc, 7 dx, 8 other, 9 demo)
T_PAD, T_SPECIAL, T_VISIT, T_INTERVAL, T_LAB, T_MED, T_PROC, T_DX, T_OTHER, T_DEMO = range(10)
N_TOKEN_TYPES = 10
FAMILY_TYPE = {
    "lab": T_LAB,
    "medication": T_MED,
    "procedure": T_PROC,
    "diagnosis": T_DX,
    "demographic": T_DEMO,
}

# Token kinds inside a stored timeline.
K_EVENT, K_INTERVAL, K_VS, K_VE, K_REG = 0, 1, 2, 3, 4

US_PER_DAY = 86_400_000_000
US_PER_WEEK = 7 * US_PER_DAY
US_PER_YEAR = 365.25 * US_PER_DAY


def interval_token(days: float) -> str:
    """Interval token for a gap in days between a discharge and the next admission.

    >>> [interval_token(d) for d in (0, 6.9, 7, 27.9, 28, 364, 365)]
    ['[W_0]', '[W_0]', '[W_1]', '[W_3]', '[M_0]', '[M_12]', '[LT]']
    """
    if days < 28:
        return f"[W_{int(max(days, 0) // 7)}]"
    if days < 365:
        return f"[M_{int(days // 30)}]"
    return "[LT]"


def quantile_edges(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Inner bin edges (n_bins - 1) from train values; `assign_bins` puts the maximum in the top bin."""
    values = values[~np.isnan(values)]
    if len(values) == 0 or n_bins < 2:
        return np.empty(0, dtype=np.float64)
    return np.quantile(values.astype(np.float64), np.arange(1, n_bins) / n_bins)


def quantile_edges_from_counts(values: np.ndarray, counts: np.ndarray, n_bins: int) -> np.ndarray:
    """`quantile_edges` of the multiset {values[i] repeated counts[i] times}, bit for bit.

    Why: a streaming fit keeps each lab code's distinct values with their counts (lab values are
    recorded at fixed precision, so that is far smaller than the events), and must give exactly the
    edges `np.quantile` gives on the expanded array (a zero edge may differ in sign only: -0.0 == 0.0).
    `values` must be sorted ascending, without NaN.
    This is numpy's default ('linear', Hyndman-Fan 7) rule: virtual index (n - 1) q, then numpy's
    two-sided lerp between the neighbouring order statistics.

    >>> v = np.array([1.0, 2.0, 2.0, 7.0, 7.0, 7.0, 9.0])
    >>> u, c = np.unique(v, return_counts=True)
    >>> bool(np.array_equal(quantile_edges_from_counts(u, c, 5), quantile_edges(v, 5)))
    True
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if n == 0 or n_bins < 2:
        return np.empty(0, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    q = np.arange(1, n_bins) / n_bins
    virtual = (n - 1) * q
    prev = np.floor(virtual)
    above = virtual >= n - 1
    prev_i = np.where(above, n - 1, prev).astype(np.int64)
    next_i = np.where(above, n - 1, prev + 1).astype(np.int64)
    gamma = virtual - np.where(above, -1.0, prev)  # numpy's gamma uses the index -1 above the bounds
    cum = np.cumsum(counts)
    a = values[np.searchsorted(cum, prev_i, side="right")]
    b = values[np.searchsorted(cum, next_i, side="right")]
    with np.errstate(invalid="ignore"):  # inf values give NaN edges, as np.quantile does
        diff = b - a
        out = a + diff * gamma
        np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5)
    return out


def assign_bins(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """0-based bin of each value; values above every edge (the maximum included) go to the top bin.

    >>> assign_bins(np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 2.0]))
    array([0, 1, 2, 2])
    """
    return np.searchsorted(edges, values, side="right")


@dataclass
class TokenizerStats:
    """Counts a researcher should see: what was dropped or unknown, and why."""

    events_in: int = 0
    events_outside_visits: int = 0
    events_other_family: int = 0
    event_tokens: int = 0
    unk_tokens: int = 0
    subjects_without_visits: int = 0
    subjects_without_birth: int = 0

    def add(self, other: TokenizerStats) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


@dataclass
class Timelines:
    """Full token timelines of many subjects as flat arrays with per-subject offsets (CSR layout)."""

    subject_ids: np.ndarray  # [S]
    offsets: np.ndarray  # [S + 1]
    token_ids: np.ndarray  # [N] int32
    types: np.ndarray  # [N] int8
    kinds: np.ndarray  # [N] int8  (K_*)
    avail_us: np.ndarray  # [N] int64: the token is known from this time on
    ages: np.ndarray  # [N] float32 years
    stats: TokenizerStats = field(default_factory=TokenizerStats)

    def index(self) -> dict[int, int]:
        return {int(s): i for i, s in enumerate(self.subject_ids)}


@dataclass
class Encoded:
    """One model input: token ids and side arrays, length <= max_len."""

    input_ids: np.ndarray
    type_ids: np.ndarray
    ages: np.ndarray
    times: np.ndarray
    segments: np.ndarray
    visit_orders: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


class Tokenizer:
    """Fit on train events, then turn any subject's events into EHRMamba token sequences."""

    def __init__(
        self,
        params: TokenizerParams,
        patterns: CodePatterns,
        vocab: list[str] | None = None,
        bins: dict[str, list[float]] | None = None,
    ) -> None:
        self.params = params
        self.patterns = patterns
        self.itos: list[str] = list(vocab) if vocab is not None else list(RESERVED)
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        self.bins = {k: np.asarray(v, dtype=np.float64) for k, v in (bins or {}).items()}
        self._type_cache: dict[str, int] = {}
        self._family_res = {
            fam: re.compile(getattr(patterns, fam))
            for fam in ("lab", "medication", "procedure", "diagnosis", "demographic")
        }

    # -- fitting -------------------------------------------------------------------------------
    @classmethod
    def fit(cls, train_events: pd.DataFrame, params: TokenizerParams, patterns: CodePatterns) -> Tokenizer:
        """Quantile bins and vocabulary from the train split's events only."""
        tok = cls(params, patterns)
        ev = tok._stream_events(train_events, find_visits(train_events, patterns))[0]
        labs = ev[ev["type"] == T_LAB]
        labs = labs[~np.isnan(labs[VALUE].to_numpy())]
        for code, vals in labs.groupby(CODE, sort=True)[VALUE]:
            edges = quantile_edges(vals.to_numpy(), params.n_bins)
            if len(edges):
                tok.bins[code] = edges
        strings = tok._token_strings(ev)
        counts = Counter(strings.tolist())
        tok.itos = list(RESERVED) + sorted(
            t for t, c in counts.items() if c >= params.min_count and t not in RESERVED
        )
        tok.stoi = {t: i for i, t in enumerate(tok.itos)}
        return tok

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def task_token_id(self, task: str) -> int:
        return self.stoi[f"[TASK_{task}]"]

    # -- event selection -------------------------------------------------------------------------
    def _code_type(self, code: str) -> int:
        t = self._type_cache.get(code)
        if t is None:
            t = T_OTHER
            for fam, rx in self._family_res.items():
                if rx.search(code):
                    t = FAMILY_TYPE[fam]
                    break
            self._type_cache[code] = t
        return t

    def code_types(self, codes: list[str]) -> np.ndarray:
        """Token type of each code (int8), for a shard's code dictionary: one regex pass per distinct code."""
        return np.fromiter((self._code_type(c) for c in codes), dtype=np.int8, count=len(codes))

    def _families(self) -> set[int]:
        fams = set(self.params.families)
        if self.params.include_diagnoses:
            fams.add("diagnosis")
        return {FAMILY_TYPE[f] for f in fams}

    def _stream_events(
        self, events: pd.DataFrame, visits: pd.DataFrame
    ) -> tuple[pd.DataFrame, TokenizerStats]:
        """Events that become tokens, each tagged with its visit; counts what was dropped and why."""
        stats = TokenizerStats(events_in=len(events))
        timed = events[events[TIME] >= 0]
        codes = timed[CODE]
        uniq = pd.unique(codes)
        type_of = {c: self._code_type(c) for c in uniq}
        types = codes.map(type_of).to_numpy(dtype=np.int8)
        keep = np.isin(types, list(self._families()))
        stats.events_other_family = int((~keep).sum()) + int((events[TIME] < 0).sum())
        ev = timed.loc[keep, [SUBJECT, TIME, CODE, VALUE]].copy()
        ev["type"] = types[keep]
        ev["order"] = np.arange(len(ev))
        if len(ev) and len(visits):
            v = visits[[SUBJECT, "admit", "discharge", "visit_no"]].sort_values("admit", kind="stable")
            ev = pd.merge_asof(
                ev.sort_values(TIME, kind="stable"),
                v,
                left_on=TIME,
                right_on="admit",
                by=SUBJECT,
                direction="backward",
            )
            inside = ev["admit"].notna() & (ev[TIME] <= ev["discharge"])
            stats.events_outside_visits = int((~inside).sum())
            ev = ev[inside].sort_values([SUBJECT, "order"], kind="stable")
            ev["visit_no"] = ev["visit_no"].astype(np.int64)
        else:
            stats.events_outside_visits = len(ev)
            ev = ev.iloc[0:0].assign(admit=0, discharge=0, visit_no=0)
        return ev.reset_index(drop=True), stats

    def _token_strings(self, ev: pd.DataFrame) -> np.ndarray:
        """Code strings with a `//Q{k}` quantile suffix for binned lab values."""
        out = ev[CODE].to_numpy(dtype=object).copy()
        is_lab = (ev["type"].to_numpy() == T_LAB) & ~np.isnan(ev[VALUE].to_numpy())
        if is_lab.any() and self.bins:
            sub = ev.loc[is_lab, [CODE, VALUE]]
            idx = np.flatnonzero(is_lab)
            for code, rows in sub.groupby(CODE, sort=False).indices.items():
                edges = self.bins.get(code)
                if edges is None:
                    continue
                b = assign_bins(sub[VALUE].to_numpy()[rows], edges)
                out[idx[rows]] = np.char.add(f"{code}//Q", (b + 1).astype(str)).astype(object)
        return out

    # -- timelines -------------------------------------------------------------------------------
    def timelines(self, events: pd.DataFrame) -> Timelines:
        """Each subject's full token timeline (no prediction cut yet), vectorised over subjects."""
        visits = find_visits(events, self.patterns)
        ev, stats = self._stream_events(events, visits)
        births = events[
            events[CODE].str.contains(re.compile(self.patterns.birth), na=False) & (events[TIME] >= 0)
        ]
        birth = births.groupby(SUBJECT)[TIME].min()
        subjects = np.sort(events[SUBJECT].unique())
        stats.subjects_without_visits = int(len(subjects) - visits[SUBJECT].nunique())
        stats.subjects_without_birth = int(len(np.setdiff1d(subjects, birth.index.to_numpy())))

        ids = np.fromiter(
            (self.stoi.get(s, UNK) for s in self._token_strings(ev)), dtype=np.int32, count=len(ev)
        )
        stats.event_tokens = len(ev)
        stats.unk_tokens = int((ids == UNK).sum())

        parts = [
            pd.DataFrame(
                {
                    SUBJECT: ev[SUBJECT].to_numpy(),
                    "visit_no": ev["visit_no"].to_numpy(),
                    "slot": 1,
                    "rank": np.arange(len(ev)),
                    "token_id": ids,
                    "type": ev["type"].to_numpy(np.int8),
                    "kind": K_EVENT,
                    "avail": ev[TIME].to_numpy(np.int64),
                }
            )
        ]
        v = visits
        prev_dis = v.groupby(SUBJECT)["discharge"].shift(1)
        has_gap = prev_dis.notna().to_numpy()
        gap_days = ((v["admit"] - prev_dis) / US_PER_DAY).to_numpy()
        gap_tok = np.array(
            [self.stoi[interval_token(d)] if h else 0 for d, h in zip(gap_days, has_gap)], np.int32
        )
        n = len(v)
        base = {
            SUBJECT: v[SUBJECT].to_numpy(),
            "visit_no": v["visit_no"].to_numpy(),
            "rank": np.zeros(n, np.int64),
        }
        for slot, tok, typ, kind, avail, mask in (
            (-2, gap_tok, T_INTERVAL, K_INTERVAL, v["admit"], has_gap),
            (-1, np.full(n, VS, np.int32), T_VISIT, K_VS, v["admit"], None),
            (2, np.full(n, VE, np.int32), T_VISIT, K_VE, v["discharge"], None),
            (3, np.full(n, REG, np.int32), T_SPECIAL, K_REG, v["discharge"], None),
        ):
            df = pd.DataFrame(
                {
                    **base,
                    "slot": slot,
                    "token_id": tok,
                    "type": np.int8(typ),
                    "kind": kind,
                    "avail": avail.to_numpy(np.int64),
                }
            )
            parts.append(df if mask is None else df[mask])
        tok = pd.concat(parts, ignore_index=True).sort_values(
            [SUBJECT, "visit_no", "slot", "rank"], kind="stable"
        )
        tok_sid = tok[SUBJECT].to_numpy()
        b = tok_sid_birth = pd.Series(tok_sid).map(birth).to_numpy(dtype=np.float64)
        ages = np.where(
            np.isnan(b), 0.0, (tok["avail"].to_numpy() - np.nan_to_num(tok_sid_birth)) / US_PER_YEAR
        )
        counts = pd.Series(tok_sid).value_counts().reindex(subjects, fill_value=0).to_numpy()
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return Timelines(
            subject_ids=subjects.astype(np.int64),
            offsets=offsets,
            token_ids=tok["token_id"].to_numpy(np.int32),
            types=tok["type"].to_numpy(np.int8),
            kinds=tok["kind"].to_numpy(np.int8),
            avail_us=tok["avail"].to_numpy(np.int64),
            ages=ages.astype(np.float32),
            stats=stats,
        )

    # -- encoding --------------------------------------------------------------------------------
    def encode(
        self, tl: Timelines, row: int, prediction_time: int | None = None, first_token: int = CLS
    ) -> Encoded:
        """Model input for subject `row` of `tl`, using only tokens available strictly before `prediction_time`.

        An open visit is closed with `[VE] [REG]`; the sequence is then truncated to the most recent
        `max_len` tokens, snapped to the start of a visit block, and `first_token` (`[CLS]` or a task
        token) is prepended.
        """
        lo, hi = int(tl.offsets[row]), int(tl.offsets[row + 1])
        avail = tl.avail_us[lo:hi]
        end = (
            hi if prediction_time is None else lo + int(np.searchsorted(avail, prediction_time, side="left"))
        )
        ids = tl.token_ids[lo:end]
        types = tl.types[lo:end]
        kinds = tl.kinds[lo:end]
        av = tl.avail_us[lo:end]
        ages = tl.ages[lo:end]
        if len(kinds) and kinds[-1] != K_REG:
            # The visit is still open at prediction time: close it. No information, the same for all samples.
            t_close = prediction_time if prediction_time is not None else int(av[-1])
            age_close = ages[-1] + (t_close - av[-1]) / US_PER_YEAR
            ids = np.concatenate([ids, [VE, REG]]).astype(np.int32)
            types = np.concatenate([types, [T_VISIT, T_SPECIAL]]).astype(np.int8)
            kinds = np.concatenate([kinds, [K_VE, K_REG]]).astype(np.int8)
            av = np.concatenate([av, [t_close, t_close]])
            ages = np.concatenate([ages, [age_close, age_close]]).astype(np.float32)
        budget = self.params.max_len - 1
        if len(ids) > budget:
            cut = len(ids) - budget
            starts = np.flatnonzero(
                (kinds == K_INTERVAL) | ((kinds == K_VS) & (np.roll(kinds, 1) != K_INTERVAL))
            )
            ok = starts[starts >= cut]
            if len(ok):
                keep = slice(int(ok[0]), None)
                ids, types, kinds, av, ages = ids[keep], types[keep], kinds[keep], av[keep], ages[keep]
            else:
                # The last visit alone is longer than the budget: keep its most recent tokens after a [VS].
                keep = slice(cut + 1, None)
                ids = np.concatenate([[VS], ids[keep]]).astype(np.int32)
                types = np.concatenate([[T_VISIT], types[keep]]).astype(np.int8)
                kinds = np.concatenate([[K_VS], kinds[keep]]).astype(np.int8)
                av = np.concatenate([[av[cut + 1]], av[keep]])
                ages = np.concatenate([[ages[cut + 1]], ages[keep]]).astype(np.float32)
        visit_orders = np.cumsum(kinds == K_VS).astype(np.int64)
        visit_orders[kinds == K_INTERVAL] = 0
        segments = np.where(visit_orders > 0, 2 - (visit_orders % 2), 0)
        visit_orders = np.minimum(visit_orders, self.params.max_visits - 1)
        first_av = av[0] if len(av) else (prediction_time or 0)
        first_age = ages[0] if len(ages) else 0.0
        return Encoded(
            input_ids=np.concatenate([[first_token], ids]).astype(np.int64),
            type_ids=np.concatenate([[T_SPECIAL], types]).astype(np.int64),
            ages=np.concatenate([[first_age], ages]).astype(np.float32),
            times=(np.concatenate([[first_av], av]) / US_PER_WEEK).astype(np.float32),
            segments=np.concatenate([[0], segments]).astype(np.int64),
            visit_orders=np.concatenate([[0], visit_orders]).astype(np.int64),
        )

    def decode(self, ids: np.ndarray) -> list[str]:
        return [self.itos[int(i)] for i in ids]

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """JSON with params, code patterns, vocabulary and bin edges; written atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {
            "params": asdict(self.params),
            "patterns": asdict(self.patterns),
            "vocab": self.itos,
            "bins": {k: v.tolist() for k, v in self.bins.items()},
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(blob, f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        blob = json.loads(Path(path).read_text())
        return cls(
            TokenizerParams(**blob["params"]), CodePatterns(**blob["patterns"]), blob["vocab"], blob["bins"]
        )
