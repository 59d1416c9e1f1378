"""Mamba-2 (Dao & Gu 2024, SSD) over the CEHR embeddings: Triton kernels on CUDA, chunked PyTorch on CPU.

``Mamba2Mixer`` keeps the parameter names, shapes and init of ``mamba_ssm.modules.mamba2.Mamba2`` with
``ngroups=1``, ``rmsnorm=True``, ``D_has_hdim=False`` (in_proj, conv1d, dt_bias, A_log, D, norm, out_proj),
so a state_dict moves between the two. The scan runs in mamba_ssm's
``mamba_chunk_scan_combined`` (Triton) when the input is on CUDA and mamba_ssm imports; everywhere
else in ``ssd_chunked_ref``, the SSD block decomposition of mamba's ``ssd_minimal_discrete`` written
with batched matmuls (B and C shared by all heads, as ngroups=1 allows). mamba_ssm's fully fused
``mamba_split_conv1d_scan_combined`` is not used: it needs the causal-conv1d package, which the GPU
machine lacks; the convolution uses causal-conv1d when present, else ``nn.Conv1d``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repro.models.ehrmamba import MambaBlock, init_mamba_weights
from repro.models.embeddings import CEHREmbedding
from repro.models.transformer import check_sizes

try:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except ImportError:
    mamba_chunk_scan_combined = None

try:
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
except ImportError:
    rmsnorm_fn = None

try:
    from causal_conv1d import causal_conv1d_fn
except ImportError:
    causal_conv1d_fn = None

log = logging.getLogger(__name__)

KERNEL_TRITON = "mamba_ssm.ssd_triton"
KERNEL_REFERENCE = "reference-ssd"
REF_CHUNK = 64  # the reference's chunk length (the result does not depend on it; fastest on the 2-core CPU)
_ANNOUNCED: set[str] = set()


def _announce(path: str, on_cuda: bool) -> None:
    """Say once per process which scan runs; warn when CUDA runs the slow reference."""
    key = f"{path}-{on_cuda}"
    if key in _ANNOUNCED:
        return
    _ANNOUNCED.add(key)
    if on_cuda and path == KERNEL_REFERENCE:
        warnings.warn(
            "Mamba2 on CUDA without mamba_ssm: using the PyTorch reference SSD; install mamba-ssm for the "
            "Triton kernels",
            RuntimeWarning,
            stacklevel=3,
        )
    else:
        log.info("Mamba2 scan path: %s", path)


def ssd_chunked_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = REF_CHUNK,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> Tensor:
    """SSD scan with the arguments of ``mamba_chunk_scan_combined`` (ngroups=1), in PyTorch.

    x [b, L, h, p]; dt [b, L, h]; A, D, dt_bias [h]; B, C [b, L, 1, n] -> y [b, L, h, p] in x's dtype.
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t. Within chunks of ``chunk_size``
    steps the scan is a masked (decay-weighted) attention-like matmul; chunk-end states are carried
    sequentially. Every exponent is <= 0, so nothing overflows; computes in float32 (float64 for float64).

    >>> b, L, h, p, n = 1, 5, 2, 3, 4
    >>> y = ssd_chunked_ref(torch.ones(b, L, h, p), torch.ones(b, L, h), -torch.ones(h),
    ...                     torch.ones(b, L, 1, n), torch.ones(b, L, 1, n), chunk_size=2)
    >>> tuple(y.shape), round(y[0, 0, 0, 0].item(), 4), round(y[0, 1, 0, 0].item(), 4)
    ((1, 5, 2, 3), 4.0, 5.4715)
    """
    if B.shape[2] != 1 or C.shape[2] != 1:
        raise ValueError(f"ssd_chunked_ref supports ngroups=1, got B {tuple(B.shape)}")
    dtype_in = x.dtype
    ct = torch.promote_types(x.dtype, torch.float32)
    b, L, h, p = x.shape
    T = chunk_size
    dt = dt.to(ct)
    if dt_bias is not None:
        dt = dt + dt_bias.to(ct)
    if dt_softplus:
        dt = F.softplus(dt)
    pad = -L % T
    nc = (L + pad) // T
    xs = F.pad(x.to(ct), (0, 0, 0, 0, 0, pad))  # padding steps come after every real one: inert
    dt = F.pad(dt, (0, 0, 0, pad))
    Bc = F.pad(B[:, :, 0].to(ct), (0, 0, 0, pad)).view(b, nc, T, -1)  # [b, c, T, n]
    Cc = F.pad(C[:, :, 0].to(ct), (0, 0, 0, pad)).view(b, nc, T, -1)
    X = (xs * dt.unsqueeze(-1)).view(b, nc, T, h, p).permute(0, 3, 1, 2, 4)  # [b, h, c, T, p]
    a_cum = (dt * A.to(ct)).view(b, nc, T, h).permute(0, 3, 1, 2).cumsum(-1)  # [b, h, c, T]
    # 1. within chunks: y_t = sum_{s <= t} (C_t . B_s) exp(a_cum_t - a_cum_s) X_s
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    seg = (a_cum.unsqueeze(-1) - a_cum.unsqueeze(-2)).masked_fill(~causal, -math.inf).exp()
    CB = (Cc @ Bc.transpose(-1, -2)).unsqueeze(1)  # [b, 1, c, T, T]
    y = (CB * seg) @ X
    # 2. state each chunk leaves behind from a zero start: sum_s exp(a_cum_end - a_cum_s) X_s B_s^T
    decay_to_end = (a_cum[..., -1:] - a_cum).exp()
    states = (X * decay_to_end.unsqueeze(-1)).transpose(-1, -2) @ Bc.unsqueeze(1)  # [b, h, c, p, n]
    # 3. states entering each chunk, carried across chunks
    chunk_decay = a_cum[..., -1].exp()  # [b, h, c]
    carried, S = [], states.new_zeros(b, h, p, states.shape[-1])
    for c in range(nc):
        carried.append(S)
        S = chunk_decay[:, :, c, None, None] * S + states[:, :, c]
    carried = torch.stack(carried, dim=2)  # [b, h, c, p, n]
    # 4. contribution of the entering state: exp(a_cum_t) C_t S_in
    y = y + (Cc.unsqueeze(1) @ carried.transpose(-1, -2)) * a_cum.exp().unsqueeze(-1)
    y = y.permute(0, 2, 3, 1, 4).reshape(b, nc * T, h, p)[:, :L]
    if D is not None:
        y = y + x.to(ct) * D.to(ct)[:, None]
    return y.to(dtype_in)


class RMSNormGated(nn.Module):
    """``rmsnorm(x * silu(z)) * weight`` (mamba_ssm's ``RMSNorm(norm_before_gate=False)``, one group)."""

    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        if x.is_cuda and rmsnorm_fn is not None:
            return rmsnorm_fn(x, self.weight, None, z=z, eps=self.eps, norm_before_gate=False)
        dtype = x.dtype
        x = x.float() * F.silu(z.float())
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer, state_dict-compatible with ``mamba_ssm.modules.mamba2.Mamba2`` (ngroups=1).

    ``chunk_size`` is the Triton kernel's chunk (mamba_ssm's default 256); the reference uses REF_CHUNK.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 32,
        chunk_size: int = 256,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.chunk_size = d_model, d_state, d_conv, chunk_size
        self.d_inner = int(expand * d_model)
        if self.d_inner % headdim:
            raise ValueError(
                f"Mamba2 expand * d_model = {self.d_inner} is not divisible by headdim={headdim}"
            )
        self.headdim, self.nheads = headdim, self.d_inner // headdim
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * d_state + self.nheads, bias=bias)
        conv_dim = self.d_inner + 2 * d_state
        self.conv1d = nn.Conv1d(
            conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, bias=conv_bias
        )
        dt = torch.exp(
            torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.dt_bias._no_weight_decay = True
        A = torch.empty(self.nheads, dtype=torch.float32).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.D._no_weight_decay = True
        self.norm = RMSNormGated(self.d_inner, eps=1e-5)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.kernel_path: str | None = None

    def forward(self, u: Tensor) -> Tensor:
        """[B, L, D] -> [B, L, D]; causal."""
        b, L, _ = u.shape
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.d_inner + 2 * self.d_state, self.nheads], -1)
        if u.is_cuda and causal_conv1d_fn is not None:
            xBC = causal_conv1d_fn(
                xBC.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu"
            ).transpose(1, 2)
        else:
            xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :L].transpose(1, 2))
        x, B, C = xBC.split([self.d_inner, self.d_state, self.d_state], dim=-1)
        x = x.reshape(b, L, self.nheads, self.headdim)
        B, C = B.reshape(b, L, 1, self.d_state), C.reshape(b, L, 1, self.d_state)
        A = -torch.exp(self.A_log.float())
        if u.is_cuda and mamba_chunk_scan_combined is not None:
            self.kernel_path = KERNEL_TRITON
            y = mamba_chunk_scan_combined(
                x, dt, A, B, C, self.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True
            )
        else:
            self.kernel_path = KERNEL_REFERENCE
            with torch.autocast(u.device.type, enabled=False):
                y = ssd_chunked_ref(
                    x, dt, A, B, C, REF_CHUNK, D=self.D, dt_bias=self.dt_bias, dt_softplus=True
                )
        _announce(self.kernel_path, u.is_cuda)
        return self.out_proj(self.norm(y.reshape(b, L, self.d_inner), z))


