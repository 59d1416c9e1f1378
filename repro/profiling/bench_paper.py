"""The paper's efficiency claim measured its way: time per epoch and the largest batch, EHRMamba vs MultiBird.

The paper (Appendix C.3) backs "EHRMamba trains faster and fits larger batches than Transformers" with two
numbers per model and phase, both against MultiBird: the wall time of one epoch at its batch size, and the
batch size itself. `python -m repro.bench paper` measures the same two on one GPU, at the paper's sizes
(EHRMamba 768 wide, 32 blocks, state 16, conv 4; MultiBird 768 wide, 6 layers, 12 heads, intermediate
3072) and 2048-token rows:

- tokens/s of our training step (``repro.training.loop``'s loss and AdamW step, bf16 autocast on CUDA) at
  the paper's batch sizes, CUDA events after warm-up (``repro.profiling.timing.time_step``); a batch that
  does not fit is recorded as "out of memory" and the step is then timed at the largest batch that fits;
- the largest batch that fits, by doubling then bisection, out-of-memory errors caught;
- time per epoch extrapolated from tokens/s to the paper's data size (one 2048-token row per patient,
  93,787 pretraining and 47,447 finetuning patients), beside the paper's times (4 A100 80 GB), and the
  EHRMamba / MultiBird ratios of both, since only ratios compare across hardware.

MultiBird is our BigBird (``repro.models.bigbird``) built from the ``bigbird`` size block; the paper's
MultiBird is BigBird finetuned with multitask prompts, which changes the input tokens, not the work of a
step. Both models are built as ``Trainer.build_kwargs`` builds them with ``match_params: false``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from repro.config import write_text_atomic
from repro.profiling import timing

if TYPE_CHECKING:
    from repro.config import RunParams, TrainParams

PROG = "python -m repro.bench paper"
PHASES = ("pretrain", "finetune")
LABELS = {"ehrmamba": "EHRMamba", "multibird": "MultiBird"}
BACKBONE = {"ehrmamba": "ehrmamba", "multibird": "bigbird"}  # MultiBird is BigBird finetuned with MPF
RATIO = "EHRMamba / MultiBird"
OUT_OF_MEMORY = "out of memory"

# Table 4 and the released configs (odyssey ehr_mamba.yaml: expand 2; cehr_multibird.yaml: intermediate
# 3072, the 4 x 768 that BigBird's d_ff defaults to, passed explicitly here). block_size 64 and mean pooling
# are params/mimic-iv.yaml's BigBird preset; num_random_blocks stays our default 2 (HF BigBirdConfig's is 3).
PAPER_SIZES: dict[str, dict[str, Any]] = {
    "ehrmamba": {"d_model": 768, "n_layers": 32, "d_state": 16, "d_conv": 4, "expand": 2},
    "multibird": {
        "d_model": 768,
        "n_layers": 6,
        "n_heads": 12,
        "d_ff": 3072,
        "block_size": 64,
        "pool": "mean",
    },
}
PAPER_BATCH = {
    ("ehrmamba", "pretrain"): 44,
    ("multibird", "pretrain"): 32,
    ("ehrmamba", "finetune"): 64,
    ("multibird", "finetune"): 26,
}
PAPER_EPOCH_S = {
    ("ehrmamba", "pretrain"): 14 * 60 + 29,
    ("multibird", "pretrain"): 24 * 60 + 5,
    ("ehrmamba", "finetune"): 3600 + 17 * 60,
    ("multibird", "finetune"): 4 * 3600 + 37 * 60,
}
PAPER_PATIENTS = {"pretrain": 93_787, "finetune": 47_447}  # the paper's pretraining / finetuning split
PAPER_HARDWARE = "4 A100 80 GB"
# The paper does not give its vocabulary size; the LM head and its loss scale with it (both models alike).
DEFAULT_VOCAB = 16384


# --------------------------------------------------------------------------------------------------------
# the largest batch that fits
# --------------------------------------------------------------------------------------------------------
def largest_batch(fits: Callable[[int], bool], cap: int = 1024) -> tuple[int, bool, list[tuple[int, bool]]]:
    """(largest batch with ``fits(batch)``, whether the search stopped at ``cap``, the tries in order).

    Doubling from 1 finds a batch that fails, bisection between it and the last that fit finds the edge:
    about 2 log2(edge) tries. Assumes monotonicity (what fits at b fits below b). 0: not even batch 1 fits.

    >>> largest_batch(lambda b: b <= 44)[:2]
    (44, False)
    >>> largest_batch(lambda b: True, cap=100)[:2], largest_batch(lambda b: False)[:2]
    ((100, True), (0, False))
    """
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    tries: list[tuple[int, bool]] = []

    def attempt(b: int) -> bool:
        ok = bool(fits(b))
        tries.append((b, ok))
        return ok

    if not attempt(1):
        return 0, False, tries
    lo, hi = 1, 0  # fits(lo); hi: the smallest batch known to fail (0: none yet)
    while not hi:
        b = min(2 * lo, cap)
        if b == lo:  # lo is the cap
            return lo, True, tries
        if attempt(b):
            lo = b
        else:
            hi = b
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if attempt(mid) else (lo, mid)
    return lo, False, tries


# --------------------------------------------------------------------------------------------------------
# models, batches and the training step, as the training code has them
# --------------------------------------------------------------------------------------------------------
def merged_sizes(overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """The paper's sizes with ``overrides`` (``{model: {key: value}}``) applied key by key.

    >>> merged_sizes({"ehrmamba": {"n_layers": 2}})["ehrmamba"]["n_layers"]
    2
    >>> merged_sizes({"bigbird": {}})
    Traceback (most recent call last):
    ValueError: --sizes names unknown models ['bigbird']; known: ['ehrmamba', 'multibird']
    """
    overrides = dict(overrides or {})
    bad = sorted(set(overrides) - set(PAPER_SIZES))
    if bad:
        raise ValueError(f"--sizes names unknown models {bad}; known: {sorted(PAPER_SIZES)}")
    return {m: {**s, **dict(overrides.get(m, {}))} for m, s in PAPER_SIZES.items()}


def build_kwargs(params: RunParams, model: str, sizes: Mapping[str, Any], length: int) -> dict[str, Any]:
    """``model``'s build arguments as the trainer makes them (``prepare.model_kwargs``, no matching), its
    ``max_len`` raised to ``length`` where it has one (as ``sweep.length_builders`` does)."""
    from repro.training.prepare import model_kwargs

    run = dataclasses.replace(params, model_sizes={BACKBONE[model]: dict(sizes)}, match_params=False)
    kw = model_kwargs(run, BACKBONE[model])
    if "max_len" in kw:
        kw["max_len"] = max(int(kw["max_len"]), int(length))
    return kw


def make_batch(
    vocab: int,
    batch: int,
    length: int,
    objective: str,
    mlm_probability: float,
    padding: dict[str, Any],
    device: torch.device,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """``batch`` full rows of random in-vocabulary tokens through the loop's own batch path.

    ``loop._global_batch`` collates them (every key the models read, value arrays included) and draws the
    MLM corruption; finetuning adds a random binary label per row. Built on the CPU, moved like the loop.
    """
    from repro.data.dataset import SIDE, SequenceDataset
    from repro.data.tokenizer import Encoded
    from repro.profiling.sweep import synthetic_batch
    from repro.training.loop import _global_batch, _to

    rows = synthetic_batch(vocab, batch, length, "cpu", seed=seed)
    items = [Encoded(**{k: rows[k][i].numpy() for k in SIDE}) for i in range(batch)]
    labels = None
    if objective == "classify":
        labels = np.random.default_rng(seed).integers(0, 2, batch).astype(np.float32)
    data = SequenceDataset(items, labels)
    gen = torch.Generator().manual_seed(seed)
    full = _global_batch(data, np.arange(batch), objective, vocab, gen, mlm_probability, padding)
    return _to(full, device)


def train_step(
    model: torch.nn.Module, objective: str, train: TrainParams, lr: float, device: torch.device
) -> tuple[Callable[[dict[str, torch.Tensor]], None], torch.optim.Optimizer]:
    """(step(batch), its optimizer): one step of ``loop.fit`` on one process, so the step timed is ours.

    Same optimizer groups (no decay on norms, biases, A_log, D), AdamW betas and fused kernel, schedule,
    ``_loss_sum`` (the loss the loop trains with), clipping and bf16 autocast; without the loop's logging,
    validation and checkpoints.
    """
    from repro.training.loop import _autocast, _loss_sum, _schedule, decay_groups

    decay, no_decay = decay_groups(model)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(10**9, train.warmup_frac))
    values = objective in ("clm", "mlm") and getattr(model, "value_head", None) is not None

    def step(batch: dict[str, torch.Tensor]) -> None:
        with _autocast(device):
            loss_sum, count = _loss_sum(model, batch, objective, values)
        loss = loss_sum / count.float().clamp_min(1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        opt.step()
        sched.step()

    return step, opt


def refusal(device: torch.device, sizes: Mapping[str, Mapping[str, Any]] | None = None) -> str | None:
    """Why EHRMamba cannot be timed here with ``sizes`` (the ``--sizes`` overrides), one line, or None.

    On CUDA without mamba_ssm's kernels it would run the reference (slow path) scan, the trap that made an
    earlier reproduction's Mamba 18x slower than its Transformer (DESIGN.md section 11). Elsewhere the
    reference scan is the only path: allowed only for an EHRMamba smaller than the paper's (tests).

    >>> refusal(torch.device("cpu"), {"ehrmamba": {"d_model": 32, "n_layers": 2}}) is None
    True
    >>> refusal(torch.device("cpu"), {"multibird": {"n_layers": 1}})[:30]
    'on cpu EHRMamba runs the [refe'
    """
    if device.type == "cuda":
        from repro.models import ehrmamba

        if ehrmamba.selective_scan_fn is None:
            return (
                f"EHRMamba on CUDA would run the {timing.REFERENCE_LABEL} scan: mamba_ssm's selective_scan_fn "
                "did not import; install mamba-ssm (../shared/gpu/README.md) and run again"
            )
        return None
    s, paper = merged_sizes(sizes)["ehrmamba"], PAPER_SIZES["ehrmamba"]
    if s["d_model"] * s["n_layers"] >= paper["d_model"] * paper["n_layers"]:
        return (
            f"on {device.type} EHRMamba runs the {timing.REFERENCE_LABEL} scan, hours per step at the paper's "
            "sizes: run it on a GPU with mamba_ssm, or pass --sizes with a small EHRMamba (tests)"
        )
    return None


# --------------------------------------------------------------------------------------------------------
# one (model, phase)
# --------------------------------------------------------------------------------------------------------
def _short(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"error: {type(exc).__name__}: {first}"[:160]


def empty_row(model: str, phase: str, length: int, device: torch.device, max_batch: int) -> dict[str, Any]:
    """A row with nothing measured yet (the shape every row has, failed ones included)."""
    key = (model, phase)
    return {
        "model": LABELS[model],
        "phase": phase,
        "objective": None,
        "kernel_path": None,
        "device": timing.device_name(device),
        "timer": None,
        "length": int(length),
        "params": None,
        "paper_batch": PAPER_BATCH[key],
        "status": None,
        "timed_batch": None,
        "ms_per_step": math.nan,
        "tokens_per_s": math.nan,
        "peak_mem_gib": math.nan,
        "largest_batch": None,
        "largest_capped": False,
        "max_batch": int(max_batch),
        "search": [],
        "epoch_rows": PAPER_PATIENTS[phase],
        "epoch_s": math.nan,
        "paper_epoch_s": float(PAPER_EPOCH_S[key]),
        "row_s": math.nan,
    }


def measure(
    model: str,
    phase: str,
    *,
    params: RunParams,
    sizes: Mapping[str, Any],
    vocab: int,
    length: int,
    device: torch.device,
    warmup: int,
    steps: int,
    max_batch: int,
) -> dict[str, Any]:
    """One row: tokens/s at the paper's batch (or, out of memory there, at the largest batch that fits),
    the largest batch (two steps per try: the second runs its forward with the first's gradients and the
    optimizer state allocated, as every training step does), and the extrapolated epoch."""
    from repro.models.registry import build_model
    from repro.profiling.sweep import probe_kernel_path
    from repro.training.loop import _padding

    t0 = time.perf_counter()
    key = (model, phase)
    row = empty_row(model, phase, length, device, max_batch)
    torch.manual_seed(0)
    kw = build_kwargs(params, model, sizes, length)
    net = build_model(BACKBONE[model], vocab, **kw).to(device)
    row["params"] = net.n_params()
    path = probe_kernel_path(net, device)
    row["kernel_path"] = path or "-"
    if device.type == "cuda" and timing.is_reference(path):
        raise RuntimeError(
            f"{LABELS[model]} took the {timing.REFERENCE_LABEL} path on CUDA ({path}); refused"
        )
    objective = net.pretrain_objective if phase == "pretrain" else "classify"
    row["objective"] = objective
    # the trainer's settings: MultiBird's finetuning (BigBird's MPF run) takes its own over BigBird's
    mpf = ["multibird"] if model == "multibird" and phase == "finetune" else []
    train = params.train.for_model(BACKBONE[model], *mpf)
    step, opt = train_step(
        net, objective, train, train.lr if phase == "pretrain" else train.finetune_lr, device
    )
    padding = _padding(net, device)

    def run(batch_size: int, timed: bool) -> timing.Timing | bool:
        """A Timing (timed) or True (two steps ran) at ``batch_size``; False when out of memory."""
        batch, oom = None, False
        try:
            batch = make_batch(
                vocab, batch_size, length, objective, train.mlm_probability, padding, device, seed=batch_size
            )
            if timed:
                return timing.time_step(lambda: step(batch), device, warmup, steps)
            for _ in range(2):
                step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return True
        except Exception as exc:  # noqa: BLE001 - out of memory is the answer; anything else is raised
            if not timing.is_oom(exc):
                raise
            oom = True
        finally:
            batch = None
            opt.zero_grad(set_to_none=True)
            if oom:  # the failed step's frames are gone with the exception: collect, then empty the cache
                timing.free_memory(device)
            elif device.type == "cuda":  # gc.collect costs ~0.2 s a call, and only a failure needs it
                torch.cuda.empty_cache()
        return False

    def fill(t: timing.Timing, batch_size: int) -> None:
        row.update(
            timed_batch=batch_size,
            timer=t.timer,
            ms_per_step=t.ms_per_step,
            tokens_per_s=batch_size * length / (t.ms_per_step / 1000) if t.ms_per_step > 0 else math.nan,
            peak_mem_gib=t.peak_mem_gib,
        )

    t = run(PAPER_BATCH[key], timed=True)
    row["status"] = timing.OK if isinstance(t, timing.Timing) else OUT_OF_MEMORY
    if isinstance(t, timing.Timing):
        fill(t, PAPER_BATCH[key])
    largest, capped, tries = largest_batch(lambda b: bool(run(b, timed=False)), max_batch)
    row.update(largest_batch=largest, largest_capped=capped, search=[[b, ok] for b, ok in tries])
    if row["status"] == OUT_OF_MEMORY and largest >= 1:
        t = run(largest, timed=True)
        if isinstance(t, timing.Timing):
            fill(t, largest)
    if row["tokens_per_s"] > 0:
        row["epoch_s"] = epoch_seconds(row["epoch_rows"], length, row["tokens_per_s"])
    row["kernel_path"] = net.kernel_path or row["kernel_path"]  # the probe's short input may take another
    row["row_s"] = round(time.perf_counter() - t0, 2)
    return row


def epoch_seconds(rows: int, length: int, tokens_per_s: float) -> float:
    """Seconds of one epoch of ``rows`` rows of ``length`` tokens at ``tokens_per_s`` (extrapolated).

    >>> epoch_seconds(93_787, 2048, 2048.0)
    93787.0
    """
    return rows * length / tokens_per_s if tokens_per_s > 0 else math.nan


# --------------------------------------------------------------------------------------------------------
# the benchmark, its ratios and its table
# --------------------------------------------------------------------------------------------------------
def _div(a: Any, b: Any) -> float:
    a = math.nan if a is None else float(a)
    b = math.nan if b is None else float(b)
    return a / b if b > 0 and a == a else math.nan


def ratios(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """EHRMamba / MultiBird per phase, from the rows: epoch time (ours and the paper's), tokens/s, the
    largest batch and the paper's batch. ``largest_batch_bound``: "" exact, or which side a capped search
    leaves open.

    >>> rows = [{"model": "EHRMamba", "phase": "pretrain", "epoch_s": 60.0, "paper_epoch_s": 869.0,
    ...          "tokens_per_s": 4.0, "largest_batch": 88, "largest_capped": False, "paper_batch": 44},
    ...         {"model": "MultiBird", "phase": "pretrain", "epoch_s": 120.0, "paper_epoch_s": 1445.0,
    ...          "tokens_per_s": 2.0, "largest_batch": 32, "largest_capped": False, "paper_batch": 32}]
    >>> r = ratios(rows)["pretrain"]
    >>> r["epoch_s"], round(r["paper_epoch_s"], 3), r["largest_batch"], r["paper_batch"]
    (0.5, 0.601, 2.75, 1.375)
    """
    out: dict[str, dict[str, Any]] = {}
    for phase in PHASES:
        by = {r["model"]: r for r in rows if r["phase"] == phase}
        e, m = by.get(LABELS["ehrmamba"]), by.get(LABELS["multibird"])
        if e is None or m is None:
            continue
        bound = ""
        if e.get("largest_capped") and not m.get("largest_capped"):
            bound = "at least"
        elif m.get("largest_capped") and not e.get("largest_capped"):
            bound = "at most"
        elif e.get("largest_capped") and m.get("largest_capped"):
            bound = "unknown (both capped)"
        out[phase] = {
            "epoch_s": _div(e.get("epoch_s"), m.get("epoch_s")),
            "paper_epoch_s": _div(e.get("paper_epoch_s"), m.get("paper_epoch_s")),
            "tokens_per_s": _div(e.get("tokens_per_s"), m.get("tokens_per_s")),
            "largest_batch": _div(e.get("largest_batch"), m.get("largest_batch")),
            "largest_batch_bound": bound,
            "paper_batch": _div(e.get("paper_batch"), m.get("paper_batch")),
        }
    return out


def note(results: Mapping[str, Any]) -> str:
    """The assumptions behind the table, in words (printed under it)."""
    L, cap = results["length"], results["max_batch"]
    return "\n".join(
        [
            f"Epochs are EXTRAPOLATED, not measured: one {L}-token row per patient (assumed; the paper gives "
            f"patients, not rows), {PAPER_PATIENTS['pretrain']:,} pretraining and "
            f"{PAPER_PATIENTS['finetune']:,} finetuning patients (the paper's split); epoch = rows x {L} / "
            "tokens/s of the timed training step (data loading, validation, checkpoints left out).",
            f"Ours: one {results['device']}. The paper's: {PAPER_HARDWARE} (its released configs give the batch "
            "per GPU, so a paper step holds 4x the rows): compare the ratios, not the times.",
            "Step: repro.training.loop's loss and AdamW step, bf16 autocast on CUDA; pretraining CLM "
            "(EHRMamba) and MLM 15 % (MultiBird), finetuning one binary output (the paper finetunes MultiBird "
            f"with MPF: other tokens, the same work); random in-vocabulary tokens, vocabulary {results['vocab']} "
            "(assumed: the paper does not give it).",
            f"Largest batch: doubling then bisection at {L} tokens, two training steps per try, capped at {cap} "
            f"('>= {cap}'). A paper batch that is out of memory is timed at the largest batch instead "
            "('(batch N)'). The paper's batches are the ones it reports beside its epoch times.",
        ]
    )


def duration(seconds: float) -> str:
    """Seconds as the paper writes them ("1 h 17 min", "14 min 29 s"), short ones as "3.2 s"; "-": none.

    >>> duration(4620), duration(869), duration(3.21), duration(float("nan"))
    ('1 h 17 min', '14 min 29 s', '3.2 s', '-')
    """
    if seconds is None or not seconds == seconds:
        return "-"
    if seconds >= 3600:
        h, m = divmod(round(seconds / 60), 60)
        return f"{h} h {m:02d} min"
    if seconds >= 60:
        m, s = divmod(round(seconds), 60)
        return f"{m} min {s:02d} s"
    return f"{seconds:.1f} s"


def _num(x: Any, fmt: str = ",.0f") -> str:
    return "-" if x is None or x != x else format(x, fmt)


def paper_table(results: Mapping[str, Any]) -> pd.DataFrame:
    """The printed table, one row per (phase, model) and one ratio row per phase (for notebook 02).

    ``results`` is what ``run`` returns or ``--out`` wrote; the numbers stay in ``results["rows"]``.
    """
    out = []
    rows = list(results["rows"])
    rat = results.get("ratios") or ratios(rows)
    hw = PAPER_HARDWARE.replace(" 80 GB", "")
    epoch_ours, epoch_paper = "epoch, ours (extrapolated)", f"epoch, paper ({hw})"
    for phase in PHASES:
        for r in (r for r in rows if r["phase"] == phase):
            tps = _num(r["tokens_per_s"])
            if r.get("timed_batch") not in (None, r["paper_batch"]):
                tps += f" (batch {r['timed_batch']})"
            largest = r.get("largest_batch")
            out.append(
                {
                    "phase": phase,
                    "model": r["model"],
                    "batch (paper)": str(r["paper_batch"]),
                    "at paper batch": r["status"],
                    "tokens/s": tps,
                    "peak GiB": _num(r.get("peak_mem_gib"), ".1f"),
                    "largest batch": "-"
                    if largest is None
                    else f"{'>= ' if r['largest_capped'] else ''}{largest}",
                    epoch_ours: duration(r.get("epoch_s")),
                    epoch_paper: duration(r.get("paper_epoch_s")),
                }
            )
        if phase in rat:
            q = rat[phase]
            bound = {"at least": ">= ", "at most": "<= "}.get(q["largest_batch_bound"], "")
            largest = bound + _num(q["largest_batch"], ".2f")
            if q["largest_batch_bound"].startswith("unknown"):
                largest = "- (both capped)"
            out.append(
                {
                    "phase": phase,
                    "model": RATIO,
                    "batch (paper)": _num(q["paper_batch"], ".2f"),
                    "at paper batch": "",
                    "tokens/s": _num(q["tokens_per_s"], ".2f"),
                    "peak GiB": "",
                    "largest batch": largest,
                    epoch_ours: _num(q["epoch_s"], ".2f"),
                    epoch_paper: _num(q["paper_epoch_s"], ".2f"),
                }
            )
    table = pd.DataFrame(out)
    table.attrs["note"] = results.get("note") or note(results)
    return table


def run(
    sizes: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    device: torch.device | str = "auto",
    length: int = 2048,
    phases: Sequence[str] = PHASES,
    warmup: int = 3,
    steps: int = 10,
    max_batch: int = 1024,
    vocab: int = DEFAULT_VOCAB,
    params_file: str = "params/mimic-iv.yaml",
    params: RunParams | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Every (model, phase) measured, ratios and the note: the dict ``--out`` writes.

    ``sizes`` overrides the paper's sizes key by key (tests pass tiny models); without it the CPU is
    refused, and CUDA is refused without mamba_ssm's kernels (``refusal``). Training settings and tokenizer
    limits come from ``params`` when given (notebook 02: the run's own), else from ``params_file``.
    """
    from repro.config import load_params, resolve
    from repro.training.loop import resolve_device

    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    bad = [p for p in phases if p not in PHASES]
    if bad or not phases:
        raise ValueError(f"phases must be among {PHASES}, got {list(phases)}")
    if length < 2 or warmup < 0 or steps < 1 or max_batch < 1:
        raise ValueError("need length >= 2, warmup >= 0, steps >= 1, max_batch >= 1")
    why = refusal(device, sizes)
    if why:
        raise RuntimeError(why)
    if params is None:
        params = load_params(resolve(params_file))
    else:
        params_file = f"{params.name} (the run's params)"
    merged = merged_sizes(sizes)
    rows = []
    for phase in phases:
        for model in LABELS:
            if progress:
                print(f"  {LABELS[model]} {phase} ...", file=sys.stderr, flush=True)
            try:
                row = measure(
                    model,
                    phase,
                    params=params,
                    sizes=merged[model],
                    vocab=vocab,
                    length=length,
                    device=device,
                    warmup=warmup,
                    steps=steps,
                    max_batch=max_batch,
                )
            except Exception as exc:  # noqa: BLE001 - one failed row is reported; the others still run
                if timing.REFERENCE_LABEL in str(exc):
                    raise
                row = empty_row(model, phase, length, device, max_batch)
                row["status"] = _short(exc)
            timing.free_memory(device)  # the model, its optimizer state and batches went with measure's frame
            rows.append(row)
            if progress:
                print(
                    f"  {LABELS[model]} {phase}: {row['status']} at batch {row['paper_batch']}, "
                    f"largest {row.get('largest_batch')}, {row.get('row_s')} s",
                    file=sys.stderr,
                    flush=True,
                )
    mamba = None
    try:
        import mamba_ssm

        mamba = mamba_ssm.__version__
    except ImportError:
        pass
    results: dict[str, Any] = {
        "benchmark": PROG,
        "device": timing.device_name(device),
        "torch": torch.__version__,
        "mamba_ssm": mamba,
        "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
        "length": int(length),
        "vocab": int(vocab),
        "warmup": int(warmup),
        "steps": int(steps),
        "max_batch": int(max_batch),
        "params_file": params_file,
        "sizes": merged,
        "paper_sizes": sizes is None,
        "rows": rows,
        "ratios": ratios(rows),
    }
    results["note"] = note(results)
    return results


def for_run(
    params: RunParams, vocab: int, progress: bool = False
) -> tuple[pd.DataFrame, dict[str, Any] | None]:
    """(the table notebook 02 shows, the results or None): measured when ``efficiency.paper_bench`` is on
    and the run is on CUDA with mamba_ssm, else a one-row table that says why it was not run.

    ``vocab`` is the run's vocabulary (the paper gives none). Refusals and failures are shown, not raised:
    the rest of the efficiency notebook stands without this table.

    >>> from repro.config import load_params
    >>> for_run(load_params("params/smoke.yaml"), 100)[0].iloc[0, 0][:60]
    'not measured: efficiency.paper_bench is off in these params '
    """
    from repro.training.loop import resolve_device

    eff = params.efficiency
    why = None
    if not eff.paper_bench:
        why = (
            "efficiency.paper_bench is off in these params (it needs a GPU with mamba_ssm, ~100 s on an H200)"
        )
    else:
        device = resolve_device(params.device)
        why = (
            f"the run is on {device.type}: the paper's sizes need a GPU with mamba_ssm"
            if device.type != "cuda"
            else refusal(device)
        )
    if why:
        return pd.DataFrame({"the paper's efficiency claim": [f"not measured: {why}"]}), None
    results = run(
        device=device, vocab=vocab, max_batch=eff.paper_bench_max_batch, params=params, progress=progress
    )
    return paper_table(results), results


def _clean(x: Any) -> Any:
    """JSON-safe: NaN becomes null, numpy scalars plain numbers."""
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(results: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``results`` atomically (a temp file in the same folder, then rename): never a half file."""
    path = Path(path)
    write_text_atomic(path, json.dumps(_clean(results), indent=2))
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments.

    >>> a = parse_args([])
    >>> a.device, a.length, a.phases, a.max_batch, a.sizes
    ('auto', 2048, ['pretrain', 'finetune'], 1024, None)
    """
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto, cuda or cpu (cpu only with --sizes)")
    p.add_argument("--length", type=int, default=2048, help="tokens per row (the paper's context)")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--max-batch", type=int, default=1024, help="cap of the largest-batch search")
    p.add_argument(
        "--vocab",
        type=int,
        default=DEFAULT_VOCAB,
        help="vocabulary size (assumed: the paper does not give it)",
    )
    p.add_argument(
        "--sizes",
        type=json.loads,
        default=None,
        metavar="JSON",
        help='override the paper sizes key by key, e.g. \'{"ehrmamba": {"d_model": 32, "n_layers": 2}}\'',
    )
    p.add_argument("--params", default="params/mimic-iv.yaml", help="training settings and tokenizer limits")
    p.add_argument("--out", default=None, help="also write the numbers as JSON here")
    args = p.parse_args(argv)
    if args.length < 2 or args.warmup < 0 or args.steps < 1 or args.max_batch < 1:
        p.error("need --length >= 2, --warmup >= 0, --steps >= 1, --max-batch >= 1")
    if args.sizes is not None and not isinstance(args.sizes, dict):
        p.error('--sizes must be a JSON object: {"ehrmamba": {...}, "multibird": {...}}')
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from repro.training.loop import resolve_device

    try:
        device = resolve_device(args.device)
        merged_sizes(args.sizes)
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    why = refusal(device, args.sizes)
    if why:
        print(f"{PROG}: {why}", file=sys.stderr)
        return 2
    print(
        f"{timing.device_name(device)} | torch {torch.__version__} | "
        f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'} | length {args.length} | vocab {args.vocab} | "
        f"warm-up {args.warmup}, timed {args.steps} steps (median) | max batch {args.max_batch}",
        flush=True,
    )
    results = run(
        args.sizes,
        device=device,
        length=args.length,
        phases=args.phases,
        warmup=args.warmup,
        steps=args.steps,
        max_batch=args.max_batch,
        vocab=args.vocab,
        params_file=args.params,
    )
    for m, s in results["sizes"].items():
        built = next((r.get("params") for r in results["rows"] if r["model"] == LABELS[m]), None)
        print(f"{LABELS[m]}: {s} ({_num(built)} parameters)")
    table = paper_table(results)
    print(table.to_string(index=False))
    print(table.attrs["note"])
    if args.out:
        print(f"wrote {write_json(results, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
