"""Typed run parameters loaded from params/*.yaml: validated, unknown keys rejected, hashed; and the
project paths they are resolved against (one place, so notebooks opened from notebooks/ find params/).

Unknown keys are an error, not a silent attribute: an earlier reproduction passed `d_model=` to HF's
MambaConfig and trained the default 768-wide model without noticing (DESIGN.md section 11).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import types
import typing
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The synthetic cohort's mortality mechanisms (repro.data.synthetic documents each and its default strength).
# train / tuning / held_out shares of the synthetic cohort's subjects unless data.split_fractions says
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
MECHANISM_NAMES = ("count", "long_range", "order", "trend", "timing", "interaction")
OUR_TASKS = (
    "mortality_1m",
    "inhospital_mortality_24h",
    "los_1w",
    "readmission_1m",
    "conditions",
    "null_task",
)
# The EHRMamba paper's tasks that ours do not already cover (its length of stay is los_1w, its
# readmission readmission_1m): mortality within 32 days, and three conditions as separate binary tasks
# whose diagnosis groups are `CodePatterns.condition_*` (repro.data.tasks documents each).
CONDITION_TASKS = ("condition_hypertension", "condition_fluid_electrolyte", "condition_lipoid")
PAPER_TASKS = ("mortality_32d", *CONDITION_TASKS)
TASK_NAMES = (*OUR_TASKS, *PAPER_TASKS)
BACKBONES = ("ehrmamba", "cehr_bert", "bigbird", "transformer", "mamba2", "hybrid", "lstm")
MODEL_NAMES = (*BACKBONES, "multibird", "count_lr")  # multibird = BigBird finetuned with MPF


class ParamsError(ValueError):
    """A parameter file or value is wrong; the message names the parameter."""


@dataclass
class CodePatterns:
    """Regular expressions that give MEDS codes their meaning; defaults follow MIMIC_IV_MEDS.

    Another ETL's vocabulary works by changing these, not the code (DESIGN.md section 3).
    """

    visit_start: str = r"^HOSPITAL_ADMISSION//"
    visit_end: str = r"^HOSPITAL_DISCHARGE//"
    death: str = r"^MEDS_DEATH$"
    birth: str = r"^MEDS_BIRTH$"
    died_in_hospital: str = r"^HOSPITAL_DISCHARGE//DIED"
    stamped_at_discharge: str = r"^(DIAGNOSIS//|PROCEDURE//ICD//|DRG//)"
    diagnosis_group: str = r"^DIAGNOSIS//ICD//(\d+//[A-Z0-9]{3})"  # capture group = the condition group
    # The paper's three condition tasks, as patterns over those groups ("<ICD version>//<3 characters>"):
    # the paper names categories, not codes; these are their ICD-9 categories and ICD-10 equivalents.
    condition_hypertension: str = r"^(9//40[1-5]|10//I1[0-6])$"  # hypertensive diseases
    condition_fluid_electrolyte: str = r"^(9//276|10//E8[67])$"  # fluid, electrolyte, acid-base balance
    condition_lipoid: str = r"^(9//272|10//E78)$"  # disorders of lipoid (lipoprotein) metabolism
    lab: str = r"^LAB//"
    medication: str = r"^MEDICATION//"
    procedure: str = r"^(PROCEDURE//|INFUSION_START//)"
    diagnosis: str = r"^DIAGNOSIS//"
    demographic: str = r"^(GENDER|RACE|INSURANCE|MARITAL_STATUS|LANGUAGE)//"


@dataclass
class DataParams:
    """Where the MEDS data come from: the embedded synthetic cohort or a directory."""

    synthetic: bool = True
    meds_dir: str | None = None
    n_subjects: int = 600
    generator_seed: int = 7
    shard_size: int = 250
    split_fractions: list[float] = field(default_factory=lambda: list(SPLIT_FRACTIONS))
    # The paper's splits: this fraction of the train split's patients only pretrains and the rest only
    # finetunes (disjoint; 0: every train patient does both). 57 / (57 + 28) = 0.67 gives its proportions.
    pretrain_only: float = 0.0
    codes: CodePatterns = field(default_factory=CodePatterns)
    # strengths of the synthetic cohort's mortality mechanisms (logit units; 0 switches one off); a name
    # left out keeps its default (repro.data.synthetic.MECHANISMS)
    mechanisms: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.mechanisms) - set(MECHANISM_NAMES))
        if unknown:
            raise ParamsError(
                f"data.mechanisms has unknown entries {unknown}; known: {list(MECHANISM_NAMES)}"
            )
        bad = {
            k: v for k, v in self.mechanisms.items() if not isinstance(v, int | float) or isinstance(v, bool)
        }
        if bad:
            raise ParamsError(f"data.mechanisms values must be numbers, got {bad}")
        if self.n_subjects < 10:
            raise ParamsError(f"data.n_subjects must be >= 10, got {self.n_subjects}")
        if self.shard_size < 1:
            raise ParamsError(f"data.shard_size must be >= 1, got {self.shard_size}")
        fr = self.split_fractions
        if len(fr) != 3 or abs(sum(fr) - 1) > 1e-6 or min(fr) < 0:
            raise ParamsError(f"data.split_fractions must be 3 numbers >= 0 summing to 1, got {fr}")
        if not 0 <= self.pretrain_only < 1:
            raise ParamsError(f"data.pretrain_only must be in [0, 1), got {self.pretrain_only}")


TOKEN_VALUES = ("fused", "unfused", "soft", "xval")
TOKEN_BINS = ("quantile", "clinical")
TIME_TOKENS = ("ehrmamba", "fixed13")


@dataclass
class TokenizerParams:
    """EHRMamba token stream options (DESIGN.md section 6); the defaults are the paper's tokens.

    values: how a lab value enters the stream (repro.data.tokenizer): "fused" `CODE//Q{k}`; "unfused"
    `CODE` then a shared `[Q{k}]`; "soft" the fused token plus a mix with the neighbouring bin
    (`mix_ids` / `mix_w`); "xval" `CODE` plus its train z-score (`values` / `value_mask`).
    bins: "quantile" (n_bins per code, fit on train) or "clinical" (low / normal / high from the
    reference range in metadata/codes.parquet where it exists, quantile bins otherwise).
    time_tokens: "ehrmamba" interval tokens between visits, or "fixed13" ETHOS-style `[GAP_k]` tokens
    before any token 5 minutes or more after the previous one.
    """

    max_len: int = 256
    n_bins: int = 5
    families: list[str] = field(default_factory=lambda: ["lab", "medication", "procedure"])
    include_diagnoses: bool = False
    min_count: int = 1
    max_visits: int = 64
    values: str = "fused"
    bins: str = "quantile"
    time_tokens: str = "ehrmamba"

    def __post_init__(self) -> None:
        for name, allowed in (("values", TOKEN_VALUES), ("bins", TOKEN_BINS), ("time_tokens", TIME_TOKENS)):
            if getattr(self, name) not in allowed:
                raise ParamsError(
                    f"tokenizer.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}"
                )
        if self.max_len < 4:
            raise ParamsError(f"tokenizer.max_len must be >= 4, got {self.max_len}")
        if not 1 <= self.n_bins <= 100:
            raise ParamsError(f"tokenizer.n_bins must be in 1..100, got {self.n_bins}")
        allowed = {"lab", "medication", "procedure", "diagnosis", "demographic"}
        bad = set(self.families) - allowed
        if bad:
            raise ParamsError(
                f"tokenizer.families has unknown entries {sorted(bad)}; allowed {sorted(allowed)}"
            )
        if self.min_count < 1:
            raise ParamsError(f"tokenizer.min_count must be >= 1, got {self.min_count}")


# what `train.per_model` may set for one model: the settings the paper and the reference implementations
# choose per family (learning rate, warmup, decay, batch, budget)
PER_MODEL_KEYS = (
    "lr",
    "finetune_lr",
    "warmup_frac",
    "weight_decay",
    "batch_size",
    "finetune_batch_size",
    "pretrain_epochs",
    "finetune_epochs",
    "patience",
    "pretrain_patience",
)


def _per_model_value(model: str, key: str, value: Any) -> int | float | None:
    """A `train.per_model` entry as its field holds it: counts (batch sizes, patiences) as whole numbers."""
    if value is None and key == "pretrain_patience":
        return None  # back to `patience`
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ParamsError(f"train.per_model.{model}.{key} must be a number, got {value!r}")
    if key.endswith(("batch_size", "patience")):
        if value != int(value):
            raise ParamsError(
                f"train.per_model.{model}.{key} counts validations or rows: a whole number, got {value}"
            )
        return int(value)
    return float(value)


def whole_batches(n_samples: int, batch_size: int) -> int:
    """Steps in one pass over `n_samples`: the training loop's whole batches (a batch never exceeds the data,
    and there is at least one).

    >>> whole_batches(600, 16), whole_batches(5, 16)
    (37, 1)
    """
    return max(1, n_samples // min(batch_size, max(n_samples, 1)))


@dataclass
class TrainParams:
    """Optimisation settings shared by pretraining and finetuning.

    Budgets are in epochs (passes over the training samples); `pretrain_steps` / `finetune_steps`, when set,
    replace them with a fixed step count (tests and benchmarks). Every run validates on a fixed subset of
    the tuning split `val_per_epoch` times per epoch and at its end, keeps the best weights (lowest loss when
    pretraining, highest AUROC when finetuning) and stops once `patience` validations in a row
    (`pretrain_patience` in pretraining, where set) failed to improve on the best by `min_delta` (relative).
    """

    batch_size: int = 16
    finetune_batch_size: int | None = None  # None: batch_size (the paper finetuned at other batches)
    eval_batch_size: int = 64
    pretrain_epochs: float = 1.0
    finetune_epochs: float = 1.0
    pretrain_steps: int | None = None
    finetune_steps: int | None = None
    lr: float = 1e-3
    finetune_lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    mlm_probability: float = 0.15
    val_per_epoch: float = 4.0
    val_samples: int = 2048
    patience: int = 4  # 0: never stop early (the best checkpoint is still kept)
    # pretraining's own patience (None: `patience`): MLM validation curves can sit on a plateau for
    # several epochs and then fall again, so a patience sized for finetuning stops them on the plateau
    pretrain_patience: int | None = None
    min_delta: float = 0.001
    checkpoint_every: int = 50
    num_threads: int = 0
    workers: int = 1  # parallel training processes (on a GPU they share it: small models leave it idle)
    group_by_length: int = 50  # batches of similar length, from megabatches of this many batches (0: random)
    # "tokens": each length-sorted megabatch is cut into the same number of batches by padded tokens, so a
    # step's size no longer swings with the lengths it drew (batch_size rows on average; needs grouping)
    batch_by: str = "rows"
    # CUDA graphs for the training step of backbones that declare it capturable (repro.training.graphs);
    # on in params/default.yaml and quick.yaml, where `python -m repro.bench graphs` measured it
    cuda_graphs: bool = False
    # settings of one model that differ from the above, e.g. {ehrmamba: {lr: 0.002}} (keys: PER_MODEL_KEYS)
    per_model: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.finetune_batch_size is not None and self.finetune_batch_size < 1:
            raise ParamsError(f"train.finetune_batch_size must be >= 1, got {self.finetune_batch_size}")
        for name in ("batch_size", "eval_batch_size", "val_samples"):
            if getattr(self, name) < 1:
                raise ParamsError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("pretrain_steps", "finetune_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ParamsError(f"train.{name} must be >= 0 (or left out), got {getattr(self, name)}")
        for name in ("pretrain_epochs", "finetune_epochs"):
            if getattr(self, name) < 0:
                raise ParamsError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.val_per_epoch <= 0:
            raise ParamsError(f"train.val_per_epoch must be > 0, got {self.val_per_epoch}")
        if self.patience < 0 or self.min_delta < 0:
            raise ParamsError(
                f"train.patience and train.min_delta must be >= 0, got {self.patience}, {self.min_delta}"
            )
        if self.pretrain_patience is not None and self.pretrain_patience < 0:
            raise ParamsError(
                f"train.pretrain_patience must be >= 0 (or left out), got {self.pretrain_patience}"
            )
        if not 0 < self.lr < 1 or not 0 < self.finetune_lr < 1:
            raise ParamsError(
                f"train.lr / train.finetune_lr must be in (0, 1), got {self.lr}, {self.finetune_lr}"
            )
        if not 0 <= self.warmup_frac < 1:
            raise ParamsError(f"train.warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if self.group_by_length < 0:
            raise ParamsError(f"train.group_by_length must be >= 0, got {self.group_by_length}")
        if self.batch_by not in ("rows", "tokens"):
            raise ParamsError(f"train.batch_by must be 'rows' or 'tokens', got {self.batch_by!r}")
        if self.batch_by == "tokens" and self.cuda_graphs:
            raise ParamsError(
                "train.cuda_graphs captures a graph per batch shape, and batch_by: tokens makes one per row "
                "count; use one of them"
            )
        if self.batch_by == "tokens" and self.group_by_length == 0:
            raise ParamsError(
                "train.batch_by: tokens cuts length-sorted megabatches; set train.group_by_length > 0"
            )
        if self.workers < 1:
            raise ParamsError(f"train.workers must be >= 1, got {self.workers}")
        if not 0 < self.mlm_probability < 1:
            raise ParamsError(f"train.mlm_probability must be in (0, 1), got {self.mlm_probability}")
        for model, overrides in self.per_model.items():
            if model not in MODEL_NAMES:
                raise ParamsError(f"train.per_model has unknown model {model!r}; known: {list(MODEL_NAMES)}")
            if not isinstance(overrides, dict):
                raise ParamsError(f"train.per_model.{model} must be a mapping, got {overrides!r}")
            bad = sorted(set(overrides) - set(PER_MODEL_KEYS))
            if bad:
                raise ParamsError(
                    f"train.per_model.{model} has unknown keys {bad}; allowed: {list(PER_MODEL_KEYS)}"
                )
            try:
                self.for_model(model)
            except ParamsError as exc:
                where = f"train.per_model.{model}"
                raise ParamsError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from None

    def for_model(self, *models: str) -> TrainParams:
        """These settings with each of `models`' entries of `per_model` applied in turn (its own copy:
        nothing is shared); MultiBird's finetuning is ``for_model("bigbird", "multibird")``."""
        overrides = {
            k: _per_model_value(model, k, v)
            for model in models
            for k, v in self.per_model.get(model, {}).items()
        }
        return dataclasses.replace(self, per_model={}, **overrides) if overrides else self

    def patience_for(self, objective: str) -> int:
        """Validations without improvement that end a run of `objective` ("classify" finetunes)."""
        if objective != "classify" and self.pretrain_patience is not None:
            return self.pretrain_patience
        return self.patience

    def finetuning(self) -> TrainParams:
        """These settings as finetuning uses them: batch_size is finetune_batch_size when that is set."""
        if self.finetune_batch_size is None or self.finetune_batch_size == self.batch_size:
            return self
        return dataclasses.replace(self, batch_size=self.finetune_batch_size)

    def steps(self, phase: str, n_samples: int) -> int:
        """Steps of `phase` ("pretrain" or "finetune") over `n_samples`: the fixed count when set, else the
        epoch budget in whole batches (at least one step when the budget is not zero)."""
        fixed = getattr(self, f"{phase}_steps")
        if fixed is not None:
            return int(fixed)
        epochs = getattr(self, f"{phase}_epochs")
        return 0 if epochs == 0 else max(1, round(epochs * self.steps_per_epoch(n_samples)))

    def steps_per_epoch(self, n_samples: int) -> int:
        """Whole batches in one pass over `n_samples` at this batch size (``whole_batches``)."""
        return whole_batches(n_samples, self.batch_size)


