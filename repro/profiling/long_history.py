"""H4's accuracy on long histories: each model finetuned and scored at lengths past the run's max_len."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import meds
import numpy as np
import pandas as pd
import torch

from repro.data.dataset import SequenceDataset
from repro.profiling.sweep import ATTENTION_MODELS, cpu_threads, matched_kwargs, probe_kernel_path
from repro.profiling.timing import OK, OOM, REFERENCE_LABEL, SKIP_REFERENCE, free_memory, is_oom, is_reference


# --------------------------------------------------------------------------------------------------------
# H4: accuracy when models may read longer histories
# --------------------------------------------------------------------------------------------------------
@dataclass
class LengthRun:
    """One model finetuned and scored with ``max_len = length`` (status "ok", "oom", "skipped: ...")."""

    model: str
    length: int
    status: str
    kernel_path: str
    n_params: int
    seconds: float
    peak_mem_gib: float
    predictions: pd.DataFrame | None  # held_out: subject_id, split, target, label, score

    @property
    def key(self) -> str:
        """Display name carrying the length, e.g. "EHRMamba @ 2048"."""
        from repro.evaluation.results import label

        return f"{label(self.model)} @ {self.length}"


def at_length(prep, length: int, sizes: Mapping[str, Mapping[str, Any]] | None = None):
    """A view of the prepared data whose tokenizer, parameters and model sizes allow ``length`` tokens.

    Model sizes are the run's (``sizes``, default ``matched_kwargs``: matched to EHRMamba at the run's
    ``max_len``, as in H1) with ``max_len`` raised to ``length``; the H4 training settings
    (``efficiency.long_*``) replace the run's.
    """
    params, eff = prep.params, prep.params.efficiency
    sizes = {
        name: {k: v for k, v in kw.items() if k not in ("n_types", "max_visits", "max_len")}
        for name, kw in (sizes or matched_kwargs(prep, eff.long_models)).items()
    }
    train = dataclasses.replace(
        params.train,
        batch_size=eff.long_batch_size,
        finetune_batch_size=None,
        # H4 trains every model at its one long batch: per-model batches (the paper's) do not apply
        per_model={
            m: {k: v for k, v in kw.items() if not k.endswith("batch_size")}
            for m, kw in params.train.per_model.items()
        },
        # scoring batches hold as many tokens as the run's own at max_len (never fewer rows than training)
        eval_batch_size=max(
            eff.long_batch_size, params.train.eval_batch_size * params.tokenizer.max_len // length
        ),
        pretrain_steps=eff.long_pretrain_steps,
        finetune_steps=eff.long_finetune_steps,
        num_threads=cpu_threads(params),
    )
    tok_params = dataclasses.replace(params.tokenizer, max_len=length)
    new = dataclasses.replace(
        params, tokenizer=tok_params, train=train, model_sizes=sizes, match_params=False, input_lengths={}
    )
    tok = copy.copy(prep.tokenizer)
    tok.params = tok_params
    return dataclasses.replace(prep, params=new, tokenizer=tok)


def history_tokens(prep, task: str, split: str = meds.held_out_split) -> pd.Series:
    """Untruncated token count of each sample's history before its prediction time, by subject_id."""
    from repro.training.prepare import encode_samples

    items, df = encode_samples(prep, task, split, max_len=2**31 - 1)
    out = pd.Series([len(e) for e in items], index=df["subject_id"].to_numpy(), name="history tokens")
    if not out.index.is_unique:
        raise ValueError(f"task {task} has several samples per subject in {split}; subgroups need one")
    return out


def _train_and_score(trainer, prep_l, name: str, task: str, seed: int, device: torch.device):
    from repro.data.tasks import label_columns
    from repro.training.loop import fit, predict
    from repro.training.prepare import long_predictions

    tp = prep_l.params.train
    model, _ = trainer.pretrained(name, seed)
    items, df = trainer.samples(task, meds.train_split)  # encoded once per length, for every model
    cols = label_columns(df)
    model.set_n_outputs(len(cols))
    fit(
        model,
        SequenceDataset(items, df[cols].to_numpy()),
        tp,
        "classify",
        tp.finetune_steps,
        tp.finetune_lr,
        seed + 1000,
        device,
        progress=trainer.progress,
        desc=f"finetune {name} @ {prep_l.params.tokenizer.max_len}",
    )
    items, df = trainer.samples(task, meds.held_out_split)
    scores = predict(model, SequenceDataset(items), device, tp.eval_batch_size)
    return model, long_predictions(df, scores)


