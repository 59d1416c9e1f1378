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
`repro train` does the same around its shard. A node whose scheduler already runs MPS (a control pipe
at ``CUDA_MPS_PIPE_DIRECTORY`` or at the default /tmp/nvidia-mps) is used as it is. Before the block a
probe process makes a CUDA context and asks the daemon for its servers: a client that cannot reach the
daemon runs without MPS and says nothing, so a server must be listed. ``mps: auto`` falls back to sharing
by turns, saying why, when the daemon is missing or the probe fails; ``required`` stops instead. On the
way out the daemon is told to quit within 10 s (forcing off clients an interrupted run left behind) and
is killed by its pid if it has not.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"
MODES = ("auto", "required", "never")
ENV = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")
DEFAULT_PIPE = "/tmp/nvidia-mps"  # where clients look when CUDA_MPS_PIPE_DIRECTORY is unset
NOTHING_TO_SHARE = "off: one training process"
QUIT_WAIT_S = 20.0  # after `quit -t 10`, how long the daemon has to exit before it is killed
# The probe client: a CUDA context made with the daemon's variables set (the first client starts the MPS
# server, so a node that forbids MPS fails here), then, while that context lives, the daemon's server list.
CUDA_INIT = "import torch; torch.ones(1, device='cuda').sum().item()"
PROBE = """
import subprocess, sys
{init}
ask = lambda line: subprocess.run([sys.argv[1]], input=line + "\\n", capture_output=True, text=True, timeout=30)
servers = ask("get_server_list").stdout.split()
if not servers:
    sys.exit("the daemon lists no MPS server: the client ran without MPS")
"""


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
        return NOTHING_TO_SHARE
    return None


def node_daemon() -> str | None:
    """The pipe directory of an MPS daemon the node already runs (its control pipe exists), or None."""
    for pipe in (os.environ.get(ENV[0]), DEFAULT_PIPE):
        if pipe and (Path(pipe) / "control").exists():
            return pipe
    return None


def _unmet(mode: str, why: str) -> bool:
    """``required`` asked for MPS and ``why`` says it cannot be had (one process has nothing to share)."""
    return mode == "required" and why.startswith("off") and why != NOTHING_TO_SHARE


def _decide(mode: str, device: str, processes: int, cuda: bool) -> tuple[str | None, str | None]:
    """(why MPS is on without us or off, the control daemon to start): one of the two is None."""
    why = wanted(mode, device, processes, cuda)
    if why is None and (pipe := node_daemon()):
        return f"on: the node's own daemon ({pipe})", None
    if why is not None:
        return why, None
    exe = shutil.which(CONTROL)
    return (None, exe) if exe else (f"off: no {CONTROL} on PATH", None)


def describe(mode: str, device: str, processes: int, cuda: bool) -> tuple[str, bool]:
    """`repro doctor`'s line, without starting anything; False when ``required`` cannot be met."""
    why, exe = _decide(mode, device, processes, cuda)
    if why is None:
        return f"{processes} processes through a private MPS daemon ({exe}; probed when a run starts)", True
    if why.startswith("on"):
        return f"{processes} processes through the node's own MPS daemon ({node_daemon()})", True
    if why == "off: no CUDA GPU":
        return f"{processes} on the CPU (MPS is for GPUs)", not _unmet(mode, why)
    shared = "" if processes < 2 else f"; {processes} processes take turns on the GPU"
    return f"MPS {why}{shared}", not _unmet(mode, why)


@contextmanager
def service(
    mode: str,
    device: str,
    processes: int,
    cuda: bool | None = None,
    cuda_init: str = CUDA_INIT,
    timeout_s: float = 120.0,
) -> Iterator[str]:
    """Run the block with an MPS daemon serving the processes it starts; yields the manifest's line.

    The daemon's variables are set in ``os.environ`` for the block only, so the training processes (and
    notebook kernels) started inside it become its clients and those started later do not. ``cuda_init``
    is the probe's first line (tests replace it: they have no GPU).
    """
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    why, exe = _decide(mode, device, processes, cuda)
    if why is not None:
        if _unmet(mode, why):
            raise MpsError(f"mps: required, but {why.removeprefix('off: ')}")
        yield why
        return
    folder = Path(tempfile.mkdtemp(prefix="repro-mps-", dir="/tmp"))  # a pipe path must stay short
    env = os.environ | {ENV[0]: str(folder / "pipe"), ENV[1]: str(folder / "log")}
    for name in ENV:
        Path(env[name]).mkdir()
    try:  # from `-d` on, whatever happens, the daemon is stopped before its folder goes
        failure = _start(exe, env, cuda_init, timeout_s)
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
        _stop(exe, env)
        shutil.rmtree(folder, ignore_errors=True)


def _start(exe: str, env: dict[str, str], cuda_init: str, timeout_s: float) -> str | None:
    """Start the control daemon and probe it with one client; None, or what went wrong."""
    out = Path(env[ENV[1]]) / "start.out"
    try:  # output to a file: a daemon holding inherited pipes open would block a captured run
        with out.open("w") as f:
            rc = subprocess.run(
                [exe, "-d"], env=env, stdout=f, stderr=subprocess.STDOUT, timeout=30
            ).returncode
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{CONTROL} -d failed: {exc}"
    if rc:
        return f"{CONTROL} -d exited {rc}: {_tail(out.read_text())}"
    probe = [sys.executable, "-c", PROBE.format(init=cuda_init), exe]
    try:
        client = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"probe client failed: {exc}"
    if client.returncode:
        logs = Path(env[ENV[1]])
        seen = " ".join(
            _tail(f.read_text()) for f in (logs / "control.log", logs / "server.log") if f.exists()
        )
        return f"probe client exited {client.returncode}: {_tail(client.stderr)} {seen}".strip()
    return None


def _stop(exe: str, env: dict[str, str]) -> None:
    """Quit the daemon, its servers forced off after 10 s (a plain quit if a daemon does not know ``-t``);
    kill it by its pid if it is still there."""
    pid_file = Path(env[ENV[0]]) / "nvidia-cuda-mps-control.pid"
    pid = int(pid_file.read_text().strip()) if pid_file.exists() else None
    for command in ("quit -t 10", "quit"):
        try:
            subprocess.run([exe], input=command + "\n", env=env, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"repro: the MPS daemon did not take {command!r}: {exc}", file=sys.stderr)
        if pid is None:
            return
        deadline = time.monotonic() + QUIT_WAIT_S / 2
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if not _alive(pid):
            return
    print(f"repro: the MPS daemon (pid {pid}) outlived quit; killing it", file=sys.stderr)
    os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process took the pid
        return False
    return True


def _tail(text: str, n: int = 300) -> str:
    return " ".join(text.split())[-n:]