@dataclass
class EvalParams:
    """Statistics settings."""

    n_bootstrap: int = 2000
    ci: float = 0.95
    n_permutations: int = 2000
    alpha: float = 0.05  # significance level of the BH-adjusted p-values behind every verdict
    # a label of a multi-label task (conditions) is scored only with at least this many positives and as many
    # negatives in each of train, tuning and held_out; the others are left out before training, and listed
    min_label_positives: int = 5
    # a task that cannot be trained or evaluated (no sample in a split, fewer than min_label_positives
    # positives or negatives in a split, every condition label left out): "stop" the run before any training,
    # or "drop" it from tasks, named with its counts in the pre-flight and the report's pre-flight table
    untrainable: str = "stop"
    # the smallest difference in AUROC worth detecting: a comparison whose minimum detectable difference
    # (80 % power) is larger reads "underpowered" instead of "inconclusive"
    effect_of_interest: float = 0.02
    # null pairs of models simulated through the comparison procedure to measure its false-positive rate
    # (notebook 90; repro.evaluation.null_simulation), each with this many resamples and permutations
    null_simulations: int = 400
    null_resamples: int = 200

    def __post_init__(self) -> None:
        if self.null_simulations < 0 or self.null_resamples < 10:
            raise ParamsError(
                f"eval.null_simulations must be >= 0 and eval.null_resamples >= 10, got "
                f"{self.null_simulations}, {self.null_resamples}"
            )
        if not 0 < self.effect_of_interest < 0.5:
            raise ParamsError(f"eval.effect_of_interest must be in (0, 0.5), got {self.effect_of_interest}")
        if self.min_label_positives < 1:
            raise ParamsError(f"eval.min_label_positives must be >= 1, got {self.min_label_positives}")
        if self.untrainable not in ("stop", "drop"):
            raise ParamsError(f"eval.untrainable must be stop or drop, got {self.untrainable!r}")
        if self.n_bootstrap < 10:
            raise ParamsError(f"eval.n_bootstrap must be >= 10, got {self.n_bootstrap}")
        if self.n_permutations < 10:
            raise ParamsError(f"eval.n_permutations must be >= 10, got {self.n_permutations}")
        if not 0 < self.alpha < 0.5:
            raise ParamsError(f"eval.alpha must be in (0, 0.5), got {self.alpha}")

        if not 0.5 < self.ci < 1:
            raise ParamsError(f"eval.ci must be in (0.5, 1), got {self.ci}")


