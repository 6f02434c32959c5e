"""Waveform -> log-mel spectrogram with torch.stft (no audio library): the audio adapter's front end."""
from __future__ import annotations

import math

import torch

from .spec import HOP, N_FFT, N_MELS, SAMPLE_RATE


def _hz_to_mel(f):
    return 2595.0 * math.log10(1.0 + f / 700.0)


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Triangular HTK-mel filters [n_mels, n_fft // 2 + 1], each peaking at 1."""
    top = _hz_to_mel(sample_rate / 2)
    mel_pts = torch.linspace(0.0, top, n_mels + 2, dtype=torch.float64)
    hz_pts = 700.0 * (10 ** (mel_pts / 2595.0) - 1.0)                         # [n_mels + 2]
    bins = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lo, mid, hi = hz_pts[:-2, None], hz_pts[1:-1, None], hz_pts[2:, None]
    up = (bins[None] - lo) / (mid - lo)
    down = (hi - bins[None]) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0).float()


def log_mel(wave: torch.Tensor) -> torch.Tensor:
    """wave [n] float32 at SAMPLE_RATE -> [mel_frames(n), N_MELS] log power (natural log, floor 1e-6)."""
    window = torch.hann_window(N_FFT, device=wave.device, dtype=wave.dtype)
    spec = torch.stft(wave, N_FFT, HOP, window=window, center=False, return_complex=True)  # [n_fft/2+1, frames]
    power = spec.abs() ** 2
    mels = mel_filterbank().to(wave.device, wave.dtype) @ power                          # [n_mels, frames]
    return torch.log(mels + 1e-6).t()                                                    # [frames, n_mels]
