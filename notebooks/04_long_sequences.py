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
# # H4: does EHRMamba handle long histories where Transformers run out of memory?
#
# Two measurements. First, the out-of-memory boundary: every model, at the run's size matched to
# EHRMamba's parameter count, takes one warm-up and one measured training step at growing lengths (batch
# size from the parameters); each length is attempted once and an out-of-memory error is recorded, not
# assumed. Second, accuracy on
# long histories: EHRMamba and the Transformers are finetuned on one task with `max_len` set to each
# allowed length (same task, seed, steps and batch size at every length, so only the context a model may
# read changes; a run that runs out of memory is recorded as such) and scored on the held-out subjects
# whose full history before the prediction time is longer than the subgroup threshold. Every run is scored
# on the same bootstrap resamples of patients, so CIs compare directly.

# %% tags=["parameters"]
params_file = "params/smoke.yaml"
run_dir = "outputs/interactive"  # repro run passes its own run folder
data_dir = ""
work_dir = ""  # the training cache; "" is the run's own work/ (repro run --work passes another)

# %%
from repro.config import load_run_params
from repro.evaluation import figures, results, significance
from repro.evaluation.store import save_json
from repro.profiling import figures as ef
from repro.profiling import long_history, scaling, sweep
from repro.training.prepare import prepare

figures.style()
params = load_run_params(params_file, data_dir or None)
work = work_dir or f"{run_dir}/work"  # the training cache
prep = prepare(params, data_dir or None)
params = prep.params  # without any task dropped by eval.untrainable: drop
eff = params.efficiency
n_boot, ci = params.eval.n_bootstrap, params.eval.ci
bounds = sweep.efficiency_sweep(
    prep, eff.boundary_lengths, [eff.boundary_batch_size], progress=False, steps=(1, 1)
)
boundary = scaling.oom_boundary(bounds)
memory = scaling.h4_memory_comparisons(bounds)
runs = long_history.long_history_runs(prep, f"{work}/long-history")
history = long_history.history_tokens(prep, eff.long_task)
table = long_history.long_history_auroc(runs, history, eff.long_history_tokens, n_boot, ci, eff.long_task)
comparisons = long_history.h4_accuracy_comparisons(
    runs,
    history,
    eff.long_history_tokens,
    n_boot,
    ci,
    eff.long_task,
    alpha=params.eval.alpha,
    n_perm=params.eval.n_permutations,
    effect=params.eval.effect_of_interest,
)
sub = table.attrs["subgroup"]
print(
    f"long-history subgroup ({eff.long_task}, held_out): history > {sub['threshold']} tokens, "
    f"{sub['n_subjects']} of {len(history)} subjects, {sub.get('n_positive', 'n/a')} positive"
)

# %%
#| label: tbl-long-boundary
#| tbl-cap: "The out-of-memory boundary on this run's device: per model, the longest length at which a training step ran (with its peak memory) and the first length that failed and why, from measured steps only; kernel path and device of the rows."
figures.show_table(ef.boundary_table(boundary))

# %%
#| label: tbl-h4-memory
#| tbl-cap: "H4, memory: EHRMamba against each Transformer on the boundary sweep (the length where one of the two ran out of memory while the other trained) and the computed verdict."
figures.show_table(ef.comparison_table(memory))


# %%
h4_memory = results.overall_verdict(memory["verdict"]) if len(memory) else "inconclusive"
print(f"H4 memory (Transformers run out of memory where EHRMamba trains): {h4_memory}")
print("Rule:", scaling.H4_MEMORY_RULE)

# %%
#| label: tbl-h4-setup
#| tbl-cap: "H4, accuracy: how each (model, allowed length) run was trained and the subgroup it is scored on (the same for every model and length)."
figures.show_table(long_history.setup_table(eff, sub, len(history)))

# %%
#| label: fig-long-history
#| fig-cap: "Held-out AUROC (95 % CI) on the long-history subgroup against the number of tokens each model may read; crosses on the 0.5 line mark runs that ran out of memory."
fig = ef.long_history_figure(table)

# %%
#| label: tbl-long-history
#| tbl-cap: "Each (model, allowed length) run: status, kernel path, parameters, held-out AUROC with patient-clustered bootstrap 95 % CIs on the long-history subgroup and on all held-out subjects, training plus scoring time and peak memory."
figures.show_table(ef.long_history_table(table, ci))

# %%
#| label: tbl-h4
#| tbl-cap: "H4, accuracy: EHRMamba at the longest length it trained at minus each Transformer at the longest length it trained at, held-out AUROC on the long-history subgroup (same resampled patients), paired permutation p-values with their Benjamini-Hochberg adjustment, and the computed verdict."
no_comparison = (
    f"no comparison: no held-out subject has a history longer than {sub['threshold']} tokens"
    if not sub["n_subjects"]
    else "no comparison: no Transformer was trained and scored on the subgroup beside EHRMamba"
)
figures.show_table(results.comparison_table(comparisons, ci), empty=no_comparison)


# %%
h4_accuracy = long_history.headline(comparisons, table)
h4_all = results.rule_verdict(comparisons, params.hypotheses["H4 (accuracy)"])
print(f"H4 accuracy headline (EHRMamba beats the best Transformer run on long histories): {h4_accuracy}")
print(f"H4 accuracy across Transformers: {h4_all}")
print("Rule per comparison:", significance.VERDICT_RULE, significance.LABEL_RULE)

# %%
save_json(
    {
        "h4_memory_verdict": h4_memory,
        "h4_accuracy_verdict": h4_accuracy,
        "h4_accuracy_overall": h4_all,
        "subgroup": sub,
        "training": {"pretrain_steps": eff.long_pretrain_steps, "finetune_steps": eff.long_finetune_steps},
        "boundary": boundary.to_dict(orient="records"),
        "memory_comparisons": memory.to_dict(orient="records"),
        "accuracy_comparisons": results.comparison_table(comparisons, ci).to_dict(orient="records"),
        "runs": table.drop(columns=["key"]).to_dict(orient="records"),
        "boundary_rows": bounds.to_dict(orient="records"),
        "kernel_paths": sorted((set(bounds["kernel_path"]) | set(table["kernel_path"])) - {"-"}),
    },
    f"{run_dir}/results/04_long_sequences.json",
)