@dataclass
class EfficiencyParams:
    """H2 / H4 (repro.profiling): length sweeps, timing, the out-of-memory boundary and the long-history runs.

    Sweeps time one pretraining step (CLM or MLM) of each model at matched size on synthetic batches;
    ``allow_reference_on_cuda`` lets a model whose sequence mixer falls back to the pure-PyTorch reference on
    CUDA be timed (its rows are then labelled "reference (slow path)") and trained; otherwise a CUDA run
    without mamba_ssm's kernels stops before it starts, because that path made an earlier reproduction's
    Mamba epochs 18x slower (DESIGN.md section 11).
    """

    models: list[str] = field(
        default_factory=lambda: ["ehrmamba", "mamba2", "hybrid", "cehr_bert", "transformer", "bigbird"]
    )
    lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    warmup_steps: int = 2
    timed_steps: int = 5
    time_budget_s: float = 900.0  # per sweep; rows past it are recorded as skipped
    allow_reference_on_cuda: bool = False
    boundary_lengths: list[int] = field(
        default_factory=lambda: [4096, 8192, 16384, 32768, 65536, 131072]
    )  # H4: longest length each model trains at (batch boundary_batch_size)
    boundary_batch_size: int = 1
    long_models: list[str] = field(
        default_factory=lambda: ["ehrmamba", "cehr_bert", "bigbird", "transformer"]
    )
    long_lengths: list[int] = field(default_factory=lambda: [2048, 8192, 16384])
    long_task: str = "mortality_1m"
    long_history_tokens: int = 1024  # the long-history subgroup: full history before prediction > this
    long_batch_size: int = 8
    long_pretrain_steps: int = 0
    long_finetune_steps: int = 200
    long_seed: int = 0
    cpu_threads: int = 0  # torch threads for sweeps and H4 runs on a CPU; 0 keeps train.num_threads
    # The paper's own efficiency claim (repro.profiling.bench_paper) in notebook 02: EHRMamba 768 x 32 against
    # MultiBird at 2048 tokens, about 100 s on an H200; CUDA with mamba_ssm only, a CPU run says it was not run.
    paper_bench: bool = False
    paper_bench_max_batch: int = 512  # cap of its largest-batch search
    # H2's sweep and H4's memory boundary build EHRMamba with recompute (repro.models.mamba_inner: the
    # activations mamba_ssm's fused mamba_inner_fn keeps, nothing more), the memory of the implementation the
    # paper ran; training keeps model_sizes.ehrmamba.recompute. Rows say "+ recompute" in their kernel path.
    ehrmamba_recompute: bool = False

    def __post_init__(self) -> None:
        for name in ("models", "long_models"):
            bad = [m for m in getattr(self, name) if m not in BACKBONES]
            if bad or not getattr(self, name):
                raise ParamsError(f"efficiency.{name} has unknown entries {bad}; known: {list(BACKBONES)}")
        for name in ("lengths", "batch_sizes", "boundary_lengths", "long_lengths"):
            values = getattr(self, name)
            low = {"batch_sizes": 1, "long_lengths": 4}.get(name, 2)  # long_lengths become tokenizer.max_len
            if not values or min(values) < low or len(set(values)) != len(values):
                raise ParamsError(f"efficiency.{name} must list distinct integers >= {low}, got {values}")
        for name in ("warmup_steps", "timed_steps", "boundary_batch_size", "long_batch_size"):
            if getattr(self, name) < 1:
                raise ParamsError(f"efficiency.{name} must be >= 1, got {getattr(self, name)}")
        if self.long_finetune_steps < 1 or self.long_pretrain_steps < 0:
            raise ParamsError(
                "efficiency.long_finetune_steps must be >= 1 and efficiency.long_pretrain_steps >= 0, got "
                f"{self.long_finetune_steps}, {self.long_pretrain_steps}"
            )
        if not self.time_budget_s > 0:
            raise ParamsError(f"efficiency.time_budget_s must be > 0, got {self.time_budget_s}")
        if self.long_task not in TASK_NAMES:
            raise ParamsError(
                f"efficiency.long_task must be one of {list(TASK_NAMES)}, got {self.long_task!r}"
            )
        if self.cpu_threads < 0:
            raise ParamsError(f"efficiency.cpu_threads must be >= 0, got {self.cpu_threads}")
        if self.paper_bench_max_batch < 1:
            raise ParamsError(
                f"efficiency.paper_bench_max_batch must be >= 1, got {self.paper_bench_max_batch}"
            )
        if self.long_history_tokens < 1:
            raise ParamsError(f"efficiency.long_history_tokens must be >= 1, got {self.long_history_tokens}")


