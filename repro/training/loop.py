"""Pretraining (CLM / MLM) and finetuning loops with checkpoints that resume to the same result.

Each step's batch is a pure function of (seed, step) and the checkpoint carries the optimiser,
scheduler and torch RNG states, so a run killed at step k and resumed ends where an uninterrupted run
ends. AdamW, linear warmup then linear decay, gradient clipping, bf16 autocast on CUDA.

Under torchrun (a process group of N ranks) `fit` trains with PyTorch's DistributedDataParallel: every
rank draws the same global batch, keeps its rows ``rank::N``, and the loss is the global batch's sum over
tokens (or outputs) divided by their global count, so N processes take the same steps as one process with
the same global batch (tests/test_ddp.py; with dropout, masks are drawn per rank, so runs agree in
distribution rather than to rounding). Rank 0 alone logs and writes checkpoints; every rank resumes
from them. `python -m repro.training.ddp` pretrains one backbone this way (`torchrun --nproc_per_node=N -m
repro.training.ddp --params ... --model ehrmamba --out ckpt.pt`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from repro.config import TrainParams, atomic_path
from repro.data.dataset import IGNORE, SequenceDataset, batch_indices, clm_labels, collate, mlm_mask
from repro.training.graphs import GraphedSteps, graph_safe


@dataclass
class TrainResult:
    """What a training loop did: losses per step, validations, the step whose weights were kept and why it
    stopped, wall time and tokens of this process's steps."""

    objective: str
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps_run: int = 0
    resumed_from: int = 0
    tokens: int = 0  # tokens of every step taken (resumed runs included)
    budget: int = 0  # steps the budget allowed
    epochs: float = 0.0  # passes over the training samples actually made
    val: list[dict[str, float]] = field(default_factory=list)  # step, tokens, loss (+ auroc when finetuning)
    metric: str = "loss"  # what picks the best step: "loss" (lower is better) or "auroc"
    best_step: int = 0  # 0: no validation (the last weights are kept)
    stop: str = "budget"  # "early stop" (patience ran out) or "budget"
    graphs: int = 0  # batch shapes whose step ran as a captured CUDA graph (train.cuda_graphs)
    warmup_frac: float = 0.0  # of the budget's schedule (linear warmup, then linear decay to zero)

    def tail_start(self, tail: float = 0.2) -> float:
        """The step where the plateau rule's tail begins: the steps that carried the last `tail` of the
        learning rate the budget's schedule hands out, and at least the last `tail` of the steps validated.

        Why: the rate decays linearly to zero, so the last 20 % of steps move the weights by about 4 % of
        the schedule's total; a run cut off by its budget would look flat there whether or not it had
        learned what it could. Under linear decay the last 20 % of the rate is the last 45 % of the steps.

        >>> TrainResult("clm", budget=1000, val=[{"step": 1000, "loss": 1.0}]).tail_start()
        554.0
        """
        last = float(self.val[-1]["step"])
        if self.budget <= 0:
            return (1 - tail) * last
        rate = _rate(np.arange(self.budget), self.budget, self.warmup_frac)
        remaining = np.cumsum(rate[::-1])[::-1]  # the rate still to come from each step on
        start = float(np.argmax(remaining <= tail * remaining[0]))
        return min(start, (1 - tail) * last)

    def converged(self, tail: float = 0.2, tol: float = 0.005) -> bool:
        """Whether the run ended on its plateau: it stopped early, or its best validation metric improved by
        less than `tol` (relative) over the steps that carried its last `tail` of the learning rate
        (``tail_start``)."""
        if self.stop == "early stop":
            return True
        if len(self.val) < 2:
            return False
        sign = -1.0 if self.metric == "loss" else 1.0
        start = self.tail_start(tail)
        before = [sign * v[self.metric] for v in self.val if v["step"] <= start]
        if not before:
            return False
        best_before, best = max(before), max(sign * v[self.metric] for v in self.val)
        return best - best_before <= tol * abs(best_before)

    @property
    def status(self) -> str:
        """The training table's word on how the run ended."""
        if self.stop == "early stop":
            return (
                "early stop (best at the first validation)" if self.best_at_first_validation else "early stop"
            )
        return "plateau at budget" if self.converged() else "budget (still improving)"

    @property
    def best_at_first_validation(self) -> bool:
        """Whether the kept weights are the first validation's: the peak may lie before it (validate more
        often to see it)."""
        return bool(self.val) and self.best_step == min(v["step"] for v in self.val)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without it is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was requested but torch.cuda.is_available() is False")
    return torch.device(name)


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x


