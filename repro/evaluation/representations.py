"""Notebook 05's tables: the same models under other input representations, against EHRMamba's default
tokens (the runs come from `repro.training.variants`)."""

from __future__ import annotations

import pandas as pd

from repro.evaluation.results import MODEL_LABELS, comparison_table
from repro.training.variants import SEP


def display(key_: str) -> str:
    """'ehrmamba|xVal' -> 'EHRMamba · xVal'."""
    model, _, variant = key_.partition(SEP)
    return f"{MODEL_LABELS.get(model, model)} · {variant}"


def metrics_table(evaluated: dict[str, dict[str, dict]], task: str) -> pd.DataFrame:
    """AUROC and AUPRC with CIs per representation and model on one task (seed-ensembled probabilities)."""
    rows = []
    for name, m in evaluated.get(task, {}).items():
        if SEP not in name:  # the oracle row
            continue
        model, _, variant = name.partition(SEP)
        rows.append(
            {
                "representation": variant,
                "model": MODEL_LABELS.get(model, model),
                **{
                    metric.upper(): f"{m[metric]['estimate']:.3f} [{m[metric]['lo']:.3f}, {m[metric]['hi']:.3f}]"
                    for metric in ("auroc", "auprc")
                },
            }
        )
    return pd.DataFrame(rows)


def comparisons_table(comparisons: pd.DataFrame, ci: float) -> pd.DataFrame:
    """results.comparison_table with 'EHRMamba · xVal − EHRMamba · default' names."""
    if comparisons.empty:
        return comparisons
    named = comparisons.assign(
        comparison=[
            f"{display(n)} − {display(b)}" for n, b in zip(comparisons["new"], comparisons["baseline"])
        ]
    )
    return comparison_table(named, ci)
