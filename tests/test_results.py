"""Report tables from predictions: seed ensembles, pairing, paper layout, overall verdicts."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from repro.evaluation import results, significance


def _preds(rng, models, n=120, seeds=(0, 1), fixed_noise=0.0):
    """Scores of `models` ("good" noisier than the rest by far less); `fixed_noise`: noise a model repeats in
    every seed (what a seed ensemble cannot average away), for every model but "good"."""
    rows = []
    y = (rng.random(n) < 0.3).astype(int)
    for m in models:
        fixed = rng.normal(0, fixed_noise, n) if fixed_noise and m != "good" else 0.0
        for s in seeds:
            for split in ("tuning", "held_out"):
                noise = fixed + rng.normal(0, 1.0 if m != "good" else 0.3, n)
                rows.append(
                    pd.DataFrame(
                        {
                            "subject_id": np.arange(n),
                            "split": split,
                            "target": "label",
                            "label": y,
                            "score": 1 / (1 + np.exp(-(2 * y - 1 + noise))),
                            "model": m,
                            "task": "mortality_1m",
                            "seed": s,
                            "true_prob": 0.3,
                        }
                    )
                )
    return pd.concat(rows, ignore_index=True)


def test_seed_ensemble_averages_over_seeds_and_pairs_rows():
    p = _preds(np.random.default_rng(0), ["a"])
    ens = results.seed_ensemble(p)
    assert len(ens) == 2 * 120
    one = p[(p["split"] == "held_out") & (p["subject_id"] == 3)]["score"].mean()
    assert np.isclose(ens[(ens["split"] == "held_out") & (ens["subject_id"] == 3)]["score"].iloc[0], one)
    assert ens["row_id"].is_unique is False  # same row ids in tuning and held_out
    assert ens[ens["split"] == "held_out"]["row_id"].is_unique


def test_better_model_is_supported_and_worse_is_not():
    # three seeds, each of bad's erring on the same patients too: its ensemble stays behind good's
    p = _preds(np.random.default_rng(1), ["good", "bad"], n=400, seeds=(0, 1, 2), fixed_noise=1.0)
    c = results.paired_comparisons(p, [("good", "bad"), ("bad", "good")], n_boot=300, ci=0.95)
    assert c.set_index("new").loc["good", "verdict"] == "supported"
    assert c.set_index("new").loc["bad", "verdict"] == "not supported"
    assert results.overall_verdict(c["verdict"]) == "inconclusive"  # mixed
    assert results.overall_verdict(["supported", "inconclusive"]) == "supported"
    assert results.overall_verdict(["not supported", "inconclusive"]) == "not supported"
    # "EHRMamba beats every model" needs every comparison: one supported among inconclusives is not enough
    assert results.overall_verdict(["supported"] + ["inconclusive"] * 29, combine="all") == "inconclusive"
    assert results.overall_verdict(["supported"] * 30, combine="all") == "supported"
    assert results.overall_verdict(["supported"] * 29 + ["not supported"], combine="all") == "not supported"
    assert results.overall_verdict([], combine="all") == "inconclusive"
    # an undecided claim names what it waits on where every undecided comparison gives that one reason
    assert results.overall_verdict(["supported"] + ["undertrained"] * 2, combine="all") == "undertrained"
    assert results.overall_verdict(["one seed", "supported"], combine="all") == "one seed"
    assert results.overall_verdict(["underpowered"] * 3) == "underpowered"
    # mixed reasons: no one remedy decides it (the default run of 2026-12-07: undertrained beside underpowered)
    assert (
        results.overall_verdict(["undertrained", "underpowered", "supported"], combine="all")
        == "inconclusive"
    )
    assert results.overall_verdict(["underpowered", "one seed"]) == "inconclusive"
    assert results.overall_verdict(["undertrained", "inconclusive"], combine="all") == "inconclusive"
    assert results.overall_verdict(["supported", "not supported", "undertrained"]) == "inconclusive"
    assert (
        results.overall_verdict(["supported", "undertrained", "undertrained"], "majority") == "undertrained"
    )


def test_same_model_twice_has_permutation_p_one_and_is_inconclusive():
    p = _preds(np.random.default_rng(2), ["a"], n=200)
    twin = p.assign(model="b")
    c = results.paired_comparisons(pd.concat([p, twin]), [("a", "b")], n_boot=200, ci=0.95, n_perm=199)
    row = c.iloc[0]
    assert row["ΔAUROC"] == 0 and row["p (perm.)"] == 1.0 and row["p (BH)"] == 1.0
    # the seed level resamples each model's two seeds on its own, so the twins' CI has width and straddles 0
    assert row["lo"] < 0 < row["hi"] and row["verdict"] in ("inconclusive", "underpowered")


def test_permutation_p_is_small_for_a_clearly_better_model_and_bh_is_applied():
    p = _preds(np.random.default_rng(3), ["good", "bad", "also_bad"], n=400)
    pairs = [("good", "bad"), ("good", "also_bad"), ("bad", "also_bad")]
    c = results.paired_comparisons(p, pairs, n_boot=200, ci=0.95, n_perm=199).set_index("baseline")
    assert c.loc["bad", "p (perm.)"] == 1 / 200  # no permutation reaches the observed difference
    expected = significance.benjamini_hochberg(c["p (perm.)"].to_numpy())
    assert np.allclose(c["p (BH)"].to_numpy(), expected)
    table = results.comparison_table(c.reset_index(), 0.95)
    assert list(table.columns)[-3:] == ["p (perm.)", "p (BH)", "verdict"]
    assert all(d == "inf" or float(d) > 0 for d in table["df"])  # the interval's t degrees of freedom


def test_paper_table_sets_every_paper_cell_beside_ours():
    p = _preds(np.random.default_rng(2), ["ehrmamba", "cehr_bert"])
    cond = _preds(np.random.default_rng(4), ["ehrmamba"]).assign(task="conditions")
    cond = pd.concat([cond.assign(target=g) for g in ("10//I10", "10//E78")], ignore_index=True)
    cond.loc[cond["target"] == "10//E78", "score"] = 1 - cond.loc[cond["target"] == "10//E78", "score"]
    preds = pd.concat([p, cond], ignore_index=True)
    ev = results.evaluate_all(p, n_boot=50, ci=0.95)
    t = results.paper_table(ev, synthetic=True, preds=preds).set_index(["task", "model"])
    assert len(t) == 36  # 6 paper rows (3 tasks + 3 conditions) x 6 paper models, 3 metrics each: 108 cells
    cell = re.compile(r"0\.\d{2,3} \(0\.\d{2,3}\)\*?")
    for name in ("AUROC", "AUPRC", "F1"):
        assert t[f"{name} paper"].map(lambda c: bool(cell.fullmatch(c))).all()
    mamba = t.loc[("mortality_1m (paper: mortality)", "EHRMamba (paper: EHRMamba)")]
    assert mamba["AUROC paper"] == "0.976 (0.005)*" and mamba["F1 paper"] == "0.784 (0.002)*"
    assert mamba["AUROC ours"] == f"{ev['mortality_1m']['EHRMamba']['auroc']['estimate']:.3f}"
    xgb = t.loc[("conditions: 10//E78 (paper: lipoid metabolism)", "Counts + LR (paper: XGBoost)")]
    assert xgb["AUROC paper"] == "0.91 (0.00)" and xgb["AUROC ours"] == "—"  # as printed; not run: no number
    # a condition label is scored on its own: E78's scores were flipped, so its AUROC is 1 - I10's
    i10 = float(
        t.loc[("conditions: 10//I10 (paper: hypertension)", "EHRMamba (paper: EHRMamba)"), "AUROC ours"]
    )
    e78 = float(
        t.loc[("conditions: 10//E78 (paper: lipoid metabolism)", "EHRMamba (paper: EHRMamba)"), "AUROC ours"]
    )
    assert i10 > 0.7 and abs(i10 + e78 - 1) < 2e-3
    assert (
        t.loc[
            ("condition_fluid_electrolyte (paper: fluid electrolyte acid base)", "EHRMamba (paper: EHRMamba)")
        ].filter(like="ours")
        == "—"
    ).all()  # a label this run does not have
    assert (t["data"] == "ours: synthetic; paper: MIMIC-IV").all()
    # the paper's own definition, when the run has it, takes the row
    p32 = p.assign(task="mortality_32d", score=1 - p["score"])
    ev32 = results.evaluate_all(pd.concat([p, p32], ignore_index=True), n_boot=50, ci=0.95)
    t32 = results.paper_table(ev32, synthetic=True, preds=preds).set_index(["task", "model"])
    row = t32.loc[("mortality_32d (paper: mortality)", "EHRMamba (paper: EHRMamba)")]
    assert row["AUROC ours"] == f"{ev32['mortality_32d']['EHRMamba']['auroc']['estimate']:.3f}"
    assert not any(task.startswith("mortality_1m") for task, _ in t32.index)


def test_reliability_frame_counts_every_held_out_row_and_tracks_a_calibrated_model():
    rng = np.random.default_rng(5)
    n = 4000
    risk = rng.uniform(0, 1, n)
    y = (rng.random(n) < risk).astype(int)
    base = {"subject_id": np.arange(n), "target": "label", "label": y, "task": "mortality_1m", "seed": 0}
    preds = pd.concat(
        [
            pd.DataFrame(base | {"split": split, "score": risk, "model": "calibrated"})
            for split in ("tuning", "held_out")
        ]
    )
    f = results.reliability_frame(preds, "mortality_1m", bins=10)
    assert f["n"].sum() == n and len(f) == 10
    assert np.abs(f["observed"] - f["predicted"]).max() < 0.06
    table = results.calibration_table(results.evaluate_all(preds, 50, 0.95), ["mortality_1m"])
    assert list(table.columns) == ["task", "model", "Brier (95% CI)", "ECE (95% CI)", "Brier skill"]
    # a model whose scores carry the labels' signal beats predicting the prevalence for everyone
    assert all(0 < float(v) <= 1 for v in table["Brier skill"])


def test_a_comparison_trained_with_one_seed_is_never_supported():
    rng = np.random.default_rng(3)
    three = results.paired_comparisons(
        _preds(rng, ["good", "bad"], seeds=(0, 1, 2), fixed_noise=1.0),
        [("good", "bad")],
        n_boot=200,
        ci=0.95,
        n_perm=200,
    )
    assert three["verdict"].iloc[0] == "supported" and three["seeds"].iloc[0] == 3
    one = results.paired_comparisons(
        _preds(rng, ["good", "bad"], seeds=(0,)), [("good", "bad")], n_boot=200, ci=0.95, n_perm=200
    )
    assert one["lo"].iloc[0] > 0 and one["p (BH)"].iloc[0] < 0.05  # the statistics alone would say supported
    assert one["verdict"].iloc[0] == "one seed" and one["seeds"].iloc[0] == 1
    assert results.overall_verdict(one["verdict"]) == "one seed"  # never supported, and says why


def test_an_inconclusive_comparison_that_could_not_see_the_effect_reads_underpowered():
    rng = np.random.default_rng(4)
    kw = {"n_boot": 300, "ci": 0.95, "n_perm": 200}
    small = results.paired_comparisons(_preds(rng, ["a", "b"], n=60), [("a", "b")], **kw)  # equal skill
    assert small["MDE"].iloc[0] > 0.02 and small["verdict"].iloc[0] == "underpowered"
    big = results.paired_comparisons(_preds(rng, ["a", "b"], n=60), [("a", "b")], effect=0.5, **kw)
    assert big["verdict"].iloc[0] == "inconclusive"  # an effect of 0.5 would have been seen
    sure = results.paired_comparisons(
        _preds(np.random.default_rng(3), ["good", "bad"], seeds=(0, 1, 2), fixed_noise=1.0),
        [("good", "bad")],
        **kw,
    )
    assert sure["verdict"].iloc[0] == "supported"  # a finding is reported whatever its MDE


def test_a_comparison_with_a_model_short_of_its_plateau_reads_undertrained():
    import pandas as pd

    from repro.training.loop import TrainResult
    from repro.training.trainer import ModelRun

    rising = TrainResult(
        "classify", metric="auroc", val=[{"step": s, "auroc": a} for s, a in [(10, 0.6), (20, 0.7)]]
    )
    flat = TrainResult("classify", metric="auroc", stop="early stop", val=[{"step": 10, "auroc": 0.7}])
    empty = pd.DataFrame()
    runs = [
        ModelRun("ehrmamba", "mortality_1m", 0, empty, 1, "x", None, flat, 0.0),
        ModelRun("transformer", "mortality_1m", 0, empty, 1, "x", None, rising, 0.0),
        ModelRun("transformer", "los_1w", 0, empty, 1, "x", None, flat, 0.0),
        ModelRun("count_lr", "mortality_1m", 0, empty, 1, "sklearn", None, None, 0.0),
    ]
    comparisons = pd.DataFrame(
        {
            "new": ["ehrmamba"] * 4,
            "baseline": ["transformer", "transformer", "count_lr", "transformer"],
            "task": ["mortality_1m", "los_1w", "mortality_1m", "mortality_1m"],
            "verdict": ["supported", "supported", "not supported", "one seed"],
        }
    )
    marked = results.mark_undertrained(comparisons, runs)
    assert marked["verdict"].tolist() == ["undertrained", "supported", "not supported", "one seed"]
    assert results.undertrained(runs) == {("transformer", "mortality_1m")}
    # a probe reads the frozen pretrained states: only pretraining short of its plateau marks it
    pre = [
        ModelRun("ehrmamba", "mortality_1m", 0, empty, 1, "x", rising, flat, 0.0),
        ModelRun("bigbird", "mortality_1m", 0, empty, 1, "x", flat, rising, 0.0),
    ]
    assert results.probes_undertrained(pre, ["head", "mean"]) == {
        ("ehrmamba+probe:head", "mortality_1m"),
        ("ehrmamba+probe:mean", "mortality_1m"),
    }
    probes = pd.DataFrame(
        {
            "new": ["ehrmamba+probe:head"],
            "baseline": ["bigbird+probe:head"],
            "task": ["mortality_1m"],
            "verdict": ["not supported"],
        }
    )
    marked = results.mark_undertrained(probes, [], results.probes_undertrained(pre, ["head"]))
    assert marked["verdict"].tolist() == ["undertrained"]


def test_a_finetuned_model_below_its_own_probe_reads_undertrained():
    # the H200 trial of 2026-12-06 (batches cut by tokens): the transformer stopped early below its probe
    import pandas as pd

    rows = [
        ("mortality_1m", "EHRMamba", "finetuned", 0.817, 0.785, 0.846),
        ("mortality_1m", "EHRMamba", "probe (mean)", 0.772, 0.741, 0.800),
        ("mortality_1m", "Transformer (SDPA)", "finetuned", 0.638, 0.597, 0.678),
        ("mortality_1m", "Transformer (SDPA)", "probe (head)", 0.669, 0.630, 0.705),
        ("mortality_1m", "Transformer (SDPA)", "probe (mean)", 0.733, 0.697, 0.763),
        ("los_1w", "Transformer (SDPA)", "finetuned", 0.700, 0.650, 0.750),
        ("los_1w", "Transformer (SDPA)", "probe (mean)", 0.720, 0.690, 0.750),  # inside the probe's CI
    ]
    frame = pd.DataFrame(rows, columns=["task", "model", "read by", "estimate", "lo", "hi"])
    short = results.below_probe(frame, ["ehrmamba", "transformer"])
    assert short == {("transformer", "mortality_1m")}
    comparisons = pd.DataFrame(
        {
            "new": ["ehrmamba"] * 3,
            "baseline": ["transformer", "transformer", "count_lr"],
            "task": ["mortality_1m", "los_1w", "mortality_1m"],
            "verdict": ["supported"] * 3,
        }
    )
    marked = results.mark_undertrained(comparisons, [], short)
    assert marked["verdict"].tolist() == ["undertrained", "supported", "supported"]
    assert results.below_probe(frame.iloc[:0], ["ehrmamba"]) == set()


def test_each_hypothesis_is_decided_by_its_written_rule():
    from repro.config import HypothesisRule, default_hypotheses

    c = pd.DataFrame(
        {
            "new": ["ehrmamba"] * 4,
            "baseline": ["cehr_bert", "cehr_bert", "transformer", "lstm"],
            "task": ["mortality_1m", "los_1w", "mortality_1m", "mortality_1m"],
            "verdict": ["undertrained", "supported", "supported", "inconclusive"],
        }
    )
    rules = default_hypotheses()
    assert results.rule_verdict(c, rules["H1"]) == "undertrained"  # its one primary comparison, label kept
    assert results.rule_verdict(c, rules["H1 (all)"]) == "inconclusive"  # not every comparison is supported
    assert results.rule_verdict(c.iloc[:3], rules["H1 (all)"]) == "undertrained"  # what it waits on
    assert results.rule_verdict(c, rules["H5"]) == "supported"  # any, none contradicting
    assert results.rule_verdict(c, HypothesisRule(combine="majority")) == "inconclusive"  # 2 of 4
    assert results.rule_verdict(c.iloc[1:], HypothesisRule(combine="majority")) == "supported"  # 2 of 3
    missing = HypothesisRule(["ehrmamba-bigbird@mortality_1m"], "all")
    assert results.rule_verdict(c, missing) == results.NOT_RUN
    assert results.rule_verdict(c.iloc[:0], rules["H5"]) == results.NOT_RUN
    table = results.rules_table(rules).set_index("hypothesis")
    assert list(table.index) == ["H1", "H1 (all)", "H2", "H2 (all)", "H3", "H4 (accuracy)", "H5"]
    assert table.loc["H2", "primary comparisons"] == "EHRMamba − BigBird (every task or batch size)"
    assert table.loc["H1", "primary comparisons"] == "EHRMamba − CEHR-BERT on mortality_1m"
    assert table.loc["H1 (all)", "combined"] == "all must be supported"


def test_hypothesis_rules_in_params_are_checked_and_merged():
    import pytest

    from repro.config import ParamsError, load_params

    p = load_params("params/smoke.yaml", {"hypotheses": {"H5": {"combine": "majority"}}})
    assert p.hypotheses["H5"].combine == "majority" and p.hypotheses["H1"].combine == "all"
    for bad, msg in (
        ({"H1": {"combine": "most"}}, "hypotheses.H1: combine must be one of"),
        ({"H1": {"primary": ["ehrmamba@mortality_1m"]}}, "must read new-baseline@task"),
        ({"H1": {"primary": ["ehrmamba-lstm@mortality_2m"]}}, "unknown task"),
        ({"H2": {"primary": ["ehrmamba-bigbird@"]}}, "must read new-baseline@task (or new-baseline)"),
        (
            {"H1": {"primary": ["ehrmamba-cehr_bert"]}},
            "hypotheses.H1: primary comparison 'ehrmamba-cehr_bert' must",
        ),
        ({"H2": {"primary": ["ehrmamba-bigbird@mortality_1m"]}}, "must read new-baseline, without @task"),
        ({"H9": {}}, "hypotheses has unknown entries ['H9']"),
    ):
        with pytest.raises(ParamsError, match=re.escape(msg)):
            load_params("params/smoke.yaml", {"hypotheses": bad})


def test_token_loss_weighs_patients_by_their_tokens_and_averages_seeds():
    from repro.evaluation.metrics import token_loss

    # seed 0: patients with 1 and 3 tokens, losses 3.0 and 3 x 1.0 -> (3 + 3) / 4 = 1.5 per token (not 2.0)
    # seed 1: every token at 2.0; the seeds' mean is 1.75
    sums = np.array([[3.0, 3.0], [2.0, 6.0]])
    counts = np.array([[1.0, 3.0], [1.0, 3.0]])
    t = token_loss(sums, counts, n_boot=200, ci=0.95)
    assert t["loss"] == pytest.approx(1.75) and t["perplexity"] == pytest.approx(np.exp(1.75))
    assert t["lo"] <= t["loss"] <= t["hi"] and t["patients"] == 2 and t["tokens"] == 4.0
    # the resamples: both draws the 1-token patient -> (3.0 + 2.0) / 2 = 2.5; both the 3-token one -> 1.5
    assert t["lo"] >= 1.5 - 1e-9 and t["hi"] <= 2.5 + 1e-9 and t["hi"] > t["lo"]
    with pytest.raises(ValueError, match="one shape"):
        token_loss(sums, counts[:, :1])


def test_null_check_names_a_model_whose_scores_read_the_null_labels():
    """On the null task a model's AUROC CI should hold 0.5; one built to read the labels does not, each seed's
    AUROC is listed beside the ensemble's under the model's report label, and a model without a CI (one class
    held out) makes no claim either way."""
    p = _preds(np.random.default_rng(3), ["good", "blind"], n=400).assign(task="null_task")
    p["model"] = p["model"].map({"good": "ehrmamba", "blind": "cehr_bert+mpf"})
    blind = p["model"] == "cehr_bert+mpf"
    p.loc[blind, "score"] = np.random.default_rng(4).random(int(blind.sum()))  # independent of the labels
    table = results.null_check_table(results.evaluate_all(p, 200, 0.95), p).set_index("model")
    reads, ignores = results.label("ehrmamba"), results.label("cehr_bert+mpf")
    assert reads != "ehrmamba"  # the report label, so the seed column is looked up by it
    assert table.loc[reads, "0.5 inside the CI"] == "no"
    assert table.loc[ignores, "0.5 inside the CI"] == "yes"
    assert len(table.loc[reads, "each seed"].split(", ")) == 2
    assert len(table.loc[ignores, "each seed"].split(", ")) == 2
    one_class = p[p["model"] == "ehrmamba"].copy()
    one_class.loc[one_class["split"] == "held_out", "label"] = 0
    lone = results.null_check_table(results.evaluate_all(one_class, 50, 0.95), one_class)
    assert (lone["0.5 inside the CI"] == "-").all()
    assert results.null_check_table({}, p).empty


def test_leave_one_seed_out_auroc_by_hand():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = (rng.random(50) < 0.4).astype(float)
    s = y + rng.normal(0, 1, (3, 50))
    got = results.leave_one_seed_out_auroc([(y, s)])
    want = [
        roc_auc_score(y, (s[1] + s[2]) / 2),
        roc_auc_score(y, (s[0] + s[2]) / 2),
        roc_auc_score(y, s[:2].mean(0)),
    ]
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert results.leave_one_seed_out_auroc([(y, s[:1])]) == pytest.approx([roc_auc_score(y, s[0])])


def test_seeds_that_differ_in_quality_widen_the_interval_beyond_the_bootstrap():
    """Model a's three seeds weigh the signal 0.5, 1 and 1.5 times: its ensemble's AUROC depends on which
    seeds it drew. The seed-calibrated interval reaches beyond the two-level percentile interval, with few
    degrees of freedom; b's seeds differ only in per-patient noise and add almost nothing."""
    rng = np.random.default_rng(2)
    n = 800
    risk = rng.normal(0, 1, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(risk - 1.5)))).astype(int)
    rows = []
    for m, weights in (("a", (0.5, 1.0, 1.5)), ("b", (1.0, 1.0, 1.0))):
        own = rng.normal(0, 1, n)
        for seed, w in enumerate(weights):
            score = w * risk + own + 0.2 * rng.normal(0, 1, n)
            rows.append(
                pd.DataFrame(
                    {"subject_id": np.arange(n), "split": "held_out", "target": "label", "label": y}
                    | {"score": score, "model": m, "task": "t", "seed": seed}
                )
            )
    p = pd.concat(rows, ignore_index=True)
    row = results.paired_comparisons(p, [("a", "b")], n_boot=300, ci=0.95, n_perm=100).iloc[0]
    ens = results.seed_ensemble(p)
    from repro.evaluation.bootstrap import percentile_ci, two_level_paired_auroc

    boot_only = percentile_ci(
        two_level_paired_auroc(
            [
                (
                    y.astype(float),
                    np.arange(n),
                    np.stack([s["score"].to_numpy() for _, s in p[p["model"] == "a"].groupby("seed")]),
                    np.stack([s["score"].to_numpy() for _, s in p[p["model"] == "b"].groupby("seed")]),
                )
            ],
            300,
            seed=0,
        )[1],
        0.95,
    )
    assert len(ens) == 2 * n
    assert row["hi"] - row["lo"] > 1.2 * (boot_only["hi"] - boot_only["lo"])
    assert 2 <= row["df"] < 10


