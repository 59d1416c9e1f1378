"""Figures and tables as notebooks display them, so the report can embed each by its label.

Tables are displayed with both a Markdown (pipe table) and an HTML representation: Quarto and the
offline renderer take the Markdown one, Jupyter shows the HTML one.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

MISSING = "—"  # how a missing value reads in every table


# data-frame columns named for code, shown in words (task, split and mechanism names stay: the report uses them)
HEADERS = {
    "kernel_path": "kernel path",
    "ms_per_step": "ms per step",
    "tokens_per_s": "tokens/s",
    "peak_mem_gib": "peak GiB",
    "n_bins": "bins per value",
    "time_tokens": "time tokens",
    "vocab_size": "vocabulary",
}


def show_table(
    df: pd.DataFrame, index: bool = False, floatfmt: str = ".3f", empty: str = "nothing to show"
) -> None:
    """Display a table with text/markdown and text/html representations (an empty one as a one-row note
    saying `empty`, so the report's embed always finds a table). Missing values, and cells already
    formatted as "nan", show as MISSING."""
    from IPython.display import display

    if df.empty:
        df, index = pd.DataFrame({"note": [empty]}), False
    df = df.rename(columns=HEADERS)
    missing = df.isna() | df.apply(lambda c: c.astype(str).str.strip().str.lower().eq("nan"))
    text = df.astype(object)
    for i, dtype in enumerate(df.dtypes):  # by position: two columns may share a name
        if pd.api.types.is_float_dtype(dtype):
            col, p_value = df.iloc[:, i], _is_p_value(df.columns[i])
            fmt = ".1f" if _in_tenths(col) and not p_value else floatfmt
            cells = _counts_and_infinities(col, p_value)
            text.iloc[:, i] = [format(x, fmt) if isinstance(x, float) else x for x in cells]
    # every cell is text or an int here: tabulate must not re-read "8.5" as a float and print "8.500";
    # numeric columns keep their right alignment
    numeric = ["right" if pd.api.types.is_numeric_dtype(d) else "left" for d in df.dtypes]
    text = _each(text, lambda x: "∞" if x == "inf" else x)
    marked = text.mask(missing, MISSING)
    md = marked.to_markdown(
        index=index, disable_numparse=True, colalign=(["left"] if index else []) + numeric
    )
    html = marked.to_html(index=index, border=0)
    plain = marked.to_string(index=index)
    display({"text/markdown": md, "text/html": html, "text/plain": plain}, raw=True)


def _each(cells: pd.DataFrame, f) -> pd.DataFrame:
    """``f`` applied to every cell, the result kept as objects (``DataFrame.map`` would turn a column of
    ints and None back into floats)."""
    vals = cells.to_numpy(dtype=object)
    out = np.empty(vals.shape, dtype=object)
    for idx, x in np.ndenumerate(vals):
        out[idx] = f(x)
    return pd.DataFrame(out, index=cells.index, columns=cells.columns)


def _in_tenths(col: pd.Series) -> bool:
    """Whether a float column holds tenths only, some not whole, some beyond 1 (seconds rounded to 0.1, a
    generator's strengths): it prints with one decimal, "24.9" rather than "24.900". A column within [0, 1]
    keeps three: AUROCs that all happen to be 0.5 read "0.500" like their neighbours.

    >>> _in_tenths(pd.Series([24.9, 1.2, None])), _in_tenths(pd.Series([0.812, 0.5])), _in_tenths(pd.Series([1.0]))
    (True, False, False)
    >>> _in_tenths(pd.Series([0.5, 0.5]))
    False
    """
    finite = col[np.isfinite(col)]
    return (
        bool(len(finite))
        and bool(np.allclose(finite, finite.round(1), rtol=0, atol=1e-9))
        and bool((finite != finite.round()).any())
        and bool((finite.abs() > 1).any())
    )


def _is_p_value(name: object) -> bool:
    """Whether a column holds p-values ("p", "p (BH)", "p (perm.)"): they print as "<0.001" below 0.0005."""
    return isinstance(name, str) and (name == "p" or name.startswith("p ("))


def _counts_and_infinities(col: pd.Series, p_value: bool = False) -> pd.Series:
    """A float column as the table shows it: whole numbers (counts, degrees of freedom stored as floats
    beside missing values) without decimals where the column holds nothing else and reaches 2, infinity as
    "∞", p-values that would print as 0 as "<0.001" (a permutation p is at least 1/(n+1)); other values
    unchanged, for ``show_table``'s float format.

    >>> _counts_and_infinities(pd.Series([17.0, 3.0, None, float("inf")])).tolist()
    [17, 3, None, '∞']
    >>> _counts_and_infinities(pd.Series([1.0, 0.0])).tolist()  # p-values or AUROCs that happen to be whole
    [1.0, 0.0]
    >>> _counts_and_infinities(pd.Series([12.3456, float("inf")])).tolist()
    [12.3456, '∞']
    >>> _counts_and_infinities(pd.Series([0.0004, 0.2]), p_value=True).tolist()
    ['<0.001', 0.2]
    """
    finite = col[np.isfinite(col)]
    whole = len(finite) > 0 and bool((finite == finite.round()).all()) and bool((finite.abs() >= 2).any())

    def cell(x: float) -> object:
        if pd.isna(x):
            return None
        if np.isinf(x):
            return "∞" if x > 0 else "-∞"
        if p_value and 0 <= x < 0.0005:
            return "<0.001"
        return int(x) if whole else x

    return pd.Series([cell(x) for x in col], index=col.index, dtype=object)


def style() -> None:
    """One look for every figure."""
    sns.set_theme(style="whitegrid", context="notebook")
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "figure.figsize": (7.0, 3.6)})


def token_length_figure(lengths: pd.DataFrame, max_len: int) -> plt.Figure:
    """Histogram of untruncated token lengths per split (log x), with the model's max_len marked."""
    fig, ax = plt.subplots()
    bins = np.logspace(np.log10(max(lengths["tokens"].min(), 1)), np.log10(lengths["tokens"].max() + 1), 40)
    for split, g in lengths.groupby("split", sort=False):
        ax.hist(g["tokens"], bins=bins, histtype="step", linewidth=1.6, label=f"{split} (n={len(g)})")
    ax.axvline(max_len, color="black", linestyle="--", linewidth=1)
    ax.text(max_len, ax.get_ylim()[1] * 0.95, f" max_len={max_len}", va="top", fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("tokens in full history before the prediction time (log scale)")
    ax.set_ylabel("subjects")
    ax.legend(frameon=False, fontsize=9)
    fig.tight_layout()
    return fig


def forest_figure(
    df: pd.DataFrame, metric: str = "AUROC", oracle: float | None = None, seeds: pd.DataFrame | None = None
) -> plt.Figure:
    """Point estimates with 95 % CIs per model and task; the oracle ceiling as a dashed line. `seeds`
    (task, model, estimate per training seed) adds each seed's value as a tick under its model's point:
    seeds that fall into two groups (a mechanism read or missed) show there, not in a mean and sd."""
    tasks = list(dict.fromkeys(df["task"]))
    ncols = min(3, len(tasks))
    nrows = -(-len(tasks) // ncols)
    height = 0.3 * df["model"].nunique() + 1.3
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, height * nrows), sharey=True, squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(tasks) :]:
        ax.set_visible(False)
    for ax, task in zip(axes, tasks):
        g = df[df["task"] == task].reset_index(drop=True)
        y = np.arange(len(g))[::-1]
        ax.errorbar(
            g["estimate"], y, xerr=[g["estimate"] - g["lo"], g["hi"] - g["estimate"]], fmt="o", capsize=3
        )
        ax.set_yticks(y, g["model"])
        if seeds is not None:
            mine = seeds[seeds["task"] == task]
            for i, (yi, model) in enumerate(zip(y, g["model"])):
                x = mine.loc[mine["model"] == model, "estimate"].to_numpy()
                ax.plot(x, np.full(len(x), yi - 0.25), "|", color="tab:orange", ms=7,
                        label="each seed" if i == 0 else None)  # fmt: skip
        if "oracle" in g and g["oracle"].notna().any():
            ax.axvline(float(g["oracle"].iloc[0]), color="grey", linestyle="--", linewidth=1, label="oracle")
        ax.axvline(0.5, color="lightgrey", linewidth=1)
        ax.set_title(task, fontsize=10)
        ax.set_xlabel(f"{metric} (95 % CI)")
    fig.tight_layout()
    # one legend under the panels: inside them it covered the lowest model's interval
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, frameon=False, fontsize=8, loc="upper center", ncol=len(handles),
                   bbox_to_anchor=(0.5, 0.0))  # fmt: skip
    return fig


VERDICT_COLOURS = {
    "supported": "tab:green",
    "not supported": "tab:red",
    "inconclusive": "tab:grey",
    "underpowered": "tab:purple",
    "undertrained": "tab:orange",
    "one seed": "tab:brown",
}


def delta_figure(comparisons: pd.DataFrame, xlabel: str) -> plt.Figure:
    """Paired differences with CIs, one row per comparison and task, zero marked; verdicts as colours."""
    fig, ax = plt.subplots(figsize=(7.0, 0.32 * max(len(comparisons), 1) + 1.2))
    if comparisons.empty:
        ax.text(0.5, 0.5, "no comparison was run", ha="center", va="center", transform=ax.transAxes)
        return fig
    g = comparisons.reset_index(drop=True)
    y = np.arange(len(g))[::-1]
    for yi, (_, r) in zip(y, g.iterrows()):
        c = VERDICT_COLOURS.get(r["verdict"], "tab:grey")
        ax.errorbar(
            r["ΔAUROC"],
            yi,
            xerr=[[r["ΔAUROC"] - r["lo"]], [r["hi"] - r["ΔAUROC"]]],
            fmt="o",
            color=c,
            capsize=3,
        )
    ax.axvline(0, color="black", linewidth=1)
    ax.set_yticks(y, [f"{r['comparison']} · {r['task']}" for _, r in g.iterrows()], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(plt.MaxNLocator(4))  # +-0.002 got nine colliding labels, +-0.5 five
    seen = set(g["verdict"])
    handles = [
        plt.Line2D([], [], marker="o", linestyle="", color=c, label=v)
        for v, c in VERDICT_COLOURS.items()
        if v in seen
    ]
    # beside the plot, listing the verdicts it shows: inside, it covered rows and CIs
    ax.legend(handles=handles, frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def reliability_figure(frame: pd.DataFrame, task: str, max_panels: int = 9) -> plt.Figure:
    """Reliability diagram: one small panel per model (observed rate against mean predicted probability per
    bin, marker area by rows in the bin), the diagonal as perfect calibration."""
    models = list(dict.fromkeys(frame["model"]))[:max_panels]
    ncols = min(3, max(len(models), 1))
    nrows = max(-(-len(models) // ncols), 1)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(2.6 * ncols, 2.5 * nrows), sharex=True, sharey=True, squeeze=False
    )
    axes = axes.ravel()
    for ax in axes[len(models) :]:
        ax.set_visible(False)
    if not models:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "no model with probability scores", ha="center", va="center")
    top = max(float(frame["n"].max()), 1.0) if len(frame) else 1.0
    for ax, model in zip(axes, models):
        g = frame[frame["model"] == model]
        ax.plot([0, 1], [0, 1], color="lightgrey", linewidth=1)
        ax.plot(g["predicted"], g["observed"], color="tab:blue", linewidth=1)
        ax.scatter(g["predicted"], g["observed"], s=8 + 60 * g["n"] / top, color="tab:blue", zorder=3)
        ax.set_title(model, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    for ax in axes[(nrows - 1) * ncols :]:
        ax.set_xlabel("mean predicted")
    for ax in axes[::ncols]:
        ax.set_ylabel("observed rate")
    fig.suptitle(task, fontsize=10)
    fig.tight_layout()
    return fig


def model_palette(models: pd.Series) -> dict[str, tuple]:
    """One colour per model for every panel of a figure: per-panel palettes gave EHRMamba's colour to
    CEHR-BERT in the panel without EHRMamba."""
    names = list(dict.fromkeys(models))
    return dict(zip(names, sns.color_palette(n_colors=len(names)), strict=True))


def _shared_legend(fig: plt.Figure, axes: np.ndarray, palette: dict[str, tuple]) -> plt.Figure:
    """One legend below the panels, at a size that survives the figure's scaling to the page width (the
    panels' own legends printed at about 5 pt)."""
    for ax in axes:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if palette:
        handles = [plt.Line2D([], [], color=c, linewidth=2) for c in palette.values()]
        fig.legend(
            handles, list(palette), loc="lower center", ncol=min(len(palette), 6), frameon=False, fontsize=10
        )
        fig.tight_layout(rect=(0, 0.12, 1, 1))
    else:
        fig.tight_layout()
    return fig


def loss_figure(curves: pd.DataFrame, window: int = 10) -> plt.Figure:
    """Training loss per step (rolling mean over `window` steps), one panel per phase, averaged over a model's
    runs up to the last step all of them reached: past it the mean would be that of the longest runs alone
    (in the smoke run, the null task's: its loss rose there only because the other tasks had stopped)."""
    curves = curves.copy()
    curves["loss"] = curves.groupby(["model", "run", "seed"], sort=False)["loss"].transform(
        lambda x: x.rolling(window, min_periods=1).mean()
    )
    key = curves["run"] + "/" + curves["seed"].astype(str)
    n_runs = key.groupby([curves["phase"], curves["model"]]).transform("nunique")
    n_at_step = key.groupby([curves["phase"], curves["model"], curves["step"]]).transform("nunique")
    curves = curves[n_at_step == n_runs]
    phases = list(dict.fromkeys(curves["phase"]))
    fig, axes = plt.subplots(1, len(phases), figsize=(5.0 * len(phases), 3.4))
    axes = np.atleast_1d(axes)
    palette = model_palette(curves["model"])
    for ax, phase in zip(axes, phases):
        g = curves[curves["phase"] == phase]
        sns.lineplot(
            data=g, x="step", y="loss", hue="model", palette=palette, ax=ax, errorbar=None, linewidth=1.2
        )
        ax.set_title(f"{phase} (rolling mean of {window} steps)", fontsize=10)
    return _shared_legend(fig, axes, palette)


def learning_figure(curves: pd.DataFrame, task: str = "mortality_1m") -> plt.Figure:
    """Validation metric against tokens seen, one line per model and seed: pretraining loss per objective
    (CLM and MLM losses are not comparable, so each has its panel) and finetuning AUROC on `task`. A curve
    still rising at its right end was stopped by its budget, not by its plateau."""
    panels = []
    if not curves.empty:
        pre = curves[curves["phase"] == "pretraining"]
        for objective in dict.fromkeys(pre["objective"]):
            panels.append(
                (
                    pre[pre["objective"] == objective],
                    "loss",
                    f"pretraining: validation {objective.upper()} loss",
                )
            )
        ft = curves[(curves["phase"] == "finetuning") & (curves["task"] == task)]
        if not ft.empty:
            panels.append((ft, "auroc", f"finetuning {task}: validation AUROC"))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.6 * max(1, len(panels)), 3.4))
    axes = np.atleast_1d(axes)
    if not panels:
        axes[0].text(0.5, 0.5, "no run validated", ha="center", va="center")
        axes[0].set_axis_off()
    palette = model_palette(curves["model"]) if not curves.empty else {}
    for ax, (g, y, title) in zip(axes, panels):
        g = g.assign(mtokens=g["tokens"] / 1e6)
        sns.lineplot(
            data=g,
            x="mtokens",
            y=y,
            hue="model",
            palette=palette,
            units="seed",
            estimator=None,
            ax=ax,
            linewidth=1.1,
            marker="o",
            markersize=3,
        )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("tokens seen (millions)")
    drawn = {m for g, _, _ in panels for m in g["model"]}  # MPF curves have no panel: no legend entry
    return _shared_legend(fig, axes, {m: c for m, c in palette.items() if m in drawn})


def mechanism_figure(recovered: pd.DataFrame, labels: dict[str, str] | None = None) -> plt.Figure:
    """Models x mechanisms heat map of the share of each mechanism's signal a model recovered (1: as much as
    the true risk, 0: none, below 0: read the wrong way round); the number in each cell is the share."""
    if recovered.empty:
        fig, ax = plt.subplots(figsize=(7.0, 1.2))
        ax.text(0.5, 0.5, "no known truth in this run: nothing to show", ha="center", va="center")
        ax.axis("off")
        return fig
    grid = recovered.pivot(index="model", columns="mechanism", values="share recovered")
    grid = grid.loc[list(dict.fromkeys(recovered["model"])), list(dict.fromkeys(recovered["mechanism"]))]
    if labels:
        grid.index = [labels.get(m, m) for m in grid.index]
    fig, ax = plt.subplots(figsize=(7.0, 0.45 * len(grid) + 1.4))
    # diverging around 0: a negative share (the mechanism read the wrong way round) gets its own colour
    lim = max(1.0, float(np.nanmax(np.abs(grid.to_numpy(dtype=float)))) if grid.notna().any().any() else 1.0)
    sns.heatmap(
        grid,
        vmin=-lim,
        vmax=lim,
        center=0.0,
        cmap="vlag_r",
        annot=True,
        fmt=".2f",
        cbar_kws={"label": "share"},
        ax=ax,
    )
    ax.set_xlabel("mechanism (negative: the model ranks that mechanism's high-risk side lower)")
    ax.set_ylabel("")
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    return fig


def probe_figure(frame: pd.DataFrame) -> plt.Figure:
    """Probe against finetuned held-out AUROC per backbone (95 % CIs as bars): above the diagonal the frozen
    representation alone does better than finetuning it; the gap says what finetuning added."""
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    if frame.empty:
        ax.text(0.5, 0.5, "no probe was run", ha="center", va="center", transform=ax.transAxes)
        return fig
    ft = frame[frame["read by"] == "finetuned"].set_index(["task", "model"])
    markers = {"probe (head)": "o", "probe (mean)": "s"}
    colors = dict(
        zip(frame["model"].unique(), sns.color_palette(n_colors=frame["model"].nunique()), strict=True)
    )
    for (task, model, how), g in frame[frame["read by"] != "finetuned"].groupby(
        ["task", "model", "read by"], sort=False
    ):
        if (task, model) not in ft.index:
            continue
        x, p = ft.loc[(task, model)], g.iloc[0]
        ax.errorbar(
            x["estimate"], p["estimate"],
            xerr=[[x["estimate"] - x["lo"]], [x["hi"] - x["estimate"]]],
            yerr=[[p["estimate"] - p["lo"]], [p["hi"] - p["estimate"]]],
            fmt=markers.get(how, "^"), color=colors[model], capsize=2, label=f"{model}, {how}",
        )  # fmt: skip
    lo = float(np.nanmin(frame["lo"].to_numpy())) - 0.02
    ax.plot([lo, 1], [lo, 1], ls="--", color="grey", lw=1)
    ax.set(xlabel="finetuned AUROC (held-out)", ylabel="probe AUROC (held-out)", xlim=(lo, 1), ylim=(lo, 1))
    # beside the square: inside, it covered the markers and intervals it names
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig
