"""The adapters in a Hugging Face export: the one home of their names, file and config key.

An export of a multimodal model (tools/convert_checkpoint.py --to hf) is the language model as a plain
Llama directory (config.json + model*.safetensors: `transformers` loads it as LlamaForCausalLM and never
sees the adapters) plus:

  adapters.safetensors   every adapter parameter as its global tensor under its megagpt name
                         (vision.stem1.weight, vision.blocks.0.qkv.weight, ..., audio.convs.0.weight, ...),
                         in the export's dtype; header metadata {"format": "pt", "megagpt_multimodal": JSON}
  config.json            gains "megagpt_multimodal": {image_token_id, audio_token_id, adapter_hidden,
                         adapter_layers, and the media contract of spec.py (image size, stem stride, tokens
                         per image, sample rate, n_fft, hop, n_mels, subsampling)}; transformers ignores
                         the key. megagpt's import (--to megagpt) reads the key and the file back.
The adapters' modules are multimodal/vision.py and audio.py: the names say which tensor is which.
"""
from __future__ import annotations

import json
import os

import torch

from . import spec
from .adapters import ADAPTERS, build_adapters

ADAPTERS_FILE = "adapters.safetensors"
HF_KEY = "megagpt_multimodal"
FIELDS = ("image_token_id", "audio_token_id", "adapter_hidden", "adapter_layers")


def is_adapter(name: str) -> bool:
    return name.split(".")[0] in ADAPTERS


def adapter_names(cfg) -> list[str]:
    """The adapters' parameter names in module order (GPTModel registers them first)."""
    return [f"{k}.{n}" for k, a in build_adapters(cfg, False, device="meta").items() for n, _ in a.named_parameters()]


def hf_multimodal(cfg) -> dict | None:
    """config.json's HF_KEY entry, or None for a text-only model."""
    if cfg.image_token_id is None and cfg.audio_token_id is None:
        return None
    contract = dict(image_size=spec.IMAGE_SIZE, image_channels=spec.IMAGE_CHANNELS, image_patch=spec.IMAGE_PATCH,
                    image_tokens=spec.IMAGE_TOKENS, sample_rate=spec.SAMPLE_RATE, n_fft=spec.N_FFT, hop=spec.HOP,
                    n_mels=spec.N_MELS, subsample=[spec.SUBSAMPLE_KERNEL, spec.SUBSAMPLE_STRIDE, spec.SUBSAMPLE_LAYERS])
    return {**{f: getattr(cfg, f) for f in FIELDS}, "file": ADAPTERS_FILE, "contract": contract}


def multimodal_fields(hf: dict) -> dict:
    """ModelConfig fields from an HF config.json dict ({} for a text-only model)."""
    entry = hf.get(HF_KEY) or {}
    return {f: entry[f] for f in FIELDS if f in entry}


def write_adapters(out_dir: str, cfg, read, shapes: dict, dtype) -> list[str]:
    """adapters.safetensors from read(name, global shape) -> tensor; returns the names written."""
    from ..checkpoint.st_writer import SafetensorsWriter
    names = adapter_names(cfg)
    if not names:
        return []
    meta = {"format": "pt", HF_KEY: json.dumps(hf_multimodal(cfg))}
    w = SafetensorsWriter(os.path.join(out_dir, ADAPTERS_FILE), [(n, dtype, shapes[n]) for n in names], meta)
    for n in names:
        w.write(n, read(n, shapes[n]).to(dtype))
    w.close()
    return names


def read_adapter(hf_dir: str, name: str, shape: tuple) -> torch.Tensor:
    """One adapter tensor of an export, checked against the shape the config gives (one-line errors)."""
    from safetensors import safe_open

    from ..checkpoint.hf import ConversionError
    path = os.path.join(hf_dir, ADAPTERS_FILE)
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: missing (config.json's {HF_KEY} names the adapters' file)")
    with safe_open(path, framework="pt") as f:
        if name not in f.keys():
            raise ConversionError(f"{path}: no tensor {name} (the adapters' config needs it)")
        t = f.get_tensor(name)
    if tuple(t.shape) != tuple(shape):
        raise ConversionError(f"{path}: {name} has shape {tuple(t.shape)}, the config gives {tuple(shape)}")
    return t


@torch.no_grad()
def load_adapters_into(model, hf_dir: str) -> None:
    """Fill a first-stage GPTModel's adapters (replicated: whole on every TP rank) from an export's file."""
    for name, p in model.named_parameters():
        if is_adapter(name):
            p.copy_(read_adapter(hf_dir, name, tuple(p.meta.global_shape)))
