"""DistributedDataParallel on CPU (gloo, 2 processes): the same steps as one process with the same global
batch, checkpoints written by rank 0 and resumed by every rank, and the torchrun entry point."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_train import _data, _model

from repro.config import TrainParams
from repro.training import loop

CASES = [("clm", "ehrmamba"), ("mlm", "cehr_bert"), ("classify", "ehrmamba")]
PARAMS = TrainParams(batch_size=8, checkpoint_every=3, warmup_frac=0.2)
STEPS = 5
CPU = torch.device("cpu")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fit(objective: str, name: str, checkpoint: Path | None = None):
    # no dropout anywhere: masks are drawn per process, so only dropout-free runs match exactly
    model = _model(name, cls_dropout=0.0)
    model.set_n_outputs(1)
    res = loop.fit(model, _data(), PARAMS, objective, STEPS, 1e-3, 0, CPU, checkpoint, progress=False)
    return model, res


def _worker(rank: int, world: int, port: int, out: str, mode: str) -> None:
    """mode "equal": every case from scratch; "die": CLM with a checkpoint, stopped at step 4 on every rank
    (as a killed job); "resume": CLM resumed from that checkpoint."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        if mode == "die":
            real = loop.batch_indices

            def dying(n, bs, seed, step, *a):
                if step == 4:
                    raise KeyboardInterrupt
                return real(n, bs, seed, step, *a)

            loop.batch_indices = dying
            try:
                _fit("clm", "ehrmamba", Path(out) / "resume.pt")
            except KeyboardInterrupt:
                pass
            return
        cases = CASES if mode == "equal" else [("clm", "ehrmamba")]
        for objective, name in cases:
            model, res = _fit(objective, name, Path(out) / "resume.pt" if mode == "resume" else None)
            if rank == 0:
                torch.save({"state": model.state_dict(), "losses": res.losses, "resumed_from": res.resumed_from},
                           Path(out) / f"{objective}-ddp.pt")  # fmt: skip
    finally:
        torch.distributed.destroy_process_group()


def _spawn(out: Path, mode: str) -> None:
    mp.spawn(_worker, args=(2, _port(), str(out), mode), nprocs=2, join=True)


def _close(a: dict, b: dict, atol: float = 2e-5) -> None:
    for k, v in a.items():
        assert torch.allclose(v, b[k], atol=atol), f"{k}: max diff {(v - b[k]).abs().max():.2e}"


@pytest.mark.slow  # several processes (pyproject: slow)
def test_two_processes_take_the_same_steps_as_one(tmp_path):
    _spawn(tmp_path, "equal")
    for objective, name in CASES:
        one, res = _fit(objective, name)
        two = torch.load(tmp_path / f"{objective}-ddp.pt")
        _close(one.state_dict(), two["state"])
        assert torch.allclose(torch.tensor(res.losses), torch.tensor(two["losses"]), atol=1e-5)


@pytest.mark.slow  # several processes (pyproject: slow)
def test_a_distributed_run_resumes_from_rank_zeros_checkpoint(tmp_path):
    _spawn(tmp_path, "die")  # both ranks stop after rank 0 wrote the step-3 checkpoint
    assert torch.load(tmp_path / "resume.pt", weights_only=False)["step"] == 3
    _spawn(tmp_path, "resume")
    two = torch.load(tmp_path / "clm-ddp.pt")
    one, _ = _fit("clm", "ehrmamba")
    assert two["resumed_from"] == 3
    _close(one.state_dict(), two["state"])


TINY = """
name: tiny-ddp
device: cpu
seeds: [0]
tasks: [mortality_1m]
models: [ehrmamba]
match_params: false
model_sizes:
  ehrmamba: {d_model: 16, n_layers: 1, d_state: 4}
data: {synthetic: true, n_subjects: 80, shard_size: 40}
tokenizer: {max_len: 64, n_bins: 3}
train: {batch_size: 8, pretrain_steps: 3, checkpoint_every: 2, num_threads: 1, workers: 1}
"""


@pytest.mark.slow  # several processes (pyproject: slow)
def test_torchrun_entry_point_trains_and_resumes(tmp_path):
    from repro.data.synthetic import write_synthetic_meds

    data = write_synthetic_meds(tmp_path / "meds", 80, seed=5, shard_size=40)
    params = tmp_path / "tiny.yaml"
    params.write_text(TINY)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_port()}",
           "-m", "repro.training.ddp", "--params", str(params), "--data", str(data), "--out", str(tmp_path / "ck.pt")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REPRO_DATA_WORKERS": "1"}
    runs = [subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    first, second = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert first["processes"] == 2 and first["steps_run"] == 3 and first["global_batch"] == 8
    assert second["resumed_from"] == 3 and second["steps_run"] == 0
