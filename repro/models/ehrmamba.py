"""EHRMamba: CEHR embeddings into Mamba-1 blocks, with a fast pure-PyTorch selective scan for CPU.

The mixer keeps mamba_ssm's ``Mamba`` parameter names, shapes and initialisation, so a state_dict moves
between this module and ``mamba_ssm.modules.mamba_simple.Mamba``. On CUDA with mamba_ssm installed the scan
runs in its fused kernel; everywhere else in ``selective_scan_ref_chunked``, which is exact to rounding
(see its docstring) and ~60x faster on CPU than a per-step loop (DESIGN.md sections 7 and 11).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping
from functools import partial, wraps

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repro.models.embeddings import CEHREmbedding, check_sizes
from repro.models.mamba_inner import CudaScan, InnerRecompute, ReferenceScan, projections, selective_scan_cuda

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except ImportError:
    selective_scan_fn = None

try:
    from causal_conv1d import causal_conv1d_fn
except ImportError:
    causal_conv1d_fn = None

log = logging.getLogger(__name__)

KERNEL_CUDA = "mamba_ssm.selective_scan_cuda"
# the PyTorch reference scans (selective_scan_ref picks by device): stepwise on a CPU, training included;
# chunked on CUDA without mamba_ssm, where L small launches per layer would cost more than its parallel passes
KERNEL_REFERENCE = "reference-chunked"
KERNEL_REFERENCE_STEPS = "reference-steps"
_ANNOUNCED: set[str] = set()

# Chunked scan guards. A per-step log-decay below -STEP_LOG_DECAY_FLOOR (decay < exp(-20) = 2e-9) is clamped
# there: the state is wiped either way, the change is < 2e-9 of the previous state, and the gradient through
# the clamped entries (true size < 2e-9 * |A|) is dropped. Within a chunk, exponents are re-based on the
# chunk's midpoint and the chunk is halved until every exponent fits in HALF_CHUNK_LOG_RANGE, so exp(+-S)
# stays finite in float32 (overflow at 88) without float64 work.
STEP_LOG_DECAY_FLOOR = 20.0
HALF_CHUNK_LOG_RANGE = 80.0
MIN_CHUNK = 8


def _announce(path: str) -> None:
    """Log the scan path once per process (STYLE: say once which path was taken)."""
    if path not in _ANNOUNCED:
        _ANNOUNCED.add(path)
        if path == "reference-on-cuda":
            warnings.warn(
                "EHRMamba on CUDA without mamba_ssm: using the PyTorch reference scan (slow); "
                "install mamba-ssm for the fused kernel",
                RuntimeWarning,
                stacklevel=3,
            )
        else:
            log.info("EHRMamba selective scan path: %s", path)


def _prepare_delta(
    delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, dtype: torch.dtype
) -> Tensor:
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias[:, None].to(dtype)
    return F.softplus(delta) if delta_softplus else delta


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, dtype_in: torch.dtype) -> Tensor:
    if D is not None:
        y = y + u.to(y.dtype) * D[:, None].to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype_in)


def selective_scan_ref_loop(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Per-step selective scan (mamba_ssm's ``selective_scan_ref``); ground truth for tests only.

    Shapes as mamba_ssm: u, delta, z [b, d, L]; A [d, n]; B, C [b, n, L]; D, delta_bias [d] -> [b, d, L].
    Computes in float32, or float64 for float64 inputs.
    """
    ct = torch.promote_types(u.dtype, torch.float32)
    delta = _prepare_delta(delta, delta_bias, delta_softplus, ct)
    dA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A.to(ct)))
    dBu = torch.einsum("bdl,bnl,bdl->bdln", delta, B.to(ct), u.to(ct))
    h = dBu.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t].to(ct)))
    return _finish(torch.stack(ys, dim=2), u, D, z, u.dtype)


def _cumsum_(x: Tensor, reverse: bool = False) -> Tensor:
    """In-place (reverse) cumsum over dim 2 of [b, nc, T, ...]; torch.cumsum on a middle dim is ~6x slower."""
    T = x.shape[2]
    for t in range(T - 2, -1, -1) if reverse else range(1, T):
        x[:, :, t] += x[:, :, t + 1 if reverse else t - 1]
    return x


