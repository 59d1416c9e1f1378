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
# # H1: does EHRMamba beat CEHR-BERT and a count baseline on mortality?
#
# Each neural model is pretrained on the train split (EHRMamba: next-token prediction; CEHR-BERT:
# masked-token prediction), then finetuned per task; the count baseline is a logistic regression on
# bag-of-token counts of the whole history. Thresholds for F1 are chosen on the tuning split; every
# metric is computed on held_out with a patient-clustered bootstrap CI.

# %% tags=["parameters"]
params_file = "params/smoke.yaml"
run_dir = "outputs/interactive"  # repro run passes its own run folder
data_dir = ""

# %%
from tqdm import tqdm

from repro import experiment as ex
from repro import figures, results

figures.style()
params = ex.load_run_params(params_file, data_dir or None)
prep = ex.prepare(params, data_dir or None)
trainer = ex.Trainer(prep, f"{run_dir}/work", progress=False)
jobs = [(m, t, s) for s in params.seeds for m in params.models for t in params.tasks]
runs = [trainer.run(m, t, s) for m, t, s in tqdm(jobs, desc="models x tasks x seeds")]
preds = results.predictions_frame(runs)
n_boot, ci = params.eval.n_bootstrap, params.eval.ci
evaluated = results.evaluate_all(preds, n_boot, ci)

# %%
#| label: tbl-mortality
#| tbl-cap: "mortality_1m on held_out: AUROC, AUPRC and F1 (threshold from the tuning split) with patient-clustered bootstrap 95 % CIs, beside the oracle that scores the generator's true probability (synthetic data only)."
figures.show_table(results.task_table(evaluated, preds, runs, "mortality_1m"))

# %%
#| label: tbl-inhospital
#| tbl-cap: "inhospital_mortality_24h on held_out (prediction 24 h after admission), same layout."
figures.show_table(results.task_table(evaluated, preds, runs, "inhospital_mortality_24h"))

# %%
#| label: fig-auroc
#| fig-cap: "Held-out AUROC with 95 % CIs per model and task; the dashed line is the oracle AUROC of the true probability."
fig = figures.forest_figure(results.forest_frame(evaluated))

# %%
#| label: tbl-h1
#| tbl-cap: "H1 comparisons: paired differences in held-out AUROC (same resampled patients for both models), bootstrap p-values adjusted by Benjamini-Hochberg across the comparisons of this notebook, and the computed verdict."
comparisons = results.h1_comparisons(preds, "ehrmamba", ["cehr_bert", "count_lr"], n_boot, ci)
figures.show_table(comparisons)
print(f"H1 (EHRMamba beats CEHR-BERT on mortality_1m): {results.h1_verdict(comparisons)}")
print("Rule:", results.VERDICT_RULE)

# %%
#| label: fig-loss
#| fig-cap: "Training loss per step: pretraining (once per model and seed) and finetuning per task."
fig = figures.loss_figure(results.loss_curves(runs))

# %%
#| label: tbl-training
#| tbl-cap: "How each model was trained: parameters actually built, kernel path, steps, wall time and training throughput."
figures.show_table(results.training_table(runs), floatfmt=".1f")

# %%
ex.save_json(
    {
        "h1_verdict": results.h1_verdict(comparisons),
        "comparisons": comparisons.to_dict(orient="records"),
        "training": results.training_table(runs).to_dict(orient="records"),
        "kernel_paths": sorted({r.kernel_path for r in runs}),
    },
    f"{run_dir}/results/01_accuracy.json",
)
