"""The grid over a real SLURM (e2e): an array of two tasks trains the slices of a tiny grid into one work
folder (slurm/submit-grid.sh -> repro train --shard), and the dependent job renders the report from it with
no training run repeated. CI starts a one-machine cluster (slurm/local-cluster.sh) and sets
REPRO_REQUIRE_SLURM, so there the test cannot skip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from repro.data.synthetic import write_synthetic_meds

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
NAME = "pytest-slurm"
TINY = """
name: tiny-slurm
device: cpu
seeds: [0, 1]
tasks: [mortality_1m, los_1w]
models: [ehrmamba, transformer, count_lr]
mpf_models: [ehrmamba]
match_params: false
model_sizes:
  ehrmamba: {d_model: 16, n_layers: 1, d_state: 4}
  transformer: {d_model: 16, n_layers: 1, n_heads: 2}
tokenizer: {max_len: 64, n_bins: 3}
train: {batch_size: 16, eval_batch_size: 64, pretrain_steps: 2, finetune_steps: 2, workers: 1, num_threads: 1}
eval: {n_bootstrap: 20, n_permutations: 20, null_simulations: 4, null_resamples: 20, min_label_positives: 1}
probes: {forecast_patients: 10}
efficiency:
  models: [ehrmamba, transformer]
  lengths: [16, 32]
  batch_sizes: [2]
  warmup_steps: 1
  timed_steps: 1
  boundary_lengths: [32, 64]
  long_models: [ehrmamba, transformer]
  long_lengths: [16, 64]
  long_history_tokens: 32
  long_finetune_steps: 2
  cpu_threads: 1
representations:
  variants: {soft bins: {values: soft}}
  models: [ehrmamba]
  tasks: [mortality_1m]
  seeds: [0]
"""


def _slurm_up() -> bool:
    if shutil.which("sbatch") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


def _wait(job_ids: list[str], timeout: float) -> None:
    """Until no job of ``job_ids`` is queued; a job whose dependency failed ends the wait (cancelled)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        q = subprocess.run(
            ["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %r"], capture_output=True, text=True
        )
        if q.returncode == 0 and not q.stdout.strip():
            return
        if "DependencyNeverSatisfied" in q.stdout:
            subprocess.run(["scancel", *job_ids])
            return
        time.sleep(3)
    subprocess.run(["scancel", *job_ids])
    raise AssertionError(f"SLURM jobs {job_ids} still queued or running after {timeout:.0f} s")


def test_an_array_job_trains_the_grid_and_the_report_job_repeats_no_run(tmp_path):
    if not _slurm_up():
        if os.environ.get("REPRO_REQUIRE_SLURM"):
            pytest.fail("REPRO_REQUIRE_SLURM is set but no SLURM answers (slurm/local-cluster.sh starts one)")
        pytest.skip("no SLURM here: slurm/local-cluster.sh starts a one-machine cluster")
    meds = write_synthetic_meds(tmp_path / "meds", 400, seed=11, shard_size=200)
    pfile = tmp_path / "tiny.yaml"
    pfile.write_text(TINY)
    work = tmp_path / "work"
    env = os.environ | {
        "WORK": str(work),
        "NAME": NAME,
        "GRES": "",  # a CPU-only cluster
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    final = ROOT / "outputs" / NAME
    logs: list[Path] = []
    try:
        out = subprocess.run(
            ["slurm/submit-grid.sh", str(pfile), "2", str(meds)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        train, report = out.stdout.split()
        logs = [ROOT / f"slurm-repro-train-{train}_{i}.out" for i in (0, 1)]
        logs.append(ROOT / f"slurm-repro-report-{report}.out")
        _wait([train, report], timeout=1200)
        texts = [p.read_text() if p.exists() else f"{p} missing" for p in logs]
        for text in texts[:2]:
            assert "every group of the slice finished" in text, text[-3000:]
        assert f"run written to {final}" in texts[2], texts[2][-3000:]
        started = int(texts[2].splitlines()[0].split()[1])

        manifest = json.loads((final / "manifest.json").read_text())
        assert manifest["work_dir"] == str(work.resolve())
        assert (final / "report.html").is_file() and (final / "report.pdf").is_file()
        trained = sorted(p.name for p in (work / "runs").glob("*.pkl"))
        assert "ehrmamba-mortality_1m-seed1.pkl" in trained and "ehrmamba-mpf-seed0.pkl" in trained
        # the report job trained nothing of the grid: every file of it is older than the job (notebook 04's
        # long-history runs are its own, outside the grid)
        late = [
            p.relative_to(work)
            for p in work.rglob("*")
            if p.is_file()
            and p.stat().st_mtime > started + 1
            and p.suffix != ".lock"
            and "long-history" not in p.parts
        ]
        assert late == [], late
    finally:
        shutil.rmtree(final, ignore_errors=True)
        for p in logs:
            p.unlink(missing_ok=True)
