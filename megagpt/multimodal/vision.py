"""The vision adapter: an 8x8 image -> IMAGE_TOKENS embeddings of the decoder's hidden size.

    image [n, 1, 8, 8] -> 2x2 patches [n, 16, 4] -> linear patch embedding + learned positions [n, 16, d]
    -> `layers` pre-norm ViT blocks (bidirectional attention within one image) -> LayerNorm
    -> MLP projector (d -> h -> h) [n, 16, h]

Every image is encoded on its own (attention never crosses images, no batch statistics), so its
embeddings do not depend on the other images of the batch: every layout gives the same ones.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .spec import IMAGE_CHANNELS, IMAGE_PATCH, IMAGE_SIZE, IMAGE_TOKENS

HEADS = 4                                      # the encoder's attention heads (adapter_hidden % HEADS == 0)


class ViTBlock(nn.Module):
    def __init__(self, d: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm1, self.norm2 = nn.LayerNorm(d, **kw), nn.LayerNorm(d, **kw)
        self.qkv, self.out = nn.Linear(d, 3 * d, **kw), nn.Linear(d, d, **kw)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d, **kw), nn.Linear(2 * d, d, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:              # [n, t, d]
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)  # [n, H, t, d/H]
        a = F.scaled_dot_product_attention(q, k, v)                   # bidirectional, within the image
        x = x + self.out(a.transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisionAdapter(nn.Module):
    def __init__(self, hidden: int, d: int, layers: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.patch = nn.Linear(IMAGE_CHANNELS * IMAGE_PATCH ** 2, d, **kw)
        self.pos = nn.Parameter(torch.empty(IMAGE_TOKENS, d, **kw))
        self.blocks = nn.ModuleList(ViTBlock(d, **kw) for _ in range(layers))
        self.norm = nn.LayerNorm(d, **kw)
        self.project = nn.Sequential(nn.Linear(d, hidden, **kw), nn.GELU(), nn.Linear(hidden, hidden, **kw))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [n, C, H, W] float in [0, 1] -> [n, IMAGE_TOKENS, hidden]."""
        n, p = images.shape[0], IMAGE_PATCH
        g = IMAGE_SIZE // p
        patches = images.reshape(n, IMAGE_CHANNELS, g, p, g, p).permute(0, 2, 4, 1, 3, 5)  # [n, g, g, C, p, p]
        x = self.patch(patches.reshape(n, g * g, -1).to(self.pos.dtype)) + self.pos       # [n, 16, d]
        for block in self.blocks:
            x = block(x)
        return self.project(self.norm(x))                                                  # [n, 16, h]
