"""The Mamba-1 mixer's inner path (conv, projections, scan, gated output projection) as one autograd
function that keeps what mamba_ssm's ``mamba_inner_fn`` keeps and recomputes the rest in backward.

Why: run layer by layer through autograd, the mixer keeps [batch, d_inner, length] activations per layer
that ``mamba_inner_fn`` (checkpoint_lvl=1) does not: the conv output before and after its SiLU (and
x_proj's contiguous copy of it), the step sizes dt and the gated scan output read by out_proj; about 8 such
tensors per layer for backward against 3 here (the in_proj output counts 2). At 16,384 tokens x 8 they
made our EHRMamba's peak memory 1.41x the fully fused model's (issue 24). Here only the in_proj output xz, the scan's chunk states and
its ungated output are kept; backward recomputes the conv, x_proj and dt_proj (a depthwise conv and two
small matmuls) and lets the scan kernel recompute the gated output. ``mamba_inner_fn`` itself needs
causal-conv1d, a 400 s build; the conv here is PyTorch's.

The scan kernel is passed in: mamba_ssm's ``selective_scan_cuda`` on GPUs (``CudaScan``), or
``ReferenceScan`` around a differentiable PyTorch scan, which recomputes through autograd and exists so
the rest of the function is tested on CPUs against the plain path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import selective_scan_cuda
except ImportError:
    selective_scan_cuda = None


class ScanKernel(Protocol):
    """mamba_ssm's ``selective_scan_cuda`` calling convention (B and C as [batch, 1, d_state, length])."""

    def fwd(
        self, u, delta, A, B, C, D, z, delta_bias, softplus: bool
    ) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """(ungated output, chunk states, gated output)."""
        ...

    def bwd(
        self, u, delta, A, B, C, D, z, delta_bias, dout, states, out, softplus: bool, dz: Tensor
    ) -> tuple[Tensor, ...]:
        """(du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, the gated output recomputed); dz is written into the
        buffer given."""
        ...


class CudaScan:
    """mamba_ssm's CUDA scan, called as ``mamba_inner_fn`` calls it."""

    def fwd(self, u, delta, A, B, C, D, z, delta_bias, softplus):
        out, states, out_z = selective_scan_cuda.fwd(u, delta, A, B, C, D, z, delta_bias, softplus)
        return out, states, out_z

    def bwd(self, u, delta, A, B, C, D, z, delta_bias, dout, states, out, softplus, dz):
        # dz: a buffer the kernel writes into (mamba_inner_fn passes the z half of dxz the same way)
        return selective_scan_cuda.bwd(
            u, delta, A, B, C, D, z, delta_bias, dout, states, out, dz, softplus, True  # recompute out_z
        )  # fmt: skip


class ReferenceScan:
    """A differentiable scan with ``selective_scan_fn``'s signature behind the kernel convention: keeps
    nothing in forward and recomputes through autograd in backward (for tests on CPUs)."""

    def __init__(self, scan: Callable[..., Tensor]) -> None:
        self.scan = scan

    def _run(self, u, delta, A, B, C, D, z, delta_bias, softplus):
        return self.scan(
            u, delta, A, B.squeeze(1), C.squeeze(1), D, z=z, delta_bias=delta_bias, delta_softplus=softplus
        )

    def fwd(self, u, delta, A, B, C, D, z, delta_bias, softplus):
        with torch.no_grad():
            return None, None, self._run(u, delta, A, B, C, D, z, delta_bias, softplus)

    def bwd(self, u, delta, A, B, C, D, z, delta_bias, dout, states, out, softplus, dz):
        args = [t.detach().requires_grad_() for t in (u, delta, A, B, C, D, z, delta_bias)]
        with torch.enable_grad():
            out_z = self._run(*args, softplus)
            du, ddelta, dA, dB, dC, dD, dz_, ddelta_bias = torch.autograd.grad(out_z, args, dout)
        dz.copy_(dz_)
        return du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out_z.detach()


def projections(conv: Tensor, x_proj_w: Tensor, dt_proj_w: Tensor, dt_rank: int):
    """dt [b, d, L] (before its bias) and B, C [b, 1, n, L] from the conv output [b, d, L] through x_proj and
    dt_proj, in mamba_ssm's layouts (stride 1 along L, no strided copies for the scan). The plain mixer
    path uses it too (B, C squeezed to [b, n, L])."""
    b, d, L = conv.shape
    x_dbl = F.linear(conv.transpose(1, 2).reshape(b * L, d), x_proj_w)  # [(b L), dt_rank + 2 n]
    n = (x_dbl.shape[1] - dt_rank) // 2
    delta = (dt_proj_w @ x_dbl[:, :dt_rank].t()).view(d, b, L).transpose(0, 1)
    B = x_dbl[:, dt_rank : dt_rank + n].reshape(b, L, 1, n).permute(0, 2, 3, 1).contiguous()
    C = x_dbl[:, dt_rank + n :].reshape(b, L, 1, n).permute(0, 2, 3, 1).contiguous()
    return delta, B, C


