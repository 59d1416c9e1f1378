"""Training-step timing, peak memory and out-of-memory capture over sequence lengths (H2, H4).

One helper, ``time_step``, times every benchmark: warm-up steps, synchronize, then per-step CUDA events on
a GPU (timer "cuda-events") or ``time.perf_counter`` on the CPU (timer "wall-clock"); ms_per_step is the
median of the timed steps. Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps on CUDA;
on the CPU it is not measured (NaN, and the row's ``mem_source`` says so), because the process's peak RSS
is a lifetime maximum that no single row owns.

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
clipping at 1.0, bf16 autocast on CUDA, as ``repro.train.fit`` does.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import meds
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from repro.data.dataset import IGNORE, SequenceDataset, mlm_mask
from repro.data.tokenizer import CLS, N_TOKEN_TYPES, SPECIALS

TIMER_CUDA = "cuda-events"
TIMER_WALL = "wall-clock"
OK = "ok"
OOM = "oom"
SKIP_REFERENCE = "skipped: reference path on CUDA"
SKIP_BUDGET = "skipped: time budget spent"
REFERENCE_LABEL = "[reference (slow path)]"
MEM_CUDA = "torch.cuda.max_memory_allocated"
MEM_CPU = "not measured (CPU)"
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
# the timing helper
# --------------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """What ``time_step`` measured: median and per-step milliseconds, the timer, the peak memory."""

    ms_per_step: float
    ms_steps: list[float]
    timer: str
    peak_mem_gib: float
    mem_source: str


def time_step(step: Callable[[], Any], device: torch.device, warmup: int = 2, steps: int = 5) -> Timing:
    """Run ``step`` ``warmup`` times, synchronize, then time ``steps`` calls (CUDA events or wall clock).

    >>> t = time_step(lambda: sum(range(1000)), torch.device("cpu"), warmup=1, steps=3)
    >>> t.timer, len(t.ms_steps), t.ms_per_step >= 0, t.mem_source
    ('wall-clock', 3, True, 'not measured (CPU)')
    >>> time_step(lambda: None, torch.device("cpu"), steps=0)
    Traceback (most recent call last):
    ValueError: need warmup >= 0 and steps >= 1, got 2 and 0
    """
    if warmup < 0 or steps < 1:
        raise ValueError(f"need warmup >= 0 and steps >= 1, got {warmup} and {steps}")
    device = torch.device(device)
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)
        ]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        ms = [start.elapsed_time(end) for start, end in events]
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        return Timing(float(np.median(ms)), ms, TIMER_CUDA, peak, MEM_CUDA)
    ms = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        ms.append(1000 * (time.perf_counter() - t0))
    return Timing(float(np.median(ms)), ms, TIMER_WALL, float("nan"), MEM_CPU)


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error: CUDA's, or a RuntimeError saying so (CUDA, cuBLAS or the CPU allocator).

    >>> is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")), is_oom(ValueError("x"))
    (True, False)
    """
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_memory(device: torch.device) -> None:
    """Release what a failed or finished row held, so the next row starts from the same state."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def device_name(device: torch.device) -> str:
    """The device a row ran on, in words: "cuda (NVIDIA H100 80GB HBM3)" or "cpu (2 threads)"."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"


def is_reference(kernel_path: str | None) -> bool:
    """Whether a kernel path is a pure-PyTorch reference ("reference-chunked", "reference-ssd", ...)."""
    return kernel_path is not None and "reference" in kernel_path


def autocast(device: torch.device):
    """bf16 autocast on CUDA (as training uses), nothing elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


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
    """One pretraining step as ``repro.train.fit`` runs it: CLM (causal) or MLM (encoders), AdamW, clip 1.0.

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


