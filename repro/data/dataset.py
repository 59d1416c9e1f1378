"""Torch datasets, collate and the pretraining objectives' input corruption.

Batches follow the model batch contract: right-padded [B, L] tensors `input_ids`, `type_ids`, `ages`,
`times`, `segments`, `visit_orders`, `attention_mask` (and `labels` when finetuning), and always the
value side arrays of the token representations (repro.data.tokenizer), neutral where a token has no
value and on padding: `values` float32 (xval z-score, 0), `value_mask` float32 (1 on tokens with a
value, 0), `mix_ids` int64 (soft: the neighbouring bin's token; equal to `input_ids` wherever
`mix_w` is 0), `mix_w` float32 (its weight in [0, 0.5], 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from repro.data.tokenizer import Encoded
from repro.data.vocab import MASK, PAD, SPECIALS

IGNORE = -100
SIDE = ("input_ids", "type_ids", "ages", "times", "segments", "visit_orders")
VALUE_SIDE = ("values", "value_mask", "mix_ids", "mix_w")


class SequenceDataset(Dataset):
    """Encoded sequences with optional labels [n, K] and label masks [n, K].

    K is 1 for a binary task, the number of groups for a multi-label task, and the total of all tasks'
    outputs for multitask prompted finetuning, where the mask marks the columns of each sample's task.
    """

    def __init__(
        self, items: Sequence[Encoded], labels: np.ndarray | None = None, mask: np.ndarray | None = None
    ) -> None:
        self.items = list(items)
        self.labels = None
        self.mask = None
        if labels is not None:
            labels = np.asarray(labels, dtype=np.float32)
            self.labels = labels[:, None] if labels.ndim == 1 else labels
            if len(self.labels) != len(self.items):
                raise ValueError(f"{len(self.items)} sequences but {len(self.labels)} labels")
        if mask is not None:
            if self.labels is None or np.shape(mask) != self.labels.shape:
                raise ValueError("a label mask needs labels of the same shape")
            self.mask = np.asarray(mask, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Encoded, np.ndarray | None, np.ndarray | None]:
        label = None if self.labels is None else self.labels[i]
        return self.items[i], label, None if self.mask is None else self.mask[i]

    def lengths(self) -> np.ndarray:
        return np.array([len(e) for e in self.items])


def collate(
    batch: Sequence[tuple], pad_to: int = 1, max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad a list of samples into the model batch contract (plus `labels` / `label_mask` when given).

    The length is the longest sample's, rounded up to a multiple of `pad_to` but not past `max_length`
    (a length-bound model's table).
    """
    n = len(batch)
    longest = max(len(b[0]) for b in batch)
    length = -(-longest // pad_to) * pad_to
    if max_length is not None:
        length = max(longest, min(length, max_length))
    out = {
        "input_ids": np.full((n, length), PAD, dtype=np.int64),
        "type_ids": np.zeros((n, length), dtype=np.int64),
        "ages": np.zeros((n, length), dtype=np.float32),
        "times": np.zeros((n, length), dtype=np.float32),
        "segments": np.zeros((n, length), dtype=np.int64),
        "visit_orders": np.zeros((n, length), dtype=np.int64),
        "attention_mask": np.zeros((n, length), dtype=np.int64),
        "values": np.zeros((n, length), dtype=np.float32),
        "value_mask": np.zeros((n, length), dtype=np.float32),
        "mix_ids": np.full((n, length), PAD, dtype=np.int64),
        "mix_w": np.zeros((n, length), dtype=np.float32),
    }
    for i, b in enumerate(batch):
        e = b[0]
        k = len(e)
        for name in SIDE:
            out[name][i, :k] = getattr(e, name)
        out["attention_mask"][i, :k] = 1
        for name in VALUE_SIDE:  # None on a hand-built Encoded: the neutral values stay
            a = getattr(e, name, None)
            if a is not None:
                out[name][i, :k] = a
    # Where the weight is 0 the neighbour is the token itself, also after a caller changed input_ids
    # (a task token put in place of the last [REG]).
    out["mix_ids"] = np.where(out["mix_w"] > 0, out["mix_ids"], out["input_ids"])
    tensors = {k: torch.from_numpy(v) for k, v in out.items()}
    if len(batch[0]) > 1 and batch[0][1] is not None:
        tensors["labels"] = torch.from_numpy(np.stack([b[1] for b in batch]).astype(np.float32))
    if len(batch[0]) > 2 and batch[0][2] is not None:
        tensors["label_mask"] = torch.from_numpy(np.stack([b[2] for b in batch]).astype(np.float32))
    return tensors


def clm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token targets aligned with the inputs; padding is -100 so it never enters the loss.

    The original EHRMamba code counted padding in the next-token loss (DESIGN.md section 11).
    """
    # a select, not a masked assignment: no host sync, so a CUDA graph can capture it
    return torch.where(attention_mask == 0, torch.full_like(input_ids, IGNORE), input_ids)


def mlm_mask(
    input_ids: torch.Tensor, vocab_size: int, probability: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose `probability` of the non-special tokens; of those 80 % [MASK], 10 % random, 10 % kept.

    Returns (corrupted inputs, labels with -100 where not chosen).
    """
    maskable = input_ids >= len(SPECIALS)
    probs = torch.full(input_ids.shape, probability)
    chosen = (torch.rand(input_ids.shape, generator=generator) < probs) & maskable
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    corrupted = input_ids.clone()
    u = torch.rand(input_ids.shape, generator=generator)
    to_mask = chosen & (u < 0.8)
    to_random = chosen & (u >= 0.8) & (u < 0.9)
    corrupted[to_mask] = MASK
    random_ids = torch.randint(len(SPECIALS), vocab_size, input_ids.shape, generator=generator)
    corrupted[to_random] = random_ids[to_random]
    return corrupted, labels


def batch_indices(
    n: int,
    batch_size: int,
    seed: int,
    step: int,
    lengths: np.ndarray | None = None,
    group: int = 0,
    by_tokens: bool = False,
    min_rows: int = 1,
) -> np.ndarray:
    """The sample indices of training step `step`, a pure function of (seed, step) so resume is exact.

    With `lengths` and `group` > 0, batches hold samples of similar length (as HF's `group_by_length`):
    each epoch is a permutation cut into megabatches of `group` batches, each megabatch is sorted by
    length and cut into batches, and the batches are shuffled. Every sample is seen once per epoch, as
    with random batches; why: histories are long-tailed, and a random batch is padded to its longest
    member (on the default synthetic cohort, 988 tokens per row for a mean of 311).

    `by_tokens` cuts each sorted megabatch into the same number of batches by padded tokens (rows times
    the longest) instead of rows (``token_cuts``): short histories come many to a step and long ones few,
    so no step is too small to fill a GPU and none is many times the mean. Steps per epoch stay
    ``n // batch_size`` and each batch keeps at least `min_rows` rows (one per DDP process).
    """
    size = min(batch_size, n)
    if lengths is None or group <= 0 or n <= size:
        rng = np.random.default_rng(np.random.SeedSequence([seed, step]))
        return rng.choice(n, size=size, replace=False)
    if len(lengths) != n:
        raise ValueError(f"batch_indices: {len(lengths)} lengths for {n} samples")
    epoch, k = divmod(step, n // size)
    cut = min(min_rows, size) if by_tokens else None
    return _epoch_batches(np.asarray(lengths), size, seed, epoch, group, cut)[k]


# the last few epochs' batches, one sort per epoch rather than per step; keyed by the lengths array's
# identity (fit passes the same array every step), which is checked, so equal arrays only cost a re-sort
_EPOCHS: dict[tuple, tuple[np.ndarray, Sequence[np.ndarray]]] = {}


def _epoch_batches(
    lengths: np.ndarray, size: int, seed: int, epoch: int, group: int, min_rows: int | None = None
) -> Sequence[np.ndarray]:
    """One epoch's batches: a permutation cut into megabatches of `group` batches, each sorted by length,
    cut by rows, or by padded tokens when `min_rows` is given (``token_cuts``: each megabatch, its first
    whole batches' worth of samples, into as many batches as it holds by rows); then shuffled."""
    key = (id(lengths), size, seed, epoch, group, min_rows)
    hit = _EPOCHS.get(key)
    if hit is None or hit[0] is not lengths:
        rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 1]))
        perm = rng.permutation(len(lengths))
        mega = size * group
        parts = [perm[i : i + mega] for i in range(0, len(perm), mega)]
        batches: Sequence[np.ndarray]
        if min_rows is None:
            ordered = np.concatenate([m[np.argsort(lengths[m], kind="stable")] for m in parts])
            n_full = len(ordered) // size  # the few left over sit this epoch out
            batches = ordered[: n_full * size].reshape(n_full, size)
        else:
            batches = []
            for part in parts:
                k = len(part) // size
                if k == 0:
                    continue
                part = part[: k * size]  # the few left over sit this epoch out
                part = part[np.argsort(lengths[part], kind="stable")]
                batches.extend(np.split(part, token_cuts(lengths[part], k, min_rows)))
        order = rng.permutation(len(batches))
        if len(_EPOCHS) >= 8:
            _EPOCHS.pop(next(iter(_EPOCHS)))
        shuffled = batches[order] if isinstance(batches, np.ndarray) else [batches[i] for i in order]
        hit = _EPOCHS[key] = (lengths, shuffled)
    return hit[1]