def long_history_runs(prep, work_dir: str | Path, progress: bool = False) -> list[LengthRun]:
    """Finetune each of ``efficiency.long_models`` at each of ``efficiency.long_lengths`` and score held_out.

    Same task, seed, steps and batch size at every length, so only the context a model may read changes.
    Out-of-memory errors are recorded as status "oom"; a reference kernel path on CUDA is refused as in the
    sweeps unless ``efficiency.allow_reference_on_cuda``.
    """
    from repro.training.trainer import Trainer

    eff = prep.params.efficiency
    sizes = matched_kwargs(prep, eff.long_models)
    runs = []
    for length in sorted(eff.long_lengths):
        prep_l = at_length(prep, length, sizes)
        trainer = Trainer(prep_l, Path(work_dir) / f"len{length}", progress=progress)
        device = trainer.device
        for name in eff.long_models:
            run = LengthRun(name, length, OK, "-", 0, 0.0, float("nan"), None)
            model = None
            try:
                model = trainer.build(name, eff.long_seed).to(device)
                run.n_params, path = model.n_params(), probe_kernel_path(model, device)
                ref = device.type == "cuda" and is_reference(path)
                run.kernel_path = f"{path} {REFERENCE_LABEL}" if ref else (path or "-")
                if ref and not eff.allow_reference_on_cuda:
                    run.status = SKIP_REFERENCE
                    runs.append(run)
                    continue
                model = None
                free_memory(device)
                t0 = time.perf_counter()
                model, run.predictions = _train_and_score(
                    trainer, prep_l, name, eff.long_task, eff.long_seed, device
                )
                run.seconds = time.perf_counter() - t0
                run.kernel_path = f"{model.kernel_path} {REFERENCE_LABEL}" if ref else model.kernel_path
                if device.type == "cuda":
                    run.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
            except Exception as exc:  # noqa: BLE001 - an out-of-memory run is a result; others are reported
                if not is_oom(exc):
                    raise
                run.status, run.predictions = OOM, None
            finally:
                model = None
                free_memory(device)
            runs.append(run)
    return runs


