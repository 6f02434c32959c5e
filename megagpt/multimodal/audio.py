"""The audio adapter: a waveform -> audio_token_count(n) embeddings of the decoder's hidden size.

    wave [n] at SAMPLE_RATE -> log-mel [T, N_MELS] (mel.py) -> LayerNorm over the mels (per frame)
    -> SUBSAMPLE_LAYERS x (Conv1d kernel 3, stride 2, no padding, GELU): [T', d], 40 ms a token
    -> MLP projector (d -> h -> h) [T', h]

Each clip is processed alone (no padding, no batch statistics), so its embeddings depend on that
clip only: any grouping of the clips into microbatches gives the same ones. The decoder gives the
tokens their order (RoPE positions); the convolutions see about 100 ms around each token.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mel import log_mel
from .spec import N_MELS, SUBSAMPLE_KERNEL, SUBSAMPLE_LAYERS, SUBSAMPLE_STRIDE, audio_token_count


class AudioAdapter(nn.Module):
    def __init__(self, hidden: int, d: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.in_norm = nn.LayerNorm(N_MELS, **kw)
        self.convs = nn.ModuleList(nn.Conv1d(N_MELS if i == 0 else d, d, SUBSAMPLE_KERNEL, SUBSAMPLE_STRIDE, **kw)
                                   for i in range(SUBSAMPLE_LAYERS))
        self.project = nn.Sequential(nn.Linear(d, hidden, **kw), nn.GELU(), nn.Linear(hidden, hidden, **kw))

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """wave [n] float32 -> [audio_token_count(n), hidden]."""
        mel = log_mel(wave.float()).to(self.in_norm.weight.dtype)     # [T, n_mels], the front end in fp32
        x = self.in_norm(mel).t()[None]                                # [1, n_mels, T]
        for conv in self.convs:
            x = F.gelu(conv(x))                                        # [1, d, T']
        out = self.project(x[0].t())                                   # [T', h]
        assert out.shape[0] == audio_token_count(wave.shape[0])        # spec.py's count is the truth
        return out

    def forward(self, clips: list[torch.Tensor]) -> torch.Tensor:
        """clips: [n_i] each -> [sum_i audio_token_count(n_i), hidden], in clip order."""
        return torch.cat([self.encode(w) for w in clips])
