"""The adapters on the decoder's first pipeline stage, and how their embeddings enter the sequence.

One sequence, one model: the first stage embeds the tokens as usual, then the rows of the `<image>` and
`<audio>` placeholder ids are replaced by the adapters' embeddings of the microbatch's `spec.Media`
(row-major over [b, s], the order the media are listed in). Everything after is the plain decoder.

Tensor parallelism: the adapters are REPLICATED over TP (they are small). Every TP rank encodes all the
microbatch's media and keeps the rows of its own activation: all of them without sequence parallelism
(its gradient then arrives whole on every rank: nothing to reduce), its s/tp rows with SP, where each
rank's gradient is partial, so every adapter parameter carries ParamMeta.sequence_parallel and
optim/finalize.py sums it over TP, as it does for the norms. Context parallelism: refused with media
(the zigzag cut would need the global order of the placeholders); pipeline: only the first stage has
the adapters (its microbatch kwargs carry the media, as `packing` travels). Data parallelism: the
usual gradient buckets; an adapter without media in a microbatch still joins backward with a zero
gradient (`_touch`), so every DP rank's buckets fill and launch in the same order.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn

from ..parallel.layers import REPLICATED, ParamMeta
from .audio import AudioAdapter
from .spec import Media
from .vision import VisionAdapter


def build_adapters(m, sequence_parallel: bool, device=None, dtype=None) -> dict[str, nn.Module]:
    """{"vision": ..., "audio": ...} for the placeholder ids the config sets (model.image_token_id,
    model.audio_token_id); every parameter gets its ParamMeta (replicated over TP)."""
    out = {}
    if m.image_token_id is not None:
        out["vision"] = VisionAdapter(m.hidden_size, m.adapter_hidden, m.adapter_layers, device, dtype)
    if m.audio_token_id is not None:
        out["audio"] = AudioAdapter(m.hidden_size, m.adapter_hidden, device, dtype)
    for module in out.values():
        for p in module.parameters():
            p.meta = ParamMeta(tuple(p.shape), REPLICATED, sequence_parallel)
    return out


ADAPTERS = ("vision", "audio")
# adapter weights whose input comes out of a GELU (see vision.py, audio.py): He gain sqrt(2) keeps their scale
_AFTER_GELU = re.compile(r"(audio\.convs\.[1-9]\d*|vision\.stem2|audio\.project\.0|project\.2|blocks\.\d+\.fc2)\.weight$")


def adapter_init_std(name: str, shape: tuple, init_std: float) -> float | None:
    """The init std of an adapter weight matrix / conv kernel `name` (None: not one; the decoder's rule).

    Fan-in init (std gain / sqrt(fan_in), gain sqrt(2) after a GELU), not the decoder's fixed init_std:
    the audio stack has no norm between its convs and projector, so at std 0.02 every layer shrinks its
    input ~3-6x and the clip's embeddings start ~70x below the token embeddings' scale (its time-varying
    part ~300x), which the adapter has to climb out of by luck of the seed. The projector's last layer is
    scaled by init_std: the media embeddings start at the token embeddings' rms."""
    if name.split(".")[0] not in ADAPTERS or not name.endswith(".weight") or len(shape) < 2:
        return None
    fan_in = math.prod(shape[1:])                                   # Linear [out, in], Conv1d [out, in, k]
    std = (math.sqrt(2.0) if _AFTER_GELU.search(name) else 1.0) / math.sqrt(fan_in)
    return std * init_std if name.endswith("project.2.weight") else std


def adapter_param_numels(m) -> list[int]:
    """Sizes of the adapters' parameters in registration order (vision, then audio): config's counts."""
    return [p.numel() for a in build_adapters(m, False, device="meta").values() for p in a.parameters()]


def is_placeholder(m, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s] bool: the positions that hold a media placeholder id."""
    out = torch.zeros_like(tokens, dtype=torch.bool)
    for tid in (m.image_token_id, m.audio_token_id):
        if tid is not None:
            out |= tokens == tid
    return out


def check_counts(m, tokens: torch.Tensor, media: Media | None) -> tuple[int, int]:
    """The (image, audio) placeholder counts of tokens [b, s], refused in one line unless the media fill them."""
    have = tuple(int((tokens == tid).sum()) if tid is not None else 0 for tid in (m.image_token_id, m.audio_token_id))
    want = media.placeholder_counts() if media is not None else (0, 0)
    for kind, h, w in zip(("image", "audio"), have, want):
        if h != w:
            raise ValueError(f"media: the tokens hold {h} <{kind}> placeholders but the media fill {w} "
                             f"({'more' if h > w else 'fewer'} placeholders than media)")
    return have


def _touch(module: nn.Module) -> torch.Tensor:
    """0 with a zero gradient to every parameter: the adapter takes part in backward without media."""
    return sum(p.reshape(-1)[:1].sum() for p in module.parameters()) * 0.0


def merge_media(model, tokens: torch.Tensor, x: torch.Tensor, media: Media | None) -> torch.Tensor:
    """tokens [b, s], x = their embeddings [s(/tp), b, h] -> x with the placeholder rows replaced by the media's."""
    m = model.cfg
    n_img, n_aud = check_counts(m, tokens, media)
    if (n_img or n_aud) and model.ps.cp.size > 1:
        raise ValueError(f"media: images and audio are not supported with parallel.cp={model.ps.cp.size} > 1 "
                         f"(the placeholders' order is not kept by the zigzag cut)")
    grad = torch.is_grad_enabled() and model.training
    b, s = tokens.shape
    parts = []                                                           # (mask [b, s], embeddings [k, h])
    for name, tid, n in (("vision", m.image_token_id, n_img), ("audio", m.audio_token_id, n_aud)):
        adapter = getattr(model, name, None)
        if adapter is None:
            continue
        if n:
            src = media.images if name == "vision" else media.audio
            parts.append((tokens == tid, adapter(src).reshape(-1, x.shape[-1])))
        elif grad and any(p.requires_grad for p in adapter.parameters()):
            x = x + _touch(adapter).to(x.dtype)
    if not parts:
        return x
    full = torch.zeros(b, s, x.shape[-1], dtype=x.dtype, device=x.device)
    sel = torch.zeros(b, s, dtype=torch.bool, device=x.device)
    for mask, emb in parts:
        full = full.masked_scatter(mask[..., None], emb.to(x.dtype))      # row-major: the media's order
        sel |= mask
    full, sel = full.transpose(0, 1), sel.t()                            # [s, b, h], [s, b]
    if model.sp:                                                         # this TP rank's rows [s/tp]
        full, sel = full.chunk(model.tp.size)[model.tp.rank], sel.chunk(model.tp.size)[model.tp.rank]
    return torch.where(sel[..., None], full, x)



def freeze_decoder(chunks: list[nn.Module]) -> int:
    """train.freeze_lm: every parameter outside the adapters stops requiring a gradient, so the optimizer
    (which takes the trainable ones only) gives it no grad buffer and no state. Returns how many were frozen."""
    n = 0
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if name.split(".")[0] not in ADAPTERS:
                p.requires_grad_(False)
                n += 1
    return n
