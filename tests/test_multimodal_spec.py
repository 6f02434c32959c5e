"""The media contract: token counts equal what the front end and valid convolutions really yield."""
import pytest
import torch

from megagpt.multimodal.mel import log_mel, mel_filterbank
from megagpt.multimodal.spec import (MIN_AUDIO_SAMPLES, N_MELS, SUBSAMPLE_KERNEL, SUBSAMPLE_LAYERS,
                                     SUBSAMPLE_STRIDE, audio_token_count, mel_frames)


@pytest.mark.parametrize("n", [MIN_AUDIO_SAMPLES, MIN_AUDIO_SAMPLES + 79, 4001, 8000, 12345])
def test_audio_token_count_is_what_the_convs_yield(n):
    mel = log_mel(torch.randn(n))                                   # [frames, n_mels]
    assert mel.shape == (mel_frames(n), N_MELS)
    x = mel.t()[None]
    for _ in range(SUBSAMPLE_LAYERS):
        x = torch.nn.Conv1d(x.shape[1], 4, SUBSAMPLE_KERNEL, SUBSAMPLE_STRIDE)(x)
    assert x.shape[-1] == audio_token_count(n) >= 1


def test_too_short_clip_is_one_line():
    with pytest.raises(ValueError, match="shorter than") as e:
        audio_token_count(MIN_AUDIO_SAMPLES - 1)
    assert "\n" not in str(e.value)


def test_mel_of_a_tone_peaks_at_its_band():
    t = torch.arange(8000) / 8000
    mel = log_mel(torch.sin(2 * torch.pi * 1209 * t))              # a DTMF column tone
    band = int(mel.mean(0).argmax())
    centre = mel_filterbank()[band].argmax() * 8000 / 256           # bin -> Hz
    assert abs(float(centre) - 1209) < 120


def test_min_audio_samples_is_tight():
    """One sample less and the valid convolutions have nothing left to yield."""
    x = log_mel(torch.randn(MIN_AUDIO_SAMPLES - 1)).t()[None]
    with pytest.raises(RuntimeError):
        for _ in range(SUBSAMPLE_LAYERS):
            x = torch.nn.Conv1d(x.shape[1], 4, SUBSAMPLE_KERNEL, SUBSAMPLE_STRIDE)(x)
