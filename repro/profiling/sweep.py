"""Sweeps of timed training steps over lengths and batch sizes, one tidy row per (model, length, batch).

``measure`` makes one tidy row (model, kernel_path, device, timer, dtype, length, batch, params,
ms_per_step, tokens_per_s, peak_mem_gib, mem_source, status). An out-of-memory error is a data point
(status "oom"): memory is freed and the sweep goes on, attempting every length once. Before anything is
timed, a tiny forward tells which kernel the model's sequence mixer takes; a reference (pure-PyTorch) path
on CUDA is refused (status "skipped: reference path on CUDA") unless the params ask to time it, and then its
kernel path carries "[reference (slow path)]". An earlier reproduction's Mamba epochs were 18x slower than
its Transformer's because of that path (DESIGN.md section 11).

Timing batches are synthetic (random code tokens with valid side arrays, no padding): the content of a
batch does not change its cost. The step is one pretraining step: next-token loss for causal models,
masked-token loss for encoders (the MLM mask is drawn once, outside the timed region), AdamW, gradient
clipping at 1.0, bf16 autocast on CUDA, as ``repro.training.loop.fit`` does."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from repro.data.dataset import IGNORE, mlm_mask
from repro.data.vocab import CLS, N_TOKEN_TYPES, SPECIALS
from repro.profiling.timing import (
    MEM_CPU,
    MEM_CUDA,
    OK,
    OOM,
    REFERENCE_LABEL,
    SKIP_BUDGET,
    SKIP_REFERENCE,
    TIMER_CUDA,
    TIMER_WALL,
    Timing,
    autocast,
    device_name,
    free_memory,
    is_oom,
    is_reference,
    time_step,
)

ROW_COLUMNS = (
    "model",
    "kernel_path",
    "device",
    "timer",
    "dtype",
    "length",
    "batch",
    "params",
    "ms_per_step",
    "tokens_per_s",
    "peak_mem_gib",
    "mem_source",
    "status",
    "row_s",
)


ATTENTION_MODELS = ("cehr_bert", "bigbird", "transformer")


PROBE_LEN = 64


# --------------------------------------------------------------------------------------------------------
# synthetic batches and the training step
# --------------------------------------------------------------------------------------------------------
def synthetic_batch(
    vocab_size: int,
    batch: int,
    length: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
    max_visits: int = 64,
    tokens_per_visit: int = 32,
) -> dict[str, torch.Tensor]:
    """A full (unpadded) batch in the model batch contract: random code tokens, visits of 32 tokens.

    >>> b = synthetic_batch(100, 2, 70)
    >>> sorted(b), tuple(b["input_ids"].shape), int(b["input_ids"][0, 0]), int(b["segments"][0, 40])
    (['ages', 'attention_mask', 'input_ids', 'segments', 'times', 'type_ids', 'visit_orders'], (2, 70), 2, 2)
    """
    if vocab_size <= len(SPECIALS) or batch < 1 or length < 2:
        raise ValueError(
            f"need vocab_size > {len(SPECIALS)}, batch >= 1, length >= 2; got {vocab_size}, {batch}, {length}"
        )
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIALS), vocab_size, (batch, length), generator=g)
    ids[:, 0] = CLS
    visit = torch.arange(length) // tokens_per_visit  # 0-based visit of each token
    times = (2600.0 + 4.0 * visit).float().expand(batch, length)  # weeks since 1970, one visit a month
    out = {
        "input_ids": ids,
        "type_ids": torch.randint(1, N_TOKEN_TYPES, (batch, length), generator=g),
        "ages": (60.0 + (times - times[:, :1]) / 52.18).contiguous(),
        "times": times.contiguous(),
        "segments": (1 + visit % 2).expand(batch, length).contiguous(),
        "visit_orders": (1 + visit).clamp(max=max_visits - 1).expand(batch, length).contiguous(),
        "attention_mask": torch.ones(batch, length, dtype=torch.int64),
    }
    return {k: v.to(device) for k, v in out.items()}


def pretrain_step(
    model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device
) -> Callable[[], None]:
    """One pretraining step as ``repro.training.loop.fit`` runs it: CLM (causal) or MLM (encoders), AdamW, clip 1.0.

    The MLM corruption is drawn once here, so the timed step holds only the model's own work.
    """
    device = torch.device(device)
    vocab = int(model.vocab_size)
    if model.causal:
        inputs, targets, shift = batch, batch["input_ids"][:, 1:], True
    else:
        corrupted, labels = mlm_mask(batch["input_ids"].cpu(), vocab, 0.15, torch.Generator().manual_seed(0))
        inputs, targets, shift = {**batch, "input_ids": corrupted.to(device)}, labels.to(device), False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step() -> None:
        with autocast(device):
            logits = model.lm_logits(inputs)
            if shift:
                logits = logits[:, :-1]
            loss = F.cross_entropy(
                logits.reshape(-1, vocab).float(), targets.reshape(-1), ignore_index=IGNORE
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


RECOMPUTE_LABEL = "+ recompute"


def recomputes(model: nn.Module) -> bool:
    """Whether any mixer of ``model`` recomputes its activations in backward (repro.models.mamba_inner)."""
    return any(getattr(m, "recompute", False) is True for m in model.modules())


@torch.no_grad()
def probe_kernel_path(model: nn.Module, device: torch.device, length: int = PROBE_LEN) -> str | None:
    """The kernel path one forward of a single ``length``-token row takes on ``device`` (decides the
    reference-path refusal cheaply). Some paths depend on the length: BigBird attends block-sparse only
    from (6 + 2r) blocks on, so the doctor probes at the run's ``tokenizer.max_len``."""
    length = min(length, int(getattr(model.backbone, "max_len", length)))
    batch = synthetic_batch(int(model.vocab_size), 1, length, device)
    was_training = model.training
    model.eval()
    with autocast(device):
        model.hidden(batch)
    model.train(was_training)
    return model.kernel_path


