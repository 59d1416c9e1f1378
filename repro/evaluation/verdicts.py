"""The run's verdicts on H1-H4 in one table, read from the results each notebook saved.

The summary notebook (notebooks/90_verdicts.py) runs last and only reads `results/*.json`, so the table at
the top of the report repeats verdicts that the notebooks computed; it never decides anything itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from repro.evaluation.results import OVERALL_RULE, label, overall_verdict

NOT_RUN = "not run"
QUESTIONS = {
    "H1": "EHRMamba beats CEHR-BERT on mortality_1m (held-out AUROC)",
    "H1 (all)": "EHRMamba beats every other model across tasks",
    "H2": "EHRMamba trains faster and in less memory than BigBird (the paper's MultiBird) as length grows",
    "H2 (all)": "EHRMamba trains faster and in less memory than every Transformer as length grows",
    "H3": "Multitask prompted finetuning beats single-task finetuning",
    "H4 (memory)": "EHRMamba trains at lengths where Transformers run out of memory",
    "H4 (accuracy)": "EHRMamba is more accurate than Transformers on the longest histories",
    "H5": "Another input representation (or the Transformer under one) beats EHRMamba with its default tokens",
}


def load_results(results_dir: str | Path) -> dict[str, dict[str, Any]]:
    """{notebook stem: its saved results} for the notebooks that finished."""
    out = {}
    for f in sorted(Path(results_dir).glob("*.json")):
        out[f.stem] = json.loads(f.read_text())
    return out


def _comparison(rows: list[dict], task: str | None, text: str) -> str:
    for r in rows:
        if (task is None or r.get("task") == task) and r.get("comparison", "").startswith(text):
            delta = next((v for k, v in r.items() if k.startswith("ΔAUROC")), "")
            return f"{r['comparison']}: {delta}, p (BH) {r['p (BH)']:.3g}"
    return ""


def _count(verdicts: list[str]) -> str:
    n = {
        v: verdicts.count(v)
        for v in ("supported", "not supported", "inconclusive", "underpowered", "undertrained", "one seed")
    }
    return ", ".join(f"{v} of {len(verdicts)} {k}" for k, v in n.items() if v) or "no comparison"


def _scope(rows: list[dict]) -> str:
    """What "every other model" covered in this run: the comparators and tasks of the comparisons, so a reader
    of the summary does not take the paper's full list (Table 1) for this run's."""
    others = list(dict.fromkeys(r["comparison"].split(" − ", 1)[-1] for r in rows))
    tasks = list(dict.fromkeys(str(r.get("task", "?")) for r in rows))
    shown = ", ".join(tasks[:3]) + (f" and {len(tasks) - 3} more" if len(tasks) > 3 else "")
    return (
        f" (against {', '.join(others)}; {len(tasks)} task{'s' * (len(tasks) > 1)}: {shown})" if rows else ""
    )


def verdict_table(res: Mapping[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per hypothesis: question, verdict, and the evidence line behind it."""
    acc, eff = res.get("01_accuracy"), res.get("02_efficiency")
    mpf, long = res.get("03_mpf"), res.get("04_long_sequences")
    rep = res.get("05_representations")
    rows = []

    def add(h: str, verdict: str | None, evidence: str, where: str) -> None:
        rows.append(
            {
                "hypothesis": h,
                "question": QUESTIONS[h],
                "verdict": verdict or NOT_RUN,
                "evidence": evidence,
                "section": where,
            }
        )

    if acc:
        cmp = acc.get("comparisons", [])
        add(
            "H1",
            acc["h1_verdict"],
            _comparison(cmp, "mortality_1m", f"{label('ehrmamba')} − {label('cehr_bert')}"),
            "@sec-accuracy",
        )
        add("H1 (all)", acc["h1_overall"], _count([r["verdict"] for r in cmp]) + _scope(cmp), "@sec-accuracy")
    else:
        add("H1", None, "", "@sec-accuracy")
        add("H1 (all)", None, "", "@sec-accuracy")
    if eff:
        device = eff["rows"][0]["device"] if eff.get("rows") else "?"
        cmp = eff.get("comparisons", [])

        def why(rows: list[dict]) -> str:
            return "; ".join(f"{label(r['baseline'])} (batch {r['batch']}): {r['why']}" for r in rows)

        primary = [r for r in cmp if r["baseline"] in eff.get("h2_primary", ["bigbird"])]
        add("H2", eff["h2_verdict"], f"on {device}. {why(primary)}", "@sec-efficiency")
        add("H2 (all)", eff.get("h2_all_verdict"), f"on {device}. {why(cmp)}", "@sec-efficiency")
    else:
        add("H2", None, "", "@sec-efficiency")
        add("H2 (all)", None, "", "@sec-efficiency")
    if mpf:
        per = mpf.get("h3_verdicts", {})
        overall = overall_verdict(list(per.values()))
        add("H3", overall, "; ".join(f"{label(b)}: {v}" for b, v in per.items()), "@sec-mpf")
    else:
        add("H3", None, "", "@sec-mpf")
    if long:
        boundary = _boundary(long.get("boundary", []))
        add("H4 (memory)", long["h4_memory_verdict"], boundary, "@sec-long")
        sub = long.get("subgroup", {})
        trained = long.get("training")  # a fixed, short budget reads differently from a full one
        how = ""
        if trained:
            start = (
                f"after {trained['pretrain_steps']} of pretraining"
                if trained["pretrain_steps"]
                else "from random weights"
            )
            how = f"; finetuned {trained['finetune_steps']} fixed steps {start}"
        add(
            "H4 (accuracy)",
            long["h4_accuracy_verdict"],
            f"{sub.get('n_subjects', '?')} held-out subjects with history > {sub.get('threshold', '?')} tokens"
            f"{how}; across Transformers: {long.get('h4_accuracy_overall', '?')}",
            "@sec-long",
        )
    else:
        add("H4 (memory)", None, "", "@sec-long")
        add("H4 (accuracy)", None, "", "@sec-long")
    if rep:
        cmp = rep.get("comparisons", [])
        best = max(cmp, key=lambda r: r["ΔAUROC"], default=None)
        evidence = _count([r["verdict"] for r in cmp])
        if best is not None:
            evidence += f"; largest: {best['comparison']} {best['ΔAUROC']:+.3f}, p (BH) {best['p (BH)']:.3g}"
        add("H5", rep["h5_verdict"], evidence, "@sec-representations")
    else:
        add("H5", None, "", "@sec-representations")
    return pd.DataFrame(rows)


def _boundary(rows: list[dict]) -> str:
    """Longest trained length per model, collapsed when every model ended the same way."""
    each = [(r["model"], f"longest {r.get('longest length trained')} ({r.get('failure')})") for r in rows]
    if len({what for _, what in each}) == 1 and len(each) > 1:
        return f"all {len(each)} models: {each[0][1]}"
    return "; ".join(f"{m}: {what}" for m, what in each)


def abstract_line(table: pd.DataFrame) -> str:
    """One sentence with every verdict, for the top of the report."""
    parts = [f"{r.hypothesis} {r.verdict}" for r in table.itertuples()]
    return "Verdicts of this run: " + "; ".join(parts) + f". {OVERALL_RULE}"
