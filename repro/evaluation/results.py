"""Turn model runs into the report's accuracy tables, comparisons and verdicts.

Seeds: each subject's probability is averaged over training seeds (a seed ensemble) before metrics and
paired tests, so one bootstrap describes the test-set uncertainty; the spread between seeds is shown
beside it (mean, sd, min-max of the per-seed AUROC).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import meds
import numpy as np
import pandas as pd

from repro.config import HypothesisRule
from repro.evaluation.batched_metrics import ECE_BINS, metric_values
from repro.evaluation.bootstrap import (
    bootstrap_pvalue,
    paired_auroc_resamples,
    paired_scores,
    percentile_ci,
    seed_scores,
)
from repro.evaluation.metrics import (
    binary_metrics,
    choose_threshold,
    evaluate_predictions,
    macro_evaluate,
    macro_oracle_metrics,
    metrics_table,
    oracle_metrics,
)
from repro.evaluation.significance import (
    ONE_SEED,
    UNDERPOWERED,
    UNDERTRAINED,
    VERDICT_RULE,
    aggregate_seeds,
    benjamini_hochberg,
    macro_permutation_test,
    min_detectable,
    paired_permutation_test,
    seed_calibrated_interval,
    verdict,
)
from repro.training.loop import TrainResult
from repro.training.trainer import ModelRun

__all__ = [
    "VERDICT_RULE",
    "ALL_RULE",
    "OVERALL_RULE",
    "label",
    "predictions_frame",
    "evaluate_all",
    "task_table",
    "all_tasks_table",
    "forest_frame",
    "paired_comparisons",
    "comparison_table",
    "h1_comparisons",
    "mpf_comparisons",
    "overall_verdict",
    "probes_undertrained",
    "unigram_label",
    "loss_curves",
    "training_table",
    "rule_verdict",
    "rules_table",
]

MODEL_LABELS = {
    "ehrmamba": "EHRMamba",
    "cehr_bert": "CEHR-BERT",
    "bigbird": "BigBird",
    "multibird": "MultiBird",
    "transformer": "Transformer (SDPA)",
    "mamba2": "Mamba2",
    "hybrid": "Hybrid (HyMaTE)",
    "lstm": "BiLSTM",
    "count_lr": "Counts + LR",
}
ORACLE = "Oracle (true probability)"
MPF = "+mpf"


PROBE = "+probe:"  # frozen-representation probe runs: <backbone>+probe:<pooling>
# comparisons computed at once by `paired_comparisons`: each holds n_boot x rows resamples (about 1 GB at
# 6,000 held-out patients and three seeds, four times that at MIMIC-IV's test split)
COMPARE_THREADS = 4


def label(model: str) -> str:
    """Display name; `name+mpf` is that model finetuned with multitask prompts."""
    if model.endswith(MPF):
        return f"{MODEL_LABELS.get(model.removesuffix(MPF), model)} (MPF)"
    if PROBE in model:
        base, pooling = model.split(PROBE)
        return f"{MODEL_LABELS.get(base, base)} (probe, {pooling})"
    return MODEL_LABELS.get(model, model)


def run_key(r: ModelRun) -> str:
    """The model name a run's predictions carry: `name+mpf` for MPF runs (MultiBird keeps its name)."""
    return r.model if r.mode != "MPF" or r.model == "multibird" else r.model + MPF


def predictions_frame(runs: Sequence[ModelRun]) -> pd.DataFrame:
    """Long frame of every run's predictions: model, task, seed, subject_id, split, target, label, score
    (+ true_prob). MPF runs of a backbone appear as model `name+mpf` (MultiBird keeps its own name)."""
    frames = [r.predictions.assign(model=run_key(r), task=r.task, seed=r.seed) for r in runs]
    return pd.concat(frames, ignore_index=True)


def seed_ensemble(preds: pd.DataFrame) -> pd.DataFrame:
    """Average each row's score over seeds, per model, task, split, subject and target; `row_id` pairs models."""
    keys = ["model", "task", "split", "subject_id", "target", "label"]
    keys += ["true_prob"] if "true_prob" in preds else []
    out = preds.groupby(keys, sort=False, dropna=False)["score"].mean().reset_index()
    out["row_id"] = out["subject_id"].astype(str) + "|" + out["target"].astype(str)
    return out


def multilabel(t: pd.DataFrame) -> bool:
    """A task whose rows carry several labels per patient (conditions): scored per label, then averaged."""
    return t["target"].nunique() > 1


def _auroc(g: pd.DataFrame) -> float:
    """Held-out AUROC of one model's rows; the mean over labels (macro) for a multi-label task."""
    if not multilabel(g):
        return binary_metrics(g["label"].to_numpy(), g["score"].to_numpy())["auroc"]
    return float(
        np.mean(
            [
                binary_metrics(x["label"].to_numpy(), x["score"].to_numpy())["auroc"]
                for _, x in g.groupby("target")
            ]
        )
    )


def seed_aurocs(preds: pd.DataFrame) -> pd.DataFrame:
    """Each training seed's held-out AUROC per model and task (macro over labels where a task has several).

    Why kept apart from the seed ensemble the comparisons read: `repro compare` pools these over runs, the
    only place where what varies between runs (not just between seeds of one run) shows."""
    rows = []
    test = preds[preds["split"] == meds.held_out_split]
    for (model, task, seed), g in test.groupby(["model", "task", "seed"], sort=False):
        rows.append({"model": model, "task": task, "seed": int(seed), "estimate": float(_auroc(g))})
    return pd.DataFrame(rows, columns=["model", "task", "seed", "estimate"])


def seed_spread(preds: pd.DataFrame) -> pd.DataFrame:
    """Per-seed held-out AUROC (macro over labels where a task has several) aggregated over seeds."""
    return aggregate_seeds(seed_aurocs(preds), ["model", "task"])


def _evaluate(t: pd.DataFrame, model: str | None, n_boot: int, ci: float) -> dict | None:
    """One model's metrics on one task's frame (model None: the oracle's, where the true probability is
    known)."""
    if model is None:
        first = t[t["model"] == t["model"].iloc[0]]
        test = first[first["split"] == meds.held_out_split]
        if "true_prob" in test and test["true_prob"].notna().all() and len(test):
            score = macro_oracle_metrics if multilabel(test) else oracle_metrics
            return score(test, n_boot=n_boot, seed=0, ci=ci)
        return None
    g = t[t["model"] == model]
    score = macro_evaluate if multilabel(g) else evaluate_predictions
    return score(
        g[g["split"] == meds.tuning_split], g[g["split"] == meds.held_out_split], n_boot=n_boot, seed=0, ci=ci
    )


