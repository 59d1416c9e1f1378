"""Training objectives and loops: padding out of the loss, BERT masking, exact resume from a checkpoint."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from repro.config import ParamsError, TrainParams
from repro.data.dataset import IGNORE, SequenceDataset, collate, mlm_mask
from repro.data.tokenizer import Encoded
from repro.data.vocab import MASK, SPECIALS
from repro.models.registry import build_model
from repro.training import loop

VOCAB = 40


def _enc(rng, n):
    ids = rng.integers(len(SPECIALS), VOCAB, n)
    ids[0] = 2
    return Encoded(
        ids,
        np.full(n, 4),
        np.linspace(60, 61, n).astype(np.float32),
        np.linspace(8000, 8001, n).astype(np.float32),
        np.ones(n, np.int64),
        np.ones(n, np.int64),
    )


def _data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    items = [_enc(rng, int(rng.integers(6, 20))) for _ in range(n)]
    return SequenceDataset(items, (rng.random(n) < 0.4).astype(np.float32))


def _model(name="ehrmamba", **extra):
    torch.manual_seed(0)
    own = {"n_heads": 2, "max_len": 32, "dropout": 0.0} if name == "cehr_bert" else {}
    kw = {"d_model": 16, "n_layers": 1, "n_types": 10, "max_visits": 8, **own, **extra}
    return build_model(name, VOCAB, **kw)


def test_clm_loss_ignores_padding():
    model = _model().eval()
    data = _data()
    short = collate([data[0], data[1]])
    long_ = collate([data[0], data[1], (_enc(np.random.default_rng(9), 30), np.zeros(1, np.float32))])
    # The same two sequences, padded to 30 instead of their own max: loss sum and token count must not change.
    two_of_long = {k: v[:2] for k, v in long_.items()}
    (a, na), (b, nb) = (loop._loss_sum(model, x, "clm") for x in (short, two_of_long))
    assert int(na) == int(nb) and torch.allclose(a, b, atol=1e-4)


def test_mlm_mask_proportions_and_specials():
    ids = torch.randint(len(SPECIALS), VOCAB, (200, 200))
    ids[:, 0] = 2  # [CLS]
    corrupted, labels = mlm_mask(ids, VOCAB, 0.15, torch.Generator().manual_seed(0))
    chosen = labels != IGNORE
    assert abs(chosen.float().mean().item() - 0.15 * 199 / 200) < 0.01
    assert not chosen[:, 0].any()
    frac_mask = (corrupted[chosen] == MASK).float().mean().item()
    frac_kept = (corrupted[chosen] == ids[chosen]).float().mean().item()
    assert abs(frac_mask - 0.8) < 0.02
    assert 0.09 < frac_kept < 0.13  # 10 % kept plus random draws that hit the same id
    assert (labels[chosen] == ids[chosen]).all()


def _die_at(monkeypatch, step: int):
    """Make fit stop at `step` as a killed process would (its batch raises); returns the real function."""
    real = loop.batch_indices

    def dying(n, bs, seed, s, *a):
        if s == step:
            raise KeyboardInterrupt("killed")
        return real(n, bs, seed, s, *a)

    monkeypatch.setattr(loop, "batch_indices", dying)
    return real


@pytest.mark.parametrize(
    "objective,name,by",
    [
        ("clm", "ehrmamba", "rows"),
        ("mlm", "cehr_bert", "rows"),
        ("classify", "ehrmamba", "rows"),
        ("classify", "ehrmamba", "tokens"),
    ],
)
def test_resume_after_interruption_gives_the_same_model(tmp_path, monkeypatch, objective, name, by):
    params = TrainParams(batch_size=4, checkpoint_every=3, warmup_frac=0.2, batch_by=by)
    data = _data()
    dev = torch.device("cpu")

    ref = _model(name)
    ref.set_n_outputs(1)
    loop.fit(ref, data, params, objective, 7, 1e-3, 0, dev, tmp_path / "ref.pt", progress=False)

    real = _die_at(monkeypatch, 5)
    first = _model(name)
    first.set_n_outputs(1)
    with pytest.raises(KeyboardInterrupt):
        loop.fit(first, data, params, objective, 7, 1e-3, 0, dev, tmp_path / "run.pt", progress=False)
    monkeypatch.setattr(loop, "batch_indices", real)
    second = _model(name)
    second.set_n_outputs(1)
    res = loop.fit(second, data, params, objective, 7, 1e-3, 0, dev, tmp_path / "run.pt", progress=False)
    assert res.resumed_from == 3 and res.steps_run == 4
    for (k, a), b in zip(ref.state_dict().items(), second.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_a_finished_run_reloaded_from_its_checkpoint_keeps_its_record(tmp_path):
    """Another process that loads a finished pretraining (the pool's finetuning stages) reports how it was
    trained, graphed shapes included: the default run of 2026-12-07 listed every reloaded pretraining as
    run without graphs."""
    params = TrainParams(batch_size=4, checkpoint_every=3, warmup_frac=0.2)
    ckpt, dev = tmp_path / "pre.pt", torch.device("cpu")
    first = loop.fit(
        _model("transformer", max_len=32), _data(), params, "clm", 3, 1e-3, 0, dev, ckpt, progress=False
    )
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["graphs"] == 0  # eager on the CPU
    state["graphs"] = 7  # as a CUDA run that captured seven batch shapes would have saved it
    torch.save(state, ckpt)
    again = loop.fit(
        _model("transformer", max_len=32), _data(), params, "clm", 3, 1e-3, 0, dev, ckpt, progress=False
    )
    assert again.steps_run == 0 and again.graphs == 7
    assert (again.losses, again.tokens, again.stop, again.best_step) == (
        first.losses,
        first.tokens,
        first.stop,
        first.best_step,
    )


_KILLED_CHILD = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
from repro.training import loop
from repro.config import TrainParams
from test_train import _data, _model

real = loop.batch_indices
def slow(n, bs, seed, step, *a):  # after the first checkpoint, slow enough to be killed mid-run
    if step >= 4:
        time.sleep(0.5)
    return real(n, bs, seed, step, *a)
loop.batch_indices = slow
m = _model("ehrmamba")
m.set_n_outputs(1)
params = TrainParams(batch_size=4, checkpoint_every=3, warmup_frac=0.2)
loop.fit(m, _data(), params, "clm", 7, 1e-3, 0, torch.device("cpu"), Path({ckpt!r}), progress=False)
"""


@pytest.mark.slow  # several processes (pyproject: slow)
def test_a_process_killed_by_sigkill_resumes_from_its_checkpoint(tmp_path):
    import subprocess
    import sys
    import time
    from pathlib import Path

    params = TrainParams(batch_size=4, checkpoint_every=3, warmup_frac=0.2)
    ref = _model("ehrmamba")
    ref.set_n_outputs(1)
    loop.fit(
        ref, _data(), params, "clm", 7, 1e-3, 0, torch.device("cpu"), tmp_path / "ref.pt", progress=False
    )
    ckpt = tmp_path / "run.pt"
    code = _KILLED_CHILD.format(tests=str(Path(__file__).parent), ckpt=str(ckpt))
    child = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 120
    while not ckpt.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.kill()  # SIGKILL: no handler, no cleanup
    child.wait()
    assert ckpt.exists() and child.returncode == -9, "the child must die after writing its first checkpoint"
    second = _model("ehrmamba")
    second.set_n_outputs(1)
    res = loop.fit(second, _data(), params, "clm", 7, 1e-3, 0, torch.device("cpu"), ckpt, progress=False)
    assert res.resumed_from == 3 and res.steps_run == 4
    for (k, a), b in zip(ref.state_dict().items(), second.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_predict_keeps_order_and_range():
    model = _model("cehr_bert")
    model.set_n_outputs(1)
    data = _data()
    p = loop.predict(model, data, torch.device("cpu"), batch_size=5)
    assert p.shape == (len(data), 1) and ((p > 0) & (p < 1)).all()
    single = [loop.predict(model, SequenceDataset([data.items[i]]), torch.device("cpu"))[0] for i in (0, 7)]
    np.testing.assert_allclose(p[[0, 7], 0], np.ravel(single), atol=1e-5)


def test_cuda_request_without_cuda_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="cuda was requested"):
        loop.resolve_device("cuda")


def test_length_grouped_batches_cover_each_epoch_once_and_pad_less():
    from repro.data import dataset as ds

    rng = np.random.default_rng(0)
    lengths = rng.lognormal(5.5, 0.8, size=1003).astype(int) + 1
    n, size, group = len(lengths), 16, 10
    per_epoch = n // size
    for seed in (0, 3):
        epoch = [ds.batch_indices(n, size, seed, s, lengths, group) for s in range(per_epoch)]
        seen = np.concatenate(epoch)
        assert len(seen) == len(set(seen)) == per_epoch * size  # each sample at most once, 11 sit out
        ds._EPOCHS.clear()  # a pure function of (seed, step): the cache changes nothing
        again = ds.batch_indices(n, size, seed, per_epoch + 2, lengths, group)
        ds._EPOCHS.clear()
        assert np.array_equal(again, ds.batch_indices(n, size, seed, per_epoch + 2, lengths, group))
        assert not np.array_equal(again, epoch[2])  # the next epoch is another permutation
        grouped = np.mean([lengths[b].max() for b in epoch])
        random = np.mean([lengths[ds.batch_indices(n, size, seed, s)].max() for s in range(per_epoch)])
        assert grouped < 0.6 * random


def test_batches_by_tokens_hold_about_equal_tokens_and_cover_each_epoch_once():
    from repro.data import dataset as ds

    rng = np.random.default_rng(1)
    lengths = np.minimum(1024, rng.lognormal(5.3, 0.8, size=3210).astype(int) + 8)
    n, size, group = len(lengths), 32, 20
    per_epoch = n // size
    for seed in (0, 5):
        epoch = [ds.batch_indices(n, size, seed, s, lengths, group, True, 4) for s in range(per_epoch)]
        seen = np.concatenate(epoch)
        assert len(seen) == len(set(seen)) == per_epoch * size  # the steps and samples of batches by rows
        assert min(len(b) for b in epoch) >= 4  # one row per process at least
        padded = np.array([len(b) * lengths[b].max() for b in epoch])
        rows = [ds.batch_indices(n, size, seed, s, lengths, group) for s in range(per_epoch)]
        by_rows = np.array([size * lengths[b].max() for b in rows])
        assert padded.max() < 1.5 * padded.mean() and by_rows.max() > 2.5 * by_rows.mean()
        assert padded.mean() < 1.1 * by_rows.mean()  # no more padding than by rows
        ds._EPOCHS.clear()  # a pure function of (seed, step): the cache changes nothing
        assert np.array_equal(ds.batch_indices(n, size, seed, 7, lengths, group, True, 4), epoch[7])


def _worst(cuts, lengths, least):
    """The largest padded batch of ascending `lengths` cut at `cuts` (inf if a batch has < least rows)."""
    b = [0, *cuts, len(lengths)]
    if min(np.diff(b)) < least:
        return np.inf
    return max((b[i + 1] - b[i]) * lengths[b[i + 1] - 1] for i in range(len(b) - 1))


def test_token_cuts_reach_the_smallest_largest_batch():
    from itertools import combinations

    from repro.data.dataset import token_cuts

    rng = np.random.default_rng(2)
    for _ in range(40):
        n, k, least = int(rng.integers(4, 11)), int(rng.integers(1, 4)), int(rng.integers(1, 3))
        if n < k * least:
            continue
        lengths = np.sort(rng.integers(1, 30, n))
        cuts = token_cuts(lengths, k, least)
        assert len(cuts) == k - 1 and _worst(cuts, lengths, least) < np.inf  # k batches of >= least rows
        if least == 1:  # the smallest largest batch there is
            best = min(_worst(c, lengths, least) for c in combinations(range(1, n), k - 1))
            assert _worst(cuts, lengths, least) == best
    with pytest.raises(ValueError, match="cannot make 3 batches of at least 2 rows"):
        token_cuts(np.arange(5), 3, 2)


def test_finetuning_by_tokens_weighs_every_sample_alike():
    # the loss divisor is an average step's outputs, not the step's own: a long history in a batch of few
    # rows weighs what a short one in a batch of many does
    data = _data(n=40)
    tp = TrainParams(batch_size=8, batch_by="tokens")
    assert loop._fixed_norm(data, tp) == 8.0
    mask = np.zeros((40, 3), np.float32)
    mask[:20, 0], mask[20:, 1:] = 1, 1
    mpf = SequenceDataset(data.items, np.ones((40, 3), np.float32), mask)
    assert loop._fixed_norm(mpf, tp) == 8 * 1.5
    with pytest.raises(Exception, match="train.batch_by must be 'rows' or 'tokens'"):
        TrainParams(batch_by="samples")
    with pytest.raises(Exception, match="set train.group_by_length > 0"):
        TrainParams(batch_by="tokens", group_by_length=0)


def test_length_grouping_off_or_too_few_samples_gives_random_batches():
    from repro.data import dataset as ds

    lengths = np.arange(40)
    assert np.array_equal(ds.batch_indices(40, 8, 1, 5, lengths, 0), ds.batch_indices(40, 8, 1, 5))
    assert sorted(ds.batch_indices(6, 8, 1, 5, lengths[:6], 50)) == list(range(6))
    with pytest.raises(ValueError, match="39 lengths for 40 samples"):
        ds.batch_indices(40, 8, 1, 5, lengths[:39], 50)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_finished_cuda_checkpoint_is_reused_by_another_fit(tmp_path):
    """Notebook 03 reuses notebook 01's pretrained backbones through their checkpoints; on CUDA the saved
    RNG states once came back as CUDA tensors, which torch.set_rng_state refuses (found on the H200 node)."""
    params = TrainParams(batch_size=4, checkpoint_every=3, warmup_frac=0.2)
    dev = torch.device("cuda")
    ckpt = tmp_path / "pre.pt"
    first = _model("transformer", max_len=32)
    loop.fit(first, _data(), params, "clm", 3, 1e-3, 0, dev, ckpt, progress=False)
    again = _model("transformer", max_len=32)
    res = loop.fit(again, _data(), params, "clm", 3, 1e-3, 0, dev, ckpt, progress=False)
    assert res.resumed_from == 3 and res.steps_run == 0
    for (k, a), b in zip(first.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("objective", ["pretrain", "classify"])
@pytest.mark.parametrize(
    "name,extra",
    [
        ("ehrmamba", {}),
        ("ehrmamba", {"recompute": True}),
        ("transformer", {"max_len": 128, "dropout": 0.0}),
        ("cehr_bert", {"max_len": 128}),
        # blocks of 8: the 128-token shape takes the block-sparse path, the 64-token one full attention
        ("bigbird", {"block_size": 8, "dropout": 0.0}),
    ],
)
def test_cuda_graphed_steps_train_as_eager_ones(tmp_path, monkeypatch, objective, name, extra):
    """The same run eager, captured in CUDA graphs (repro.training.graphs), and graphed but killed and
    resumed: each shape's graph is captured once, and the weights end where eager ones do, to rounding
    (a stale input, gradient or rate in a replay would move them elsewhere). No dropout, two shapes, each
    backbone's own pretraining objective (the encoders' MLM corruption and key padding mask included)."""
    from repro.models.registry import pretrain_objective
    from repro.training import graphs

    if objective == "pretrain":
        objective = pretrain_objective(name, None)

    dev = torch.device("cuda")
    rng = np.random.default_rng(3)
    items = [_enc(rng, int(n)) for n in rng.integers(6, 120, 64)]  # padded to 64 or 128 tokens
    data = SequenceDataset(items, (rng.random(64) < 0.4).astype(np.float32))
    captured = []
    real_release = graphs.GraphedSteps.release

    def release(self):
        captured.append(self.captures)
        real_release(self)

    monkeypatch.setattr(graphs.GraphedSteps, "release", release)

    def run(graphed, ckpt=None):
        model = _model(name, cls_dropout=0.0, **extra)
        model.set_n_outputs(1)
        tp = TrainParams(batch_size=8, warmup_frac=0.2, cuda_graphs=graphed, checkpoint_every=6)
        loop.fit(model, data, tp, objective, 24, 1e-3, 0, dev, ckpt, progress=False)
        return {k: v.float().cpu() for k, v in model.state_dict().items()}

    w0 = {k: v.float() for k, v in _model(name, cls_dropout=0.0, **extra).state_dict().items()}
    eager, graphed = run(False), run(True)
    assert captured == [2]  # one graph per shape, every later step of that shape replayed
    real = _die_at(monkeypatch, 13)
    with pytest.raises(KeyboardInterrupt):
        run(True, tmp_path / "g.pt")
    monkeypatch.setattr(loop, "batch_indices", real)
    resumed = run(True, tmp_path / "g.pt")
    keys = [k for k in w0 if k.startswith("backbone.")]  # both objectives train it; heads start apart
    moved = max(float((eager[k] - w0[k]).abs().max()) for k in keys)
    for other in (graphed, resumed):
        apart = max(float((other[k] - eager[k]).abs().max()) for k in keys)
        assert moved > 1e-3 and apart < 0.05 * moved, (moved, apart)


def test_cuda_graphs_only_where_a_backbone_declares_its_step_capturable(tmp_path):
    from repro.models import ehrmamba
    from repro.training.graphs import graph_safe

    # EHRMamba's step is capturable on mamba_ssm's scan only (the reference scan syncs the host)
    assert graph_safe(_model("ehrmamba")) == (ehrmamba.selective_scan_fn is not None)
    # the encoders' key padding mask skips its host check while a graph is captured
    assert graph_safe(_model("cehr_bert")) and graph_safe(_model("bigbird"))
    assert graph_safe(_model("transformer", max_len=32))
    assert graph_safe(_model("transformer", max_len=32, causal=False))
    # on a CPU the setting trains eagerly, to the same weights, but is its own run for the checkpoints
    runs = {}
    for graphed in (False, True):
        model = _model("ehrmamba")
        tp = TrainParams(batch_size=4, cuda_graphs=graphed)
        loop.fit(
            model,
            _data(),
            tp,
            "clm",
            4,
            1e-3,
            0,
            torch.device("cpu"),
            tmp_path / f"{graphed}.pt",
            progress=False,
        )
        runs[graphed] = model.state_dict(), torch.load(tmp_path / f"{graphed}.pt", weights_only=False)["key"]
    assert all(torch.equal(a, b) for a, b in zip(runs[False][0].values(), runs[True][0].values()))
    assert runs[False][1] != runs[True][1]


def test_weight_decay_spares_a_log_d_norms_and_biases():
    from repro.models.registry import build_model
    from repro.training.loop import decay_groups

    model = build_model("ehrmamba", 40, d_model=16, n_layers=1, d_state=4)
    decay, no_decay = decay_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    spared = {names[id(p)] for p in no_decay}
    assert any(n.endswith("A_log") for n in spared) and any(n.endswith(".D") for n in spared)
    assert all(p.ndim >= 2 and not getattr(p, "_no_weight_decay", False) for p in decay)
    assert all(names[id(p)].endswith(("A_log", ".D")) or p.ndim < 2 for p in no_decay)
    assert any("norm" in n for n in spared) and any(n.endswith("bias") for n in spared)
    assert len(decay) + len(no_decay) == len([p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize(
    "change",
    [
        {"lr": 2e-3},
        {"seed": 1},
        {"params": TrainParams(batch_size=2, checkpoint_every=3)},
        {"data": "labels"},
    ],
)
def test_a_checkpoint_from_other_settings_or_data_is_never_resumed(tmp_path, change):
    params = TrainParams(batch_size=4, checkpoint_every=3, warmup_frac=0.2)
    data, dev, ckpt = _data(), torch.device("cpu"), tmp_path / "run.pt"
    first = _model("ehrmamba")
    first.set_n_outputs(1)
    loop.fit(first, data, params, "classify", 6, 1e-3, 0, dev, ckpt, progress=False)
    again = _model("ehrmamba")
    again.set_n_outputs(1)
    same = loop.fit(again, data, params, "classify", 6, 1e-3, 0, dev, ckpt, progress=False)
    assert same.resumed_from == 6 and same.steps_run == 0  # the same run finds its finished checkpoint
    kw = {"params": params, "lr": 1e-3, "seed": 0} | {k: v for k, v in change.items() if k != "data"}
    if change.get("data") == "labels":
        data = SequenceDataset(data.items, 1.0 - data.labels)
    other = _model("ehrmamba")
    other.set_n_outputs(1)
    res = loop.fit(other, data, kw["params"], "classify", 6, kw["lr"], kw["seed"], dev, ckpt, progress=False)
    assert res.resumed_from == 0 and res.steps_run == 6


def _planted(monkeypatch, curve, metric="auroc"):
    """Replace validation by a planted curve; remember the weights each validation saw."""
    seen = []

    def fake(model, val, objective, device, batch_size, mlm_probability=0.15):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        value = curve[len(seen) - 1]
        return {"loss": 1.0 - value if metric == "auroc" else value, "auroc": value}

    monkeypatch.setattr(loop, "validate", fake)
    return seen


def test_early_stopping_keeps_the_best_validated_weights(tmp_path, monkeypatch):
    curve = [0.60, 0.70, 0.80, 0.79, 0.795, 0.78, 0.90, 0.91]  # best 0.80 at the third validation
    seen = _planted(monkeypatch, curve)
    data = _data(32)
    params = TrainParams(batch_size=4, val_per_epoch=4, patience=3, min_delta=0.0, checkpoint_every=1000)
    model = _model()
    ckpt = tmp_path / "ft.pt"
    res = loop.fit(model, data, params, "classify", 100, 1e-2, 0, torch.device("cpu"), ckpt, progress=False,
                   val=_data(8, seed=1))  # fmt: skip
    # 8 steps per epoch, a validation every 2 steps; patience 3 ends the run at the sixth validation
    assert [v["step"] for v in res.val] == [2, 4, 6, 8, 10, 12]
    assert res.stop == "early stop" and res.best_step == 6 and res.steps_run == 12
    assert res.epochs == pytest.approx(12 * 4 / 32) and res.converged()
    final = model.state_dict()
    assert all(torch.equal(final[k], seen[2][k]) for k in final)
    assert not all(torch.equal(final[k], seen[-1][k]) for k in final)
    # an early-stopped run is finished: resuming it trains nothing and gives back the same weights
    again = _model()
    res2 = loop.fit(again, data, params, "classify", 100, 1e-2, 0, torch.device("cpu"), ckpt, progress=False,
                    val=_data(8, seed=1))  # fmt: skip
    assert res2.steps_run == 0 and res2.best_step == 6 and res2.stop == "early stop"
    assert all(torch.equal(again.state_dict()[k], final[k]) for k in final)


def test_pretraining_selects_on_the_lowest_loss(monkeypatch):
    _planted(monkeypatch, [3.0, 2.5, 2.6, 2.4, 2.45], metric="loss")
    params = TrainParams(batch_size=4, val_per_epoch=4, patience=0)
    res = loop.fit(_model(), _data(32), params, "clm", 10, 1e-3, 0, torch.device("cpu"), progress=False,
                   val=_data(8, seed=1))  # fmt: skip
    # patience 0: never stops early, but the kept step is still the best one
    assert res.stop == "budget" and res.steps_run == 10 and res.best_step == 8


def test_pretraining_patience_outlasts_a_plateau_that_finetuning_patience_ends(monkeypatch):
    # an MLM-like curve: flat for four validations, then a second fall
    curve = [3.0, 2.5, 2.5, 2.5, 2.5, 2.5, 2.2, 2.0]
    params = TrainParams(batch_size=4, val_per_epoch=4, patience=3, pretrain_patience=5, min_delta=0.0)
    _planted(monkeypatch, curve, metric="loss")
    res = loop.fit(_model(), _data(32), params, "mlm", 16, 1e-3, 0, torch.device("cpu"), progress=False,
                   val=_data(8, seed=1))  # fmt: skip
    assert res.stop == "budget" and res.best_step == 16
    _planted(monkeypatch, curve, metric="loss")
    short = dataclasses.replace(params, pretrain_patience=None)  # falls back to `patience`
    res = loop.fit(_model(), _data(32), short, "mlm", 16, 1e-3, 0, torch.device("cpu"), progress=False,
                   val=_data(8, seed=1))  # fmt: skip
    assert res.stop == "early stop" and res.best_step == 4 and res.steps_run == 10
    assert params.patience_for("classify") == 3 and params.patience_for("clm") == 5
    per_model = TrainParams(per_model={"bigbird": {"pretrain_patience": 8}}).for_model("bigbird")
    assert per_model.pretrain_patience == 8 and isinstance(per_model.pretrain_patience, int)
    with pytest.raises(ParamsError, match="pretrain_patience"):
        TrainParams(pretrain_patience=-1)
    with pytest.raises(ParamsError, match=r"bigbird\.patience .*whole number"):
        TrainParams(per_model={"bigbird": {"patience": 1.5}})  # "1.5 epochs" is 3 validations, not 1
    back = TrainParams(patience=3, per_model={"bigbird": {"pretrain_patience": None}}).for_model("bigbird")
    assert back.patience_for("mlm") == 3


@pytest.mark.parametrize(
    ("curve", "metric", "expected"),
    [
        ([0.6, 0.7, 0.75, 0.80, 0.82], "auroc", False),  # still rising over the last 20 % of steps
        ([0.6, 0.7, 0.80, 0.801, 0.802], "auroc", True),  # +0.25 % over the last 20 %: a plateau
        ([3.0, 2.0, 1.50, 1.49, 1.495], "loss", True),
        ([3.0, 2.0, 1.80, 1.70, 1.60], "loss", False),
    ],
)
def test_plateau_rule_on_planted_curves(curve, metric, expected):
    val = [{"step": 10 * (i + 1), metric: v} for i, v in enumerate(curve)]
    res = loop.TrainResult("classify" if metric == "auroc" else "clm", val=val, metric=metric)
    assert res.converged() is expected
    assert res.status == ("plateau at budget" if expected else "budget (still improving)")


def test_plateau_rule_reads_the_tail_of_the_learning_rate_not_of_the_steps():
    """A loss that falls until 70 % of a linearly decaying budget and is flat after: flat over the last 20 %
    of steps (4 % of the rate), still falling over the steps that carried the last 20 % of the rate (the
    last 45 %), so the run is not on its plateau. At a constant rate the same curve is judged on its
    last 20 % of steps (test above); a curve flat since 40 % is a plateau either way."""
    steps = range(100, 1001, 100)
    falling = [3.0, 2.8, 2.6, 2.45, 2.3, 2.2, 2.1, 2.1, 2.1, 2.1]
    flat = [3.0, 2.5, 2.2, 2.1, 2.1, 2.1, 2.1, 2.1, 2.1, 2.1]
    for curve, expected in ((falling, False), (flat, True)):
        val = [{"step": s, "loss": v} for s, v in zip(steps, curve)]
        res = loop.TrainResult("clm", val=val, budget=1000, warmup_frac=0.0)
        assert res.tail_start() == 554.0
        assert res.converged() is expected
    undecayed = loop.TrainResult("clm", val=[{"step": s, "loss": v} for s, v in zip(steps, falling)])
    assert undecayed.converged()  # no budget known: the last 20 % of steps, flat


def test_fit_records_its_schedule_for_the_plateau_rule():
    params = TrainParams(batch_size=4, val_per_epoch=4, patience=0, warmup_frac=0.25)
    res = loop.fit(_model(), _data(32), params, "clm", 8, 1e-3, 0, torch.device("cpu"), progress=False,
                   val=_data(8, seed=1))  # fmt: skip
    assert res.budget == 8 and res.warmup_frac == 0.25


def test_epoch_budgets_and_per_model_settings():
    from repro.config import ParamsError

    tp = TrainParams(
        batch_size=10, pretrain_epochs=2.5, finetune_epochs=0.0, per_model={"ehrmamba": {"lr": 0.003}}
    )
    assert tp.steps("pretrain", 101) == 25 and tp.steps("finetune", 101) == 0
    assert TrainParams(finetune_steps=7).steps("finetune", 10_000) == 7  # a fixed count wins
    assert tp.for_model("ehrmamba").lr == 0.003 and tp.for_model("transformer").lr == tp.lr
    with pytest.raises(ParamsError, match="per_model.ehrmamba has unknown keys"):
        TrainParams(per_model={"ehrmamba": {"momentum": 0.9}})
    with pytest.raises(ParamsError, match="per_model.ehrmamba: train.lr"):
        TrainParams(per_model={"ehrmamba": {"lr": 2.0}})
    with pytest.raises(ParamsError, match="unknown model"):
        TrainParams(per_model={"gpt": {"lr": 0.1}})
    # the paper's per-model batches: pretraining at batch_size, finetuning at finetune_batch_size; MultiBird's
    # entries apply on top of BigBird's
    paper = TrainParams(
        batch_size=32,
        finetune_epochs=1.0,
        per_model={
            "bigbird": {"finetune_batch_size": 26, "finetune_epochs": 3, "lr": 5e-5},
            "multibird": {"finetune_epochs": 6},
        },
    )
    bird = paper.for_model("bigbird")
    assert bird.batch_size == 32 and bird.finetuning().batch_size == 26
    assert bird.finetuning().steps("finetune", 260) == 30 and paper.finetuning() is paper
    multi = paper.for_model("bigbird", "multibird")
    assert (multi.finetune_epochs, multi.finetune_batch_size, multi.lr) == (6.0, 26, 5e-5)
    with pytest.raises(ParamsError, match="finetune_batch_size"):
        TrainParams(finetune_batch_size=0)


@pytest.mark.parametrize(
    ("name", "objective"), [("ehrmamba", "clm"), ("cehr_bert", "mlm"), ("ehrmamba", "classify")]
)
def test_validation_is_repeatable_and_scores_the_objective(name, objective):
    model, val = _model(name), _data(24, seed=3)
    a = loop.validate(model, val, objective, torch.device("cpu"), 8)
    # the same masks at every validation of a run; other batches give the same mean where nothing is drawn
    b = loop.validate(model, val, objective, torch.device("cpu"), 8 if objective == "mlm" else 5)
    assert np.isfinite(a["loss"]) and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert ("auroc" in a) is (objective == "classify") and model.training
    if objective == "classify":
        assert 0.0 <= a["auroc"] <= 1.0


@pytest.mark.parametrize("arm", ["untied", "tokens-only"])
def test_bench_learn_ablations_change_only_their_part(arm):
    from repro.profiling.bench_learn import ablation

    model = _model()
    batch = collate([_data(2)[0], _data(2)[1]])
    changed = ablation(_model(), arm)
    assert changed(batch, head="lm").shape == model(batch, head="lm").shape
    tied = changed.lm_head.proj.weight is changed.backbone.embedding.concept.weight
    assert tied is (arm != "untied")
    assert (changed.n_params() < model.n_params()) is (arm == "tokens-only")


@pytest.mark.parametrize(("name", "objective"), [("ehrmamba", "clm"), ("cehr_bert", "mlm")])
def test_row_losses_are_each_samples_own_and_sum_to_the_validation_loss(name, objective):
    """Per-patient held-out losses (what their bootstrap resamples) add up to validate's mean, and row i is
    sample i's loss whatever batch it shared: padding never enters a row."""
    model, data = _model(name), _data(n=10)
    device = torch.device("cpu")
    sums, counts = loop.row_losses(model, data, objective, device, batch_size=4)
    assert sums.shape == counts.shape == (10,) and counts.sum() > 0  # a short MLM row may have no mask
    mean = loop.validate(model, data, objective, device, batch_size=4)["loss"]
    assert sums.sum() / counts.sum() == pytest.approx(mean, rel=1e-5)
    if objective == "clm":  # MLM masks depend on the batch's draw; CLM rows are deterministic
        one = SequenceDataset([data.items[3]])
        s1, c1 = loop.row_losses(model, one, objective, device, batch_size=1)
        assert c1[0] == counts[3] and s1[0] == pytest.approx(sums[3], rel=1e-4)


@pytest.mark.parametrize("name", ["ehrmamba", "cehr_bert"])
def test_probe_features_pool_like_the_head_and_ignore_padding(name):
    """features()["head"] is what the classification head reads (last real token causal, [CLS] encoder),
    whatever the batch's padding; "mean" averages real tokens only."""
    from repro.models.heads import pool

    model, data = _model(name).eval(), _data(n=6)
    device = torch.device("cpu")
    batched = loop.features(model, data, device, batch_size=6)
    alone = loop.features(model, SequenceDataset([data.items[2]]), device, batch_size=1)
    assert batched["head"].shape == batched["mean"].shape == (6, 16)
    np.testing.assert_allclose(batched["head"][2], alone["head"][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(batched["mean"][2], alone["mean"][0], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        b = collate([data[2][:1]])
        want = pool(model.hidden(b), b["attention_mask"], model.causal, model.pool_mode)[0].numpy()
    np.testing.assert_allclose(alone["head"][0], want, rtol=1e-4, atol=1e-5)


def test_a_probe_learns_its_scaling_and_c_from_train_and_tuning_only():
    from repro.models.baselines import probe

    rng = np.random.default_rng(0)
    x_tr, x_tu = rng.normal(size=(200, 4)), rng.normal(size=(100, 4))
    y_tr, y_tu = (x_tr[:, 0] > 0).astype(int), (x_tu[:, 0] > 0).astype(int)
    fitted, C = probe(x_tr, y_tr, x_tu, y_tu, [0.01, 1.0])
    np.testing.assert_allclose(fitted[0].mean_, x_tr.mean(0))  # the scaler saw train rows only
    shifted, _ = probe(x_tr, y_tr, x_tu + 100.0, y_tu, [C])  # tuning rows never enter the fit
    np.testing.assert_allclose(shifted[-1].coef_, fitted[-1].coef_)
    with pytest.raises(ValueError, match="single class"):
        probe(x_tr, np.zeros(200, int), x_tu, y_tu, [1.0])


class _NextIdModel(torch.nn.Module):
    """A causal 'model' that always predicts the token after the last one (id + 1): forecasts are known."""

    causal = True

    def lm_logits(self, batch):
        ids = batch["input_ids"]
        return torch.nn.functional.one_hot((ids + 1).clamp(max=VOCAB - 1), VOCAB).float() * 10


def test_forecasting_generates_from_its_own_predictions_on_a_hand_built_history():
    from repro.evaluation.metrics import forecast_metrics
    from repro.training.forecast import forecast, token_types

    ids = np.array([2, 10, 11, 12, 13, 14, 15])
    e = Encoded(ids, np.arange(7) % 3, np.linspace(60, 61, 7).astype(np.float32), np.zeros(7, np.float32),
                np.ones(7, np.int64), np.ones(7, np.int64))  # fmt: skip
    types = token_types([e], VOCAB)
    pred, true = forecast(_NextIdModel(), [e], 3, types, torch.device("cpu"))
    assert true.tolist() == [[13, 14, 15]] and pred.tolist() == [
        [13, 14, 15]
    ]  # fed back: 12 -> 13 -> 14 -> 15
    jumpy = Encoded(**{**e.__dict__, "input_ids": np.array([2, 10, 11, 12, 20, 14, 15])})
    pred, true = forecast(_NextIdModel(), [jumpy], 3, types, torch.device("cpu"))
    assert pred.tolist() == [[13, 14, 15]] and true.tolist() == [[20, 14, 15]]
    row = forecast_metrics(pred, true, [1, 3], n_boot=20)
    assert row[0]["accuracy"] == 0.0 and row[1]["accuracy"] == pytest.approx(2 / 3)
    assert row[1]["cosine"] == pytest.approx(2 / 3)  # bags {13, 14, 15} and {20, 14, 15}
    assert row[0]["paper accuracy"] == 0.3620
    with pytest.raises(ValueError, match="k \\+ 2"):
        forecast(_NextIdModel(), [e], 6, types, torch.device("cpu"))


def test_groups_take_a_free_gpu_and_a_group_out_of_memory_comes_back_to_be_retried(monkeypatch):
    """Two simulated GPUs: a group that runs out of memory on one returns why (the pool retries it) and the
    GPU goes back to the free list either way; other errors are raised."""
    import queue

    from repro.training import grid

    current = {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: current.update(dev=dev))
    slots = queue.Queue()
    for dev in grid.device_slots(2, 2):
        slots.put(dev)

    def train():
        if current["dev"] == 0:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert grid.run_on_slot(slots, train) == "out of memory on cuda:0"  # slot 0 is taken first
    assert grid.run_on_slot(slots, train) is None and current["dev"] == 1  # the retry lands on cuda:1
    assert sorted([slots.get(), slots.get()]) == [0, 1]  # both GPUs are free again
    slots.put(0)

    def broken():
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError, match="a bug"):
        grid.run_on_slot(slots, broken)
    assert slots.qsize() == 1


def test_a_history_ends_at_its_last_clinical_token_before_forecasting():
    from repro.data.vocab import REG, VE
    from repro.training.forecast import history_end

    ids = np.array([2, 10, 11, VE, REG])
    e = Encoded(ids, np.zeros(5, np.int64), np.zeros(5, np.float32), np.zeros(5, np.float32),
                np.ones(5, np.int64), np.ones(5, np.int64))  # fmt: skip
    cut = history_end(e)
    assert cut.input_ids.tolist() == [2, 10, 11] and len(cut.ages) == 3


def test_the_training_table_says_when_the_first_validation_scored_best():
    """An early stop whose best weights are from the first validation may have peaked before it."""
    from repro.training.loop import TrainResult

    curve = [{"step": s, "auroc": a} for s, a in [(18, 0.59), (36, 0.45), (54, 0.44)]]
    first = TrainResult("classify", metric="auroc", stop="early stop", val=curve, best_step=18)
    assert first.status == "early stop (best at the first validation)" and first.converged()
    later = TrainResult("classify", metric="auroc", stop="early stop", val=curve, best_step=36)
    assert later.status == "early stop"
