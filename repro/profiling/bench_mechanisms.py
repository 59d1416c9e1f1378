"""What pretraining put within reach of finetuning, one planted mechanism at a time (synthetic cohort only).

Why: notebook 01's mechanism figure reads the finetuned mortality models, which mixes what a backbone's
pretraining carries with what one mortality finetuning happened to pick up (in two default runs with the
same settings BigBird read 0.92 and then 0.08 of the interaction's signal). Here each pretrained backbone is
finetuned as the pipeline finetunes (same build, rate, budget, early stopping, validation subset) on one
mechanism's own label: its high-risk side among the mortality_1m samples where it acts
(`repro.evaluation.truth.SIDES`), scored on the held-out split. Counts + LR on the same label shows what
code counts alone give (by design, about 0.5 for order, trend, timing and interaction). Causal models are
also read through the mean of their states (`--readouts head mean`): a last-token readout that cannot
reach what the states hold would show there.

    python -m repro.bench mechanisms --params params/default.yaml --work outputs/default/work --out m.json

Uses the run's pretraining checkpoints under `--work` when they were trained with these params (else
pretrains, writing them there, as `repro run` would); writes nothing else there.
"""

from __future__ import annotations

import argparse
import time

import meds
import numpy as np
import pandas as pd

from repro.config import MECHANISM_NAMES, ParamsError, load_run_params
from repro.data.dataset import SequenceDataset
from repro.data.meds import SUBJECT
from repro.evaluation.store import save_json
from repro.evaluation.truth import SIDES, auroc_or_nan
from repro.training.loop import predict
from repro.training.trainer import Trainer

TASK = "mortality_1m"


def mechanism_samples(trainer: Trainer, mechanism: str, split: str, max_len: int | None = None):
    """The task's encoded samples of `split` where `mechanism` acts, labelled 1 on its high-risk side."""
    items, df = trainer.samples(TASK, split, max_len=max_len)
    truth = trainer.prep.truth.set_index(SUBJECT).loc[df[SUBJECT]].reset_index()
    where, high = SIDES[mechanism][1](truth)
    keep = np.flatnonzero(where)
    return [items[i] for i in keep], high[keep].astype(np.float32)


def finetune_on(
    trainer: Trainer,
    name: str,
    mechanism: str,
    seed: int,
    readout: str = "head",
    max_steps: int | None = None,
) -> dict:
    """Backbone `name` after pretraining (seed `seed`), finetuned on `mechanism`'s label; held-out AUROC."""
    t0 = time.perf_counter()
    n = trainer.input_len(name)
    model, pre = trainer.pretrained(name, seed)
    if readout == "mean":  # EHRModel's mean pooling adds no weights: the same state, read another way
        model.pool = "mean"
    model.set_n_outputs(1)
    (tr, y_tr), (tu, y_tu), (ho, y_ho) = (
        mechanism_samples(trainer, mechanism, s, n)
        for s in (meds.train_split, meds.tuning_split, meds.held_out_split)
    )
    train, tune = SequenceDataset(tr, y_tr[:, None]), SequenceDataset(tu, y_tu[:, None])
    res = trainer.finetune(model, name, train, tune, seed, desc=f"{name} on {mechanism}", max_steps=max_steps)
    tp = trainer.prep.params.train.for_model(name).finetuning()
    scores = predict(model, SequenceDataset(ho), trainer.device, tp.eval_batch_size)[:, 0]
    return {
        "model": name,
        "readout": model.pool_mode or ("last token" if model.causal else "[CLS]"),
        "mechanism": mechanism,
        "seed": seed,
        "held-out AUROC": round(auroc_or_nan(y_ho, scores), 4),
        "samples (train / held out)": f"{len(tr)} / {len(ho)}",
        "pretraining": "none" if pre is None else f"{pre.objective}, {pre.epochs:.2f} epochs, {pre.status}",
        "finetuning": f"{res.epochs:.2f} epochs, {res.status}",
        "seconds": round(time.perf_counter() - t0, 1),
    }


