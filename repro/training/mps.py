"""NVIDIA's Multi-Process Service around the training pool: processes sharing one GPU run side by side.

Without MPS a GPU runs one process's kernels at a time and switches between processes, so six
default-size training processes together trained little faster than one alone. On one H100
(2026-12-06; EHRMamba, 250 pretraining steps of 32 histories per process, a common start; the trial
script that became `python -m repro.bench share`, which has not itself run on a GPU yet): one process with
CUDA-graphed steps trained 1.01M tokens/s, six eager processes 1.15M in all and six graphed ones 1.21M;
through MPS the six reached 1.57M (eager) and 1.54M (graphed), 1.27-1.36x. MPS changes no computation,
only how kernels of different processes share the GPU, so it is part of no run's key.

`repro run` starts a private control daemon (its own pipe directory, so nothing else on the node talks to
it) for the notebook groups that train, never for the timing notebooks, and stops it when the group ends;
`repro train` does the same around its shard. A node whose scheduler already runs MPS
(``CUDA_MPS_PIPE_DIRECTORY`` set) is used as it is. ``mps: auto`` falls back to sharing by turns, saying
why, when the daemon is missing or a probe process cannot reach the GPU through it; ``required`` stops.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"
MODES = ("auto", "required", "never")
ENV = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")
# a CUDA context made through the daemon: the first client starts the MPS server, so this is where a node
# that forbids it (or a GPU another user holds in exclusive mode) fails
PROBE = (sys.executable, "-c", "import torch; torch.ones(1, device='cuda').sum().item()")


class MpsError(RuntimeError):
    """``mps: required`` and MPS could not be started; the message says why."""


def wanted(mode: str, device: str, processes: int, cuda: bool) -> str | None:
    """Why MPS is not for this run (None: try it).

    >>> wanted("auto", "cuda", 6, True) is None
    True
    >>> wanted("auto", "cuda", 1, True)
    'off: one training process'
    >>> wanted("never", "cuda", 6, True)
    'off: mps: never'
    """
    if mode not in MODES:
        raise ValueError(f"mps must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "never":
        return "off: mps: never"
    if device == "cpu" or not cuda:
        return "off: no CUDA GPU"
    if processes < 2:
        return "off: one training process"
    return None


def describe(mode: str, device: str, processes: int, cuda: bool) -> tuple[str, bool]:
    """`repro doctor`'s line, without starting anything; False when ``required`` cannot be met."""
    why = wanted(mode, device, processes, cuda)
    if why is None and os.environ.get(ENV[0]):
        return f"the node's own MPS daemon ({ENV[0]}={os.environ[ENV[0]]})", True
    if why is None:
        exe = shutil.which(CONTROL)
        if exe is None:
            why = f"off: no {CONTROL} on PATH"
        else:
            return (
                f"{processes} processes through a private MPS daemon ({exe}; probed when a run starts)",
                True,
            )
    ok = not (mode == "required" and why.startswith("off"))
    if why == "off: no CUDA GPU":
        return f"{processes} on the CPU (MPS is for GPUs)", ok
    shared = "" if processes < 2 else f"; {processes} processes take turns on the GPU"
    return f"MPS {why}{shared}", ok


@contextmanager
def service(
    mode: str,
    device: str,
    processes: int,
    cuda: bool | None = None,
    probe: Sequence[str] = PROBE,
    timeout_s: float = 120.0,
) -> Iterator[str]:
    """Run the block with an MPS daemon serving the processes it starts; yields the manifest's line.

    The daemon's variables are set in ``os.environ`` for the block only, so the training processes (and
    notebook kernels) started inside it become its clients and those started later do not.
    """
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    why = wanted(mode, device, processes, cuda)
    if why is None and os.environ.get(ENV[0]):
        why = f"on: the node's own daemon ({ENV[0]}={os.environ[ENV[0]]})"
    exe = shutil.which(CONTROL) if why is None else None
    if why is None and exe is None:
        why = f"off: no {CONTROL} on PATH"
    if why is not None:
        if mode == "required" and why.startswith("off"):
            raise MpsError(f"mps: required, but {why.removeprefix('off: ')}")
        yield why
        return
    folder = Path(tempfile.mkdtemp(prefix="repro-mps-", dir="/tmp"))  # a pipe path must stay short
    env = os.environ | {ENV[0]: str(folder / "pipe"), ENV[1]: str(folder / "log")}
    for name in ENV:
        Path(env[name]).mkdir()
    started = False
    try:
        failure = _start(exe, env, probe, timeout_s)
        started = failure is None or failure.startswith("probe")
        if failure is not None:
            if mode == "required":
                raise MpsError(f"mps: required, but {failure}")
            print(
                f"repro: MPS not used ({failure}); training processes share the GPU by turns", file=sys.stderr
            )
            yield f"off: {failure}"
            return
        saved = {name: os.environ.get(name) for name in ENV}
        os.environ.update({name: env[name] for name in ENV})
        try:
            yield "on"
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    finally:
        if started:
            _stop(exe, env)
        shutil.rmtree(folder, ignore_errors=True)


def _start(exe: str, env: dict[str, str], probe: Sequence[str], timeout_s: float) -> str | None:
    """Start the control daemon and make one client through it; None, or what went wrong."""
    try:
        daemon = subprocess.run([exe, "-d"], env=env, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{CONTROL} -d failed: {exc}"
    if daemon.returncode:
        return f"{CONTROL} -d exited {daemon.returncode}: {_tail(daemon.stderr or daemon.stdout)}"
    try:
        client = subprocess.run(list(probe), env=env, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"probe client failed: {exc}"
    if client.returncode:
        log = Path(env[ENV[1]]) / "control.log"
        seen = _tail(log.read_text()) if log.exists() else ""
        return f"probe client exited {client.returncode}: {_tail(client.stderr)} {seen}".strip()
    return None


def _stop(exe: str, env: dict[str, str]) -> None:
    try:
        subprocess.run([exe], input="quit\n", env=env, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"repro: could not stop the MPS daemon: {exc}", file=sys.stderr)


def _tail(text: str, n: int = 300) -> str:
    return " ".join(text.split())[-n:]