def _rate(step: np.ndarray, total: int, warmup_frac: float) -> np.ndarray:
    """The learning-rate multiplier at each step: linear warmup, then linear decay to zero at `total`."""
    warmup = max(1, int(total * warmup_frac))
    return np.where(
        step < warmup, (step + 1) / warmup, np.maximum(0.0, (total - step) / max(1, total - warmup))
    )


def _schedule(total: int, warmup_frac: float):
    def f(step: int) -> float:
        return float(_rate(np.asarray(step), total, warmup_frac))

    return f


# On CUDA, batches are padded to a multiple of this: a few distinct shapes instead of one per batch, so
# kernels tuned or compiled per shape (Triton autotuning in Mamba2's SSD, cuDNN / cuBLAS heuristics) are
# chosen once. Padding is masked everywhere, so results do not depend on it.
CUDA_PAD_MULTIPLE = 64


# Losses stay on the GPU and are read back (one host sync) every this many steps, at checkpoints and at
# the end: a per-step `float(loss)` makes the CPU wait for the GPU before it can collate the next batch.
LOSS_READ_EVERY = 25


def _padding(model: torch.nn.Module, device: torch.device) -> dict[str, int | None]:
    """collate's padding arguments: a multiple on CUDA, capped by a length-bound backbone's max_len."""
    if device.type != "cuda":
        return {"pad_to": 1, "max_length": None}
    return {
        "pad_to": CUDA_PAD_MULTIPLE,
        "max_length": getattr(getattr(model, "backbone", model), "max_len", None),
    }


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cuda":  # pinned host memory makes the copy asynchronous
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def _autocast(device: torch.device, cache: bool = True):
    """bf16 on CUDA; ``cache=False`` for a step a CUDA graph captures (capture forbids the weight cache)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return torch.autocast("cpu", enabled=False)


def _save(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _row_losses(
    net: torch.nn.Module, batch: dict[str, torch.Tensor], objective: str, values: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the per-token / per-output losses, their count), one of each per row of the batch.

    Per row so that a held-out loss can be resampled by patient (``row_losses``); training sums them
    (``_loss_sum``). The model is called through ``forward(batch, head)`` (DDP's hook). ``values`` (xVal):
    the numeric head's squared error on each numeric target is added to the row's sum, so a number weighs
    as much as one token's cross-entropy.
    """
    if objective == "clm":
        if values:
            logits, pred = net(batch, head="lm+value")
            mask = (batch["value_mask"] * batch["attention_mask"])[:, 1:]
            mse = ((pred[:, :-1].float() - batch["values"][:, 1:]) ** 2 * mask).sum(1)
        else:
            logits, mse = net(batch, head="lm"), 0.0
        labels = clm_labels(batch["input_ids"], batch["attention_mask"])[:, 1:]
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=IGNORE,
            reduction="none",
        ).view(labels.shape)
        return loss.sum(1) + mse, (labels != IGNORE).sum(1)
    if objective == "mlm":
        if values:
            logits, pred = net(batch, head="lm+value")
            mse = ((pred.float() - batch["value_target"]) ** 2 * batch["value_target_mask"]).sum(1)
            mse = mse + pred.sum() * 0.0
        else:
            logits, mse = net(batch, head="lm"), 0.0
        labels = batch["mlm_labels"]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=IGNORE,
            reduction="none",
        ).view(labels.shape)
        # the zero term keeps every output in the graph
        return loss.sum(1) + mse + logits.sum() * 0.0, (labels != IGNORE).sum(1)
    if objective == "classify":
        logits = net(batch, head="cls").float()
        labels = batch["labels"]
        loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        if loss.dim() == 1:
            loss = loss[:, None]
        if "label_mask" not in batch:
            return loss.sum(1), torch.full((loss.shape[0],), loss.shape[1], device=loss.device)
        mask = batch["label_mask"].view(loss.shape)  # MPF: only the columns of each sample's task count
        return (loss * mask).sum(1), mask.sum(1)
    raise ValueError(f"unknown objective {objective!r}")


