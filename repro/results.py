"""Turn model runs into the report's accuracy tables, comparisons and verdicts.

Seeds: each subject's probability is averaged over training seeds (a seed ensemble) before metrics and
paired tests, so one bootstrap describes the test-set uncertainty; the spread between seeds is shown
beside it (mean, sd, min-max of the per-seed AUROC).
"""

from __future__ import annotations

from collections.abc import Sequence

import meds
import numpy as np
import pandas as pd

from repro.evaluate import binary_metrics, evaluate_predictions, metrics_table, oracle_metrics
from repro.experiment import ModelRun
from repro.stats import VERDICT_RULE, aggregate_seeds, benjamini_hochberg, paired_bootstrap, verdict

MODEL_LABELS = {"ehrmamba": "EHRMamba", "cehr_bert": "CEHR-BERT", "count_lr": "Counts + LR"}
ORACLE = "Oracle (true probability)"


def predictions_frame(runs: Sequence[ModelRun]) -> pd.DataFrame:
    """Long frame of every run's predictions: model, task, seed, subject_id, split, label, score (+ true_prob)."""
    return pd.concat(
        [r.predictions.assign(model=r.model, task=r.task, seed=r.seed) for r in runs], ignore_index=True
    )


def seed_ensemble(preds: pd.DataFrame) -> pd.DataFrame:
    """Average each subject's score over seeds, per model, task and split."""
    keys = ["model", "task", "split", "subject_id", "label"] + (["true_prob"] if "true_prob" in preds else [])
    return preds.groupby(keys, sort=False, dropna=False)["score"].mean().reset_index()


def seed_spread(preds: pd.DataFrame) -> pd.DataFrame:
    """Per-seed held-out AUROC aggregated over seeds (mean, sd, min, max)."""
    rows = []
    test = preds[preds["split"] == meds.held_out_split]
    for (model, task, seed), g in test.groupby(["model", "task", "seed"], sort=False):
        rows.append(
            {
                "model": model,
                "task": task,
                "seed": seed,
                "estimate": binary_metrics(g["label"].to_numpy(), g["score"].to_numpy())["auroc"],
            }
        )
    return aggregate_seeds(pd.DataFrame(rows), ["model", "task"])


def evaluate_all(preds: pd.DataFrame, n_boot: int, ci: float) -> dict[str, dict[str, dict]]:
    """Metrics with CIs for every task and model (seed ensemble), plus the oracle where the truth is known.

    Returns {task: {model label: evaluate_predictions(...) or oracle_metrics(...)}}; computed once and
    shared by the tables and the forest plot.
    """
    out: dict[str, dict[str, dict]] = {}
    ens = seed_ensemble(preds)
    for task in dict.fromkeys(ens["task"]):
        t = ens[ens["task"] == task]
        res = {}
        for model in dict.fromkeys(t["model"]):
            g = t[t["model"] == model]
            res[MODEL_LABELS.get(model, model)] = evaluate_predictions(
                g[g["split"] == meds.tuning_split],
                g[g["split"] == meds.held_out_split],
                n_boot=n_boot,
                seed=0,
                ci=ci,
            )
        test = t[t["split"] == meds.held_out_split].drop_duplicates("subject_id")
        if "true_prob" in test and test["true_prob"].notna().all() and len(test):
            res[ORACLE] = oracle_metrics(test, n_boot=n_boot, seed=0, ci=ci)
        out[task] = res
    return out


def task_table(
    evaluated: dict[str, dict[str, dict]], preds: pd.DataFrame, runs: Sequence[ModelRun], task: str
) -> pd.DataFrame:
    """One task: AUROC / AUPRC / F1 with CIs per model, parameter count, seed spread, and the oracle row."""
    spread = seed_spread(preds[preds["task"] == task]).set_index("model")
    info = {}
    for r in runs:
        if r.task != task or MODEL_LABELS.get(r.model, r.model) in info:
            continue
        s = spread.loc[r.model]
        sd = 0.0 if np.isnan(s["sd"]) else s["sd"]
        info[MODEL_LABELS.get(r.model, r.model)] = {
            "parameters": f"{r.n_params:,}",
            "seeds: AUROC mean ± sd [min, max]": f"{s['mean']:.3f} ± {sd:.3f} [{s['min']:.3f}, {s['max']:.3f}]",
        }
    if ORACLE in evaluated[task]:
        info[ORACLE] = {"parameters": "-", "seeds: AUROC mean ± sd [min, max]": "-"}
    table = metrics_table(evaluated[task])
    text_cols = [c for c in table.columns if c.startswith(("AUROC", "AUPRC", "F1"))]
    return table[text_cols].join(pd.DataFrame(info).T).rename_axis("model").reset_index()