def _without_autocast(fn: Callable) -> Callable:
    """Run an autograd method with autocast off: its bmm/exp must stay in the inputs' precision."""

    @wraps(fn)
    def wrapped(ctx, first: Tensor, *args):
        with torch.autocast(first.device.type, enabled=False):
            return fn(ctx, first, *args)

    return wrapped


class _ChunkedScan(torch.autograd.Function):
    """h_t = exp(dA_t) h_{t-1} + x_t, y_t = <C_t, h_t>, in chunks of T steps with a hand-written backward.

    Inputs are [b, L, d] / [b, L, n] with L a multiple of T. Within a chunk, with S the inclusive cumsum
    of dA re-based on the midpoint (S_full = S + R): h_t = exp(S_t) (cumsum_s(exp(-S_s) x_s) + exp(R) H_in);
    chunk-end states H are carried sequentially. The backward is the same chunked scan run in reverse on
    the adjoint g_h, and uses exp(dA_t) h_{t-1} = h_t - x_t, so no shifted copy of h is needed.
    """

    @staticmethod
    @_without_autocast
    def forward(ctx, delta, u, A, B, C, T, clamp):
        b, L, d = delta.shape
        n, nc, mid = A.shape[1], L // T, T // 2 - 1
        if clamp:
            dA = delta.unsqueeze(-1) * A
            mask = dA.abs() > STEP_LOG_DECAY_FLOOR
            S = _cumsum_(dA.clamp_(-STEP_LOG_DECAY_FLOOR, STEP_LOG_DECAY_FLOOR).view(b, nc, T, d, n))
            R = S[:, :, mid].clone()
            S -= R.unsqueeze(2)
        else:  # A is constant in time: cumsum(delta * A) = cumsum(delta) * A, a 16x smaller cumsum
            mask = None
            cum = _cumsum_(delta.view(b, nc, T, d).clone())
            R = cum[:, :, mid].unsqueeze(-1) * A
            S = (cum - cum[:, :, mid : mid + 1]).unsqueeze(-1) * A
        Ep = S.exp()
        Em = S.neg_().exp_()
        x = (delta * u).view(b, nc, T, d, 1) * B.view(b, nc, T, 1, n)
        cs = _cumsum_(Em.mul_(x))
        eR = R.exp()
        dec = Ep[:, :, -1] * eR  # total decay across each chunk
        h_end = Ep[:, :, -1] * cs[:, :, -1]  # chunk-end state from a zero start
        H = x.new_zeros(b, d, n)
        carries = []
        for c in range(nc):
            carries.append(H)
            H = dec[:, c] * H + h_end[:, c]
        cs += (torch.stack(carries, 1) * eR).unsqueeze(2)
        h = cs.mul_(Ep).view(b * L, d, n)
        y = torch.bmm(h, C.view(b * L, n, 1)).view(b, L, d)
        h_prev_decayed = torch.sub(h, x.view(b * L, d, n), out=x.view(b * L, d, n))  # exp(dA_t) h_{t-1}
        ctx.save_for_backward(delta, u, A, B, C, Ep, h, h_prev_decayed, eR, dec, mask)
        ctx.T = T
        return y

    @staticmethod
    @_without_autocast
    def backward(ctx, gy):
        delta, u, A, B, C, Ep, h, h_prev_decayed, eR, dec, mask = ctx.saved_tensors
        T = ctx.T
        b, L, d = delta.shape
        n, nc, bl = A.shape[1], L // T, b * L
        gy = gy.contiguous()
        # adjoint g_h_t = C_t gy_t + exp(dA_{t+1}) g_h_{t+1}: the same chunked scan, reversed
        rc = _cumsum_((gy.view(b, nc, T, d, 1) * C.view(b, nc, T, 1, n)).mul_(Ep), reverse=True)
        into_chunk = rc[:, :, 0] * eR
        K = rc.new_zeros(b, d, n)
        carries = [K] * nc
        for c in range(nc - 1, -1, -1):
            carries[c] = K
            K = into_chunk[:, c] + dec[:, c] * K
        rc += Ep[:, :, -1:] * torch.stack(carries, 1).unsqueeze(2)
        gh = rc.div_(Ep).view(bl, d, n)
        gdA = gh * h_prev_decayed
        if mask is not None:
            gdA.view(b, L, d, n).masked_fill_(mask, 0.0)
        gx_B = torch.bmm(gh, B.view(bl, n, 1)).view(b, L, d)
        # broadcast-and-sum, not bmm over a transposed gdA: 7x (g_dA_A) and 2x (g_A) faster on one CPU
        # thread at the smoke size (b 16, L 128, d 128, n 16), where the bmm copied gdA first
        g_dA_A = (gdA * A).sum(-1).view(b, L, d)
        g_delta = gx_B * u + g_dA_A
        g_u = gx_B * delta
        g_A = gdA.mul_(delta.view(bl, d, 1)).sum(0)
        g_B = torch.bmm((delta * u).view(bl, 1, d), gh).view(b, L, n)
        g_C = torch.bmm(gy.view(bl, 1, d), h).view(b, L, n)
        return g_delta, g_u, g_A, g_B, g_C, None, None


