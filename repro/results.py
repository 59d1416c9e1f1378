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


def task_table(
    preds: pd.DataFrame, runs: Sequence[ModelRun], task: str, n_boot: int, ci: float
) -> pd.DataFrame:
    """One task: AUROC / AUPRC / F1 with CIs per model, parameter count, seed spread, and the oracle row."""
    ens = seed_ensemble(preds[preds["task"] == task])
    spread = seed_spread(preds[preds["task"] == task]).set_index("model")
    results, info = {}, {}
    for model in dict.fromkeys(ens["model"]):
        g = ens[ens["model"] == model]
        results[MODEL_LABELS.get(model, model)] = evaluate_predictions(
            g[g["split"] == meds.tuning_split],
            g[g["split"] == meds.held_out_split],
            n_boot=n_boot,
            seed=0,
            ci=ci,
        )
        r = next(r for r in runs if r.model == model and r.task == task)
        s = spread.loc[model]
        info[MODEL_LABELS.get(model, model)] = {
            "parameters": f"{r.n_params:,}",
            "seeds: AUROC mean ± sd [min, max]": (
                f"{s['mean']:.3f} ± {0 if np.isnan(s['sd']) else s['sd']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"
            ),
        }
    test = ens[(ens["split"] == meds.held_out_split)].drop_duplicates("subject_id")
    if "true_prob" in test and test["true_prob"].notna().all():
        results["Oracle (true probability)"] = oracle_metrics(test, n_boot=n_boot, seed=0, ci=ci)
        info["Oracle (true probability)"] = {"parameters": "-", "seeds: AUROC mean ± sd [min, max]": "-"}
    table = metrics_table(results)
    text_cols = [c for c in table.columns if "CI" in c and not c.startswith(("Brier", "ECE", "Prevalence"))]
    out = table[text_cols].join(pd.DataFrame(info).T)
    return out.rename_axis("model").reset_index()


def forest_frame(preds: pd.DataFrame, n_boot: int, ci: float) -> pd.DataFrame:
    """AUROC with CI per model and task (seed ensemble), with the oracle AUROC when known, for the forest plot."""
    rows = []
    ens = seed_ensemble(preds)
    for task in dict.fromkeys(ens["task"]):
        t = ens[ens["task"] == task]
        test = t[t["split"] == meds.held_out_split].drop_duplicates("subject_id")
        oracle = np.nan
        if "true_prob" in test and test["true_prob"].notna().all():
            oracle = binary_metrics(test["label"].to_numpy(), test["true_prob"].to_numpy())["auroc"]
        for model in dict.fromkeys(t["model"]):
            g = t[t["model"] == model]
            m = evaluate_predictions(
                g[g["split"] == meds.tuning_split],
                g[g["split"] == meds.held_out_split],
                n_boot=n_boot,
                seed=0,
                ci=ci,
            )["auroc"]
            rows.append(
                {
                    "task": task,
                    "model": MODEL_LABELS.get(model, model),
                    "estimate": m["estimate"],
                    "lo": m["lo"],
                    "hi": m["hi"],
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
    """How each model was trained: parameters, kernel path, steps, wall time, tokens/s."""
    rows = []
    for r in runs:
        tokens = sum(x.tokens for x in (r.pretrain, r.finetune) if x is not None)
        secs = sum(x.seconds for x in (r.pretrain, r.finetune) if x is not None)
        rows.append(
            {
                "model": MODEL_LABELS.get(r.model, r.model),
                "task": r.task,
                "seed": r.seed,
                "parameters": r.n_params,
                "kernel path": r.kernel_path,
                "pretrain steps": 0 if r.pretrain is None else len(r.pretrain.losses),
                "finetune steps": 0 if r.finetune is None else len(r.finetune.losses),
                "train seconds": round(secs, 1),
                "wall seconds": round(r.seconds, 1),
                "train tokens/s": round(tokens / secs) if secs else np.nan,
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
