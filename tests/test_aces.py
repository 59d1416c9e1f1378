"""inhospital_mortality_24h agrees with an ACES task config run on the same MEDS data (es-aces, test-only)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from repro.config import CodePatterns
from repro.data import meds, tasks
from repro.data.synthetic import write_synthetic_meds

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "etl" / "aces" / "inhospital_mortality_24h.yaml"


def test_inhospital_mortality_labels_match_aces(tmp_path):
    pytest.importorskip("aces")
    cli = shutil.which("aces-cli", path=str(Path(sys.executable).parent))
    assert cli, "es-aces is installed but its aces-cli entry point is not beside this python"
    data = write_synthetic_meds(tmp_path / "meds", 300, seed=11, shard_size=100)
    out = tmp_path / "aces.parquet"
    subprocess.run(
        [cli, f"data.path={data / 'data'}", "data.standard=meds", f"cohort_dir={CONFIG.parent}",
         f"cohort_name={CONFIG.stem}", f"output_filepath={out}", f"hydra.run.dir={tmp_path / 'hydra'}"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    theirs = pd.read_parquet(out)[["subject_id", "prediction_time", "boolean_value"]]
    theirs["prediction_time"] = theirs["prediction_time"].astype("datetime64[us]").astype("int64")
    ours = tasks.build_task(
        "inhospital_mortality_24h", meds.read_events(meds.load_meds(data)), CodePatterns()
    )[["subject_id", "prediction_time", "label"]]
    both = ours.merge(theirs, on=["subject_id", "prediction_time"], how="outer", indicator=True)
    assert len(ours) > 200 and ours["label"].sum() > 5  # enough samples and deaths to mean something
    assert (both["_merge"] == "both").all(), both[both["_merge"] != "both"].head()
    assert (both["label"].astype(bool) == both["boolean_value"]).all()
