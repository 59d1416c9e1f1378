"""`repro train --shard i/n`: slices of a run's grid trained apart fill one work folder exactly once, and the
notebooks' own calls then find every run there."""

from __future__ import annotations

import pytest

from repro.data.synthetic import write_synthetic_meds
from repro.training.grid import shard_keys
from repro.training.shard import parse_shard

TINY = """
name: tiny-shard
device: cpu
seeds: [0, 1]
tasks: [mortality_1m]
models: [ehrmamba, count_lr]
mpf_models: [ehrmamba]
match_params: false
model_sizes: {ehrmamba: {d_model: 16, n_layers: 1, d_state: 4}}
tokenizer: {max_len: 64, n_bins: 3}
train: {batch_size: 16, eval_batch_size: 64, pretrain_steps: 2, finetune_steps: 2, workers: 1, num_threads: 1}
eval: {min_label_positives: 1}
probes: {forecast_patients: 10}
representations:
  variants: {soft bins: {values: soft}}
  models: [ehrmamba]
  tasks: [mortality_1m]
  seeds: [0]
"""


def test_slices_cover_the_groups_once():
    keys = [(p, b, s) for p in (0, 1) for b in ("ehrmamba", "lstm", "count_lr") for s in (0, 1, 2)]
    for n in (1, 2, 3, 5):
        slices = [shard_keys(keys, i, n) for i in range(n)]
        assert sorted(k for sl in slices for k in sl) == sorted(keys)
        assert max(map(len, slices)) - min(map(len, slices)) <= 1
    assert shard_keys(list(reversed(keys)), 1, 3) == shard_keys(keys, 1, 3)  # the order does not matter
    for bad in ("2/2", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)


@pytest.mark.slow
def test_two_shards_train_the_grid_once_and_the_notebooks_find_every_run(tmp_path):
    from repro.config import load_run_params
    from repro.report.pipeline import train_grid
    from repro.training.grid import run_all, stages
    from repro.training.prepare import prepare
    from repro.training.shard import grid_plans
    from repro.training.trainer import Trainer

    meds = write_synthetic_meds(tmp_path / "meds", 300, seed=3, shard_size=150)
    pfile = tmp_path / "tiny.yaml"
    pfile.write_text(TINY)
    work = tmp_path / "work"
    first = train_grid(str(pfile), str(meds), str(work), (0, 2), workers=1)
    files = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file() and p.suffix != ".lock"}
    second = train_grid(str(pfile), str(meds), str(work), (1, 2), workers=1)
    assert "shard 0/2: 3 of the grid's 5 groups" in first[-2] and "3 unfinished" in first[-2]
    assert "shard 1/2: 2 of the grid's 5 groups" in second[-2] and "2 unfinished" in second[-2]
    assert "every group of the slice finished" in first[-1] and "every group" in second[-1]
    # the second slice trained nothing the first had trained
    assert all(p.stat().st_mtime_ns == t for p, t in files.items())

    params = load_run_params(pfile.resolve(), str(meds.resolve()))
    plans, probes = grid_plans(params, str(meds.resolve()), work)
    assert len(plans) == 2  # the run's own grid and the soft-bins variant
    trainers = [Trainer(prep, w, progress=False) for prep, w, _ in plans]
    assert stages(trainers, plans, probes) == {}  # nothing left for anyone
    again = train_grid(str(pfile), str(meds), str(work), (0, 1), workers=1)
    assert "0 unfinished, 0 stages" in again[-2]

    # notebook 01's own call reads every run from the shared folder and trains nothing
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file() and p.suffix != ".lock"}
    prep = prepare(params, str(meds.resolve()))
    jobs = [(m, t, s) for s in params.seeds for m in params.models for t in params.tasks]
    runs = run_all(prep, work, jobs, workers=1, probes=True)
    assert [(r.model, r.task, r.seed) for r in runs] == jobs
    assert Trainer(prep, work, progress=False).probes("ehrmamba", "mortality_1m", 1)
    after = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file() and p.suffix != ".lock"}
    assert after == before
