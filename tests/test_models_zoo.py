"""The model zoo: every backbone trains, causal ones never see the future, encoders ignore padding,
block-sparse attention equals its dense-mask definition, the SSD reference equals the recurrence,
parameter matching hits 10 %, and the CUDA kernels agree with the references (gpu-marked)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_models import V, make_batch

from repro.models import bigbird, mamba2
from repro.models.heads import pool
from repro.models.registry import MODEL_NAMES, build_model, describe, match_params

D = 16
# tiny configurations; BigBird with blocks of 4 and one random block is block-sparse from 32 tokens
TINY = {
    "ehrmamba": {},
    "cehr_bert": {"dropout": 0.0},
    "bigbird": {"block_size": 4, "num_random_blocks": 1, "dropout": 0.0},
    "transformer": {"dropout": 0.0},
    "transformer_bidir": {"causal": False, "dropout": 0.0},
    "mamba2": {"d_state": 8, "headdim": 8},
    "hybrid": {"d_state": 8},
    "lstm": {"dropout": 0.0},
}
KERNEL = {
    "ehrmamba": "reference-steps",
    "cehr_bert": "sdpa",
    "bigbird": "bigbird-block-sparse",
    "transformer": "sdpa-causal",
    "transformer_bidir": "sdpa-masked",
    "mamba2": "reference-ssd",
    "hybrid": "reference-steps+sdpa-causal",
    "lstm": "torch-lstm",
}
OBJECTIVE = {"ehrmamba": "clm", "transformer": "clm", "mamba2": "clm", "hybrid": "clm", "lstm": None}
CAUSAL = ("ehrmamba", "transformer", "mamba2", "hybrid")
ENCODERS = ("bigbird", "transformer_bidir", "lstm")
L_TEST = 40


def tiny(variant: str, **kwargs):
    torch.manual_seed(0)
    name = variant.removesuffix("_bidir")
    return build_model(name, V, d_model=D, n_layers=2, **{**TINY[variant], **kwargs})


@pytest.fixture(autouse=True)
def small_ssd_chunks(monkeypatch):
    """Chunks of 8 so the 40-token tests cross chunk boundaries of the Mamba2 reference."""
    monkeypatch.setattr(mamba2, "REF_CHUNK", 8)


def test_registry_names():
    assert set(MODEL_NAMES) == {v.removesuffix("_bidir") for v in TINY}
    assert "multibird" not in MODEL_NAMES  # BigBird + MPF is a training choice, not a backbone


@pytest.mark.parametrize("variant", TINY)
def test_forward_backward(variant):
    m = tiny(variant, n_out=2).train()
    batch = make_batch((L_TEST, 27, 9), L=L_TEST)
    hidden, logits, cls = m.hidden(batch), m.lm_logits(batch), m.classify(batch)
    assert hidden.shape == (3, L_TEST, D) and logits.shape == (3, L_TEST, V) and cls.shape == (3, 2)
    (logits.logsumexp(-1).mean() + cls.square().mean()).backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert m.kernel_path == KERNEL[variant]
    assert m.causal == (variant in CAUSAL)
    assert m.pretrain_objective == OBJECTIVE.get(variant, "mlm")
    assert describe(m) == f"{m.build_args['name']}: {m.n_params():,} parameters ({KERNEL[variant]})"


@pytest.mark.parametrize("t", [1, 9, 23, 39])
@pytest.mark.parametrize("variant", CAUSAL)
def test_causal_models_never_see_the_future(variant, t):
    m = tiny(variant).eval()
    batch = make_batch((L_TEST, L_TEST, L_TEST), L=L_TEST)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][:, t] = 7 + (changed["input_ids"][:, t] - 6) % (V - 7)
    changed["type_ids"][:, t] = 1 + changed["type_ids"][:, t] % 9
    changed["times"][:, t] += 5.0
    changed["ages"][:, t] += 1.0
    with torch.no_grad():
        ref, out = m.hidden(batch), m.hidden(changed)
    torch.testing.assert_close(out[:, :t], ref[:, :t], atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, t], ref[:, t], atol=1e-4)


def _garbage_padded(lengths, L_short, L_long):
    """The same real tokens twice: tight padding, and longer padding filled with random garbage."""
    short = make_batch(lengths, L=L_short)
    garbage = make_batch(lengths, L=L_long, seed=1, garbage_pad=True)
    real = garbage["attention_mask"].bool()
    long = {k: torch.where(real, F.pad(short[k], (0, L_long - L_short)), garbage[k]) for k in short}
    return short, long


@pytest.mark.parametrize("variant", ENCODERS)
def test_encoders_ignore_padding(variant):
    """Pad content never reaches real tokens. BigBird's block layout depends on L, so its padded copy
    keeps L (40 tokens, 10 blocks: block-sparse); the others also get 12 more pad tokens."""
    m = tiny(variant).eval()
    lengths = (33, 21, 6)
    short, long = _garbage_padded(lengths, L_TEST, L_TEST if variant == "bigbird" else L_TEST + 12)
    with torch.no_grad():
        h_short, h_long = m.hidden(short), m.hidden(long)
        p_short = pool(h_short, short["attention_mask"], m.causal, m.pool_mode)
        p_long = pool(h_long, long["attention_mask"], m.causal, m.pool_mode)
    for row, n in enumerate(lengths):
        torch.testing.assert_close(h_long[row, :n], h_short[row, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p_long, p_short, atol=1e-5, rtol=1e-5)
    assert m.kernel_path == KERNEL[variant]


def test_lstm_pools_the_mean_of_real_tokens():
    m = tiny("lstm").eval()
    batch = make_batch()
    with torch.no_grad():
        h = m.hidden(batch)
        expected = m.cls_head(torch.stack([h[i, :n].mean(0) for i, n in enumerate((20, 13, 5))]))
        torch.testing.assert_close(m.classify(batch), expected)
    assert m.pool_mode == "mean"


# --- BigBird block-sparse attention ----------------------------------------------------------------------


@pytest.mark.parametrize("nb,r", [(8, 1), (13, 2), (30, 3)])
def test_block_pattern(nb, r):
    p = bigbird.block_pattern(nb, 3, r, seed=5)
    assert p.shape == (3, nb - 2, 5 + r)
    for h in range(3):
        for row, i in enumerate(range(1, nb - 1)):
            keys = p[h, row].tolist()
            assert len(set(keys)) == len(keys) and 0 in keys and nb - 1 in keys
            assert {max(i - 1, 0), i, min(i + 1, nb - 1)} <= set(keys)
            assert all(0 <= k < nb for k in keys)
    assert torch.equal(p, bigbird.block_pattern(nb, 3, r, seed=5))
    assert not torch.equal(p, bigbird.block_pattern(nb, 3, r, seed=6))
    with pytest.raises(ValueError, match="needs >= "):
        bigbird.block_pattern(5 + 2 * r, 1, r, seed=0)


def test_block_sparse_equals_dense_masked_attention():
    """Gathered-block attention == full attention under the L x L mask the pattern defines."""
    g = torch.Generator().manual_seed(0)
    B, H, bs, nb, hd, r = 2, 3, 4, 9, 8, 1
    L = nb * bs
    q, k, v = (torch.randn(B, H, L, hd, generator=g, dtype=torch.float64) for _ in range(3))
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1, 29:] = False
    pattern = bigbird.block_pattern(nb, H, r, seed=3)
    got = bigbird.block_sparse_attention(q, k, v, keep, bs, pattern)
    blocks = torch.zeros(H, nb, nb, dtype=torch.bool)
    blocks[:, [0, -1]] = True  # global query blocks see every key block
    for h in range(H):
        for row in range(nb - 2):
            blocks[h, row + 1, pattern[h, row]] = True
    dense = blocks.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[None] & keep[:, None, None, :]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert blocks.sum() < H * nb * nb  # genuinely sparse


def test_bigbird_short_inputs_use_full_attention_and_any_length_works():
    m = tiny("bigbird").eval()
    with torch.no_grad():
        m.hidden(make_batch((20, 13, 5), L=20))
        assert m.kernel_path == "bigbird-full"
        out = m.hidden(make_batch((37, 13, 5), L=37))  # padded to 40 inside: 10 blocks
    assert m.kernel_path == "bigbird-block-sparse" and out.shape == (3, 37, D)


# --- Mamba2: reference SSD against the recurrence; mamba_ssm layout -------------------------------------


def ssd_loop(x, dt, A, B, C, D, dt_bias):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T; y_t = h_t C_t + D x_t, one step at a time."""
    dt = F.softplus(dt + dt_bias)
    b, L, h, p = x.shape
    state = x.new_zeros(b, h, p, B.shape[-1])
    ys = []
    for t in range(L):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, 0][:, None, None, :]
        ys.append((state @ C[:, t, 0][:, None, :, None]).squeeze(-1) + D[:, None] * x[:, t])
    return torch.stack(ys, 1)


