"""Models: forward/backward, causality, padding invariance, chunked scan == loop scan, mamba_ssm layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from repro.models import ehrmamba
from repro.models.ehrmamba import (
    EHRMamba,
    MambaMixer,
    selective_scan_ref_chunked,
    selective_scan_ref_loop,
    selective_scan_ref_steps,
)
from repro.models.heads import pool
from repro.models.registry import build_model, count_params

V = 50
ORIGINAL = ("ehrmamba", "cehr_bert")  # the other backbones are tested in test_models_zoo.py
LENGTHS = (20, 13, 5)
SMALL = {"d_model": 16, "n_layers": 2}


def make_batch(lengths=LENGTHS, L: int = 20, seed: int = 0, garbage_pad: bool = False) -> dict:
    """Right-padded random batch following the CONTRACTS.md model batch."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    batch = {
        "input_ids": torch.randint(7, V, (B, L), generator=g),
        "type_ids": torch.randint(1, 10, (B, L), generator=g),
        "ages": 40 + torch.rand(B, L, generator=g),
        "times": 2800 + torch.rand(B, L, generator=g).cumsum(1) * 3,
        "segments": torch.randint(1, 3, (B, L), generator=g),
        "visit_orders": torch.randint(1, 10, (B, L), generator=g),
    }
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()
    if not garbage_pad:
        for key, val in batch.items():
            batch[key] = val * mask.to(val.dtype)
    batch["attention_mask"] = mask
    return batch


def model(name: str, **kwargs):
    torch.manual_seed(0)
    return build_model(name, V, **{**SMALL, **kwargs})


@pytest.mark.parametrize("name", ORIGINAL)
def test_forward_backward(name):
    m = model(name, n_out=2)
    batch = make_batch()
    hidden, logits, cls = m.hidden(batch), m.lm_logits(batch), m.classify(batch)
    assert hidden.shape == (3, 20, 16) and logits.shape == (3, 20, V) and cls.shape == (3, 2)
    (logits.logsumexp(-1).mean() + cls.square().mean()).backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert m.kernel_path == {"ehrmamba": "reference-steps", "cehr_bert": "sdpa"}[name]
    assert m.causal == (name == "ehrmamba")
    assert m.pretrain_objective == {"ehrmamba": "clm", "cehr_bert": "mlm"}[name]
    assert m.lm_head.proj.weight is m.backbone.embedding.concept.weight
    assert m.n_params() == count_params(m) < sum(p.numel() for p in m.parameters()) + 16 * V


@pytest.mark.parametrize("t", [1, 6, 12, 19])
def test_ehrmamba_never_sees_the_future(t):
    m = model("ehrmamba").eval()
    batch = make_batch()
    with torch.no_grad():
        ref = m.hidden(batch)
        changed = {k: v.clone() for k, v in batch.items()}
        changed["input_ids"][:, t] = 7 + (changed["input_ids"][:, t] - 6) % (V - 7)
        changed["times"][:, t] += 5.0
        changed["ages"][:, t] += 1.0
        out = m.hidden(changed)
    torch.testing.assert_close(out[:, :t], ref[:, :t], atol=1e-6, rtol=0)
    assert not torch.allclose(out[0, t:], ref[0, t:], atol=1e-4)


