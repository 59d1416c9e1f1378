"""Token representations (TokenizerParams.values / bins / time_tokens) on hand-built values.

Each encoder is checked where it can go wrong: bin edges, the top value, NaN values, unseen codes,
inclusive clinical limits, continuity of soft bins across an edge, xval z-scores fitted on train only,
the fixed13 gap boundaries and that a gap token is never known before the event after it. The
streaming path's equality with these in-memory results is in tests/test_stream.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_meds
from hypothesis import given, settings
from hypothesis import strategies as st
from test_stream import random_events

from repro.config import CodePatterns, ParamsError, TokenizerParams
from repro.data import stream
from repro.data.dataset import collate
from repro.data.meds import load_meds, read_reference_ranges
from repro.data.tokenizer import Encoded, Tokenizer, representation_stats
from repro.data.values import assign_bins, clinical_edges, quantile_edges, soft_mix
from repro.data.vocab import (
    CLS,
    GAP_TOKENS,
    K_GAP,
    K_INTERVAL,
    K_VS,
    PAD,
    REG,
    RESERVED,
    T_INTERVAL,
    T_LAB,
    UNK,
    VE,
    gap_bin,
)

P = CodePatterns()
A, B, Z = "LAB//A//u", "LAB//B//u", "LAB//Z//u"  # Z never appears in train
MED = "MEDICATION//X//Administered//1"
MINUTE = 60_000_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR
T0 = int(np.datetime64("2150-01-01T08:00", "us").astype(np.int64))


def events(subjects: dict[int, list[tuple]]) -> pd.DataFrame:
    """MEDS rows from {subject: [(time offset in us from T0, code, value), ...]}; admission / discharge codes
    are given as "ADM" / "DIS". Each subject gets a birth 50 years before T0."""
    rows = []
    for s, evs in subjects.items():
        rows.append((s, T0 - 50 * 365 * DAY, "MEDS_BIRTH", np.nan))
        for t, code, value in evs:
            code = {
                "ADM": "HOSPITAL_ADMISSION//EW EMER.//EMERGENCY ROOM",
                "DIS": "HOSPITAL_DISCHARGE//HOME",
            }.get(code, code)
            rows.append((s, T0 + int(t), code, value))
    return pd.DataFrame(
        {
            "subject_id": np.array([r[0] for r in rows], np.int64),
            "time": np.array([r[1] for r in rows], np.int64),
            "code": np.array([r[2] for r in rows], dtype=object),
            "numeric_value": np.array([r[3] for r in rows], np.float32),
        }
    )


def one_visit(labs: list[tuple[str, float]], gap=HOUR) -> list[tuple]:
    """One admission with `labs` one `gap` apart, discharged an hour after the last."""
    rows = [(0, "ADM", np.nan)]
    rows += [((i + 1) * gap, code, v) for i, (code, v) in enumerate(labs)]
    rows.append(((len(labs) + 2) * gap, "DIS", np.nan))
    return rows


TRAIN, HELD_OUT = 1, 3


def fit(train_labs, held_out_labs=(), ranges=None, **kw):
    """Tokenizer fitted on subject 1 (train) only; timelines of both subjects."""
    ev = events({TRAIN: one_visit(list(train_labs)), HELD_OUT: one_visit(list(held_out_labs))})
    tok = Tokenizer.fit(ev[ev["subject_id"] == TRAIN], TokenizerParams(**kw), P, ranges)
    return tok, tok.timelines(ev)


def lab_tokens(tok, tl, subject, field="token_ids"):
    """The subject's lab tokens (type lab) as strings, or another per-token array at those tokens."""
    i = tl.index()[subject]
    sl = slice(tl.offsets[i], tl.offsets[i + 1])
    lab = tl.types[sl] == T_LAB
    a = getattr(tl, field)[sl][lab]
    return tok.decode(a) if field in ("token_ids", "mix_ids") else a


