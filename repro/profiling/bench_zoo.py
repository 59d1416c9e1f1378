"""`python -m repro.bench zoo --params params/default.yaml --steps 300` trains every backbone of a params
file at its size on the synthetic cohort: pretraining with its own objective, then finetuning on one
task, printing the loss every few steps (a window mean), the time per step, tokens/s, the kernel path and
the parameter count actually built. It is the check that every model learns on the device at hand."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from repro.config import write_text_atomic


def _windows(losses: list[float], every: int) -> list[float]:
    return [float(np.mean(losses[i : i + every])) for i in range(0, len(losses), every)]


def zoo(params_file: str, steps: int, task: str, every: int, n_subjects: int | None, out: str | None) -> int:
    """Pretrain + finetune each backbone for `steps` steps; print loss windows and step times."""
    import dataclasses

    from repro.config import BACKBONES, load_params
    from repro.data.dataset import SequenceDataset
    from repro.models.registry import build_model, describe
    from repro.training.loop import fit
    from repro.training.prepare import encode_samples, prepare, pretrain_samples
    from repro.training.trainer import Trainer

    overrides = {"train.pretrain_steps": steps, "train.finetune_steps": steps}
    if n_subjects:
        overrides["data.n_subjects"] = n_subjects
    params = load_params(params_file, overrides)
    if task not in params.tasks:
        params.tasks = [*params.tasks, task]
    t0 = time.perf_counter()
    prep = prepare(params)
    print(
        f"data: {prep.n_events:,} events, vocab {prep.tokenizer.vocab_size}, prepared in "
        f"{time.perf_counter() - t0:.1f} s; device {prep.params.device}",
        flush=True,
    )
    trainer = Trainer(prep, Path("outputs/.bench-zoo"), progress=False)
    device = trainer.device
    pre_data = SequenceDataset(pretrain_samples(prep))
    items, df = encode_samples(prep, task, "train")
    ft_data = SequenceDataset(items, df["label"].to_numpy())
    tp = dataclasses.replace(params.train, checkpoint_every=10**9)
    rows = []
    names = [m for m in BACKBONES if m in params.models or (m == "bigbird" and "multibird" in params.models)]
    for name in names:
        torch.manual_seed(0)
        model = build_model(name, prep.tokenizer.vocab_size, **trainer.build_kwargs(name))
        objective = model.backbone.pretrain_objective
        row = {"model": name, "params": model.n_params()}
        for phase, obj, data, lr in (
            ("pretrain", objective, pre_data, tp.lr),
            ("finetune", "classify", ft_data, tp.finetune_lr),
        ):
            if obj is None:
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            res = fit(model, data, tp, obj, steps, lr, 0, device, progress=False, desc=f"{phase} {name}")
            row[phase] = {
                "objective": obj,
                "loss_windows": [round(x, 4) for x in _windows(res.losses, every)],
                "ms_per_step": round(1000 * res.seconds / max(res.steps_run, 1), 2),
                "tokens_per_s": round(res.tokens / res.seconds) if res.seconds else None,
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                if device.type == "cuda"
                else None,
            }
            if phase == "pretrain":
                model.set_n_outputs(1)
        row["kernel_path"] = model.kernel_path
        print(describe(model), flush=True)
        for phase in ("pretrain", "finetune"):
            if phase in row:
                r = row[phase]
                print(
                    f"  {phase:8s} {r['objective']:8s} loss every {every} steps: "
                    f"{' '.join(f'{x:.3f}' for x in r['loss_windows'])}",
                    flush=True,
                )
                print(
                    f"  {'':8s} {r['ms_per_step']:.1f} ms/step, {r['tokens_per_s']:,} tokens/s"
                    + (f", peak {r['peak_gib']} GiB" if r["peak_gib"] is not None else ""),
                    flush=True,
                )
        rows.append(row)
    if out:
        write_text_atomic(
            out,
            json.dumps(
                {
                    "params": params_file,
                    "steps": steps,
                    "task": task,
                    "device": str(device),
                    "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                    "models": rows,
                },
                indent=2,
            ),
        )
    falling = [
        r["model"]
        for r in rows
        if all(r[p]["loss_windows"][-1] < r[p]["loss_windows"][0] for p in ("pretrain", "finetune") if p in r)
    ]
    print(f"loss fell in every phase for {len(falling)}/{len(rows)} models: {', '.join(falling)}")
    return 0
