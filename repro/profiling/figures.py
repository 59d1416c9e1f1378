"""Figures and display tables of the efficiency (H2) and long-sequence (H4) notebooks.

The numbers come from ``repro.profiling.sweep`` and ``repro.profiling.scaling``; this module only arranges them, so each notebook cell is one call.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from repro.evaluation.results import label
from repro.profiling.scaling import loglog_slope
from repro.profiling.timing import OK, OOM


def _tokens(n: float) -> str:
    """Axis label of a length: 512, 2k, 64k."""
    n = int(n)
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _length_axis(ax: plt.Axes, lengths) -> None:
    ticks = sorted({int(x) for x in lengths})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [_tokens(t) for t in ticks])
    ax.minorticks_off()


def _fmt_num(x: float, fmt: str) -> str:
    return "-" if x is None or not np.isfinite(x) else format(x, fmt)


def _cell(r) -> str:
    if r.status != OK:
        return "OOM" if r.status == OOM else r.status
    mem = "" if not np.isfinite(r.peak_mem_gib) else f", {r.peak_mem_gib:.2f} GiB"
    return f"{r.ms_per_step:,.1f} ms ({r.tokens_per_s:,.0f} tok/s{mem})"


def sweep_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per model and length; per batch size "ms/step (tokens/s, peak GiB)" or the failure."""
    recs: dict[tuple, dict] = {}
    for r in rows.itertuples(index=False):
        key = (label(r.model), int(r.length))
        rec = recs.setdefault(
            key,
            {
                "model": key[0],
                "length": key[1],
                "kernel path": r.kernel_path,
                "parameters": _fmt_num(r.params, ",.0f"),
                "device": r.device,
                "timer": r.timer,
            },
        )
        if rec["kernel path"] == "-" and r.kernel_path != "-":
            rec["kernel path"] = r.kernel_path
        rec[f"batch {int(r.batch)}"] = _cell(r)
    return pd.DataFrame(list(recs.values()))