# -- params -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, bad, allowed",
    [
        ("values", "binned", "['fused', 'unfused', 'soft', 'xval']"),
        ("bins", "deciles", "['quantile', 'clinical']"),
        ("time_tokens", "ethos", "['ehrmamba', 'fixed13']"),
    ],
)
def test_params_name_the_field_and_the_allowed_values(field, bad, allowed):
    with pytest.raises(ParamsError, match=rf"tokenizer\.{field} must be one of {re.escape(allowed)}"):
        TokenizerParams(**{field: bad})


def test_defaults_reproduce_todays_tokens():
    """The default options give the tokens of the tokenizer before they existed (digest taken from it)."""
    ev, splits = random_events(0)
    train = [s for s, sp in splits.items() if sp == "train"]
    params = TokenizerParams(n_bins=3)
    assert (params.values, params.bins, params.time_tokens) == ("fused", "quantile", "ehrmamba")
    tok = Tokenizer.fit(ev[ev["subject_id"].isin(train)], params, P)
    tl = tok.timelines(ev)
    h = hashlib.sha256("\n".join(tok.decode(tl.token_ids)).encode())
    for k in ("offsets", "types", "kinds", "avail_us", "ages"):
        h.update(np.ascontiguousarray(getattr(tl, k)).tobytes())
    assert h.hexdigest() == "00221dc0d24e1c7d76d81759c5b0ecc368e62ad8e37cadd9b04c91acae972e8b"
    assert tl.values is None and tl.mix_ids is None and tl.mix_w is None  # no memory spent on them
    assert not any(t.startswith(("[GAP_", "[Q")) for t in tok.itos)
    enc = tok.encode(tl, 0)
    assert (enc.mix_ids == enc.input_ids).all() and not enc.mix_w.any()
    assert not enc.values.any() and not enc.value_mask.any()


# -- fused quantile bins ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n_bins", [5, 10, 20])
def test_fused_bins_edges_top_value_nan_and_unseen(n_bins):
    train = [(A, float(v)) for v in range(1, 41)] + [(A, np.nan), (MED, np.nan)]
    held = [
        (A, 100.0),
        (A, -5.0),
        (A, 40.0),
        (A, np.nan),
        (Z, 3.0),
        ("MEDICATION//NEW//Administered//2", np.nan),
    ]
    tok, tl = fit(train, held, n_bins=n_bins)
    np.testing.assert_array_equal(tok.bins[A], np.quantile(np.arange(1, 41.0), np.arange(1, n_bins) / n_bins))
    assert sorted(t for t in tok.itos if t.startswith(A + "//Q")) == sorted(
        f"{A}//Q{k}" for k in range(1, n_bins + 1)
    )
    got = lab_tokens(tok, tl, TRAIN)
    assert got[0] == f"{A}//Q1" and got[39] == f"{A}//Q{n_bins}"  # the maximum is in the top bin
    assert got[40] == A  # NaN: the plain code, no bin
    assert lab_tokens(tok, tl, HELD_OUT) == [f"{A}//Q{n_bins}", f"{A}//Q1", f"{A}//Q{n_bins}", A, "[UNK]"]
    assert tl.stats.unk_tokens == 2  # the unseen lab and the unseen medication


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=80),
    st.sampled_from([5, 10, 20]),
)
def test_the_maximum_is_always_in_the_top_bin(values, n_bins):
    v = np.array(values, dtype=np.float32)
    edges = quantile_edges(v, n_bins)
    b = assign_bins(v.astype(np.float64), edges)
    assert b[np.argmax(v)] == n_bins - 1 and b.min() >= 0 and b.max() <= n_bins - 1


# -- unfused ----------------------------------------------------------------------------------------------


