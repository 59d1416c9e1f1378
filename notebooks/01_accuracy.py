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
# # H1: does EHRMamba beat the Transformers and the baselines?
#
# Every model shares the tokenizer and vocabulary. Neural backbones are pretrained on the train split
# (causal models by next-token prediction, encoders by masked-token prediction; the BiLSTM is trained
# from scratch), then finetuned per task; MultiBird is BigBird finetuned on all tasks at once with task
# prompts (MPF). The count baseline is a logistic regression on bag-of-token counts of the same token
# window the sequence models read.
# F1 thresholds come from the tuning split; every metric is computed on held_out with a
# patient-clustered bootstrap CI, on each subject's probability averaged over training seeds.

# %% tags=["parameters"]
params_file = "params/smoke.yaml"
run_dir = "outputs/interactive"  # repro run passes its own run folder
data_dir = ""
work_dir = ""  # the training cache; "" is the run's own work/ (repro run --work passes another)

# %%
from repro.config import BACKBONES, load_run_params
from repro.evaluation import figures, results, significance, truth
from repro.evaluation.store import save_json
from repro.training.grid import run_all
from repro.training.plan import grid as plan_grid
from repro.training.prepare import prepare
from repro.training.trainer import Trainer

figures.style()
params = load_run_params(params_file, data_dir or None)
work = work_dir or f"{run_dir}/work"  # the training cache
prep = prepare(params, data_dir or None)
params = prep.params  # without any task dropped by eval.untrainable: drop
jobs = [(m, t, s) for s in params.seeds for m in params.models for t in params.tasks]
# the pool also computes the probes and forecasts read below, beside the finetuning runs
runs = run_all(prep, work, jobs, workers=params.train.workers, probes=True)
trainer = Trainer(prep, work, progress=False)  # reads the pool's checkpoints: trains nothing
pretrained = [m for m in params.models if m in BACKBONES]
preds = results.predictions_frame(runs)
n_boot, ci = params.eval.n_bootstrap, params.eval.ci
stat_kw = {
    "alpha": params.eval.alpha,
    "n_perm": params.eval.n_permutations,
    "effect": params.eval.effect_of_interest,
}
evaluated = results.evaluate_all(preds, n_boot, ci)

# %%
#| label: tbl-mortality
#| tbl-cap: "mortality_1m on held_out: AUROC, AUPRC and F1 (threshold from the tuning split) with patient-clustered bootstrap 95 % CIs, parameter counts actually built, the spread over training seeds, and the oracle that scores the generator's true probability (synthetic data only)."
figures.show_table(results.task_table(evaluated, preds, runs, "mortality_1m"))

# %%
#| label: tbl-other-tasks
#| tbl-cap: "The other tasks on held_out. Conditions: the macro average over its labels (each scored on its own, F1 at its own tuning threshold), with CIs from the same patient resamples for every label (percentile intervals: with a label of few positives, AUPRC and F1 shift under resampling, so an interval can miss its estimate); null_task: labels independent of the history (true AUROC 0.5)."
figures.show_table(results.all_tasks_table(evaluated, [t for t in params.tasks if t != "mortality_1m"]))

# %%
#| label: tbl-condition-labels
#| tbl-cap: "Conditions per label on held_out: AUROC of each model (seed-ensembled) and of the oracle, with the label's held-out positives; the last row is the macro average the other tables show. Labels with fewer than eval.min_label_positives positives or negatives in a split are left out before training (listed in the cohort notebook's results)."
figures.show_table(results.condition_labels_table(preds))

# %%
#| label: tbl-paper
#| tbl-cap: "Our held-out results in the layout of the EHRMamba paper's Table 1 (count baseline in the XGBoost row), beside every cell of the paper's table as printed: mean (SD over three seeds), * a significant improvement over the best baseline. Each paper row shows the paper's own task definition where this run has it, else our closest task or a label of our conditions task (the task column names which); — where this run did not train the model or has no such task. Different data when this run is synthetic: the columns are not comparable as numbers, only as a ranking, and that only where our models are clearly above chance and on their plateau (the convergence table says which)."
figures.show_table(results.paper_table(evaluated, prep.synthetic, preds))

# %%
#| label: fig-auroc
#| fig-cap: "Held-out AUROC with 95 % CIs per model and task (the seed ensemble), each training seed's own AUROC as a tick below it; the dashed line is the oracle AUROC of the true probability."
seed_auroc = results.seed_aurocs(preds).assign(model=lambda d: d["model"].map(results.label))
fig = figures.forest_figure(results.forest_frame(evaluated), seeds=seed_auroc)

