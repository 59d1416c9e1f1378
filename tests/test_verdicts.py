"""The verdict summary repeats what the notebooks saved, and says "not run" for what is missing."""

from __future__ import annotations

import json

from repro.evaluation import verdicts


def _write(tmp_path, name, obj):
    (tmp_path / f"{name}.json").write_text(json.dumps(obj))


def test_verdict_table_reads_each_notebook_and_marks_missing_ones(tmp_path):
    _write(
        tmp_path,
        "01_accuracy",
        {
            "h1_verdict": "supported",
            "h1_overall": "inconclusive",
            "comparisons": [
                {
                    "task": "los_1w",
                    "comparison": "EHRMamba − CEHR-BERT",
                    "ΔAUROC (95% CI)": "+0.100 [+0.050, +0.150]",
                    "p (BH)": 0.5,
                    "verdict": "inconclusive",
                },
                {
                    "task": "mortality_1m",
                    "comparison": "EHRMamba − CEHR-BERT",
                    "ΔAUROC (95% CI)": "+0.020 [+0.010, +0.030]",
                    "p (BH)": 0.004,
                    "verdict": "supported",
                },
            ],
        },
    )
    _write(tmp_path, "03_mpf", {"h3_verdicts": {"ehrmamba": "supported", "bigbird": "not supported"}})
    _write(
        tmp_path,
        "04_long_sequences",
        {
            "h4_memory_verdict": "supported",
            "h4_accuracy_verdict": "inconclusive",
            "h4_accuracy_overall": "inconclusive",
            "subgroup": {"n_subjects": 40, "threshold": 1024},
            "training": {"pretrain_steps": 0, "finetune_steps": 12},
            "boundary": [
                {"model": "ehrmamba", "longest length trained": 65536, "failure": "no failure up to 65536"},
                {"model": "cehr_bert", "longest length trained": 16384, "failure": "oom"},
            ],
        },
    )
    t = verdicts.verdict_table(verdicts.load_results(tmp_path)).set_index("hypothesis")
    assert t.loc["H1", "verdict"] == "supported"
    assert t.loc["H1", "evidence"] == "EHRMamba − CEHR-BERT: +0.020 [+0.010, +0.030], p (BH) 0.004"
    assert t.loc["H1 (all)", "evidence"] == (
        "1 of 2 supported, 1 of 2 inconclusive (against CEHR-BERT; 2 tasks: los_1w, mortality_1m)"
    )
    assert t.loc["H2", "verdict"] == t.loc["H2 (all)", "verdict"] == verdicts.NOT_RUN
    assert t.loc["H3", "verdict"] == "inconclusive"  # one backbone for, one against
    assert t.loc["H4 (accuracy)", "evidence"] == (
        "40 held-out subjects with history > 1024 tokens; finetuned 12 fixed steps from random weights; "
        "across Transformers: inconclusive"
    )
    assert (
        t.loc["H4 (memory)", "evidence"]
        == "ehrmamba: longest 65536 (no failure up to 65536); cehr_bert: longest 16384 (oom)"
    )
    line = verdicts.abstract_line(t.reset_index())
    assert line.startswith(
        "Verdicts of this run: H1 supported; H1 (all) inconclusive; H2 not run; H2 (all) not run; H3 inconclusive"
    )


def test_h2_evidence_names_bigbird_for_h2_and_every_transformer_for_h2_all(tmp_path):
    rows = [
        {"batch": 8, "baseline": "bigbird", "why": "at 16384: time x1.02, memory x0.52"},
        {"batch": 8, "baseline": "transformer", "why": "at 16384: time x0.62, memory x0.81"},
    ]
    _write(
        tmp_path,
        "02_efficiency",
        {
            "h2_verdict": "inconclusive",
            "h2_all_verdict": "inconclusive",
            "comparisons": rows,
            "rows": [{"device": "cuda (H100)"}],
        },
    )
    t = verdicts.verdict_table(verdicts.load_results(tmp_path)).set_index("hypothesis")
    assert t.loc["H2", "evidence"] == "on cuda (H100). BigBird (batch 8): at 16384: time x1.02, memory x0.52"
    assert "Transformer (SDPA) (batch 8)" in t.loc["H2 (all)", "evidence"]
