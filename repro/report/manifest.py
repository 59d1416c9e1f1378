"""What a run's manifest records about where it ran: the commit, the package versions and the dataset."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import meds
import numpy as np
import pandas as pd
import torch

from repro.config import project_root


def git_sha(root: Path | None = None) -> str | None:
    """The checked-out commit, with "-dirty" when tracked files differ from it."""
    root = root or project_root()
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def run_commit(run_dir: str | Path) -> str | None:
    """The commit a run recorded when it started (its manifest), else the checked-out one: the report's
    run table and manifest.json name one commit even when files change while the run is under way (a
    resumed run records the commit it resumed on, and the earlier one as ``git_sha_before_resume``)."""
    try:
        return json.loads((Path(run_dir) / "manifest.json").read_text())["git_sha"]
    except (OSError, ValueError, KeyError):
        return git_sha()


DATASET_KEYS = ("dataset_name", "dataset_version", "etl_name", "etl_version")


def dataset_record(meds_dir: str | Path) -> dict[str, str]:
    """The MEDS dataset's name and version and the ETL's (``metadata/dataset.json``): runs on other data,
    or on a synthetic cohort of another generator version, are not draws of one experiment. Aggregates only."""
    path = Path(meds_dir) / meds.dataset_metadata_filepath
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: str(meta[k]) for k in DATASET_KEYS if meta.get(k) is not None}


def environment() -> dict[str, Any]:
    """Versions and device, for manifests and the report's appendix."""
    import sklearn

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "sklearn": sklearn.__version__,
        "meds": meds.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    try:
        import mamba_ssm

        info["mamba_ssm"] = mamba_ssm.__version__
    except ImportError:
        info["mamba_ssm"] = None
    return info
