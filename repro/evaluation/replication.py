"""Runs of the same question side by side: did the verdicts replicate, and what do their seeds say together?

Why: a comparison's interval covers the patients and the seeds of one run, not everything that changes
between two runs of the same code on the same data (GPU non-determinism that flips an early stop, a
finetuning that does or does not pick up an interaction). Two default runs of this project on one H100
(2026-12-06) gave BigBird's held-out mortality_1m AUROC 0.856 [0.839, 0.872] and 0.815 [0.795, 0.832]
with the same settings and seeds. ``repro compare RUN_A RUN_B [RUN_C ...]`` shows where that happens, and
pools every run's training seeds (``pool_seeds``): three seeds that happen to agree make one run's
interval narrow, and only more seeds show a model whose seeds fall into two modes.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

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


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def params_diff(a: dict, b: dict, ignore: tuple[str, ...] = ("name", "seeds")) -> list[str]:
    """The params (dotted keys) that differ between two runs' manifests, besides their name and seeds: a
    rerun with other seeds is the same experiment, more draws. Falls back to the params hash (["params"])
    where a manifest has no params."""
    pa, pb = (r["manifest"].get("params") or None for r in (a, b))
    if pa is None or pb is None:
        ha, hb = a["manifest"].get("params_hash"), b["manifest"].get("params_hash")
        return ["params"] if ha and hb and ha != hb else []
    fa, fb = _flat(pa), _flat(pb)
    keys = sorted(set(fa) | set(fb))
    return [k for k in keys if k.split(".")[0] not in ignore and fa.get(k) != fb.get(k)]


def _dataset_text(run: dict) -> str:
    rec = run["manifest"].get("dataset")
    if rec is None:
        return "no dataset record (a run made before repro kept one)"
    return ", ".join(f"{k} {v}" for k, v in rec.items()) or "an empty dataset record"


def data_difference(runs: list[dict]) -> str | None:
    """Why the runs may not have read the same data, or None: their manifests' dataset records (the MEDS
    dataset's and ETL's names and versions; a synthetic cohort's generator version) differ, or only some
    runs have one. Runs that all lack it (made before the record) cannot be told apart and pass."""
    recs = [r["manifest"].get("dataset") for r in runs]
    if all(rec is None for rec in recs) or all(rec == recs[0] for rec in recs):
        return None
    return "the runs' data differ or cannot be told apart: " + "; ".join(
        f"{r['dir']}: {_dataset_text(r)}" for r in runs
    )


def summary_lines(a: dict, b: dict, table: pd.DataFrame) -> list[str]:
    """What the two runs were and how much of run A the second run reproduced."""
    lines = []
    for tag, run in (("A", a), ("B", b)):
        m = run["manifest"]
        sha, ph = m.get("git_sha") or "?", m.get("params_hash") or "?"
        lines.append(f"run {tag}: {run['dir']} (code {sha[:12]}, params {ph[:12]})")
    differ = params_diff(a, b)
    if differ:
        lines.append(
            f"the runs' params differ ({', '.join(differ)}): a difference below may come from them, not only "
            "from chance"
        )
    why = data_difference([a, b])
    if why:
        lines.append(f"{why}: a difference below may come from the data, not only from chance")
    seeds = [(r["manifest"].get("params") or {}).get("seeds") for r in (a, b)]
    if seeds[0] is not None and seeds[1] is not None and seeds[0] != seeds[1]:
        lines.append(f"training seeds: run A {seeds[0]}, run B {seeds[1]}")
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


def _seed_rows(runs: list[dict], task: str) -> pd.DataFrame:
    """Every run's per-seed held-out AUROC on `task`, long: run, model, seed, auroc."""
    frames = []
    for tag, run in zip(_tags(len(runs)), runs, strict=True):
        rows = run["results"].get("seed_auroc")
        if rows is None:
            raise ReplicationError(
                f"{run['dir']}/{ACCURACY}: has no 'seed_auroc' (each seed's held-out AUROC); pooling seeds "
                "needs runs whose notebook 01 saved it"
            )
        f = pd.DataFrame(rows, columns=["model", "task", "seed", "estimate"])
        frames.append(f[f["task"] == task].assign(run=tag))
    out = pd.concat(frames, ignore_index=True).rename(columns={"estimate": "auroc"})
    if out.empty:
        raise ReplicationError(f"no run has seeds on task {task!r}")
    return out[["run", "model", "seed", "auroc"]]


