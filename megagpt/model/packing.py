"""Packed sequences: several samples share one row, each sees only itself and starts at position 0.

A row's `segment_ids` [b, s] number its samples 1, 2, ... (0 = padding after the last one). From them:
  position_ids [b, s]   the token's index within its own sample (RoPE restarts per sample)
  mask [b, 1, s, s]     block-diagonal causal: query t attends to key u iff u <= t and both are in
                        the same segment (padding attends to earlier padding only; no label reads it)
The same `Packing` is given to every pipeline stage's chunk (each runs attention), built from the
segment ids that the data loader also gives to the first and last stage.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100          # a label that carries no loss (prompt, padding); GPTModel zeroes its loss


@dataclass
class Packing:
    position_ids: torch.Tensor   # [b, s] long
    mask: torch.Tensor           # [b, 1, s, s] bool, True = attend

    def rope(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables [S, 1, 1, r] -> each token's angles [s, b, 1, r] at its position within its sample."""
        pos = self.position_ids.t().to(cos.device)                              # [s, b]
        return cos[pos, 0], sin[pos, 0]

    def to(self, device) -> "Packing":
        return Packing(self.position_ids.to(device), self.mask.to(device))


def position_ids_of(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] segment numbers -> [b, s] index of each token within its run of equal segment ids."""
    b, s = segment_ids.shape
    idx = torch.arange(s, device=segment_ids.device).expand(b, s)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values     # start of each token's run
    return idx - first


def packing_of(segment_ids: torch.Tensor) -> Packing:
    """The positions and the block-diagonal causal mask of rows of packed samples [b, s]."""
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()           # [s, s]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]                                # [b, s, s]
    return Packing(position_ids_of(segment_ids), (same & causal)[:, None])
