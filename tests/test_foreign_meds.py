"""MEDS written by other tools: the meds-testing-helpers sample datasets, extra columns, static rows,
codes outside MIMIC's vocabulary (read through params' code patterns), and cohorts the filters empty."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import HAND_SPLITS, hand_events, write_meds

from repro import config
from repro.config import CodePatterns, ParamsError
from repro.data import meds
from repro.training import prepare

pytest.importorskip("meds_testing_helpers")  # test-only dependency (dev extra); brings the fixtures below

# The sample datasets' vocabulary: ADMISSION//<dept> ... DISCHARGE, vitals HR / TEMP, static EYE_COLOR.
SAMPLE_CODES = CodePatterns(
    visit_start=r"^ADMISSION//",
    visit_end=r"^DISCHARGE$",
    lab=r"^(HR|TEMP|HEIGHT)$",
    demographic=r"^EYE_COLOR//",
)


def _prepare(data_dir, tasks, codes=SAMPLE_CODES):
    params = config.load_run_params("params/smoke.yaml", str(data_dir))
    params.data.codes, params.tasks = codes, tasks
    return prepare.prepare(params, str(data_dir), cache=False)


def test_sample_dataset_with_static_rows_reads_through_code_patterns(simple_static_MEDS):
    events = meds.read_events(meds.load_meds(simple_static_MEDS))
    assert (events["time"] == -1).any()  # static rows (null time) are kept as static
    prep = _prepare(simple_static_MEDS, ["mortality_1m"])
    # six subjects: every visit read, but too few deaths to train on, said before any training
    with pytest.raises(
        ParamsError, match=r"task mortality_1m: cannot be trained or evaluated: positives 0 / 0 / 0"
    ):
        prepare.check_cohort(prep)
    vocab = set(prep.tokenizer.itos)
    assert {"HR//Q1", "TEMP//Q1"} <= vocab  # foreign vitals read as labs: quantile-binned tokens
    assert not any(v.startswith(("ADMISSION//", "DISCHARGE")) for v in vocab)  # visits became [VS] / [VE]


def test_a_task_its_filters_empty_is_a_one_line_error(simple_static_MEDS):
    prep = _prepare(simple_static_MEDS, ["mortality_1m", "los_1w"])  # every stay is a few hours
    with pytest.raises(ParamsError, match=r"task los_1w: no sample in the train split after its filters"):
        prepare.check_cohort(prep)


def test_subjects_without_admissions_are_counted(generated_sample_MEDS):
    prep = _prepare(generated_sample_MEDS, ["mortality_1m"])
    with pytest.raises(ParamsError, match=r"\(0 of \d+ subjects have a visit from data.codes.visit_start="):
        prepare.check_cohort(prep)


def test_extra_columns_and_text_values_do_not_change_the_tokens(tmp_path):
    plain, extra = tmp_path / "plain", tmp_path / "extra"
    write_meds(plain, hand_events(), HAND_SPLITS)
    write_meds(extra, hand_events(), HAND_SPLITS)
    shard = extra / "data" / "0.parquet"
    t = pq.read_table(shard)
    n = t.num_rows
    t = t.append_column(
        "text_value", pa.array(np.where(np.arange(n) % 3 == 0, "NEG", None), pa.large_string())
    )
    t = t.append_column("hadm_id", pa.array(np.arange(n), pa.int64()))
    pq.write_table(t, shard)
    a = _prepare(plain, ["mortality_1m"], CodePatterns())
    b = _prepare(extra, ["mortality_1m"], CodePatterns())
    assert a.tokenizer.itos == b.tokenizer.itos
    assert np.array_equal(a.timelines.token_ids, b.timelines.token_ids) and len(a.timelines.token_ids) > 0


def test_dry_run_stops_on_a_dataset_without_admissions(generated_sample_MEDS, tmp_path):
    import yaml

    from repro.report.pipeline import dry_run

    params = yaml.safe_load(open("params/smoke.yaml"))
    params["tasks"] = ["mortality_1m"]
    (tmp_path / "foreign.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(
        ParamsError, match=r"task mortality_1m: no sample in the train split .*\(0 of \d+ subjects"
    ):
        dry_run(str(tmp_path / "foreign.yaml"), str(generated_sample_MEDS), name="pytest-foreign-dry")


def test_preflight_counts_samples_and_positives_per_split(simple_static_MEDS):
    prep = _prepare(simple_static_MEDS, ["mortality_1m"])
    counts = prepare.label_counts(prep)
    assert counts[["samples train", "samples tuning", "samples held_out"]].sum(axis=1).item() == 6
    (line,) = prepare.preflight_lines(counts)
    assert (
        line.startswith("mortality_1m: samples ")
        and "positives 0 / 0 / 0 (train / tuning / held_out)" in line
    )


def test_preflight_table_suppresses_small_cells_on_real_data(simple_static_MEDS):
    from repro.evaluation.summary import preflight_table

    prep = _prepare(simple_static_MEDS, ["mortality_1m"])
    assert not prep.synthetic
    row = preflight_table(prep).iloc[0]
    assert row["task"] == "mortality_1m" and row["status"] == "trained"
    assert {row[f"samples {s}"] for s in ("train", "tuning", "held_out")} <= {"<10", "0"}
