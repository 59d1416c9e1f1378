"""Pretraining (CLM / MLM) and finetuning loops with checkpoints that resume to the same result.

Each step's batch is a pure function of (seed, step) and the checkpoint carries the optimiser,
scheduler and torch RNG states, so a run killed at step k and resumed ends where an uninterrupted run
ends. AdamW, linear warmup then linear decay, gradient clipping, bf16 autocast on CUDA.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from repro.config import TrainParams
from repro.data.dataset import IGNORE, SequenceDataset, batch_indices, clm_labels, collate, mlm_mask


@dataclass
class TrainResult:
    """What a training loop did: losses per step, wall time, steps run in this process."""

    objective: str
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps_run: int = 0
    resumed_from: int = 0
    tokens: int = 0


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without it is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was requested but torch.cuda.is_available() is False")
    return torch.device(name)


def _schedule(total: int, warmup_frac: float):
    warmup = max(1, int(total * warmup_frac))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    objective: str,
    vocab_size: int,
    gen: torch.Generator,
    mlm_probability: float,
) -> torch.Tensor:
    if objective == "clm":
        logits = model.lm_logits(batch)
        labels = clm_labels(batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE,
        )
    if objective == "mlm":
        corrupted, labels = mlm_mask(batch["input_ids"].cpu(), vocab_size, mlm_probability, gen)
        batch = {**batch, "input_ids": corrupted.to(batch["input_ids"].device)}
        logits = model.lm_logits(batch)
        labels = labels.to(logits.device)
        if (labels != IGNORE).sum() == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE
        )
    if objective == "classify":
        logits = model.classify(batch).float()
        labels = batch["labels"].to(logits.device)
        if "label_mask" not in batch:
            return F.binary_cross_entropy_with_logits(logits, labels)
        mask = batch["label_mask"].to(logits.device)  # MPF: only the columns of each sample's task count
        loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        return (loss * mask).sum() / mask.sum().clamp_min(1.0)
    raise ValueError(f"unknown objective {objective!r}")


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
) -> TrainResult:
    """Train `model` for `steps` steps of `objective` ("clm", "mlm" or "classify"), resuming from `checkpoint`.

    `spec` (the model's build arguments) is stored in the checkpoint so it can rebuild the model.
    """
    if len(data) == 0:
        raise ValueError(f"{desc or objective}: no training samples")
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": params.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps, params.warmup_frac))
    result = TrainResult(objective=objective)
    start = 0
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state.get("objective") == objective and state.get("steps") == steps:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            gen.set_state(state["mlm_rng"])
            start = int(state["step"])
            result.losses = list(state["losses"])
            result.resumed_from = start
    vocab_size = int(getattr(model, "vocab_size", 0) or 0)
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(
        range(start, steps),
        desc=desc or objective,
        disable=not progress,
        leave=False,
        initial=start,
        total=steps,
    )
    for step in bar:
        idx = batch_indices(len(data), params.batch_size, seed, step)
        batch = _to(collate([data[int(i)] for i in idx]), device)
        with _autocast(device):
            loss = _loss(model, batch, objective, vocab_size, gen, params.mlm_probability)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{desc or objective}: loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
        opt.step()
        sched.step()
        result.losses.append(float(loss.item()))
        result.tokens += int(batch["attention_mask"].sum().item())
        result.steps_run += 1
        bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
        done = step + 1
        if checkpoint is not None and (done % params.checkpoint_every == 0 or done == steps):
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
                    "spec": spec or {},
                },
            )
    if device.type == "cuda":
        torch.cuda.synchronize()
    result.seconds = time.perf_counter() - t0
    return result


@torch.no_grad()
def predict(
    model: torch.nn.Module, data: SequenceDataset, device: torch.device, batch_size: int = 64
) -> np.ndarray:
    """Probabilities [n, n_outputs] for every sample, batching by length so padding stays small."""
    model.to(device).eval()
    order = np.argsort(data.lengths(), kind="stable")
    out = np.empty((len(data), model.n_outputs), dtype=np.float64)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = _to(collate([data[int(i)][:1] for i in idx]), device)
        with _autocast(device):
            logits = model.classify(batch).float()
        out[idx] = torch.sigmoid(logits).cpu().numpy()
    model.train()
    return out