def _tags(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def pool_seeds(
    runs: list[dict], task: str = "mortality_1m", new: str = "EHRMamba", ci: float = 0.95
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """All runs' training seeds pooled per model: (models, comparisons, warnings).

    models: each model's seeds over the runs (mean, sd, range, each run's mean) and the p of a one-way ANOVA
    of its seeds by run: a small p says something shared by a run's seeds (code, params, hardware) moved
    them, which a second run with the same settings should not do. comparisons: `new` minus each other
    model, the difference of their mean seed AUROCs with a Welch t interval over seeds. These treat the
    held-out patients as fixed (they are the same in every run) and adjust nothing for multiplicity: they
    show how the training seeds of several runs spread, not a verdict. Warnings name seeds that gave the
    same AUROC to the last digit in two runs: training that repeated itself is one draw, not two (a model
    whose every seed gives one AUROC, counts + LR, is deterministic by design and not warned about); a
    repeat is counted once. `new` is compared with each model over the runs that trained both. Runs whose
    data differ (``data_difference``) are refused.
    """
    why = data_difference(runs)
    if why:
        raise ReplicationError(f"{why}. Seeds are pooled only over runs of one dataset")
    seeds = _seed_rows(runs, task)
    notes = []
    fixed = {m for m, g in seeds.groupby("model") if g["auroc"].nunique() == 1}  # a deterministic fit
    for (model, seed), g in seeds.groupby(["model", "seed"], sort=False):
        if model not in fixed and len(g) > 1 and g["auroc"].duplicated().any():
            notes.append(
                f"{model} seed {seed}: the same AUROC in runs {', '.join(g['run'])}; repeated training is one "
                "draw, not several, and is counted once (give another run other seeds: params `seeds`)"
            )
    trained = seeds.groupby("model")["run"].agg(set)  # before a repeat is dropped from its later runs
    seeds = seeds.drop_duplicates(["model", "seed", "auroc"])
    models, comparisons = [], []
    for model, g in seeds.groupby("model", sort=False):
        by_run = [x["auroc"].to_numpy() for _, x in g.groupby("run")]
        anova = (
            float(stats.f_oneway(*by_run).pvalue)
            if len(by_run) > 1 and all(len(x) > 1 for x in by_run) and g["auroc"].round(12).nunique() > 1
            else float("nan")
        )
        models.append(
            {
                "model": model,
                "seeds": len(g),
                "mean": g["auroc"].mean(),
                "sd": g["auroc"].std(),
                "min": g["auroc"].min(),
                "max": g["auroc"].max(),
                "each run's mean": ", ".join(f"{r} {x['auroc'].mean():.3f}" for r, x in g.groupby("run")),
                "run effect p": anova,
            }
        )
        theirs = g["auroc"].to_numpy()
        both = seeds["run"].isin(trained[model])  # runs that trained the model: nothing else moved apart
        mine = seeds.loc[(seeds["model"] == new) & both, "auroc"].to_numpy()
        if model == new or len(mine) < 2 or len(theirs) < 2:
            continue
        with warnings.catch_warnings():  # a deterministic model (sd 0): the interval rests on `new`
            warnings.simplefilter("ignore", RuntimeWarning)
            t = stats.ttest_ind(mine, theirs, equal_var=False)
        lo, hi = t.confidence_interval(ci)
        d = mine.mean() - theirs.mean()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            sign = "no seed spread: no interval"
        else:
            sign = f"{new} higher" if lo > 0 else f"{new} lower" if hi < 0 else "interval covers 0"
        comparisons.append(
            {
                "comparison": f"{new} − {model}",
                "seeds": f"{len(mine)} vs {len(theirs)}",
                "Δ mean seed AUROC (Welch CI)": f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]",
                "p (Welch)": float(t.pvalue),
                "seed level": sign,
            }
        )
    return pd.DataFrame(models), pd.DataFrame(comparisons), notes


def pooled_lines(runs: list[dict], task: str = "mortality_1m") -> list[str]:
    """The pooled-seed tables as printable lines, or one line saying why they could not be made."""
    try:
        models, comparisons, notes = pool_seeds(runs, task)
    except ReplicationError as e:
        return [f"seeds not pooled: {e}"]
    differ = sorted({k for r in runs[1:] for k in params_diff(runs[0], r)})
    head = f"{task}, every run's training seeds pooled (held-out AUROC of each seed, not of seed ensembles)"
    if differ:
        head += f"; the runs' params differ ({', '.join(differ)}), so the pooled seeds mix settings"
    lines = [head, models.to_string(index=False, float_format=lambda x: f"{x:.3f}")]
    if len(comparisons):
        lines.append(comparisons.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    lines += [f"warning: {w}" for w in notes]
    return lines
