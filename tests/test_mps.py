"""MPS around the training pool (repro.training.mps), with a stand-in control daemon on PATH: the block's
processes see the daemon's pipe, the daemon is stopped after, and every way it can fail says so."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from repro.training import mps

# a client that exits 0 only when it can see a pipe directory that exists (where the daemon would listen)
PROBE = [
    sys.executable,
    "-c",
    "import os, sys; sys.exit(0 if os.path.isdir(os.environ['CUDA_MPS_PIPE_DIRECTORY']) else 3)",
]
FAILING_PROBE = [
    sys.executable,
    "-c",
    "import sys; print('no CUDA-capable device', file=sys.stderr); sys.exit(1)",
]


@pytest.fixture
def daemon(tmp_path, monkeypatch):
    """A fake nvidia-cuda-mps-control first on PATH; returns the log of its calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    exe = bin_dir / mps.CONTROL
    exe.write_text(
        "#!/bin/sh\n"
        'if [ $# -eq 0 ]; then read line; echo "stdin:$line" >> "$FAKE_MPS_LOG"; exit 0; fi\n'
        'echo "args:$* pipe:$CUDA_MPS_PIPE_DIRECTORY" >> "$FAKE_MPS_LOG"\n'
        'exit "${FAKE_MPS_RC:-0}"\n'
    )
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MPS_LOG", str(log))
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.delenv("CUDA_MPS_LOG_DIRECTORY", raising=False)
    return log


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_the_block_runs_as_the_daemons_client_and_the_daemon_stops_after(daemon):
    with mps.service("auto", "cuda", 6, cuda=True, probe=PROBE) as line:
        assert line == "on"
        pipe = os.environ["CUDA_MPS_PIPE_DIRECTORY"]
        seen = subprocess.run(
            [sys.executable, "-c", "import os; print(os.environ['CUDA_MPS_PIPE_DIRECTORY'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert seen == pipe and Path(pipe).is_dir()  # a training process started here finds the daemon
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ and not Path(pipe).exists()
    assert _calls(daemon) == [f"args:-d pipe:{pipe}", "stdin:quit"]


def test_a_daemon_that_serves_no_client_is_stopped_and_auto_trains_without_it(daemon, capsys):
    with mps.service("auto", "cuda", 6, cuda=True, probe=FAILING_PROBE) as line:
        assert line.startswith("off: probe client exited 1") and "no CUDA-capable device" in line
        assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    assert [c.split()[0] for c in _calls(daemon)] == ["args:-d", "stdin:quit"]
    assert "MPS not used" in capsys.readouterr().err
    with pytest.raises(mps.MpsError, match="mps: required, but probe client exited 1"):
        with mps.service("required", "cuda", 6, cuda=True, probe=FAILING_PROBE):
            pass


def test_a_daemon_that_does_not_start_is_not_stopped(daemon, monkeypatch):
    monkeypatch.setenv("FAKE_MPS_RC", "4")
    with mps.service("auto", "cuda", 6, cuda=True, probe=PROBE) as line:
        assert line.startswith(f"off: {mps.CONTROL} -d exited 4")
    assert [c.split()[0] for c in _calls(daemon)] == ["args:-d"]


def test_no_daemon_on_the_node(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    with mps.service("auto", "cuda", 6, cuda=True, probe=PROBE) as line:
        assert line == f"off: no {mps.CONTROL} on PATH"
    with pytest.raises(mps.MpsError, match=f"mps: required, but no {mps.CONTROL} on PATH"):
        with mps.service("required", "cuda", 6, cuda=True, probe=PROBE):
            pass


def test_the_nodes_own_daemon_is_used_as_it_is(daemon, monkeypatch):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", "/var/run/site-mps")
    with mps.service("required", "cuda", 6, cuda=True, probe=FAILING_PROBE) as line:
        assert line == "on: the node's own daemon (CUDA_MPS_PIPE_DIRECTORY=/var/run/site-mps)"
        assert os.environ["CUDA_MPS_PIPE_DIRECTORY"] == "/var/run/site-mps"
    assert _calls(daemon) == []


@pytest.mark.parametrize(
    ("mode", "device", "processes", "cuda", "why"),
    [
        ("never", "cuda", 6, True, "off: mps: never"),
        ("auto", "cpu", 6, True, "off: no CUDA GPU"),
        ("auto", "auto", 6, False, "off: no CUDA GPU"),
        ("auto", "cuda", 1, True, "off: one training process"),
    ],
)
def test_nothing_starts_where_mps_has_nothing_to_share(daemon, mode, device, processes, cuda, why):
    with mps.service(mode, device, processes, cuda=cuda, probe=PROBE) as line:
        assert line == why
    assert _calls(daemon) == []


def test_required_on_a_node_without_a_gpu_stops(daemon):
    with pytest.raises(mps.MpsError, match="mps: required, but no CUDA GPU"):
        with mps.service("required", "auto", 6, cuda=False, probe=PROBE):
            pass


def test_repro_run_serves_the_groups_that_train_and_not_the_timing_ones(daemon, tmp_path, monkeypatch):
    from repro.report import pipeline

    (tmp_path / "notebooks").mkdir()
    head = '# %% tags=["parameters"]\nparams_file = ""\nrun_dir = ""\ndata_dir = ""\n'
    for nb in ("train", "time"):
        (tmp_path / "notebooks" / f"{nb}.py").write_text(
            head + "# %%\nimport os, pathlib\n"
            f"pathlib.Path({str(tmp_path / nb)!r}).write_text(os.environ.get('CUDA_MPS_PIPE_DIRECTORY', 'none'))\n"
        )
    for f in pipeline.REPORT_FILES:
        (tmp_path / f).write_text("")
    params = tmp_path / "tiny.yaml"
    params.write_text(f"name: tiny\ndevice: auto\ntrain:\n  workers: 3\ndata:\n  meds_dir: {tmp_path}\n")
    monkeypatch.setattr(pipeline, "project_root", lambda: tmp_path)
    monkeypatch.setattr(pipeline, "_check_cohort", lambda params, data_dir: [])
    monkeypatch.setattr(pipeline, "_manifest_plan", lambda params_file, data_dir: {"summary": []})
    monkeypatch.setattr(pipeline, "STAGES", (("train",), ("time",)))
    monkeypatch.setattr(pipeline, "TRAINING_NOTEBOOKS", ("train",))
    monkeypatch.setattr(mps, "service", functools.partial(mps.service, cuda=True, probe=PROBE))
    out = pipeline.run(str(params), render=False, notebooks=("train", "time"))
    pipe = (tmp_path / "train").read_text()
    assert pipe.startswith("/tmp/repro-mps-") and (tmp_path / "time").read_text() == "none"
    assert _calls(daemon) == [f"args:-d pipe:{pipe}", "stdin:quit"]  # stopped before the timing notebook
    groups = json.loads((out / "manifest.json").read_text())["groups"]
    assert [g.get("mps") for g in groups] == ["on", None]


def test_doctor_says_how_training_processes_will_share_the_gpu(daemon, monkeypatch, tmp_path):
    line, ok = mps.describe("auto", "cuda", 6, True)
    assert ok and line.startswith("6 processes through a private MPS daemon")
    assert _calls(daemon) == []  # nothing started
    assert mps.describe("auto", "cpu", 2, False) == ("2 on the CPU (MPS is for GPUs)", True)
    monkeypatch.setenv("PATH", str(tmp_path))
    line, ok = mps.describe("auto", "cuda", 6, True)
    assert ok and line == f"MPS off: no {mps.CONTROL} on PATH; 6 processes take turns on the GPU"
    assert mps.describe("required", "cuda", 6, True)[1] is False
