"""Results files: JSON written atomically, so a killed notebook never leaves half a results file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from repro.config import resolve


def save_json(obj: Any, path: str | Path) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def save_csv(df, path: str | Path) -> Path:
    """Write a DataFrame as CSV atomically (temp file + rename); returns the path written."""
    path = resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path
