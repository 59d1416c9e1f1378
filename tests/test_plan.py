"""`repro plan`: every training run of the grid with its budget in steps and tokens, and hours from a
measured run, before anything is trained."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from repro.cli import main
from repro.config import load_params, load_run_params
from repro.training import plan
from repro.training.prepare import prepare


@pytest.fixture(scope="module")
def smoke_plan():
    params = load_run_params("params/smoke.yaml")
    return params, plan.grid(prepare(params, progress=False))


def test_the_grid_lists_every_run_with_its_budget(smoke_plan):
    params, g = smoke_plan
    neural = [m for m in params.models if m != "count_lr"]
    assert "multibird" in neural  # BigBird's pretraining, one MPF run over every task, no per-task runs
    assert set(g.loc[g["phase"] == "pretrain", "model"]) == set(neural) - {"lstm", "multibird"}
    ft = g[g["phase"] == "finetune"]
    assert len(ft) == (len(neural) - 1) * len(params.tasks) and "multibird" not in set(ft["model"])
    mpf = g[g["phase"] == "finetune (MPF)"]
    assert set(mpf["model"]) == {*params.mpf_models, "multibird"} and len(mpf) == len(params.mpf_models) + 1
    row = ft[(ft["model"] == "ehrmamba") & (ft["task"] == "mortality_1m")].iloc[0]
    tp = params.train.for_model("ehrmamba").finetuning()
    assert row["steps"] == tp.steps("finetune", row["samples"]) and row["seeds"] == len(params.seeds)
    fed = row["steps"] * min(row["batch"], row["samples"]) * row["tokens per sample"] * row["seeds"]
    assert abs(row["tokens (budget, all seeds)"] - fed) <= fed * 1e-3  # tokens per sample is rounded


def test_a_cpu_node_plans_a_gpu_run(smoke_plan):
    # planning encodes and counts; it once built its trainer on the params' device and failed without CUDA
    params, g = smoke_plan
    gpu = load_params("params/smoke.yaml", {"device": "cuda"})
    assert gpu.device == "cuda"
    assert plan.grid(prepare(gpu, progress=False)).equals(g)


def test_hours_come_from_a_measured_run_and_unmeasured_models_are_named(smoke_plan, tmp_path):
    _, g = smoke_plan
    (tmp_path / "results").mkdir()
    rows = [
        {"model": "EHRMamba", "phase": "pretrain (CLM)", "tokens/s": "1,000"},
        {"model": "EHRMamba", "phase": "pretrain (CLM)", "tokens/s": "3,000"},
        {"model": "EHRMamba", "phase": "finetune mortality_1m", "tokens/s": "500"},
        {"model": "Counts + LR", "phase": "fit mortality_1m", "tokens/s": "-"},
    ]
    (tmp_path / "results" / "01_accuracy.json").write_text(json.dumps({"training": rows}))
    tps = plan.measured_throughput(tmp_path)
    assert tps == {("EHRMamba", "pretrain"): 2000.0, ("EHRMamba", "finetune"): 500.0}
    projected = plan.project(g, tps, {"ehrmamba": "EHRMamba", "cehr_bert": "CEHR-BERT"})
    pre = projected[(projected["model"] == "ehrmamba") & (projected["phase"] == "pretrain")].iloc[0]
    assert pre["GPU-hours (budget)"] == pytest.approx(pre["tokens (budget, all seeds)"] / 2000 / 3600)
    assert np.isnan(projected.loc[projected["model"] == "cehr_bert", "GPU-hours (budget)"]).all()
    lines = plan.summary(projected, 4)
    assert re.search(r"no measured tokens/s for [a-z_, ]*\bcehr_bert\b", lines[-1]) and "on 4" in lines[-1]
    # each process's tokens/s was measured beside five others on one GPU: a GPU-hour holds six processes'
    assert plan.measured_sharing(tmp_path) == 1  # no manifest
    manifest = {"environment": {"device": "cuda"}, "params": {"train": {"workers": 6}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert plan.measured_sharing(tmp_path) == 6
    shared = plan.project(g, tps, {"ehrmamba": "EHRMamba"}, plan.measured_sharing(tmp_path))
    assert shared["GPU-hours (budget)"].sum() == pytest.approx(projected["GPU-hours (budget)"].sum() / 6)
    manifest["environment"]["gpus"] = 4  # six processes over four GPUs: two on the busiest
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert plan.measured_sharing(tmp_path) == 2
    # runs that stopped early there: the expected hours scale each budget by its measured share
    rows[0]["steps"], rows[1]["steps"], rows[2]["steps"] = "2000 / 2000", "1,000 / 2,000", "250 / 1000"
    (tmp_path / "results" / "01_accuracy.json").write_text(json.dumps({"training": rows}))
    stops = plan.measured_stops(tmp_path)
    assert stops == {
        ("EHRMamba", "pretrain"): [(1.0, None), (0.5, None)],
        ("EHRMamba", "finetune"): [(0.25, None)],
    }
    expected = plan.project(g, tps, {"ehrmamba": "EHRMamba"}, 6, stops)
    row = expected[(expected["model"] == "ehrmamba") & (expected["phase"] == "finetune")].iloc[0]
    assert row["GPU-hours (expected)"] == pytest.approx(row["GPU-hours (budget)"] / 4)
    pre = expected[(expected["model"] == "ehrmamba") & (expected["phase"] == "pretrain")].iloc[0]
    assert pre["share of budget (expected)"] == 0.75  # one ran its whole budget, one stopped halfway
    # with epochs known, an early-stopped run is expected to stop after as many epochs whatever this
    # plan's budget: one that stopped after a quarter of this plan's epochs counts 0.25, not its share 0.5
    rows[1]["epochs"] = f"{pre['steps'] * min(pre['batch'], pre['samples']) / pre['samples'] / 4:.4f}"
    (tmp_path / "results" / "01_accuracy.json").write_text(json.dumps({"training": rows}))
    longer = plan.project(g, tps, {"ehrmamba": "EHRMamba"}, 6, plan.measured_stops(tmp_path))
    pre = longer[(longer["model"] == "ehrmamba") & (longer["phase"] == "pretrain")].iloc[0]
    assert pre["share of budget (expected)"] == pytest.approx((1.0 + 0.25) / 2, abs=1e-3)
    assert "expected if runs stop as early as in the measured run" in plan.summary(expected, 1)[-1]
    manifest["environment"]["device"] = "cpu"  # CPU processes each had cores of their own
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert plan.measured_sharing(tmp_path) == 1


def test_plan_command_names_a_missing_measured_run(tmp_path, capsys):
    assert main(["plan", "params/smoke.yaml", "--measured", str(tmp_path)]) == 2
    assert "--measured" in capsys.readouterr().err


def test_mpf_with_a_fixed_step_budget_plans_what_it_trains():
    from repro.training.trainer import mpf_steps

    params = load_run_params("params/smoke.yaml")
    params.train.finetune_steps = 5
    g = plan.grid(prepare(params, progress=False))
    mpf = g[g["phase"] == "finetune (MPF)"].iloc[0]
    assert mpf["steps"] == 5 * len(params.tasks) == mpf_steps(params.train, 10, len(params.tasks))


def test_the_plan_sits_beside_what_the_runs_used(smoke_plan):
    """tbl-plan: each planned run beside the tokens its seeds fed and their time; a pretraining shared by
    tasks counts once per seed, and runs the notebook did not train show "-"."""
    import pandas as pd

    from repro.evaluation.results import plan_vs_measured
    from repro.training.loop import TrainResult
    from repro.training.trainer import ModelRun

    params, g = smoke_plan

    def run(task, seed, pre_tokens, ft_tokens):
        pre = TrainResult(objective="clm", budget=10, losses=[1.0] * 8, tokens=pre_tokens, seconds=2.0)
        ft = TrainResult(objective="classify", budget=20, losses=[1.0] * 5, tokens=ft_tokens, seconds=1.0)
        return ModelRun("ehrmamba", task, seed, pd.DataFrame(), 1, "k", pre, ft, 3.0)

    runs = [
        run("mortality_1m", 0, 1000, 300),
        run("conditions", 0, 1000, 200),
        run("mortality_1m", 1, 3000, 100),
    ]
    t = plan_vs_measured(g, runs).set_index(["model", "phase", "task"])
    pre = t.loc[("EHRMamba", "pretrain", "-")]
    budget = int(
        g[(g["model"] == "ehrmamba") & (g["phase"] == "pretrain")]["tokens (budget, all seeds)"].iloc[0]
    )
    assert pre["seeds"] == f"2 / {len(params.seeds)}" and pre["tokens fed"] == "4,000"
    assert pre["steps run (mean)"] == 8.0 and pre["seconds (measured)"] == 4.0
    assert pre["seconds (whole budget, projected)"] == pytest.approx(round(budget / 1000, 1))
    assert t.loc[("EHRMamba", "finetune", "mortality_1m"), "tokens fed"] == "400"
    assert t.loc[("CEHR-BERT", "pretrain", "-"), "tokens fed"] == "-"  # planned, not in these runs
    assert len(t) == len(g)
    mpf = t.xs("finetune (MPF)", level="phase")
    assert len(mpf) and (mpf["seeds"] == "in notebook 03").all()  # not "0 / 2": notebook 03 trains them