@dataclass
class ProbeParams:
    """What pretraining learned (notebook 01). Probes: each pretrained backbone's hidden states at the prediction
    time, pooled as its finetuning head pools them ("head") and as the mean over the input ("mean"), read by
    an L2 logistic regression fitted on train with C chosen on tuning by AUROC."""

    tasks: list[str] = field(default_factory=lambda: ["mortality_1m"])
    poolings: list[str] = field(default_factory=lambda: ["head", "mean"])
    grid: list[float] = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0])
    # forecasting as the paper's Table 5: the causal backbones generate the last k tokens of this many
    # held-out histories (the first ones long enough, in a fixed order); 0 skips it
    forecast_patients: int = 500
    forecast_horizons: list[int] = field(default_factory=lambda: [1, 2, 5, 10])

    def __post_init__(self) -> None:
        if self.forecast_patients < 0 or not self.forecast_horizons or min(self.forecast_horizons) < 1:
            raise ParamsError(
                "probes.forecast_patients must be >= 0 and probes.forecast_horizons list integers >= 1, got "
                f"{self.forecast_patients}, {self.forecast_horizons}"
            )
        bad = [p for p in self.poolings if p not in ("head", "mean")]
        if bad or not self.poolings:
            raise ParamsError(f"probes.poolings must list head and/or mean, got {self.poolings}")
        if not self.grid or min(self.grid) <= 0:
            raise ParamsError(f"probes.grid must list positive regularisation strengths C, got {self.grid}")