def _long_frame(runs: Sequence[LengthRun], task: str) -> pd.DataFrame:
    frames = [
        r.predictions.assign(model=r.key, task=task, seed=0)
        for r in runs
        if r.status == OK and r.predictions is not None
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def long_history_auroc(
    runs: Sequence[LengthRun], history: pd.Series, threshold: int, n_boot: int, ci: float, task: str
) -> pd.DataFrame:
    """Held-out AUROC with patient-clustered bootstrap CIs per run, on the long-history subgroup and on all.

    Every run is scored on the same resampled patients (``repro.evaluation.bootstrap.paired_bootstrap``), so the CIs are
    directly comparable across models and lengths. Runs that did not finish keep their status.
    """
    from repro.evaluation.bootstrap import paired_bootstrap

    preds = _long_frame(runs, task)
    est: dict[tuple[str, str], dict] = {}
    if not preds.empty:
        preds["row_id"] = preds["subject_id"].astype(str) + "|" + preds["target"].astype(str)
        long_ids = set(history.index[history > threshold])
        for group, part in (("long", preds[preds["subject_id"].isin(long_ids)]), ("all", preds)):
            if part.empty:
                continue
            keys = list(dict.fromkeys(part["model"]))
            res = paired_bootstrap(part, keys, "auroc", n_boot=n_boot, seed=0, ci=ci, pairs=[])
            for r in res.itertuples(index=False):
                est[(r.model, group)] = {"estimate": r.estimate, "lo": r.lo, "hi": r.hi}
    out = []
    for r in runs:
        rec = {
            "model": r.model,
            "length": r.length,
            "key": r.key,
            "status": r.status,
            "kernel_path": r.kernel_path,
            "parameters": r.n_params,
            "seconds": r.seconds,
            "peak GiB": r.peak_mem_gib,
        }
        for group in ("long", "all"):
            e = est.get((r.key, group), {"estimate": np.nan, "lo": np.nan, "hi": np.nan})
            rec |= {f"auroc_{group}": e["estimate"], f"lo_{group}": e["lo"], f"hi_{group}": e["hi"]}
        out.append(rec)
    df = pd.DataFrame(out)
    long_ids = history.index[history > threshold]
    df.attrs["subgroup"] = {"threshold": int(threshold), "n_subjects": int(len(long_ids))}
    if not preds.empty:
        first = preds[preds["model"] == preds["model"].iloc[0]]
        sub = first[first["subject_id"].isin(set(long_ids))]
        df.attrs["subgroup"] |= {"n_rows": int(len(sub)), "n_positive": int(sub["label"].sum())}
    return df


def h4_accuracy_comparisons(
    runs: Sequence[LengthRun],
    history: pd.Series,
    threshold: int,
    n_boot: int,
    ci: float,
    task: str,
    new: str = "ehrmamba",
    baselines: Sequence[str] = ATTENTION_MODELS,
    **kw: float,
) -> pd.DataFrame:
    """EHRMamba at the longest length it trained at minus each Transformer at the longest length it trained
    at, held-out AUROC on the long-history subgroup; paired bootstrap, BH across these comparisons, and the
    computed verdict (``repro.evaluation.results.paired_comparisons``)."""
    from repro.evaluation.results import paired_comparisons

    def longest(model: str) -> LengthRun | None:
        done = [r for r in runs if r.model == model and r.status == OK]
        return max(done, key=lambda r: r.length) if done else None

    mine = longest(new)
    pairs = [(mine.key, b.key) for b in map(longest, baselines) if b is not None] if mine else []
    preds = _long_frame(runs, task)
    if not pairs or preds.empty:
        return pd.DataFrame()
    sub = preds[preds["subject_id"].isin(set(history.index[history > threshold]))].assign(
        split=meds.held_out_split
    )
    if sub.empty:
        return pd.DataFrame()
    return paired_comparisons(sub, pairs, n_boot, ci, **kw)


def setup_table(eff, subgroup: dict, n_held_out: int) -> pd.DataFrame:
    """How H4's accuracy runs were trained and what they are scored on, from the params and the subgroup:
    a reader judges an inconclusive on 12 positives after 12 finetuning steps differently from one on
    hundreds after a full budget. ``eff``: the run's ``EfficiencyParams``."""
    pre = eff.long_pretrain_steps
    rows = [
        ("task", eff.long_task),
        (
            "subgroup",
            f"held-out subjects whose history before the prediction time exceeds {subgroup['threshold']} tokens",
        ),
        ("subjects in the subgroup", f"{subgroup['n_subjects']} of {n_held_out}"),
        ("positives in the subgroup", str(subgroup.get("n_positive", "—"))),
        ("lengths each model may read", ", ".join(str(n) for n in eff.long_lengths)),
        ("pretraining", f"{pre} steps" if pre else "none (finetuned from random weights)"),
        (
            "finetuning",
            f"{eff.long_finetune_steps} steps at batch {eff.long_batch_size}, fixed (no early stop)",
        ),
        ("seeds", f"one (seed {eff.long_seed}): every comparison reads 'one seed' at best"),
    ]
    return pd.DataFrame(rows, columns=["setting", "value"])


def headline(comparisons: pd.DataFrame, table: pd.DataFrame) -> str:
    """H4's accuracy headline: the comparison against the Transformer run with the best subgroup AUROC."""
    if comparisons.empty:
        return "inconclusive (comparison not run)"
    auroc = table.set_index("key")["auroc_long"]
    best = max(comparisons["baseline"], key=lambda k: auroc.get(k, -np.inf))
    return str(comparisons.loc[comparisons["baseline"] == best, "verdict"].iloc[0])