def evaluate_all(preds: pd.DataFrame, n_boot: int, ci: float) -> dict[str, dict[str, dict]]:
    """Metrics with CIs for every task and model (seed ensemble), plus the oracle where the truth is known.

    Returns {task: {model label: evaluate_predictions(...) or oracle_metrics(...)}}; computed once and
    shared by the tables and the forest plot.
    """
    ens = seed_ensemble(preds)
    tasks = {task: ens[ens["task"] == task] for task in dict.fromkeys(ens["task"])}
    keys = [(task, model) for task, t in tasks.items() for model in t["model"].unique()]
    keys += [(task, None) for task in tasks]  # None: the oracle
    out: dict[str, dict[str, dict]] = {task: {} for task in tasks}
    # one process on purpose: a spawned process pool was slower on the H200 node (h1: 45 s against 24 s)
    # and on a 2-core CPU (44 s against 32 s); the resamples are memory-bound array sorts
    for task, model in keys:
        res = _evaluate(tasks[task], model, n_boot, ci)
        if model is not None:
            out[task][label(model)] = res
        elif res is not None:
            out[task][ORACLE] = res
    return out


def task_table(
    evaluated: dict[str, dict[str, dict]], preds: pd.DataFrame, runs: Sequence[ModelRun], task: str
) -> pd.DataFrame:
    """One task: AUROC / AUPRC / F1 with CIs per model, parameter count, seed spread, and the oracle row."""
    spread = seed_spread(preds[preds["task"] == task]).set_index("model")
    info = {}
    for r in runs:
        if r.task != task or label(run_key(r)) in info:
            continue
        s = spread.loc[run_key(r)]
        sd = 0.0 if np.isnan(s["sd"]) else s["sd"]
        info[label(run_key(r))] = {
            "parameters": f"{r.n_params:,}",
            "seeds: AUROC mean ± sd [min, max]": f"{s['mean']:.3f} ± {sd:.3f} [{s['min']:.3f}, {s['max']:.3f}]",
        }
    if ORACLE in evaluated[task]:
        info[ORACLE] = {"parameters": "-", "seeds: AUROC mean ± sd [min, max]": "-"}
    table = metrics_table(evaluated[task])
    text_cols = [c for c in table.columns if c.startswith(("AUROC", "AUPRC", "F1"))]
    return table[text_cols].join(pd.DataFrame(info).T).rename_axis("model").reset_index()


def all_tasks_table(evaluated: dict[str, dict[str, dict]], tasks: Sequence[str]) -> pd.DataFrame:
    """AUROC / AUPRC / F1 with CIs for several tasks in one long table (task, model)."""
    frames = []
    for task in tasks:
        if task not in evaluated:
            continue
        t = metrics_table(evaluated[task])
        cols = [c for c in t.columns if c.startswith(("AUROC", "AUPRC", "F1"))]
        frames.append(t[cols].rename_axis("model").reset_index().assign(task=task))
    if not frames:
        return pd.DataFrame()
    out = pd.concat(frames, ignore_index=True)
    return out[["task", "model", *[c for c in out.columns if c not in ("task", "model")]]]


def null_check_table(
    evaluated: dict[str, dict[str, dict]], preds: pd.DataFrame, task: str = "null_task"
) -> pd.DataFrame:
    """Each model's held-out AUROC on the null task against its true value, 0.5: the seed ensemble's with its
    patient-bootstrap CI, each seed's, and whether the CI holds 0.5. Labels independent of every event
    leave a model outside 0.5 only by chance (about 1 model in 20 at a 95 % CI); more, or one far outside,
    points at the data or the evaluation, not at the architecture."""
    res = {m: r for m, r in evaluated.get(task, {}).items() if m != ORACLE}
    if not res:
        return pd.DataFrame()
    t = metrics_table(res)
    col = next(c for c in t.columns if c.startswith("AUROC ("))
    test = preds[(preds["task"] == task) & (preds["split"] == meds.held_out_split)]
    seeds = {
        label(m): ", ".join(f"{_auroc(g):.3f}" for _, g in by.groupby("seed", sort=True))
        for m, by in test.groupby("model", sort=False)
    }
    out = t[[col]].rename_axis("model").reset_index()
    out["each seed"] = out["model"].map(seeds).fillna("-")
    lo, hi = t["auroc_lo"].to_numpy(), t["auroc_hi"].to_numpy()
    inside = np.where((lo <= 0.5) & (0.5 <= hi), "yes", "no")
    out["0.5 inside the CI"] = np.where(np.isnan(lo) | np.isnan(hi), "-", inside)  # no CI: no claim
    return out.assign(auroc=t["auroc"].to_numpy(), auroc_lo=lo, auroc_hi=hi)


def label_metrics(preds: pd.DataFrame, task: str, target: str, model: str) -> dict | None:
    """AUROC / AUPRC / F1 estimates of one label of a multi-label task on held_out (seed-ensembled scores,
    F1 at the label's F1-best tuning threshold), as the task's macro average scores each label; None when
    the model or label is absent. Shaped as `evaluate_predictions` ({metric: {"estimate": value}})."""
    ens = seed_ensemble(
        preds[(preds["task"] == task) & (preds["model"] == model) & (preds["target"] == target)]
    )
    held = ens[ens["split"] == meds.held_out_split]
    tune = ens[ens["split"] == meds.tuning_split]
    if held.empty or tune.empty or held["label"].nunique() < 2:
        return None
    threshold = choose_threshold(tune["label"], tune["score"])
    m = binary_metrics(held["label"].to_numpy(), held["score"].to_numpy(), threshold)
    return {k: {"estimate": m[k]} for k in ("auroc", "auprc", "f1")}


