"""MPS around the training pool (repro.training.mps), with a stand-in control daemon on PATH: the block's
processes see the daemon's pipe, a probe must find a server, the daemon is stopped after (killed if it
will not quit), and every way it can fail says so."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_run_project

from repro.training import mps, shard

# the probe's CUDA context, here without a GPU: it only checks that the daemon's pipe exists
OK_INIT = "import os; assert os.path.isdir(os.environ['CUDA_MPS_PIPE_DIRECTORY'])"
FAILING_INIT = "import sys; sys.exit('no CUDA-capable device is detected')"


@pytest.fixture
def daemon(tmp_path, monkeypatch):
    """A fake nvidia-cuda-mps-control first on PATH: `-d` starts a stand-in daemon (a sleep) and writes its
    pid where the real one does; `get_server_list` lists a server; `quit` ends the stand-in. Returns the
    log of its calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    exe = bin_dir / mps.CONTROL
    exe.write_text(
        "#!/bin/sh\n"
        'pidfile="$CUDA_MPS_PIPE_DIRECTORY/nvidia-cuda-mps-control.pid"\n'
        "if [ $# -eq 0 ]; then\n"
        '  read line; echo "stdin:$line" >> "$FAKE_MPS_LOG"\n'
        '  case "$line" in\n'
        '    get_server_list) [ -z "$FAKE_NO_SERVER" ] && echo 4242 ;;\n'
        '    quit*) [ -z "$FAKE_STUBBORN" ] && [ -f "$pidfile" ] && kill "$(cat "$pidfile")" ;;\n'
        "  esac\n"
        "  exit 0\n"
        "fi\n"
        'echo "args:$* pipe:$CUDA_MPS_PIPE_DIRECTORY" >> "$FAKE_MPS_LOG"\n'
        '[ -n "$FAKE_MPS_RC" ] && exit "$FAKE_MPS_RC"\n'
        'sleep 300 & echo $! > "$pidfile"\n'
        "exit 0\n"
    )
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MPS_LOG", str(log))
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.delenv("CUDA_MPS_LOG_DIRECTORY", raising=False)
    monkeypatch.setattr(mps, "DEFAULT_PIPE", str(tmp_path / "no-site-daemon"))
    return log


def _calls(log: Path) -> list[str]:
    return [c.split(" pipe:")[0] for c in log.read_text().splitlines()] if log.exists() else []


def _alive(pid: int) -> bool:
    return (
        mps._alive(pid)
        and "Z"
        not in subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout
    )


