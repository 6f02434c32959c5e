"""Training rows of multimodal samples: tokens, labels and segment ids [s] plus the media of the row.

Packing is align/sft_data.py's (`pack`: consecutive samples while they fit, or one per row with packed=False;
the rest of a row is padding, segment 0, label IGNORE_INDEX), so each sample sees only itself.

A sample longer than seq_len is cut, but never inside a placeholder run: the cut moves back to the start of
the run it would split, and the media whose runs fall after the cut leave the row with them (a row's
placeholders and its media always match). A sample that opens with a run longer than seq_len would keep
nothing: it is refused in one line when the rows are made (raise seq_len or shorten the clip).

`make_batch` gives tokens, labels, segment_ids [b, s] and a spec.Media with the rows' media in the order of
their placeholder runs, row-major: row 0's first sample's runs, its next sample's, ..., then row 1's.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..align.sft_data import pack
from ..data.indexed import DataError
from ..model.packing import IGNORE_INDEX
from .dataset import IMAGE_SHAPE, MultimodalDataset
from .media_io import image_to_float
from .spec import IMAGE_TOKENS, Media, audio_token_count


class Row(NamedTuple):
    tokens: np.ndarray          # [s] int64
    labels: np.ndarray          # [s] int64
    segments: np.ndarray        # [s] int64, 1, 2, ... per sample, 0 = padding
    images: np.ndarray          # uint8 [k, 1, 8, 8]
    audio: list                 # float32 clips


def kept_length(inputs: np.ndarray, seq_len: int, placeholder_ids, where: str) -> int:
    """How many of a sample's inputs go in a row: all that fit in seq_len, moved back to the start of a
    placeholder run the cut would split."""
    n = len(inputs)
    if n <= seq_len:
        return n
    cut, first_dropped = seq_len, inputs[seq_len]
    if first_dropped in placeholder_ids:
        while cut > 0 and inputs[cut - 1] == first_dropped:
            cut -= 1
    if cut == 0:
        run = int(np.argmin(inputs == first_dropped)) or n
        raise DataError(f"{where}: opens with a run of {run} placeholder ids, more than seq_len {seq_len}; "
                        "raise seq_len or shorten the medium")
    return cut


def media_before(inputs: np.ndarray, images: np.ndarray, audio: list, image_id: int, audio_id: int):
    """The media whose runs lie in `inputs` (a prefix of a sample that cuts no run)."""
    n_img = int((inputs == image_id).sum()) // IMAGE_TOKENS
    budget, n_aud = int((inputs == audio_id).sum()), 0
    while n_aud < len(audio) and audio_token_count(len(audio[n_aud])) <= budget:
        budget -= audio_token_count(len(audio[n_aud]))
        n_aud += 1
    return images[:n_img], audio[:n_aud]


class MultimodalRows:
    """Row r -> Row of the samples `pack` put in it; rows cycle."""

    def __init__(self, data: MultimodalDataset, seq_len: int, packed: bool = True):
        self.data, self.seq_len = data, seq_len
        self.placeholders = (data.image_id, data.audio_id)
        lengths = data.lengths().copy()
        for i in np.flatnonzero(lengths > seq_len):        # reads only the samples that are cut
            lengths[i] = kept_length(data.text.sample(int(i))[0], seq_len, self.placeholders,
                                     f"{data.prefix}: document {i}")
        self.kept = lengths
        self.rows = pack(lengths, seq_len, packed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, r: int) -> Row:
        s = self.seq_len
        tokens, labels, segments = np.zeros(s, np.int64), np.full(s, IGNORE_INDEX, np.int64), np.zeros(s, np.int64)
        images, audio, at = [np.zeros((0, *IMAGE_SHAPE), np.uint8)], [], 0
        for k, i in enumerate(self.rows[r % len(self.rows)], 1):
            x, y, imgs, auds = self.data.sample(i)
            n = int(self.kept[i])
            tokens[at:at + n], labels[at:at + n], segments[at:at + n] = x[:n], y[:n], k
            imgs, auds = media_before(x[:n], imgs, auds, *self.placeholders)
            images.append(imgs)
            audio += auds
            at += n
        return Row(tokens, labels, segments, np.concatenate(images), audio)


def make_batch(rows, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Media]:
    """Rows -> tokens, labels, segment_ids, each [b, s], and the Media of their placeholder runs in order."""
    parts = [rows[i] for i in indices]
    tokens, labels, segments = (torch.from_numpy(np.stack([p[k] for p in parts])) for k in range(3))
    pixels = np.concatenate([p.images for p in parts])                     # [n_img, 1, 8, 8] uint8
    media = Media(image_to_float(pixels) if len(pixels) else None,
                  [torch.from_numpy(np.array(a, np.float32)) for p in parts for a in p.audio])
    return tokens, labels, segments, media


class TextPlusMediaRows:
    """Global batch k = the k-th `text_per_step` rows of `text` plus the k-th `media_per_step` rows of `media`
    (both rows objects; media may be None), each source in its own seeded order (media re-shuffled on each
    pass over it). With media=None it is the text-alone stream of the same seed, batch for batch: a model
    trained on both differs only by the media rows added to each step (the text rows, their order and the
    step count are the same). len() is one pass over the text; indices past it wrap, as rows do."""

    def __init__(self, text, media, text_per_step: int, media_per_step: int = 0, seed: int = 0):
        if text_per_step < 1 or (media is not None) != (media_per_step > 0):
            raise ValueError(f"rows: text_per_step {text_per_step} must be >= 1, and media_per_step "
                             f"{media_per_step} > 0 exactly when there are media rows")
        self.text, self.media, self.seed = text, media, seed
        self.t, self.m = text_per_step, media_per_step if media is not None else 0
        self.text_order = np.random.default_rng([seed, 0]).permutation(len(text))
        self._media_orders: dict[int, np.ndarray] = {}
        self.steps = len(text) // text_per_step                # one pass, whole steps only

    @property
    def global_batch(self) -> int:
        return self.t + self.m

    def __len__(self) -> int:
        return self.steps * self.global_batch

    def _media_row(self, j: int) -> int:
        n = len(self.media)
        p = j // n
        if p not in self._media_orders:
            self._media_orders[p] = np.random.default_rng([self.seed, 1, p]).permutation(n)
        return int(self._media_orders[p][j % n])

    def __getitem__(self, i: int) -> Row:
        k, j = divmod(i % len(self), self.global_batch)
        if j < self.t:
            return self.text[int(self.text_order[k * self.t + j])]
        return self.media[self._media_row(k * self.m + j - self.t)]