def paper_table(
    evaluated: dict[str, dict[str, dict]], synthetic: bool, preds: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Our held-out AUROC / AUPRC / F1 in the layout of the EHRMamba paper's Table 1, beside every cell of
    it as printed (repro/resources/paper_table1.yaml: mean (SD over three seeds), "*" significant).

    Each paper row takes the first of its candidate tasks (paper_table1.yaml `rows`) this run has: the
    paper's own definition, else ours, else a label of `conditions` scored from `preds`. A model or task
    this run did not train shows "—" on our side, never a number.
    """
    from importlib.resources import files

    import yaml

    paper = yaml.safe_load(files("repro.resources").joinpath("paper_table1.yaml").read_text())
    values = paper["values"]

    def ours_of(candidate: str) -> Callable[[str], dict | None] | None:
        """Our metrics of one candidate row for a model, or None when this run lacks the task / label."""
        if candidate.startswith("conditions: "):
            group = candidate.removeprefix("conditions: ")
            if preds is None or not ((preds["task"] == "conditions") & (preds["target"] == group)).any():
                return None
            return lambda m: label_metrics(preds, "conditions", group, m)
        if candidate not in evaluated:
            return None
        return lambda m: evaluated[candidate].get(label(m))

    ours_by_row = []
    for paper_task, candidates in paper["rows"].items():
        found = [(c, f) for c in candidates if (f := ours_of(c)) is not None]
        task, of = found[0] if found else (candidates[0], lambda m: None)
        ours_by_row.append((task, paper_task, of))
    rows = []
    for task, paper_task, of in ours_by_row:
        for model, paper_model in paper["models"].items():
            ours = of(model)
            row = {
                "task": f"{task} (paper: {paper_task.replace('_', ' ')})",
                "model": f"{label(model)} (paper: {paper_model})",
            }
            for k, name in (("auroc", "AUROC"), ("auprc", "AUPRC"), ("f1", "F1")):
                value = None if ours is None else ours[k]["estimate"]
                row[f"{name} ours"] = "—" if value is None or not np.isfinite(value) else f"{value:.3f}"
                row[f"{name} paper"] = values[paper_task][paper_model][k]
            rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):
        out["data"] = f"ours: {'synthetic' if synthetic else 'MIMIC-IV'}; paper: MIMIC-IV"
    return out


def calibration_table(evaluated: dict[str, dict[str, dict]], tasks: Sequence[str]) -> pd.DataFrame:
    """Brier score and ECE (equal-width bins, stats.ECE_BINS) with CIs per task and model, and the oracle's:
    the true risk's Brier is the floor, its ECE what sampling noise alone gives."""
    frames = []
    for task in tasks:
        if task not in evaluated:
            continue
        t = metrics_table(evaluated[task])
        cols = [c for c in t.columns if c.startswith(("Brier", "ECE"))]
        frame = t[cols].rename_axis("model").reset_index().assign(task=task)
        # the oracle's row carries no prevalence: every row of a task scores the same held-out samples
        p = next((r["prevalence"]["estimate"] for r in evaluated[task].values() if "prevalence" in r), None)
        frame["Brier skill"] = [brier_skill(evaluated[task][m], p) for m in t.index]
        frames.append(frame)
    if not frames:
        return pd.DataFrame()
    out = pd.concat(frames, ignore_index=True)
    return out[["task", "model", *[c for c in out.columns if c not in ("task", "model")]]]


def brier_skill(res: dict, prevalence: float | None = None) -> str:
    """1 - Brier / (p (1 - p)), p the held-out prevalence: 0 for a model that predicts the prevalence for
    everyone (whose Brier score alone can look good at a low prevalence), 1 for a perfect one; ``prevalence``
    where ``res`` carries none (the oracle's). "-" for a multi-label task, whose macro Brier has no single
    prevalence to set it against.

    >>> brier_skill({"brier": {"estimate": 0.078}, "prevalence": {"estimate": 0.085}})  # the smoke run's
    '-0.003'
    >>> brier_skill({"brier": {"estimate": 0.048}}, prevalence=0.085)  # its oracle
    '0.383'
    """
    p = res["prevalence"]["estimate"] if "prevalence" in res else prevalence
    if "n_labels" in res or "brier" not in res or p is None or not 0 < p < 1:
        return "-"
    skill = 1 - res["brier"]["estimate"] / (p * (1 - p))
    return f"{skill:.3f}" if round(skill, 3) else "0.000"  # not "-0.000"


def reliability_frame(preds: pd.DataFrame, task: str, bins: int = ECE_BINS) -> pd.DataFrame:
    """Held-out reliability curve per model (seed-ensembled scores): mean predicted probability against the
    observed rate in each of ``bins`` equal-width bins (the ECE's bins), with the bin's row count."""
    from sklearn.calibration import calibration_curve

    ens = seed_ensemble(preds[(preds["task"] == task) & (preds["split"] == meds.held_out_split)])
    edges = np.linspace(0, 1, bins + 1)
    rows = []
    for model, g in ens.groupby("model", sort=False):
        s = g["score"].to_numpy()
        if not ((s >= 0) & (s <= 1)).all() or g["label"].nunique() < 2:
            continue
        observed, predicted = calibration_curve(g["label"], s, n_bins=bins, strategy="uniform")
        counts = np.bincount(np.clip(np.searchsorted(edges[1:-1], s), 0, bins - 1), minlength=bins)
        counts = counts[counts > 0]
        rows.append(
            pd.DataFrame({"model": label(model), "predicted": predicted, "observed": observed, "n": counts})
        )
    return (
        pd.concat(rows, ignore_index=True)
        if rows
        else pd.DataFrame(columns=["model", "predicted", "observed", "n"])
    )


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


def leave_one_seed_out_auroc(labels: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """AUROC (the macro over labels) of the seed ensemble left without each seed in turn; one value, the
    ensemble's own, for a single seed. `labels`: one (y, scores [seeds, n]) per label."""
    k = labels[0][1].shape[0]
    if k == 1:
        return np.array([np.mean([metric_values(y, s[0], "auroc")[0] for y, s in labels])])
    return np.array(
        [
            np.mean([metric_values(y, (s.sum(0) - s[i]) / (k - 1), "auroc")[0] for y, s in labels])
            for i in range(k)
        ]
    )


def _compare(
    task: str, t: pd.DataFrame, raw: pd.DataFrame, new: str, base: str, n_boot: int, ci: float, n_perm: int
) -> dict:
    """new - baseline on one task (the macro AUROC over labels for a multi-label task): the difference of
    the seed ensembles with a two-level bootstrap CI (seeds, then patients) from the per-seed predictions
    `raw`, and a paired permutation p-value on the seed-averaged scores `t`."""
    labels = []
    for target, g in raw.groupby("target", sort=True):
        y, subjects, a = seed_scores(g, new)
        y_b, subjects_b, b = seed_scores(g, base)
        if not (np.array_equal(subjects, subjects_b) and np.array_equal(y, y_b)):
            raise ValueError(f"{task} {target}: {new} and {base} are not scored on the same samples")
        labels.append((y, subjects, a, b))
    # d_patients: the seed ensembles as trained on the same patient resamples (the patient part alone)
    est, d, d_patients = paired_auroc_resamples(labels, n_boot, seed=0)
    ci_d = percentile_ci(d, ci)
    jack = [leave_one_seed_out_auroc([(lab[0], lab[m]) for lab in labels]) for m in (2, 3)]
    wide = seed_calibrated_interval(est, d_patients, ci_d["lo"], ci_d["hi"], jack[0], jack[1], ci)
    lo, hi, p_boot = wide["lo"], wide["hi"], bootstrap_pvalue(d)
    if multilabel(t):
        perm = []
        for _, g in t.sort_values(["target", "subject_id"], kind="stable").groupby("target", sort=True):
            y, subjects, scores = paired_scores(g, [new, base])
            perm.append((y, subjects, scores[new], scores[base]))
        p_perm = macro_permutation_test([(y, a, b) for y, _, a, b in perm], perm[0][1], n_perm, 0)
    else:
        y, subjects, scores = paired_scores(t, [new, base])
        p_perm = paired_permutation_test(y, scores[new], scores[base], "auroc", n_perm, 0, subjects)
    return {
        "task": task,
        "new": new,
        "baseline": base,
        "comparison": f"{label(new)} − {label(base)}",
        "ΔAUROC": est,
        "lo": lo,
        "hi": hi,
        "p (bootstrap)": p_boot,
        "p (perm.)": p_perm,
        "SE": wide["se"],
        "df": wide["df"],
    }


def condition_labels_table(preds: pd.DataFrame, task: str = "conditions") -> pd.DataFrame:
    """Held-out AUROC per label of a multi-label task (seed-ensembled scores), per model and the oracle's,
    with the label's positives: the per-label view behind the task's macro average."""
    ens = seed_ensemble(preds[(preds["task"] == task) & (preds["split"] == meds.held_out_split)])
    if ens.empty:
        return pd.DataFrame()
    out = {}
    for target, g in ens.groupby("target", sort=True):
        row = {"positives": int(g.loc[g["model"] == g["model"].iloc[0], "label"].sum())}
        for model, m in g.groupby("model", sort=False):
            row[label(model)] = binary_metrics(m["label"].to_numpy(), m["score"].to_numpy())["auroc"]
        first = g[g["model"] == g["model"].iloc[0]]
        if "true_prob" in first and first["true_prob"].notna().all():
            row[ORACLE] = binary_metrics(first["label"].to_numpy(), first["true_prob"].to_numpy())["auroc"]
        out[target] = row
    table = pd.DataFrame(out).T.rename_axis("label")
    macro = table.drop(columns="positives").mean().rename("macro average")
    return pd.concat([table, macro.to_frame().T]).reset_index(names="label")


def paired_comparisons(
    preds: pd.DataFrame,
    pairs: Sequence[tuple[str, str]],
    n_boot: int,
    ci: float,
    alpha: float = 0.05,
    n_perm: int = 2000,
    effect: float = 0.02,
) -> pd.DataFrame:
    """new − baseline in held-out AUROC per task for each (new, baseline) pair: bootstrap CI on the same
    resampled patients, a paired permutation p-value (patient-level swaps), Benjamini-Hochberg across every
    comparison in the frame (one notebook's family), the minimum detectable difference (MDE, 80 % power), and
    the verdict of VERDICT_RULE ("one seed" when either model has predictions from a single training seed,
    "underpowered" for an inconclusive one whose MDE exceeds `effect`)."""
    held_out = preds[preds["split"] == meds.held_out_split]
    ens = seed_ensemble(held_out)
    todo = []
    for task in dict.fromkeys(ens["task"]):
        t = ens[ens["task"] == task]
        raw = held_out[held_out["task"] == task]
        present = set(t["model"].unique())
        todo += [
            (task, t[t["model"].isin([new, base])], raw, new, base)
            for new, base in pairs
            if new in present and base in present
        ]

    def one(args: tuple) -> dict:
        return _compare(*args, n_boot, ci, n_perm)

    # threads, not processes: numpy's sorts and sums release the GIL, and nothing is copied. Each comparison
    # is seeded on its own, so the result does not depend on the count; at most COMPARE_THREADS hold their
    # n_boot x rows resamples at once.
    with ThreadPoolExecutor(max(1, min(COMPARE_THREADS, os.cpu_count() or 1, len(todo)))) as pool:
        rows = list(pool.map(one, todo))
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["p (BH)"] = benjamini_hochberg(out["p (perm.)"].to_numpy())
    seeds = preds.groupby("model")["seed"].nunique() if "seed" in preds else pd.Series(dtype=int)
    out["seeds"] = [int(min(seeds.get(n, 1), seeds.get(b, 1))) for n, b in zip(out["new"], out["baseline"])]
    out["MDE"] = [min_detectable(se, df, alpha) for se, df in zip(out["SE"], out["df"])]
    out["verdict"] = [
        _verdict(lo, hi, p, k, mde, alpha, effect)
        for lo, hi, p, k, mde in zip(out["lo"], out["hi"], out["p (BH)"], out["seeds"], out["MDE"])
    ]
    out[f"ΔAUROC ({ci * 100:g}% CI)"] = [
        f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in zip(out["ΔAUROC"], out["lo"], out["hi"])
    ]
    return out


def undertrained(runs: Sequence[ModelRun], pretraining_only: bool = False) -> set[tuple[str, str]]:
    """(model, task) pairs, named as in the predictions, with a training run that ended still improving:
    its pretraining or its finetuning on that task, for any seed (LABEL_RULE's "undertrained"). Runs
    without validation (fixed step budgets) and models without training (counts + LR) are not listed.
    ``pretraining_only``: what a probe on the frozen backbone rests on."""
    out = set()
    for r in runs:
        for res in (r.pretrain,) if pretraining_only else (r.pretrain, r.finetune):
            if res is not None and res.val and not res.converged():
                out.add((run_key(r), r.task))
    return out


def probes_undertrained(runs: Sequence[ModelRun], poolings: Sequence[str]) -> set[tuple[str, str]]:
    """(probe, task) pairs, named as in the probe predictions (``<backbone>+probe:<pooling>``), whose backbone's
    pretraining ended still improving: a probe reads the frozen pretrained states, so a comparison of probes
    between backbones short of their pretraining plateau gets no verdict either."""
    return {(f"{m}{PROBE}{p}", t) for m, t in undertrained(runs, pretraining_only=True) for p in poolings}


def below_probe(frame: pd.DataFrame, backbones: Sequence[str]) -> set[tuple[str, str]]:
    """(backbone, task) pairs whose finetuned held-out AUROC lies below the lower 95 % bound of a probe on
    the same backbone's frozen hidden states (``probe_frame``). Finetuning starts from those states and could
    match the probe by training its head alone: ending below it means the run stopped on a false plateau,
    which the early-stopping rule counts as converged. Seen on one H200 (2026-12-06): a transformer's
    finetuning stopped early at 0.638 with its mean-pooled probe at 0.733 [0.697, 0.763]; the same model
    trained on batches by rows reached 0.802."""
    if frame.empty:
        return set()
    key = {label(b): b for b in backbones}
    out = set()
    for (task, model), rows in frame.groupby(["task", "model"], sort=False):
        tuned = rows[rows["read by"] == "finetuned"]["estimate"]
        probes = rows[rows["read by"].str.startswith("probe")]["lo"]
        if len(tuned) and len(probes) and float(tuned.iloc[0]) < float(probes.max()) and model in key:
            out.add((key[model], task))
    return out


def mark_undertrained(
    comparisons: pd.DataFrame, runs: Sequence[ModelRun], also: set[tuple[str, str]] | None = None
) -> pd.DataFrame:
    """The comparisons with "undertrained" in place of the verdict where either model is undertrained on
    the task ("one seed" stays: it is the stronger reason): a training run still improving, or a pair of
    `also` (model, task), e.g. a finetuned model below its own probe (``below_probe``)."""
    if comparisons.empty:
        return comparisons
    short = undertrained(runs) | (also or set())
    out = comparisons.copy()
    hit = [(n, t) in short or (b, t) in short for n, b, t in zip(out["new"], out["baseline"], out["task"])]
    out["verdict"] = [
        UNDERTRAINED if h and v != ONE_SEED else v for h, v in zip(hit, out["verdict"], strict=True)
    ]
    return out


def _verdict(lo: float, hi: float, p: float, seeds: int, mde: float, alpha: float, effect: float) -> str:
    """VERDICT_RULE, then LABEL_RULE: "one seed" first, "underpowered" in place of an inconclusive."""
    if seeds < 2:
        return ONE_SEED
    v = verdict(lo, hi, p, alpha=alpha)
    return UNDERPOWERED if v == "inconclusive" and not mde <= effect else v


def comparison_table(comparisons: pd.DataFrame, ci: float) -> pd.DataFrame:
    """The columns the report shows; df is the t quantile's degrees of freedom ("inf": the seeds add nothing
    the patients do not)."""
    if comparisons.empty:
        return comparisons
    if "df" in comparisons:
        comparisons = comparisons.assign(
            df=[f"{d:.1f}" if np.isfinite(d) else "nan" if np.isnan(d) else "inf" for d in comparisons["df"]]
        )
    cols = [
        "task",
        "comparison",
        "seeds",
        f"ΔAUROC ({ci * 100:g}% CI)",
        "df",
        "MDE",
        "p (perm.)",
        "p (BH)",
        "verdict",
    ]
    return comparisons[[c for c in cols if c in comparisons]]


PRETRAIN_WORDS = {"clm": "next token (CLM)", "mlm": "masked tokens (MLM)"}
UNIGRAM = "unigram (train token frequencies)"  # the pretraining table's reference row per objective


def unigram_label(max_len: int | None) -> str:
    """The pretraining table's unigram row for histories cut at a backbone's own input length (None: the
    run's ``tokenizer.max_len``, shared by every backbone without its own)."""
    return UNIGRAM if max_len is None else f"{UNIGRAM}, {max_len} tokens"


def pretrain_loss_table(
    losses: dict[tuple[str, int], tuple[str, np.ndarray, np.ndarray] | None], n_boot: int, ci: float
) -> pd.DataFrame:
    """Held-out loss and perplexity of each pretrained backbone against its own objective, seeds averaged,
    with a patient bootstrap CI (``metrics.token_loss``). ``losses``: ``Trainer.heldout_losses`` per
    (model, seed), and ``Trainer.unigram_losses`` under (``unigram_label(input length)``, objective): what a
    backbone that learned nothing about context would score. CLM and MLM losses measure different tasks:
    the table orders rows by objective and a reader compares within one only."""
    from repro.evaluation.metrics import token_loss

    rows = []
    groups = dict.fromkeys((m, v[0]) for (m, _), v in losses.items() if v is not None)
    for model, objective in groups:
        got = [v for (m, _), v in losses.items() if m == model and v is not None and v[0] == objective]
        t = token_loss(np.stack([g[1] for g in got]), np.stack([g[2] for g in got]), n_boot, ci)
        rows.append(
            {
                "objective": PRETRAIN_WORDS.get(objective, objective),
                "model": label(model),
                "seeds": "-" if model.startswith(UNIGRAM) else len(got),
                "held-out patients": t["patients"],
                "tokens scored": f"{t['tokens']:,.0f}",
                f"loss per token ({ci * 100:g}% CI)": f"{t['loss']:.3f} [{t['lo']:.3f}, {t['hi']:.3f}]",
                "perplexity": f"{t['perplexity']:.2f} [{t['perplexity_lo']:.2f}, {t['perplexity_hi']:.2f}]",
            }
        )
    out = pd.DataFrame(rows)
    return out.sort_values("objective", kind="stable").reset_index(drop=True) if len(out) else out


def probe_frame(
    evaluated: dict[str, dict[str, dict]], backbones: Sequence[str], tasks: Sequence[str]
) -> pd.DataFrame:
    """Long frame of held-out AUROC (estimate, lo, hi) per backbone, task and how its representation was
    read: "finetuned" or "probe (<pooling>)"; from ``evaluate_all`` over finetuned and probe predictions."""
    rows = []
    for task in tasks:
        got = evaluated.get(task, {})
        for b in backbones:
            for name, how in [(label(b), "finetuned")] + [
                (label(m), f"probe ({m.split(PROBE)[1]})") for m in (f"{b}{PROBE}head", f"{b}{PROBE}mean")
            ]:
                res = got.get(name)
                if res is None:
                    continue
                a = res["auroc"]
                rows.append(
                    {
                        "task": task,
                        "model": label(b),
                        "read by": how,
                        **{k: a[k] for k in ("estimate", "lo", "hi")},
                    }
                )
    return pd.DataFrame(rows)


def probe_table(frame: pd.DataFrame, ci: float) -> pd.DataFrame:
    """One row per (task, backbone): finetuned AUROC beside each probe's, with CIs."""
    if frame.empty:
        return frame
    cell = frame.assign(
        v=[f"{e:.3f} [{lo:.3f}, {hi:.3f}]" for e, lo, hi in zip(frame["estimate"], frame["lo"], frame["hi"])]
    )
    wide = cell.pivot_table(
        index=["task", "model"], columns="read by", values="v", aggfunc="first", sort=False
    )
    wide.columns = [f"AUROC, {c} ({ci * 100:g}% CI)" for c in wide.columns]
    return wide.reset_index()


def forecast_table(
    forecasts: dict[tuple[str, int], tuple[np.ndarray, np.ndarray] | None],
    horizons: Sequence[int],
    n_boot: int,
    ci: float,
) -> pd.DataFrame:
    """Next-k-token accuracy and cosine similarity per causal backbone and horizon, seeds averaged, with
    patient-bootstrap CIs, beside the EHRMamba paper's Table 5 (``metrics.forecast_metrics``)."""
    from repro.evaluation.metrics import forecast_metrics

    rows = []
    for model in dict.fromkeys(m for m, _ in forecasts):
        got = [v for (m, _), v in forecasts.items() if m == model and v is not None]
        if not got:
            continue
        for r in forecast_metrics(np.stack([g[0] for g in got]), got[0][1], list(horizons), n_boot, ci):
            rows.append(
                {
                    "model": label(model),
                    "next tokens": r["next tokens"],
                    "patients": r["patients"],
                    "seeds": len(got),
                    f"accuracy ({ci * 100:g}% CI)": f"{r['accuracy']:.3f} [{r['accuracy_lo']:.3f}, {r['accuracy_hi']:.3f}]",
                    f"cosine ({ci * 100:g}% CI)": f"{r['cosine']:.3f} [{r['cosine_lo']:.3f}, {r['cosine_hi']:.3f}]",
                    "paper EHRMamba accuracy": r["paper accuracy"],
                    "paper EHRMamba cosine": r["paper cosine"],
                }
            )
    return pd.DataFrame(rows)


def comparison_summary(comparisons: pd.DataFrame, ci: float, headline: str) -> pd.DataFrame:
    """One row per comparison (pair of models) over its tasks: the ``headline`` task's difference and verdict,
    the range of the differences and how many tasks got each verdict. The report's body shows this; the
    full per-task table goes to the appendix, where a reader can find any single row.

    >>> c = pd.DataFrame({"comparison": ["A − B", "A − B", "A − C"], "task": ["m", "l", "m"],
    ...     "ΔAUROC": [0.02, -0.01, 0.0], "ΔAUROC (95% CI)": ["+0.020 [x]", "-0.010 [y]", "+0.000 [z]"],
    ...     "verdict": ["supported", "inconclusive", "inconclusive"]})
    >>> comparison_summary(c, 0.95, "m").iloc[0].to_dict()["verdicts over tasks"]
    '1 supported, 1 inconclusive'
    """
    if comparisons.empty:
        return comparisons
    ci_col = f"ΔAUROC ({ci * 100:g}% CI)"
    rows = []
    for name, g in comparisons.groupby("comparison", sort=False):
        head = g[g["task"] == headline]
        counts = g["verdict"].value_counts()
        rows.append(
            {
                "comparison": name,
                f"{headline}: {ci_col}": head[ci_col].iloc[0] if len(head) else "not compared",
                f"{headline}: verdict": head["verdict"].iloc[0] if len(head) else "-",
                "tasks": len(g),
                "ΔAUROC over tasks": f"{g['ΔAUROC'].min():+.3f} to {g['ΔAUROC'].max():+.3f}",
                "verdicts over tasks": ", ".join(f"{n} {v}" for v, n in counts.items()),
            }
        )
    return pd.DataFrame(rows)


def h1_comparisons(
    preds: pd.DataFrame, new: str, baselines: Sequence[str], n_boot: int, ci: float, **kw: float
) -> pd.DataFrame:
    """EHRMamba minus each baseline, AUROC on held_out, per task (BH across all of them); ``kw``: alpha, n_perm."""
    return paired_comparisons(preds, [(new, b) for b in baselines if b != new], n_boot, ci, **kw)


def mpf_comparisons(
    preds: pd.DataFrame, backbones: Sequence[str], n_boot: int, ci: float, **kw: float
) -> pd.DataFrame:
    """H3: each backbone finetuned with MPF minus the same backbone finetuned per task."""
    pairs = [
        ("multibird" if b == "bigbird" and "multibird" in set(preds["model"]) else b + MPF, b)
        for b in backbones
    ]
    return paired_comparisons(preds, pairs, n_boot, ci, **kw)


def overall_verdict(verdicts: Sequence[str], combine: str = "any") -> str:
    """A hypothesis over several comparisons.

    combine="any" (a claim about some task): supported when some comparison supports it and none contradicts
    it; not supported when some contradicts it and none supports it; otherwise inconclusive. combine="all"
    (a claim about every comparison, "EHRMamba beats every model"): supported only when every comparison is;
    not supported when any is not; otherwise inconclusive. combine="majority": supported (not supported)
    when more than half of the comparisons are supported (not supported); otherwise inconclusive.

    An undecided result keeps the comparisons' reason where every undecided comparison gives the same one
    ("one seed", "undertrained" or "underpowered") and the decided ones do not conflict: a claim that waits
    on training should not read as one that was looked at and found empty.

    >>> overall_verdict(["supported", "inconclusive"]), overall_verdict(["supported", "inconclusive"], "all")
    ('supported', 'inconclusive')
    >>> overall_verdict(["supported", "undertrained", "undertrained"], "all")
    'undertrained'
    """
    v = list(verdicts)
    if combine == "all":
        if v and all(x == "supported" for x in v):
            return "supported"
        return "not supported" if "not supported" in v else _undecided(v)
    if combine == "majority":
        for word in ("supported", "not supported"):
            if v and v.count(word) * 2 > len(v):
                return word
        return _undecided(v)
    if combine != "any":
        raise ValueError(f"combine must be 'any', 'all' or 'majority', got {combine!r}")
    if "supported" in v and "not supported" not in v:
        return "supported"
    if "not supported" in v and "supported" not in v:
        return "not supported"
    return _undecided(v)


def _undecided(verdicts: Sequence[str]) -> str:
    """Inconclusive, or the one reason every undecided comparison gives (``overall_verdict``): with mixed
    reasons (undertrained beside underpowered) no single remedy would decide the claim."""
    if "supported" in verdicts and "not supported" in verdicts:
        return "inconclusive"  # the comparisons disagree: no reason would settle it
    open_ = {v for v in verdicts if v not in ("supported", "not supported")}
    if len(open_) == 1 and (reason := next(iter(open_))) in (ONE_SEED, UNDERTRAINED, UNDERPOWERED):
        return reason
    return "inconclusive"


NOT_RUN = "inconclusive (comparison not run)"


def rule_verdict(comparisons: pd.DataFrame, rule: HypothesisRule) -> str:
    """A hypothesis's verdict by its written rule: its primary comparisons (all of the frame when it names
    none) combined as it says. A single primary comparison keeps its own label (one seed, underpowered,
    undertrained); a primary comparison missing from the frame makes the verdict "comparison not run"."""
    if comparisons.empty:
        return NOT_RUN
    rows = comparisons
    if rule.primary:
        tasks = comparisons["task"] if "task" in comparisons else [""] * len(comparisons)
        keys = list(zip(comparisons["new"], comparisons["baseline"], tasks, strict=True))
        wanted = rule.pairs()

        def hits(want: tuple[str, str, str], key: tuple[str, str, str]) -> bool:
            return want[:2] == key[:2] and (not want[2] or want[2] == key[2])

        rows = comparisons[[any(hits(w, k) for w in wanted) for k in keys]]
        if not all(any(hits(w, k) for k in keys) for w in wanted):
            return NOT_RUN
    if len(rows) == 1:
        return str(rows["verdict"].iloc[0])
    return overall_verdict(rows["verdict"], rule.combine)


def rules_table(hypotheses: dict[str, HypothesisRule]) -> pd.DataFrame:
    """The written rule of each hypothesis, as the params give it and the notebooks apply it."""
    words = {
        "all": "all must be supported",
        "any": "any supported, none contradicting",
        "majority": "a majority",
    }
    return pd.DataFrame(
        [
            {
                "hypothesis": name,
                "primary comparisons": ", ".join(
                    f"{label(n)} − {label(b)} " + (f"on {t}" if t else "(every task or batch size)")
                    for n, b, t in rule.pairs()
                )
                or "every comparison of the family",
                "BH family": rule.family,
                "combined": words[rule.combine],
                "why": rule.why,
            }
            for name, rule in hypotheses.items()
        ]
    )


UNDECIDED_RULE = (
    "An undecided result names its reason where every comparison left undecided gives the same one (one "
    "seed, undertrained or underpowered) and the decided ones agree."
)
OVERALL_RULE = (
    "Across tasks, a hypothesis is supported when at least one task's comparison is supported and none is "
    "not supported, not supported when at least one is not supported and none is supported, and inconclusive "
    "otherwise (including mixed results). " + UNDECIDED_RULE
)
ALL_RULE = (
    "A claim about every comparison (EHRMamba beats every other model on every task) is supported only when "
    "every one of its comparisons is supported, not supported when any is not supported, and inconclusive "
    "otherwise. " + UNDECIDED_RULE
)


def _phases(runs: Sequence[ModelRun]) -> list[tuple[ModelRun, str, str, str, TrainResult | None]]:
    """(run, phase name, model label, "pretraining" or "finetuning", TrainResult or None), each training run
    once: pretraining is shared by a backbone's tasks and its MPF run (MultiBird's is BigBird's), and one MPF
    run serves every task."""
    out, seen = [], set()
    for r in runs:
        backbone = "bigbird" if r.model == "multibird" else r.model
        model = label(run_key(r))
        if r.pretrain is not None and ("pretrain", backbone, r.seed) not in seen:
            seen.add(("pretrain", backbone, r.seed))
            phase = f"pretrain ({r.pretrain.objective.upper()})"
            out.append(
                (r, phase, label("bigbird") if r.model == "multibird" else model, "pretraining", r.pretrain)
            )
        if r.finetune is None:
            out.append((r, f"fit {r.task}", model, "finetuning", None))
        elif r.mode != "MPF":
            out.append((r, f"finetune {r.task}", model, "finetuning", r.finetune))
        elif ("mpf", backbone, r.seed) not in seen:
            seen.add(("mpf", backbone, r.seed))
            out.append((r, "finetune MPF (all tasks)", model, "finetuning", r.finetune))
    return out


def loss_curves(runs: Sequence[ModelRun]) -> pd.DataFrame:
    """Per-step training losses of every pretraining and finetuning run."""
    rows = []
    for r, phase, model, kind, res in _phases(runs):
        if res is not None:
            rows += [
                {"model": model, "phase": kind, "run": phase, "step": i, "loss": v, "seed": r.seed}
                for i, v in enumerate(res.losses)
            ]
    return pd.DataFrame(rows)


def learning_curves(runs: Sequence[ModelRun]) -> pd.DataFrame:
    """Every validation of every training run: step, tokens seen, validation loss (and AUROC when
    finetuning), with the run's model, phase, task and seed."""
    rows = []
    for r, phase, model, kind, res in _phases(runs):
        if res is None:
            continue
        task = "" if kind == "pretraining" else ("MPF" if "MPF" in phase else r.task)
        for v in res.val:
            rows.append(
                {"model": model, "phase": kind, "objective": res.objective, "task": task, "seed": r.seed, **v}
            )
    return pd.DataFrame(rows)


def training_table(runs: Sequence[ModelRun], phase_prefix: str = "") -> pd.DataFrame:
    """How each model was trained, one row per training run: parameters, kernel path, the budget and the
    steps and epochs it ran, the step whose weights were kept and how it ended, time and tokens/s. Only the
    phases starting with ``phase_prefix`` (notebook 03: its MPF runs; the rest are notebook 01's)."""
    rows = []
    for r, phase, model, _, res in _phases(runs):
        if not phase.startswith(phase_prefix):
            continue
        best = None if res is None else next((v for v in res.val if v["step"] == res.best_step), None)
        rows.append(
            {
                "model": model,
                "phase": phase,
                "seed": r.seed,
                "parameters": r.n_params,
                "kernel path": r.kernel_path,
                "steps": "-" if res is None else f"{len(res.losses)} / {res.budget or len(res.losses)}",
                "epochs": "-" if res is None else f"{res.epochs:.2f}",
                "best step": "-" if best is None else res.best_step,
                "best val": "-" if best is None else f"{best[res.metric]:.3f} {res.metric}",
                "ended": "-" if res is None else (res.status if res.val else "budget (no validation)"),
                "seconds": round(r.seconds if res is None else res.seconds, 1),
                "tokens/s": f"{res.tokens / res.seconds:,.0f}" if res is not None and res.seconds else "-",
            }
        )
    return pd.DataFrame(rows)


def plan_vs_measured(plan: pd.DataFrame, runs: Sequence[ModelRun]) -> pd.DataFrame:
    """The cost plan (``repro plan``: steps and tokens each budget allows) beside what the runs used, one row
    per planned training run: steps run (mean over seeds), tokens fed, the budget's share used (early
    stopping ends runs sooner, so the plan is an upper bound), the time measured, and the time the whole
    budget would have taken at the measured tokens/s (what ``repro plan --measured`` projects from this run).
    Rows the runs do not hold show "-" where nothing was measured; notebook 03's MPF runs say where they ran."""
    seen: dict[tuple[str, str, str], list[TrainResult]] = {}
    for r, phase, model, kind, res in _phases(runs):
        if res is None:
            continue
        if kind == "pretraining":
            key = (model, "pretrain", "-")
        elif "MPF" in phase:
            key = (model, "finetune (MPF)", "all tasks")
        else:
            key = (model, "finetune", r.task)
        seen.setdefault(key, []).append(res)
    rows = []
    for p in plan.to_dict("records"):
        done = seen.get((label(p["model"]), p["phase"], p["task"]), [])
        tokens = sum(res.tokens for res in done)
        seconds = sum(res.seconds for res in done)
        budget = int(p["tokens (budget, all seeds)"])
        rows.append(
            {
                "model": label(p["model"]),
                "phase": p["phase"],
                "task": p["task"],
                # notebook 03 trains the MPF runs: "0 / n" here would read as never run
                "seeds": "in notebook 03"
                if not done and p["phase"] == "finetune (MPF)"
                else f"{len(done)} / {p['seeds']}",
                "steps (budget)": p["steps"],
                "steps run (mean)": round(float(np.mean([len(res.losses) for res in done])), 1)
                if done
                else "-",
                "tokens (budget)": f"{budget:,}",
                "tokens fed": f"{tokens:,}" if done else "-",
                "budget used": f"{tokens / budget:.0%}" if done and budget else "-",
                "seconds (measured)": round(seconds, 1) if done else "-",
                "seconds (whole budget, projected)": round(budget / (tokens / seconds), 1)
                if done and tokens and seconds
                else "-",
            }
        )
    return pd.DataFrame(rows)


def convergence_table(
    runs: Sequence[ModelRun],
    evaluated: dict[str, dict[str, dict]],
    task: str = "mortality_1m",
    below: set[tuple[str, str]] | None = None,
) -> pd.DataFrame:
    """One row per model: how many of its pretraining and finetuning runs ended on their plateau (early
    stop, or best validation within 0.5 % over the steps that carried the last 20 % of the learning rate:
    ``TrainResult.tail_start``), the epochs they saw, whether its
    held-out AUROC on `task` is clearly above chance (the CI's lower bound above 0.5), and, given `below`
    (``below_probe``), the tasks where its finetuned AUROC fell below its own frozen probe."""
    rows: dict[str, dict[str, list]] = {}
    for _, _, model, kind, res in _phases(runs):
        row = rows.setdefault(model, {"pretraining": [], "finetuning": []})
        if res is not None and res.val:
            row[kind].append(res)
    out = []
    for model, phases in rows.items():
        entry: dict[str, object] = {"model": model}
        # MultiBird finetunes BigBird's pretrained weights: its pretraining row is BigBird's, named so
        shared = model == label("multibird") and not phases["pretraining"] and label("bigbird") in rows
        if shared:
            phases = {**phases, "pretraining": rows[label("bigbird")]["pretraining"]}
        for phase, results in phases.items():
            done = sum(res.converged() for res in results)
            first = sum(res.stop == "early stop" and res.best_at_first_validation for res in results)
            epochs = [res.epochs for res in results]
            entry[f"{phase}: on plateau"] = (
                "-"
                if not results
                else f"{done} / {len(results)}"
                + (f" ({first} best at the first validation)" if first else "")
                + (f" ({label('bigbird')}'s)" if shared and phase == "pretraining" else "")
            )
            entry[f"{phase}: epochs"] = f"{min(epochs):.2f}-{max(epochs):.2f}" if results else "-"
        m = evaluated.get(task, {}).get(model)
        if m is None:
            entry[f"{task} AUROC"], entry["above chance"] = "-", "-"
        else:
            a = m["auroc"]
            entry[f"{task} AUROC"] = f"{a['estimate']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}]"
            entry["above chance"] = "yes" if a["lo"] > 0.5 else "NO: not clearly above chance"
        if below is not None:
            under = sorted(t for m, t in below if label(m) == model)
            entry["finetuned below its probe"] = ", ".join(under) if under else "-"
        out.append(entry)
    return pd.DataFrame(out)