# %%
#| label: tbl-calibration
#| tbl-cap: "Calibration on held_out: Brier score and expected calibration error (ECE, 10 equal-width probability bins, weighted by rows) with patient-clustered bootstrap 95 % CIs; lower is better. The oracle scores the true risk: its Brier score is the floor, its ECE what sampling noise alone gives. Brier skill is 1 - Brier / (p (1 - p)), p the prevalence: near 0 for a model that gives everyone about the prevalence, however low its Brier score; - for multi-label tasks. ECE is biased upward on small samples (sparse bins), so its percentile interval can lie above the estimate."
figures.show_table(results.calibration_table(evaluated, params.tasks))

# %%
#| label: fig-calibration
#| fig-cap: "Reliability of the mortality_1m probabilities on held_out (seed-ensembled): observed death rate against mean predicted probability in 10 equal-width bins, marker area by patients in the bin; the diagonal is perfect calibration."
fig = figures.reliability_figure(results.reliability_frame(preds, "mortality_1m"), "mortality_1m")

# %%
# The probes (read below, after H1) come first: a finetuned model below its own frozen probe stopped on a
# false plateau, and its comparisons read "undertrained".
probe_runs = [
    r for m in pretrained for t in params.probes.tasks for s in params.seeds for r in trainer.probes(m, t, s)
]
probed = sorted({r.model.split(results.PROBE)[0] for r in probe_runs}, key=pretrained.index)
probe_preds = results.predictions_frame(probe_runs) if probe_runs else preds.iloc[:0]
probe_eval = results.evaluate_all(probe_preds, n_boot, ci) if probe_runs else {}
probe_frame = results.probe_frame(
    {t: {**evaluated.get(t, {}), **probe_eval.get(t, {})} for t in params.probes.tasks},
    probed,
    params.probes.tasks,
)
probe_pairs = [
    (f"ehrmamba{results.PROBE}{p}", f"{b}{results.PROBE}{p}")
    for p in params.probes.poolings
    for b in probed
    if b != "ehrmamba" and "ehrmamba" in probed
]
probe_comparisons = (
    results.paired_comparisons(probe_preds, probe_pairs, n_boot, ci, **stat_kw)
    if probe_pairs
    else preds.iloc[:0]
)
probe_comparisons = results.mark_undertrained(
    probe_comparisons, [], results.probes_undertrained(runs, params.probes.poolings)
)
probe_seconds = {
    m: sum(r.seconds for r in probe_runs if r.model.startswith(m + results.PROBE)) for m in probed
}

# %%
#| label: tbl-h1
#| tbl-cap: "H1 comparisons: EHRMamba minus each other model in held-out AUROC (seed ensembles) with a two-level bootstrap 95 % CI (each model's seeds resampled, then the same patients for both; widened by t quantiles where few seeds leave it narrow, df their degrees of freedom), a paired permutation p-value (patient-level swaps), that p adjusted by Benjamini-Hochberg across all comparisons of this notebook, and the computed verdict."
real = preds[preds["task"] != "null_task"]
comparisons = results.h1_comparisons(real, "ehrmamba", params.models, n_boot, ci, **stat_kw)
short = results.below_probe(probe_frame, probed)
comparisons = results.mark_undertrained(comparisons, runs, short)
figures.show_table(results.comparison_table(comparisons, ci))

# %%
#| label: tbl-h1-summary
#| tbl-cap: "H1 in one row per comparison: EHRMamba minus each other model in held-out AUROC on the headline task of the H1 rule, with its CI and verdict, the range of the differences over every task, and how many tasks got each verdict. Every task's comparison is in the appendix."
headline = next((t for *_, t in params.hypotheses["H1"].pairs()), params.tasks[0])
figures.show_table(results.comparison_summary(comparisons, ci, headline), empty="no comparison was run")


# %% [markdown]
# What did pretraining alone give each backbone? A logistic-regression probe reads its frozen hidden states
# at the prediction time (pooled as its finetuning head pools them, and as the mean over the input), fitted
# on train with its regularisation chosen on tuning; the gap to the finetuned model is what finetuning added.

# %%
#| label: tbl-probes
#| tbl-cap: "Frozen representations against finetuning: held-out AUROC (95 % CI) of each pretrained backbone finetuned (as in H1) and of a logistic-regression probe on its frozen hidden states at the prediction time, pooled as its finetuning head pools them (head: the last token for causal models, [CLS] or the mean for encoders) or as the mean over the input (mean); the probe is fitted on train with C chosen on tuning, seeds averaged like every model."
figures.show_table(results.probe_table(probe_frame, ci), empty="no pretrained backbone to probe in this run")

# %%
#| label: fig-probes
#| fig-cap: "Probe against finetuned held-out AUROC per backbone and pooling, with 95 % CIs; the dashed line is equality. The vertical distance below the line is what finetuning added to the frozen representation."
fig = figures.probe_figure(probe_frame)