def _loss_sum(
    net: torch.nn.Module, batch: dict[str, torch.Tensor], objective: str, values: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the per-token / per-output losses, their count) of this process's rows.

    Sums, not means, so that ranks holding different numbers of tokens still give the global batch's mean
    once divided by the global count.
    """
    rows, count = _row_losses(net, batch, objective, values)
    return rows.sum(), count.sum()


def _global_batch(
    data: SequenceDataset,
    idx: np.ndarray,
    objective: str,
    vocab_size: int,
    gen: torch.Generator,
    p: float,
    padding: dict[str, int | None] | None = None,
) -> dict[str, torch.Tensor]:
    """The step's whole batch on the CPU, MLM corruption drawn on all of it (so it does not depend on N)."""
    batch = collate([data[int(i)] for i in idx], **(padding or {}))
    if objective == "mlm":
        batch["input_ids"], batch["mlm_labels"] = mlm_mask(batch["input_ids"], vocab_size, p, gen)
        hide_values(batch)
    return batch


def run_key(
    data: SequenceDataset,
    params: TrainParams,
    objective: str,
    steps: int,
    lr: float,
    seed: int,
    spec: dict | None,
    val: SequenceDataset | None = None,
) -> str:
    """A hash of everything that changes a run's weights: the training settings, objective, steps, learning
    rate, seed, the model's build arguments and the samples themselves (every token id, label and mask, of
    the training and of the validation set that picks the kept step), so a checkpoint is resumed only by the
    run that wrote it.
    """
    import hashlib
    import json
    from dataclasses import asdict

    h = hashlib.sha256()
    settings = {"train": asdict(params), "objective": objective, "steps": steps, "lr": lr, "seed": seed}
    h.update(json.dumps(settings | {"spec": spec or {}}, sort_keys=True, default=str).encode())
    for ds in (data, val):
        if ds is None:
            h.update(b"no validation")
            continue
        for e in ds.items:
            for value in vars(e).values():
                if isinstance(value, np.ndarray):
                    h.update(np.ascontiguousarray(value).tobytes())
        for extra in (ds.labels, ds.mask):
            if extra is not None:
                h.update(np.ascontiguousarray(extra).tobytes())
    return h.hexdigest()[:16]


def val_subset(data: SequenceDataset, n: int, seed: int = 0) -> SequenceDataset:
    """At most `n` samples of `data`, a fixed random subset (the same at every validation and on resume)."""
    if len(data) <= n:
        return data
    keep = np.sort(np.random.default_rng(seed).choice(len(data), size=n, replace=False))
    labels = None if data.labels is None else data.labels[keep]
    mask = None if data.mask is None else data.mask[keep]
    return SequenceDataset([data.items[int(i)] for i in keep], labels, mask)


# MLM validation masks come from this seed, so every validation of a run scores the same corruption
VAL_MASK_SEED = 20_240_601


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    val: SequenceDataset,
    objective: str,
    device: torch.device,
    batch_size: int,
    mlm_probability: float = 0.15,
) -> dict[str, float]:
    """Validation loss of `objective` on `val` (mean per token, or per output when classifying), plus the
    mean AUROC over output columns that hold both classes when classifying."""
    if objective == "classify":
        probs = predict(model, val, device, batch_size)
        labels = val.labels
        mask = np.ones_like(labels) if val.mask is None else val.mask
        p = np.clip(probs, 1e-7, 1 - 1e-7)
        bce = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
        out = {"loss": float((bce * mask).sum() / max(mask.sum(), 1.0))}
        from sklearn.metrics import roc_auc_score

        aucs = []
        for j in range(labels.shape[1]):
            rows = mask[:, j] > 0
            y = labels[rows, j]
            if 0 < y.sum() < len(y):
                aucs.append(roc_auc_score(y, probs[rows, j]))
        out["auroc"] = float(np.mean(aucs)) if aucs else float("nan")
        return out
    model.eval()
    gen = torch.Generator().manual_seed(VAL_MASK_SEED)
    vocab_size = int(getattr(model, "vocab_size", 0) or 0)
    values = getattr(model, "value_head", None) is not None
    padding = _padding(model, device)
    order = np.argsort(val.lengths(), kind="stable")
    total = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = _to(_global_batch(val, idx, objective, vocab_size, gen, mlm_probability, padding), device)
        with _autocast(device):
            loss_sum, n = _loss_sum(model, batch, objective, values)
        total += loss_sum.float()
        count += n.float()
    model.train()
    return {"loss": float(total / count.clamp_min(1.0))}


