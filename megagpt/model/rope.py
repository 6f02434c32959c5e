"""Rotary position embeddings with a rotary fraction, base theta and linear position interpolation.

Position interpolation (Chen et al. 2023) extends the context by dividing positions by a factor,
so a model trained on L positions sees positions in [0, L) again at factor*L tokens.
Two pairings exist in the wild: rotate-half (dim i with i + r/2, HF Llama and Megatron's default)
and interleaved (dim 2i with 2i+1, Meta's original Llama and GPT-NeoX's option).
"""
from __future__ import annotations

import torch


def rope_tables(seq_len: int, rot_dim: int, theta: float, scaling: float, device, dtype=torch.float32):
    """cos, sin of shape [s, 1, 1, rot_dim/2] (broadcast over batch and heads)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, device=device, dtype=torch.float32) / rot_dim))
    pos = torch.arange(seq_len, device=device, dtype=torch.float32) / scaling
    angles = torch.outer(pos, inv_freq)                         # [s, rot/2]
    return angles.cos().to(dtype)[:, None, None, :], angles.sin().to(dtype)[:, None, None, :]


def _rotate_half_into(out, x, cos, sin, sign: float) -> None:
    """out[..., :rot] = the rotate-half rotation of x[..., :rot] by +angle (sign 1) or -angle (sign -1),
    written into the two halves of `out` in place: x1 cos - x2 sin | x2 cos + x1 sin, each product
    rounded on its own as in the chunk + cat formula (bit for bit the same values, no FMA)."""
    half = cos.shape[-1]
    x1, x2, o1, o2 = x[..., :half], x[..., half:2 * half], out[..., :half], out[..., half:2 * half]
    tmp = torch.empty(o1.shape, dtype=out.dtype, device=out.device)
    torch.mul(x1, cos, out=o1)
    torch.mul(x2, sin, out=tmp)
    o1.sub_(tmp) if sign > 0 else o1.add_(tmp)
    torch.mul(x2, cos, out=o2)
    torch.mul(x1, sin, out=tmp)
    o2.add_(tmp) if sign > 0 else o2.sub_(tmp)


class _RotateHalf(torch.autograd.Function):
    """Rotate-half RoPE without chunk + cat: the output's halves are written in place, and the backward
    is the inverse rotation of the gradient (the map is orthogonal), so nothing but cos/sin is saved."""
    @staticmethod
    def forward(ctx, x, cos, sin):
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)              # [s, b, heads, d]
        _rotate_half_into(out, x, cos, sin, 1.0)
        rot = 2 * cos.shape[-1]
        if rot < x.shape[-1]:
            out[..., rot:] = x[..., rot:]
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        out = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        _rotate_half_into(out, grad, cos, sin, -1.0)
        rot = 2 * cos.shape[-1]
        if rot < grad.shape[-1]:
            out[..., rot:] = grad[..., rot:]
        return out, None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [s, b, heads, d]; rotates the first rot_dim = 2 * cos.shape[-1] dims of each head."""
    if not interleaved and x.dtype == cos.dtype and not cos.requires_grad and not torch.compiler.is_compiling():
        # (compiled, the formula below fuses into one kernel; dynamo cannot trace strided out= writes)
        return _RotateHalf.apply(x, cos, sin)
    rot_dim = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    if interleaved:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    else:  # mixed dtypes (bf16 activations, fp32 tables): computed in fp32, rounded once
        x1, x2 = x_rot.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return torch.cat([out.to(x.dtype), x_pass], dim=-1) if x_pass.numel() else out.to(x.dtype)
