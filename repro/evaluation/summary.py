"""Cohort and tokenizer summaries: aggregates only, small cells suppressed on real data.

Real data never leaves the machine: these tables are what the report shows about a cohort, so they
hold counts, rates and quantiles, never rows; on non-synthetic data any count below
`MIN_CELL` is shown as "<10".
"""

from __future__ import annotations

import pandas as pd

from repro.data.tasks import label_columns
from repro.training.prepare import SPLITS, Prepared, encode_samples

MIN_CELL = 10


def _count(n: int, suppress: bool) -> str:
    return f"<{MIN_CELL}" if suppress and 0 < n < MIN_CELL else f"{n:,}"


def token_lengths(prep: Prepared, task: str = "mortality_1m") -> pd.DataFrame:
    """Untruncated token count of each sample's history before its prediction time, per split."""
    frames = []
    huge = prep.params.tokenizer.max_len * 10_000
    for split in SPLITS:
        items, df = encode_samples(prep, task, split, max_len=huge)
        frames.append(pd.DataFrame({"split": split, "tokens": [len(e) for e in items]}))
    return pd.concat(frames, ignore_index=True)


def preflight_table(prep: Prepared) -> pd.DataFrame:
    """Samples and positives per task, label and split (`prepare.label_counts`), with the labels left out
    before training because a split had fewer than eval.min_label_positives positives or negatives, and the
    tasks dropped because they could not be trained (eval.untrainable: drop; why, with their counts)."""
    from repro.training.prepare import label_counts

    kept = label_counts(prep).assign(status="trained")
    k = prep.params.eval.min_label_positives
    gone = [
        {"task": task, "label": row["label"], **{c: v for c, v in row.items() if c.startswith("positives")}}
        for task, d in prep.dropped_labels.items()
        for row in d.to_dict(orient="records")
    ]
    gone_frame = pd.DataFrame(gone).rename(columns=lambda c: c.replace("positives in ", "positives "))
    if len(gone_frame):
        gone_frame["status"] = f"left out: fewer than {k} positives or negatives in a split"
    tasks = pd.DataFrame(
        [
            {"task": t, "label": "", "status": f"dropped (eval.untrainable: drop): {why}"}
            for t, why in prep.dropped_tasks.items()
        ]
    )
    out = pd.concat([kept, gone_frame, tasks], ignore_index=True)
    counts = [c for c in out.columns if c.startswith(("samples ", "positives "))]
    suppress = not prep.synthetic  # real data: small cells as "<10", like every cohort table
    out[counts] = out[counts].map(lambda n: "" if pd.isna(n) else _count(int(n), suppress))
    return out


def cohort_table(prep: Prepared, lengths: pd.DataFrame) -> pd.DataFrame:
    """One column per split: subjects, admissions, label counts and prevalence, token length quantiles."""
    suppress = not prep.synthetic
    max_len = prep.params.tokenizer.max_len
    rows: dict[str, dict[str, str]] = {}
    for split in SPLITS:
        ids = prep.dataset.subjects(split)
        visits = prep.n_visits.reindex(ids).fillna(0)
        col = {
            "subjects": _count(len(ids), suppress),
            "subjects with >= 1 admission": _count(int((visits > 0).sum()), suppress),
            "admissions per subject, median [IQR]": (
                f"{visits.median():.0f} [{visits.quantile(0.25):.0f}, {visits.quantile(0.75):.0f}]"
            ),
        }
        for task, df in prep.labels.items():
            d = df[df["split"] == split]
            cols = label_columns(d)
            col[f"{task}: samples"] = _count(len(d), suppress)
            if cols == ["label"]:
                pos = int(d["label"].sum())
                col[f"{task}: positives (%)"] = (
                    f"{_count(pos, suppress)} ({100 * pos / max(len(d), 1):.1f} %)"
                )
            else:
                rate = d[cols].to_numpy().mean() if len(d) else float("nan")
                col[f"{task}: label rate over {len(cols)} groups"] = f"{100 * rate:.1f} %"
        t = lengths.loc[lengths["split"] == split, "tokens"]
        if len(t):
            col["tokens, median [p90, max]"] = f"{t.median():.0f} [{t.quantile(0.9):.0f}, {t.max():.0f}]"
            col[f"histories longer than max_len={max_len}"] = f"{100 * (t > max_len).mean():.1f} %"
        rows[split] = col
    return pd.DataFrame(rows).rename_axis("").reset_index()


