"""The EHRMamba / CEHR-BERT token stream with side arrays (DESIGN.md section 6).

`[CLS] [VS] e1 e2 ... [VE] [REG] [W_k|M_k|LT] [VS] ... [VE] [REG]`

Interval tokens sit between a discharge and the next admission (< 28 d `W_{days//7}`, < 365 d
`M_{days//30}`, else `LT`). Lab tokens carry a per-code quantile bin fitted on the train split only
(a value at the maximum falls in the top bin). The vocabulary is fitted on train; unseen codes become
`[UNK]` and are counted. Side arrays per token: type, age (years), time (weeks since 1970), visit
segment (1/2 alternating, 0 outside visits) and visit order.

Representation options (`TokenizerParams.values / bins / time_tokens`; the defaults are the above).
They apply to lab events with a numeric value; other events are their plain code.

| option | tokens | side arrays |
|---|---|---|
| values: fused | `CODE//Q{k}` | - |
| values: unfused | `CODE` then `[Q{k}]` (same time, visit, type lab) | - |
| values: soft | `CODE//Q{k}` | `mix_ids`: the neighbouring bin's token, `mix_w` in [0, 0.5] |
| values: xval | `CODE` | `values`: train z-score clipped to [-5, 5], `value_mask` 1 |
| bins: clinical | bins 1/2/3 = below / inside (inclusive) / above the code's reference range | - |
| time_tokens: fixed13 | `[GAP_k]` before a token >= 5 min after the previous one | - |

Value bins, soft weights and z-scores are in `repro.data.values`; the fixed tokens and time units in
`repro.data.vocab`; the stored timelines in `repro.data.timelines`.

Time tokens `fixed13` (`GAP_EDGES_US`, the 13 bins of ETHOS): a `[GAP_k]` goes before every token whose
time is 5 minutes or more after the previous token of the subject's timeline. Between visits it
replaces the interval token (kind `K_INTERVAL`, a truncation boundary); inside a visit it has kind
`K_GAP`. Its availability time is that of the token after it: the gap is only known then. The 13
tokens sit right after `RESERVED` in a fixed13 vocabulary (ids `len(RESERVED) + k - 1`), always present.

Work is vectorised per batch of subjects (pandas / numpy): a subject's full timeline is built once
and stored as flat arrays with offsets; a prediction at time T takes the prefix of tokens available
strictly before T, closes an open visit with `[VE] [REG]`, then truncates to the most recent tokens,
snapped to a visit boundary, with `[CLS]` re-prepended.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from repro.config import CodePatterns, TokenizerParams, write_text_atomic
from repro.data.meds import CODE, SUBJECT, TIME, VALUE
from repro.data.tasks import find_visits
from repro.data.timelines import Timelines, TokenizerStats, insert_gap_tokens
from repro.data.values import assign_bins, clinical_edges, quantile_edges, soft_mix, value_summary, zscores
from repro.data.vocab import (
    CLS,
    FAMILY_TYPE,
    GAP_TOKENS,
    K_EVENT,
    K_INTERVAL,
    K_REG,
    K_VE,
    K_VS,
    REG,
    RESERVED,
    T_INTERVAL,
    T_LAB,
    T_OTHER,
    T_SPECIAL,
    T_VISIT,
    UNK,
    US_PER_DAY,
    US_PER_WEEK,
    US_PER_YEAR,
    VE,
    VS,
    interval_token,
)


@dataclass
class Encoded:
    """One model input: token ids and side arrays, length <= max_len.

    Value side arrays (always filled by `Tokenizer.encode`; None only when built by hand, where
    `collate` uses the neutral values): `values` float32 xval z-score (0 where none), `value_mask`
    int8 (1 on tokens that carry a value), `mix_ids` int64 soft neighbour token (= input_ids where
    none), `mix_w` float32 its weight in [0, 0.5] (0 where none).
    """

    input_ids: np.ndarray
    type_ids: np.ndarray
    ages: np.ndarray
    times: np.ndarray
    segments: np.ndarray
    visit_orders: np.ndarray
    values: np.ndarray | None = None
    value_mask: np.ndarray | None = None
    mix_ids: np.ndarray | None = None
    mix_w: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class _EventTokens:
    """Per event: its token string, the unfused bin token (None if none), the soft neighbour and weight,
    and the xval z-score (NaN if none). Arrays are None in modes that do not use them."""

    main: np.ndarray
    extra: np.ndarray | None = None
    mix: np.ndarray | None = None
    w: np.ndarray | None = None
    z: np.ndarray | None = None


class Tokenizer:
    """Fit on train events, then turn any subject's events into EHRMamba token sequences.

    Fitted state (all from the train split, except the clinical ranges, which come from the data's
    code metadata): `itos` (vocabulary), `bins` (inner bin edges per lab code), `clinical` (the
    reference range of each code binned low / normal / high), `limits` ([min, max] of each lab code's
    train values: the outer edges of soft bins) and `moments` ([mean, std] of each lab code's train
    values: xval's z-scores).
    """

    def __init__(
        self,
        params: TokenizerParams,
        patterns: CodePatterns,
        vocab: list[str] | None = None,
        bins: dict[str, list[float]] | None = None,
        *,
        clinical: dict[str, tuple[float, float]] | None = None,
        limits: dict[str, list[float]] | None = None,
        moments: dict[str, list[float]] | None = None,
    ) -> None:
        self.params = params
        self.patterns = patterns
        if vocab is None:
            vocab = list(RESERVED) + (GAP_TOKENS if params.time_tokens == "fixed13" else [])
        self.itos: list[str] = list(vocab)
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        self.bins = {k: np.asarray(v, dtype=np.float64) for k, v in (bins or {}).items()}
        self.clinical = {k: (float(v[0]), float(v[1])) for k, v in (clinical or {}).items()}
        self.limits = {k: np.asarray(v, dtype=np.float64) for k, v in (limits or {}).items()}
        self.moments = {k: np.asarray(v, dtype=np.float64) for k, v in (moments or {}).items()}
        self._type_cache: dict[str, int] = {}
        self._family_res = {
            fam: re.compile(getattr(patterns, fam))
            for fam in ("lab", "medication", "procedure", "diagnosis", "demographic")
        }

    # -- fitting -------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        train_events: pd.DataFrame,
        params: TokenizerParams,
        patterns: CodePatterns,
        ref_ranges: dict[str, tuple[float, float]] | None = None,
    ) -> Tokenizer:
        """Bins, value statistics and vocabulary from the train split's events only.

        `ref_ranges` (code -> (lower, upper), from `repro.data.meds.read_reference_ranges`) give the
        clinical bins when `params.bins == "clinical"`; codes without one get quantile bins.
        """
        tok = cls(params, patterns)
        ev = tok._stream_events(train_events, find_visits(train_events, patterns))[0]
        labs = ev[ev["type"] == T_LAB]
        labs = labs[~np.isnan(labs[VALUE].to_numpy())]
        ranges = (ref_ranges or {}) if params.bins == "clinical" else {}
        for code, vals in labs.groupby(CODE, sort=True)[VALUE]:
            v = vals.to_numpy()
            u, c = np.unique(v, return_counts=True)
            tok.limits[code], tok.moments[code] = value_summary(u.astype(np.float64), c)
            if params.values == "xval":
                continue  # one numeric token per code: no bins
            if code in ranges:
                tok.clinical[code] = ranges[code]
                edges = clinical_edges(*ranges[code])
            else:
                edges = quantile_edges(v, params.n_bins)
            if len(edges):
                tok.bins[code] = edges
        et = tok._event_tokens(ev)
        strings = et.main
        if et.extra is not None:  # unfused: the bin tokens count too
            strings = np.concatenate([strings, et.extra[et.extra != None]])  # noqa: E711
        tok.itos = tok._vocabulary(Counter(strings.tolist()))
        tok.stoi = {t: i for i, t in enumerate(tok.itos)}
        return tok

    def _vocabulary(self, counts: Counter) -> list[str]:
        """RESERVED (then the 13 gap tokens in fixed13), then tokens seen >= min_count times, sorted."""
        fixed = list(RESERVED) + (GAP_TOKENS if self.params.time_tokens == "fixed13" else [])
        skip = set(fixed)
        return fixed + sorted(t for t, c in counts.items() if c >= self.params.min_count and t not in skip)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def task_token_id(self, task: str) -> int:
        return self.stoi[f"[TASK_{task}]"]

    def gap_ids(self) -> np.ndarray:
        """Token ids of `[GAP_1]` .. `[GAP_13]` (fixed13 vocabularies only)."""
        return np.array([self.stoi[g] for g in GAP_TOKENS], dtype=np.int32)

    def with_params(self, params: TokenizerParams, patterns: CodePatterns | None = None) -> Tokenizer:
        """The same fitted state under other encode-time parameters (max_len, max_visits)."""
        return Tokenizer(
            params,
            patterns or self.patterns,
            self.itos,
            {k: v.tolist() for k, v in self.bins.items()},
            clinical=self.clinical,
            limits={k: v.tolist() for k, v in self.limits.items()},
            moments={k: v.tolist() for k, v in self.moments.items()},
        )

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

    def _event_tokens(self, ev: pd.DataFrame) -> _EventTokens:
        """Token strings of events: codes, with the value's bin for binned lab values (as `params.values`)."""
        mode = self.params.values
        main = ev[CODE].to_numpy(dtype=object).copy()
        n = len(main)
        out = _EventTokens(main)
        if mode == "unfused":
            out.extra = np.full(n, None, dtype=object)
        elif mode == "soft":
            out.mix = np.full(n, None, dtype=object)
            out.w = np.zeros(n, np.float64)
        elif mode == "xval":
            out.z = np.full(n, np.nan, np.float64)
        is_lab = (ev["type"].to_numpy() == T_LAB) & ~np.isnan(ev[VALUE].to_numpy())
        if is_lab.any() and (self.bins or self.moments):
            sub = ev.loc[is_lab, [CODE, VALUE]]
            idx = np.flatnonzero(is_lab)
            x_all = sub[VALUE].to_numpy().astype(np.float64)
            for code, rows in sub.groupby(CODE, sort=False).indices.items():
                x, at = x_all[rows], idx[rows]
                if mode == "xval":
                    m = self.moments.get(code)
                    if m is not None:
                        out.z[at] = zscores(x, m[0], m[1])
                    continue
                edges = self.bins.get(code)
                if edges is None:
                    continue
                if mode == "soft":
                    lim = self.limits[code]
                    b, nb, w = soft_mix(x, edges, lim[0], lim[1])
                    out.mix[at] = np.char.add(f"{code}//Q", (nb + 1).astype(str)).astype(object)
                    out.w[at] = w
                else:
                    b = assign_bins(x, edges)
                label = (b + 1).astype(str)
                if mode == "unfused":
                    out.extra[at] = np.char.add(np.char.add("[Q", label), "]").astype(object)
                else:
                    main[at] = np.char.add(f"{code}//Q", label).astype(object)
        if out.mix is not None:
            out.mix = np.where(out.mix == None, main, out.mix)  # noqa: E711
        return out

    def _token_strings(self, ev: pd.DataFrame) -> np.ndarray:
        """Token string of each event (the code's own token; unfused bin tokens are not included)."""
        return self._event_tokens(ev).main

    def _ids(self, strings: np.ndarray) -> np.ndarray:
        return np.fromiter((self.stoi.get(s, UNK) for s in strings), dtype=np.int32, count=len(strings))

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

        et = self._event_tokens(ev)
        ids = self._ids(et.main)
        stats.event_tokens = len(ev)
        stats.unk_tokens = int((ids == UNK).sum())
        mode = self.params.values
        ev_cols = {}
        if mode == "soft":
            mix = self._ids(et.mix)
            w = et.w.copy()
            none = (mix == UNK) | (ids == UNK) | (w <= 0)
            ev_cols = {"mix": np.where(none, ids, mix), "w": np.where(none, 0.0, w)}
        elif mode == "xval":
            ev_cols = {"z": et.z}

        def extras(tok: np.ndarray, n: int) -> dict:
            """Value columns of tokens without a value."""
            if mode == "soft":
                return {"mix": tok, "w": np.zeros(n)}
            if mode == "xval":
                return {"z": np.full(n, np.nan)}
            return {}

        parts = [
            pd.DataFrame(
                {
                    SUBJECT: ev[SUBJECT].to_numpy(),
                    "visit_no": ev["visit_no"].to_numpy(),
                    "slot": 1,
                    "rank": 2 * np.arange(len(ev)),
                    "token_id": ids,
                    "type": ev["type"].to_numpy(np.int8),
                    "kind": K_EVENT,
                    "avail": ev[TIME].to_numpy(np.int64),
                    **ev_cols,
                }
            )
        ]
        if et.extra is not None:  # unfused: the bin token right after its code
            has = np.flatnonzero(et.extra != None)  # noqa: E711
            bin_ids = self._ids(et.extra[has])
            stats.unk_tokens += int((bin_ids == UNK).sum())
            parts.append(
                pd.DataFrame(
                    {
                        SUBJECT: ev[SUBJECT].to_numpy()[has],
                        "visit_no": ev["visit_no"].to_numpy()[has],
                        "slot": 1,
                        "rank": 2 * has + 1,
                        "token_id": bin_ids,
                        "type": np.int8(T_LAB),
                        "kind": K_EVENT,
                        "avail": ev[TIME].to_numpy(np.int64)[has],
                    }
                )
            )
        v = visits
        prev_dis = v.groupby(SUBJECT)["discharge"].shift(1)
        has_gap = prev_dis.notna().to_numpy() & (self.params.time_tokens == "ehrmamba")
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
                    **extras(tok, n),
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
        token_ids = tok["token_id"].to_numpy(np.int32)
        tl = Timelines(
            subject_ids=subjects.astype(np.int64),
            offsets=offsets,
            token_ids=token_ids,
            types=tok["type"].to_numpy(np.int8),
            kinds=tok["kind"].to_numpy(np.int8),
            avail_us=tok["avail"].to_numpy(np.int64),
            ages=ages.astype(np.float32),
            stats=stats,
        )
        if mode == "soft":
            tl.mix_ids = tok["mix"].to_numpy(np.int32)
            tl.mix_w = tok["w"].to_numpy(np.float32)
        elif mode == "xval":
            tl.values = tok["z"].to_numpy(np.float32)
        if self.params.time_tokens == "fixed13":
            tl = insert_gap_tokens(tl, self.gap_ids())
        return tl

    # -- encoding --------------------------------------------------------------------------------
    def encode(
        self, tl: Timelines, row: int, prediction_time: int | None = None, first_token: int = CLS
    ) -> Encoded:
        """Model input for subject `row` of `tl`, using only tokens available strictly before `prediction_time`.

        An open visit is closed with `[VE] [REG]`; the sequence is then truncated to the most recent
        `max_len` tokens, snapped to the start of a visit block, and `first_token` (`[CLS]` or a task
        token) is prepended. The value side arrays are neutral (0, 0, the token itself, 0) on tokens
        without a value, including the prepended, closing and snapping tokens.
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
        vals = tl.values[lo:end] if tl.values is not None else np.full(end - lo, np.nan, np.float32)
        mix = tl.mix_ids[lo:end] if tl.mix_ids is not None else ids
        mw = tl.mix_w[lo:end] if tl.mix_w is not None else np.zeros(end - lo, np.float32)
        if len(kinds) and kinds[-1] != K_REG:
            # The visit is still open at prediction time: close it. No information, the same for all samples.
            t_close = prediction_time if prediction_time is not None else int(av[-1])
            age_close = ages[-1] + (t_close - av[-1]) / US_PER_YEAR
            ids = np.concatenate([ids, [VE, REG]]).astype(np.int32)
            types = np.concatenate([types, [T_VISIT, T_SPECIAL]]).astype(np.int8)
            kinds = np.concatenate([kinds, [K_VE, K_REG]]).astype(np.int8)
            av = np.concatenate([av, [t_close, t_close]])
            ages = np.concatenate([ages, [age_close, age_close]]).astype(np.float32)
            vals = np.concatenate([vals, [np.nan, np.nan]]).astype(np.float32)
            mix = np.concatenate([mix, [VE, REG]]).astype(np.int32)
            mw = np.concatenate([mw, [0.0, 0.0]]).astype(np.float32)
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
                vals, mix, mw = vals[keep], mix[keep], mw[keep]
            else:
                # The last visit alone is longer than the budget: keep its most recent tokens after a [VS].
                keep = slice(cut + 1, None)
                ids = np.concatenate([[VS], ids[keep]]).astype(np.int32)
                types = np.concatenate([[T_VISIT], types[keep]]).astype(np.int8)
                kinds = np.concatenate([[K_VS], kinds[keep]]).astype(np.int8)
                av = np.concatenate([[av[cut + 1]], av[keep]])
                ages = np.concatenate([[ages[cut + 1]], ages[keep]]).astype(np.float32)
                vals = np.concatenate([[np.nan], vals[keep]]).astype(np.float32)
                mix = np.concatenate([[VS], mix[keep]]).astype(np.int32)
                mw = np.concatenate([[0.0], mw[keep]]).astype(np.float32)
        visit_orders = np.cumsum(kinds == K_VS).astype(np.int64)
        visit_orders[kinds == K_INTERVAL] = 0
        segments = np.where(visit_orders > 0, 2 - (visit_orders % 2), 0)
        visit_orders = np.minimum(visit_orders, self.params.max_visits - 1)
        first_av = av[0] if len(av) else (prediction_time or 0)
        first_age = ages[0] if len(ages) else 0.0
        has_value = ~np.isnan(vals)
        return Encoded(
            input_ids=np.concatenate([[first_token], ids]).astype(np.int64),
            type_ids=np.concatenate([[T_SPECIAL], types]).astype(np.int64),
            ages=np.concatenate([[first_age], ages]).astype(np.float32),
            times=(np.concatenate([[first_av], av]) / US_PER_WEEK).astype(np.float32),
            segments=np.concatenate([[0], segments]).astype(np.int64),
            visit_orders=np.concatenate([[0], visit_orders]).astype(np.int64),
            values=np.concatenate([[0.0], np.where(has_value, vals, 0.0)]).astype(np.float32),
            value_mask=np.concatenate([[0], has_value]).astype(np.int8),
            mix_ids=np.concatenate([[first_token], mix]).astype(np.int64),
            mix_w=np.concatenate([[0.0], mw]).astype(np.float32),
        )

    def decode(self, ids: np.ndarray) -> list[str]:
        return [self.itos[int(i)] for i in ids]

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """JSON with params, code patterns, vocabulary and the fitted state; written atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {
            "params": asdict(self.params),
            "patterns": asdict(self.patterns),
            "vocab": self.itos,
            "bins": {k: v.tolist() for k, v in self.bins.items()},
            "clinical": {k: list(v) for k, v in self.clinical.items()},
            "limits": {k: v.tolist() for k, v in self.limits.items()},
            "moments": {k: v.tolist() for k, v in self.moments.items()},
        }
        write_text_atomic(path, json.dumps(blob))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        blob = json.loads(Path(path).read_text())
        return cls(
            TokenizerParams(**blob["params"]),
            CodePatterns(**blob["patterns"]),
            blob["vocab"],
            blob["bins"],
            clinical=blob.get("clinical"),
            limits=blob.get("limits"),
            moments=blob.get("moments"),
        )


def representation_stats(
    timelines: Timelines, tokenizer: Tokenizer, subjects: np.ndarray | None = None
) -> dict[str, float | int | str]:
    """What a representation costs: vocabulary size and per-subject timeline length (all, or `subjects`).

    Lengths are full timelines (every token of a subject, before any prediction cut or truncation).
    """
    lengths = np.diff(np.asarray(timelines.offsets))
    if subjects is not None:
        index = timelines.index()
        lengths = lengths[[index[int(s)] for s in subjects if int(s) in index]]
    p = tokenizer.params
    has = len(lengths) > 0
    return {
        "values": p.values,
        "bins": p.bins,
        "n_bins": p.n_bins,
        "time_tokens": p.time_tokens,
        "vocab_size": tokenizer.vocab_size,
        "binned_codes": len(tokenizer.bins),
        "clinical_codes": len(tokenizer.clinical),
        "subjects": int(len(lengths)),
        "tokens": int(lengths.sum()),
        "length_mean": float(lengths.mean()) if has else 0.0,
        "length_median": float(np.median(lengths)) if has else 0.0,
        "length_p90": float(np.quantile(lengths, 0.9)) if has else 0.0,
    }
