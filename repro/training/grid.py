"""A grid of training jobs over worker processes: each backbone's pretraining, then every run from it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

from repro.config import from_dict
from repro.training.locks import file_lock
from repro.training.prepare import Prepared, prepare
from repro.training.trainer import FORECAST, PRETRAIN, PROBES, Trainer, job_key


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
    # one thread per worker, for torch (after Trainer, which applies params.train.num_threads) and for the
    # BLAS under numpy and scikit-learn: the probes' logistic regressions otherwise start a thread per core
    # in every worker (on the quick H200 run, before this limit, probes beside training took 121-168 s per
    # backbone against 40-51 s alone; the limit's effect there is not measured yet)
    torch.set_num_threads(1)
    threadpool_limits(1)

    def train() -> None:
        if jobs:
            _run_stage(trainer, jobs)

    if slots is None:
        train()
        return None
    return run_on_slot(slots, train)


# Relative wall time of one (backbone, seed) group, from the training tables of the H200/H100 default runs
# (pretraining plus five finetunes, seconds summed: counts + LR 40 on the CPU, BigBird with its MPF run 30,
# BiLSTM 22, the others 11-14; at 32 MLM epochs CEHR-BERT's and BigBird's pretraining took 352-434 s each
# beside five other processes, and CEHR-BERT now runs to about 52 epochs where BigBird stops after 22-31):
# the pool starts the longest first.
_GROUP_COST = {"cehr_bert": 4.5, "mamba2": 4.0, "count_lr": 3.0, "bigbird": 2.5, "lstm": 1.8}


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
Job = tuple[str, str, int]


@dataclass
class Stage:
    """Jobs one worker runs in a row: a backbone's pretraining, or runs that start from it (jobs sharing
    a cached run, as MultiBird's tasks share BigBird's MPF run, go together so it trains once)."""

    plan: int
    group: tuple[str, int]  # (backbone, seed)
    jobs: list[Job]
    rank: tuple[int, int]  # lower first: the kind (pretraining, MPF, finetuning, probes), the group's order


def _kind(job: Job) -> int:
    """Start order among the runs from one pretrained backbone: MPF (the longest) 1, finetuning 2, probes
    and forecasting 3 (pretraining itself is 0)."""
    name, task, _ = job
    if task == FORECAST or task.startswith(PROBES):
        return 3
    return 1 if task == "mpf" or name == "multibird" else 2


def stages(trainers: list[Trainer], plans: list[Plan], probes: bool | list[bool] = False) -> dict:
    """Each (plan, backbone, seed) group's unfinished work as {key: (pretraining stage or None, stages
    that wait for it)}. The pretraining goes first and alone; then every finetuning run, MPF run, probe and
    forecast of that backbone is its own stage, so a GPU's workers are not held up behind one group's
    sequence (the quick H200 run spent 430 s in BigBird's group, pretraining then three runs one after the
    other, while others sat idle). ``probes``: add ``probes.tasks`` probes and forecasting of every
    pretrained backbone of the plans (or of the plans flagged in a list; cached, so notebook 01 then reads
    them)."""
    from repro.config import BACKBONES
    from repro.models.registry import pretrain_objective, pretrains

    order = {
        g: k
        for k, g in enumerate(
            schedule(list(dict.fromkeys((_backbone(j[0]), j[2]) for _, _, jobs in plans for j in jobs)))
        )
    }
    flags = probes if isinstance(probes, list) else [probes] * len(plans)
    out: dict[tuple[int, str, int], tuple[Stage | None, list[Stage]]] = {}
    for i, (prep, _, jobs) in enumerate(plans):
        todo = list(jobs)
        if flags[i]:
            pp = prep.params.probes
            pretrained = [
                (j[0], j[2]) for j in jobs if j[0] in BACKBONES and j[1] != "mpf" and pretrains(j[0])
            ]
            for b, s in dict.fromkeys(pretrained):
                todo += [(b, PROBES + t, s) for t in pp.tasks if t in prep.params.tasks]
                causal = prep.params.model_sizes.get(b, {}).get("causal")
                if pp.forecast_patients and pretrain_objective(b, causal) == "clm":  # what forecasts reads
                    todo.append((b, FORECAST, s))
        by_key: dict[tuple[str, int], dict[str, list[Job]]] = {}
        for job in todo:
            if trainers[i].stored(job_key(job)) is None:  # done runs need no worker
                by_key.setdefault((_backbone(job[0]), job[2]), {}).setdefault(job_key(job), []).append(job)
        for (b, s), runs in by_key.items():
            rank = order[(b, s)]
            after = []
            for js in runs.values():
                after.append(Stage(i, (b, s), js, (_kind(js[0]), rank)))
            pre = Stage(i, (b, s), [(b, PRETRAIN, s)], (0, rank)) if b in BACKBONES and pretrains(b) else None
            out[(i, b, s)] = (pre, after)
    return out


def run_plans(
    plans: list[Plan],
    workers: int = 1,
    probes: bool | list[bool] = False,
    shard: tuple[int, int] | None = None,
) -> list[list]:
    """`run_all` for several prepared datasets at once (notebook 05's variants): one pool trains the stages
    of every plan, so a variant with few runs does not leave workers idle. Returns each plan's runs.

    The pool keeps at most ``workers`` stages in flight and starts the ready one of lowest rank:
    pretraining first (it unlocks the most), then MPF runs (the longest), finetuning, probes.
    ``shard`` (i, n): train only the i-th of n disjoint slices of the (plan, backbone, seed) groups and
    return nothing (``repro train --shard``: several nodes fill one work folder, the notebooks then read it).
    """
    from tqdm import tqdm

    trainers = [Trainer(prep, work_dir, progress=False) for prep, work_dir, _ in plans]
    todo = stages(trainers, plans, probes)
    if shard is not None:
        mine = set(shard_keys(groups(plans), *shard))
        todo = {k: v for k, v in todo.items() if k in mine}
    gpus = _gpus(plans)
    if gpus > 1:
        workers = max(workers, gpus)  # every GPU of the node gets at least one training process
    n_stages = sum((pre is not None) + len(after) for pre, after in todo.values())
    if workers > 1 and n_stages > 1:
        _pool(plans, todo, workers, gpus, n_stages)
    elif shard is not None:  # one process: the same stages in their order, here
        for pre, after in todo.values():
            for st in ([pre] if pre else []) + sorted(after, key=lambda st: st.rank):
                _run_stage(trainers[st.plan], st.jobs)
    if shard is not None:
        return [[] for _ in plans]
    out = []
    for trainer, (_, _, jobs) in zip(trainers, plans, strict=True):
        out.append([trainer.run_job(job) for job in tqdm(jobs, desc="models x tasks x seeds")])
    return out


def groups(plans: list[Plan]) -> list[tuple[int, str, int]]:
    """Every (plan, backbone, seed) group of the plans, finished or not: what shards are cut from, so a
    slice is the same on every node whatever the cache already holds."""
    return sorted({(i, _backbone(j[0]), j[2]) for i, (_, _, jobs) in enumerate(plans) for j in jobs})


def shard_keys(keys: list, i: int, n: int) -> list:
    """The i-th of n disjoint slices of the groups ``keys`` ((plan, backbone, seed)), dealt round-robin in
    a fixed order (each backbone's seeds spread over the slices), so the slices of a grid cover it once
    whichever node computes them.

    >>> keys = [(0, "ehrmamba", 0), (0, "ehrmamba", 1), (0, "lstm", 0)]
    >>> shard_keys(keys, 0, 2), shard_keys(keys, 1, 2)
    ([(0, 'ehrmamba', 0), (0, 'lstm', 0)], [(0, 'ehrmamba', 1)])
    """
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {i}/{n}")
    return [k for j, k in enumerate(sorted(keys)) if j % n == i]


def _run_stage(trainer: Trainer, jobs: list[Job]) -> None:
    """One stage's jobs in a row, under the stage's lock (worker processes and the one-process path)."""
    with stage_lock(trainer.work_dir, jobs[0]):
        for job in jobs:
            trainer.run_job(job)


@contextmanager
def stage_lock(work_dir: str | Path, job: Job):
    """Hold an exclusive lock on ``job``'s stage in ``work_dir`` (``locks/<key>.lock``, fcntl.flock), so two
    processes sharing a work folder (array jobs on a shared filesystem, a notebook beside them) never train
    the same run twice: the second waits, then finds the first's result cached (or the finished
    checkpoint, for a pretraining). Needs a filesystem whose locks reach every node (NFS with lockd, Lustre
    mounted with flock)."""
    with file_lock(Path(work_dir) / "locks" / f"{job_key(job)}.lock"):
        yield


def _pool(plans: list[Plan], todo: dict, workers: int, gpus: int, n_stages: int) -> None:
    """Run the stages over ``workers`` processes (spread over ``gpus`` GPUs when there are several); a
    stage that ran out of memory is retried once on whichever GPU is free, then left to the notebook's
    own process, which fails loudly if it still cannot (a pretraining left so takes its runs along)."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from tqdm import tqdm

    ready = [(st, 0) for pre, after in todo.values() for st in ([pre] if pre else after)]
    waiting = {id(pre): after for pre, after in todo.values() if pre}
    ctx = mp.get_context("spawn")
    manager = ctx.Manager() if gpus > 1 else None
    slots = None
    if manager is not None:
        slots = manager.Queue()
        for dev in device_slots(gpus, workers):
            slots.put(dev)
    bar = tqdm(total=n_stages, desc="training stages (pretraining, runs, probes)")
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            running: dict = {}
            while ready or running:
                ready.sort(key=lambda item: item[0].rank)
                while ready and len(running) < workers:
                    st, tries = ready.pop(0)
                    prep, work_dir, _ = plans[st.plan]
                    args = (prep.params.to_dict(), str(prep.meds_dir), str(work_dir), st.jobs, slots)
                    running[pool.submit(_train_group, *args)] = (st, tries)
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    st, tries = running.pop(fut)
                    why = fut.result()
                    if why and tries == 0:  # out of memory beside other runs: once more, wherever is free
                        print(f"training {st.jobs[0]}: {why}; retrying", file=sys.stderr)
                        ready.append((st, 1))
                        continue
                    if why:
                        print(
                            f"training {st.jobs[0]}: {why} again; left to the notebook process",
                            file=sys.stderr,
                        )
                        bar.update(1 + len(waiting.pop(id(st), [])))
                        continue
                    ready += [(a, 0) for a in waiting.pop(id(st), [])]
                    bar.update(1)
    finally:
        bar.close()
        if manager is not None:
            manager.shutdown()


def _gpus(plans: list[Plan]) -> int:
    """CUDA devices the plans' runs may use: all visible ones when their params ask for cuda (or auto)."""
    if not plans or plans[0][0].params.device == "cpu" or not torch.cuda.is_available():
        return 0
    return torch.cuda.device_count()


def run_all(
    prep: Prepared,
    work_dir: str | Path,
    jobs: list[tuple[str, str, int]],
    workers: int = 1,
    probes: bool = False,
) -> list:
    """Train every (model, task, seed) job (task "mpf": the model's multitask run) and return the runs.

    With workers > 1, the stages (each backbone's pretraining, then each run from it) run in parallel
    processes with one torch thread each, which uses small CPUs better than threads inside one small model;
    results go through work/runs/ and checkpoints, so the order and the numbers do not depend on `workers`.
    ``probes``: the pool also computes the probes and forecasts notebook 01 reads (``stages``).
    """
    return run_plans([(prep, work_dir, jobs)], workers, probes)[0]
