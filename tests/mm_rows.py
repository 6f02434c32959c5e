"""A small in-memory multimodal rows object for the tests: text-only, image and audio samples mixed."""
from __future__ import annotations

import torch

from megagpt.model.packing import IGNORE_INDEX
from megagpt.multimodal.spec import IMAGE_TOKENS, Media, audio_token_count

TEXT_VOCAB, IMAGE_ID, AUDIO_ID = 60, 60, 61
VOCAB = 62


class MixedRows:
    """Sample i: text only (i % 3 == 0), text around an image (1) or an audio clip (2); one sample a row,
    padded to seq (segment 0, no loss). batch(indices) -> tokens, labels, segment ids [b, s], Media."""

    def __init__(self, n: int, seq: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.seq, self.samples = seq, []
        for i in range(n):
            head = torch.randint(0, TEXT_VOCAB, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
            tail = torch.randint(0, TEXT_VOCAB, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
            kind, medium, mid = i % 3, None, []
            if kind == 1:
                medium = torch.rand(1, 8, 8, generator=g)
                mid = [IMAGE_ID] * IMAGE_TOKENS
            elif kind == 2:
                n_samples = int(torch.randint(900, 2600, (1,), generator=g))
                medium = (torch.rand(n_samples, generator=g) - 0.5) * 0.5
                mid = [AUDIO_ID] * audio_token_count(n_samples)
            ids = (head + mid + tail)[: seq + 1]
            self.samples.append((ids, kind, medium))

    def __len__(self):
        return len(self.samples)

    def batch(self, indices):
        b, s = len(indices), self.seq
        tokens = torch.zeros(b, s, dtype=torch.long)
        labels = torch.full((b, s), IGNORE_INDEX, dtype=torch.long)
        seg = torch.zeros(b, s, dtype=torch.long)
        images, audio = [], []
        for r, i in enumerate(indices):
            ids, kind, medium = self.samples[i]
            n = len(ids) - 1
            tokens[r, :n], labels[r, :n], seg[r, :n] = torch.tensor(ids[:-1]), torch.tensor(ids[1:]), 1
            if kind == 1:
                images.append(medium)
            elif kind == 2:
                audio.append(medium)
        return tokens, labels, seg, Media(torch.stack(images) if images else None, audio)