@pytest.mark.parametrize("name", ORIGINAL)
def test_padding_content_does_not_change_real_tokens(name):
    """Key padding mask (encoder) / causality (Mamba): pad garbage and extra length leave real tokens alone."""
    m = model(name).eval()
    lengths = (12, 8, 5)
    short = make_batch(lengths, L=12)
    garbage = make_batch(lengths, L=20, seed=1, garbage_pad=True)
    real = garbage["attention_mask"].bool()
    long = {k: torch.where(real, F.pad(short[k], (0, 8)), garbage[k]) for k in short}
    with torch.no_grad():
        short_hidden, long_hidden = m.hidden(short), m.hidden(long)
        pooled_short = pool(short_hidden, short["attention_mask"], m.causal)
        pooled_long = pool(long_hidden, long["attention_mask"], m.causal)
    for row, n in enumerate(lengths):
        torch.testing.assert_close(long_hidden[row, :n], short_hidden[row, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled_long, pooled_short, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ORIGINAL)
def test_only_relative_time_matters(name):
    m = model(name).eval()
    batch = make_batch()
    shifted = {**batch, "times": batch["times"] + 100.0 * batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(m.hidden(shifted), m.hidden(batch), atol=1e-5, rtol=1e-5)


def test_pool_positions():
    hidden = torch.arange(3 * 4 * 2, dtype=torch.float32).view(3, 4, 2)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    torch.testing.assert_close(pool(hidden, mask, causal=True), hidden[[0, 1, 2], [3, 1, 0]])
    torch.testing.assert_close(pool(hidden, mask, causal=False), hidden[:, 0])


def test_pool_option_mean_pools_an_encoder():
    """`pool: mean` (a model_sizes entry) makes an encoder classify from the mean over its real tokens, not
    [CLS]; the classifier's input is the masked mean of the backbone's hidden states."""
    batch = make_batch()
    m = model("cehr_bert", pool="mean", dropout=0.0).eval()
    assert m.pool_mode == "mean" and m.build_args["pool"] == "mean"
    with torch.no_grad():
        hidden = m.hidden(batch)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = m.cls_head.proj((hidden * mask).sum(1) / mask.sum(1))
        torch.testing.assert_close(m.classify(batch), expected)
        assert not torch.allclose(m.classify(batch), m.cls_head.proj(hidden[:, 0]))
    assert model("cehr_bert").pool_mode is None and model("lstm").pool_mode == "mean"
    with pytest.raises(ValueError, match="pool"):
        model("cehr_bert", pool="max")


def test_cehr_bert_without_absolute_positions():
    """positions="none": no position table; the output still depends on token order through time only."""
    with_pos, without = (
        model("cehr_bert", dropout=0.0).eval(),
        model("cehr_bert", dropout=0.0, positions="none"),
    )
    assert (
        count_params(with_pos) - count_params(without.eval()) == 512 * SMALL["d_model"]
    )  # max_len x d_model
    batch = make_batch()
    swapped = {k: v.clone() for k, v in batch.items()}
    for k in swapped:  # swap tokens 1 and 2 of every row with all their side arrays: a pure reordering
        swapped[k][:, [1, 2]] = batch[k][:, [2, 1]]
    with torch.no_grad():
        a, b = without.hidden(batch), without.hidden(swapped)
        torch.testing.assert_close(a[:, 1], b[:, 2])  # permutation-equivariant without positions
        assert not torch.allclose(with_pos.hidden(batch)[:, 1], with_pos.hidden(swapped)[:, 2])
    with pytest.raises(ValueError, match="positions"):
        model("cehr_bert", positions="rope")


def test_cehr_bert_sinusoidal_positions_order_tokens_without_new_weights():
    """positions="sinusoidal": fixed sin / cos of the position enter the embedding's mix (CEHR-BERT's
    reference): order matters as with the learned table, the only new weights are the mix's extra inputs, and
    the other backbones' state dicts keep their keys (their checkpoints still load)."""
    sin, none = (model("cehr_bert", dropout=0.0, positions=p).eval() for p in ("sinusoidal", "none"))
    time_dim = sin.backbone.embedding.time2vec.out_dim
    assert count_params(sin) - count_params(none) == time_dim * SMALL["d_model"]
    batch = make_batch()
    swapped = {k: v.clone() for k, v in batch.items()}
    for k in swapped:
        swapped[k][:, [1, 2]] = batch[k][:, [2, 1]]
    with torch.no_grad():
        assert not torch.allclose(sin.hidden(batch)[:, 1], sin.hidden(swapped)[:, 2])
    assert "backbone.embedding.sinusoids" not in sin.state_dict()
    assert not any("sinusoids" in k for k in model("bigbird").state_dict())


def test_cehr_bert_positions_enter_before_the_embedding_norm():
    """BERT adds its positions before the embedding LayerNorm. Added after it, N(0, 0.02) beside unit-scale
    features, they moved one token's vector by 2 % of its norm and stayed inert in training (the MLM loss
    was the same without them). Here: one token repeated, its vector spread over positions."""
    m = model("cehr_bert", dropout=0.0).eval()
    batch = make_batch()
    same = {k: v.clone() for k, v in batch.items()}
    for k in same:  # every position of row 0 holds row 0's first token, with its time, visit and type
        same[k][0] = batch[k][0, :1]
    seen = []  # what the first encoder layer reads
    m.backbone.encoder.layers[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        m.hidden(same)
    x = seen[0][0]
    spread = ((x - x.mean(0)).norm(dim=-1) / x.norm(dim=-1)).mean()
    assert spread > 0.05, spread  # 0.02 with the positions added after the norm


def test_registry_rejects_unknown_names_and_kwargs():
    with pytest.raises(ValueError, match="'multibird'"):
        build_model("multibird", V)  # BigBird + MPF: a training choice, not a backbone
    with pytest.raises(ValueError, match="'n_layer'"):
        build_model("ehrmamba", V, n_layer=12)  # the HF MambaConfig pitfall (DESIGN.md section 11)
    with pytest.raises(ValueError, match="'n_heads'"):
        build_model("ehrmamba", V, n_heads=4)
    with pytest.raises(ValueError, match="n_heads"):
        build_model("cehr_bert", V, d_model=18, n_heads=4)


def test_build_args_and_new_head():
    m = model("cehr_bert", dropout=0.0)
    assert m.build_args == {"name": "cehr_bert", "vocab_size": V, **SMALL, "dropout": 0.0}
    rebuilt = build_model(**{k: v for k, v in m.build_args.items()})
    rebuilt.load_state_dict(m.state_dict())
    m.set_n_outputs(4)
    assert m.classify(make_batch()).shape == (3, 4) and m.build_args["n_out"] == 4
    bigger = model("ehrmamba", d_model=32)
    assert count_params(bigger) > count_params(model("ehrmamba"))


def test_cehr_bert_rejects_too_long_input():
    with pytest.raises(ValueError, match="max_len"):
        model("cehr_bert", max_len=16).hidden(make_batch())


# --- selective scan: chunked reference against the per-step loop ---------------------------------------


# regime -> (log|A| offset, delta_bias offset, chunk length the scan picks): "init" is mamba's S4D/dt
# init scale (full 32-step chunks); "stiff" needs the step clamp and the smallest chunk.
REGIMES = {"init": (0.5, -4.0, 32), "mid": (1.0, -2.0, 16), "stiff": (3.0, 1.0, 8)}


def scan_inputs(L: int, dtype: torch.dtype, regime: str, b: int = 2, d: int = 6, n: int = 16, seed: int = 0):
    """Random scan inputs u, delta, A, B, C, D, z, delta_bias (all requiring grad)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    log_a, bias, _ = REGIMES[regime]
    leaves = [r(b, d, L), r(b, d, L) * 0.5, -torch.exp(r(d, n) * 0.5 + log_a), r(b, n, L), r(b, n, L), r(d)]
    leaves += [r(b, d, L), r(d) * 0.5 + bias]
    for x in leaves:
        x.requires_grad_(True)
    return leaves


def run_scan(fn, leaves, **kwargs):
    u, delta, A, B, C, D, z, delta_bias = leaves
    return fn(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True, **kwargs)


def assert_scan_grads_match(got, ref, leaves, tol: float) -> None:
    """Every leaf's gradient through `got` equals its gradient through `ref` (the loop) for one random gy."""
    gy = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, leaves, gy)
    g_got = torch.autograd.grad(got, leaves, gy)
    for name, a, b in zip(["u", "delta", "A", "B", "C", "D", "z", "delta_bias"], g_got, g_ref, strict=True):
        scale = max(b.abs().max().item(), 1.0)
        torch.testing.assert_close(a, b, atol=tol * scale * 10, rtol=0, msg=f"grad {name}")


@pytest.mark.parametrize("regime", REGIMES)
def test_scan_regimes_pick_the_intended_chunk(regime):
    _, delta, A, *_, delta_bias = scan_inputs(100, torch.float32, regime)
    step_max = (F.softplus(delta + delta_bias[:, None]).max() * A.abs().max()).item()
    assert ehrmamba._chunk_len(step_max, 32) == REGIMES[regime][2]
    assert (step_max > ehrmamba.STEP_LOG_DECAY_FLOOR) == (regime == "stiff")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("L", [1, 7, 32, 33, 100])
@pytest.mark.parametrize("regime", REGIMES)
def test_chunked_scan_matches_loop(dtype, L, regime):
    leaves = scan_inputs(L, dtype, regime)
    ref = run_scan(selective_scan_ref_loop, leaves)
    got = run_scan(selective_scan_ref_chunked, leaves)
    assert got.dtype == dtype
    # float32: rounding of exp(+-S) with |S| <= 80; float64 stiff: the 2e-9 step-decay clamp
    tol = {torch.float32: 2e-6, torch.float64: 1e-7 if regime == "stiff" else 1e-11}[dtype]
    torch.testing.assert_close(got, ref, atol=tol * ref.abs().max().item(), rtol=0)
    assert_scan_grads_match(got, ref, leaves, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("L", [1, 33, 100])
@pytest.mark.parametrize("regime", REGIMES)
def test_stepwise_scan_matches_loop(dtype, L, regime):
    """The CPU's scan, training included: the recurrence itself, so tighter than the chunked scan, with its
    hand-written backward; without gradients it keeps no graph."""
    leaves = scan_inputs(L, dtype, regime)
    ref = run_scan(selective_scan_ref_loop, leaves)
    got = run_scan(selective_scan_ref_steps, leaves)
    assert got.dtype == dtype and got.requires_grad
    tol = {torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(got, ref, atol=tol * ref.abs().max().item(), rtol=0)
    assert_scan_grads_match(got, ref, leaves, tol)
    with torch.no_grad():
        kept = run_scan(selective_scan_ref_steps, leaves)
    assert not kept.requires_grad
    torch.testing.assert_close(kept, got.detach(), atol=tol * ref.abs().max().item(), rtol=0)


def test_stepwise_scan_takes_gradients_for_any_input_alone():
    """The hand-written backward is used whichever input asks (the mixer's A and dt come from parameters,
    u and z from activations): each alone gets the per-step loop's gradient."""
    leaves = [x.detach() for x in scan_inputs(20, torch.float64, "mid")]
    for i, name in enumerate(["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]):
        one = [x.clone().requires_grad_(j == i) for j, x in enumerate(leaves)]
        (got,) = torch.autograd.grad(run_scan(selective_scan_ref_steps, one).square().sum(), one[i])
        (ref,) = torch.autograd.grad(run_scan(selective_scan_ref_loop, one).square().sum(), one[i])
        torch.testing.assert_close(got, ref, atol=1e-10 * max(ref.abs().max().item(), 1.0), rtol=0, msg=name)


def test_mixer_without_gradients_steps_and_matches_the_training_forward(monkeypatch):
    """Under no_grad a CPU mixer takes the stepwise scan's no-graph loop and gives the training forward's
    output."""
    torch.manual_seed(0)
    mixer = MambaMixer(16)
    x = torch.randn(3, 70, 16)
    train = mixer(x)
    calls = []
    monkeypatch.setattr(
        ehrmamba,
        "selective_scan_ref_steps",
        lambda *a, **k: calls.append(1) or selective_scan_ref_steps(*a, **k),
    )
    with torch.no_grad():
        evaluated = mixer(x)
    assert calls and mixer.kernel_path == "reference-steps"
    torch.testing.assert_close(evaluated, train.detach(), atol=1e-5 * train.abs().max().item(), rtol=0)


@pytest.mark.parametrize("chunk", [8, 16, 64])
def test_chunk_size_does_not_change_the_result(chunk):
    leaves = scan_inputs(70, torch.float64, "init")
    torch.testing.assert_close(
        run_scan(selective_scan_ref_chunked, leaves, chunk=chunk),
        run_scan(selective_scan_ref_chunked, leaves),
        atol=1e-12,
        rtol=0,
    )
    with pytest.raises(ValueError, match="power of two"):
        run_scan(selective_scan_ref_chunked, leaves, chunk=12)


# --- mixer layout: state_dict interchangeable with mamba_ssm.modules.mamba_simple.Mamba ------------------

# mamba_ssm Mamba(d_model=64) (d_state=16, d_conv=4, expand=2, dt_rank=ceil(64/16)=4), from its source.
MAMBA_SSM_KEYS_D64 = {
    "A_log": (128, 16),
    "D": (128,),
    "in_proj.weight": (256, 64),
    "conv1d.weight": (128, 1, 4),
    "conv1d.bias": (128,),
    "x_proj.weight": (4 + 2 * 16, 128),
    "dt_proj.weight": (128, 4),
    "dt_proj.bias": (128,),
    "out_proj.weight": (64, 128),
}


def test_mixer_state_dict_matches_mamba_ssm():
    torch.manual_seed(0)
    mixer = MambaMixer(64)
    assert {k: tuple(v.shape) for k, v in mixer.state_dict().items()} == MAMBA_SSM_KEYS_D64
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    assert mixer.dt_proj.weight.abs().max() <= 4**-0.5
    torch.testing.assert_close(mixer.A_log.exp(), torch.arange(1.0, 17.0).expand(128, 16))
    assert (mixer.D == 1).all()
    keys = set(EHRMamba(V, d_model=64, n_layers=2).state_dict())
    assert {f"layers.1.mixer.{k}" for k in MAMBA_SSM_KEYS_D64} | {
        "layers.1.norm.weight",
        "norm_f.weight",
    } <= keys


@pytest.mark.parametrize("scan", ["selective_scan_ref_steps", "selective_scan_ref_chunked"])
def test_mixer_matches_loop_scan(monkeypatch, scan):
    """The whole mixer with either reference scan (stepwise: a CPU's; chunked: CUDA's without mamba_ssm)
    equals the mixer with the per-step loop, gradients included."""
    torch.manual_seed(0)
    mixer = MambaMixer(16).double()
    x = torch.randn(2, 45, 16, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr(ehrmamba, "selective_scan_ref_steps", getattr(ehrmamba, scan))
    out = mixer(x)
    assert mixer.kernel_path == "reference-steps"  # the label follows the device
    grads = torch.autograd.grad(out.square().sum(), [x, *mixer.parameters()])
    monkeypatch.setattr(ehrmamba, "selective_scan_ref_steps", selective_scan_ref_loop)
    ref = mixer(x)
    torch.testing.assert_close(ref, out, atol=1e-10, rtol=0)
    for a, b in zip(grads, torch.autograd.grad(ref.square().sum(), [x, *mixer.parameters()]), strict=True):
        torch.testing.assert_close(a, b, atol=1e-9 * max(b.abs().max().item(), 1.0), rtol=0)


# --- CUDA kernel against the reference (runs only where mamba_ssm is built) ------------------------------

needs_kernel = pytest.mark.skipif(
    not torch.cuda.is_available() or ehrmamba.selective_scan_fn is None, reason="needs CUDA and mamba_ssm"
)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("L", [33, 256])
def test_cuda_kernel_matches_reference(L, monkeypatch):
    torch.manual_seed(0)
    mixer = MambaMixer(64).cuda()
    x = torch.randn(4, L, 64, device="cuda", requires_grad=True)

    def run():
        out = mixer(x)
        grads = torch.autograd.grad(out.square().mean(), [x, *mixer.parameters()])
        return out, grads, mixer.kernel_path

    out_k, grads_k, path_k = run()
    monkeypatch.setattr(ehrmamba, "selective_scan_fn", None)
    monkeypatch.setattr(ehrmamba, "_ANNOUNCED", set())
    with pytest.warns(RuntimeWarning, match="reference scan"):
        out_r, grads_r, path_r = run()
    assert (path_k, path_r) == ("mamba_ssm.selective_scan_cuda", "reference-chunked")
    torch.testing.assert_close(out_k, out_r, atol=1e-3, rtol=1e-3)
    for a, b in zip(grads_k, grads_r, strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    assert math.isfinite(out_k.sum().item())


def test_benchmarks_and_runs_size_a_model_alike():
    """sized_kwargs is the one place a run's (and a benchmark's) model size comes from: under match_params
    every backbone lands within 10 % of EHRMamba's parameter count; the size block alone (what the graphs
    bench once built: the transformer at its constructor's d_model 64) does not."""
    from repro.config import load_params
    from repro.training.prepare import model_kwargs, sized_kwargs

    params = load_params("params/default.yaml")
    target = build_model("ehrmamba", 1024, **sized_kwargs(params, "ehrmamba", 1024)).n_params()
    for name in ("transformer", "cehr_bert", "lstm"):
        n = build_model(name, 1024, **sized_kwargs(params, name, 1024)).n_params()
        assert abs(n - target) <= 0.1 * target, (name, n, target)
    unmatched = build_model("transformer", 1024, **model_kwargs(params, "transformer")).n_params()
    assert unmatched < 0.5 * target


def _saved_activation_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward, parameters left out."""
    params = {p.data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


def test_projections_are_x_proj_and_dt_proj_in_the_scans_layouts():
    """mamba_inner.projections, shared by the plain and the recomputing mixer paths, against the plain
    per-token formulas: x_dbl = x_proj(u_t), dt = dt_proj.weight @ x_dbl[:r], B and C the next n and n."""
    from repro.models.mamba_inner import projections

    torch.manual_seed(0)
    b, d, L, r, n = 2, 8, 5, 3, 4
    conv, x_proj_w, dt_proj_w = torch.randn(b, d, L), torch.randn(r + 2 * n, d), torch.randn(d, r)
    delta, B, C = projections(conv, x_proj_w, dt_proj_w, r)
    x_dbl = torch.einsum("kd,bdl->blk", x_proj_w, conv)
    torch.testing.assert_close(delta, torch.einsum("dr,blr->bdl", dt_proj_w, x_dbl[..., :r]))
    torch.testing.assert_close(B, x_dbl[..., r : r + n].transpose(1, 2)[:, None])
    torch.testing.assert_close(C, x_dbl[..., r + n :].transpose(1, 2)[:, None])
    assert delta.stride(-1) == 1 and B.is_contiguous() and C.is_contiguous()


def _assert_recompute_matches_plain(shape: tuple[int, int, int], bias: bool = False):
    """A plain MambaMixer and one with recompute=True, same weights: the same outputs, input gradients and
    parameter gradients on one random input of `shape`. Returns (plain, kept, input)."""
    torch.manual_seed(0)
    plain = MambaMixer(shape[-1], d_state=4, bias=bias)
    kept = MambaMixer(shape[-1], d_state=4, bias=bias, recompute=True)
    kept.load_state_dict(plain.state_dict())
    x = torch.randn(*shape)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = plain(xa), kept(xb)
    torch.testing.assert_close(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-4)
    for (name, pa), pb in zip(plain.named_parameters(), kept.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5, rtol=1e-4, msg=name)
    return plain, kept, x


@pytest.mark.parametrize("bias", [False, True])
def test_mixer_recompute_gives_the_plain_paths_outputs_and_gradients(bias):
    """recompute=True (repro.models.mamba_inner: conv output, dt, B, C and the gated output recomputed in
    backward) is the same function with the same gradients for every parameter, and keeps less for backward."""
    plain, kept, x = _assert_recompute_matches_plain((3, 37, 16), bias=bias)
    assert kept.kernel_path == "reference-steps"
    assert _saved_activation_bytes(kept, x.clone().requires_grad_()) < _saved_activation_bytes(
        plain, x.clone().requires_grad_()
    )


@pytest.mark.gpu
@needs_kernel
def test_cuda_recompute_matches_the_plain_kernel_path_in_less_memory():
    """On the GPU, under bf16 autocast as training runs: the same outputs and gradients as the plain
    mamba_ssm path, and a lower peak (four layers: it keeps about 3 [batch, d_inner, length] tensors per layer
    for backward where the plain path keeps 8, and spends some of that while one layer's backward runs)."""
    torch.manual_seed(0)
    plain = EHRMamba(50, d_model=64, n_layers=4).cuda()
    kept = EHRMamba(50, d_model=64, n_layers=4, recompute=True).cuda()
    kept.load_state_dict(plain.state_dict())
    batch = {k: v.cuda() for k, v in make_batch(lengths=(2048,) * 8, L=2048).items()}

    def run(model):
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(batch)
        grads = torch.autograd.grad(out.float().square().mean(), list(model.parameters()))
        return out.float(), grads, torch.cuda.max_memory_allocated()

    out_p, grads_p, peak_p = run(plain)
    out_k, grads_k, peak_k = run(kept)
    assert kept.kernel_path == "mamba_ssm.selective_scan_cuda"
    torch.testing.assert_close(out_k, out_p, atol=2e-2, rtol=2e-2)
    for a, b in zip(grads_k, grads_p, strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=5e-2)
    assert peak_k < peak_p


def test_cuda_scan_glue_runs_with_the_kernels_calling_convention(monkeypatch):
    """CudaScan called through InnerRecompute with a CPU stand-in for selective_scan_cuda that takes and
    returns what the C++ does (fwd: 9 arguments -> out, states, out_z; bwd: 14 arguments with a dz buffer and
    the recompute flag -> 9 values): gradients equal the plain mixer's. An argument added or dropped on one
    side only (a dz the wrapper did not take, once) fails here rather than on the first GPU run."""
    import types

    from repro.models import mamba_inner

    ref = mamba_inner.ReferenceScan(selective_scan_ref_chunked)

    def fwd(u, delta, A, B, C, D, z, delta_bias, softplus):
        return ref.fwd(u, delta, A, B, C, D, z, delta_bias, softplus)

    def bwd(u, delta, A, B, C, D, z, delta_bias, dout, states, out, dz, softplus, recompute_out_z):
        assert dz is not None and dz.shape == z.shape and recompute_out_z is True
        return ref.bwd(u, delta, A, B, C, D, z, delta_bias, dout, states, out, softplus, dz)

    monkeypatch.setattr(mamba_inner, "selective_scan_cuda", types.SimpleNamespace(fwd=fwd, bwd=bwd))
    monkeypatch.setattr(ehrmamba, "_REFERENCE_SCAN", mamba_inner.CudaScan())  # the CUDA wrapper on a CPU
    _assert_recompute_matches_plain((2, 19, 16))


def test_time_units_years_rescale_only_the_linear_time_features():
    """``time_units: years`` reads dt in years and age in decades in Time2Vec's linear feature (it reached
    about +-120 in weeks at initialisation); the sinusoids and every other input are unchanged."""
    from repro.models.embeddings import TIME_UNITS, CEHREmbedding

    torch.manual_seed(0)
    weeks = CEHREmbedding(V, 16, 10, 64)
    years = CEHREmbedding(V, 16, 10, 64, time_units="years")
    years.load_state_dict(weeks.state_dict())  # no parameter differs: the same checkpoint loads
    t = torch.tensor([0.0, 52.1775, 482.0])
    a, b = weeks.time2vec(t), years.time2vec(t)
    assert torch.equal(a[:, 1:], b[:, 1:])
    w, c = weeks.time2vec.weight[0], weeks.time2vec.bias[0]
    assert torch.allclose(a[:, 0], t * w + c) and torch.allclose(b[:, 0], t / 52.1775 * w + c)
    age = torch.tensor([80.0])
    assert torch.allclose(years.age2vec(age)[:, 0], 8.0 * years.age2vec.weight[0] + years.age2vec.bias[0])
    assert set(TIME_UNITS) == {"weeks", "years"}
    with pytest.raises(ValueError, match="time_units"):
        CEHREmbedding(V, 16, 10, 64, time_units="days")


@pytest.mark.parametrize(
    "name", ["ehrmamba", "cehr_bert", "bigbird", "transformer", "mamba2", "hybrid", "lstm"]
)
def test_every_backbone_takes_time_units(name):
    m = model(name, time_units="years")
    assert m.backbone.embedding.time2vec.linear_scale == pytest.approx(1 / 52.1775)
    out = m.backbone(make_batch())
    assert torch.isfinite(out).all()