def test_unfused_code_then_shared_bin_token():
    train = [(A, 1.0), (A, 2.0), (A, 3.0), (A, 4.0), (B, 10.0), (B, 20.0), (A, np.nan)]
    tok, tl = fit(train, [(A, 9.0), (Z, 1.0)], n_bins=2, values="unfused")
    assert {"[Q1]", "[Q2]", A, B} <= set(tok.stoi) and not any("//Q" in t for t in tok.itos)
    assert lab_tokens(tok, tl, TRAIN) == [A, "[Q1]", A, "[Q1]", A, "[Q2]", A, "[Q2]", B, "[Q1]", B, "[Q2]", A]
    i = tl.index()[TRAIN]
    sl = slice(tl.offsets[i], tl.offsets[i + 1])
    ids, av, kinds = tl.token_ids[sl], tl.avail_us[sl], tl.kinds[sl]
    q = np.flatnonzero(np.isin(ids, [tok.stoi["[Q1]"], tok.stoi["[Q2]"]]))
    assert (av[q] == av[q - 1]).all() and (kinds[q] == kinds[q - 1]).all()  # same time and kind as its code
    # Held out: the top value in the top bin; an unseen code is [UNK] with no bin token, and counted.
    assert lab_tokens(tok, tl, HELD_OUT) == [A, "[Q2]", "[UNK]"]
    assert tl.stats.unk_tokens == 1
    enc = tok.encode(tl, tl.index()[HELD_OUT])
    assert tok.decode(enc.input_ids)[2:5] == [A, "[Q2]", "[UNK]"]


# -- clinical bins ------------------------------------------------------------------------------------------


def test_clinical_bins_are_inclusive_at_both_limits():
    train = [(A, 2.99), (A, 3.0), (A, 5.0), (A, 7.0), (A, 7.01), (B, 1.0), (B, 2.0), (B, 3.0), (B, 4.0)]
    tok, tl = fit(train, [(A, -1.0), (A, 1e6)], ranges={A: (3.0, 7.0)}, n_bins=4, bins="clinical")
    assert tok.clinical == {A: (3.0, 7.0)}
    got = lab_tokens(tok, tl, TRAIN)
    assert got[:5] == [f"{A}//Q1", f"{A}//Q2", f"{A}//Q2", f"{A}//Q2", f"{A}//Q3"]
    assert got[5:] == [f"{B}//Q1", f"{B}//Q2", f"{B}//Q3", f"{B}//Q4"]  # no range: quantile bins
    assert lab_tokens(tok, tl, HELD_OUT) == [f"{A}//Q1", f"{A}//Q3"]
    # Without `bins: clinical` the ranges are ignored.
    plain, _ = fit(train, ranges={A: (3.0, 7.0)}, n_bins=4)
    assert plain.clinical == {} and len(plain.bins[A]) == 3


def test_clinical_limits_compare_at_float32_precision():
    """0.3 is not a float32: a value written as the limit must still count as inside the range."""
    edges = clinical_edges(0.3, 0.6)
    x = np.array([0.29, 0.3, 0.6, 0.61], dtype=np.float32).astype(np.float64)
    assert assign_bins(x, edges).tolist() == [0, 1, 1, 2]


@pytest.mark.parametrize("values", ["unfused", "soft"])
def test_clinical_bins_with_unfused_and_soft(values):
    train = [(A, 1.0), (A, 3.0), (A, 5.0), (A, 7.0), (A, 9.0)]
    tok, tl = fit(train, ranges={A: (3.0, 7.0)}, bins="clinical", values=values)
    if values == "unfused":
        assert lab_tokens(tok, tl, TRAIN) == [A, "[Q1]", A, "[Q2]", A, "[Q2]", A, "[Q2]", A, "[Q3]"]
    else:
        # Bins [1, 3), [3, 7], (7, 9]: 1 and 9 are the outer ends, 5 the middle, 3 and 7 the edges.
        w = lab_tokens(tok, tl, TRAIN, "mix_w")
        np.testing.assert_allclose(w, [0, 0.5, 0, 0.5, 0], atol=1e-6)
        assert lab_tokens(tok, tl, TRAIN, "mix_ids")[1] == f"{A}//Q1"


