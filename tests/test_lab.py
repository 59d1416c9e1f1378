"""`make lab`: JupyterLab from the `notebook` extra serves each py:percent file as a notebook that runs."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_lab_opens_a_percent_script_as_a_notebook_that_runs(tmp_path):
    pytest.importorskip("jupyterlab")
    import papermill as pm

    port, token = _free_port(), secrets.token_hex(8)
    lab = Path(sys.executable).with_name("jupyter-lab")
    cmd = [str(lab), "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1"]
    cmd += [f"--IdentityProvider.token={token}", "--ServerApp.root_dir=notebooks", "--allow-root"]
    env = os.environ | {
        "JUPYTERLAB_SETTINGS_DIR": str(ROOT / ".jupyter" / "lab" / "user-settings"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
    }
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                _get(f"{base}/api/status?token={token}")
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not answer within 60 s")
        model = _get(f"{base}/api/contents/00_cohort.py?type=notebook&content=1&token={token}")
        assert model["type"] == "notebook"  # jupytext's contents manager reads the script as a notebook
        nb = nbformat.from_dict(model["content"])
        assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb.cells)
        viewers = _get(f"{base}/lab/api/settings/@jupyterlab/docmanager-extension:plugin?token={token}")
        assert (
            viewers["settings"]["defaultViewers"]["python"] == "Jupytext Notebook"
        )  # a double click opens it
    finally:
        server.terminate()
        server.wait(timeout=30)
    src = tmp_path / "00_cohort.ipynb"
    nbformat.write(nb, src)
    run_dir = tmp_path / "run"
    pm.execute_notebook(
        str(src),
        str(tmp_path / "out.ipynb"),
        parameters={"params_file": "params/smoke.yaml", "run_dir": str(run_dir), "data_dir": ""},
        kernel_name="python3",
        cwd=str(ROOT / "notebooks"),
        progress_bar=False,
    )
    assert (run_dir / "results" / "00_cohort.json").is_file()
