"""Experiment steps on a small synthetic cohort: prompts, MPF batches, all tasks through a real model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from repro.config import TASK_NAMES, load_params
from repro.data.dataset import collate
from repro.data.synthetic import write_synthetic_meds
from repro.data.vocab import CLS, REG
from repro.training.prepare import encode_samples, mpf_dataset, prepare
from repro.training.trainer import Trainer


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp") / "meds"
    write_synthetic_meds(root, 240, seed=5, shard_size=100)
    params = load_params(
        "params/smoke.yaml",
        {
            "models": ["ehrmamba", "count_lr"],
            "seeds": [0],
            "train.pretrain_steps": 2,
            "train.finetune_steps": 2,
            "eval.n_bootstrap": 20,
            "eval.min_label_positives": 1,  # 240 subjects: a few condition positives per split
            "tasks": list(TASK_NAMES),
        },
    )
    return prepare(params, data_dir=root)


def test_every_task_has_labels_and_truth(prep):
    assert set(prep.labels) == set(TASK_NAMES)
    for task, df in prep.labels.items():
        assert df["split"].notna().all(), task
        assert df.filter(like="true_prob").notna().all().all(), task
    kept = [c for c in prep.labels["conditions"] if c.startswith("label::")]
    dropped = prep.dropped_labels.get("conditions", [])
    assert kept and len(kept) + len(dropped) == 20  # 20 groups chosen on train, thin ones left out


def test_a_label_without_positives_in_a_split_is_left_out_and_listed():
    import pandas as pd

    from repro.training.prepare import drop_thin_labels

    df = pd.DataFrame(
        {
            "split": ["train"] * 4 + ["tuning"] * 2 + ["held_out"] * 2,
            "label::a": [1, 0, 1, 0, 1, 0, 1, 0],
            "label::b": [1, 0, 1, 0, 0, 0, 1, 0],  # no positive in tuning
            "true_prob::b": 0.5,
        }
    )
    kept, dropped = drop_thin_labels(df, 1)
    assert list(kept.columns) == ["split", "label::a"]
    assert dropped.to_dict(orient="records") == [
        {"label": "b", "positives in train": 2, "positives in tuning": 0, "positives in held_out": 1}
    ]
    assert drop_thin_labels(df, 2)[0].columns.tolist() == ["split"]


@pytest.mark.parametrize("prompt,pos", [("first", 0), ("last", -1)])
def test_prompt_puts_the_task_token_where_the_model_pools(prep, prompt, pos):
    items, _ = encode_samples(prep, "los_1w", "train", prompt=prompt)
    plain, _ = encode_samples(prep, "los_1w", "train")
    tid = prep.tokenizer.task_token_id("los_1w")
    assert all(e.input_ids[pos] == tid for e in items)
    assert all(e.input_ids[0] == CLS and e.input_ids[-1] == REG for e in plain)
    assert all(
        np.array_equal(np.delete(a.input_ids, pos), np.delete(b.input_ids, pos)) for a, b in zip(items, plain)
    )


def test_mpf_batches_carry_the_right_task_token_and_label(prep):
    tasks = ["mortality_1m", "conditions"]
    samples = {t: encode_samples(prep, t, "train", prompt="first") for t in tasks}
    data, spans = mpf_dataset(samples)
    k = len([c for c in prep.labels["conditions"] if c.startswith("label::")])
    assert spans == {"mortality_1m": slice(0, 1), "conditions": slice(1, 1 + k)}
    n_mort = len(samples["mortality_1m"][0])
    batch = collate([data[0], data[n_mort]])
    assert batch["input_ids"][0, 0] == prep.tokenizer.task_token_id("mortality_1m")
    assert batch["input_ids"][1, 0] == prep.tokenizer.task_token_id("conditions")
    assert batch["label_mask"][0].tolist() == [1.0] + [0.0] * k
    assert batch["label_mask"][1].tolist() == [0.0] + [1.0] * k
    assert batch["labels"][0, 0] == samples["mortality_1m"][1]["label"].iloc[0]
    cond = samples["conditions"][1].filter(like="label::").iloc[0].to_numpy(np.float32)
    assert torch.equal(batch["labels"][1, 1:], torch.from_numpy(cond))


def test_trainer_runs_every_task_and_caches(prep, tmp_path):
    trainer = Trainer(prep, tmp_path / "work", progress=False)
    run = trainer.run("count_lr", "conditions", 0)
    assert set(run.predictions["split"]) == {"tuning", "held_out"}
    assert run.predictions["target"].nunique() == len(
        [c for c in prep.labels["conditions"] if c.startswith("label::")]
    )
    again = Trainer(prep, tmp_path / "work", progress=False).run("count_lr", "conditions", 0)
    assert again.predictions.equals(run.predictions)  # loaded from work/runs, not retrained
    mpf = trainer.run_mpf("ehrmamba", 0)
    assert set(mpf) == set(prep.params.tasks) and mpf["conditions"].mode == "MPF"
    assert mpf["conditions"].predictions["target"].nunique() == run.predictions["target"].nunique()


def test_initial_weights_do_not_depend_on_what_the_trainer_built_before(prep, tmp_path):
    """Matching a backbone's size to EHRMamba builds models; a worker that matched it for an earlier group
    must still initialise the next seed's model exactly as a fresh worker does (seen: the smoke run's
    later seeds changed with the pool's schedule)."""
    assert prep.params.match_params
    fresh = Trainer(prep, tmp_path / "a", progress=False).build("transformer", 1)
    reused = Trainer(prep, tmp_path / "b", progress=False)
    reused.build("transformer", 0)  # an earlier group settled the size (and drew from the RNG)
    again = reused.build("transformer", 1)
    state = fresh.state_dict()
    assert all(torch.equal(state[k], v) for k, v in again.state_dict().items())