def _chunk_len(step_max: float, chunk: int) -> int:
    """Largest power-of-two chunk <= ``chunk`` (>= 8) whose half spans at most HALF_CHUNK_LOG_RANGE of log-decay.

    >>> _chunk_len(1.0, 32), _chunk_len(7.0, 32), _chunk_len(1e4, 32)
    (32, 16, 8)
    """
    T = chunk
    while T > MIN_CHUNK and T / 2 * min(step_max, STEP_LOG_DECAY_FLOOR) > HALF_CHUNK_LOG_RANGE:
        T //= 2
    return T


def selective_scan_ref_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int = 32,
) -> Tensor:
    """Selective scan with mamba_ssm's ``selective_scan_fn`` signature, fast on CPU.

    Parallel within chunks of ``chunk`` steps (log-space cumsum), sequential only across chunks. Overflow
    guard, chosen over float64 (2.5x slower here): exponents are re-based on each chunk's midpoint and
    the chunk is halved (down to 8) while ``chunk / 2 * max|delta * A|`` could exceed 80; per-step
    log-decays are clamped to +-20, which changes results by < 2e-9 relative (STEP_LOG_DECAY_FLOOR).
    Computes in float32 (float64 for float64 inputs); returns u's dtype. Max error against
    ``selective_scan_ref_loop`` is a few 1e-6 in float32 (tests/test_models.py).

    >>> b, d, n, L = 1, 2, 4, 5
    >>> y = selective_scan_ref_chunked(torch.ones(b, d, L), torch.ones(b, d, L), -torch.ones(d, n),
    ...                                torch.ones(b, n, L), torch.ones(b, n, L))
    >>> tuple(y.shape)
    (1, 2, 5)
    >>> selective_scan_ref_chunked(torch.ones(1, 2, 5), torch.ones(1, 2, 5), -torch.ones(2, 4),
    ...                            torch.ones(1, 4, 5), torch.ones(1, 4, 5), chunk=6)
    Traceback (most recent call last):
    ValueError: chunk must be a power of two >= 8, got 6
    """
    if chunk < MIN_CHUNK or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= {MIN_CHUNK}, got {chunk}")
    ct = torch.promote_types(u.dtype, torch.float32)
    delta = _prepare_delta(delta, delta_bias, delta_softplus, ct)
    A = A.to(ct)
    step_max = float(delta.detach().abs().max()) * float(A.detach().abs().max()) if delta.numel() else 0.0
    T = _chunk_len(step_max, chunk)
    L = u.shape[2]
    pad = -L % T

    def to_bld(t: Tensor) -> Tensor:  # [b, c, L] -> zero-padded [b, L + pad, c]; padding steps are inert
        return F.pad(t.to(ct), (0, pad)).transpose(1, 2).contiguous()

    y = _ChunkedScan.apply(
        to_bld(delta), to_bld(u), A, to_bld(B), to_bld(C), T, step_max > STEP_LOG_DECAY_FLOOR
    )
    return _finish(y[:, :L].transpose(1, 2), u, D, z, u.dtype)