def _default_variants() -> dict[str, dict[str, Any]]:
    return {
        "10 bins": {"n_bins": 10},
        "20 bins": {"n_bins": 20},
        "unfused": {"values": "unfused"},
        "clinical bins": {"bins": "clinical"},
        "soft bins": {"values": "soft"},
        "xVal": {"values": "xval"},
        "13 gap bins": {"time_tokens": "fixed13"},
    }


@dataclass
class RepresentationParams:
    """Notebook 05: the same models trained under other input representations (tokenizer overrides).

    Each variant is a mapping of `tokenizer.*` fields that replace the run's tokenizer; the run's own
    tokenizer is the reference ("default"). Every variant keeps the run's max_len, steps and batch size
    (the same token budget), and the tokenizer of each is fit on the train split alone.
    """

    variants: dict[str, dict[str, Any]] = field(default_factory=_default_variants)
    models: list[str] = field(default_factory=lambda: ["ehrmamba", "transformer"])
    tasks: list[str] = field(default_factory=lambda: ["mortality_1m"])
    seeds: list[int] = field(default_factory=lambda: [0])

    def __post_init__(self) -> None:
        if "default" in self.variants:
            raise ParamsError(
                "representations.variants: 'default' is the run's own tokenizer; use another name"
            )
        allowed = {f.name for f in dataclasses.fields(TokenizerParams)} - {"max_len"}
        for name, overrides in self.variants.items():
            if not isinstance(overrides, dict):
                raise ParamsError(f"representations.variants.{name} must be a mapping of tokenizer fields")
            bad = sorted(set(overrides) - allowed)
            if bad:
                raise ParamsError(
                    f"representations.variants.{name}: unknown tokenizer field(s) {bad} "
                    f"(max_len is the shared token budget); known: {sorted(allowed)}"
                )
        bad = [m for m in self.models if m not in BACKBONES]
        if bad or not self.models:
            raise ParamsError(f"representations.models has unknown entries {bad}; known: {list(BACKBONES)}")
        if "ehrmamba" not in self.models:
            raise ParamsError(
                "representations.models must include ehrmamba: comparisons are against its default"
            )
        bad = [t for t in self.tasks if t not in TASK_NAMES]
        if bad or not self.tasks:
            raise ParamsError(f"representations.tasks has unknown entries {bad}; known: {list(TASK_NAMES)}")
        if not self.seeds:
            raise ParamsError("representations.seeds must list at least one seed")

    def tokenizer(self, base: TokenizerParams, variant: str) -> TokenizerParams:
        """The run's tokenizer with `variant`'s overrides ("default": unchanged), validated."""
        if variant == "default":
            return base
        try:
            return dataclasses.replace(base, **self.variants[variant])
        except ParamsError as exc:
            raise ParamsError(f"representations.variants.{variant}: {exc}") from None


