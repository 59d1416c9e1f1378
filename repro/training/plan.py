"""The cost of a run before any training: every training run of the grid, its steps and tokens, and, from the
tokens/s of a run already made on the same kind of node, the GPU-hours it would take.

Tokens come from the tokenized data (each run's samples at the length its model reads); the steps are the
budget in epochs (or fixed steps) the params give, so the tokens are an upper bound: early stopping ends a
run sooner. Throughput is read from an earlier run's training table (``results/01_accuracy.json``), the
median tokens/s per model and phase; models it did not train have no projection.

Those tokens/s are each process's own, measured while ``train.workers`` processes shared the GPU, so a
GPU-hour holds that many processes' tokens: hours are tokens / (tokens/s x processes sharing). Counted
as if each process had the GPU alone, quick's own training (one H100, 2026-12-06) came to 2,171
process-seconds, 4.4 times the 493 s its notebooks 00 + 01 took in all.
"""

from __future__ import annotations

import json
from pathlib import Path

import meds
import numpy as np
import pandas as pd

from repro.training.prepare import Prepared


def grid(prep: Prepared) -> pd.DataFrame:
    """One row per training run of notebooks 01 and 03: model, phase, task, seeds, samples, steps, batch,
    mean tokens per sample and the tokens the budget feeds (steps x batch x mean tokens, for every seed)."""
    from repro.models.registry import pretrains
    from repro.training.prepare import mpf_dataset
    from repro.training.trainer import Trainer, mpf_steps

    params = prep.params
    # it only encodes samples and counts parameters: a CPU node plans a GPU run
    trainer = Trainer(prep, "outputs/.plan-unused", progress=False, device="cpu")
    rows = []

    def add(model: str, phase: str, task: str, n: int, mean_len: float, steps: int, batch: int) -> None:
        seeds = len(params.seeds)
        rows.append(
            {
                "model": model,
                "phase": phase,
                "task": task,
                "seeds": seeds,
                "samples": n,
                "steps": steps,
                "batch": batch,
                "tokens per sample": round(mean_len, 1),
                "tokens (budget, all seeds)": int(steps * min(batch, n) * mean_len * seeds),
            }
        )

    neural = [m for m in params.models if m != "count_lr"]
    # notebook 03 pretrains (and finetunes per task) every MPF backbone, listed in models or not
    backbones = list(
        dict.fromkeys(["bigbird" if m == "multibird" else m for m in neural] + params.mpf_models)
    )
    for name in backbones:
        items = trainer._pretrain_items(meds.train_split, trainer.input_len(name))
        tp = params.train.for_model(name)
        if pretrains(name) and items:
            lengths = np.array([len(e) for e in items])
            add(
                name,
                "pretrain",
                "-",
                len(items),
                lengths.mean(),
                tp.steps("pretrain", len(items)),
                tp.batch_size,
            )
    for name in (m for m in neural if m != "multibird"):
        ft = params.train.for_model(name).finetuning()
        for task in params.tasks:
            items, _ = trainer.samples(task, meds.train_split, max_len=trainer.input_len(name))
            lengths = np.array([len(e) for e in items])
            add(
                name,
                "finetune",
                task,
                len(items),
                lengths.mean(),
                ft.steps("finetune", len(items)),
                ft.batch_size,
            )
    mpf = [*params.mpf_models, *(["bigbird"] if "multibird" in params.models else [])]
    for name in dict.fromkeys(mpf):
        n = trainer.input_len(name)  # the task prompt replaces a token: lengths as without it
        data, _ = mpf_dataset({t: trainer.samples(t, meds.train_split, None, n) for t in params.tasks})
        ft = params.train.for_model(*([name, "multibird"] if name == "bigbird" else [name])).finetuning()
        add(
            "multibird" if name == "bigbird" else name,
            "finetune (MPF)",
            "all tasks",
            len(data),
            float(data.lengths().mean()),
            mpf_steps(ft, len(data), len(params.tasks)),
            ft.batch_size,
        )
    return pd.DataFrame(rows)


def _training_rows(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "results" / "01_accuracy.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training table there (run notebook 01 first)")
    return json.loads(path.read_text()).get("training", [])


def _phase(row: dict) -> str:
    return "pretrain" if str(row.get("phase", "")).startswith("pretrain") else "finetune"


def _number(cell: object) -> float | None:
    """A training-table cell as a non-negative number ("12,345" reads 12345.0), None for "-" or text.

    >>> _number("12,345"), _number("5.5"), _number("-"), _number("1.2.3")
    (12345.0, 5.5, None, None)
    """
    text = str(cell).replace(",", "").strip()
    return float(text) if text.replace(".", "", 1).isdigit() else None


def measured_throughput(run_dir: str | Path) -> dict[tuple[str, str], float]:
    """Median tokens/s per (model, phase: pretrain / finetune) in an earlier run's training table."""
    seen: dict[tuple[str, str], list[float]] = {}
    for r in _training_rows(run_dir):
        tps = _number(r.get("tokens/s", "-"))
        if tps:
            seen.setdefault((str(r["model"]), _phase(r)), []).append(tps)
    return {k: float(np.median(v)) for k, v in seen.items()}