@pytest.mark.slow  # several processes (pyproject: slow)
def test_one_pool_over_two_plans_gives_each_plan_its_own_serial_runs(prep, tmp_path):
    """Notebook 05 trains several prepared datasets in one pool; each plan must get the runs a serial
    run_all over its own work folder gives (count_lr: no GPU, quick in worker processes)."""
    from repro.training.grid import run_all, run_plans

    jobs = [("count_lr", "mortality_1m", 0), ("count_lr", "los_1w", 0)]
    a, b = tmp_path / "a", tmp_path / "b"
    pooled = run_plans([(prep, a, jobs), (prep, b, jobs[:1])], workers=2)
    assert [len(p) for p in pooled] == [2, 1]
    assert {p.stem for p in (a / "runs").glob("*.pkl")} == {
        "count_lr-mortality_1m-seed0",
        "count_lr-los_1w-seed0",
    }
    assert [p.stem for p in (b / "runs").glob("*.pkl")] == ["count_lr-mortality_1m-seed0"]
    serial = run_all(prep, tmp_path / "serial", jobs, workers=1)
    for got, want in zip(pooled[0], serial, strict=True):
        assert (got.model, got.task) == (want.model, want.task)
        np.testing.assert_array_equal(got.predictions["score"], want.predictions["score"])


def test_a_training_worker_keeps_its_encoded_samples_for_its_next_group(prep, tmp_path):
    from repro.training import grid

    grid._WORKER_TRAINER.clear()
    args = (prep.params.to_dict(), str(prep.meds_dir), str(tmp_path))
    grid._train_group(*args, [("count_lr", "mortality_1m", 0)])
    (trainer,) = grid._WORKER_TRAINER.values()
    encoded = dict(trainer._data)
    grid._train_group(*args, [("count_lr", "mortality_1m", 1)])
    assert list(grid._WORKER_TRAINER.values()) == [trainer]
    assert all(trainer._data[k] is v for k, v in encoded.items())  # the second seed encoded nothing anew
    assert {p.stem for p in (tmp_path / "runs").glob("*.pkl")} == {
        "count_lr-mortality_1m-seed0",
        "count_lr-mortality_1m-seed1",
    }
    grid._train_group(prep.params.to_dict(), str(prep.meds_dir), str(tmp_path / "other"), [])
    assert trainer not in grid._WORKER_TRAINER.values()  # another work folder: a fresh trainer
    grid._WORKER_TRAINER.clear()


