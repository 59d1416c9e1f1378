"""`repro compare`: two runs side by side, with what did and did not replicate."""

import json

import pytest

from repro.cli import main
from repro.evaluation.replication import ReplicationError, compare_runs, load_run, summary_lines


def _write_run(root, bigbird, delta, verdict, params_hash="p1"):
    """A run folder with the parts of notebook 01's results that `compare` reads."""
    (root / "results").mkdir(parents=True)
    probes = [
        {
            "task": "mortality_1m",
            "model": "EHRMamba",
            "read by": "finetuned",
            "estimate": 0.80,
            "lo": 0.78,
            "hi": 0.82,
        },
        {"task": "mortality_1m", "model": "BigBird", "read by": "finetuned", **bigbird},
        {
            "task": "mortality_1m",
            "model": "BigBird",
            "read by": "probe (head)",
            "estimate": 0.6,
            "lo": 0.5,
            "hi": 0.7,
        },
    ]
    comparisons = [
        {
            "task": "mortality_1m",
            "comparison": "EHRMamba − BigBird",
            "ΔAUROC (95% CI)": delta,
            "verdict": verdict,
        }
    ]
    results = {"probes": probes, "comparisons": comparisons, "null_comparisons": []}
    (root / "results" / "01_accuracy.json").write_text(json.dumps(results))
    (root / "manifest.json").write_text(json.dumps({"git_sha": "abc", "params_hash": params_hash}))
    return root


def test_a_verdict_that_flips_between_runs_is_flagged(tmp_path):
    a = _write_run(
        tmp_path / "a",
        {"estimate": 0.856, "lo": 0.839, "hi": 0.872},
        "-0.054 [-0.097, -0.034]",
        "not supported",
    )
    b = _write_run(
        tmp_path / "b",
        {"estimate": 0.815, "lo": 0.795, "hi": 0.832},
        "+0.001 [-0.031, +0.038]",
        "undertrained",
    )
    run_a, run_b = load_run(a), load_run(b)
    table = compare_runs(run_a, run_b).set_index("what")
    assert len(table) == 3  # two finetuned AUROCs (probes are not compared) and one comparison
    assert table.loc["EHRMamba", "CIs overlap"] == "yes"
    assert table.loc["BigBird", "CIs overlap"] == "NO"
    assert table.loc["BigBird", "B − A"] == pytest.approx(-0.041)
    row = table.loc["EHRMamba − BigBird"]
    assert (row["CIs overlap"], row["same verdict"]) == ("NO", "NO")
    lines = summary_lines(run_a, run_b, compare_runs(run_a, run_b))
    assert "1 of 3 estimates have overlapping" in " ".join(lines)
    assert "0 of 1 comparisons gave the same verdict" in " ".join(lines)
    assert not any("params differ" in line for line in lines)


def test_runs_that_agree_and_params_that_differ(tmp_path):
    cell = {"estimate": 0.85, "lo": 0.83, "hi": 0.87}
    a = _write_run(tmp_path / "a", cell, "-0.050 [-0.090, -0.030]", "not supported")
    b = _write_run(tmp_path / "b", cell, "-0.040 [-0.080, -0.010]", "not supported", params_hash="p2")
    run_a, run_b = load_run(a), load_run(b)
    table = compare_runs(run_a, run_b)
    assert (table["CIs overlap"] == "yes").all()
    assert list(table.loc[table["kind"] == "comparison", "same verdict"]) == ["yes"]
    assert any("params differ" in line for line in summary_lines(run_a, run_b, table))


def test_bad_inputs_name_the_file(tmp_path, capsys):
    with pytest.raises(ReplicationError, match="01_accuracy.json: not found"):
        load_run(tmp_path)
    a = _write_run(
        tmp_path / "a", {"estimate": 0.8, "lo": 0.7, "hi": 0.9}, "+0.01 (-0.02, 0.03)", "underpowered"
    )
    b = _write_run(
        tmp_path / "b", {"estimate": 0.8, "lo": 0.7, "hi": 0.9}, "+0.01 [-0.02, +0.03]", "underpowered"
    )
    with pytest.raises(ReplicationError, match=r"a/results/01_accuracy.json comparisons EHRMamba − BigBird"):
        compare_runs(load_run(a), load_run(b))
    assert main(["compare", str(tmp_path / "b"), str(tmp_path / "missing")]) == 2
    assert "missing/results/01_accuracy.json: not found" in capsys.readouterr().err


def test_cli_writes_the_table(tmp_path, capsys):
    cell = {"estimate": 0.85, "lo": 0.83, "hi": 0.87}
    a = _write_run(tmp_path / "a", cell, "-0.050 [-0.090, -0.030]", "not supported")
    b = _write_run(tmp_path / "b", cell, "-0.040 [-0.080, -0.010]", "not supported")
    out = tmp_path / "cmp.csv"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    assert "3 of 3 estimates have overlapping 95 % CIs" in capsys.readouterr().out
    assert out.read_text().startswith("kind,task,what,run A,run B")


def test_hypothesis_verdicts_are_compared_when_both_runs_have_notebook_90(tmp_path):
    cell = {"estimate": 0.85, "lo": 0.83, "hi": 0.87}
    a = _write_run(tmp_path / "a", cell, "-0.050 [-0.090, -0.030]", "not supported")
    b = _write_run(tmp_path / "b", cell, "-0.040 [-0.080, -0.010]", "not supported")
    only_a = compare_runs(load_run(a), load_run(b))
    assert "hypothesis" not in set(only_a["kind"])  # b has no notebook 90 yet
    for root, verdict in ((a, "not supported"), (b, "undertrained")):
        rows = [{"hypothesis": "H1", "verdict": verdict}, {"hypothesis": "H2", "verdict": "inconclusive"}]
        (root / "results" / "90_verdicts.json").write_text(json.dumps({"verdicts": rows}))
    run_a, run_b = load_run(a), load_run(b)
    table = compare_runs(run_a, run_b)
    hyps = table[table["kind"] == "hypothesis"].set_index("what")
    assert list(hyps["same verdict"]) == ["NO", "yes"]
    assert hyps.loc["H1", "CIs overlap"] == "-"
    lines = " ".join(summary_lines(run_a, run_b, table))
    assert "3 of 3 estimates" in lines and "1 of 2 hypotheses got the same verdict" in lines
