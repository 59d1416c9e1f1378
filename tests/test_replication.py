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


def _with_seeds(root, seeds: dict[str, list[float]], first_seed: int = 0):
    """Add notebook 01's per-seed held-out AUROCs to a run folder made by _write_run."""
    path = root / "results" / "01_accuracy.json"
    res = json.loads(path.read_text())
    res["seed_auroc"] = [
        {"model": m, "task": "mortality_1m", "seed": first_seed + i, "estimate": v}
        for m, vals in seeds.items()
        for i, v in enumerate(vals)
    ]
    path.write_text(json.dumps(res))
    return root


def test_pooled_seeds_show_a_run_effect_and_a_welch_interval(tmp_path):
    from repro.evaluation.replication import pool_seeds

    cell = {"estimate": 0.85, "lo": 0.83, "hi": 0.87}
    runs = []
    for name, bigbird in (("a", [0.84, 0.85, 0.83]), ("b", [0.78, 0.79, 0.77])):
        root = _write_run(tmp_path / name, cell, "-0.050 [-0.090, -0.030]", "not supported")
        runs.append(load_run(_with_seeds(root, {"EHRMamba": [0.80, 0.81, 0.79], "BigBird": bigbird})))
    models, comparisons, warnings = pool_seeds(runs[:1])
    # one run: d = -0.04, se = sqrt(2 * 0.0001 / 3), df = 4, t(0.975, 4) = 2.7764 -> -0.04 -/+ 0.02267
    assert comparisons["Δ mean seed AUROC (Welch CI)"].iloc[0] == "-0.040 [-0.063, -0.017]"
    assert comparisons["seed level"].iloc[0] == "EHRMamba lower"
    models, comparisons, warnings = pool_seeds(runs)
    m = models.set_index("model")
    assert m.loc["BigBird", "seeds"] == 6 and m.loc["BigBird", "each run's mean"] == "A 0.840, B 0.780"
    assert m.loc["BigBird", "run effect p"] < 0.01  # the two runs' seeds do not overlap
    assert m.loc["EHRMamba", "seeds"] == 3  # the same three trainings in both runs count once
    assert m.loc["EHRMamba", "run effect p"] != m.loc["EHRMamba", "run effect p"]  # nan: one run left
    assert comparisons["seed level"].iloc[0] == "interval covers 0"  # bimodal BigBird widens it
    assert len(warnings) == 3 and "EHRMamba seed 0: the same AUROC in runs A, B" in warnings[0]