def test_forest_figure_marks_each_seed_under_its_model():
    import matplotlib

    matplotlib.use("Agg")
    from repro.evaluation import figures

    p = _preds(np.random.default_rng(5), ["good", "bad"], seeds=(0, 1, 2))
    evaluated = results.evaluate_all(p, n_boot=50, ci=0.95)
    seeds = results.seed_aurocs(p).assign(model=lambda d: d["model"].map(results.label))
    fig = figures.forest_figure(results.forest_frame(evaluated), seeds=seeds)
    ticks = [line for line in fig.axes[0].get_lines() if line.get_color() == "tab:orange"]
    assert [len(t.get_xdata()) for t in ticks] == [3, 3]
    want = sorted(seeds.loc[seeds["model"] == results.label("bad"), "estimate"])
    assert sorted(ticks[1].get_xdata()) == pytest.approx(want)
    assert "each seed" in [t.get_text() for t in fig.legends[0].get_texts()]  # one legend, under the panels


def test_pretraining_table_sets_each_backbone_beside_its_objectives_unigram_floor():
    from repro.training.loop import unigram_losses

    rng = np.random.default_rng(0)
    train = [rng.integers(0, 12, 30) for _ in range(40)]
    held = [rng.integers(0, 12, 30) for _ in range(20)]
    s_clm, n_clm = unigram_losses(train, held, 12, "clm", 4)
    s_mlm, n_mlm = unigram_losses(train, held, 12, "mlm", 4)
    assert n_clm.tolist() == [29.0] * 20  # every token after the first
    assert n_mlm.tolist() == [float((h >= 4).sum()) for h in held]  # non-special tokens only
    # near-uniform tokens: the floor sits near log(vocabulary) (8 ids for MLM's targets)
    assert (
        abs(s_clm.sum() / n_clm.sum() - np.log(12)) < 0.1 and abs(s_mlm.sum() / n_mlm.sum() - np.log(8)) < 0.1
    )
    losses = {
        ("ehrmamba", 0): ("clm", s_clm * 0.5, n_clm),
        ("ehrmamba", 1): ("clm", s_clm * 0.6, n_clm),
        ("bigbird", 0): ("mlm", s_mlm * 0.7, n_mlm),
        (results.UNIGRAM, "clm"): ("clm", s_clm, n_clm),
        (results.UNIGRAM, "mlm"): ("mlm", s_mlm, n_mlm),
    }
    t = results.pretrain_loss_table(losses, n_boot=50, ci=0.95)
    assert len(t) == 4 and list(t["model"]).count(results.UNIGRAM) == 2
    assert t.set_index("model").loc["EHRMamba", "seeds"] == 2
    assert (t[t["model"] == results.UNIGRAM]["seeds"] == "-").all()
    with pytest.raises(ValueError, match="objective"):
        unigram_losses(train, held, 12, "next", 4)