# %%
#| label: tbl-probe-comparisons
#| tbl-cap: "EHRMamba's probe minus each other backbone's probe at the same pooling, held-out AUROC with the same two-level bootstrap CI, permutation p-values (BH-adjusted within this table), minimum detectable difference and verdict rules as H1 (undertrained where either backbone's pretraining ended still improving)."
figures.show_table(results.comparison_table(probe_comparisons, ci), empty="no pair of probes to compare")

# %%
h1 = results.rule_verdict(comparisons, params.hypotheses["H1"])
h1_all = results.rule_verdict(comparisons, params.hypotheses["H1 (all)"])
print(f"H1 headline (EHRMamba beats CEHR-BERT on mortality_1m): {h1}")
print(f"H1 across all models and tasks: {h1_all}")
print("Rule per comparison:", significance.VERDICT_RULE, significance.LABEL_RULE)
print("Rule across all models and tasks:", results.ALL_RULE)

# %%
#| label: tbl-null
#| tbl-cap: "The live false-positive check: the same comparisons on the null task, whose labels are independent of every event (true AUROC 0.5 for every model), as their own Benjamini-Hochberg family. Supported or not supported here is a false positive of the procedure; inconclusive, underpowered, undertrained and one seed are not."
null = results.h1_comparisons(
    preds[preds["task"] == "null_task"], "ehrmamba", params.models, n_boot, ci, **stat_kw
)
null = results.mark_undertrained(null, runs, short)
figures.show_table(results.comparison_table(null, ci), empty="the null task is not in this run's tasks")

# %%
#| label: tbl-null-auroc
#| tbl-cap: "The null task per model: held-out AUROC of the seed ensemble with its patient-bootstrap 95 % CI, each seed's AUROC, and whether the CI holds the true 0.5. With labels independent of every event a model falls outside only by chance (about 1 in 20); more often, or far outside, points at the data or the evaluation."
null_check = results.null_check_table(evaluated, preds)
figures.show_table(
    null_check.drop(columns=["auroc", "auroc_lo", "auroc_hi"], errors="ignore"),
    empty="the null task is not in this run's tasks",
)

# %%
#| label: fig-mechanisms
#| fig-cap: "Which model read which mechanism (mortality_1m, held_out, seed-ensembled): the share of each mechanism's signal a model's scores recovered, relative to the true probability's on the same samples (1: as much as the truth, 0: none, below 0: read the wrong way round; the sides compared are listed in the cohort notebook). Counts + LR can read only count and long_range."
recovered = (
    truth.recovery(prep.truth, results.seed_ensemble(preds))
    if prep.truth is not None
    else truth.pd.DataFrame()
)
fig = figures.mechanism_figure(recovered, {m: results.label(m) for m in params.models})

# %%
#| label: tbl-mechanisms-seeds
#| tbl-cap: "The same shares for each training seed apart (mortality_1m, held_out; seeds in the order listed): the seed ensemble above can average a mechanism one seed read with one another missed. Seeds that agree are not proof that a rerun would: GPU training is not bitwise repeatable, and in two default runs with the same settings and seeds, BigBird read most of the interaction in one and almost none of it in the other (docs/measurements.md, 'A second default run')."
recovered_by_seed = truth.recovery_by_seed(
    prep.truth,
    preds,
    {m: results.label(m) for m in params.models},
)
figures.show_table(recovered_by_seed, empty="no known truth (real data, or no mortality_1m task)")

# %%
#| label: fig-learning
#| fig-cap: "Learning curves: the validation metric on a fixed subset of the tuning split against the tokens seen in that phase, one line per model and seed; pretraining loss per objective (CLM and MLM are different losses, never compared) and finetuning AUROC on mortality_1m. Each run keeps the weights of its best validation and stops early once train.patience validations in a row (train.pretrain_patience in pretraining, where set) fail to improve it."
fig = figures.learning_figure(results.learning_curves(runs))

# %%
#| label: tbl-pretrain-loss
#| tbl-cap: "What pretraining learned, judged on its own objective: each pretrained backbone's loss per scored token and its perplexity on the held-out patients' histories (the weights kept at its best validation), averaged over seeds, with a 95 % CI from resampling patients. CLM (next token) and MLM (train.mlm_probability of the tokens masked, the same masks for every model) are different tasks: compare within an objective only. Each objective's unigram row is a model that knows only the train split's token frequencies, on the same histories (scoring every token the objective could score; one row per input length where backbones read different lengths): a backbone near it learned little about context."
heldout = {(m, s): trainer.heldout_losses(m, s) for m in pretrained for s in params.seeds}
# one unigram baseline per objective and input length, on the histories those backbones read
for objective, n in sorted({(v[0], trainer.input_len(m)) for (m, _), v in heldout.items() if v}, key=str):
    heldout[(results.unigram_label(n), objective)] = trainer.unigram_losses(objective, n)