def _inner(
    x: Tensor, conv_w: Tensor, conv_b: Tensor | None, x_proj_w: Tensor, dt_proj_w: Tensor, dt_rank: int
):
    """SiLU(causal depthwise conv(x)), then ``projections`` of it: conv, dt, B, C."""
    L = x.shape[-1]
    conv = F.silu(F.conv1d(x, conv_w, conv_b, padding=conv_w.shape[-1] - 1, groups=x.shape[1])[..., :L])
    return (conv, *projections(conv, x_proj_w, dt_proj_w, dt_rank))


class InnerRecompute(torch.autograd.Function):
    """xz [b, 2 d_inner, L] -> out_proj(scan(...) * SiLU(z)) [b, L, d_model], keeping xz, the scan's states
    and ungated output; conv output, dt, B, C and the gated output are recomputed in backward."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(
        ctx,
        xz,
        conv_w,
        conv_b,
        x_proj_w,
        dt_proj_w,
        out_proj_w,
        out_proj_b,
        A,
        D,
        delta_bias,
        dt_rank,
        kernel,
    ):
        x, z = xz.chunk(2, dim=1)
        conv, delta, B, C = _inner(x, conv_w, conv_b, x_proj_w, dt_proj_w, dt_rank)
        out, states, out_z = kernel.fwd(conv, delta, A, B, C, D, z, delta_bias, True)
        ctx.dt_rank, ctx.kernel, ctx.has_out_bias = dt_rank, kernel, out_proj_b is not None
        ctx.save_for_backward(
            xz, conv_w, conv_b, x_proj_w, dt_proj_w, out_proj_w, A, D, delta_bias, states, out
        )
        return F.linear(out_z.transpose(1, 2), out_proj_w, out_proj_b)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        xz, conv_w, conv_b, x_proj_w, dt_proj_w, out_proj_w, A, D, delta_bias, states, out = ctx.saved_tensors
        x, z = xz.chunk(2, dim=1)
        b, d, L = x.shape
        xl, cw, xpw, dtw = (t.detach().requires_grad_() for t in (x, conv_w, x_proj_w, dt_proj_w))
        cb = conv_b.detach().requires_grad_() if conv_b is not None else None
        leaves = [xl, cw, xpw, dtw] + ([cb] if cb is not None else [])
        with torch.enable_grad():
            conv, delta, B, C = _inner(xl, cw, cb, xpw, dtw, ctx.dt_rank)
        dy2 = dy.reshape(b * L, -1)
        # [d_inner, (b L)] viewed as [b, d_inner, L]: stride 1 along L without a copy, as the kernel reads it
        dout = (out_proj_w.to(dy.dtype).t() @ dy2.t()).view(d, b, L).transpose(0, 1)
        dxz = torch.empty_like(xz)  # xz's layout, so in_proj's backward needs no copy; the kernel fills dz
        dx, dz = dxz.chunk(2, dim=1)
        du, ddelta, dA, dB, dC, dD, ddelta_bias, _, out_z = ctx.kernel.bwd(
            conv.detach(), delta.detach(), A, B.detach(), C.detach(), D, z, delta_bias, dout, states, out, True, dz
        )  # fmt: skip
        del dout
        d_out_w = (dy2.t() @ out_z.transpose(1, 2).reshape(b * L, d).to(dy.dtype)).to(out_proj_w.dtype)
        d_out_b = dy2.sum(0).to(out_proj_w.dtype) if ctx.has_out_bias else None
        del out_z
        grads = [g.to(t.dtype) for g, t in zip((du, ddelta, dB, dC), (conv, delta, B, C), strict=True)]
        found = torch.autograd.grad([conv, delta, B, C], leaves, grads)
        dx.copy_(found[0])
        d_cw, d_xpw, d_dtw = found[1:4]
        d_cb = found[4] if cb is not None else None
        return dxz, d_cw, d_cb, d_xpw, d_dtw, d_out_w, d_out_b, dA, dD, ddelta_bias, None, None
