"""Real-data mode keeps patient-level data out of everything a run publishes (e2e: runs a tiny report)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from repro.cli import main
from repro.data.synthetic import write_synthetic_meds

ROOT = Path(__file__).resolve().parents[1]
NAME = "pytest-private"
TINY = """
name: tiny-private
device: cpu
seeds: [0]
tasks: [mortality_1m, inhospital_mortality_24h]
models: [ehrmamba, transformer, count_lr]
mpf_models: [ehrmamba]
match_params: false
model_sizes:
  ehrmamba: {d_model: 16, n_layers: 1, d_state: 4}
  transformer: {d_model: 16, n_layers: 1, n_heads: 2}
data: {synthetic: true, n_subjects: 400, shard_size: 200}
tokenizer: {max_len: 64, n_bins: 3}
train: {batch_size: 16, eval_batch_size: 64, pretrain_steps: 2, finetune_steps: 2, workers: 1, num_threads: 1}
# 40 held-out patients: in-hospital deaths can be a single one (the pre-flight needs one of each class)
eval: {n_bootstrap: 20, n_permutations: 20, null_simulations: 4, null_resamples: 20, min_label_positives: 1}
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
"""


def _with_hospital_like_ids(root: Path) -> list[int]:
    """Rewrite subject ids as 9-digit numbers (like MIMIC's) so a leak can be found by text search."""
    ids: set[int] = set()
    new = lambda s: 912_000_000 + 7919 * s  # noqa: E731 - a bijection onto distinctive ids
    for f in [*sorted((root / "data").rglob("*.parquet")), root / "metadata" / "subject_splits.parquet"]:
        t = pq.read_table(f)
        i = t.schema.get_field_index("subject_id")
        col = new(t.column(i).to_numpy())
        ids.update(int(x) for x in col)
        pq.write_table(t.set_column(i, t.schema.field(i), pa.array(col.astype(np.int64))), f)
    return sorted(ids)


@pytest.mark.e2e
def test_real_mode_report_holds_no_subject_id(tmp_path):
    from pypdf import PdfReader

    data = write_synthetic_meds(tmp_path / "meds", 400, seed=3, shard_size=200)
    shutil.rmtree(data / "truth")  # real data carry no truth
    ids = _with_hospital_like_ids(data)
    params = tmp_path / "tiny.yaml"
    params.write_text(TINY)
    out = ROOT / "outputs" / NAME
    try:
        assert main(["run", str(params), "--data", str(data), "--name", NAME, "--force"]) == 0
        texts = {}
        for f in out.rglob("*"):
            if f.is_file() and "work" not in f.relative_to(out).parts:
                if f.suffix == ".pdf":
                    texts[f] = "\n".join(p.extract_text() for p in PdfReader(f).pages)
                else:
                    texts[f] = f.read_bytes().decode("utf-8", errors="ignore")
        assert any(f.name == "report.html" for f in texts) and any(f.suffix == ".pdf" for f in texts)
        leaks = [(f.name, s) for f, t in texts.items() for s in map(str, ids) if s in t]
        assert not leaks, f"subject ids in published files: {leaks[:5]}"
        cohort = (out / "notebooks" / "00_cohort.ipynb").read_text()
        assert "user-supplied directory" in cohort  # the run really was in real-data mode
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ROOT / "outputs" / f"{NAME}.failed", ignore_errors=True)
