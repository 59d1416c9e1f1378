"""A run's training grid in slices (``repro train --shard i/n``): several nodes, or SLURM array tasks, each
train a disjoint slice of the runs notebooks 01, 03 and 05 would train, into one shared work folder; then
``repro run --work`` executes the notebooks, which find every run cached and only evaluate.

Each slice holds whole (plan, backbone, seed) groups, so a backbone's pretraining and every run from it
land on one node; stage locks (``grid.stage_lock``) keep two processes from training one run twice where
slices meet (notebook 05's default tokens are notebook 01's runs).
"""

from __future__ import annotations

from pathlib import Path

from repro.config import RunParams
from repro.training.grid import Plan, groups, run_plans, shard_keys, stages
from repro.training.prepare import prepare
from repro.training.trainer import Trainer
from repro.training.variants import variant_plans


def grid_plans(
    params: RunParams, data_dir: str | None, work_dir: str | Path
) -> tuple[list[Plan], list[bool]]:
    """The plans of notebooks 01 (models x tasks x seeds, with its probes and forecasts), 03 (MPF and its
    single-task runs) and 05 (each representation variant), with the probe flag of each plan."""
    prep = prepare(params, data_dir)
    params = prep.params  # without a task dropped by eval.untrainable: drop, as the notebooks see it
    jobs = [(m, t, s) for s in params.seeds for m in params.models for t in params.tasks]
    jobs += [(m, t, s) for s in params.seeds for m in params.mpf_models for t in [*params.tasks, "mpf"]]
    plans: list[Plan] = [(prep, Path(work_dir), list(dict.fromkeys(jobs)))]
    _, variants = variant_plans(params, data_dir, work_dir)
    for vprep, vwork, vjobs in variants:
        if Path(vwork) == Path(work_dir) and vprep.params.hash() == prep.params.hash():
            plans[0] = (prep, Path(work_dir), list(dict.fromkeys(plans[0][2] + vjobs)))
        else:
            plans.append((vprep, vwork, vjobs))
    return plans, [True] + [False] * (len(plans) - 1)


def train_shard(
    params: RunParams, data_dir: str | None, work_dir: str | Path, shard: tuple[int, int], workers: int
) -> list[str]:
    """Train slice ``shard`` (i, n) of the grid into ``work_dir``; lines saying what it held and what was
    already there."""
    plans, probes = grid_plans(params, data_dir, work_dir)
    trainers = [Trainer(prep, w, progress=False) for prep, w, _ in plans]
    mine = shard_keys(groups(plans), *shard)
    todo = stages(trainers, plans, probes)
    n_stages = sum((todo[k][0] is not None) + len(todo[k][1]) for k in mine if k in todo)
    names = ", ".join(f"{b} seed {s}" + (f" (variant plan {p})" if p else "") for p, b, s in mine)
    head = f"shard {shard[0]}/{shard[1]}"
    lines = [
        f"{head}: {len(mine)} of the grid's {len(groups(plans))} groups ({names or 'none'}); "
        f"{sum(k in todo for k in mine)} unfinished, {n_stages} stages to train"
    ]
    run_plans(plans, workers, probes, shard)
    left = [k for k in mine if k in stages(trainers, plans, probes)]
    lines.append(
        f"{head}: every group of the slice finished in {work_dir}"
        if not left
        else f"{head}: {len(left)} groups left unfinished (out of memory twice; the notebooks train them): {left}"
    )
    return lines


def parse_shard(text: str) -> tuple[int, int]:
    """ "i/n" -> (i, n), checked.

    >>> parse_shard("1/4")
    (1, 4)
    """
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n
