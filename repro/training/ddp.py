"""`torchrun --nproc_per_node=N -m repro.training.ddp --params P --model M --out CKPT`: pretrain one
backbone over N processes with DistributedDataParallel (the loop's DDP path, `repro.training.loop`)."""

from __future__ import annotations

from pathlib import Path

import meds
import torch

from repro.data.dataset import SequenceDataset
from repro.training.loop import fit, init_distributed, val_subset


def main(argv: list[str] | None = None) -> int:
    """`torchrun --nproc_per_node=N -m repro.training.ddp --params P --model M --out CKPT`: pretrain one backbone.

    Rank 0 prepares (and caches) the data first, the other ranks then read the cache; the global batch is
    ``train.batch_size`` whatever N is. A rerun with the same --out resumes from its last checkpoint.
    """
    import argparse
    import json

    from repro.config import load_run_params
    from repro.training.prepare import prepare, pretrain_samples
    from repro.training.trainer import Trainer

    p = argparse.ArgumentParser(prog="python -m repro.training.ddp", description=main.__doc__.splitlines()[0])
    p.add_argument("--params", required=True)
    p.add_argument("--model", default="ehrmamba")
    p.add_argument("--out", required=True, help="checkpoint path (resumed from when it exists)")
    p.add_argument("--data", default=None, help="a MEDS directory (default: the params' cohort)")
    p.add_argument("--steps", type=int, default=None, help="default: the params' pretraining budget")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rank, world, device = init_distributed()
    try:
        params = load_run_params(args.params, args.data)
        if rank == 0:
            prep = prepare(params, args.data)
        if world > 1:
            torch.distributed.barrier()
        if rank != 0:
            prep = prepare(params, args.data)  # a cache hit: rank 0 wrote it
        trainer = Trainer(prep, Path(args.out).parent, progress=False)
        model = trainer.build(args.model, args.seed)
        objective = getattr(model.backbone, "pretrain_objective", "clm" if model.causal else "mlm")
        tp = params.train.for_model(args.model)
        n = trainer.input_len(args.model)
        data = SequenceDataset(pretrain_samples(prep, meds.train_split, n))
        val = val_subset(SequenceDataset(pretrain_samples(prep, meds.tuning_split, n)), tp.val_samples)
        steps = args.steps or tp.steps("pretrain", len(data))
        spec = {
            "name": args.model,
            "vocab_size": prep.tokenizer.vocab_size,
            **trainer.build_kwargs(args.model),
        }
        res = fit(model, data, tp, objective, steps, tp.lr, args.seed, device, checkpoint=Path(args.out),
                  spec=spec, progress=rank == 0, desc=f"{objective} {args.model}", val=val)  # fmt: skip
        if rank == 0:
            summary = {
                "model": args.model,
                "objective": objective,
                "processes": world,
                "device": str(device),
                "global_batch": params.train.batch_size,
                "steps_run": res.steps_run,
                "resumed_from": res.resumed_from,
                "seconds": round(res.seconds, 2),
                "tokens_per_s": round(res.tokens / res.seconds) if res.seconds else None,
                "final_loss": res.losses[-1] if res.losses else None,
                "best_step": res.best_step,
                "best_val_loss": next((v["loss"] for v in res.val if v["step"] == res.best_step), None),
                "stop": res.stop,
            }
            print(json.dumps(summary))
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