def token_cuts(lengths: np.ndarray, k: int, min_rows: int = 1) -> list[int]:
    """Where to cut ascending `lengths` into `k` contiguous batches whose largest padded size (rows times
    the batch's last, longest, length) is as small as it can be; the k - 1 inner cut positions.

    Bisection on the padded size with a greedy fill (each batch takes rows while it stays under the size,
    which finds the fewest batches under it); splitting a batch never raises the largest, so batches the
    fill leaves short of k come from halving the ones with most rows. Then every batch is given at least
    `min_rows` rows by moving cuts (one row per DDP process; the few longest batches may grow by it).

    >>> token_cuts(np.array([1, 1, 1, 1, 2, 2, 4, 4]), 3)
    [4, 6]
    """
    n = len(lengths)
    if k < 1 or n < k * min_rows:
        raise ValueError(f"token_cuts: {n} samples cannot make {k} batches of at least {min_rows} rows")
    lengths = np.asarray(lengths)

    def fill(cap: int) -> list[int]:
        ends, i = [], 0
        while i < n:
            lo, hi = i + 1, n  # the largest end j with (j - i) rows of the longest, lengths[j - 1], fitting
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if (mid - i) * int(lengths[mid - 1]) <= cap:
                    lo = mid
                else:
                    hi = mid - 1
            ends.append(lo)
            i = lo
        return ends

    lo, hi = int(lengths.max()), n * int(lengths.max())
    while lo < hi:
        mid = (lo + hi) // 2
        if len(fill(mid)) <= k:
            hi = mid
        else:
            lo = mid + 1
    bounds = [0, *fill(lo)]
    while len(bounds) - 1 < k:  # halve the batch with the most rows
        sizes = np.diff(bounds)
        b = int(np.argmax(sizes))
        bounds.insert(b + 1, bounds[b] + int(sizes[b]) // 2)
    for i in range(k - 1, 0, -1):  # at least min_rows rows each: from the end, then from the start
        bounds[i] = min(bounds[i], bounds[i + 1] - min_rows)
    for i in range(1, k):
        bounds[i] = max(bounds[i], bounds[i - 1] + min_rows)
    return bounds[1:-1]