class _StepScan(torch.autograd.Function):
    """h_t = exp(delta_t A) h_{t-1} + du_t B_t, y_t = <C_t, h_t>, one step at a time with a hand-written
    backward; time-major inputs delta, du [L, b, d], B, C [L, b, n], A [d, n] -> y [L, b, d].

    Forward keeps every state h_t and decay exp(delta_t A) ([L, b, d, n] each); backward runs the adjoint
    g_h_t = C_t gy_t + exp(delta_{t+1} A) g_h_{t+1} in reverse and reads each step's gradients off it, using
    exp(delta_t A) h_{t-1} = h_t - du_t B_t. Every step works on [b, d, n] slices that stay in cache.
    """

    @staticmethod
    @_without_autocast
    def forward(ctx, delta, du, A, B, C):
        L, b, d = delta.shape
        H = delta.new_empty(L, b, d, A.shape[1])
        decay = torch.empty_like(H)
        y = delta.new_empty(L, b, d, 1)
        for t in range(L):
            torch.mul(delta[t].unsqueeze(-1), A, out=decay[t]).exp_()
            torch.mul(du[t].unsqueeze(-1), B[t].unsqueeze(1), out=H[t])
            if t:
                H[t].addcmul_(decay[t], H[t - 1])
            torch.bmm(H[t], C[t].unsqueeze(-1), out=y[t])
        ctx.save_for_backward(delta, du, A, B, C, H, decay)
        return y.squeeze(-1)

    @staticmethod
    @_without_autocast
    def backward(ctx, gy):
        delta, du, A, B, C, H, decay = ctx.saved_tensors
        L, b, d = delta.shape
        gy = gy.contiguous()
        g_B, g_C = torch.empty_like(B), torch.empty_like(C)
        gx_B, g_dA_A = torch.empty_like(delta), torch.empty_like(delta)
        g_A = torch.zeros_like(A)
        g_h = torch.zeros_like(H[0])
        gdA = torch.empty_like(g_h)
        for t in range(L - 1, -1, -1):
            if t < L - 1:
                g_h.mul_(decay[t + 1])
            g_h.addcmul_(gy[t].unsqueeze(-1), C[t].unsqueeze(1))
            torch.bmm(gy[t].unsqueeze(1), H[t], out=g_C[t].unsqueeze(1))
            torch.bmm(du[t].unsqueeze(1), g_h, out=g_B[t].unsqueeze(1))
            torch.bmm(g_h, B[t].unsqueeze(-1), out=gx_B[t].unsqueeze(-1))
            torch.addcmul(H[t], du[t].unsqueeze(-1), B[t].unsqueeze(1), value=-1, out=gdA).mul_(g_h)
            torch.sum(gdA * A, -1, out=g_dA_A[t])
            g_A += (gdA * delta[t].unsqueeze(-1)).sum(0)
        # du = delta * u is formed outside, so autograd carries g_du = <g_h, B> to delta and u
        return g_dA_A, gx_B, g_A, g_B, g_C