# --------------------------------------------------------------------------------------------------------
# rows and sweeps
# --------------------------------------------------------------------------------------------------------
def empty_row(model: str, device: torch.device, length: int, batch: int, status: str = "") -> dict[str, Any]:
    """A row with nothing measured yet (the shape every row has)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    return {
        "model": model,
        "kernel_path": "-",
        "device": device_name(device),
        "timer": TIMER_CUDA if cuda else TIMER_WALL,
        "dtype": "bf16 autocast" if cuda else "fp32",
        "length": int(length),
        "batch": int(batch),
        "params": np.nan,
        "ms_per_step": np.nan,
        "tokens_per_s": np.nan,
        "peak_mem_gib": np.nan,
        "mem_source": MEM_CUDA if cuda else MEM_CPU,
        "status": status,
        "row_s": np.nan,  # wall seconds of the whole row: build, probe, warm-up (compiles) and timed steps
    }


def _short(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"error: {type(exc).__name__}: {first}"[:160]


def record_timing(row: dict[str, Any], t: Timing, kernel_path: str) -> None:
    """Fill a row from a ``Timing``: ms/step, tokens/s (batch x length per step), peak memory, status ok."""
    tokens = row["batch"] * row["length"]
    row.update(
        kernel_path=kernel_path,
        ms_per_step=t.ms_per_step,
        tokens_per_s=tokens / (t.ms_per_step / 1000) if t.ms_per_step > 0 else np.nan,
        peak_mem_gib=t.peak_mem_gib,
        timer=t.timer,
        mem_source=t.mem_source,
        status=OK,
    )


def guarded(
    row: dict[str, Any], body: Callable[[dict[str, Any]], None], device: torch.device
) -> dict[str, Any]:
    """Run ``body(row)``; an out-of-memory error becomes status "oom", any other error "error: ...".

    Either way memory is freed afterwards (the body's frame, which held the model and activations, is gone
    by then), so the next row starts clean. Non-OOM errors are also printed to stderr.
    """
    try:
        body(row)
    except Exception as exc:  # noqa: BLE001 - a failed row is a data point; the sweep goes on
        row["status"] = OOM if is_oom(exc) else _short(exc)
        if row["status"] != OOM:
            print(
                f"{row['model']} at length {row['length']}, batch {row['batch']}: {row['status']}",
                file=sys.stderr,
            )
    finally:
        free_memory(device)
    return row


def measure(
    name: str,
    make_model: Callable[[int], nn.Module],
    length: int,
    batch: int,
    *,
    device: torch.device | str,
    warmup: int = 2,
    steps: int = 5,
    allow_reference: bool = False,
    step_factory: Callable[..., Callable[[], None]] = pretrain_step,
    seed: int = 0,
) -> dict[str, Any]:
    """One row: build the model for ``length``, check its kernel path, time ``step_factory``'s step.

    ``make_model(length)`` returns an ``EHRModel`` able to read ``length`` tokens. Out-of-memory errors give
    status "oom" and other errors "error: ..." (see ``guarded``).
    """
    device = torch.device(device)
    t0 = time.perf_counter()

    def body(row: dict[str, Any]) -> None:
        torch.manual_seed(seed)
        model = make_model(length).to(device)
        row["params"] = model.n_params()
        tag = f" {RECOMPUTE_LABEL}" if recomputes(model) else ""
        path = probe_kernel_path(model, device)
        if path:
            path += tag
        row["kernel_path"] = path or "-"
        reference_on_cuda = device.type == "cuda" and is_reference(path)
        if reference_on_cuda and not allow_reference:
            row["status"] = SKIP_REFERENCE
            return
        step = step_factory(
            model, synthetic_batch(int(model.vocab_size), batch, length, device, seed=seed), device
        )
        t = time_step(step, device, warmup, steps)
        path = (model.kernel_path or "-") + tag
        record_timing(row, t, f"{path} {REFERENCE_LABEL}" if reference_on_cuda else path)

    row = guarded(empty_row(name, device, length, batch), body, device)
    row["row_s"] = round(time.perf_counter() - t0, 2)
    return row


def sweep(
    builders: Mapping[str, Callable[[int], nn.Module]],
    lengths: Sequence[int],
    batch_sizes: Sequence[int],
    *,
    device: torch.device | str,
    warmup: int = 2,
    steps: int = 5,
    allow_reference: bool = False,
    time_budget_s: float = math.inf,
    step_factory: Callable[..., Callable[[], None]] = pretrain_step,
    progress: bool = True,
) -> pd.DataFrame:
    """Rows for every length x batch size x model, shortest lengths first, each attempted once.

    A model that runs out of memory at one length is still tried at the next (the boundary is measured,
    not assumed). Once ``time_budget_s`` is spent, the remaining rows are recorded as skipped. The budget
    starts after the first length and batch size, whose rows pay each model's one-time costs in this
    process (CUDA modules loaded, Triton kernels compiled): on an H200 the first 8 rows took all of 45 s.
    """
    from tqdm import tqdm

    combos = [(L, B, name) for L in sorted(lengths) for B in sorted(batch_sizes) for name in builders]
    rows = []
    t0 = math.inf
    for i, (L, B, name) in enumerate(tqdm(combos, desc="length sweep", disable=not progress, leave=False)):
        if i == len(builders):
            t0 = time.perf_counter()
        if time.perf_counter() - t0 > time_budget_s:
            rows.append(empty_row(name, device, L, B, f"{SKIP_BUDGET} ({time_budget_s:g} s)"))
            continue
        rows.append(
            measure(
                name,
                builders[name],
                L,
                B,
                device=device,
                warmup=warmup,
                steps=steps,
                allow_reference=allow_reference,
                step_factory=step_factory,
            )
        )
    return pd.DataFrame(rows, columns=list(ROW_COLUMNS))


def length_builders(
    kwargs_of: Mapping[str, Mapping[str, Any]], vocab_size: int
) -> dict[str, Callable[[int], nn.Module]]:
    """``{name: build(length)}``: each model at its given size, its ``max_len`` raised to the length asked.

    CEHR-BERT's learned position table grows with ``max_len``; the row's ``params`` shows the count built.
    """
    from repro.models.registry import backbone_kwargs, build_model

    def builder(name: str, kw: Mapping[str, Any]) -> Callable[[int], nn.Module]:
        def build(length: int) -> nn.Module:
            k = dict(kw)
            if "max_len" in backbone_kwargs(name):
                k["max_len"] = max(int(k.get("max_len", 0)), int(length))
            return build_model(name, vocab_size, **k)

        return build

    return {name: builder(name, kw) for name, kw in kwargs_of.items()}


def cpu_threads(params) -> int:
    """Torch threads for CPU sweeps and H4 runs: ``efficiency.cpu_threads``, else ``train.num_threads``.

    One thread is the robust choice on a shared CPU: with two OpenMP threads on two busy cores, a thread
    descheduled at a barrier stalls every op, and steps measured 10-50x slower than with one thread.
    """
    return params.efficiency.cpu_threads or params.train.num_threads


def matched_kwargs(prep, models: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Build arguments of ``models`` at the run's sizes, matched to EHRMamba's parameter count as in H1."""
    from repro.training.trainer import Trainer

    trainer = Trainer(prep, Path("outputs/.unused"), progress=False)  # build_kwargs only; nothing is written
    return {m: trainer.build_kwargs(m) for m in models}