def test_reference_ranges_from_code_metadata(tmp_path):
    root = tmp_path / "m"
    (root / "metadata").mkdir(parents=True)
    assert read_reference_ranges(root) == {}  # no file
    table = {
        "code": pa.array([A, B, Z, "LAB//C//u", A], pa.string()),
        "description": pa.array([None] * 5, pa.string()),
        "parent_codes": pa.array([None] * 5, pa.list_(pa.string())),
    }
    pq.write_table(pa.table(table), root / "metadata" / "codes.parquet")
    assert read_reference_ranges(root) == {}  # no range columns
    table["ref_range_lower"] = pa.array([1.0, None, 5.0, np.inf, 0.0], pa.float64())
    table["ref_range_upper"] = pa.array([2.0, 3.0, 4.0, 9.0, 9.0], pa.float64())
    pq.write_table(pa.table(table), root / "metadata" / "codes.parquet")
    # B: no lower; Z: inverted; C: not finite; A's second row: the first usable row wins.
    assert read_reference_ranges(root) == {A: (1.0, 2.0)}


def test_synthetic_metadata_carries_lab_ranges(tmp_path):
    import meds

    from repro.data.synthetic import LABS, LACTATE, REFERENCE_RANGES, write_synthetic_meds

    root = write_synthetic_meds(tmp_path / "syn", 20, seed=2, shard_size=10)
    table = pq.read_table(root / "metadata" / "codes.parquet")
    meds.CodeMetadataSchema.validate(table)
    ranges = read_reference_ranges(root)
    assert ranges == {code: REFERENCE_RANGES[code] for code, _, _ in [*LABS.values(), LACTATE]}
    code, mean, sd = LABS["potassium"]
    assert ranges[code] == (round(mean - 2 * sd, 2), round(mean + 2 * sd, 2))


# -- soft discretization ----------------------------------------------------------------------------------------


def test_soft_mix_hand_values():
    v = np.array([-1.0, 0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 6.0, 7.0])
    b, nb, w = soft_mix(v, np.array([2.0, 4.0]), 0.0, 6.0)
    assert b.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert nb.tolist() == [0, 0, 0, 1, 0, 0, 1, 2, 1, 2, 2]  # none below 0 or above the top bin
    np.testing.assert_allclose(w, [0, 0, 0, 0.25, 0.5, 0.25, 0, 0.25, 0.5, 0, 0])
    # A single bin and a zero-width bin have no neighbour.
    assert soft_mix(np.array([3.0]), np.empty(0), 0.0, 6.0)[2].tolist() == [0.0]
    assert soft_mix(np.array([2.0]), np.array([2.0, 2.0]), 2.0, 2.0)[2].tolist() == [0.0]


def _mixture(v: float, edges: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """The soft embedding with one-hot bin embeddings: (1 - w) e_bin + w e_neighbour."""
    b, nb, w = soft_mix(np.array([v]), edges, vmin, vmax)
    out = np.zeros(len(edges) + 1)
    out[b[0]] += 1 - w[0]
    out[nb[0]] += w[0]
    return out


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0.01, 100), min_size=1, max_size=19),
    st.floats(-100, 100),
    st.lists(st.floats(0, 1), min_size=5, max_size=5),
)
def test_soft_embedding_is_continuous_across_every_edge(gaps, start, probes):
    """At an edge both sides give 0.5 / 0.5 of the same two bins; elsewhere the weight stays in [0, 0.5]."""
    edges = start + np.cumsum(gaps)
    vmin, vmax = start, edges[-1] + 1.0
    for k, e in enumerate(edges):
        at = _mixture(e, edges, vmin, vmax)
        below = _mixture(np.nextafter(e, -np.inf), edges, vmin, vmax)
        np.testing.assert_allclose(at, below, atol=1e-9)
        assert at[k] == pytest.approx(0.5) and at[k + 1] == pytest.approx(0.5)
    x = vmin + np.array(probes) * (vmax - vmin)
    _, nb, w = soft_mix(x, edges, vmin, vmax)
    assert ((w >= 0) & (w <= 0.5)).all() and ((nb >= 0) & (nb <= len(edges))).all()


