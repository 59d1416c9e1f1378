"""`python -m repro.bench mechanisms`: each pretrained backbone finetuned on one planted mechanism's label."""

from __future__ import annotations

import numpy as np
import pytest

from repro.config import ParamsError, load_params
from repro.data.meds import SUBJECT
from repro.data.synthetic import write_synthetic_meds
from repro.profiling.bench_mechanisms import main, mechanism_samples, run_bench
from repro.training.prepare import prepare
from repro.training.trainer import Trainer

OVERRIDES = {
    "models": ["transformer", "count_lr"],
    "seeds": [0],
    "tasks": ["mortality_1m"],
    "tokenizer.max_len": 128,
    "train.pretrain_steps": 3,
    "train.finetune_steps": 3,
    "train.val_samples": 32,
    "match_params": False,
    "model_sizes.transformer": {"d_model": 32, "n_layers": 1, "n_heads": 2},
}


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    root = tmp_path_factory.mktemp("mech") / "meds"
    write_synthetic_meds(root, 300, seed=3, shard_size=150)
    return prepare(load_params("params/smoke.yaml", OVERRIDES), data_dir=root)


def test_labels_are_the_mechanism_sides_where_it_acts(prep, tmp_path):
    trainer = Trainer(prep, tmp_path, progress=False)
    items, df = trainer.samples("mortality_1m", "train")
    truth = prep.truth.set_index(SUBJECT).loc[df[SUBJECT]]
    x, y = mechanism_samples(trainer, "interaction", "train")
    assert len(x) == len(items)  # the interaction acts in every stay
    assert np.array_equal(y, (truth["feature_warfarin"] == truth["feature_ciprofloxacin"]).to_numpy())
    x, y = mechanism_samples(trainer, "order", "train")
    hyperk = truth["feature_hyperkalemia"].to_numpy() > 0
    assert len(x) == hyperk.sum() < len(items)  # only stays with a high potassium
    assert np.array_equal(y, truth["feature_insulin_before"].to_numpy()[hyperk] > 0)


def test_bench_reuses_the_runs_checkpoint_and_reads_causal_models_both_ways(prep, tmp_path):
    trainer = Trainer(prep, tmp_path, progress=False)
    trainer.pretrained("transformer", 0)  # as `repro run` leaves it in work/
    ckpt = tmp_path / "transformer-seed0-pretrain.pt"
    written = ckpt.stat().st_mtime_ns
    table = run_bench(
        Trainer(prep, tmp_path, progress=False), ["transformer"], ["interaction"], 0, ("head", "mean")
    )
    assert ckpt.stat().st_mtime_ns == written  # loaded, not trained again
    assert list(zip(table["model"], table["readout"])) == [
        ("count_lr", "counts"),
        ("transformer", "last token"),
        ("transformer", "mean"),
    ]
    assert table["held-out AUROC"].between(0, 1).all()
    assert table["pretraining"].iloc[1].startswith("clm, ")


def test_bad_mechanism_and_real_data_are_refused(prep, tmp_path):
    trainer = Trainer(prep, tmp_path, progress=False)
    with pytest.raises(ParamsError, match="unknown \\['orders'\\]"):
        run_bench(trainer, ["transformer"], ["orders"])
    no_truth = Trainer(type(prep)(**{**vars(prep), "truth": None}), tmp_path, progress=False)
    with pytest.raises(ParamsError, match="needs the synthetic cohort's truth"):
        run_bench(no_truth, ["transformer"], ["order"])


def test_main_rejects_an_unknown_readout(capsys):
    with pytest.raises(SystemExit):
        main(["--work", "w", "--readouts", "cls"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow  # spawns a pool of worker processes
def test_worker_processes_give_the_rows_one_process_gives(prep, tmp_path):
    trainer = Trainer(prep, tmp_path, progress=False)
    one = run_bench(trainer, ["transformer"], ["interaction", "trend"], 0, ("head", "mean"))
    two = run_bench(trainer, ["transformer"], ["interaction", "trend"], 0, ("head", "mean"), workers=2)
    keys = ["model", "readout", "mechanism"]
    assert two[keys].equals(one[keys])
    assert np.allclose(two["held-out AUROC"], one["held-out AUROC"], atol=0.01)