def selective_scan_ref_steps(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Selective scan one step at a time on [b, d, n] states: EHRMamba's scan on a CPU.

    The recurrence h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t, y_t = <C_t, h_t> on slices that stay in
    cache, exact (no exponent re-basing). Without gradients (validation, scoring) only the current state is
    kept: 3.7-5x faster than the chunked forward for 128 tokens at batch 16-64 (one thread, width 128,
    state 16). With gradients ``_StepScan`` keeps the states for its backward: forward and backward took
    min 91 / median 130 ms against the chunked scan's 136 / 209 ms at batch 16 there (docs/measurements.md),
    keeping two [L, b, d, n] tensors to its three. Same signature and dtypes as ``selective_scan_ref_chunked``.
    """
    ct = torch.promote_types(u.dtype, torch.float32)
    delta = _prepare_delta(delta, delta_bias, delta_softplus, ct)
    b, d, L = u.shape
    A = A.to(ct)
    # time-major copies: each step then reads contiguous [b, d] / [b, n] slices
    delta_t = delta.permute(2, 0, 1).contiguous()
    du_t = (delta * u.to(ct)).permute(2, 0, 1).contiguous()
    B_t = B.to(ct).permute(2, 0, 1).contiguous()
    C_t = C.to(ct).permute(2, 0, 1).contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (delta_t, du_t, A, B_t, C_t)):
        y = _StepScan.apply(delta_t, du_t, A, B_t, C_t)
        return _finish(y.permute(1, 2, 0), u, D, z, u.dtype)
    with torch.no_grad(), torch.autocast(u.device.type, enabled=False):  # bmm in the state's precision
        decay = u.new_empty(b, d, A.shape[1], dtype=ct)
        h = torch.zeros_like(decay)
        y = u.new_empty(L, b, d, 1, dtype=ct)
        for t in range(L):
            torch.mul(delta_t[t].unsqueeze(-1), A, out=decay).exp_()
            h.mul_(decay).addcmul_(du_t[t].unsqueeze(-1), B_t[t].unsqueeze(1))
            torch.bmm(h, C_t[t].unsqueeze(-1), out=y[t])
    return _finish(y.squeeze(-1).permute(1, 2, 0), u, D, z, u.dtype)


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """The PyTorch scan for u's device: stepwise on a CPU, chunked on CUDA (``selective_scan_fn``'s signature)."""
    scan = selective_scan_ref_chunked if u.is_cuda else selective_scan_ref_steps
    return scan(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)


def reference_kernel_path(on_cuda: bool) -> str:
    """The kernel path ``selective_scan_ref`` takes on that device."""
    return KERNEL_REFERENCE if on_cuda else KERNEL_REFERENCE_STEPS


_CUDA_SCAN = CudaScan()
_REFERENCE_SCAN = ReferenceScan(selective_scan_ref)


class MambaMixer(nn.Module):
    """Mamba-1 mixer, state_dict-compatible with ``mamba_ssm.modules.mamba_simple.Mamba``.

    Same parameters (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj) and init (dt bias as inverse
    softplus of log-uniform dt in [dt_min, dt_max], S4D-real A). ``kernel_path`` names the scan the last
    forward used.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        recompute: bool = False,
    ) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        # keep what mamba_inner_fn keeps and recompute the rest in backward (repro.models.mamba_inner)
        self.recompute = recompute
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        dt_std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -dt_std, dt_std)
        dt = torch.exp(
            torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.dt_proj.bias._no_reinit = True
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.kernel_path: str | None = None

    def forward(self, hidden: Tensor) -> Tensor:
        """[B, L, D] -> [B, L, D]; causal.

        Layout as mamba_ssm's ``Mamba.forward``: projections are computed straight into [B, d, L] (and
        [(B L), d]), so the scan's inputs need no strided copies. Transposing a [B, L, 2d] projection
        instead cost 27 % of the step at L = 16384 on an H100 (``python -m repro.bench step --profile``).
        """
        L = hidden.shape[1]
        xz = (self.in_proj.weight @ hidden.reshape(-1, self.d_model).t()).view(-1, hidden.shape[0], L)
        xz = xz.transpose(0, 1)  # [B, 2 d_inner, L], stride 1 along L
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.to(xz.dtype)[:, None]
        fused = hidden.is_cuda and selective_scan_fn is not None
        if self.recompute and (not hidden.is_cuda or selective_scan_cuda is not None):
            return self._inner_recompute(xz, fused)
        # recompute on CUDA without mamba_ssm (selective_scan_cuda comes with selective_scan_fn): the plain
        # reference path below, which warns
        x, z = xz.chunk(2, dim=1)
        if fused and causal_conv1d_fn is not None:
            x = causal_conv1d_fn(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        else:
            x = F.silu(self.conv1d(x)[..., :L])
        dt, B, C = projections(x, self.x_proj.weight, self.dt_proj.weight, self.dt_rank)  # dt's bias: in scan
        scan = self._scan(fused, selective_scan_fn, selective_scan_ref, hidden.is_cuda)
        y = scan(
            x,
            dt,
            -torch.exp(self.A_log.float()),
            B.squeeze(1),
            C.squeeze(1),
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )
        return self.out_proj(y.transpose(1, 2))

    def _scan(self, fused: bool, cuda, reference, on_cuda: bool):
        """`cuda` when mamba_ssm's kernel runs, else `reference`; records the kernel path and announces
        it (a reference scan on CUDA as such)."""
        scan, self.kernel_path = (cuda, KERNEL_CUDA) if fused else (reference, reference_kernel_path(on_cuda))
        _announce("reference-on-cuda" if on_cuda and not fused else self.kernel_path)
        return scan

    def _inner_recompute(self, xz: Tensor, fused: bool) -> Tensor:
        """The same mixer through InnerRecompute: the conv output, dt, B, C and the gated scan output are
        recomputed in backward instead of kept (mamba_inner_fn's memory, without causal-conv1d)."""
        kernel = self._scan(fused, _CUDA_SCAN, _REFERENCE_SCAN, xz.is_cuda)
        return InnerRecompute.apply(
            xz,
            self.conv1d.weight,
            self.conv1d.bias,
            self.x_proj.weight,
            self.dt_proj.weight,
            self.out_proj.weight,
            self.out_proj.bias,
            -torch.exp(self.A_log.float()),
            self.D.float(),
            self.dt_proj.bias.float(),
            self.dt_rank,
            kernel,
        )


class MambaBlock(nn.Module):
    """Pre-norm residual block ``x + mixer(norm(x))``, the math of mamba_ssm's ``Block`` (same names).

    ``mixer_cls`` is MambaMixer for EHRMamba and the hybrid, Mamba2Mixer for Mamba2.
    """

    def __init__(
        self,
        d_model: int,
        dropout: float = 0.0,
        mixer_cls: type[nn.Module] | None = None,
        **mixer_kwargs: int,
    ) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=1e-5)
        self.mixer = (mixer_cls or MambaMixer)(d_model, **mixer_kwargs)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.mixer(self.norm(x)))


