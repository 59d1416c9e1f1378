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
# # Verdicts of this run
#
# Runs last and only collects what notebooks 01-04 computed and saved under `results/`: one verdict per
# hypothesis with the evidence line behind it. A notebook that did not run shows "not run".

# %% tags=["parameters"]
params_file = "params/smoke.yaml"
run_dir = "outputs/interactive"  # repro run passes its own run folder
data_dir = ""
work_dir = ""  # the training cache; "" is the run's own work/ (repro run --work passes another)

# %%
from repro.config import load_run_params
from repro.evaluation import figures, summary, verdicts
from repro.evaluation.store import save_json

params = load_run_params(params_file, data_dir or None)
table = verdicts.verdict_table(verdicts.load_results(f"{run_dir}/results"))
print(verdicts.abstract_line(table))

# %%
#| label: tbl-verdicts
#| tbl-cap: "The verdict on each hypothesis, as computed by its notebook (H1 in 01_accuracy, H2 in 02_efficiency, H3 in 03_mpf, H4 in 04_long_sequences, H5 in 05_representations), with the evidence behind it (paired difference with its 95 % CI and BH-adjusted p for H1; time and memory ratios for H2; per-backbone verdicts for H3; the longest trained length per model and the long-history subgroup for H4)."
figures.show_table(table.drop(columns=["section"]))

# %%
#| label: tbl-rules
#| tbl-cap: "The written rule of each hypothesis, from the run's parameters (`hypotheses`): its primary comparisons, the family over which Benjamini-Hochberg adjusts the p-values, how the comparison verdicts combine into the hypothesis's verdict, and why."
from repro.evaluation import results

figures.show_table(results.rules_table(params.hypotheses))

# %%
#| label: tbl-false-positives
#| tbl-cap: "The comparison procedure's false-positive rate, measured: pairs of models with equal true AUROC (correlated scores, three training seeds each, 200 patients, prevalence 0.2) put through the same two-level bootstrap, permutation test and verdict rule as every comparison of the report (alpha 0.05 after BH, the effect of interest for underpowered), on one label (mortality-like), on three labels sharing each patient's risk (conditions-like, rows clustered by patient), and on 2,000 patients at prevalence 0.1 with seeds that each weigh the signal by their own factor (per-seed AUROC sd about 0.02). The rate is the share called supported, with a Wilson 95 % interval; any claim adds not supported; the last column says whether the interval shows the rate at most alpha (a few dozen simulations, as in the smoke run, cannot)."
from repro.evaluation import null_simulation

false_positives = null_simulation.false_positive_table(
    params.eval.null_simulations,
    params.eval.null_resamples,
    params.eval.alpha,
    params.eval.effect_of_interest,
)
figures.show_table(false_positives)

# %%
#| label: tbl-timing
#| tbl-cap: "Wall time of each notebook of this run and, on a GPU node, the GPU-busy share: the mean of `nvidia-smi`'s utilization (the share of each 0.5 s sample with a kernel running, over every process) while the notebook ran. Busy is not full: a small kernel counts as busy. “training (01, 03, 05)” is every run of those notebooks, trained in one pool before them; their own rows are then evaluation. The verdicts notebook and the render are not included."
import json
from pathlib import Path

manifest_path = Path(run_dir) / "manifest.json"
manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
figures.show_table(summary.timing_table(manifest))

# %%
save_json(
    {
        "verdicts": table.to_dict(orient="records"),
        "false_positives": false_positives.to_dict(orient="records"),
        "params_hash": params.hash(),
    },
    f"{run_dir}/results/90_verdicts.json",
)
