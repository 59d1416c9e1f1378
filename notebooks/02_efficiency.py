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
# # H2: does EHRMamba use less training time and memory than Transformers as length grows?
#
# Each model is built at the run's size, matched to EHRMamba's parameter count as in H1 (CEHR-BERT's
# learned position table grows with the length it must read; the parameter column shows the count
# actually built). One training step is timed per length and batch size: a pretraining step (next-token
# loss for causal models, masked-token loss for encoders), AdamW and gradient clipping, bf16 autocast on a
# GPU, on synthetic batches of random code tokens with valid side arrays and no padding (the content of a
# batch does not change its cost). Warm-up steps run first; then each step is timed with CUDA events on a
# GPU or the wall clock on a CPU (the `timer` column says which), and peak memory is
# `torch.cuda.max_memory_allocated` over the timed steps (not measured on a CPU). Out-of-memory errors are
# recorded as data points and the sweep goes on. A model whose sequence mixer would run the slow
# pure-PyTorch reference on a GPU is refused unless the parameters ask to time it, and then its kernel
# path says so. With `efficiency.ehrmamba_recompute` EHRMamba's mixer keeps only the activations
# mamba_ssm's fused path keeps (kernel path "+ recompute"); the epoch estimates build every model as its
# training does. CPU numbers (the smoke run) show the pipeline works; they say nothing about a GPU.
#
# H2 is the paper's claim, which is against MultiBird (BigBird's attention with MPF finetuning): it reads
# the BigBird comparisons only. H2 (all) asks the stronger question, faster and smaller than every
# Transformer, and needs each comparison supported.

# %% tags=["parameters"]
params_file = "params/smoke.yaml"
run_dir = "outputs/interactive"  # repro run passes its own run folder
data_dir = ""
work_dir = ""  # the training cache; "" is the run's own work/ (repro run --work passes another)

# %%
from repro.config import load_run_params
from repro.evaluation import figures, results
from repro.evaluation.store import save_json
from repro.profiling import bench_paper, scaling, sweep
from repro.profiling import figures as ef
from repro.training.prepare import prepare, pretrain_samples

figures.style()
params = load_run_params(params_file, data_dir or None)
prep = prepare(params, data_dir or None)
params = prep.params  # without any task dropped by eval.untrainable: drop
rows = sweep.efficiency_sweep(prep, progress=False)
slopes = scaling.scaling_slopes(rows)
samples = pretrain_samples(prep)
epoch_rows = sweep.efficiency_sweep(
    prep, [params.tokenizer.max_len], [params.train.batch_size], progress=False, as_trained=True
)
epochs = scaling.epoch_estimates(epoch_rows, len(samples), sum(len(s) for s in samples))
comparisons = scaling.h2_comparisons(rows)
print("devices:", ", ".join(sorted(set(rows["device"]))), "| timers:", ", ".join(sorted(set(rows["timer"]))))
print("row status counts:", rows["status"].value_counts().to_dict())

# %%
#| label: fig-efficiency-scaling
#| fig-cap: "Time per training step and peak memory against sequence length (log-log), per batch size, at matched parameter counts. Dashed lines: power laws fitted on each model's longest successful lengths (slope in the legend: for time and memory 1 is linear, 2 quadratic); crosses: out of memory. On a CPU the right panel shows tokens per second, because memory is not measured there; its slopes read 0 for time linear in length, -1 for quadratic."
fig = ef.scaling_figure(rows)

# %%
#| label: tbl-efficiency-slopes
#| tbl-cap: "Fitted log-log slopes of time per step and peak memory against length, per model and batch size, over up to four of each model's longest successful lengths (the lengths column gives the range and count), with the kernel path the rows ran (two paths: the fit spans both); a dash where the quantity was not measured (memory on a CPU)."
figures.show_table(ef.slope_table(slopes), floatfmt=".2f")

# %%
#| label: tbl-efficiency-sweep
#| tbl-cap: "Every row of the sweep: median time per training step (tokens per second, peak GiB where measured) per batch size, or why the row has no time (OOM, skipped, error), with the kernel path, device and timer of the row."
figures.show_table(ef.sweep_table(rows))

# %%
#| label: tbl-efficiency-epoch
#| tbl-cap: "One pretraining epoch on this run's train split, estimated from the step time measured at the run's batch size and max_len: samples // batch steps (the training loop's whole batches), each counted as padded to max_len; validation, data loading and other processes on the device are left out, so the measured epochs of notebook 01 can take longer. Real (unpadded) tokens per second follow from it."
figures.show_table(ef.epoch_table(epochs))

# %%
#| label: tbl-h2
#| tbl-cap: "H2 comparisons: EHRMamba against each Transformer per batch size at the longest length both trained at (time and memory ratios EHRMamba / Transformer), or the length where one ran out of memory, and the computed verdict."
figures.show_table(ef.comparison_table(comparisons), floatfmt=".2f")

# %% [markdown]
# The paper backs its efficiency claim with two numbers per phase against MultiBird: the time of one epoch
# and the batch size (Appendix C.3). With `efficiency.paper_bench` on, on a GPU with mamba_ssm, the same
# two are measured at the paper's sizes (EHRMamba 768 wide, 32 blocks; MultiBird 768 wide, 6 layers,
# 12 heads) and 2048 tokens, with this run's vocabulary and training step (`python -m repro.bench paper`
# outside the report).

# %%
#| label: tbl-efficiency-paper
#| tbl-cap: "The paper's efficiency claim measured its way, on this run's device, where efficiency.paper_bench is on (otherwise one line says it was not measured): tokens per second of one training step at the paper's batch sizes (bf16 autocast), peak memory, the largest batch that fits at 2048 tokens (doubling, then bisection), and time per epoch EXTRAPOLATED to the paper's data (one 2048-token row per patient; 93,787 pretraining and 47,447 finetuning patients) beside the paper's epoch times on 4 A100s. Only the EHRMamba / MultiBird ratio rows compare across hardware."
paper_claim, paper_results = bench_paper.for_run(params, prep.tokenizer.vocab_size)
figures.show_table(paper_claim)

# %%
h2 = results.rule_verdict(comparisons, params.hypotheses["H2"])
h2_all = results.rule_verdict(comparisons, params.hypotheses["H2 (all)"])
print(f"H2 (EHRMamba uses less training time and memory than BigBird as length grows): {h2}")
print(f"H2 (all) (... than every Transformer): {h2_all}")
print("Rule per comparison:", scaling.H2_RULE)
print("Why BigBird:", params.hypotheses["H2"].why)

# %%
save_json(
    {
        "h2_verdict": h2,
        "h2_all_verdict": h2_all,
        "h2_primary": [base for _, base, _ in params.hypotheses["H2"].pairs()],
        "comparisons": comparisons.to_dict(orient="records"),
        "slopes": slopes.to_dict(orient="records"),
        "epochs": epochs.to_dict(orient="records"),
        "rows": rows.to_dict(orient="records"),
        "kernel_paths": sorted(set(rows["kernel_path"]) - {"-"}),
        "paper_claim": paper_results,
    },
    f"{run_dir}/results/02_efficiency.json",
)