def test_soft_tokens_side_arrays_and_missing_neighbours():
    train = [(A, float(v)) for v in (1, 2, 3, 4, 5, 6, 7, 8)] + [(A, np.nan)]
    tok, tl = fit(train, [(A, 4.5), (A, 4.4), (A, 100.0), (A, np.nan), (Z, 1.0)], n_bins=2, values="soft")
    fused, _ = fit(train, n_bins=2)
    assert tok.itos == fused.itos  # the soft vocabulary is the fused one
    assert tok.limits[A].tolist() == [1.0, 8.0]
    # Edge 4.5; bins [1, 4.5] and [4.5, 8].
    assert lab_tokens(tok, tl, HELD_OUT) == [f"{A}//Q2", f"{A}//Q1", f"{A}//Q2", A, "[UNK]"]
    assert lab_tokens(tok, tl, HELD_OUT, "mix_ids") == [f"{A}//Q1", f"{A}//Q2", f"{A}//Q2", A, "[UNK]"]
    w = lab_tokens(tok, tl, HELD_OUT, "mix_w")
    np.testing.assert_allclose(w, [0.5, 3.4 / 3.5 - 0.5, 0, 0, 0], atol=1e-6)  # 4.4: t = 3.4 / 3.5 in Q1
    assert (tl.mix_w >= 0).all() and (tl.mix_w <= 0.5).all()
    not_lab = tl.types != T_LAB
    assert (tl.mix_ids[not_lab] == tl.token_ids[not_lab]).all() and not tl.mix_w[not_lab].any()
    # A neighbour below min_count is not in the vocabulary: no mix.
    sparse = [(A, 1.0), (A, 1.0), (A, 3.0), (A, 5.0), (A, 5.0), (A, 5.0)]
    tok2, tl2 = fit(sparse, [(A, 2.2)], n_bins=3, values="soft", min_count=2)
    np.testing.assert_allclose(tok2.bins[A], [7 / 3, 5.0])  # Q2 = [2.33, 5) holds only the 3
    assert f"{A}//Q2" not in tok2.stoi and f"{A}//Q1" in tok2.stoi
    assert lab_tokens(tok2, tl2, HELD_OUT) == [f"{A}//Q1"]  # t = 0.9: would lean 0.4 toward Q2
    assert lab_tokens(tok2, tl2, HELD_OUT, "mix_w").tolist() == [0.0]


# -- xval --------------------------------------------------------------------------------------------------------


def test_xval_z_scores_from_train_only(tmp_path):
    train = [(A, 1.0), (A, 3.0), (A, 5.0), (A, 2.0), (A, 4.0), (A, 6.0), (B, 7.0), (A, np.nan)]
    held = [(A, 100.0), (A, -1000.0), (A, 3.5), (B, 9.0), (Z, 1.0)]
    tok, tl = fit(train, held, values="xval")
    vals = np.array([1, 3, 5, 2, 4, 6], dtype=np.float64)
    np.testing.assert_allclose(tok.moments[A], [vals.mean(), vals.std()])
    assert tok.bins == {} and not any("//Q" in t for t in tok.itos)
    assert lab_tokens(tok, tl, TRAIN) == [A] * 6 + [B, A]
    z = lab_tokens(tok, tl, TRAIN, "values")
    np.testing.assert_allclose(z[:6], (vals - vals.mean()) / vals.std(), rtol=1e-6)
    assert z[6] == 0.0  # one train value: std 0
    assert np.isnan(z[7])  # NaN: no value
    zh = lab_tokens(tok, tl, HELD_OUT, "values")
    assert zh[:4].tolist() == [5.0, -5.0, 0.0, 0.0] and np.isnan(zh[4])  # clipped; unseen code: no value
    assert lab_tokens(tok, tl, HELD_OUT)[4] == "[UNK]"
    enc = tok.encode(tl, tl.index()[HELD_OUT])
    lab = enc.type_ids == T_LAB
    assert enc.value_mask[lab].tolist() == [1, 1, 1, 1, 0] and not enc.value_mask[~lab].any()
    assert enc.values[~lab].tolist() == [0.0] * int((~lab).sum())
    # Streamed from a MEDS directory: the held-out extreme values do not move the train statistics.
    root = tmp_path / "meds"
    ev = events({TRAIN: one_visit(train), 2: one_visit(held), HELD_OUT: one_visit([(A, -50.0)])})
    write_meds(root, ev, {TRAIN: "train", 2: "tuning", HELD_OUT: "held_out"})
    got = stream.prepare_data(
        load_meds(root), TokenizerParams(values="xval"), P, ["mortality_1m"], progress=False
    )
    np.testing.assert_array_equal(got.tokenizer.moments[A], tok.moments[A])
    np.testing.assert_array_equal(got.tokenizer.limits[A], [1.0, 6.0])


