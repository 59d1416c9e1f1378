"""The model side of the value representations: soft-bin mixing, xVal scaling and its numeric head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_train import _enc as _plain

from repro.config import TrainParams
from repro.data.dataset import IGNORE, SequenceDataset, collate
from repro.data.tokenizer import Encoded
from repro.data.vocab import SPECIALS
from repro.models.registry import build_model
from repro.training import loop

VOCAB = 40  # test_train's vocabulary, which its _enc draws from


def _enc(rng: np.random.Generator, n: int, values: bool = False, soft: bool = False) -> Encoded:
    """test_train's sequence, with xVal values and / or soft-bin neighbours on every third token."""
    e = _plain(rng, n)
    ids = e.input_ids
    numeric = np.arange(n) % 3 == 1
    if values:
        e.values = np.where(numeric, rng.normal(size=n), 0.0).astype(np.float32)
        e.value_mask = numeric.astype(np.int8)
    if soft:
        e.mix_ids = np.where(
            numeric, (ids + 1 - len(SPECIALS)) % (VOCAB - len(SPECIALS)) + len(SPECIALS), ids
        )
        e.mix_w = np.where(numeric, rng.uniform(0.05, 0.5, n), 0.0).astype(np.float32)
    return e


def _model(**extra):
    torch.manual_seed(0)
    return build_model("ehrmamba", VOCAB, d_model=16, n_layers=1, n_types=10, max_visits=8, **extra)


def test_neutral_value_arrays_leave_the_embedding_exactly_unchanged():
    rng = np.random.default_rng(0)
    emb = _model().backbone.embedding
    batch = collate([(_enc(rng, 12),), (_enc(rng, 7),)])
    assert (batch["mix_w"] == 0).all() and (batch["value_mask"] == 0).all()
    assert torch.equal(emb.token_vectors(batch), emb.concept(batch["input_ids"]))
    bare = {k: v for k, v in batch.items() if k not in ("values", "value_mask", "mix_ids", "mix_w")}
    assert torch.equal(emb(batch), emb(bare))  # batches without the keys (timing batches) give the same


def test_soft_bins_mix_the_two_neighbouring_embeddings():
    rng = np.random.default_rng(1)
    emb = _model().backbone.embedding
    batch = collate([(_enc(rng, 12, soft=True),)])
    w = batch["mix_w"].unsqueeze(-1)
    want = (1 - w) * emb.concept(batch["input_ids"]) + w * emb.concept(batch["mix_ids"])
    torch.testing.assert_close(emb.token_vectors(batch), want)
    assert (batch["mix_w"] > 0).any()


def test_xval_scales_the_numeric_tokens_embedding_by_its_value():
    rng = np.random.default_rng(2)
    emb = _model().backbone.embedding
    batch = collate([(_enc(rng, 12, values=True),)])
    e = emb.concept(batch["input_ids"])
    got = emb.token_vectors(batch)
    m = batch["value_mask"].bool()
    torch.testing.assert_close(got[m], e[m] * batch["values"][m].unsqueeze(-1))
    assert torch.equal(got[~m], e[~m])


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_the_numeric_head_adds_its_squared_error_to_the_pretraining_loss(objective):
    rng = np.random.default_rng(3)
    model = _model(value_head=True)
    batch = collate([(_enc(rng, 12, values=True),), (_enc(rng, 9, values=True),)])
    if objective == "mlm":
        batch = loop._global_batch(
            SequenceDataset([_enc(rng, 12, values=True), _enc(rng, 9, values=True)]),
            np.array([0, 1]),
            "mlm",
            VOCAB,
            torch.Generator().manual_seed(0),
            0.5,
        )
    with_values, n1 = loop._loss_sum(model, batch, objective, values=True)
    tokens_only, n2 = loop._loss_sum(model, batch, objective, values=False)
    assert int(n1) == int(n2) and with_values > tokens_only  # squared errors are positive
    with_values.backward()
    assert model.value_head.weight.grad is not None and model.value_head.weight.grad.abs().sum() > 0


def test_mlm_hides_the_values_of_masked_positions_and_keeps_them_as_targets():
    rng = np.random.default_rng(4)
    items = [_enc(rng, 30, values=True, soft=True) for _ in range(4)]
    batch = loop._global_batch(
        SequenceDataset(items), np.arange(4), "mlm", VOCAB, torch.Generator().manual_seed(1), 0.5
    )
    chosen = batch["mlm_labels"] != IGNORE
    assert chosen.any()
    assert (batch["values"][chosen] == 0).all() and (batch["value_mask"][chosen] == 0).all()
    assert (batch["mix_w"][chosen] == 0).all()
    assert torch.equal(batch["mix_ids"][chosen], batch["input_ids"][chosen])
    plain = collate([(e,) for e in items])
    torch.testing.assert_close(batch["value_target"], plain["values"])
    torch.testing.assert_close(batch["value_target_mask"], plain["value_mask"] * chosen)


def test_xval_pretraining_learns_on_a_tiny_run(tmp_path):
    rng = np.random.default_rng(5)
    data = SequenceDataset([_enc(rng, 16, values=True) for _ in range(16)])
    model = _model(value_head=True)
    res = loop.fit(
        model, data, TrainParams(batch_size=8), "clm", 30, 3e-3, 0, torch.device("cpu"), progress=False
    )
    assert np.mean(res.losses[-5:]) < np.mean(res.losses[:5])
