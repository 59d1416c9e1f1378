"""`python -m repro.bench learn --params params/default.yaml --steps 1500`: does our EHRMamba learn as well
as the reference Mamba? Our backbone and mamba_ssm's `MambaLMHeadModel` of the same size (d_model, layers,
state, vocabulary) are pretrained by next-token prediction on the same token stream with the same loop,
batches, schedule and steps, for two seeds; their validation CLM losses on the tuning split are printed
side by side, with the final ratio ours / reference.

The reference reads the token ids only, ours its CEHR embedding of the same tokens (time, age, type, visit);
both are initialised as mamba_ssm initialises its models (`_init_weights`, rescaled `out_proj`, dt bias)
and run their residual stream in fp32. A ratio above 1.01 is a finding to explain, not noise to ignore.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from torch import nn

from repro.config import write_text_atomic

# ours may lose at most this much (relative) to the reference at the end (issue 20's criterion)
TOLERANCE = 0.01


class ReferenceMamba(nn.Module):
    """mamba_ssm's `MambaLMHeadModel` behind the loop's model interface (`forward(batch, head="lm")`)."""

    causal = True
    value_head = None
    n_outputs = 0

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, d_state: int) -> None:
        super().__init__()
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

        cfg = MambaConfig(
            d_model=d_model,
            n_layer=n_layers,
            vocab_size=vocab_size,
            ssm_cfg={"layer": "Mamba1", "d_state": d_state},
            rms_norm=True,
            residual_in_fp32=True,
            fused_add_norm=True,
            pad_vocab_size_multiple=8,
        )
        self.lm = MambaLMHeadModel(cfg)
        self.vocab_size = vocab_size

    def forward(self, batch: dict[str, torch.Tensor], head: str = "lm") -> torch.Tensor:
        if head != "lm":
            raise ValueError(f"the reference model has only the LM head, not {head!r}")
        return self.lm(batch["input_ids"]).logits[..., : self.vocab_size]

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class _TokensOnly(nn.Module):
    """The concept embedding alone, as the reference embeds tokens: no time, age, type or visit features."""

    def __init__(self, cehr: nn.Module) -> None:
        super().__init__()
        self.concept = cehr.concept

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.concept(batch["input_ids"])


def ablation(model: nn.Module, arm: str) -> nn.Module:
    """Our model with one difference from the reference removed: "untied" gives the LM head its own weight
    (N(0, 0.02)) instead of the concept table the CEHR mix reads; "tokens-only" feeds the concept embedding
    straight into the Mamba blocks, as the reference does."""
    if arm == "untied":
        head = model.lm_head.proj
        head.weight = nn.Parameter(torch.empty_like(head.weight).normal_(std=0.02))
    elif arm == "tokens-only":
        model.backbone.embedding = _TokensOnly(model.backbone.embedding)
    elif arm != "ours":
        raise ValueError(f"unknown arm {arm!r}; known: {ARMS}")
    return model


# the reference and our model, plus ablations of ours (--arms)
ARMS = ("ours", "reference", "untied", "tokens-only")


def learn(
    params_file: str,
    steps: int,
    seeds: list[int],
    every: int,
    n_subjects: int | None,
    out: str | None,
    arms: tuple[str, ...] = ("ours", "reference"),
) -> int:
    """Train ours and the reference (and any ablation `arms`) for `steps` steps per seed; print validation
    CLM losses side by side."""
    import meds

    from repro.config import load_params
    from repro.data.dataset import SequenceDataset
    from repro.training.loop import fit, val_subset
    from repro.training.prepare import prepare, pretrain_samples
    from repro.training.trainer import Trainer

    overrides = {"data.n_subjects": n_subjects} if n_subjects else {}
    params = load_params(params_file, overrides)
    prep = prepare(params)
    trainer = Trainer(prep, Path("outputs/.bench-learn"), progress=False)
    if trainer.device.type != "cuda":
        raise SystemExit("bench learn compares against mamba_ssm's CUDA kernels: run it on a GPU")
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        raise SystemExit("bench learn needs mamba_ssm (the reference model): pip install mamba-ssm") from None
    data = SequenceDataset(pretrain_samples(prep))
    tp = params.train.for_model("ehrmamba")
    val = val_subset(SequenceDataset(pretrain_samples(prep, meds.tuning_split)), tp.val_samples)
    per_epoch = tp.steps_per_epoch(len(data))
    # validate every `every` steps, never stop early: both models take every step
    tp = dataclasses.replace(
        tp, val_per_epoch=per_epoch / every, patience=0, pretrain_patience=None, checkpoint_every=10**9
    )
    kw = trainer.build_kwargs("ehrmamba")
    vocab = prep.tokenizer.vocab_size
    print(
        f"{len(data):,} training histories ({steps / per_epoch:.2f} epochs at batch {tp.batch_size}), "
        f"{len(val):,} validation histories; d_model {kw['d_model']}, {kw['n_layers']} layers, d_state "
        f"{kw.get('d_state', 16)}, vocabulary {vocab}, lr {tp.lr:g}",
        flush=True,
    )
    arms = tuple(dict.fromkeys(("ours", "reference", *arms)))
    curves: dict[str, dict[int, list[dict]]] = {arm: {} for arm in arms}
    n_params = {}
    for seed in seeds:
        for name in arms:
            torch.manual_seed(seed)
            if name == "reference":
                model = ReferenceMamba(vocab, kw["d_model"], kw["n_layers"], kw.get("d_state", 16))
            else:
                model = ablation(trainer.build("ehrmamba", seed), name)
            n_params[name] = model.n_params()
            t0 = time.perf_counter()
            res = fit(model, data, tp, "clm", steps, tp.lr, seed, trainer.device, progress=False, val=val)
            curves[name][seed] = res.val
            print(
                f"seed {seed} {name:11s}: {n_params[name]:,} parameters, final validation loss "
                f"{res.val[-1]['loss']:.4f}, {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    print("\nvalidation CLM loss (tuning split)")
    print("step   " + "".join(f"{arm[:11]:>12s} s{s}" for s in seeds for arm in arms))
    for i, point in enumerate(curves["ours"][seeds[0]]):
        cells = "".join(f"{curves[arm][s][i]['loss']:15.4f}" for s in seeds for arm in arms)
        print(f"{point['step']:<6d} {cells}")
    for arm in arms[2:]:
        r = [curves[arm][s][-1]["loss"] / curves["reference"][s][-1]["loss"] for s in seeds]
        print(f"final {arm} / reference: " + ", ".join(f"{x:.4f}" for x in r))
    ratios = {s: curves["ours"][s][-1]["loss"] / curves["reference"][s][-1]["loss"] for s in seeds}
    worst = max(ratios.values())
    verdict = "ours matches or beats the reference" if worst <= 1 + TOLERANCE else "ours trails the reference"
    print(
        "final ours / reference: "
        + ", ".join(f"seed {s} {r:.4f}" for s, r in ratios.items())
        + f" -> {verdict} (tolerance {TOLERANCE:.0%})"
    )
    if out:
        write_text_atomic(
            out,
            json.dumps(
                {
                    "params": params_file,
                    "steps": steps,
                    "seeds": seeds,
                    "gpu": torch.cuda.get_device_name(0),
                    "n_params": n_params,
                    "curves": {k: {str(s): v for s, v in c.items()} for k, c in curves.items()},
                    "final_ratio": {str(s): r for s, r in ratios.items()},
                },
                indent=2,
            ),
        )
    return 0