class EHRMamba2(nn.Module):
    """CEHR embeddings -> ``n_layers`` Mamba-2 blocks -> RMSNorm. Causal; pretrained with CLM."""

    causal = True
    pretrain_objective = "clm"

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        n_layers: int = 2,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 32,
        chunk_size: int = 256,
        n_types: int = 10,
        max_visits: int = 64,
        time_units: str = "weeks",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_sizes("Mamba2", vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, d_state=d_state)
        self.d_model = d_model
        self.embedding = CEHREmbedding(
            vocab_size, d_model, n_types, max_visits, dropout=dropout, time_units=time_units
        )
        mixer = dict(d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim, chunk_size=chunk_size)
        self.layers = nn.ModuleList(
            MambaBlock(d_model, dropout, mixer_cls=Mamba2Mixer, **mixer) for _ in range(n_layers)
        )
        self.norm_f = nn.RMSNorm(d_model, eps=1e-5)
        self.apply(partial(init_mamba_weights, n_layers=n_layers, mixers=(Mamba2Mixer,)))

    @property
    def kernel_path(self) -> str | None:
        """Scan used by the last forward (None before the first)."""
        return self.layers[0].mixer.kernel_path

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Batch dict (CONTRACTS.md) -> hidden states [B, L, D]."""
        x = self.embedding(batch)
        for layer in self.layers:
            x = layer(x)
        return self.norm_f(x)