def scaling_figure(rows: pd.DataFrame, last: int = 4) -> plt.Figure:
    """Log-log time per step and peak memory against length, one row of panels per batch size.

    Dashed lines are the fitted power laws over each model's ``last`` longest successful lengths (slope in
    the legend); crosses mark lengths where a model ran out of memory. On a CPU (memory not measured) the
    right panel shows tokens per second instead.
    """
    batches = sorted(rows["batch"].unique())
    has_mem = rows["peak_mem_gib"].notna().any()
    right, right_label = ("peak_mem_gib", "peak memory (GiB)") if has_mem else ("tokens_per_s", "tokens / s")
    fig, axes = plt.subplots(len(batches), 2, figsize=(10, 3.4 * len(batches)), squeeze=False)
    colours = dict(zip(dict.fromkeys(rows["model"]), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    for i, batch in enumerate(batches):
        g = rows[rows["batch"] == batch]
        for ax, col, ylabel in (
            (axes[i, 0], "ms_per_step", "ms per training step"),
            (axes[i, 1], right, right_label),
        ):
            for model, m in g.groupby("model", sort=False):
                ok = m[m["status"] == OK].sort_values("length")
                c = colours[model]
                if ok.empty:
                    continue
                tail = ok.tail(last)
                slope = loglog_slope(tail["length"], tail[col])
                name = f"{label(model)} (slope {slope:.2f})" if np.isfinite(slope) else label(model)
                ax.plot(ok["length"], ok[col], "o-", color=c, label=name, linewidth=1.2, markersize=4)
                if np.isfinite(slope):
                    x = tail["length"].to_numpy(float)
                    fit = np.polyfit(np.log(x), np.log(tail[col].to_numpy(float)), 1)
                    ax.plot(x, np.exp(np.polyval(fit, np.log(x))), "--", color=c, linewidth=1, alpha=0.7)
                oom = m[m["status"] == OOM]
                if len(oom) and len(ok):
                    ax.plot(oom["length"], [ok[col].max()] * len(oom), "x", color=c, markersize=8, mew=2)
            _length_axis(ax, g["length"])
            ax.set_yscale("log")
            ax.set_xlabel("sequence length (tokens, log scale)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"batch {batch}", fontsize=10)
            # under the panel: inside it the legend sat on the lines (each panel's slopes differ)
            ax.legend(frameon=False, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.34), ncol=2)
    fig.tight_layout()
    return fig


def slope_table(slopes: pd.DataFrame) -> pd.DataFrame:
    """Fitted slopes with display names."""
    return slopes.assign(model=slopes["model"].map(label))


def epoch_table(epochs: pd.DataFrame) -> pd.DataFrame:
    """Pretraining epoch estimates with display names and readable units."""
    out = epochs.assign(model=epochs["model"].map(label))
    out["epoch seconds (steps only)"] = out["epoch seconds (steps only)"].map(lambda x: _fmt_num(x, ",.1f"))
    out["real tokens/s"] = out["real tokens/s"].map(lambda x: _fmt_num(x, ",.0f"))
    out["ms_per_step"] = out["ms_per_step"].map(lambda x: _fmt_num(x, ",.1f"))
    return out


def comparison_table(cmp: pd.DataFrame) -> pd.DataFrame:
    """H2 / H4-memory comparisons with display names."""
    return cmp.drop(columns=["new"], errors="ignore").assign(baseline=cmp["baseline"].map(label))


def boundary_table(boundary: pd.DataFrame) -> pd.DataFrame:
    """The out-of-memory boundary per model, with display names."""
    out = boundary.assign(model=boundary["model"].map(label))
    out["peak GiB there"] = out["peak GiB there"].map(lambda x: _fmt_num(x, ".2f"))
    for col in ("longest length trained", "first length that failed"):
        out[col] = out[col].map(lambda x: _fmt_num(x, ".0f"))
    return out


def _ci(e: float, lo: float, hi: float) -> str:
    if not np.isfinite(e):
        return "-"
    return f"{e:.3f}" if not np.isfinite(lo) else f"{e:.3f} [{lo:.3f}, {hi:.3f}]"


def long_history_table(table: pd.DataFrame, ci: float = 0.95) -> pd.DataFrame:
    """One row per (model, allowed length): AUROC with CI on the long-history subgroup and on all held_out."""
    pct = f"{ci * 100:g}% CI"
    return pd.DataFrame(
        {
            "model": table["model"].map(label),
            "allowed tokens": table["length"],
            "status": table["status"],
            "kernel path": table["kernel_path"],
            "parameters": table["parameters"].map(lambda x: f"{x:,}" if x else "-"),
            f"AUROC long-history ({pct})": [
                _ci(e, lo, hi) for e, lo, hi in zip(table["auroc_long"], table["lo_long"], table["hi_long"])
            ],
            f"AUROC all held_out ({pct})": [
                _ci(e, lo, hi) for e, lo, hi in zip(table["auroc_all"], table["lo_all"], table["hi_all"])
            ],
            "train + score s": table["seconds"].map(lambda x: _fmt_num(x, ",.1f")),
            "peak GiB": table["peak GiB"].map(lambda x: _fmt_num(x, ".2f")),
        }
    )


def long_history_figure(table: pd.DataFrame) -> plt.Figure:
    """Long-history-subgroup AUROC (95 % CI) against the tokens each model may read; x marks out of memory."""
    fig, ax = plt.subplots(figsize=(7.0, 3.6))
    models = list(dict.fromkeys(table["model"]))
    offsets = dict(zip(models, np.linspace(-0.06, 0.06, len(models)) if len(models) > 1 else [0.0]))
    for model in models:
        g = table[table["model"] == model].sort_values("length")
        x = g["length"].to_numpy(float) * 2 ** offsets[model]  # small dodge so CIs do not overlap
        ok = (g["status"] == OK).to_numpy() & g["auroc_long"].notna().to_numpy()
        y, lo, hi = (g[c].to_numpy(float) for c in ("auroc_long", "lo_long", "hi_long"))
        err = np.nan_to_num([y - lo, hi - y])
        line = ax.errorbar(x[ok], y[ok], yerr=err[:, ok], fmt="o-", capsize=3, label=label(model))
        failed = (g["status"] == OOM).to_numpy()
        if failed.any():
            ax.plot(x[failed], [0.5] * int(failed.sum()), "x", color=line[0].get_color(), markersize=9, mew=2)
    ax.axhline(0.5, color="lightgrey", linewidth=1)
    _length_axis(ax, table["length"])
    ax.set_xlabel("tokens each model may read (max_len, log scale)")
    ax.set_ylabel("AUROC, long-history subgroup")
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # not on the CIs
    fig.tight_layout()
    return fig
