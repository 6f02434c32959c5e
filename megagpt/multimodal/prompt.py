"""A prompt with media for generation and serving: text with "<image>"/"<audio>" and the files they stand for.

The files go through the loaders (media_io.py: one-line MediaError for a missing file, a wrong shape or
mode, an unsupported sample rate) and the text through the dataset's encoder (dataset.encode_with_media:
each placeholder becomes the run the model was trained on; placeholders that do not match the media
given are refused in one line), before any model work.
"""
from __future__ import annotations

import torch

from .dataset import encode_with_media, media_token_ids
from .media_io import load_audio, load_image
from .spec import Media


def check_model_ids(cfg, tok) -> None:
    """The model's adapters and the tokenizer's <image>/<audio> ids agree (one line otherwise)."""
    image_id, audio_id = media_token_ids(tok)
    for field, want in (("image_token_id", image_id), ("audio_token_id", audio_id)):
        have = getattr(cfg, field)
        if have is not None and have != want:
            raise ValueError(f"model.{field}: {have}, but the tokenizer's id is {want} (a different tokenizer?)")


def load_media(images=(), audio=()) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The checked tensors of media files: images [1, 8, 8] and clips [n_i] (call it before loading a model)."""
    return [load_image(p) for p in images], [load_audio(p) for p in audio]


def media_prompt(tok, cfg, text: str, pics=(), clips=(), where: str = "prompt") -> tuple[list[int], Media | None]:
    """(prompt ids with the placeholder runs, their Media or None) from text and loaded media (load_media)."""
    pics, clips = list(pics), list(clips)
    if not pics and not clips and "<image>" not in text and "<audio>" not in text:
        return tok.encode(text), None
    for field, given, kind in (("image_token_id", pics, "images"), ("audio_token_id", clips, "audio")):
        if given and getattr(cfg, field) is None:
            raise ValueError(f"{where}: {kind} given, but this model has no {kind} adapter (model.{field} unset)")
    check_model_ids(cfg, tok)
    ids, _ = encode_with_media(tok, text, len(pics), [c.shape[0] for c in clips], where)
    return ids, Media(torch.stack(pics) if pics else None, clips)


# -- the server's extension field (megagpt/openai_api.py): "media": {"images": [...], "audio": [...]}, each item
#    a file path on the server or {"base64": "<the PNG / WAV file's bytes>"}

def _load_item(item, kind: str, where: str) -> torch.Tensor:
    import base64
    import binascii
    import os
    import tempfile
    loader = load_image if kind == "images" else load_audio
    if isinstance(item, str):
        return loader(item)
    if not (isinstance(item, dict) and set(item) == {"base64"} and isinstance(item["base64"], str)):
        raise ValueError(f"{where}: expected a file path or {{\"base64\": \"...\"}}, got {str(item)[:60]!r}")
    try:
        data = base64.b64decode(item["base64"], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: base64 content that does not decode") from None
    fd, path = tempfile.mkstemp(suffix=".png" if kind == "images" else ".wav")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return loader(path)
    except ValueError as e:                                   # MediaError names the temp file: name the field
        raise ValueError(f"{where}: {str(e).split(': ', 1)[-1]}") from None
    finally:
        os.remove(path)


def request_media(field, tok, cfg, text: str) -> tuple[list[int], dict]:
    """(prompt ids, the media as JSON for the ranks' command) from a request's "media" field and prompt."""
    if not isinstance(field, dict) or not set(field) <= {"images", "audio"} or \
            not all(isinstance(v, list) for v in field.values()):
        raise ValueError('media: expected {"images": [...], "audio": [...]} (file paths or {"base64": ...})')
    loaded = {k: [_load_item(x, k, f"media.{k}[{i}]") for i, x in enumerate(field.get(k, []))]
              for k in ("images", "audio")}
    ids, media = media_prompt(tok, cfg, text, loaded["images"], loaded["audio"], where="prompt")
    return ids, media_to_json(media)


def media_to_json(media: Media | None) -> dict | None:
    if media is None:
        return None
    return {"images": media.images.tolist() if media.images is not None else None,
            "audio": [a.tolist() for a in media.audio]}


def media_from_json(d: dict | None) -> Media | None:
    if d is None:
        return None
    return Media(torch.tensor(d["images"], dtype=torch.float32) if d["images"] is not None else None,
                 [torch.tensor(a, dtype=torch.float32) for a in d["audio"]])