def test_pooling_names_a_run_without_seeds_and_the_cli_takes_three_runs(tmp_path, capsys):
    cell = {"estimate": 0.85, "lo": 0.83, "hi": 0.87}
    roots = [
        _write_run(tmp_path / n, cell, "-0.050 [-0.090, -0.030]", "not supported") for n in ("a", "b", "c")
    ]
    assert main(["compare", str(roots[0]), str(roots[1])]) == 0
    assert "b/results/01_accuracy.json: has no 'seed_auroc'" in capsys.readouterr().out.replace("a/r", "b/r")
    for i, root in enumerate(roots):
        _with_seeds(root, {"EHRMamba": [0.80 + i / 100, 0.81], "BigBird": [0.84, 0.79 + i / 50]}, 3 * i)
    out = tmp_path / "cmp.csv"
    assert main(["compare", *map(str, roots), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("estimates have overlapping") == 2  # A with B, A with C
    assert "every run's training seeds pooled" in printed and "warning" not in printed
    assert "run B folder" in out.read_text().splitlines()[0]
    assert main(["compare", str(roots[0])]) == 2


def test_params_diff_names_the_keys_and_leaves_out_seeds(tmp_path):
    from repro.evaluation.replication import params_diff

    cell = {"estimate": 0.85, "lo": 0.83, "hi": 0.87}
    runs = []
    for name, seeds, epochs in (("a", [0, 1, 2], 16), ("b", [3, 4, 5], 16), ("c", [0, 1, 2], 4)):
        root = _write_run(tmp_path / name, cell, "-0.050 [-0.090, -0.030]", "not supported", params_hash=name)
        params = {"name": name, "seeds": seeds, "train": {"pretrain_epochs": epochs, "lr": 1e-3}}
        (root / "manifest.json").write_text(json.dumps({"params_hash": name, "params": params}))
        runs.append(load_run(root))
    a, b, c = runs
    assert params_diff(a, b) == [] and params_diff(a, c) == ["train.pretrain_epochs"]
    lines = summary_lines(a, b, compare_runs(a, b))
    assert "training seeds: run A [0, 1, 2], run B [3, 4, 5]" in lines
    assert not any("params differ" in line for line in lines)
    assert any(
        "params differ (train.pretrain_epochs)" in line for line in summary_lines(a, c, compare_runs(a, c))
    )


def test_pooling_compares_over_the_runs_that_trained_both_and_survives_a_bare_manifest(tmp_path):
    from repro.evaluation.replication import pool_seeds

    cell = {"estimate": 0.85, "lo": 0.83, "hi": 0.87}
    runs = []
    for i, name in enumerate("abc"):
        root = _write_run(tmp_path / name, cell, "-0.050 [-0.090, -0.030]", "not supported")
        shift = (0.0, 0.05, 0.2)[i]  # EHRMamba's runs differ; pooled over all three it would read 0.793
        seeds = {"EHRMamba": [0.70 + shift, 0.71 + shift, 0.72 + shift]}
        if name == "b":
            seeds["BiLSTM"] = [0.74, 0.75, 0.76]
        _with_seeds(root, seeds, first_seed=3 * i)
        (root / "manifest.json").write_text(json.dumps({"git_sha": None, "params": None}))
        runs.append(load_run(root))
    _, comparisons, _ = pool_seeds(runs)
    row = comparisons.set_index("comparison").loc["EHRMamba − BiLSTM"]
    assert row["seeds"] == "3 vs 3" and row["Δ mean seed AUROC (Welch CI)"].startswith("+0.010")
    assert "code ?" in summary_lines(runs[0], runs[1], compare_runs(runs[0], runs[1]))[0]


def test_seeds_variant_changes_only_name_and_seeds_and_the_cli_runs_it(tmp_path, monkeypatch, capsys):
    from repro.config import ParamsError, load_params, with_seeds
    from repro.report import pipeline

    out = with_seeds("params/smoke.yaml", [3, 4], tmp_path)
    assert out == tmp_path / "smoke-seeds-3-4.yaml" and out.read_text().startswith("# written by")
    a, b = load_params("params/smoke.yaml").to_dict(), load_params(out).to_dict()
    assert b["seeds"] == [3, 4] and b["name"] == "smoke-seeds-3-4"
    assert {k for k in a if a[k] != b[k]} == {"name", "seeds"}
    for bad in ([3, 3], []):
        with pytest.raises(ParamsError, match="distinct seeds"):
            with_seeds("params/smoke.yaml", bad, tmp_path)
    seen = {}

    def fake_dry_run(params_file, *args):
        seen["params"] = params_file
        return ["checked"]

    monkeypatch.setattr(pipeline, "dry_run", fake_dry_run)
    assert main(["run", "params/smoke.yaml", "--dry-run", "--seeds", "5", "6"]) == 0
    assert seen["params"].endswith("smoke-seeds-5-6.yaml") and load_params(seen["params"]).seeds == [5, 6]
    assert "params with seeds [5, 6]" in capsys.readouterr().out


def test_a_deterministic_model_counted_once_still_meets_every_run_of_ehrmamba(tmp_path):
    from repro.evaluation.replication import pool_seeds

    cell = {"estimate": 0.85, "lo": 0.83, "hi": 0.87}
    runs = []
    for i, name in enumerate("ab"):
        root = _write_run(tmp_path / name, cell, "-0.050 [-0.090, -0.030]", "not supported")
        _with_seeds(
            root, {"EHRMamba": [0.70 + i / 10, 0.71 + i / 10, 0.72 + i / 10], "Counts + LR": [0.67] * 3}
        )
        runs.append(load_run(root))
    models, comparisons, notes = pool_seeds(runs)
    assert models.set_index("model").loc["Counts + LR", "seeds"] == 3 and notes == []
    row = comparisons.set_index("comparison").loc["EHRMamba − Counts + LR"]
    assert row["seeds"] == "6 vs 3" and row["Δ mean seed AUROC (Welch CI)"].startswith("+0.090")


def test_runs_on_other_data_are_not_pooled(tmp_path):
    """A synthetic cohort of another generator version (the tie order of fdc8151) is another dataset: its
    seeds are not more draws of one experiment. Runs that all predate the record still pool."""
    from repro.evaluation.replication import data_difference, pool_seeds
    from repro.report.manifest import dataset_record

    cell = {"estimate": 0.85, "lo": 0.83, "hi": 0.87}
    runs = []
    for name in ("a", "b", "c"):
        root = _write_run(tmp_path / name, cell, "-0.050 [-0.090, -0.030]", "not supported")
        runs.append(_with_seeds(root, {"EHRMamba": [0.80, 0.81, 0.79], "BigBird": [0.84, 0.85, 0.83]}))
    assert data_difference([load_run(r) for r in runs]) is None  # no records: as before
    for root, version in zip(runs, ("6", "6", "5")):
        m = json.loads((root / "manifest.json").read_text())
        m["dataset"] = {"etl_name": "repro.data.synthetic", "etl_version": version}
        (root / "manifest.json").write_text(json.dumps(m))
    loaded = [load_run(r) for r in runs]
    pool_seeds(loaded[:2])
    with pytest.raises(ReplicationError, match=r"c: etl_name repro.data.synthetic, etl_version 5"):
        pool_seeds(loaded)
    table = compare_runs(loaded[0], loaded[2])
    assert any("data differ" in line for line in summary_lines(loaded[0], loaded[2], table))
    meds_root = tmp_path / "meds" / "metadata"
    meds_root.mkdir(parents=True)
    (meds_root / "dataset.json").write_text(json.dumps({"dataset_name": "x", "etl_version": "6", "n": 3}))
    assert dataset_record(tmp_path / "meds") == {"dataset_name": "x", "etl_version": "6"}


def test_the_run_table_names_the_commit_the_run_recorded(tmp_path):
    """Notebook 00's run table reads the commit from the run's manifest, written before any notebook runs,
    so it and manifest.json agree even when a file changes while the run is under way."""
    from repro.report.manifest import git_sha, run_commit

    (tmp_path / "manifest.json").write_text(json.dumps({"git_sha": "abc123"}))
    assert run_commit(tmp_path) == "abc123"
    assert run_commit(tmp_path / "elsewhere") == git_sha()  # an interactive session: the checkout's
