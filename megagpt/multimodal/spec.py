"""The contract between media data and the adapters: placeholder tokens, media formats, token counts.

Placeholders. `<image>` and `<audio>` are special tokens added to an existing tokenizer
(`add_media_tokens`; new ids after its vocab, so the embedding grows to fit, as with the chat
tokens of align/chat.py). In a token stream one medium is a run of consecutive placeholder ids, as
many as its adapter yields embeddings: IMAGE_TOKENS for an image, `audio_token_count(n)` for a clip
of n samples. In a JSONL record the text "<image>" stands for one whole medium; preprocessing
expands it to its run. Placeholder positions carry no loss (label IGNORE_INDEX).

Media, after loading and checking (bad files are refused in one line by the loaders):
  image  float32 [IMAGE_CHANNELS, IMAGE_SIZE, IMAGE_SIZE] in [0, 1]: an 8x8 grayscale picture
         (scikit-learn's digits, whose 0..16 levels are stored as 8-bit PNG 'L' mode, 0..255)
  audio  float32 [n] mono waveform at SAMPLE_RATE Hz in [-1, 1], n >= MIN_AUDIO_SAMPLES

A microbatch's media (`Media`) lists them in the order their runs appear in the tokens, row-major
over [b, s]. The adapter's output for a medium depends on that medium only (never on padding or on
the other media of the batch), so every layout, which groups samples differently, gives the same
embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

IMAGE_TOKEN, AUDIO_TOKEN = "<image>", "<audio>"
MEDIA_TOKENS = (IMAGE_TOKEN, AUDIO_TOKEN)

IMAGE_CHANNELS, IMAGE_SIZE = 1, 8
IMAGE_PATCH = 2                                    # the vision stem's stride: 8x8 -> a 4x4 grid of tokens
IMAGE_TOKENS = (IMAGE_SIZE // IMAGE_PATCH) ** 2    # 16 embeddings per image

SAMPLE_RATE = 8000                                 # Hz: telephone audio, DTMF's home
N_FFT, HOP, N_MELS = 256, 80, 40                   # 32 ms window, 10 ms hop, no centre padding
SUBSAMPLE_KERNEL, SUBSAMPLE_STRIDE, SUBSAMPLE_LAYERS = 3, 2, 2   # two stride-2 convs, no padding: 40 ms a token
# the shortest clip that yields one token: frames that survive the valid convs, back through the stft
MIN_MEL_FRAMES = 1 + (SUBSAMPLE_KERNEL - 1) * sum(SUBSAMPLE_STRIDE ** i for i in range(SUBSAMPLE_LAYERS))
MIN_AUDIO_SAMPLES = N_FFT + HOP * (MIN_MEL_FRAMES - 1)


def mel_frames(num_samples: int) -> int:
    """log-mel frames of a clip (torch.stft, center=False)."""
    return 1 + (num_samples - N_FFT) // HOP


def audio_token_count(num_samples: int) -> int:
    """Embeddings the audio adapter yields for a clip: mel frames through the valid convs."""
    if num_samples < MIN_AUDIO_SAMPLES:
        raise ValueError(f"audio: a clip of {num_samples} samples is shorter than the {MIN_AUDIO_SAMPLES} "
                         f"({MIN_AUDIO_SAMPLES / SAMPLE_RATE * 1000:.0f} ms at {SAMPLE_RATE} Hz) that make one token")
    n = mel_frames(num_samples)
    for _ in range(SUBSAMPLE_LAYERS):
        n = (n - SUBSAMPLE_KERNEL) // SUBSAMPLE_STRIDE + 1
    return n


@dataclass
class Media:
    """The media of one microbatch, in the order of their placeholder runs (row-major over [b, s])."""
    images: torch.Tensor | None = None                       # [n_img, C, H, W] float32
    audio: list[torch.Tensor] = field(default_factory=list)  # n_aud clips, each [n_i] float32

    def to(self, device) -> "Media":
        return Media(None if self.images is None else self.images.to(device), [a.to(device) for a in self.audio])

    def placeholder_counts(self) -> tuple[int, int]:
        """(image placeholder ids, audio placeholder ids) these media fill."""
        n_img = 0 if self.images is None else self.images.shape[0]
        return n_img * IMAGE_TOKENS, sum(audio_token_count(a.shape[0]) for a in self.audio)


def add_media_tokens(tokenizer):
    """The tokenizer with <image> and <audio> added (a no-op for one that has them)."""
    return tokenizer.with_special_tokens(MEDIA_TOKENS)
