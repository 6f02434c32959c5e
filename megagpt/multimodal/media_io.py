"""Media files in and out: 8x8 grayscale PNG images and 16-bit PCM mono WAV audio at spec.SAMPLE_RATE.

The loaders return the tensors of the contract (spec.py): an image float32 [1, 8, 8] in [0, 1], a clip
float32 [n] in [-1, 1]. Every bad file is refused before any work starts, as one line naming the file and
what was expected (MediaError, a DataError, so the tools print it as `error: ...`): a missing file, a file
that is not a PNG / WAV, an image of the wrong size or mode, audio at another sample rate, stereo, not
16-bit, or too short to make one audio token. PNG goes through Pillow, WAV through the stdlib `wave`.
"""
from __future__ import annotations

import os
import wave

import numpy as np
import torch

from ..data.indexed import DataError
from .spec import IMAGE_CHANNELS, IMAGE_SIZE, MIN_AUDIO_SAMPLES, SAMPLE_RATE

IMAGE_EXPECTED = f"an {IMAGE_SIZE}x{IMAGE_SIZE} grayscale PNG (mode 'L')"
AUDIO_EXPECTED = f"a 16-bit PCM mono WAV at {SAMPLE_RATE} Hz"


class MediaError(DataError):
    """A media file is missing or not what the adapters take. One line, naming the file."""


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise MediaError("images need Pillow (pip install pillow)") from None
    return Image


def _exists(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise MediaError(f"{path}: {what} file not found")


def image_to_float(pixels: np.ndarray) -> torch.Tensor:
    """uint8 0..255 [..., 1, 8, 8] -> float32 in [0, 1]: the one conversion (files and the dataset)."""
    return torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255.0)


def read_image_pixels(path: str) -> np.ndarray:
    """The checked pixels of an image file: uint8 [1, 8, 8]."""
    path = str(path)
    _exists(path, "image")
    Image = _pillow()
    try:
        with Image.open(path) as img:
            fmt, mode, size = img.format, img.mode, img.size
            if fmt != "PNG":
                raise MediaError(f"{path}: a {fmt} image; expected {IMAGE_EXPECTED}")
            if mode != "L":
                raise MediaError(f"{path}: image mode {mode!r}; expected {IMAGE_EXPECTED}")
            if size != (IMAGE_SIZE, IMAGE_SIZE):
                raise MediaError(f"{path}: image of {size[0]}x{size[1]} pixels; expected {IMAGE_EXPECTED}")
            pixels = np.asarray(img, dtype=np.uint8)
    except MediaError:
        raise
    except Exception as e:       # Pillow: UnidentifiedImageError, OSError on truncated data, ...
        raise MediaError(f"{path}: not a readable image ({type(e).__name__}); expected {IMAGE_EXPECTED}") from None
    return pixels.reshape(IMAGE_CHANNELS, IMAGE_SIZE, IMAGE_SIZE)


def load_image(path: str) -> torch.Tensor:
    """An 8x8 grayscale PNG -> float32 [1, 8, 8] in [0, 1]."""
    return image_to_float(read_image_pixels(path))


def save_image(path: str, pixels: np.ndarray) -> None:
    """uint8 [8, 8] (or [1, 8, 8]) -> an 8-bit grayscale PNG."""
    pixels = np.asarray(pixels, dtype=np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)
    _pillow().fromarray(pixels, mode="L").save(path, format="PNG")


def load_audio(path: str) -> torch.Tensor:
    """A 16-bit PCM mono WAV at SAMPLE_RATE Hz -> float32 [n] in [-1, 1], n >= MIN_AUDIO_SAMPLES."""
    path = str(path)
    _exists(path, "audio")
    try:
        with wave.open(path, "rb") as w:
            channels, width, rate, frames = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(frames)
    except (wave.Error, EOFError) as e:
        raise MediaError(f"{path}: not a PCM WAV file ({e or type(e).__name__}); expected {AUDIO_EXPECTED}") from None
    if channels != 1:
        raise MediaError(f"{path}: {channels} channels{' (stereo)' if channels == 2 else ''}; "
                         f"expected {AUDIO_EXPECTED}")
    if width != 2:
        raise MediaError(f"{path}: {8 * width}-bit samples; expected {AUDIO_EXPECTED}")
    if rate != SAMPLE_RATE:
        raise MediaError(f"{path}: sample rate {rate} Hz is not supported; expected {AUDIO_EXPECTED} "
                         "(resample it first)")
    if len(raw) != 2 * frames:
        raise MediaError(f"{path}: truncated ({len(raw) // 2} of the {frames} samples its header says)")
    if frames < MIN_AUDIO_SAMPLES:
        raise MediaError(f"{path}: {frames} samples ({1000 * frames / SAMPLE_RATE:.0f} ms) is too short; expected "
                         f"at least {MIN_AUDIO_SAMPLES} ({1000 * MIN_AUDIO_SAMPLES / SAMPLE_RATE:.0f} ms), one audio token")
    return torch.from_numpy(np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0)


def save_audio(path: str, clip: np.ndarray) -> None:
    """float [n] in [-1, 1] -> a 16-bit PCM mono WAV at SAMPLE_RATE (clipped, rounded)."""
    pcm = np.clip(np.round(np.asarray(clip, dtype=np.float64) * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