@pytest.mark.parametrize("L,chunk", [(1, 8), (7, 8), (64, 16), (100, 32)])
def test_ssd_reference_matches_recurrence(L, chunk):
    g = torch.Generator().manual_seed(L)
    b, h, p, n = 2, 3, 4, 5

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    x, dt, B, C = r(b, L, h, p), r(b, L, h), r(b, L, 1, n), r(b, L, 1, n)
    A = (-torch.rand(h, generator=g, dtype=torch.float64) * 8).requires_grad_(True)
    Dp, dt_bias = r(h), r(h)
    leaves = [x, dt, A, B, C, Dp, dt_bias]
    want = ssd_loop(x, dt, A, B, C, Dp, dt_bias)
    got = mamba2.ssd_chunked_ref(x, dt, A, B, C, chunk, D=Dp, dt_bias=dt_bias, dt_softplus=True)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    gy = torch.randn_like(want)
    for a, w in zip(torch.autograd.grad(got, leaves, gy), torch.autograd.grad(want, leaves, gy), strict=True):
        torch.testing.assert_close(a, w, atol=1e-9, rtol=0)


# mamba_ssm Mamba2(d_model=64, d_state=64, headdim=32) (ngroups=1, expand=2: 4 heads), from its source.
MAMBA2_SSM_KEYS_D64 = {
    "in_proj.weight": (2 * 128 + 2 * 64 + 4, 64),
    "conv1d.weight": (128 + 2 * 64, 1, 4),
    "conv1d.bias": (128 + 2 * 64,),
    "dt_bias": (4,),
    "A_log": (4,),
    "D": (4,),
    "norm.weight": (128,),
    "out_proj.weight": (64, 128),
}


