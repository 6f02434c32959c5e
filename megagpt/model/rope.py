"""Rotary position embeddings with a rotary fraction, base theta and context-extension scaling.

Two scalings stretch a model trained on L positions to factor*L (`model.rope_scaling` is the factor,
`model.rope_scaling_type` the kind; factor 1 = plain RoPE):
  linear  position interpolation (Chen et al. 2023): positions are divided by the factor, so
          factor*L tokens see positions in [0, L) again.
  yarn    YaRN (Peng et al. 2023): high-frequency dims (more than beta_fast=32 turns over L) are left
          alone, low-frequency dims (under beta_slow=1 turn) are interpolated, a linear ramp between;
          cos and sin are multiplied by 0.1*ln(factor) + 1, so attention logits are sharpened by its
          square. Static, as transformers' `rope_type: yarn` (truncated correction range).
Two pairings exist in the wild: rotate-half (dim i with i + r/2, HF Llama and Megatron's default)
and interleaved (dim 2i with 2i+1, Meta's original Llama and GPT-NeoX's option).
"""
from __future__ import annotations

import math

import torch

SCALING_TYPES = ("linear", "yarn")
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0


def yarn_inv_freq(rot_dim: int, theta: float, factor: float, original_len: int) -> tuple[torch.Tensor, float]:
    """YaRN's blended inverse frequencies [rot/2] and its cos/sin multiplier (the attention factor)."""
    base = theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)

    def dim_of(turns: float) -> float:          # the dim whose wavelength fits `turns` times into original_len
        return rot_dim * math.log(original_len / (turns * 2 * math.pi)) / (2 * math.log(theta))
    low = max(math.floor(dim_of(YARN_BETA_FAST)), 0)
    high = min(math.ceil(dim_of(YARN_BETA_SLOW)), rot_dim - 1)
    ramp = ((torch.arange(rot_dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    keep = 1 - ramp                              # 1: extrapolate (leave the frequency), 0: interpolate
    inv_freq = (1.0 / (factor * base)) * (1 - keep) + (1.0 / base) * keep
    return inv_freq, 0.1 * math.log(factor) + 1.0


def rope_tables(seq_len: int, rot_dim: int, theta: float, scaling: float, device, dtype=torch.float32,
                kind: str = "linear", original_len: int | None = None):
    """cos, sin of shape [s, 1, 1, rot_dim/2] (broadcast over batch and heads). `original_len` (the
    trained context L) is what YaRN's ramp is measured against."""
    mult = 1.0
    if kind == "yarn" and scaling != 1.0:
        inv_freq, mult = yarn_inv_freq(rot_dim, theta, scaling, original_len)
        inv_freq = inv_freq.to(device)
        pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    else:
        inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, device=device, dtype=torch.float32) / rot_dim))
        pos = torch.arange(seq_len, device=device, dtype=torch.float32) / scaling
    angles = torch.outer(pos, inv_freq)                         # [s, rot/2]
    return ((angles.cos() * mult).to(dtype)[:, None, None, :],
            (angles.sin() * mult).to(dtype)[:, None, None, :])


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
