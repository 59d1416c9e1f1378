"""Tokenizer on a hand-built timeline, token by token (DESIGN.md section 6)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import HAND_SPLITS, ts

from repro.config import CodePatterns, TokenizerParams
from repro.data.tasks import build_task
from repro.data.tokenizer import Tokenizer
from repro.data.values import assign_bins, quantile_edges
from repro.data.vocab import REG, UNK, VS, interval_token

PATTERNS = CodePatterns()


def fit(events, **kw):
    params = TokenizerParams(n_bins=2, **kw)
    train = events[events["subject_id"].map(HAND_SPLITS) == "train"]
    tok = Tokenizer.fit(train, params, PATTERNS)
    return tok, tok.timelines(events)


def tokens(tok, tl, subject, prediction_time=None):
    enc = tok.encode(tl, tl.index()[subject], prediction_time)
    return tok.decode(enc.input_ids), enc


def test_mortality_sequence_token_by_token(events):
    tok, tl = fit(events)
    # Train lab values 1, 3, 5, 2, 4, 6 -> median 3.5: Q1 below, Q2 at or above.
    got, enc = tokens(tok, tl, 1, ts("2150-01-22T08:00"))  # mortality_1m: discharge of the last admission
    assert got == [
        "[CLS]",
        "[VS]",
        "LAB//A//u//Q1",
        "MEDICATION//X//Administered//1",
        "LAB//A//u//Q1",
        "[VE]",
        "[REG]",
        "[W_2]",  # 17 days from discharge to the next admission
        "[VS]",
        "LAB//A//u//Q2",
        "PROCEDURE//START//1",
        "LAB//A//u//Q1",
        "[VE]",
        "[REG]",
    ]
    # No diagnosis, DRG, discharge disposition or death code anywhere in the input.
    assert not any(t.startswith(("DIAGNOSIS", "DRG", "HOSPITAL_DISCHARGE", "MEDS_DEATH")) for t in got)
    assert enc.segments.tolist() == [0, 1, 1, 1, 1, 1, 1, 0, 2, 2, 2, 2, 2, 2]
    assert enc.visit_orders.tolist() == [0, 1, 1, 1, 1, 1, 1, 0, 2, 2, 2, 2, 2, 2]
    assert enc.type_ids.tolist() == [1, 2, 4, 5, 4, 2, 1, 3, 2, 4, 6, 4, 2, 1]
    assert enc.ages[2] == pytest.approx(
        (ts("2150-01-01T09:00") - ts("2100-01-01")) / (365.25 * 86400e6), rel=1e-5
    )
    assert enc.times[2] == pytest.approx(ts("2150-01-01T09:00") / (7 * 86400e6), rel=1e-6)


def test_no_event_after_prediction_time(events):
    t = ts("2150-01-21T08:00")  # 24 h into the second admission
    events = events.copy()  # plus a drug given exactly at T: not yet available
    events.loc[len(events)] = {
        **events.iloc[-1].to_dict(),
        "subject_id": 1,
        "time": t,
        "code": "MEDICATION//X//Administered//1",
        "numeric_value": np.nan,
    }
    events = events.sort_values(["subject_id", "time"], kind="stable").reset_index(drop=True)
    tok, tl = fit(events)
    got, enc = tokens(tok, tl, 1, t)
    assert got[-5:] == ["[W_2]", "[VS]", "LAB//A//u//Q2", "[VE]", "[REG]"]
    assert "PROCEDURE//START//1" not in got  # at 2150-01-21T12:00, after the prediction time
    # exact: the input is the subject's timeline up to T (its tokens available strictly before T), then the
    # closing [VE] [REG]; nothing available at or after T is in it
    i = tl.index()[1]
    span = slice(tl.offsets[i], tl.offsets[i + 1])
    before = tl.token_ids[span][tl.avail_us[span] < t]
    assert enc.input_ids[1:-2].tolist() == before.tolist()
    assert (tl.avail_us[span][len(before) :] >= t).all()


def test_prediction_time_is_exclusive(events):
    tok, tl = fit(events)
    got, _ = tokens(tok, tl, 1, ts("2150-01-20T10:00"))  # exactly the lab's time: not yet available
    assert "LAB//A//u//Q2" not in got


def test_bins_fit_on_train_only(events):
    train_only = events[events["subject_id"] != 3]
    tok_all, _ = fit(events)
    tok_train = Tokenizer.fit(train_only, TokenizerParams(n_bins=2), PATTERNS)
    np.testing.assert_array_equal(tok_all.bins["LAB//A//u"], tok_train.bins["LAB//A//u"])
    np.testing.assert_array_equal(tok_all.bins["LAB//A//u"], [3.5])
    assert "MEDICATION//NEVER_IN_TRAIN//Administered//9" not in tok_all.stoi


def test_unseen_code_is_unk_and_counted(events):
    tok, tl = fit(events)
    got, enc = tokens(tok, tl, 3)
    assert "[UNK]" in got
    assert tl.stats.unk_tokens == 1
    assert (enc.input_ids == UNK).sum() == 1
    assert got[got.index("[VS]") + 1] == "LAB//A//u//Q2"  # 100 is above every train edge: top bin


def test_top_value_falls_in_top_bin():
    values = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    edges = quantile_edges(values, 5)
    assert assign_bins(np.array([5.0]), edges)[0] == 4
    assert assign_bins(np.array([1.0]), edges)[0] == 0
    assert quantile_edges(np.array([np.nan]), 5).size == 0


def test_events_outside_visits_are_dropped_and_counted(events):
    _, tl = fit(events)
    assert tl.stats.events_outside_visits == 1


def test_interval_tokens():
    assert interval_token(27.99) == "[W_3]"
    assert interval_token(28) == "[M_0]"
    assert interval_token(59.9) == "[M_1]"
    assert interval_token(365) == "[LT]"


def test_truncation_snaps_to_visit_boundary(events):
    tok, tl = fit(events)
    tok.params = dataclasses.replace(tok.params, max_len=16)
    full, _ = tokens(tok, tl, 1, ts("2150-01-22T08:00"))
    assert len(full) == 14  # fits: unchanged
    tok.params = dataclasses.replace(tok.params, max_len=12)  # 11 body tokens: cut falls inside visit 1
    got, enc = tokens(tok, tl, 1, ts("2150-01-22T08:00"))
    assert got == [
        "[CLS]",
        "[W_2]",
        "[VS]",
        "LAB//A//u//Q2",
        "PROCEDURE//START//1",
        "LAB//A//u//Q1",
        "[VE]",
        "[REG]",
    ]
    assert enc.visit_orders.tolist() == [0, 0, 1, 1, 1, 1, 1, 1]  # renumbered from the first kept visit
    assert enc.segments.tolist() == [0, 0, 1, 1, 1, 1, 1, 1]


def test_truncation_inside_one_long_visit_keeps_the_most_recent_tokens(events):
    tok, tl = fit(events)
    tok.params = dataclasses.replace(tok.params, max_len=16)
    got, enc = tokens(tok, tl, 1, ts("2150-01-22T08:00"))
    tok.params = dataclasses.replace(tok.params, max_len=5)
    got, enc = tokens(tok, tl, 1, ts("2150-01-22T08:00"))
    assert len(got) <= 5
    assert got[0] == "[CLS]" and got[1] == "[VS]" and got[-1] == "[REG]"
    assert enc.input_ids[1] == VS and enc.input_ids[-1] == REG


def test_diagnoses_only_from_earlier_admissions(events):
    tok, tl = fit(events, include_diagnoses=True)
    got, _ = tokens(tok, tl, 1, ts("2150-01-22T08:00"))
    assert "DIAGNOSIS//ICD//10//I10" in got  # stamped at the first discharge, before the prediction
    assert "DIAGNOSIS//ICD//10//N17" not in got  # stamped at the predicted discharge itself
    got, _ = tokens(tok, tl, 1, ts("2150-01-03T08:00"))
    assert "DIAGNOSIS//ICD//10//I10" not in got


def test_save_load_roundtrip(events, tmp_path):
    tok, tl = fit(events)
    tok.save(tmp_path / "tok.json")
    tok2 = Tokenizer.load(tmp_path / "tok.json")
    assert tok2.itos == tok.itos
    tl2 = tok2.timelines(events)
    a = tok.encode(tl, 0, ts("2150-01-22T08:00"))
    b = tok2.encode(tl2, 0, ts("2150-01-22T08:00"))
    np.testing.assert_array_equal(a.input_ids, b.input_ids)


def test_task_labels_hand_built(events):
    m = build_task("mortality_1m", events, PATTERNS).set_index("subject_id")
    assert m["label"].to_dict() == {1: 1, 2: 1, 3: 0}  # in-hospital; 19 d after; 56 d after
    assert m.loc[1, "prediction_time"] == ts("2150-01-22T08:00")
    h = build_task("inhospital_mortality_24h", events, PATTERNS).set_index("subject_id")
    assert 2 not in h.index  # a 12 h stay is not in the 24 h cohort
    assert h["label"].to_dict() == {1: 1, 3: 0}
    assert h.loc[1, "prediction_time"] == ts("2150-01-21T08:00")