@torch.no_grad()
def row_losses(
    model: torch.nn.Module,
    data: SequenceDataset,
    objective: str,
    device: torch.device,
    batch_size: int,
    mlm_probability: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:
    """(token cross-entropy sum, scored tokens) per sample of ``data``, in its order, under ``objective``
    (clm or mlm): what a held-out loss, its perplexity and its patient bootstrap are computed from (an xVal
    model's value error is left out: it is not a token loss). The MLM corruption is drawn with the
    validation seed, so every model and run sees the same masks."""
    model.eval()
    gen = torch.Generator().manual_seed(VAL_MASK_SEED)
    vocab_size = int(getattr(model, "vocab_size", 0) or 0)
    padding = _padding(model, device)
    order = np.argsort(data.lengths(), kind="stable")
    sums, counts = np.zeros(len(data)), np.zeros(len(data))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = _to(_global_batch(data, idx, objective, vocab_size, gen, mlm_probability, padding), device)
        with _autocast(device):
            loss, n = _row_losses(model, batch, objective)  # token cross-entropy only, no xVal value error
        sums[idx], counts[idx] = loss.float().cpu().numpy(), n.float().cpu().numpy()
    model.train()
    return sums, counts


def unigram_losses(
    train: Sequence[np.ndarray], held: Sequence[np.ndarray], vocab_size: int, objective: str, n_specials: int
) -> tuple[np.ndarray, np.ndarray]:
    """(loss sum, scored tokens) per held-out sample of a model that knows only the train split's token
    frequencies (add-one smoothed): the perplexity a pretrained backbone must beat to have learned anything
    about context. It scores the tokens each objective scores: every token after the first (CLM), every
    non-special token (MLM; all of them, not a masked sample: the expected loss per token is the same).

    >>> s, n = unigram_losses([np.array([5, 6, 6])], [np.array([5, 6])], 7, "clm", 4)
    >>> n.tolist(), round(float(s[0]), 3)  # token 6 scored; train scored 6, 6: p = (2 + 1) / (2 + 7)
    ([1.0], 1.099)
    """
    if objective not in ("clm", "mlm"):
        raise ValueError(f"objective must be 'clm' or 'mlm', got {objective!r}")

    def scored(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        return ids[1:] if objective == "clm" else ids[ids >= n_specials]

    counts = np.ones(vocab_size)  # add-one
    for ids in train:
        counts += np.bincount(scored(ids), minlength=vocab_size)[:vocab_size]
    if objective == "mlm":
        counts[:n_specials] = 0.0  # never a target
    nll = -np.log(np.where(counts > 0, counts, 1.0) / counts.sum())
    tokens = [scored(ids) for ids in held]
    return np.array([nll[t].sum() for t in tokens]), np.array([float(len(t)) for t in tokens])


def _fixed_norm(data: SequenceDataset, params: TrainParams) -> float:
    """Finetuning on batches cut by tokens: the outputs of an average step of `batch_size` rows, the loss's
    divisor at every step. A step's own count would weigh a sample by 1 / (its batch's rows), so a long
    history, which comes in a batch of few rows, would count many times a short one; with a fixed divisor
    every sample weighs the same, as with batches of equal rows. Pretraining keeps its per-token mean: its
    steps hold about equal tokens, so every token already weighs about the same."""
    per_row = float(data.mask.sum(1).mean()) if data.mask is not None else float(data.labels.shape[1])
    return min(params.batch_size, len(data)) * per_row


def decay_groups(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(decayed, not decayed) trainable parameters: weight decay only on matrices, never on vectors (norms,
    biases) nor on a parameter flagged `_no_weight_decay` (Mamba's A_log and D, Mamba2's dt_bias), as
    mamba_ssm and Hugging Face leave them: decaying A_log pulls every state's decay rate toward one value.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            keep = p.ndim >= 2 and not getattr(p, "_no_weight_decay", False)
            (decay if keep else no_decay).append(p)
    return decay, no_decay


def hide_values(batch: dict[str, torch.Tensor]) -> None:
    """MLM: a corrupted position must not keep what its value arrays say about the hidden token.

    Soft discretization's neighbour bin names the same code, and xVal's value is the regression target; both
    are cleared there. The xVal targets are kept as ``value_target`` / ``value_target_mask``.
    """
    chosen = batch["mlm_labels"] != IGNORE
    if "value_mask" in batch:
        batch["value_target"] = batch["values"].clone()
        batch["value_target_mask"] = batch["value_mask"] * chosen
        batch["values"] = batch["values"].masked_fill(chosen, 0.0)
        batch["value_mask"] = batch["value_mask"].masked_fill(chosen, 0.0)
    if "mix_w" in batch:
        batch["mix_w"] = batch["mix_w"].masked_fill(chosen, 0.0)
        batch["mix_ids"] = torch.where(batch["mix_w"] > 0, batch["mix_ids"], batch["input_ids"])


def fit(
    model: torch.nn.Module,
    data: SequenceDataset,
    params: TrainParams,
    objective: str,
    steps: int,
    lr: float,
    seed: int,
    device: torch.device,
    checkpoint: Path | None = None,
    spec: dict[str, Any] | None = None,
    progress: bool = True,
    desc: str = "",
    val: SequenceDataset | None = None,
) -> TrainResult:
    """Train `model` for at most `steps` steps of `objective` ("clm", "mlm" or "classify"), resuming from
    `checkpoint`; with `val`, validate every epoch / `params.val_per_epoch` steps and at the end, stop after
    `params.patience_for(objective)` validations without improvement and leave the model holding its best
    validated weights.

    `spec` (the model's build arguments) is stored in the checkpoint so it can rebuild the model.
    """
    if len(data) == 0:
        raise ValueError(f"{desc or objective}: no training samples")
    rank, world = dist_info()
    if min(params.batch_size, len(data)) < world:
        raise ValueError(
            f"{desc or objective}: a global batch of {min(params.batch_size, len(data))} rows "
            f"cannot feed {world} processes"
        )
    model.to(device)
    decay, no_decay = decay_groups(model)
    # CUDA graphs (repro.training.graphs): AdamW steps on the device, its rate a tensor the scheduler fills
    graphed = params.cuda_graphs and device.type == "cuda" and world == 1 and graph_safe(model)
    groups = [
        {"params": decay, "weight_decay": params.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if graphed:  # one rate tensor per group, as a loaded checkpoint gives them
        groups = [g | {"lr": torch.tensor(lr, device=device)} for g in groups]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda", capturable=graphed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps, params.warmup_frac))
    metric = "auroc" if objective == "classify" else "loss"
    patience = params.patience_for(objective)
    result = TrainResult(objective=objective, budget=steps, metric=metric, warmup_frac=params.warmup_frac)
    per_epoch = params.steps_per_epoch(len(data))
    every = max(1, round(per_epoch / params.val_per_epoch))
    key = run_key(data, params, objective, steps, lr, seed, spec, val)
    start = 0
    best: dict[str, torch.Tensor] | None = None  # the best validated weights, on the CPU
    bad = 0  # validations since the best
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if checkpoint is not None and checkpoint.is_file():
        # on the CPU: the RNG states must stay CPU byte tensors (torch.set_rng_state refuses CUDA ones);
        # load_state_dict moves the weights and the optimizer state to the model's device
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if state.get("key") != key:
            # trained under other settings or data (another learning rate, tokenizer, cohort): its weights
            # are not this run's, so the run starts afresh and overwrites the file at its first save
            print(f"{desc or objective}: {checkpoint} was trained under other settings; not resumed")
        else:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            gen.set_state(state["mlm_rng"])
            start = int(state["step"])
            result.losses = list(state["losses"])
            result.val = list(state.get("val", []))
            result.tokens = int(state.get("tokens", 0))
            result.best_step = int(state.get("best_step", 0))
            result.stop = state.get("stop", "budget")
            result.seconds = float(state.get("seconds", 0.0))  # the time already spent, for tokens/s
            result.graphs = int(state.get("graphs", 0))  # a finished run reloaded elsewhere captures none
            result.resumed_from = start
            best, bad = state.get("best_model"), int(state.get("bad", 0))
            if graphed:  # the loaded rate must be the device tensor a captured AdamW step reads
                for group in opt.param_groups:
                    group["lr"] = torch.as_tensor(group["lr"], dtype=torch.float32).to(device)
    vocab_size = int(getattr(model, "vocab_size", 0) or 0)
    values = objective in ("clm", "mlm") and getattr(model, "value_head", None) is not None
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # the heads not on this objective's path (the LM head while finetuning, the classifier while
        # pretraining) get no gradient: DDP must be told, or it waits for them
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    model.train()
    t0, spent = time.perf_counter(), result.seconds
    bar = tqdm(
        range(start, steps),
        desc=desc or objective,
        disable=not progress or rank != 0,
        leave=False,
        initial=start,
        total=steps,
    )
    pending: list[torch.Tensor] = []  # logged losses not yet read back from the device

    def read_losses() -> None:
        if not pending:
            return
        values = torch.stack(pending).tolist()
        first = len(result.losses)
        pending.clear()
        result.losses.extend(values)
        bad_at = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad_at:
            raise FloatingPointError(
                f"{desc or objective}: loss is {values[bad_at[0]]} at step {first + bad_at[0]}"
            )
        bar.set_postfix(loss=f"{values[-1]:.3f}")

    def check(done: int) -> bool:
        """Validate at step `done`; keep the weights when best; True when patience has run out."""
        nonlocal best, bad
        scores = validate(model, val, objective, device, params.eval_batch_size, params.mlm_probability)
        result.val.append({"step": done, "tokens": result.tokens, **scores})
        value = scores[metric]
        past = [v[metric] for v in result.val[:-1]]
        if not past:
            improved = True
        elif metric == "loss":
            improved = value < min(past) - params.min_delta * abs(min(past))
        else:
            improved = value > max(past) + params.min_delta * abs(max(past))
        if improved or best is None:
            best = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            result.best_step, bad = done, 0
        else:
            bad += 1
        stop = patience > 0 and bad >= patience
        if world > 1:  # rank 0 decides, so ranks whose bf16 sums differ in the last bit still agree
            flag = torch.tensor([float(stop)], device=device)
            torch.distributed.broadcast(flag, 0)
            stop = bool(flag.item())
        return stop

    def save(done: int) -> None:
        _save(
            checkpoint,
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "mlm_rng": gen.get_state(),
                "step": done,
                "steps": steps,
                "objective": objective,
                "losses": result.losses,
                "val": result.val,
                "tokens": result.tokens,
                "best_model": best,
                "best_step": result.best_step,
                "bad": bad,
                "stop": result.stop,
                "seconds": spent + time.perf_counter() - t0,
                "graphs": max(result.graphs, graphs.captures if graphs is not None else 0),
                "spec": spec or {},
                "key": key,
            },
        )

    padding = _padding(model, device)
    lengths = data.lengths() if params.group_by_length else None
    by_tokens = params.batch_by == "tokens" and lengths is not None
    norm = _fixed_norm(data, params) if by_tokens and objective == "classify" else None

    def step_body(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One step from the loss to AdamW on this process's rows (gradients zeroed by the caller); the
        logged global mean loss. The eager loop and every captured CUDA graph run this same code."""
        with _autocast(device, cache=not graphed):
            loss_sum, count = _loss_sum(net, batch, objective, values)
        # one collective per step carries the global loss sum (for the log) and the global count
        sum_global, n_global = _all_sum(torch.stack([loss_sum.detach().float(), count.float()]), world)
        n_global = n_global.clamp_min(1.0)
        # DDP averages gradients over ranks: they become global means (or sums over the fixed norm)
        (loss_sum * world / (n_global if norm is None else norm)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
        opt.step()
        return sum_global / n_global

    graphs = GraphedSteps(step_body, opt) if graphed else None
    done = start
    if result.stop != "early stop":
        for step in bar:
            idx = batch_indices(
                len(data), params.batch_size, seed, step, lengths, params.group_by_length, by_tokens, world
            )
            full = _global_batch(data, idx, objective, vocab_size, gen, params.mlm_probability, padding)
            if graphs is not None:
                pending.append(graphs.step(full, device))
            else:
                opt.zero_grad(set_to_none=True)
                pending.append(step_body(_to({k: v[rank::world] for k, v in full.items()}, device)))
            sched.step()
            result.tokens += int(full["attention_mask"].sum())  # the global batch's tokens
            result.steps_run += 1
            done = step + 1
            stop = val is not None and (done % every == 0 or done == steps) and check(done)
            if stop:
                result.stop = "early stop"
            write = rank == 0 and checkpoint is not None
            write = write and (done % params.checkpoint_every == 0 or done == steps or stop)
            if write or done % LOSS_READ_EVERY == 0 or done == steps or stop:
                read_losses()
            if write:
                save(done)
            if stop:
                break
    bar.close()
    if graphs is not None:
        result.graphs = max(result.graphs, graphs.captures)  # shapes captured, in this or an earlier session
        graphs.release()
    done = max(done, len(result.losses))
    if best is not None:  # the run ends holding the weights of its best validation
        model.load_state_dict(best)
    result.epochs = done * min(params.batch_size, len(data)) / len(data)
    if device.type == "cuda":
        torch.cuda.synchronize()
    result.seconds = spent + time.perf_counter() - t0  # a resumed run counts its earlier sessions too
    return result


@torch.no_grad()
def predict(
    model: torch.nn.Module, data: SequenceDataset, device: torch.device, batch_size: int = 64
) -> np.ndarray:
    """Probabilities [n, n_outputs] for every sample, batching by length so padding stays small."""
    model.to(device).eval()
    order = np.argsort(data.lengths(), kind="stable")
    out = np.empty((len(data), model.n_outputs), dtype=np.float64)
    padding = _padding(model, device)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = _to(collate([data[int(i)][:1] for i in idx], **padding), device)
        with _autocast(device):
            logits = model.classify(batch).float()
        out[idx] = torch.sigmoid(logits).cpu().numpy()
    model.train()
    return out


@torch.no_grad()
def features(
    model: torch.nn.Module, data: SequenceDataset, device: torch.device, batch_size: int = 64
) -> dict[str, np.ndarray]:
    """Frozen hidden states, one vector per sample: "head", pooled as the model's classification head pools
    (last real token for causal models; [CLS], or the mean where the backbone pools by mean, for encoders),
    and "mean", the mean over real tokens. One backbone pass serves both (what a probe reads)."""
    from repro.models.heads import pool

    model.to(device).eval()
    order = np.argsort(data.lengths(), kind="stable")
    out: dict[str, np.ndarray] = {}
    padding = _padding(model, device)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = _to(collate([data[int(i)][:1] for i in idx], **padding), device)
        with _autocast(device):
            hidden = model.hidden(batch).float()
        mask = batch["attention_mask"]
        for name, mode in (("head", model.pool_mode), ("mean", "mean")):
            vec = pool(hidden, mask, model.causal, mode).cpu().numpy()
            out.setdefault(name, np.empty((len(data), vec.shape[1]), dtype=np.float32))[idx] = vec
    model.train()
    return out


def init_distributed() -> tuple[int, int, torch.device]:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs); (rank, world, this rank's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if world > 1:
        if cuda and local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible")
        if cuda:
            torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return int(os.environ.get("RANK", "0")), world, torch.device(f"cuda:{local}" if cuda else "cpu")