@torch.no_grad()
def probe_kernel_path(model: nn.Module, device: torch.device) -> str | None:
    """The kernel path a tiny forward takes on ``device`` (decides the reference-path refusal cheaply)."""
    length = min(PROBE_LEN, int(getattr(model.backbone, "max_len", PROBE_LEN)))
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
        path = probe_kernel_path(model, device)
        row["kernel_path"] = path or "-"
        reference_on_cuda = device.type == "cuda" and is_reference(path)
        if reference_on_cuda and not allow_reference:
            row["status"] = SKIP_REFERENCE
            return
        step = step_factory(
            model, synthetic_batch(int(model.vocab_size), batch, length, device, seed=seed), device
        )
        t = time_step(step, device, warmup, steps)
        path = model.kernel_path or "-"
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
    from repro.experiment import Trainer

    trainer = Trainer(prep, Path("outputs/.unused"), progress=False)  # build_kwargs only; nothing is written
    return {m: trainer.build_kwargs(m) for m in models}


def efficiency_sweep(
    prep,
    lengths: Sequence[int] | None = None,
    batch_sizes: Sequence[int] | None = None,
    models: Sequence[str] | None = None,
    progress: bool = True,
    steps: tuple[int, int] | None = None,
) -> pd.DataFrame:
    """The params' sweep (``efficiency.lengths`` x ``batch_sizes`` x ``models``) on the run's device.

    ``steps``: (warm-up, timed) steps per row instead of the params' ``warmup_steps`` / ``timed_steps``;
    the out-of-memory boundary needs one of each (the peak is reached on the first step after the
    optimizer state exists), and its longest rows cost seconds per step.
    """
    from repro.train import resolve_device

    params = prep.params
    eff = params.efficiency
    models = list(models or eff.models)
    builders = length_builders(matched_kwargs(prep, models), prep.tokenizer.vocab_size)
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


# --------------------------------------------------------------------------------------------------------
# analysis: slopes, epochs, H2 comparisons, the OOM boundary
# --------------------------------------------------------------------------------------------------------
def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Slope of log y against log x (least squares); NaN with fewer than two usable points.

    >>> round(loglog_slope([512, 1024, 2048], [1.0, 4.0, 16.0]), 6)
    2.0
    >>> loglog_slope([512], [1.0])
    nan
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if ok.sum() < 2 or np.unique(x[ok]).size < 2:
        return float("nan")
    return float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0])


def scaling_slopes(rows: pd.DataFrame, last: int = 4) -> pd.DataFrame:
    """Per model and batch size: log-log slopes of time and peak memory against length.

    Fitted on the ``last`` longest lengths each model ran at (status ok): the asymptotic regime; short
    lengths are launch-bound on a GPU and would flatten the slope. Slope 1 is linear, 2 quadratic.
    """
    out = []
    ok = rows[rows["status"] == OK]
    for (model, batch), g in ok.groupby(["model", "batch"], sort=False):
        g = g.sort_values("length").tail(last)
        out.append(
            {
                "model": model,
                "batch": int(batch),
                "kernel_path": "; ".join(dict.fromkeys(g["kernel_path"])),
                "lengths fitted": f"{int(g['length'].min())}-{int(g['length'].max())} ({len(g)})",
                "time slope": loglog_slope(g["length"], g["ms_per_step"]),
                "memory slope": loglog_slope(g["length"], g["peak_mem_gib"]),
            }
        )
    return pd.DataFrame(
        out, columns=["model", "batch", "kernel_path", "lengths fitted", "time slope", "memory slope"]
    )


def epoch_estimates(rows: pd.DataFrame, n_samples: int, n_tokens: int) -> pd.DataFrame:
    """Seconds per pretraining epoch from measured step times: ceil(n_samples / batch) steps x ms_per_step.

    ``rows`` are timed at the run's batch size and ``max_len``; every batch is counted as padded to
    ``max_len`` (an upper bound: ``fit`` pads a batch to its longest sequence). ``n_tokens`` (real tokens
    in one epoch) turns it into real tokens per second.
    """
    out = []
    for r in rows.itertuples(index=False):
        steps = math.ceil(n_samples / r.batch)
        secs = steps * r.ms_per_step / 1000 if r.status == OK else np.nan
        out.append(
            {
                "model": r.model,
                "kernel_path": r.kernel_path,
                "device": r.device,
                "timer": r.timer,
                "batch": r.batch,
                "length": r.length,
                "ms_per_step": r.ms_per_step,
                "steps per epoch": steps,
                "epoch seconds (upper bound)": secs,
                "real tokens/s": n_tokens / secs if secs and np.isfinite(secs) else np.nan,
                "status": r.status,
            }
        )
    return pd.DataFrame(out)


