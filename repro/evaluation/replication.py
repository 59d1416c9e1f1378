"""Two runs of the same question side by side: did the verdicts replicate?

Why: a comparison's interval covers the patients and the seeds of one run, not everything that changes
between two runs of the same code on the same data (GPU non-determinism that flips an early stop, a
finetuning that does or does not pick up an interaction). Two default runs of this project on one H100
(2026-12-06) gave BigBird's held-out mortality_1m AUROC 0.856 [0.839, 0.872] and 0.815 [0.795, 0.832]
with the same settings and seeds. ``repro compare RUN_A RUN_B`` shows where that happens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

ACCURACY = "results/01_accuracy.json"
VERDICTS = "results/90_verdicts.json"  # each hypothesis's verdict; absent when notebook 90 did not run
_INTERVAL = re.compile(r"^\s*([+-]?\d*\.\d+)\s*\[\s*([+-]?\d*\.\d+)\s*,\s*([+-]?\d*\.\d+)\s*\]\s*$")


class ReplicationError(ValueError):
    """A run folder that lacks what a comparison of runs needs."""


def parse_interval(text: str, where: str) -> tuple[float, float, float]:
    """'+0.001 [-0.031, +0.038]' -> (0.001, -0.031, 0.038); a malformed cell names where it sits.

    >>> parse_interval("-0.054 [-0.097, -0.034]", "x")
    (-0.054, -0.097, -0.034)
    """
    m = _INTERVAL.match(str(text))
    if not m:
        raise ReplicationError(f"{where}: expected 'estimate [low, high]', got {text!r}")
    est, lo, hi = (float(g) for g in m.groups())
    return est, lo, hi


def load_run(run_dir: str | Path) -> dict:
    """The accuracy results and manifest of one run (the manifest may be missing: a run made by hand)."""
    run_dir = Path(run_dir)
    path = run_dir / ACCURACY
    if not path.is_file():
        raise ReplicationError(f"{path}: not found; is {run_dir} a run folder with notebook 01 executed?")
    results = json.loads(path.read_text())
    for key in ("probes", "comparisons"):
        if key not in results:
            raise ReplicationError(f"{path}: has no {key!r}; it was written by an older version of repro")
    verdicts_path = run_dir / VERDICTS
    verdicts = json.loads(verdicts_path.read_text()).get("verdicts", []) if verdicts_path.is_file() else []
    manifest_path = run_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    return {"dir": str(run_dir), "results": results, "verdicts": verdicts, "manifest": manifest}


def _rows(run: dict) -> dict[tuple[str, str, str], dict]:
    """(kind, task, what) -> estimate, lo, hi, verdict for every finetuned model and every comparison."""
    res, where = run["results"], f"{run['dir']}/{ACCURACY}"
    rows = {}
    for r in res["probes"]:
        if r.get("read by") == "finetuned":
            rows[("model AUROC", r["task"], r["model"])] = {
                "estimate": r["estimate"],
                "lo": r["lo"],
                "hi": r["hi"],
                "verdict": "",
            }
    for kind, key in (("comparison", "comparisons"), ("null comparison", "null_comparisons")):
        for r in res.get(key, []):
            est, lo, hi = parse_interval(r["ΔAUROC (95% CI)"], f"{where} {key} {r['comparison']}")
            rows[(kind, r["task"], r["comparison"])] = {
                "estimate": est,
                "lo": lo,
                "hi": hi,
                "verdict": r["verdict"],
            }
    for r in run.get("verdicts", []):
        rows[("hypothesis", "", r["hypothesis"])] = {"verdict": r["verdict"]}
    return rows


def compare_runs(a: dict, b: dict) -> pd.DataFrame:
    """One row per model AUROC, comparison and hypothesis found in both runs: both estimates with their
    95 % CIs, both verdicts, whether the intervals overlap and whether the verdicts agree."""
    ra, rb = _rows(a), _rows(b)
    common = [k for k in ra if k in rb]
    if not common:
        raise ReplicationError(f"{a['dir']} and {b['dir']} share no model or comparison to compare")
    out = []
    for kind, task, what in common:
        x, y = ra[(kind, task, what)], rb[(kind, task, what)]
        if kind == "hypothesis":
            same = "yes" if x["verdict"] == y["verdict"] else "NO"
            verdicts = {"verdict A": x["verdict"], "verdict B": y["verdict"], "same verdict": same}
            estimates = dict.fromkeys(("run A", "run B", "B − A", "CIs overlap"), "-")
            out.append({"kind": kind, "task": task, "what": what, **estimates, **verdicts})
            continue
        overlap = x["lo"] <= y["hi"] and y["lo"] <= x["hi"]
        f = "{:.3f}" if kind == "model AUROC" else "{:+.3f}"

        def cell(v: dict, f: str = f) -> str:
            return f"{f.format(v['estimate'])} [{f.format(v['lo'])}, {f.format(v['hi'])}]"

        out.append(
            {
                "kind": kind,
                "task": task,
                "what": what,
                "run A": cell(x),
                "run B": cell(y),
                "B − A": round(y["estimate"] - x["estimate"], 3),
                "verdict A": x["verdict"] or "-",
                "verdict B": y["verdict"] or "-",
                "CIs overlap": "yes" if overlap else "NO",
                "same verdict": "-"
                if kind == "model AUROC"
                else ("yes" if x["verdict"] == y["verdict"] else "NO"),
            }
        )
    columns = ["kind", "task", "what", "run A", "run B", "B − A", "verdict A", "verdict B", "CIs overlap"]
    return pd.DataFrame(out, columns=[*columns, "same verdict"])


def summary_lines(a: dict, b: dict, table: pd.DataFrame) -> list[str]:
    """What the two runs were and how much of run A the second run reproduced."""
    lines = []
    for tag, run in (("A", a), ("B", b)):
        m = run["manifest"]
        lines.append(
            f"run {tag}: {run['dir']} (code {m.get('git_sha', '?')[:12]}, params {m.get('params_hash', '?')[:12]})"
        )
    ha, hb = a["manifest"].get("params_hash"), b["manifest"].get("params_hash")
    if ha and hb and ha != hb:
        lines.append("the runs' params differ: a difference below may come from them, not only from chance")
    estimates = table[table["kind"] != "hypothesis"]
    apart = estimates[estimates["CIs overlap"] == "NO"]
    comps = table[table["kind"].isin(["comparison", "null comparison"])]
    flipped = comps[comps["same verdict"] == "NO"]
    lines.append(
        f"{len(estimates) - len(apart)} of {len(estimates)} estimates have overlapping 95 % CIs in the two "
        f"runs; {len(comps) - len(flipped)} of {len(comps)} comparisons gave the same verdict"
    )
    hyps = table[table["kind"] == "hypothesis"]
    if len(hyps):
        same = int((hyps["same verdict"] == "yes").sum())
        lines.append(f"{same} of {len(hyps)} hypotheses got the same verdict (notebook 90 of both runs)")
    for _, r in apart.iterrows():
        lines.append(f"  not reproduced: {r['kind']} {r['task']} {r['what']}: {r['run A']} then {r['run B']}")
    return lines
