"""Results files: JSON written atomically, so a killed notebook never leaves half a results file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from repro.config import atomic_path, resolve, write_text_atomic


def save_json(obj: Any, path: str | Path) -> None:
    """Write JSON atomically (temp file + rename)."""
    write_text_atomic(resolve(path), json.dumps(obj, indent=2, default=str))


def save_csv(df, path: str | Path) -> Path:
    """Write a DataFrame as CSV atomically (temp file + rename); returns the path written."""
    path = resolve(path)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path