H2_MARGIN = 0.10
H2_RULE = (
    "For EHRMamba against each Transformer and batch size: supported when the Transformer ran out of memory "
    "at a length where EHRMamba trained, or when, at the longest length both trained at, EHRMamba's time per "
    "step and peak memory are both at least 10 % below the Transformer's; not supported when EHRMamba ran out "
    "of memory where the Transformer trained, or is at least 10 % slower or larger there; inconclusive "
    "otherwise. On a CPU memory is not measured and the verdict rests on time alone (and says so). Across "
    "Transformers and batch sizes the overall rule of the accuracy notebooks applies."
)


def _ratio(a: float, b: float) -> float:
    return float(a / b) if np.isfinite(a) and np.isfinite(b) and b > 0 else float("nan")


def h2_comparisons(
    rows: pd.DataFrame,
    new: str = "ehrmamba",
    baselines: Sequence[str] = ATTENTION_MODELS,
    margin: float = H2_MARGIN,
) -> pd.DataFrame:
    """EHRMamba against each Transformer per batch size, verdicts computed by ``H2_RULE``."""
    out = []
    for batch, g in rows.groupby("batch", sort=True):
        mine = g[g["model"] == new].set_index("length")
        for base in baselines:
            theirs = g[g["model"] == base].set_index("length")
            if theirs.empty or mine.empty:
                continue
            both = mine.index.intersection(theirs.index)
            m_ok = mine.loc[both, "status"] == OK
            t_ok = theirs.loc[both, "status"] == OK
            t_oom = theirs.loc[both, "status"] == OOM
            m_oom = mine.loc[both, "status"] == OOM
            rec = {"batch": int(batch), "baseline": base, "length": np.nan, "time ratio": np.nan}
            rec |= {"memory ratio": np.nan}
            if (m_ok & t_oom).any():
                L = int(both[(m_ok & t_oom).to_numpy()].min())
                rec |= {
                    "length": L,
                    "verdict": "supported",
                    "why": f"{base} out of memory at {L}; {new} trains",
                }
            elif (m_oom & t_ok).any():
                L = int(both[(m_oom & t_ok).to_numpy()].min())
                rec |= {
                    "length": L,
                    "verdict": "not supported",
                    "why": f"{new} out of memory at {L}; {base} trains",
                }
            elif not (m_ok & t_ok).any():
                rec |= {"verdict": "inconclusive", "why": "no length where both trained"}
            else:
                L = int(both[(m_ok & t_ok).to_numpy()].max())
                rt = _ratio(mine.loc[L, "ms_per_step"], theirs.loc[L, "ms_per_step"])
                rm = _ratio(mine.loc[L, "peak_mem_gib"], theirs.loc[L, "peak_mem_gib"])
                better = rt <= 1 - margin and (np.isnan(rm) or rm <= 1 - margin)
                worse = rt >= 1 + margin or (np.isfinite(rm) and rm >= 1 + margin)
                verdict = (
                    "supported" if better and not worse else "not supported" if worse else "inconclusive"
                )
                why = f"at {L}: time x{rt:.2f}" + (
                    f", memory x{rm:.2f}" if np.isfinite(rm) else ", time only (memory not measured)"
                )
                rec |= {"length": L, "time ratio": rt, "memory ratio": rm, "verdict": verdict, "why": why}
            out.append(rec)
    cols = ["batch", "baseline", "length", "time ratio", "memory ratio", "verdict", "why"]
    return pd.DataFrame(out, columns=cols)