# -- fixed13 time tokens -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gap, k",
    [
        (0, 0),
        (5 * MINUTE - 1, 0),
        (5 * MINUTE, 1),
        (15 * MINUTE - 1, 1),
        (15 * MINUTE, 2),
        (HOUR, 3),
        (2 * HOUR, 4),
        (6 * HOUR, 5),
        (12 * HOUR, 6),
        (DAY, 7),
        (3 * DAY, 8),
        (7 * DAY, 9),
        (14 * DAY, 10),
        (30 * DAY, 11),
        (90 * DAY, 12),
        (180 * DAY - 1, 12),
        (180 * DAY, 13),
        (4000 * DAY, 13),
    ],
)
def test_fixed13_bin_boundaries(gap, k):
    assert gap_bin(np.array([gap]))[0] == k


def fixed13_subject() -> pd.DataFrame:
    """Visit 1: events 4 min 59 s, then exactly 5 min, then 15 min apart; visit 2 exactly 180 days after
    discharge 1; visit 3 three minutes after discharge 2."""
    t1 = 0
    e1 = t1 + 5 * MINUTE - 1_000_000  # 4 min 59 s: no token
    e2 = e1 + 5 * MINUTE  # exactly 5 min: [GAP_1]
    e3 = e2 + 15 * MINUTE  # exactly 15 min: [GAP_2]
    d1 = e3  # discharged with the last lab: no gap before [VE]
    a2 = d1 + 180 * DAY  # [GAP_13] instead of [LT]
    d2 = a2 + 2 * HOUR  # [GAP_4] before [VE]
    a3 = d2 + 3 * MINUTE  # no token between the visits
    rows = [(t1, "ADM", np.nan), (e1, A, 1.0), (e2, MED, np.nan), (e3, A, 2.0), (d1, "DIS", np.nan)]
    rows += [(a2, "ADM", np.nan), (d2, "DIS", np.nan), (a3, "ADM", np.nan), (a3 + HOUR, A, 3.0)]
    rows += [(a3 + 2 * HOUR, "DIS", np.nan)]
    return events({TRAIN: rows})


def test_fixed13_tokens_replace_intervals_and_mark_gaps_inside_visits():
    ev = fixed13_subject()
    tok = Tokenizer.fit(ev, TokenizerParams(n_bins=1, time_tokens="fixed13"), P)
    assert tok.itos[len(RESERVED) : len(RESERVED) + 13] == GAP_TOKENS  # fixed ids, used or not
    tl = tok.timelines(ev)
    got = tok.decode(tl.token_ids)
    assert got == [
        "[VS]",
        A,
        "[GAP_1]",
        MED,
        "[GAP_2]",
        A,
        "[VE]",
        "[REG]",
        "[GAP_13]",
        "[VS]",
        "[GAP_4]",
        "[VE]",
        "[REG]",
        "[VS]",
        "[GAP_3]",
        A,
        "[GAP_3]",
        "[VE]",
        "[REG]",
    ]
    gaps = np.flatnonzero(np.char.startswith(np.array(got), "[GAP_"))
    assert (tl.types[gaps] == T_INTERVAL).all()
    assert tl.kinds[gaps].tolist() == [K_GAP, K_GAP, K_INTERVAL, K_GAP, K_GAP, K_GAP]
    assert (tl.avail_us[gaps] == tl.avail_us[gaps + 1]).all()  # known with the token after it
    enc = tok.encode(tl, 0)
    assert enc.visit_orders[1:].tolist() == [1] * 8 + [0] + [2] * 4 + [3] * 6  # between visits: no visit
    ehr = Tokenizer.fit(ev, TokenizerParams(n_bins=1), P)
    assert {"[M_6]", "[W_0]"} <= set(ehr.decode(ehr.timelines(ev).token_ids))  # what the gaps replace


