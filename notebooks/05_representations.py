# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # H5: input representations
#
# Does how numbers and time become tokens matter as much as the architecture? EHRMamba and the
# FlashAttention Transformer are trained again under each representation of `representations.variants`:
# quantile bins of other sizes, unfused value tokens (`LAB//x` then `[Qk]`), bins anchored on reference
# ranges, soft discretization, xVal (the value's train z-score scales the code's embedding, with a numeric
# regression head in pretraining) and 13 fixed time-gap tokens. Each variant's tokenizer is fit on the
# train split alone; every variant keeps the run's max_len, steps, batch size and model sizes, so a
# representation that spends more tokens per event sees less of the history. Every comparison is against
# EHRMamba with the run's own tokens ("default"), paired on the same held-out patients.

# %% tags=["parameters"]
params_file = "params/smoke.yaml"
run_dir = "outputs/interactive"  # repro run passes its own run folder
data_dir = ""
work_dir = ""  # the training cache; "" is the run's own work/ (repro run --work passes another)

# %%
from repro.config import load_run_params
from repro.evaluation import figures, representations, results, significance
from repro.evaluation.store import save_json
from repro.training.variants import pairs, run_variants

figures.style()
params = load_run_params(params_file, data_dir or None)
work = work_dir or f"{run_dir}/work"  # the training cache
runs, stats = run_variants(params, data_dir or None, work, workers=params.train.workers)
preds = results.predictions_frame(runs)
n_boot, ci = params.eval.n_bootstrap, params.eval.ci
stat_kw = {
    "alpha": params.eval.alpha,
    "n_perm": params.eval.n_permutations,
    "effect": params.eval.effect_of_interest,
}
evaluated = results.evaluate_all(preds, n_boot, ci)
comparisons = results.paired_comparisons(preds, pairs(params), n_boot, ci, **stat_kw)
comparisons = results.mark_undertrained(comparisons, runs)
h5 = results.rule_verdict(comparisons, params.hypotheses["H5"])
print(f"H5 (some representation beats EHRMamba's default): {h5}")
print("Rule per comparison:", significance.VERDICT_RULE, significance.LABEL_RULE)
print("Rule across comparisons:", results.OVERALL_RULE)

# %%
#| label: tbl-repr-stats
#| tbl-cap: "What each representation costs: vocabulary size fit on train, tokens per train subject's full timeline (mean, median, 90th percentile), and the share of held-out samples whose history before the prediction time is longer than the token budget (max_len) and so is cut."
figures.show_table(stats, floatfmt=".2f")

# %%
#| label: tbl-repr-metrics
#| tbl-cap: "Held-out AUROC and AUPRC with patient-clustered bootstrap 95 % CIs per representation and model (probabilities averaged over the representation seeds, representations.seeds; the default row is EHRMamba with the run's own tokens trained with those seeds, so it differs from the EHRMamba of H1 where the seeds differ)."
for task in params.representations.tasks:
    figures.show_table(representations.metrics_table(evaluated, task))

# %%
#| label: tbl-repr-comparisons
#| tbl-cap: "Each representation and model minus EHRMamba with the default tokens, held-out AUROC: two-level bootstrap 95 % CI (seeds, then patients; widened by t quantiles where few seeds leave it narrow), paired permutation p-value, Benjamini-Hochberg adjustment across this notebook's comparisons, and the computed verdict (supported: the variant is better)."
figures.show_table(representations.comparisons_table(comparisons, ci))

# %%
#| label: fig-repr
#| fig-cap: "Difference in held-out AUROC from EHRMamba with the default tokens, with 95 % CIs; right of zero: the representation (and model) does better."
named = comparisons.assign(
    comparison=[representations.display(n) for n in comparisons["new"]] if len(comparisons) else []
)
fig = figures.delta_figure(named, "ΔAUROC (variant − EHRMamba · default)")

# %%
save_json(
    {
        "h5_verdict": h5,
        "comparisons": [
            {**row, "ΔAUROC": float(d)}
            for row, d in zip(
                representations.comparisons_table(comparisons, ci).to_dict(orient="records"),
                comparisons["ΔAUROC"] if len(comparisons) else [],
            )
        ],
        "stats": stats.to_dict(orient="records"),
        "kernel_paths": sorted({r.kernel_path for r in runs}),
        "params_hash": params.hash(),
    },
    f"{run_dir}/results/05_representations.json",
)