def oom_boundary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per model (and batch): the longest length that trained, the shortest that did not, and why.

    Read from measured rows only: a length that was never attempted is never reported as a boundary.
    """
    out = []
    for (model, batch), g in rows.groupby(["model", "batch"], sort=False):
        g = g.sort_values("length")
        ok = g[g["status"] == OK]
        failed = g[(g["status"] != OK) & ~g["status"].str.startswith(SKIP_BUDGET)]
        attempted = g[~g["status"].str.startswith(SKIP_BUDGET)]
        longest = ok.iloc[-1] if len(ok) else None
        first_fail = failed.iloc[0] if len(failed) else None
        out.append(
            {
                "model": model,
                "batch": int(batch),
                "kernel_path": "; ".join(k for k in dict.fromkeys(g["kernel_path"]) if k != "-") or "-",
                "device": g["device"].iloc[0],
                "longest length trained": int(longest["length"]) if longest is not None else np.nan,
                "peak GiB there": float(longest["peak_mem_gib"]) if longest is not None else np.nan,
                "first length that failed": int(first_fail["length"]) if first_fail is not None else np.nan,
                "failure": first_fail["status"]
                if first_fail is not None
                else (
                    f"no failure up to {int(attempted['length'].max())}"
                    if len(attempted)
                    else "not attempted"
                ),
            }
        )
    return pd.DataFrame(out)


H4_MEMORY_RULE = (
    "For EHRMamba against each Transformer (batch as swept): supported when the Transformer failed out of "
    "memory at a length where EHRMamba trained; not supported when EHRMamba failed out of memory at a length "
    "where the Transformer trained; inconclusive otherwise (neither ran out of memory within the swept lengths, "
    "or a row was skipped). Across Transformers the overall rule of the accuracy notebooks applies."
)


def h4_memory_comparisons(
    rows: pd.DataFrame, new: str = "ehrmamba", baselines: Sequence[str] = ATTENTION_MODELS
) -> pd.DataFrame:
    """The out-of-memory part of H4 from the boundary sweep, verdicts by ``H4_MEMORY_RULE``."""
    cmp = h2_comparisons(rows, new, baselines, margin=np.inf)  # only the OOM branches can decide
    cmp = cmp.drop(columns=["time ratio", "memory ratio"])
    undecided = ~cmp["why"].str.contains("out of memory")
    cmp.loc[undecided, "verdict"] = "inconclusive"
    cmp.loc[undecided, "why"] = "no out-of-memory difference within the swept lengths"
    return cmp


# --------------------------------------------------------------------------------------------------------
# H4: accuracy when models may read longer histories
# --------------------------------------------------------------------------------------------------------
@dataclass
class LengthRun:
    """One model finetuned and scored with ``max_len = length`` (status "ok", "oom", "skipped: ...")."""

    model: str
    length: int
    status: str
    kernel_path: str
    n_params: int
    seconds: float
    peak_mem_gib: float
    predictions: pd.DataFrame | None  # held_out: subject_id, split, target, label, score

    @property
    def key(self) -> str:
        """Display name carrying the length, e.g. "EHRMamba @ 2048"."""
        from repro.results import label

        return f"{label(self.model)} @ {self.length}"


def at_length(prep, length: int, sizes: Mapping[str, Mapping[str, Any]] | None = None):
    """A view of the prepared data whose tokenizer, parameters and model sizes allow ``length`` tokens.

    Model sizes are the run's (``sizes``, default ``matched_kwargs``: matched to EHRMamba at the run's
    ``max_len``, as in H1) with ``max_len`` raised to ``length``; the H4 training settings
    (``efficiency.long_*``) replace the run's.
    """
    params, eff = prep.params, prep.params.efficiency
    sizes = {
        name: {k: v for k, v in kw.items() if k not in ("n_types", "max_visits", "max_len")}
        for name, kw in (sizes or matched_kwargs(prep, eff.long_models)).items()
    }
    train = dataclasses.replace(
        params.train,
        batch_size=eff.long_batch_size,
        # scoring batches hold as many tokens as the run's own at max_len (never fewer rows than training)
        eval_batch_size=max(
            eff.long_batch_size, params.train.eval_batch_size * params.tokenizer.max_len // length
        ),
        pretrain_steps=eff.long_pretrain_steps,
        finetune_steps=eff.long_finetune_steps,
        num_threads=cpu_threads(params),
    )
    tok_params = dataclasses.replace(params.tokenizer, max_len=length)
    new = dataclasses.replace(
        params, tokenizer=tok_params, train=train, model_sizes=sizes, match_params=False
    )
    tok = copy.copy(prep.tokenizer)
    tok.params = tok_params
    return dataclasses.replace(prep, params=new, tokenizer=tok)


def history_tokens(prep, task: str, split: str = meds.held_out_split) -> pd.Series:
    """Untruncated token count of each sample's history before its prediction time, by subject_id."""
    from repro.experiment import encode_samples

    items, df = encode_samples(prep, task, split, max_len=2**31 - 1)
    out = pd.Series([len(e) for e in items], index=df["subject_id"].to_numpy(), name="history tokens")
    if not out.index.is_unique:
        raise ValueError(f"task {task} has several samples per subject in {split}; subgroups need one")
    return out


