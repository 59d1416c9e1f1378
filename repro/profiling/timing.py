"""Training-step timing and peak memory, on CUDA or the CPU, and out-of-memory detection (H2, H4).

One helper, ``time_step``, times every benchmark: warm-up steps, synchronize, then per-step CUDA events on
a GPU (timer "cuda-events") or ``time.perf_counter`` on the CPU (timer "wall-clock"); ms_per_step is the
median of the timed steps. Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps on CUDA;
on the CPU it is not measured (NaN, and the row's ``mem_source`` says so), because the process's peak RSS
is a lifetime maximum that no single row owns."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

TIMER_CUDA = "cuda-events"


TIMER_WALL = "wall-clock"


OK = "ok"


OOM = "oom"


SKIP_REFERENCE = "skipped: reference path on CUDA"


SKIP_BUDGET = "skipped: time budget spent"


REFERENCE_LABEL = "[reference (slow path)]"


MEM_CUDA = "torch.cuda.max_memory_allocated"


MEM_CPU = "not measured (CPU)"


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
    n = torch.get_num_threads()
    return f"{device.type} ({n} thread{'' if n == 1 else 's'})"


def is_reference(kernel_path: str | None) -> bool:
    """Whether a kernel path is a pure-PyTorch reference ("reference-chunked", "reference-ssd", ...)."""
    return kernel_path is not None and "reference" in kernel_path


def autocast(device: torch.device):
    """bf16 autocast on CUDA (as training uses), nothing elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)