def test_fixed13_gap_token_is_not_known_before_the_event_after_it():
    ev = fixed13_subject()
    tok = Tokenizer.fit(ev, TokenizerParams(n_bins=1, time_tokens="fixed13"), P)
    tl = tok.timelines(ev)
    e2 = T0 + 2 * 5 * MINUTE - 1_000_000
    for t in (e2 - MINUTE, e2):  # between the two events, and at the second (prediction time is exclusive)
        got = tok.decode(tok.encode(tl, 0, t).input_ids)
        assert got == ["[CLS]", "[VS]", A, "[VE]", "[REG]"]
    got = tok.decode(tok.encode(tl, 0, e2 + 1).input_ids)
    assert got == ["[CLS]", "[VS]", A, "[GAP_1]", MED, "[VE]", "[REG]"]
    # The 180-day gap is known at the next admission only.
    a2 = e2 + 15 * MINUTE + 180 * DAY
    assert "[GAP_13]" not in tok.decode(tok.encode(tl, 0, a2).input_ids)
    assert tok.decode(tok.encode(tl, 0, a2 + 1).input_ids)[-4:] == ["[GAP_13]", "[VS]", "[VE]", "[REG]"]


def test_fixed13_truncation_snaps_to_visits_not_to_gaps_inside_them():
    ev = fixed13_subject()
    tok = Tokenizer.fit(ev, TokenizerParams(n_bins=1, time_tokens="fixed13", max_len=16), P)
    tl = tok.timelines(ev)
    got = tok.decode(tok.encode(tl, 0).input_ids)
    assert got[:3] == ["[CLS]", "[GAP_13]", "[VS]"]  # the between-visit gap opens the kept block
    tok.params = dataclasses.replace(tok.params, max_len=8)
    got = tok.decode(tok.encode(tl, 0).input_ids)
    assert got == ["[CLS]", "[VS]", "[GAP_3]", A, "[GAP_3]", "[VE]", "[REG]"]


# -- encode, collate, persistence, statistics -------------------------------------------------------------------------


@pytest.mark.parametrize("values", ["soft", "xval"])
def test_encode_gives_neutral_values_to_added_tokens(values):
    train = [(A, float(v)) for v in range(1, 9)]
    tok, tl = fit(train, n_bins=2, values=values)
    t = T0 + 3 * HOUR + 1  # inside the visit: closed by encode
    enc = tok.encode(tl, tl.index()[TRAIN], t, first_token=tok.task_token_id("mortality_1m"))
    assert enc.input_ids[-2:].tolist() == [VE, REG]
    for i in (0, -2, -1):
        assert enc.values[i] == 0 and enc.value_mask[i] == 0 and enc.mix_w[i] == 0
        assert enc.mix_ids[i] == enc.input_ids[i]
    assert enc.values.dtype == np.float32 and enc.value_mask.dtype == np.int8
    assert enc.mix_ids.dtype == np.int64 and enc.mix_w.dtype == np.float32
    assert len({len(getattr(enc, f.name)) for f in dataclasses.fields(enc)}) == 1