def _train_and_score(trainer, prep_l, name: str, task: str, seed: int, device: torch.device):
    from repro.data.tasks import label_columns
    from repro.experiment import long_predictions
    from repro.train import fit, predict

    tp = prep_l.params.train
    model, _ = trainer.pretrained(name, seed)
    items, df = trainer.samples(task, meds.train_split)  # encoded once per length, for every model
    cols = label_columns(df)
    model.set_n_outputs(len(cols))
    fit(
        model,
        SequenceDataset(items, df[cols].to_numpy()),
        tp,
        "classify",
        tp.finetune_steps,
        tp.finetune_lr,
        seed + 1000,
        device,
        progress=trainer.progress,
        desc=f"finetune {name} @ {prep_l.params.tokenizer.max_len}",
    )
    items, df = trainer.samples(task, meds.held_out_split)
    scores = predict(model, SequenceDataset(items), device, tp.eval_batch_size)
    return model, long_predictions(df, scores)


def long_history_runs(prep, work_dir: str | Path, progress: bool = False) -> list[LengthRun]:
    """Finetune each of ``efficiency.long_models`` at each of ``efficiency.long_lengths`` and score held_out.

    Same task, seed, steps and batch size at every length, so only the context a model may read changes.
    Out-of-memory errors are recorded as status "oom"; a reference kernel path on CUDA is refused as in the
    sweeps unless ``efficiency.allow_reference_on_cuda``.
    """
    from repro.experiment import Trainer

    eff = prep.params.efficiency
    sizes = matched_kwargs(prep, eff.long_models)
    runs = []
    for length in sorted(eff.long_lengths):
        prep_l = at_length(prep, length, sizes)
        trainer = Trainer(prep_l, Path(work_dir) / f"len{length}", progress=progress)
        device = trainer.device
        for name in eff.long_models:
            run = LengthRun(name, length, OK, "-", 0, 0.0, float("nan"), None)
            model = None
            try:
                model = trainer.build(name, eff.long_seed).to(device)
                run.n_params, path = model.n_params(), probe_kernel_path(model, device)
                ref = device.type == "cuda" and is_reference(path)
                run.kernel_path = f"{path} {REFERENCE_LABEL}" if ref else (path or "-")
                if ref and not eff.allow_reference_on_cuda:
                    run.status = SKIP_REFERENCE
                    runs.append(run)
                    continue
                model = None
                free_memory(device)
                t0 = time.perf_counter()
                model, run.predictions = _train_and_score(
                    trainer, prep_l, name, eff.long_task, eff.long_seed, device
                )
                run.seconds = time.perf_counter() - t0
                run.kernel_path = f"{model.kernel_path} {REFERENCE_LABEL}" if ref else model.kernel_path
                if device.type == "cuda":
                    run.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
            except Exception as exc:  # noqa: BLE001 - an out-of-memory run is a result; others are reported
                if not is_oom(exc):
                    raise
                run.status, run.predictions = OOM, None
            finally:
                model = None
                free_memory(device)
            runs.append(run)
    return runs