pretrain_loss = results.pretrain_loss_table(heldout, n_boot, ci)
figures.show_table(pretrain_loss, empty="no backbone of this run was pretrained")

# %%
forecasts = {(m, s): trainer.forecasts(m, s) for m in pretrained for s in params.seeds}
forecast_table = results.forecast_table(forecasts, params.probes.forecast_horizons, n_boot, ci)

# %%
#| label: tbl-forecast
#| tbl-cap: "Forecasting as the EHRMamba paper's Table 5 reports it: each causal backbone, after next-token pretraining, generates the last k tokens of held-out histories (each ended at its last clinical token: the [VE] [REG] every history ends with would be free points) one at a time (greedy, its own predictions fed back; a generated token's side inputs repeat the context's last ones, as VectorInstitute/odyssey generates them). Accuracy@k: the share of the k generated tokens equal to the true one at the same position; cosine@k: cosine similarity of the bags of generated and true tokens; per patient, averaged over seeds and patients, 95 % CIs from resampling patients. The paper defines neither metric: these definitions are ours; its numbers are EHRMamba on MIMIC-IV, ours come from this run's data."
figures.show_table(
    forecast_table,
    empty="no causal backbone was pretrained by next-token prediction, or probes.forecast_patients is 0",
)

# %%
#| label: tbl-convergence
#| tbl-cap: "Were the models trained to their plateau? Per model: the pretraining and finetuning runs that ended by early stopping or on a plateau (best validation within 0.5 % over the steps that carried the last 20 % of the learning rate, the last 45 % of steps under linear decay to zero; an early stop whose best weights came from the first validation is counted and named, since its peak may lie before it), the epochs they saw, whether the held-out mortality_1m AUROC is clearly above chance (95 % CI lower bound above 0.5), and the tasks where the finetuned model ended below the lower 95 % bound of a logistic probe on its own frozen pretrained states (finetuning could have matched the probe by training its head alone, so it stopped on a false plateau; its comparisons read undertrained). A comparison between models that are not on their plateau says little about the architectures."
convergence = results.convergence_table(runs, evaluated, below=short)
figures.show_table(convergence)

# %%
#| label: fig-loss
#| fig-cap: "Training loss per step: pretraining (once per backbone and seed) and finetuning (every task and seed), averaged per model over its runs up to the last step every one of them reached (runs stop at different steps; past that the mean would be the longest runs' alone)."
fig = figures.loss_figure(results.loss_curves(runs))

# %%
#| label: tbl-training
#| tbl-cap: "How each model was trained, one row per training run: parameters actually built, kernel path, steps run of the budget's, epochs seen, the step whose weights were kept (best validation) and its score, how the run ended (early stop, plateau at budget, or still improving when the budget ran out), wall time and training throughput."
figures.show_table(results.training_table(runs), floatfmt=".1f")

# %%
#| label: tbl-plan
#| tbl-cap: "The cost plan against this run (`repro plan`): per training run of the grid, the steps and tokens its budget allows over all seeds, what the runs of this notebook used (early stopping ends them sooner, so the plan is an upper bound), the seconds they took, and the seconds the whole budget would have taken at their measured tokens/s (the projection `repro plan --measured` makes from this run). Notebook 03 trains the MPF runs (its training table); counts + LR trains no network and is not planned."
figures.show_table(results.plan_vs_measured(plan_grid(prep), runs), floatfmt=".1f")

# %%
save_json(
    {
        "h1_verdict": h1,
        "h1_overall": h1_all,
        "comparisons": results.comparison_table(comparisons, ci).to_dict(orient="records"),
        "training": results.training_table(runs).to_dict(orient="records"),
        "convergence": convergence.to_dict(orient="records"),
        "pretrain_heldout_loss": pretrain_loss.to_dict(orient="records"),
        "probes": probe_frame.to_dict(orient="records"),
        "probe_comparisons": results.comparison_table(probe_comparisons, ci).to_dict(orient="records"),
        "probe_seconds": probe_seconds,
        "forecast": forecast_table.to_dict(orient="records"),
        "kernel_paths": sorted({r.kernel_path for r in runs}),
        "null_comparisons": results.comparison_table(null, ci).to_dict(orient="records"),
        "null_auroc": null_check.to_dict(orient="records"),
        "mechanism_recovery": recovered.to_dict(orient="records"),
        "mechanism_recovery_by_seed": recovered_by_seed.to_dict(orient="records"),
        "seed_auroc": seed_auroc.to_dict(orient="records"),
    },
    f"{run_dir}/results/01_accuracy.json",
)