def test_mamba2_mixer_state_dict_matches_mamba_ssm():
    torch.manual_seed(0)
    mixer = mamba2.Mamba2Mixer(64, d_state=64, headdim=32)
    assert {k: tuple(v.shape) for k, v in mixer.state_dict().items()} == MAMBA2_SSM_KEYS_D64
    assert 1 <= mixer.A_log.exp().min() and mixer.A_log.exp().max() <= 16
    assert 1e-4 <= F.softplus(mixer.dt_bias).min() and F.softplus(mixer.dt_bias).max() <= 0.1 + 1e-6


# --- parameter matching and the registry -----------------------------------------------------------------

TARGET = build_model("ehrmamba", 100, d_model=64, n_layers=2).n_params()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_match_params_within_10_percent(name):
    kwargs = match_params(name, TARGET, 100, n_layers=2)
    assert kwargs["n_layers"] == 2 and kwargs["d_model"] % 2 == 0
    m = build_model(name, 100, **kwargs)
    assert abs(m.n_params() - TARGET) <= 0.10 * TARGET
    if "n_heads" in kwargs:
        assert (kwargs["d_model"] // kwargs["n_heads"]) % 2 == 0


def test_match_params_errors():
    with pytest.raises(ValueError, match="chooses d_model"):
        match_params("bigbird", TARGET, 100, d_model=64)
    with pytest.raises(ValueError, match="within 0%"):
        match_params("transformer", TARGET, 100, tolerance=0.0)
    with pytest.raises(ValueError, match="unknown model name"):
        match_params("multibird", TARGET, 100)


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("bigbird", {"block": 16}, "'block'"),
        ("transformer", {"n_layer": 2}, "'n_layer'"),
        ("mamba2", {"headdim": 12}, "headdim"),
        ("lstm", {"n_heads": 2}, "'n_heads'"),
        ("lstm", {"d_model": 15}, "even"),
        ("hybrid", {"attn_every": 3}, "attn_every"),
    ],
)
def test_registry_rejects_bad_kwargs(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, V, **{"d_model": 16, "n_layers": 2, **kwargs})


# --- CUDA kernels against the references (run only on the GPU machine) ------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_triton_ssd = pytest.mark.skipif(
    not torch.cuda.is_available() or mamba2.mamba_chunk_scan_combined is None,
    reason="needs CUDA and mamba_ssm",
)


@pytest.mark.gpu
@needs_triton_ssd
@pytest.mark.parametrize("L", [33, 256, 1000])
def test_mamba2_triton_matches_reference(L, monkeypatch):
    monkeypatch.setattr(mamba2, "REF_CHUNK", 64)
    torch.manual_seed(0)
    mixer = mamba2.Mamba2Mixer(64, d_state=64, headdim=32, chunk_size=256).cuda()
    x = torch.randn(4, L, 64, device="cuda", requires_grad=True)

    def run():
        out = mixer(x)
        grads = torch.autograd.grad(out.square().mean(), [x, *mixer.parameters()])
        return out, grads, mixer.kernel_path

    out_k, grads_k, path_k = run()
    monkeypatch.setattr(mamba2, "mamba_chunk_scan_combined", None)
    monkeypatch.setattr(mamba2, "rmsnorm_fn", None)
    monkeypatch.setattr(mamba2, "_ANNOUNCED", set())
    with pytest.warns(RuntimeWarning, match="reference SSD"):
        out_r, grads_r, path_r = run()
    assert (path_k, path_r) == ("mamba_ssm.ssd_triton", "reference-ssd")
    torch.testing.assert_close(out_k, out_r, atol=2e-3, rtol=2e-3)
    for a, b in zip(grads_k, grads_r, strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("variant", TINY)
def test_cuda_matches_cpu(variant):
    """Every model on CUDA (fp32) gives the CPU's hidden states at real tokens; the LSTM runs on cuDNN."""
    m = tiny(variant).eval()
    batch = make_batch((L_TEST, 27, 9), L=L_TEST)
    with torch.no_grad():
        cpu = m.hidden(batch)
        gpu = m.cuda().hidden({k: v.cuda() for k, v in batch.items()})
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(gpu.cpu()[real], cpu[real], atol=5e-3, rtol=5e-3)
    if variant == "lstm":
        assert m.kernel_path == "cudnn-lstm"