def test_collate_always_carries_the_value_arrays_padded_neutrally():
    train = [(A, float(v)) for v in range(1, 9)]
    tok, tl = fit(train, [(A, 2.2)], n_bins=2, values="soft")
    a = tok.encode(tl, tl.index()[TRAIN])
    b = tok.encode(tl, tl.index()[HELD_OUT])
    hand = Encoded(
        *(getattr(b, f) for f in ("input_ids", "type_ids", "ages", "times", "segments", "visit_orders"))
    )
    b.input_ids[-1] = tok.task_token_id("mortality_1m")  # as MPF's prompt "last" does after encode
    batch = collate([(a,), (b,), (hand,)])
    assert set(batch) == {
        "input_ids",
        "type_ids",
        "ages",
        "times",
        "segments",
        "visit_orders",
        "attention_mask",
        "values",
        "value_mask",
        "mix_ids",
        "mix_w",
    }
    assert batch["values"].dtype == torch.float32 and batch["value_mask"].dtype == torch.float32
    assert batch["mix_ids"].dtype == torch.int64 and batch["mix_w"].dtype == torch.float32
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["mix_ids"][pad] == PAD).all() and not batch["mix_w"][pad].any()
    assert not batch["values"][pad].any() and not batch["value_mask"][pad].any()
    none = batch["mix_w"] == 0
    assert (batch["mix_ids"][none] == batch["input_ids"][none]).all()
    assert batch["mix_w"][0].max() > 0 and (batch["mix_w"][0, : len(a)].numpy() == a.mix_w).all()
    assert not batch["mix_w"][2].any()  # a hand-built Encoded: neutral values
    # The existing keys are what they were: compare with a batch of hand-built items.
    old = collate(
        [(Encoded(*(getattr(e, f.name) for f in dataclasses.fields(e)[:6])),) for e in (a, b, hand)]
    )
    for k in ("input_ids", "type_ids", "ages", "times", "segments", "visit_orders", "attention_mask"):
        assert torch.equal(batch[k], old[k])


@pytest.mark.parametrize(
    "kw",
    [
        {"values": "soft", "bins": "clinical", "time_tokens": "fixed13"},
        {"values": "xval", "time_tokens": "fixed13"},
        {"values": "unfused", "bins": "clinical"},
    ],
)
def test_save_load_round_trips_the_fitted_state(tmp_path, kw):
    train = [(A, float(v)) for v in range(1, 9)] + [(B, 1.0), (B, 5.0)]
    tok, tl = fit(train, [(A, 3.3)], ranges={A: (2.0, 6.0)}, n_bins=3, **kw)
    tok.save(tmp_path / "tok.json")
    back = Tokenizer.load(tmp_path / "tok.json")
    assert back.params == tok.params and back.itos == tok.itos and back.clinical == tok.clinical
    for state in ("bins", "limits", "moments"):
        a, b = getattr(tok, state), getattr(back, state)
        assert list(a) == list(b) and all(np.array_equal(a[c], b[c]) for c in a), state
    ev = events({TRAIN: one_visit(train), HELD_OUT: one_visit([(A, 3.3)])})
    tl2 = back.timelines(ev)
    for k in ("token_ids", "kinds", "avail_us", "values", "mix_ids", "mix_w"):
        x, y = getattr(tl, k), getattr(tl2, k)
        assert (x is None and y is None) or np.array_equal(x, y, equal_nan=True), k


def test_representation_stats():
    train = [(A, float(v)) for v in range(1, 9)]
    tok, tl = fit(train, [(A, 3.3), (MED, np.nan)], n_bins=2, values="unfused")
    got = representation_stats(tl, tok)
    lengths = np.diff(tl.offsets)
    assert lengths.tolist() == [3 + 16, 3 + 2 + 1]
    assert got["vocab_size"] == tok.vocab_size and got["values"] == "unfused" and got["subjects"] == 2
    assert got["length_mean"] == lengths.mean() and got["length_median"] == np.median(lengths)
    assert got["length_p90"] == pytest.approx(np.quantile(lengths, 0.9)) and got["tokens"] == lengths.sum()
    assert representation_stats(tl, tok, subjects=[TRAIN])["length_mean"] == 19.0


def test_first_token_and_unknowns_in_every_mode():
    """[CLS] and an unseen code behave the same whatever the representation."""
    for kw in ({}, {"values": "unfused"}, {"values": "soft"}, {"values": "xval"}, {"time_tokens": "fixed13"}):
        tok, tl = fit([(A, 1.0), (A, 2.0), (A, np.nan)], [(Z, 1.0), (A, np.nan)], n_bins=2, **kw)
        enc = tok.encode(tl, tl.index()[HELD_OUT])
        assert enc.input_ids[0] == CLS and (enc.input_ids == UNK).sum() == 1 and tl.stats.unk_tokens == 1
        assert not enc.value_mask.any() and not enc.mix_w.any()
        assert tok.decode(enc.input_ids).count(A) == 1  # the NaN value: plain code
        assert (np.asarray(tl.kinds) == K_VS).sum() == 2