def test_a_run_pickled_under_an_old_module_path_counts_as_not_cached(tmp_path):
    """Runs cached before the package moved to stage folders name `repro.experiment.ModelRun`."""
    import pickle

    from repro.training.trainer import _load_cached

    path = tmp_path / "run.pkl"
    path.write_bytes(pickle.dumps({"params_hash": "h", "value": 1}, protocol=0))
    assert _load_cached(path, "h") == 1
    assert _load_cached(path, "other") is None
    old = pickle.dumps({"params_hash": "h", "value": _Old()}, protocol=0)  # text opcodes: names editable
    path.write_bytes(old.replace(_Old.__module__.encode(), b"repro.moved_away"))
    assert _load_cached(path, "h") is None


class _Old:
    pass


def test_runs_are_validated_on_tuning_and_the_tables_say_how_they_ended(prep, tmp_path):
    from repro.evaluation import results

    trainer = Trainer(prep, tmp_path / "work", progress=False)
    runs = [trainer.run("ehrmamba", "mortality_1m", 0), trainer.run("count_lr", "mortality_1m", 0)]
    ft = runs[0].finetune
    assert ft.metric == "auroc" and [v["step"] for v in ft.val] == [2] and ft.best_step == 2
    assert runs[0].pretrain.metric == "loss" and runs[0].pretrain.val[-1]["tokens"] > 0
    table = results.training_table(runs)
    assert table["ended"].tolist() == ["budget (still improving)"] * 2 + ["-"]
    assert table["steps"].tolist() == ["2 / 2", "2 / 2", "-"]
    curves = results.learning_curves(runs)
    assert set(curves["phase"]) == {"pretraining", "finetuning"} and curves["tokens"].gt(0).all()
    preds = results.predictions_frame(runs)
    conv = results.convergence_table(runs, results.evaluate_all(preds, 20, 0.95)).set_index("model")
    assert conv.loc["EHRMamba", "finetuning: on plateau"] == "0 / 1"
    assert conv.loc["Counts + LR", "pretraining: on plateau"] == "-"
    assert conv["above chance"].isin(["yes", "NO: not clearly above chance"]).all()
    # MultiBird finetunes BigBird's pretraining: its row shows that pretraining, named as BigBird's
    import dataclasses

    pair = [
        dataclasses.replace(runs[0], model="bigbird"),
        dataclasses.replace(runs[0], model="multibird", mode="MPF"),
    ]
    conv = results.convergence_table(pair, {}).set_index("model")
    assert conv.loc["BigBird", "pretraining: on plateau"] == "0 / 1"
    assert conv.loc["MultiBird", "pretraining: on plateau"] == "0 / 1 (BigBird's)"
    assert conv.loc["MultiBird", "finetuning: on plateau"] == "0 / 1"


def test_paper_splits_keep_pretraining_and_finetuning_patients_apart(prep):
    import dataclasses

    import meds

    from repro.training.prepare import pretrain_samples

    root = prep.meds_dir
    params = dataclasses.replace(prep.params, tasks=["mortality_1m", "readmission_1m"])
    params.data = dataclasses.replace(params.data, pretrain_only=0.67)
    paper = prepare(params, data_dir=root, cache=False)
    train = {int(s) for s in paper.dataset.subjects(meds.train_split)}
    only = set(paper.pretrain_only)
    assert only < train and 0.5 < len(only) / len(train) < 0.8
    for task, df in paper.labels.items():  # no pretraining patient is finetuned or scored
        assert not set(df["subject_id"]) & only, task
    assert len(pretrain_samples(paper)) == len(only & set(paper.timelines.index()))
    # held_out and tuning untouched; without the option every train patient does both
    for task in params.tasks:
        for split in (meds.tuning_split, meds.held_out_split):
            before, after = prep.labels[task], paper.labels[task]
            assert (after["split"] == split).sum() == (before["split"] == split).sum(), (task, split)
    assert not prep.pretrain_only and len(pretrain_samples(prep)) > len(pretrain_samples(paper))