def init_mamba_weights(module: nn.Module, n_layers: int, mixers: tuple[type, ...] | None = None) -> None:
    """mamba_ssm's ``_init_weights``: zero biases (not dt), N(0, 0.02) embeddings, out_proj of each mixer
    (instances of ``mixers``, default MambaMixer) rescaled by 1/sqrt(n_layers). Mamba2 shares it."""
    if isinstance(module, nn.Linear) and module.bias is not None:
        if not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    if isinstance(module, mixers or (MambaMixer,)):
        rescale_out_proj(module, n_layers)


def rescale_out_proj(mixer: nn.Module, n_layers: int) -> None:
    """mamba_ssm's residual scaling: the mixer's out_proj re-drawn (Kaiming uniform) and scaled by 1/sqrt(n_layers)."""
    nn.init.kaiming_uniform_(mixer.out_proj.weight, a=math.sqrt(5))
    with torch.no_grad():
        mixer.out_proj.weight /= math.sqrt(n_layers)


class EHRMamba(nn.Module):
    """CEHR embeddings -> ``n_layers`` Mamba blocks -> RMSNorm. Causal: position t sees tokens <= t."""

    causal = True
    pretrain_objective = "clm"

    @property
    def graph_safe(self) -> bool:
        """Its CUDA training step has no host sync and no data-dependent branch (repro.training.graphs)
        when the scan is mamba_ssm's kernel; the reference scan reads its step size back to the host."""
        return selective_scan_fn is not None

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        n_layers: int = 2,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        n_types: int = 10,
        max_visits: int = 64,
        time_units: str = "weeks",
        dropout: float = 0.0,
        recompute: bool = False,
    ) -> None:
        super().__init__()
        check_sizes("EHRMamba", vocab_size=vocab_size, d_model=d_model, n_layers=n_layers)
        self.d_model = d_model
        self.embedding = CEHREmbedding(
            vocab_size, d_model, n_types, max_visits, dropout=dropout, time_units=time_units
        )
        self.layers = nn.ModuleList(
            MambaBlock(
                d_model, dropout=dropout, d_state=d_state, d_conv=d_conv, expand=expand, recompute=recompute
            )
            for _ in range(n_layers)
        )
        self.norm_f = nn.RMSNorm(d_model, eps=1e-5)
        self.apply(partial(init_mamba_weights, n_layers=n_layers))

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
