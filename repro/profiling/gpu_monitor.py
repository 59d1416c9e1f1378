"""How busy the GPU was while a notebook ran: the share of wall time with a kernel executing.

Why a sampler and not CUDA events: a notebook trains in its kernel process and in worker processes, so
the only view that covers all of them is the device's own counter. `nvidia-smi`'s `utilization.gpu` is
the percentage of the last sample period during which one or more kernels ran (NVML's definition); its
mean over a notebook's samples is the GPU-busy share the run manifest reports. It says the GPU was not
idle, not that its multiprocessors were full: a small kernel counts as busy.

Where nvidia-smi is absent (CPU runs) the monitor records nothing and `summary()` is None.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from repro.config import write_text_atomic

QUERY = "utilization.gpu,memory.used"


class GpuMonitor:
    """Context manager sampling `nvidia-smi` every `interval_ms` in a child process."""

    def __init__(self, interval_ms: int = 500, gpu: int | None = None) -> None:
        self.interval_ms = interval_ms
        self.gpu = gpu
        self._proc: subprocess.Popen | None = None
        self._log: Path | None = None
        self.samples: list[tuple[float, float]] = []  # (utilization %, memory used MiB), all GPUs pooled

    def __enter__(self) -> GpuMonitor:
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return self
        fd, name = tempfile.mkstemp(prefix="repro-gpu-", suffix=".csv")
        self._log = Path(name)
        cmd = [exe, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", f"-lms={self.interval_ms}"]
        if self.gpu is not None:
            cmd.append(f"--id={self.gpu}")
        with open(fd, "w") as out:
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None or self._log is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self.samples = parse(self._log.read_text())
        self._log.unlink(missing_ok=True)

    def write_trace(self, path: Path) -> None:
        """Write the samples as CSV (seconds, busy %, MiB): where in a notebook the GPU waited, which the
        mean alone cannot say. Nothing is written without samples; a rerun replaces the file whole."""
        if not self.samples:
            return
        lines = ["seconds,gpu_busy_pct,gpu_mem_mib"]
        lines += [f"{i * self.interval_ms / 1000:.1f},{u:g},{m:g}" for i, (u, m) in enumerate(self.samples)]
        write_text_atomic(path, "\n".join(lines) + "\n")

    def summary(self) -> dict[str, Any] | None:
        """Mean GPU-busy share (0-1), peak memory used by all processes (MiB) and the sample count."""
        if not self.samples:
            return None
        util = [u for u, _ in self.samples]
        return {
            "gpu_busy_share": round(sum(util) / len(util) / 100.0, 3),
            "gpu_mem_peak_mib": max(m for _, m in self.samples),
            "gpu_samples": len(self.samples),
            "gpu_sample_ms": self.interval_ms,
        }


def parse(text: str) -> list[tuple[float, float]]:
    """(utilization %, memory MiB) per line of `nvidia-smi --format=csv,noheader,nounits`; bad lines skipped.

    >>> parse("87, 1024\\n[N/A], 5\\n3, 2048\\n")
    [(87.0, 1024.0), (3.0, 2048.0)]
    """
    rows = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            rows.append((float(parts[0]), float(parts[1])))
        except (IndexError, ValueError):
            continue
    return rows