def test_a_model_with_its_own_input_length_reads_only_its_most_recent_tokens(prep, tmp_path):
    """The paper fed CEHR-BERT and the LSTM 512 tokens and the others 2048: `input_lengths` cuts one
    model's samples (pretraining and finetuning) to the tail of the run's window, the others keep it."""
    import dataclasses

    import meds

    from repro.config import ParamsError
    from repro.training.prepare import model_kwargs, pretrain_samples

    short = 16
    params = dataclasses.replace(prep.params, input_lengths={"cehr_bert": short})
    cut = dataclasses.replace(prep, params=params)
    trainer = Trainer(cut, tmp_path / "work", progress=False)
    assert trainer.input_len("cehr_bert") == short and trainer.input_len("ehrmamba") is None
    assert model_kwargs(params, "cehr_bert")["max_len"] == short
    assert model_kwargs(params, "transformer")["max_len"] == params.tokenizer.max_len
    full, _ = trainer.samples("mortality_1m", meds.train_split)
    mine, _ = trainer.samples("mortality_1m", meds.train_split, max_len=short)
    assert max(len(e) for e in full) > short >= max(len(e) for e in mine)
    long_one = next(i for i, e in enumerate(full) if len(e) > short)
    # the most recent tokens are kept: the short sample ends as the full one does
    assert list(mine[long_one].input_ids[-4:]) == list(full[long_one].input_ids[-4:])
    assert max(len(e) for e in pretrain_samples(cut, meds.train_split, short)) <= short
    run = trainer.run("cehr_bert", "mortality_1m", 0)
    assert run.pretrain.steps_run and set(run.predictions["split"]) == {"tuning", "held_out"}
    for bad in ({"cehr_bert": params.tokenizer.max_len + 1}, {"xgboost": 512}, {"lstm": 2.5}):
        with pytest.raises(ParamsError, match="input_lengths"):
            dataclasses.replace(prep.params, input_lengths=bad)


def test_an_untrainable_task_stops_the_run_or_is_dropped_by_the_switch(prep):
    """eval.untrainable: "stop" names the task and its counts before any training; "drop" leaves it out of
    the params every notebook loops over and lists why in the pre-flight table."""
    import dataclasses

    from repro.config import ParamsError
    from repro.evaluation.summary import preflight_table
    from repro.training.prepare import check_cohort, drop_untrainable

    labels = dict(prep.labels)
    labels["los_1w"] = labels["los_1w"].assign(label=0)  # one class everywhere
    labels["conditions"] = labels["conditions"].drop(columns=[c for c in labels["conditions"] if "::" in c])
    bad = dataclasses.replace(prep, labels=labels)
    with pytest.raises(
        ParamsError, match=r"task conditions: every label .*\(or set eval.untrainable: drop\)"
    ):
        check_cohort(bad)
    dropped = drop_untrainable(bad)
    assert "los_1w" not in dropped.params.tasks and "conditions" not in dropped.params.tasks
    assert set(dropped.labels) == set(dropped.params.tasks) and "mortality_1m" in dropped.params.tasks
    assert "positives 0 / 0 / 0" in dropped.dropped_tasks["los_1w"]
    assert "every label" in dropped.dropped_tasks["conditions"]
    check_cohort(dropped)  # nothing left to stop on
    table = preflight_table(dropped)
    assert table.loc[table["task"] == "los_1w", "status"].str.startswith("dropped").all()
    # a task the run cannot do without (H4's long task) is not dropped silently
    labels["mortality_1m"] = labels["mortality_1m"].assign(label=0)
    with pytest.raises(ParamsError, match=r"would drop .*mortality_1m.*, but .* must be among tasks"):
        drop_untrainable(dataclasses.replace(prep, labels=labels))


def test_probes_read_frozen_pretrained_states_and_score_only_tuning_and_held_out(prep, tmp_path):
    """One probe run per pooling, named as the report names them; no train subject is scored; a backbone
    without pretraining (the LSTM) gets none."""
    import meds

    trainer = Trainer(prep, tmp_path, progress=False)
    runs = trainer.probes("ehrmamba", "mortality_1m", 0)
    assert [r.model for r in runs] == ["ehrmamba+probe:head", "ehrmamba+probe:mean"]
    for r in runs:
        p = r.predictions
        assert set(p["split"]) == {meds.tuning_split, meds.held_out_split}
        assert p["score"].between(0, 1).all() and r.finetune is None and r.pretrain is not None
        held = prep.labels["mortality_1m"]
        assert len(p) == int(held["split"].isin([meds.tuning_split, meds.held_out_split]).sum())
    assert trainer.probes("ehrmamba", "mortality_1m", 0)[0].predictions.equals(runs[0].predictions)  # cached