def tokenizer_table(prep: Prepared) -> pd.DataFrame:
    """What the tokenizer kept, dropped and did not know, with the reason for each."""
    s = prep.timelines.stats
    tok = prep.tokenizer
    rows = [
        ("vocabulary size (fitted on train)", f"{tok.vocab_size:,}"),
        ("lab codes with quantile bins (train)", f"{len(tok.bins):,} x {tok.params.n_bins} bins"),
        (
            "event families in the stream",
            ", ".join(tok.params.families + (["diagnosis"] if tok.params.include_diagnoses else [])),
        ),
        ("MEDS events read", f"{s.events_in:,}"),
        ("event tokens", f"{s.event_tokens:,}"),
        ("events of other families or static (not tokens)", f"{s.events_other_family:,}"),
        ("events outside any admission (dropped)", f"{s.events_outside_visits:,}"),
        (
            "event tokens unseen in train ([UNK])",
            f"{s.unk_tokens:,} ({100 * s.unk_tokens / max(s.event_tokens, 1):.2f} %)",
        ),
        ("subjects without an admission", f"{s.subjects_without_visits:,}"),
        ("subjects without MEDS_BIRTH (age 0)", f"{s.subjects_without_birth:,}"),
    ]
    return pd.DataFrame(rows, columns=["quantity", "value"])


def split_sizes(prep: Prepared) -> dict[str, int]:
    """Subjects per split, for the manifest."""
    return {k: int(v) for k, v in prep.dataset.splits["split"].value_counts().items()}


def _models_built(params) -> set[str]:
    """Backbones the run builds: its models (MultiBird is BigBird), the timed ones and the H4 / H5 ones."""
    names = {*params.models, *params.efficiency.models, *params.efficiency.long_models}
    names |= set(params.representations.models) | set(params.mpf_models)
    return {"bigbird" if n == "multibird" else n for n in names}


def run_table(params, env: dict, sha: str | None) -> pd.DataFrame:
    """The run's identity for the appendix: parameters hash, commit, device and package versions."""
    rows = [
        ("run", params.name),
        ("parameters hash", params.hash()),
        ("git commit", sha or "unknown"),
        ("device", env["gpu"] or f"CPU ({env['cpu_count']} cores)"),
        ("python / torch", f"{env['python']} / {env['torch']}"),
        (
            "meds / numpy / pandas / scikit-learn",
            f"{env['meds']} / {env['numpy']} / {env['pandas']} / {env['sklearn']}",
        ),
        (
            "mamba_ssm (fused kernels)",
            env["mamba_ssm"] or "not installed: EHRMamba uses the PyTorch reference scan",
        ),
        ("seeds", ", ".join(map(str, params.seeds))),
        ("bootstrap resamples", f"{params.eval.n_bootstrap:,}"),
        ("permutations per test", f"{params.eval.n_permutations:,}"),
        ("alpha (after Benjamini-Hochberg)", f"{params.eval.alpha:g}"),
        (
            "input tokens (the most recent)",
            ", ".join(
                [f"{m} {n:,}" for m, n in params.input_lengths.items()]
                + [f"{'the others' if params.input_lengths else 'every model'} {params.tokenizer.max_len:,}"]
            ),
        ),
        ("pretraining / finetuning budget", _budget(params.train)),
        (
            "validation / early stopping",
            f"{params.train.val_per_epoch:g} per epoch on {params.train.val_samples:,} tuning samples; "
            + _stopping(params.train)
            + "; best weights kept",
        ),
        ("learning rate: pretraining / finetuning", f"{params.train.lr:g} / {params.train.finetune_lr:g}"),
        *[
            (f"{model}: own settings", ", ".join(f"{k} {v:g}" for k, v in kw.items()))
            for model, kw in params.train.per_model.items()
        ],
        *[
            (f"{model}: size", ", ".join(f"{k} {v}" for k, v in kw.items()))
            for model, kw in params.model_sizes.items()
            if kw and model in _models_built(params)
        ],
    ]
    return pd.DataFrame(rows, columns=["item", "value"])