def test_the_block_runs_as_the_daemons_client_and_the_daemon_stops_after(daemon):
    with mps.service("auto", "cuda", 6, cuda=True, cuda_init=OK_INIT) as line:
        assert line == "on"
        pipe = os.environ["CUDA_MPS_PIPE_DIRECTORY"]
        seen = subprocess.run(
            [sys.executable, "-c", "import os; print(os.environ['CUDA_MPS_PIPE_DIRECTORY'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert seen == pipe and Path(pipe).is_dir()  # a training process started here finds the daemon
        pid = int((Path(pipe) / "nvidia-cuda-mps-control.pid").read_text())
        assert _alive(pid)
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ and not Path(pipe).exists()
    assert _calls(daemon) == ["args:-d", "stdin:get_server_list", "stdin:quit -t 10"]
    assert not _alive(pid)


def test_an_error_inside_the_block_still_stops_the_daemon_and_restores_the_environment(daemon):
    with pytest.raises(KeyboardInterrupt):
        with mps.service("auto", "cuda", 6, cuda=True, cuda_init=OK_INIT):
            pipe = os.environ["CUDA_MPS_PIPE_DIRECTORY"]
            pid = int((Path(pipe) / "nvidia-cuda-mps-control.pid").read_text())
            raise KeyboardInterrupt
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ and not _alive(pid)
    assert _calls(daemon)[-1] == "stdin:quit -t 10"


def test_a_daemon_that_will_not_quit_is_killed(daemon, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_STUBBORN", "1")
    monkeypatch.setattr(mps, "QUIT_WAIT_S", 0.5)
    with mps.service("auto", "cuda", 6, cuda=True, cuda_init=OK_INIT):
        pid = int((Path(os.environ["CUDA_MPS_PIPE_DIRECTORY"]) / "nvidia-cuda-mps-control.pid").read_text())
    assert not _alive(pid) and "outlived quit; killing it" in capsys.readouterr().err
    assert _calls(daemon)[-2:] == ["stdin:quit -t 10", "stdin:quit"]  # a plain quit before the kill


def test_a_probe_that_fails_stops_the_daemon_and_auto_trains_without_it(daemon, capsys):
    with mps.service("auto", "cuda", 6, cuda=True, cuda_init=FAILING_INIT) as line:
        assert line.startswith("off: probe client exited 1") and "no CUDA-capable device" in line
        assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    assert _calls(daemon) == ["args:-d", "stdin:quit -t 10"]
    assert "MPS not used" in capsys.readouterr().err
    with pytest.raises(mps.MpsError, match="mps: required, but probe client exited 1"):
        with mps.service("required", "cuda", 6, cuda=True, cuda_init=FAILING_INIT):
            pass


def test_a_client_that_found_no_server_ran_without_mps(daemon, monkeypatch):
    monkeypatch.setenv("FAKE_NO_SERVER", "1")  # the client reached no daemon: CUDA runs it without MPS
    with mps.service("auto", "cuda", 6, cuda=True, cuda_init=OK_INIT) as line:
        assert line.startswith("off: probe client exited 1") and "lists no MPS server" in line


def test_a_daemon_that_does_not_start(daemon, monkeypatch):
    monkeypatch.setenv("FAKE_MPS_RC", "4")
    with mps.service("auto", "cuda", 6, cuda=True, cuda_init=OK_INIT) as line:
        assert line.startswith(f"off: {mps.CONTROL} -d exited 4")
    assert _calls(daemon)[0] == "args:-d" and "stdin:get_server_list" not in _calls(daemon)


def test_no_daemon_on_the_node(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.setattr(mps, "DEFAULT_PIPE", str(tmp_path / "no-site-daemon"))
    with mps.service("auto", "cuda", 6, cuda=True, cuda_init=OK_INIT) as line:
        assert line == f"off: no {mps.CONTROL} on PATH"
    with pytest.raises(mps.MpsError, match=f"mps: required, but no {mps.CONTROL} on PATH"):
        with mps.service("required", "cuda", 6, cuda=True, cuda_init=OK_INIT):
            pass


def test_the_nodes_own_daemon_is_used_as_it_is_and_a_stale_variable_is_not(daemon, monkeypatch, tmp_path):
    site = tmp_path / "site-mps"
    site.mkdir()
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(site))
    with mps.service("auto", "cuda", 6, cuda=True, cuda_init=FAILING_INIT) as line:
        assert line.startswith("off: probe")  # no control pipe there: a stale variable, not a daemon
    (site / "control").touch()
    with mps.service("required", "cuda", 6, cuda=True, cuda_init=FAILING_INIT) as line:
        assert line == f"on: the node's own daemon ({site})"
        assert os.environ["CUDA_MPS_PIPE_DIRECTORY"] == str(site)
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY")
    monkeypatch.setattr(mps, "DEFAULT_PIPE", str(site))  # the default path, no variable
    with mps.service("auto", "cuda", 6, cuda=True, cuda_init=FAILING_INIT) as line:
        assert line == f"on: the node's own daemon ({site})"
    assert _calls(daemon).count("args:-d") == 1  # only the stale variable's run started one


@pytest.mark.parametrize(
    ("mode", "device", "processes", "cuda", "why"),
    [
        ("never", "cuda", 6, True, "off: mps: never"),
        ("auto", "cpu", 6, True, "off: no CUDA GPU"),
        ("auto", "auto", 6, False, "off: no CUDA GPU"),
        ("auto", "cuda", 1, True, "off: one training process"),
        ("required", "cuda", 1, True, "off: one training process"),  # nothing to share is no failure
    ],
)
def test_nothing_starts_where_mps_has_nothing_to_share(daemon, mode, device, processes, cuda, why):
    with mps.service(mode, device, processes, cuda=cuda, cuda_init=OK_INIT) as line:
        assert line == why
    assert _calls(daemon) == []


def test_required_on_a_node_without_a_gpu_stops(daemon):
    with pytest.raises(mps.MpsError, match="mps: required, but no CUDA GPU"):
        with mps.service("required", "auto", 6, cuda=False, cuda_init=OK_INIT):
            pass


def test_repro_run_serves_the_groups_that_train_and_not_the_timing_ones(daemon, tmp_path, monkeypatch):
    from repro.report import pipeline

    params = tiny_run_project(
        tmp_path,
        monkeypatch,
        {
            nb: "import os, pathlib\n"
            f"pathlib.Path({str(tmp_path / nb)!r}).write_text(os.environ.get('CUDA_MPS_PIPE_DIRECTORY', 'none'))\n"
            for nb in ("train", "time")
        },
        f"name: tiny\ndevice: auto\ntrain:\n  workers: 3\ndata:\n  meds_dir: {tmp_path}\n",
    )
    monkeypatch.setattr(pipeline, "_manifest_plan", lambda params_file, data_dir: {"summary": []})
    monkeypatch.setattr(pipeline, "STAGES", (("train",), ("time",)))
    monkeypatch.setattr(pipeline, "TRAINING_NOTEBOOKS", ("train",))
    monkeypatch.setattr(mps, "service", functools.partial(mps.service, cuda=True, cuda_init=OK_INIT))

    def fake_shard(params, data_dir, work, part, workers):  # the pool that trains ahead of the notebooks
        (tmp_path / "ahead").write_text(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "none"))
        return []

    monkeypatch.setattr(shard, "train_shard", fake_shard)
    out = pipeline.run(str(params), render=False, notebooks=("train", "time"))
    assert (tmp_path / "ahead").read_text().startswith("/tmp/repro-mps-")
    # started for the pool and stopped after it: the training notebook then only evaluates, and the timing
    # notebook runs without it
    assert (tmp_path / "train").read_text() == "none" and (tmp_path / "time").read_text() == "none"
    once = ["args:-d", "stdin:get_server_list", "stdin:quit -t 10"]
    assert _calls(daemon) == once
    manifest = json.loads((out / "manifest.json").read_text())
    assert [g.get("mps") for g in manifest["groups"]] == [None, None] and manifest["training"]["mps"] == "on"
    pooled = tmp_path / "pooled"
    shutil.copytree(out, pooled)
    # a training notebook run without the others (no pool ahead) trains in its own pool, through the daemon
    monkeypatch.setattr(pipeline, "TRAINING_NOTEBOOKS", ("train", "other"))
    (tmp_path / "ahead").unlink()
    out = pipeline.run(str(params), render=False, notebooks=("train", "time"), force=True)
    assert not (tmp_path / "ahead").exists() and (tmp_path / "time").read_text() == "none"
    assert (tmp_path / "train").read_text().startswith("/tmp/repro-mps-") and _calls(daemon) == once * 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert [g.get("mps") for g in manifest["groups"]] == ["on", None] and "training" not in manifest
    # resumed after the pool finished and the training notebook failed: its runs are cached, so no daemon
    (pooled / "notebooks" / "train.ipynb").unlink()
    shutil.rmtree(out)
    os.replace(pooled, out.with_name("tiny.failed"))
    out = pipeline.run(str(params), render=False, notebooks=("train", "time"), resume=True)
    assert (tmp_path / "train").read_text() == "none" and _calls(daemon) == once * 2
    assert json.loads((out / "manifest.json").read_text())["training"]["mps"] == "on"  # the pool's, carried


def test_doctor_says_how_training_processes_will_share_the_gpu(daemon, monkeypatch, tmp_path):
    line, ok = mps.describe("auto", "cuda", 6, True)
    assert ok and line.startswith("6 processes through a private MPS daemon")
    assert _calls(daemon) == []  # nothing started
    assert mps.describe("auto", "cpu", 2, False) == ("2 on the CPU (MPS is for GPUs)", True)
    assert mps.describe("required", "cuda", 1, True)[1] is True  # one process: nothing to share
    monkeypatch.setenv("PATH", str(tmp_path))
    line, ok = mps.describe("auto", "cuda", 6, True)
    assert ok and line == f"MPS off: no {mps.CONTROL} on PATH; 6 processes take turns on the GPU"
    assert mps.describe("required", "cuda", 6, True)[1] is False


@pytest.mark.gpu
def test_a_real_mps_daemon_serves_training_processes_and_goes_away():
    """On a GPU node with NVIDIA's daemon: `required` starts it (its probe saw a server), two CUDA processes
    run through it while a server is listed, and after the block the daemon has exited."""
    import shutil

    if shutil.which(mps.CONTROL) is None or mps.node_daemon():
        pytest.skip(f"needs {mps.CONTROL} on PATH and no MPS daemon of the node's own")
    with mps.service("required", "cuda", 2) as line:
        assert line == "on"
        pipe = Path(os.environ["CUDA_MPS_PIPE_DIRECTORY"])
        pid = int((pipe / "nvidia-cuda-mps-control.pid").read_text())
        code = "import torch; x = torch.randn(256, 256, device='cuda'); print(float((x @ x).sum()))"
        procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
        listed = subprocess.run([mps.CONTROL], input="get_server_list\n", capture_output=True, text=True)
        assert listed.stdout.split(), listed
    assert not mps._alive(pid) and not pipe.exists()