def efficiency_sweep(
    prep,
    lengths: Sequence[int] | None = None,
    batch_sizes: Sequence[int] | None = None,
    models: Sequence[str] | None = None,
    progress: bool = True,
    steps: tuple[int, int] | None = None,
    as_trained: bool = False,
) -> pd.DataFrame:
    """The params' sweep (``efficiency.lengths`` x ``batch_sizes`` x ``models``) on the run's device.

    ``steps``: (warm-up, timed) steps per row instead of the params' ``warmup_steps`` / ``timed_steps``;
    the out-of-memory boundary needs one of each (the peak is reached on the first step after the
    optimizer state exists), and its longest rows cost seconds per step. EHRMamba recomputes when
    ``efficiency.ehrmamba_recompute`` says so, unless ``as_trained`` (then as the training runs build it:
    for estimates of their epochs).
    """
    from repro.training.loop import resolve_device

    params = prep.params
    eff = params.efficiency
    models = list(models or eff.models)
    sizes = matched_kwargs(prep, models)
    if eff.ehrmamba_recompute and not as_trained and "ehrmamba" in sizes:
        sizes["ehrmamba"] = {**sizes["ehrmamba"], "recompute": True}
    builders = length_builders(sizes, prep.tokenizer.vocab_size)
    device = resolve_device(params.device)
    threads = cpu_threads(params)
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    return sweep(
        builders,
        lengths or eff.lengths,
        batch_sizes or eff.batch_sizes,
        device=device,
        warmup=eff.warmup_steps if steps is None else steps[0],
        steps=eff.timed_steps if steps is None else steps[1],
        allow_reference=eff.allow_reference_on_cuda,
        time_budget_s=eff.time_budget_s,
        progress=progress,
    )