def _stopping(train) -> str:
    """The early-stopping rule in words, each phase's patience where they differ."""
    fine, pre = train.patience_for("classify"), train.patience_for("mlm")
    gain = f" without a {train.min_delta:.1%} improvement"
    if fine == pre:
        return f"stop after {fine}{gain}" if fine else "no early stopping"
    return ", ".join(
        f"{phase} {f'stops after {n}{gain}' if n else 'never stops early'}"
        for phase, n in (("finetuning", fine), ("pretraining", pre))
    )


def _budget(train) -> str:
    parts = []
    for phase in ("pretrain", "finetune"):
        fixed = getattr(train, f"{phase}_steps")
        parts.append(
            f"{fixed} steps" if fixed is not None else f"{getattr(train, f'{phase}_epochs'):g} epochs"
        )
    return " / ".join(parts)


def _shared(mps_line: str) -> str:
    """How a group's training processes shared the GPU, from its MPS line; "" on a CPU or without one."""
    if not mps_line or "no CUDA GPU" in mps_line:
        return ""
    return "MPS" if mps_line.startswith("on") else "by turns"


def timing_table(manifest: dict) -> pd.DataFrame:
    """Wall time per notebook from the run manifest, with the GPU-busy share where a GPU was sampled.

    Notebooks that ran at the same time (params.notebook_jobs) say so; the total then counts their group's
    wall time once. Where `repro run` trained the runs of the training notebooks in one pool before them
    (the manifest's "training"), that comes first, and those notebooks' own rows are their evaluation. The
    verdicts notebook reads the manifest while it runs, so its own row and the render are absent.
    """
    notebooks = manifest.get("notebooks", {})
    groups = manifest.get("groups") or [{"notebooks": [nb], **info} for nb, info in notebooks.items()]
    entries = dict(notebooks)
    ahead = manifest.get("training")  # the runs of the training notebooks, trained in one pool before them
    if ahead:  # a group of its own, listed first
        label = f"training ({', '.join(nb.split('_')[0] for nb in ahead['notebooks'])})"
        entries = {label: ahead, **entries}
        groups = [{**ahead, "notebooks": [label]}, *groups]
    alongside = {nb: [o for o in g["notebooks"] if o != nb] for g in groups for nb in g["notebooks"]}
    # how a training group's processes shared the GPU (repro.training.mps); a CPU run shares none
    sharing = {nb: how for g in groups if (how := _shared(g.get("mps", ""))) for nb in g["notebooks"]}
    rows = [
        {
            "notebook": label,
            "ran alongside": ", ".join(alongside.get(label, [])),
            "wall time": f"{info['seconds']:,.0f} s",
            "GPU busy": "—"
            if info.get("gpu_busy_share") is None
            else f"{100 * info['gpu_busy_share']:.0f} %",
            "GPU memory peak": "—"
            if info.get("gpu_mem_peak_mib") is None
            else f"{info['gpu_mem_peak_mib'] / 1024:.1f} GiB",
            "training processes": sharing.get(label, ""),
        }
        for label, info in entries.items()
    ]
    total = sum(g["seconds"] for g in groups)
    busy_s = [g["seconds"] * g["gpu_busy_share"] for g in groups if g.get("gpu_busy_share") is not None]
    rows.append(
        {
            "notebook": "all of the above",
            "ran alongside": "",
            "wall time": f"{total:,.0f} s",
            "GPU busy": f"{100 * sum(busy_s) / total:.0f} %" if busy_s and total else "—",
            "GPU memory peak": "",
            "training processes": "",
        }
    )
    table = pd.DataFrame(rows)
    unused = [
        c
        for c, used in (("ran alongside", any(alongside.values())), ("training processes", sharing))
        if not used
    ]
    return table.drop(columns=unused)
