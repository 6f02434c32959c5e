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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [s, b, heads, d]; rotates the first rot_dim = 2 * cos.shape[-1] dims of each head."""
    rot_dim = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    if interleaved:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    else:
        x1, x2 = x_rot.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return torch.cat([out.to(x.dtype), x_pass], dim=-1) if x_pass.numel() else out.to(x.dtype)
