"""Forecasting as the EHRMamba paper reports it (its Table 5): the next k tokens of a history, generated.

The paper gives accuracy and cosine similarity for the next 1, 2, 5 and 10 tokens but neither its code
(VectorInstitute/odyssey holds generation, not the metrics) nor its definitions. What we match is
odyssey's generation (``odyssey/evals/prediction.py``): each history, ended at its last clinical token
(``history_end``: the trailing [VE] [REG] every history has would be free points), is cut before its last k
tokens,
the model predicts one token at a time from the context plus its own earlier predictions, and a generated
token's side inputs repeat the context's last ones, its token type the type that token carries in the
training data. We generate greedily (odyssey's first version; its later one samples at temperature 0.8).
The metrics are ours, stated in ``repro.evaluation.metrics.forecast_metrics``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from repro.data.dataset import collate
from repro.data.tokenizer import Encoded
from repro.data.vocab import PAD, SPECIALS
from repro.training.loop import _autocast, _padding, _to


def token_types(items: Sequence[Encoded], vocab_size: int) -> np.ndarray:
    """The token type each vocabulary id carries in ``items`` (the last one seen; 0 for unseen ids)."""
    out = np.zeros(vocab_size, dtype=np.int64)
    for e in items:
        out[e.input_ids] = e.type_ids
    return out


def history_end(e: Encoded) -> Encoded:
    """``e`` up to its last clinical token: without the structural tokens every history ends with
    ([VE] [REG] here), which a model predicts from the format alone and would inflate short horizons."""
    real = np.flatnonzero(e.input_ids >= len(SPECIALS))
    return _cut(e, int(real[-1]) + 1 if len(real) else 0)


def _cut(e: Encoded, n: int) -> Encoded:
    """The first ``n`` positions of every array of ``e``."""
    return Encoded(
        **{f.name: None if (v := getattr(e, f.name)) is None else v[:n] for f in dataclasses.fields(e)}
    )


def _extend(e: Encoded, token: int, types: np.ndarray) -> Encoded:
    """``e`` with one generated token: side inputs repeat the last position's, its type from ``types``."""

    def add(v: np.ndarray | None, x) -> np.ndarray | None:
        return None if v is None else np.append(v, np.asarray(x, dtype=v.dtype))

    return Encoded(
        input_ids=add(e.input_ids, token),
        type_ids=add(e.type_ids, types[token]),
        ages=add(e.ages, e.ages[-1]),
        times=add(e.times, e.times[-1]),
        segments=add(e.segments, e.segments[-1]),
        visit_orders=add(e.visit_orders, e.visit_orders[-1]),
        values=add(e.values, 0.0),
        value_mask=add(e.value_mask, 0),
        mix_ids=add(e.mix_ids, token),
        mix_w=add(e.mix_w, 0.0),
    )


@torch.no_grad()
def forecast(
    model: torch.nn.Module,
    items: Sequence[Encoded],
    k: int,
    types: np.ndarray,
    device: torch.device,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, true) token ids [n, k]: each item's last ``k`` tokens, generated greedily from the rest.

    Items need at least k + 2 tokens (callers filter). [PAD] is never predicted.
    """
    if not getattr(model, "causal", False):
        raise ValueError("forecasting needs a causal model (next-token prediction)")
    if any(len(e) < k + 2 for e in items):
        raise ValueError(f"every history needs at least k + 2 = {k + 2} tokens")
    model.to(device).eval()
    padding = _padding(model, device)
    truth = np.stack([e.input_ids[-k:] for e in items]).astype(np.int64)
    current = [_cut(e, len(e) - k) for e in items]
    pred = np.zeros((len(items), k), dtype=np.int64)
    for step in range(k):
        for start in range(0, len(current), batch_size):
            rows = range(start, min(start + batch_size, len(current)))
            batch = _to(collate([(current[i],) for i in rows], **padding), device)
            with _autocast(device):
                logits = model.lm_logits(batch).float()
            last = batch["attention_mask"].sum(1) - 1
            nxt = logits[torch.arange(len(rows), device=logits.device), last]
            nxt[:, PAD] = -torch.inf
            for i, token in zip(rows, nxt.argmax(-1).cpu().numpy(), strict=True):
                pred[i, step] = int(token)
                current[i] = _extend(current[i], int(token), types)
    model.train()
    return pred, truth