COMBINE = ("all", "any", "majority")
# the hypotheses whose verdict combines comparison verdicts by a written rule (params `hypotheses`)
HYPOTHESES = ("H1", "H1 (all)", "H2", "H2 (all)", "H3", "H4 (accuracy)", "H5")
TASKLESS_HYPOTHESES = ("H2", "H2 (all)")  # timing comparisons: per batch size, not per task


@dataclass
class HypothesisRule:
    """How one hypothesis is decided: its primary comparisons ("new-baseline@task", or "new-baseline" for
    every task or batch size of the family, as H2's timing comparisons have no task; empty: every comparison
    of its family), the family over which Benjamini-Hochberg adjusts (in words, as the notebook forms it),
    how the comparison verdicts combine (all / any / majority) and why."""

    primary: list[str] = field(default_factory=list)
    combine: str = "any"
    family: str = ""
    why: str = ""

    def __post_init__(self) -> None:
        if self.combine not in COMBINE:
            raise ParamsError(f"combine must be one of {list(COMBINE)}, got {self.combine!r}")
        self.pairs()

    def pairs(self) -> list[tuple[str, str, str]]:
        """The primary comparisons as (new, baseline, task); task "" stands for every task or batch size."""
        out = []
        for entry in self.primary:
            models, at, task = entry.partition("@")
            new, _, base = models.partition("-")
            if not (new and base) or (at and not task) or new not in MODEL_NAMES or base not in MODEL_NAMES:
                raise ParamsError(
                    f"primary comparison {entry!r} must read new-baseline@task (or new-baseline) with known "
                    "models"
                )
            if at and task not in TASK_NAMES:
                raise ParamsError(f"primary comparison {entry!r}: unknown task {task!r}")
            out.append((new, base, task))
        return out


def default_hypotheses() -> dict[str, HypothesisRule]:
    """The report's rules; a params file overrides any of them by name."""
    h1_family = (
        "notebook 01: EHRMamba against each other model on each task (the null task is its own family)"
    )
    return {
        "H1": HypothesisRule(
            ["ehrmamba-cehr_bert@mortality_1m"],
            "all",
            h1_family,
            "the paper's headline: EHRMamba beats CEHR-BERT on mortality",
        ),
        "H1 (all)": HypothesisRule(
            [], "all", h1_family, "EHRMamba beats every other model on every task needs every comparison"
        ),
        "H2": HypothesisRule(
            ["ehrmamba-bigbird"],
            "all",
            "none: ratios of measured time and memory, no test",
            "the paper's efficiency claim (Appendix C.3) is EHRMamba against MultiBird, whose attention is "
            "BigBird's; at every batch size swept",
        ),
        "H2 (all)": HypothesisRule(
            [],
            "all",
            "none: ratios of measured time and memory, no test",
            "faster and smaller than every Transformer needs every comparison: one that is as fast, or "
            "larger, is not beaten",
        ),
        "H3": HypothesisRule(
            [],
            "any",
            "notebook 03: each backbone's MPF run against its single-task runs, per task",
            "per backbone: MPF helps when it helps on some task and hurts on none",
        ),
        "H4 (accuracy)": HypothesisRule(
            [],
            "any",
            "notebook 04: EHRMamba at its longest length against each Transformer at its longest, long histories",
            "EHRMamba reads long histories better when it beats some Transformer there and loses to none",
        ),
        "H5": HypothesisRule(
            [],
            "any",
            "notebook 05: each representation and model against EHRMamba with the default tokens",
            "some representation beats the default when one comparison is supported and none contradicts it",
        ),
    }