def test_forecasts_of_a_causal_backbone_and_none_for_an_encoder(prep, tmp_path):
    trainer = Trainer(prep, tmp_path, progress=False)
    pred, true = trainer.forecasts("ehrmamba", 0)
    k = max(prep.params.probes.forecast_horizons)
    assert (
        pred.shape == true.shape
        and pred.shape[1] == k
        and 0 < len(pred) <= prep.params.probes.forecast_patients
    )
    assert (pred > 0).all()  # never [PAD]


def test_the_pool_plans_pretraining_first_then_each_run_from_it_alone(prep, tmp_path):
    """A backbone's finetuning, MPF, probe and forecasting runs wait for its pretraining and then run as
    separate stages; jobs sharing one cached run (MultiBird's tasks, BigBird's MPF) stay together."""
    from repro.training.grid import stages

    jobs = [
        ("ehrmamba", "mortality_1m", 0),
        ("ehrmamba", "los_1w", 0),
        ("ehrmamba", "mpf", 0),
        ("multibird", "mortality_1m", 0),
        ("multibird", "los_1w", 0),
        ("bigbird", "mpf", 0),
        ("lstm", "mortality_1m", 0),
        ("count_lr", "mortality_1m", 0),
    ]
    got = stages([Trainer(prep, tmp_path, progress=False)], [(prep, tmp_path, jobs)], probes=True)
    pre, after = got[(0, "ehrmamba", 0)]
    assert pre.jobs == [("ehrmamba", "pretrain", 0)] and pre.rank[0] == 0
    kinds = {st.jobs[0][1]: st.rank[0] for st in after}
    probe_tasks = [t for t in prep.params.probes.tasks if t in prep.params.tasks]
    assert probe_tasks
    assert kinds == {"mpf": 1, "mortality_1m": 2, "los_1w": 2, "forecast": 3} | {
        f"probes:{t}": 3 for t in probe_tasks
    }
    pre, after = got[(0, "bigbird", 0)]
    assert pre.jobs == [("bigbird", "pretrain", 0)]
    assert [st.jobs for st in after] == [[jobs[3], jobs[4], jobs[5]]]  # one MPF run, trained once
    assert got[(0, "lstm", 0)][0] is None and got[(0, "count_lr", 0)][0] is None  # nothing to pretrain


@pytest.mark.slow
def test_a_pooled_grid_gives_the_serial_runs_and_caches_the_probes(prep, tmp_path):
    """Runs finetuned in other processes than their backbone's pretraining read its checkpoint: the same
    predictions as one process training everything, the pretraining's own time (not the load's), and the
    probes and forecasts left in work/runs/ for notebook 01."""
    from repro.training.grid import run_all

    jobs = [("ehrmamba", "mortality_1m", 0), ("ehrmamba", "los_1w", 0), ("count_lr", "mortality_1m", 0)]
    pooled = run_all(prep, tmp_path / "pool", jobs, workers=2, probes=True)
    serial = run_all(prep, tmp_path / "serial", jobs, workers=1)
    for got, want in zip(pooled, serial, strict=True):
        assert (got.model, got.task) == (want.model, want.task)
        np.testing.assert_allclose(got.predictions["score"], want.predictions["score"], rtol=1e-5)
    state = torch.load(tmp_path / "pool" / "ehrmamba-seed0-pretrain.pt", weights_only=False)
    assert state["seconds"] > 0 and pooled[0].pretrain.seconds == pytest.approx(state["seconds"], rel=0.05)
    cached = {p.stem for p in (tmp_path / "pool" / "runs").glob("*.pkl")}
    assert {f"ehrmamba-{t}-seed0-probes" for t in prep.params.probes.tasks} <= cached
    assert "ehrmamba-forecast-seed0" in cached
    assert not any("probes" in p.stem for p in (tmp_path / "serial" / "runs").glob("*.pkl"))
