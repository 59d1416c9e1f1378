"""CUDA-graphed training steps: each batch shape's step (forward, backward, clipping, AdamW) captured once
and replayed for every later step of that shape.

Why: on one H200 a default-size EHRMamba step (d_model 256, 4 layers) took 14.1 ms at 32 x 256 tokens and
15.1 ms at 32 x 1024 (`python -m repro.bench step`, 2026-12-06): below about 32k tokens a step costs the
host's kernel launches, not the GPU's work, and the default batches hold about 11k tokens. A replayed
graph launches the whole step at once. `python -m repro.bench graphs` measures what it gains.

What capture needs, and how it is met here:
- no host sync and no data-dependent Python branch on the step's path: only backbones whose
  ``graph_safe`` is true are captured (EHRMamba on mamba_ssm's scan, the transformer, CEHR-BERT, BigBird:
  the encoders' key padding mask skips its host check while capturing); the others train eagerly;
- an optimizer whose step runs on the device: AdamW with ``capturable=True`` and its learning rate in a
  device tensor, which the scheduler fills between replays;
- shapes that repeat: on CUDA batches are padded to a multiple of 64 tokens, so a run sees a few dozen;
- warm-up before capture (cuBLAS handles, autotuning, the optimizer's state): the first `warmup` steps
  of each shape run eagerly, on a side stream, and are real training steps.

All graphs share one memory pool. That is safe because nothing a replay leaves behind is read by another
replay: inputs are copied in before each replay, gradients are written by its backward before its
clipping and AdamW read them, and weights and optimizer state were allocated before any capture. So after
a replay, ``.grad`` and another graph's output hold garbage: read neither (``release`` drops them).
Dropout draws fresh masks at every replay, from another stream of random numbers than eager steps: a
graphed run matches an eager one in distribution, and a resumed one (which warms up again) likewise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Batch = dict[str, torch.Tensor]


def graph_safe(model: torch.nn.Module) -> bool:
    """Whether the model's backbone declares its CUDA training step capturable."""
    return bool(getattr(getattr(model, "backbone", model), "graph_safe", False))


class GraphedSteps:
    """Training steps through CUDA graphs, one per batch shape.

    ``body(batch)`` is the step from the loss to the optimizer (the caller zeroes nothing: every step here
    starts with no gradients) and returns the logged loss as a 0-d tensor; ``step(batch)`` runs it for a
    host batch and returns a fresh copy of that tensor (the loop reads losses back in bulk).
    """

    def __init__(self, body: Callable[[Batch], torch.Tensor], opt: torch.optim.Optimizer, warmup: int = 2):
        if warmup < 1:  # the optimizer creates its state lazily: captured, every replay would re-zero it
            raise ValueError(f"GraphedSteps: warmup must be >= 1, got {warmup}")
        self.body, self.opt, self.warmup = body, opt, warmup
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Batch, torch.Tensor]] = {}
        self.seen: dict[tuple, int] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.side = torch.cuda.Stream()
        self.captures = 0  # graphs captured: one per batch shape

    @staticmethod
    def _key(batch: Batch) -> tuple:
        return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items()))

    def step(self, batch: Batch, device: torch.device) -> torch.Tensor:
        key = self._key(batch)
        hit = self.graphs.get(key)
        if hit is not None:
            graph, static, out = hit
            for k, v in batch.items():  # from pinned memory, or the copy waits for the last replay
                static[k].copy_(v.pin_memory(), non_blocking=True)
            graph.replay()
            return out.clone()
        gpu = {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
        self.seen[key] = self.seen.get(key, 0) + 1
        if self.seen[key] <= self.warmup:  # a real step, eager, on a side stream (as capture wants)
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                self.opt.zero_grad(set_to_none=True)
                out = self.body(gpu).clone()
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        self.opt.zero_grad(set_to_none=True)  # backward allocates the gradients inside the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.body(gpu)
        self.graphs[key] = (graph, gpu, out)
        self.captures += 1
        graph.replay()  # capture records the step; this replay takes it
        return out.clone()

    def release(self) -> None:
        """Drop the graphs and their pool, and the gradients (garbage after replays) that pin it."""
        self.opt.zero_grad(set_to_none=True)
        self.graphs.clear()
        torch.cuda.empty_cache()