def _long_frame(runs: Sequence[LengthRun], task: str) -> pd.DataFrame:
    frames = [
        r.predictions.assign(model=r.key, task=task, seed=0)
        for r in runs
        if r.status == OK and r.predictions is not None
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def long_history_auroc(
    runs: Sequence[LengthRun], history: pd.Series, threshold: int, n_boot: int, ci: float, task: str
) -> pd.DataFrame:
    """Held-out AUROC with patient-clustered bootstrap CIs per run, on the long-history subgroup and on all.

    Every run is scored on the same resampled patients (``repro.stats.paired_bootstrap``), so the CIs are
    directly comparable across models and lengths. Runs that did not finish keep their status.
    """
    from repro.stats import paired_bootstrap

    preds = _long_frame(runs, task)
    est: dict[tuple[str, str], dict] = {}
    if not preds.empty:
        preds["row_id"] = preds["subject_id"].astype(str) + "|" + preds["target"].astype(str)
        long_ids = set(history.index[history > threshold])
        for group, part in (("long", preds[preds["subject_id"].isin(long_ids)]), ("all", preds)):
            if part.empty:
                continue
            keys = list(dict.fromkeys(part["model"]))
            res = paired_bootstrap(part, keys, "auroc", n_boot=n_boot, seed=0, ci=ci, pairs=[])
            for r in res.itertuples(index=False):
                est[(r.model, group)] = {"estimate": r.estimate, "lo": r.lo, "hi": r.hi}
    out = []
    for r in runs:
        rec = {
            "model": r.model,
            "length": r.length,
            "key": r.key,
            "status": r.status,
            "kernel_path": r.kernel_path,
            "parameters": r.n_params,
            "seconds": r.seconds,
            "peak GiB": r.peak_mem_gib,
        }
        for group in ("long", "all"):
            e = est.get((r.key, group), {"estimate": np.nan, "lo": np.nan, "hi": np.nan})
            rec |= {f"auroc_{group}": e["estimate"], f"lo_{group}": e["lo"], f"hi_{group}": e["hi"]}
        out.append(rec)
    df = pd.DataFrame(out)
    long_ids = history.index[history > threshold]
    df.attrs["subgroup"] = {"threshold": int(threshold), "n_subjects": int(len(long_ids))}
    if not preds.empty:
        first = preds[preds["model"] == preds["model"].iloc[0]]
        sub = first[first["subject_id"].isin(set(long_ids))]
        df.attrs["subgroup"] |= {"n_rows": int(len(sub)), "n_positive": int(sub["label"].sum())}
    return df


def h4_accuracy_comparisons(
    runs: Sequence[LengthRun],
    history: pd.Series,
    threshold: int,
    n_boot: int,
    ci: float,
    task: str,
    new: str = "ehrmamba",
    baselines: Sequence[str] = ATTENTION_MODELS,
    **kw: float,
) -> pd.DataFrame:
    """EHRMamba at the longest length it trained at minus each Transformer at the longest length it trained
    at, held-out AUROC on the long-history subgroup; paired bootstrap, BH across these comparisons, and the
    computed verdict (``repro.results.paired_comparisons``)."""
    from repro.results import paired_comparisons

    def longest(model: str) -> LengthRun | None:
        done = [r for r in runs if r.model == model and r.status == OK]
        return max(done, key=lambda r: r.length) if done else None

    mine = longest(new)
    pairs = [(mine.key, b.key) for b in map(longest, baselines) if b is not None] if mine else []
    preds = _long_frame(runs, task)
    if not pairs or preds.empty:
        return pd.DataFrame()
    sub = preds[preds["subject_id"].isin(set(history.index[history > threshold]))].assign(
        split=meds.held_out_split
    )
    if sub.empty:
        return pd.DataFrame()
    return paired_comparisons(sub, pairs, n_boot, ci, **kw)


def headline(comparisons: pd.DataFrame, table: pd.DataFrame) -> str:
    """H4's accuracy headline: the comparison against the Transformer run with the best subgroup AUROC."""
    if comparisons.empty:
        return "inconclusive (comparison not run)"
    auroc = table.set_index("key")["auroc_long"]
    best = max(comparisons["baseline"], key=lambda k: auroc.get(k, -np.inf))
    return str(comparisons.loc[comparisons["baseline"] == best, "verdict"].iloc[0])