@dataclass
class RunParams:
    """One named run: everything a notebook needs to reproduce its numbers."""

    name: str = "smoke"
    device: str = "auto"
    seeds: list[int] = field(default_factory=lambda: [0])
    tasks: list[str] = field(default_factory=lambda: list(OUR_TASKS))
    models: list[str] = field(default_factory=lambda: list(MODEL_NAMES))
    model_sizes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # tokens a backbone reads, the most recent of its history (the paper fed CEHR-BERT and the LSTM 512 and
    # the others 2048); at most tokenizer.max_len, which every backbone left out reads and counts + LR counts
    input_lengths: dict[str, int] = field(default_factory=dict)
    match_params: bool = True  # comparison presets: other backbones matched to EHRMamba's count (10 %)
    mpf_models: list[str] = field(default_factory=lambda: ["ehrmamba", "cehr_bert"])
    data: DataParams = field(default_factory=DataParams)
    tokenizer: TokenizerParams = field(default_factory=TokenizerParams)
    train: TrainParams = field(default_factory=TrainParams)
    eval: EvalParams = field(default_factory=EvalParams)
    efficiency: EfficiencyParams = field(default_factory=EfficiencyParams)
    representations: RepresentationParams = field(default_factory=RepresentationParams)
    probes: ProbeParams = field(default_factory=ProbeParams)
    # notebooks `repro run` may execute at once (see pipeline.STAGES); the timing notebooks always run alone
    notebook_jobs: int = 1
    # NVIDIA's Multi-Process Service while training processes share a GPU (repro.training.mps): auto uses it
    # where the daemon runs and says why not otherwise, required stops without it, never shares by turns
    mps: str = "auto"
    # how each hypothesis combines its comparisons (HypothesisRule); a named rule replaces its default whole,
    # names left out keep their defaults
    hypotheses: dict[str, HypothesisRule] = field(default_factory=default_hypotheses)

    def __post_init__(self) -> None:
        bad = [h for h in self.hypotheses if h not in HYPOTHESES]
        if bad:
            raise ParamsError(f"hypotheses has unknown entries {bad}; known: {list(HYPOTHESES)}")
        self.hypotheses = default_hypotheses() | self.hypotheses
        for name, rule in self.hypotheses.items():
            timing = name in TASKLESS_HYPOTHESES  # H2's comparisons are per batch size, with no task
            wrong = [e for e in rule.primary if ("@" in e) == timing]
            if wrong:
                need = "new-baseline, without @task" if timing else "new-baseline@task"
                raise ParamsError(f"hypotheses.{name}: primary comparison {wrong[0]!r} must read {need}")
        if self.notebook_jobs < 1:
            raise ParamsError(f"notebook_jobs must be >= 1, got {self.notebook_jobs}")
        if self.mps not in ("auto", "required", "never"):
            raise ParamsError(f"mps must be auto, required or never, got {self.mps!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ParamsError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if not self.seeds:
            raise ParamsError("seeds must list at least one seed")
        bad = [t for t in self.tasks if t not in TASK_NAMES]
        if bad or not self.tasks:
            raise ParamsError(f"tasks has unknown entries {bad}; known: {list(TASK_NAMES)}")
        bad = [m for m in self.models if m not in MODEL_NAMES]
        if bad or not self.models:
            raise ParamsError(f"models has unknown entries {bad}; known: {list(MODEL_NAMES)}")
        bad = [m for m in self.model_sizes if m not in BACKBONES]
        if bad:
            raise ParamsError(f"model_sizes has unknown models {bad}; known: {list(BACKBONES)}")
        bad = [m for m in self.input_lengths if m not in BACKBONES]
        if bad:
            raise ParamsError(f"input_lengths has unknown models {bad}; known: {list(BACKBONES)}")
        for model, n in self.input_lengths.items():
            if not isinstance(n, int) or not 4 <= n <= self.tokenizer.max_len:
                raise ParamsError(
                    f"input_lengths.{model} must be a whole number of tokens in [4, tokenizer.max_len = "
                    f"{self.tokenizer.max_len}], got {n!r}"
                )
        bad = [m for m in self.mpf_models if m not in BACKBONES]
        if bad:
            raise ParamsError(f"mpf_models has unknown backbones {bad}; known: {list(BACKBONES)}")
        bad = [t for t in self.representations.tasks if t not in self.tasks]
        if bad:
            raise ParamsError(f"representations.tasks {bad} must be among tasks {self.tasks}")
        for variant in self.representations.variants:
            self.representations.tokenizer(self.tokenizer, variant)  # a bad override fails here, not in 05
        bad = [t for t in self.probes.tasks if t not in self.tasks]
        if bad:
            raise ParamsError(f"probes.tasks {bad} must be among tasks {self.tasks}")
        if self.efficiency.long_task not in self.tasks:
            raise ParamsError(
                f"efficiency.long_task {self.efficiency.long_task!r} must be one of tasks {self.tasks}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, the inverse of `from_dict`."""
        return asdict(self)

    def hash(self) -> str:
        """Short stable hash of every parameter, for manifests and caches."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, recursing into nested dataclasses, rejecting unknown keys."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{where or 'params'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ParamsError(f"unknown parameter {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in raw.items():
        hint = hints[key]
        path = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, path)
        else:
            kwargs[key] = _check_type(value, hint, path)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - dataclass signature mismatch
        raise ParamsError(f"{where or 'params'}: {exc}") from exc


def _build_named(cls: type, value: Any, path: str) -> Any:
    """A mapping's dataclass value (a hypothesis rule), its errors prefixed with where it sits."""
    if isinstance(value, cls):
        return value
    try:
        return _build(cls, value, path)
    except ParamsError as exc:
        msg = str(exc)
        raise ParamsError(msg if path in msg else f"{path}: {msg}") from None


def _check_type(value: Any, hint: Any, path: str) -> Any:
    """Coerce YAML scalars to the annotated type, naming the parameter when impossible."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{path} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{path} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{path} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ParamsError(f"{path} must be a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{path} must be a list, got {value!r}")
        return [_check_type(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{path} must be a mapping, got {value!r}")
        if dataclasses.is_dataclass(args[1]):
            return {k: _build_named(args[1], v, f"{path}.{k}") for k, v in value.items()}
        return {k: _check_type(v, args[1], f"{path}.{k}") for k, v in value.items()}
    return value


def from_dict(raw: dict[str, Any]) -> RunParams:
    """Validated `RunParams` from a plain mapping (e.g. a notebook's parameters cell)."""
    return _build(RunParams, raw, "")


def load_params(path: str | Path, overrides: dict[str, Any] | None = None) -> RunParams:
    """Read a params YAML file; `overrides` (dotted keys) win. Errors name the file and parameter.

    >>> load_params("params/smoke.yaml").name
    'smoke'
    >>> load_params("params/smoke.yaml", {"train.batch_size": 0})
    Traceback (most recent call last):
    ...
    repro.config.ParamsError: params/smoke.yaml: train.batch_size must be >= 1, got 0
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({exc})") from exc
    for key, value in (overrides or {}).items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return from_dict(raw)
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from exc


def with_seeds(params_file: str | Path, seeds: list[int], out_dir: str | Path) -> Path:
    """A copy of `params_file` with other training `seeds`, written as out_dir/<stem>-seeds-<a>-<b>.yaml.

    Why: a verdict is provisional until a second run of the same experiment agrees, and that run needs
    other seeds (GPU training is not bitwise repeatable, but seeds that repeat are not new draws either);
    `repro compare` pools the two runs' seeds. Every other parameter is the original's; the copy says where
    it came from. Written atomically; errors name the file."""
    src = resolve(params_file)
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ParamsError(f"--seeds must list distinct seeds, got {seeds}")
    load_params(src, {"seeds": list(seeds)})  # the variant must be valid before it is written
    raw = yaml.safe_load(src.read_text()) or {}
    stem = f"{src.stem}-seeds-{'-'.join(str(s) for s in seeds)}"
    raw |= {"name": stem, "seeds": [int(s) for s in seeds]}
    out = Path(out_dir) / f"{stem}.yaml"
    header = (
        f"# written by `repro run --seeds` from {params_file}: only name and seeds differ; edit that file\n"
    )
    write_text_atomic(out, header + yaml.safe_dump(raw, sort_keys=False))
    return out


def project_root(start: Path | None = None) -> Path:
    """The directory holding pyproject.toml, so notebooks opened from notebooks/ find params/ too."""
    here = (start or Path.cwd()).resolve()
    for p in (here, *here.parents):
        if (p / "pyproject.toml").is_file() and (p / "repro").is_dir():
            return p
    return Path.cwd().resolve()


def resolve(path: str | Path) -> Path:
    """A path relative to the project root unless absolute."""
    p = Path(path)
    return p if p.is_absolute() else project_root() / p


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A fresh temporary path beside `path` that replaces `path` only when the block ends without error.

    A killed or failing writer leaves the old file (or none), never half a new one; the temporary is
    unique per call, so two processes writing the same file never write into each other's, and hidden
    (``.name.*.tmp``), so no glob for the real files picks it up. The file gets the permissions the
    process's umask gives a new file, so a restrictive umask keeps checkpoints of real data private.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # created as open() creates a file (0666 less the umask, which the kernel applies), where mkstemp's
    # 0600 would survive the rename; O_EXCL keeps the name this call's own
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """`Path.write_text` through `atomic_path`: a reader (or a killed writer) never sees half the text."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def load_run_params(params_file: str | Path, data_dir: str | None = None) -> RunParams:
    """Params of a notebook run; `data_dir` (the CLI's --data) switches to real-data mode."""
    params = load_params(resolve(params_file))
    if data_dir:
        params.data.synthetic = False
        params.data.meds_dir = str(data_dir)
    if not params.data.synthetic and not params.data.meds_dir:
        raise ParamsError(
            f"{params_file}: data.synthetic is false but data.meds_dir is not set; pass --data MEDS_DIR"
        )
    return params