def test_loss_figure_averages_only_steps_every_run_reached():
    """Runs stop at different steps: past the shortest, a mean over the rest would be another population
    (the smoke report's finetuning loss 'rose' where only the null-task runs were left)."""
    import matplotlib.pyplot as plt

    from repro.evaluation import figures

    rows = []
    for run, n, loss in (("mortality_1m", 10, 0.4), ("null_task", 30, 0.7)):
        for seed in (0, 1):
            rows += [
                {"model": "m", "phase": "finetuning", "run": run, "step": i, "loss": loss, "seed": seed}
                for i in range(n + seed)
            ]
    fig = figures.loss_figure(pd.DataFrame(rows))
    (line,) = [ln for ln in fig.axes[0].lines if len(ln.get_xdata())]
    assert line.get_xdata().max() == 9 and np.allclose(line.get_ydata(), 0.55)
    plt.close(fig)


def test_learning_figure_legend_names_only_the_models_it_draws():
    """MultiBird's MPF curves have no panel (task "MPF"): a legend entry for it would name a missing line."""
    import matplotlib

    matplotlib.use("Agg")
    from repro.evaluation import figures

    rows = []
    for model, phase, task in [
        ("EHRMamba", "pretraining", ""),
        ("EHRMamba", "finetuning", "mortality_1m"),
        ("BigBird", "finetuning", "mortality_1m"),
        ("MultiBird", "finetuning", "MPF"),
    ]:
        for step in (1, 2):
            rows.append(
                {"model": model, "phase": phase, "objective": "clm" if phase == "pretraining" else "bce"}
                | {"task": task, "seed": 0, "step": step, "tokens": 1000 * step, "loss": 1.0 / step}
                | {"auroc": 0.5 + 0.1 * step}
            )
    fig = figures.learning_figure(pd.DataFrame(rows))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["EHRMamba", "BigBird"]