def counts_on(trainer: Trainer, mechanism: str, seed: int) -> dict:
    """Counts + LR on `mechanism`'s label: what the codes present tell without order, values or times."""
    from repro.models.baselines import CountLogistic, count_matrix

    vocab = trainer.prep.tokenizer.vocab_size
    (tr, y_tr), (tu, y_tu), (ho, y_ho) = (
        mechanism_samples(trainer, mechanism, s)
        for s in (meds.train_split, meds.tuning_split, meds.held_out_split)
    )
    lr = CountLogistic(vocab, seed=seed).fit_counts(
        count_matrix(tr, vocab), y_tr, count_matrix(tu, vocab), y_tu
    )
    return {
        "model": "count_lr",
        "readout": "counts",
        "mechanism": mechanism,
        "seed": seed,
        "held-out AUROC": round(auroc_or_nan(y_ho, lr.predict_counts(count_matrix(ho, vocab))), 4),
        "samples (train / held out)": f"{len(tr)} / {len(ho)}",
    }


_WORKER: Trainer | None = None


def _init_worker(prep_args: tuple, work_dir: str) -> None:
    from repro.training.prepare import prepare

    global _WORKER
    params, meds_dir = prep_args
    _WORKER = Trainer(prepare(params, data_dir=meds_dir, progress=False), work_dir, progress=False)


def _finetune_job(job: tuple) -> dict:
    return finetune_on(_WORKER, *job)


def run_bench(
    trainer: Trainer,
    models: list[str],
    mechanisms: list[str],
    seed: int = 0,
    readouts: tuple[str, ...] = ("head",),
    max_steps: int | None = None,
    workers: int = 1,
) -> pd.DataFrame:
    """One row per (model, readout, mechanism); the mean readout only for causal models.

    With `workers` > 1 the finetuning runs go to that many processes (small models leave a GPU idle
    between kernels, as in `repro run`); each backbone is pretrained (or loaded) here first, so no two
    processes train the same checkpoint.
    """
    if trainer.prep.truth is None:
        raise ParamsError("bench mechanisms needs the synthetic cohort's truth; this data has none")
    unknown = sorted(set(mechanisms) - set(MECHANISM_NAMES))
    if unknown:
        raise ParamsError(f"--mechanisms: unknown {unknown}; known: {', '.join(MECHANISM_NAMES)}")
    causal = {name: trainer.pretrained(name, seed)[0].causal for name in models}
    jobs = [
        (name, mechanism, seed, readout, max_steps)
        for mechanism in mechanisms
        for name in models
        for readout in readouts
        if readout == "head" or causal[name]
    ]
    rows = [counts_on(trainer, mechanism, seed) for mechanism in mechanisms]
    if workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        prep_args = (trainer.prep.params, trainer.prep.meds_dir)
        with ProcessPoolExecutor(
            workers, mp.get_context("spawn"), _init_worker, (prep_args, str(trainer.work_dir))
        ) as pool:
            done = list(pool.map(_finetune_job, jobs))
    else:
        done = [finetune_on(trainer, *job) for job in jobs]
    for row in done:
        print(row, flush=True)
    order = {m: i for i, m in enumerate(mechanisms)}
    return pd.DataFrame(sorted(rows + done, key=lambda r: order[r["mechanism"]]))


def main(argv: list[str] | None = None) -> int:
    from repro.training.prepare import prepare

    ap = argparse.ArgumentParser(prog="python -m repro.bench mechanisms", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/default.yaml")
    ap.add_argument("--work", required=True, help="a run's work/ folder (its pretraining checkpoints)")
    ap.add_argument("--models", nargs="+", default=["ehrmamba", "transformer", "bigbird", "cehr_bert"])
    ap.add_argument("--mechanisms", nargs="+", default=list(MECHANISM_NAMES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--readouts", nargs="+", choices=["head", "mean"], default=["head", "mean"])
    ap.add_argument("--max-steps", type=int, default=None, help="cap on finetuning steps (a quick look)")
    ap.add_argument("--workers", type=int, default=1, help="finetuning processes (6 on a GPU, as repro run)")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    params = load_run_params(args.params)
    trainer = Trainer(prepare(params, progress=False), args.work, progress=False)
    table = run_bench(
        trainer, args.models, args.mechanisms, args.seed, tuple(args.readouts), args.max_steps, args.workers
    )
    wide = table.pivot_table(
        index=["model", "readout"], columns="mechanism", values="held-out AUROC", sort=False
    )
    print(wide.round(3).to_string())
    if args.out:
        save_json(table.to_dict(orient="records"), args.out)
    return 0