def forest_frame(evaluated: dict[str, dict[str, dict]]) -> pd.DataFrame:
    """AUROC with CI per model and task, with the oracle AUROC when known, for the forest plot."""
    rows = []
    for task, res in evaluated.items():
        oracle = res[ORACLE]["auroc"]["estimate"] if ORACLE in res else np.nan
        for model, m in res.items():
            if model != ORACLE:
                a = m["auroc"]
                rows.append(
                    {
                        "task": task,
                        "model": model,
                        "estimate": a["estimate"],
                        "lo": a["lo"],
                        "hi": a["hi"],
                        "oracle": oracle,
                    }
                )
    return pd.DataFrame(rows)


def h1_comparisons(
    preds: pd.DataFrame, new: str, baselines: Sequence[str], n_boot: int, ci: float, alpha: float = 0.05
) -> pd.DataFrame:
    """EHRMamba minus each baseline, AUROC on held_out, per task; BH across this notebook's comparisons; verdicts."""
    ens = seed_ensemble(preds[preds["split"] == meds.held_out_split])
    rows = []
    for task in dict.fromkeys(ens["task"]):
        t = ens[ens["task"] == task]
        present = [m for m in [new, *baselines] if m in set(t["model"])]
        if new not in present or len(present) < 2:
            continue
        res = paired_bootstrap(
            t, present, "auroc", n_boot=n_boot, seed=0, ci=ci, pairs=[(new, b) for b in present if b != new]
        )
        for _, r in res[res["kind"] == "difference"].iterrows():
            rows.append(
                {
                    "task": task,
                    "comparison": f"{MODEL_LABELS.get(new, new)} − {MODEL_LABELS.get(r['versus'], r['versus'])}",
                    "ΔAUROC": r["estimate"],
                    "lo": r["lo"],
                    "hi": r["hi"],
                    "p": r["p_value"],
                }
            )
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["p (BH)"] = benjamini_hochberg(out["p"].to_numpy())
    out["verdict"] = [
        verdict(lo, hi, p, alpha=alpha) for lo, hi, p in zip(out["lo"], out["hi"], out["p (BH)"])
    ]
    out[f"ΔAUROC ({ci * 100:g}% CI)"] = [
        f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in zip(out["ΔAUROC"], out["lo"], out["hi"])
    ]
    return out[["task", "comparison", f"ΔAUROC ({ci * 100:g}% CI)", "p", "p (BH)", "verdict"]]


def loss_curves(runs: Sequence[ModelRun]) -> pd.DataFrame:
    """Per-step losses of pretraining (once per model and seed) and finetuning (per task)."""
    rows, seen = [], set()
    for r in runs:
        if r.pretrain is not None and (r.model, r.seed) not in seen:
            seen.add((r.model, r.seed))
            rows += [
                {
                    "model": MODEL_LABELS.get(r.model, r.model),
                    "phase": f"pretraining ({r.pretrain.objective.upper()})",
                    "step": i,
                    "loss": v,
                    "seed": r.seed,
                }
                for i, v in enumerate(r.pretrain.losses)
            ]
        if r.finetune is not None:
            rows += [
                {
                    "model": MODEL_LABELS.get(r.model, r.model),
                    "phase": f"finetuning: {r.task}",
                    "step": i,
                    "loss": v,
                    "seed": r.seed,
                }
                for i, v in enumerate(r.finetune.losses)
            ]
    return pd.DataFrame(rows)


def training_table(runs: Sequence[ModelRun]) -> pd.DataFrame:
    """How each model was trained, one row per phase: parameters, kernel path, steps, wall time, tokens/s.

    Pretraining is shared by a model's tasks, so it appears once per model and seed.
    """
    rows, seen = [], set()
    for r in runs:
        phases = []
        if r.pretrain is not None and (r.model, r.seed) not in seen:
            seen.add((r.model, r.seed))
            phases.append((f"pretrain ({r.pretrain.objective.upper()})", r.pretrain))
        phases.append((f"finetune {r.task}" if r.finetune is not None else f"fit {r.task}", r.finetune))
        for phase, res in phases:
            rows.append(
                {
                    "model": MODEL_LABELS.get(r.model, r.model),
                    "phase": phase,
                    "seed": r.seed,
                    "parameters": r.n_params,
                    "kernel path": r.kernel_path,
                    "steps": 0 if res is None else len(res.losses),
                    "seconds": round(r.seconds if res is None else res.seconds, 1),
                    "tokens/s": f"{res.tokens / res.seconds:,.0f}"
                    if res is not None and res.seconds
                    else "-",
                }
            )
    return pd.DataFrame(rows)


def h1_verdict(comparisons: pd.DataFrame, task: str = "mortality_1m", baseline: str = "CEHR-BERT") -> str:
    """The H1 headline: EHRMamba vs CEHR-BERT on mortality, from the computed comparison row."""
    row = comparisons[(comparisons["task"] == task) & comparisons["comparison"].str.endswith(baseline)]
    return "inconclusive (comparison not run)" if row.empty else str(row["verdict"].iloc[0])


__all__ = [
    "VERDICT_RULE",
    "predictions_frame",
    "task_table",
    "forest_frame",
    "h1_comparisons",
    "loss_curves",
    "training_table",
    "h1_verdict",
    "seed_spread",
]
