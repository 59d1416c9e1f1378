# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # H3: does multitask prompted finetuning (MPF) beat single-task finetuning?
#
# MPF finetunes one copy of a pretrained backbone on the pooled (patient, task) samples of every task:
# a reserved task token replaces `[CLS]` (encoders) or the final `[REG]` (causal models), one head holds
# every task's outputs, and each sample's loss covers its own task only. It gets as many steps as the
# single-task runs together. Single-task runs are the ones from H1 (reused from this run's work folder).

# %% tags=["parameters"]
params_file = "params/smoke.yaml"
run_dir = "outputs/interactive"  # repro run passes its own run folder
data_dir = ""
work_dir = ""  # the training cache; "" is the run's own work/ (repro run --work passes another)

# %%
from repro.config import load_run_params
from repro.evaluation import figures, results
from repro.evaluation.store import save_json
from repro.training.grid import run_all
from repro.training.prepare import prepare

figures.style()
params = load_run_params(params_file, data_dir or None)
work = work_dir or f"{run_dir}/work"  # the training cache
prep = prepare(params, data_dir or None)
params = prep.params  # without any task dropped by eval.untrainable: drop
jobs = [(m, t, s) for s in params.seeds for m in params.mpf_models for t in [*params.tasks, "mpf"]]
done = run_all(prep, work, jobs, workers=params.train.workers)
runs = [r for d in done for r in (d.values() if isinstance(d, dict) else [d])]
preds = results.predictions_frame(runs)
n_boot, ci = params.eval.n_bootstrap, params.eval.ci
stat_kw = {
    "alpha": params.eval.alpha,
    "n_perm": params.eval.n_permutations,
    "effect": params.eval.effect_of_interest,
}
comparisons = results.mpf_comparisons(preds, params.mpf_models, n_boot, ci, **stat_kw)
comparisons = results.mark_undertrained(comparisons, runs)

# %%
#| label: tbl-mpf
#| tbl-cap: "H3: MPF minus single-task finetuning of the same backbone, held-out AUROC per task, with two-level bootstrap 95 % CIs (seeds, then patients; widened by t quantiles where few seeds leave it narrow), paired permutation p-values and their Benjamini-Hochberg adjustment across this notebook's comparisons, and computed verdicts."
figures.show_table(results.comparison_table(comparisons, ci))


# %%
#| label: tbl-mpf-training
#| tbl-cap: "How each MPF run trained (the single-task runs and the pretraining they share are in the training table of the appendix): its budget over the pooled samples of every task, the steps and epochs it ran, the step whose weights were kept (best validation AUROC, the mean over its outputs) and how it ended. An MPF run that ended still improving makes its backbone's H3 comparisons read undertrained."
figures.show_table(results.training_table(runs, phase_prefix="finetune MPF"), empty="no MPF run")

# %%
verdicts = {
    b: results.rule_verdict(comparisons[comparisons["baseline"] == b], params.hypotheses["H3"])
    for b in params.mpf_models
}
for b, v in verdicts.items():
    print(f"H3 for {results.label(b)} (MPF beats single-task across tasks): {v}")
print("Rule:", results.OVERALL_RULE)

# %%
#| label: fig-mpf
#| fig-cap: "MPF minus single-task AUROC per task and backbone with 95 % CIs; right of zero favours MPF."
fig = figures.delta_figure(comparisons, "ΔAUROC (MPF − single-task)")

# %%
save_json(
    {
        "h3_verdicts": verdicts,
        "comparisons": results.comparison_table(comparisons, ci).to_dict(orient="records"),
        "kernel_paths": sorted({r.kernel_path for r in runs}),
    },
    f"{run_dir}/results/03_mpf.json",
)
