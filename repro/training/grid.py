"""A grid of training jobs over worker processes: groups that share a pretrained backbone, longest first."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from repro.config import from_dict
from repro.training.prepare import Prepared, prepare
from repro.training.trainer import Trainer, job_key


def _backbone(model: str) -> str:
    return "bigbird" if model == "multibird" else model


_WORKER_TRAINER: dict[tuple[str, str, str], Trainer] = {}


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def device_slots(n_devices: int, workers: int) -> list[int]:
    """The GPU of each worker slot: at least one process per GPU, the rest spread round-robin.

    >>> device_slots(2, 6), device_slots(4, 1)
    ([0, 1, 0, 1, 0, 1], [0, 1, 2, 3])
    """
    return [i % n_devices for i in range(max(workers, n_devices))]


def run_on_slot(slots, train: Callable[[], None]) -> str | None:
    """Take a free GPU from ``slots`` (a queue of device indices), make it the process's current device,
    run ``train`` there and give the GPU back. Out of memory is returned ("out of memory on cuda:N"), not
    raised, so the group can be retried on another GPU; any other error is raised."""
    dev = slots.get()
    try:
        torch.cuda.set_device(dev)
        train()
        return None
    except Exception as exc:
        if _is_oom(exc):
            return f"out of memory on cuda:{dev}"
        raise
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        slots.put(dev)


def _train_group(
    params_dict: dict, meds_dir: str, work_dir: str, jobs: list[tuple[str, str, int]], slots=None
) -> str | None:
    """Worker process: rebuild the prepared data, train a group of jobs, leave results in work/runs/.

    A worker serves many groups: its Trainer (prepared data, encoded samples, pretrained weights) is kept
    for the next group of the same params; on the H200 node each group otherwise re-encoded every task's
    samples (about 10 s of CPU for the default cohort) while the GPU waited. With ``slots`` (several GPUs)
    the group trains on whichever GPU is free and returns why when it ran out of memory there.
    """
    params = from_dict(params_dict)
    key = (params.hash(), meds_dir, work_dir)
    if key not in _WORKER_TRAINER:
        _WORKER_TRAINER.clear()
        _WORKER_TRAINER[key] = Trainer(prepare(params, meds_dir), work_dir, progress=False)
    trainer = _WORKER_TRAINER[key]
    torch.set_num_threads(1)  # after Trainer, which applies params.train.num_threads

    def train() -> None:
        for job in jobs:
            trainer.run_job(job)

    if slots is None:
        train()
        return None
    return run_on_slot(slots, train)


# Relative wall time of one (backbone, seed) group, from the training table of the H200 default run
# (pretraining plus five finetunes, seconds summed: counts + LR 40 on the CPU, BigBird with its MPF run 30,
# BiLSTM 22, the others 11-14): the pool starts the longest first, so its tail is short.
_GROUP_COST = {"mamba2": 4.0, "count_lr": 3.0, "bigbird": 2.5, "lstm": 1.8}


# Backbones whose kernels Triton compiles and autotunes on first use (on disk since TRITON_CACHE_*): their
# first group pays it, so their other seeds go last, when the tuned kernels are cached.
_TUNED_ONCE = {"mamba2"}


def schedule(groups: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Order (backbone, seed) groups for a pool: longest first, a Triton-tuned backbone's later seeds last.

    >>> schedule([("ehrmamba", 0), ("mamba2", 1), ("lstm", 0), ("mamba2", 0)])
    [('mamba2', 0), ('lstm', 0), ('ehrmamba', 0), ('mamba2', 1)]
    """
    first: dict[str, int] = {}
    for backbone, seed in groups:
        first[backbone] = min(seed, first.get(backbone, seed))
    late = [g for g in groups if g[0] in _TUNED_ONCE and g[1] != first[g[0]]]
    early = [g for g in groups if g not in late]
    return sorted(early, key=lambda g: -_GROUP_COST.get(g[0], 1.0)) + late


Plan = tuple[Prepared, "str | Path", list[tuple[str, str, int]]]


def run_plans(plans: list[Plan], workers: int = 1) -> list[list]:
    """`run_all` for several prepared datasets at once (notebook 05's variants): one pool trains the groups
    of every plan, so a variant with few groups does not leave workers idle. Returns each plan's runs."""
    from tqdm import tqdm

    trainers = [Trainer(prep, work_dir, progress=False) for prep, work_dir, _ in plans]
    pending: dict[tuple[int, str, int], list] = {}
    for i, (_, _, jobs) in enumerate(plans):
        for job in jobs:
            if trainers[i].stored(job_key(job)) is None:  # done runs need no worker
                pending.setdefault((i, _backbone(job[0]), job[2]), []).append(job)
    gpus = _gpus(plans)
    if gpus > 1:
        workers = max(workers, gpus)  # every GPU of the node gets at least one training process
    if workers > 1 and len(pending) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        order = {g: k for k, g in enumerate(schedule(list(dict.fromkeys((b, s) for _, b, s in pending))))}
        keys = sorted(pending, key=lambda k: (order[(k[1], k[2])], k[0]))
        ctx = mp.get_context("spawn")
        manager = ctx.Manager() if gpus > 1 else None
        slots = None
        if manager is not None:
            slots = manager.Queue()
            for dev in device_slots(gpus, workers):
                slots.put(dev)
        try:
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:

                def submit(k):
                    prep, work_dir, _ = plans[k[0]]
                    args = (prep.params.to_dict(), str(prep.meds_dir), str(work_dir), pending[k], slots)
                    return pool.submit(_train_group, *args)

                futures = {submit(k): (k, 0) for k in keys}
                bar = tqdm(total=len(futures), desc="training (backbone x seed)")
                while futures:
                    done = next(as_completed(futures))
                    k, tries = futures.pop(done)
                    why = done.result()
                    if (
                        why and tries == 0
                    ):  # out of memory beside other runs: once more, on whichever GPU is free
                        print(f"training group {k[1:]}: {why}; retrying", file=sys.stderr)
                        futures[submit(k)] = (k, 1)
                        continue
                    if why:  # the notebook's own process tries it last and fails loudly if it still cannot
                        print(
                            f"training group {k[1:]}: {why} again; left to the notebook process",
                            file=sys.stderr,
                        )
                    bar.update(1)
                bar.close()
        finally:
            if manager is not None:
                manager.shutdown()
    out = []
    for trainer, (_, _, jobs) in zip(trainers, plans, strict=True):
        out.append([trainer.run_job(job) for job in tqdm(jobs, desc="models x tasks x seeds")])
    return out


def _gpus(plans: list[Plan]) -> int:
    """CUDA devices the plans' runs may use: all visible ones when their params ask for cuda (or auto)."""
    if not plans or plans[0][0].params.device == "cpu" or not torch.cuda.is_available():
        return 0
    return torch.cuda.device_count()


def run_all(prep: Prepared, work_dir: str | Path, jobs: list[tuple[str, str, int]], workers: int = 1) -> list:
    """Train every (model, task, seed) job (task "mpf": the model's multitask run) and return the runs.

    With workers > 1, groups of jobs that share a pretrained backbone (same backbone and seed) run in
    parallel processes with one torch thread each, which uses small CPUs better than threads inside one
    small model; results go through work/runs/, so the order and the numbers do not depend on `workers`.
    """
    return run_plans([(prep, work_dir, jobs)], workers)[0]