Stop = tuple[float, float | None]  # (share of its budget's steps a run took, epochs it ran where known)


def measured_stops(run_dir: str | Path) -> dict[tuple[str, str], list[Stop]]:
    """Where each run of an earlier run's training table stopped, per (model, phase): the share of its
    budget's steps ("2250 / 4000" reads 0.5625) and the epochs it ran, so that a plan with another budget
    expects an early-stopped run to stop after as many epochs, not after the same share."""
    seen: dict[tuple[str, str], list[Stop]] = {}
    for r in _training_rows(run_dir):
        ran_text, _, budget_text = str(r.get("steps", "")).partition(" / ")
        ran, budget = _number(ran_text), _number(budget_text)
        if ran is not None and budget:
            seen.setdefault((str(r["model"]), _phase(r)), []).append(
                (ran / budget, _number(r.get("epochs", "")))
            )
    return seen


def expected_share(stops: list[Stop], budget_epochs: float) -> float:
    """Median over measured runs of the share of a budget of `budget_epochs` they would use: a run that
    stopped early stops after the same epochs (all of the budget if that is shorter); one that used its
    whole budget is expected to use all of this one too (it said nothing about later epochs).

    >>> expected_share([(0.25, 4.0), (1.0, 16.0), (0.5, 8.0)], 32.0)
    0.25
    >>> expected_share([(0.25, 4.0)], 2.0), expected_share([(0.5, None)], 32.0)
    (1.0, 0.5)
    """
    shares = [
        1.0 if frac >= 1 else (frac if epochs is None else min(epochs / budget_epochs, 1.0))
        for frac, epochs in stops
    ]
    return float(np.median(shares))


def measured_sharing(run_dir: str | Path) -> int:
    """Training processes that shared each GPU in an earlier run: its manifest's ``train.workers`` over the
    GPUs it saw, rounded up (1 where it has no manifest, or on a CPU, where each process had cores of its
    own)."""
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        return 1
    manifest = json.loads(path.read_text())
    env = manifest.get("environment", {})
    if env.get("device") != "cuda":
        return 1
    workers = max(1, int(manifest.get("params", {}).get("train", {}).get("workers", 1)))
    gpus = max(1, int(env.get("gpus", 1)))  # manifests before 2026-12-06 did not count them: one
    return -(-workers // gpus)


def project(
    plan: pd.DataFrame,
    throughput: dict[tuple[str, str], float],
    labels: dict[str, str],
    sharing: int = 1,
    stops: dict[tuple[str, str], list[Stop]] | None = None,
) -> pd.DataFrame:
    """The plan with GPU-hours per run from measured tokens/s (keyed by the training table's model label),
    each process's rate measured with ``sharing`` processes on its GPU; with ``stops`` (where the measured
    run's runs stopped, per model and phase: `measured_stops`) also the hours expected if runs stop as
    early as they did there (`expected_share` of each budget; all of it where nothing was measured)."""
    out = plan.copy()
    keys = [
        (labels.get(m, m), "pretrain" if p == "pretrain" else "finetune")
        for m, p in zip(out["model"], out["phase"], strict=True)
    ]
    tps = [throughput.get(k, np.nan) for k in keys]
    out["tokens/s (measured)"] = tps
    out["processes sharing (measured)"] = sharing
    out["GPU-hours (budget)"] = (
        out["tokens (budget, all seeds)"] / (np.array(tps, dtype=float) * sharing) / 3600
    )
    if stops is not None:
        epochs = out["steps"] * np.minimum(out["batch"], out["samples"]) / out["samples"]
        out["share of budget (expected)"] = [
            round(expected_share(stops[k], e), 3) if stops.get(k) else 1.0
            for k, e in zip(keys, epochs, strict=True)
        ]
        out["GPU-hours (expected)"] = out["GPU-hours (budget)"] * out["share of budget (expected)"]
    return out


def summary(plan: pd.DataFrame, gpus: int) -> list[str]:
    """Lines: runs and tokens in all, GPU-hours where projected, and the wall time on 1 and on ``gpus`` GPUs
    (an ideal split of the runs: a lower bound)."""
    lines = [
        f"plan: {len(plan)} training runs x their seeds, {plan['tokens (budget, all seeds)'].sum():,} tokens in the budgets"
    ]
    if "GPU-hours (budget)" in plan:
        known = plan["GPU-hours (budget)"].dropna()
        missing = sorted(set(plan.loc[plan["GPU-hours (budget)"].isna(), "model"]))
        hours = float(known.sum())
        lines.append(
            f"plan: {hours:.2f} GPU-hours projected ({len(known)} of {len(plan)} runs"
            + (f"; no measured tokens/s for {', '.join(missing)}" if missing else "")
            + f"): {hours:.2f} h on 1 GPU, at least {hours / max(gpus, 1):.2f} h on {gpus}"
        )
    if "GPU-hours (expected)" in plan:
        expected = float(plan["GPU-hours (expected)"].sum())
        lines.append(
            f"plan: {expected:.2f} GPU-hours expected if runs stop as early as in the measured run "
            f"({expected / max(gpus, 1):.2f} h on {gpus} GPU{'s' if gpus > 1 else ''} at best)"
        )
    return lines
