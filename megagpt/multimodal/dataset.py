"""The multimodal indexed dataset: tokens with placeholder runs, a loss mask, and the media in memory-mapped files.

Files of a dataset PREFIX (no pickle anywhere: raw arrays, .npy read with allow_pickle=False, JSON):

    PREFIX.bin/.idx              token ids, one document per record (data/indexed.py IndexedDataset); each
                                 "<image>" of the record is a run of spec.IMAGE_TOKENS <image> ids, each
                                 "<audio>" a run of spec.audio_token_count(n) <audio> ids; then the eod id
    PREFIX_mask.bin/.idx         loss mask, uint8 0/1, the same document sizes (align/sft_data.py's pair):
                                 0 on the prompt and on every placeholder, 1 on the text and the eod
    PREFIX_images.npy            uint8 [n_images, 1, 8, 8], the PNG levels 0..255 (float = level / 255)
    PREFIX_audio.bin             float32 little-endian, every clip's samples concatenated (SAMPLE_RATE Hz)
    PREFIX_audio_offsets.npy     int64 [n_clips + 1]: clip j is audio.bin[off[j]:off[j + 1]]
    PREFIX_media.npy             int64 [n_docs + 1, 2]: document i owns images table[i, 0]:table[i + 1, 0] and
                                 clips table[i, 1]:table[i + 1, 1], in the order of its runs of each kind
    PREFIX.media.json            {"format": "megagpt-multimodal", "version": 1, "num_docs", "num_images",
                                 "num_audio", "audio_samples", "image_token_id", "audio_token_id",
                                 "image_tokens", "sample_rate", "image_shape", "tokenizer_fingerprint"}

The JSON header is written last, so a dataset without it is incomplete. Opening checks that every file is
there and pairs up (documents, counts, sizes, tokenizer fingerprint, the placeholder ids) and that each
document's <image>/<audio> ids are as many as its media fill (one vectorised pass), so more placeholders
than media, or fewer, fail before training starts; reading a document also checks the runs themselves
(image runs a multiple of IMAGE_TOKENS, audio runs the sum of their clips' token counts, in order), the
check preprocessing applies to each record.

A record's sample is inputs = ids[:-1], labels = ids[1:] where mask[1:] is 1, IGNORE_INDEX elsewhere (as in
LLaVA: no label predicts a placeholder; the last placeholder of a run predicts the text after it).
"""
from __future__ import annotations

import json
import os
import re
from typing import NamedTuple

import numpy as np

from ..align.sft_data import SFTDataset, mask_prefix
from ..data.indexed import DataError, IndexedDatasetBuilder, best_dtype
from ..jsonl import iter_records
from .media_io import MediaError, load_audio, read_image_pixels
from .spec import (AUDIO_TOKEN, IMAGE_CHANNELS, IMAGE_SIZE, IMAGE_TOKEN, IMAGE_TOKENS, SAMPLE_RATE,
                   audio_token_count)

FORMAT, VERSION = "megagpt-multimodal", 1
IMAGE_SHAPE = (IMAGE_CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
RECORD_FIELDS = ("text", "prompt", "images", "audio")
HEADER_KEYS = ("num_docs", "num_images", "num_audio", "audio_samples", "image_token_id", "audio_token_id",
               "image_tokens", "sample_rate", "image_shape", "tokenizer_fingerprint")
_MARKER = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(AUDIO_TOKEN)})")


def media_files(prefix: str) -> dict[str, str]:
    return {"header": prefix + ".media.json", "images": prefix + "_images.npy", "audio": prefix + "_audio.bin",
            "audio_offsets": prefix + "_audio_offsets.npy", "table": prefix + "_media.npy"}


def media_token_ids(tokenizer) -> tuple[int, int]:
    """(<image> id, <audio> id) of a tokenizer that has them (spec.add_media_tokens)."""
    ids = tokenizer.token_id(IMAGE_TOKEN), tokenizer.token_id(AUDIO_TOKEN)
    if None in ids:
        raise DataError("tokenizer: has no <image>/<audio> tokens; add them with spec.add_media_tokens")
    return ids


def check_placeholders(where: str, n_images: int, n_audio: int, *texts: str) -> None:
    """One "<image>" per image and one "<audio>" per clip in `texts`, or a one-line DataError."""
    markers = [m for t in texts for m in _MARKER.findall(t)]
    for token, have, what in ((IMAGE_TOKEN, n_images, "images"), (AUDIO_TOKEN, n_audio, "audio clips")):
        found = markers.count(token)
        if found != have:
            raise DataError(f"{where}: {found} {token} placeholder{'s' * (found != 1)} in the text but "
                            f"{have} {what} given; expected one placeholder per medium")


def encode_with_media(tokenizer, text: str, n_images: int, audio_sizes, where: str = "text",
                      loss: int = 1) -> tuple[list[int], list[int]]:
    """`text` -> (ids, mask): each "<image>" becomes a run of IMAGE_TOKENS <image> ids, the k-th "<audio>"
    a run of audio_token_count(audio_sizes[k]) <audio> ids (mask 0), the text between them its tokens (mask
    `loss`). The placeholders must match the media given: n_images images and len(audio_sizes) clips.
    Generation encodes its prompt with it too, so a prompt's runs are those the model was trained on."""
    image_id, audio_id = media_token_ids(tokenizer)
    check_placeholders(where, n_images, len(audio_sizes), text)
    ids, mask, clips = [], [], iter(audio_sizes)
    for part in _MARKER.split(text):
        if part == IMAGE_TOKEN:
            run = [image_id] * IMAGE_TOKENS
        elif part == AUDIO_TOKEN:
            run = [audio_id] * _token_count(next(clips), where)
        else:
            piece = tokenizer.encode(part) if part else []
            ids += piece
            mask += [loss] * len(piece)
            continue
        ids += run
        mask += [0] * len(run)
    return ids, mask


def _token_count(num_samples: int, where: str) -> int:
    try:
        return audio_token_count(num_samples)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None


def _runs(ids: np.ndarray, token: int) -> np.ndarray:
    """Lengths of the maximal runs of `token` in ids, in order."""
    edges = np.diff(np.concatenate(([0], (ids == token).astype(np.int8), [0])))
    return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


def check_runs(ids: np.ndarray, image_id: int, audio_id: int, n_images: int, audio_sizes, where: str) -> None:
    """Raise DataError unless the placeholder runs of `ids` are exactly those of these media, in order."""
    image_ids = int(_runs(ids, image_id).sum())
    bad_image = any(n % IMAGE_TOKENS for n in _runs(ids, image_id)) or image_ids != n_images * IMAGE_TOKENS
    if bad_image:
        raise DataError(f"{where}: {image_ids} <image> placeholder ids but {n_images} images "
                        f"({n_images * IMAGE_TOKENS} ids, {IMAGE_TOKENS} an image); placeholders and media differ")
    counts = [_token_count(n, where) for n in audio_sizes]
    runs, clip, whole = _runs(ids, audio_id), 0, True
    for run in runs:                            # a run is one clip, or several adjacent clips, in order
        while run > 0 and clip < len(counts) and counts[clip] <= run:
            run -= counts[clip]
            clip += 1
        whole = whole and run == 0
    if not whole or clip != len(counts):
        raise DataError(f"{where}: <audio> placeholder runs of {runs.tolist()} ids but {len(counts)} clips of "
                        f"{counts} ids; placeholders and media differ")


class MultimodalBuilder:
    """Writes PREFIX's files; `add` one document at a time, then `finalize` (temp files until then)."""

    def __init__(self, prefix: str, tokenizer):
        self.prefix, self.files = prefix, media_files(prefix)
        self.image_id, self.audio_id = media_token_ids(tokenizer)
        self.fingerprint = tokenizer.fingerprint
        self.tokens = IndexedDatasetBuilder(prefix, best_dtype(tokenizer.vocab_size), tokenizer.vocab_size,
                                            tokenizer.fingerprint, tokenizer.eod_id)
        self.masks = IndexedDatasetBuilder(mask_prefix(prefix), np.uint8, 2, tokenizer.fingerprint, 0)
        self.images: list[np.ndarray] = []
        self.audio_offsets, self.table = [0], [(0, 0)]
        self._audio = open(self.files["audio"] + ".tmp", "wb")

    def add(self, ids, mask, images, audio, where: str) -> None:
        """ids/mask [n]; images uint8 [k, 1, 8, 8] (or a list of [1, 8, 8]); audio: float32 clips [n_j]."""
        ids = np.asarray(ids, np.int64)
        check_runs(ids, self.image_id, self.audio_id, len(images), [len(a) for a in audio], where)
        self.tokens.add_doc(ids)
        self.masks.add_doc(np.asarray(mask, np.uint8))
        self.images += [np.asarray(im, np.uint8).reshape(IMAGE_SHAPE) for im in images]
        for clip in audio:
            self._audio.write(np.asarray(clip, "<f4").tobytes())
            self.audio_offsets.append(self.audio_offsets[-1] + len(clip))
        self.table.append((len(self.images), len(self.audio_offsets) - 1))

    def finalize(self) -> dict:
        self._audio.close()
        arrays = {"images": np.stack(self.images) if self.images else np.zeros((0, *IMAGE_SHAPE), np.uint8),
                  "audio_offsets": np.asarray(self.audio_offsets, np.int64),
                  "table": np.asarray(self.table, np.int64)}
        for key, arr in arrays.items():
            with open(self.files[key] + ".tmp", "wb") as f:
                np.save(f, arr, allow_pickle=False)
        header = {"format": FORMAT, "version": VERSION, "num_docs": self.tokens.num_docs,
                  "num_images": len(self.images), "num_audio": len(self.audio_offsets) - 1,
                  "audio_samples": self.audio_offsets[-1], "image_token_id": self.image_id,
                  "audio_token_id": self.audio_id, "image_tokens": IMAGE_TOKENS, "sample_rate": SAMPLE_RATE,
                  "image_shape": list(IMAGE_SHAPE), "tokenizer_fingerprint": self.fingerprint}
        with open(self.files["header"] + ".tmp", "w") as f:
            json.dump(header, f, indent=1)
        self.tokens.finalize()
        self.masks.finalize()
        for key in ("images", "audio", "audio_offsets", "table", "header"):      # the header last: the commit
            os.replace(self.files[key] + ".tmp", self.files[key])
        return header

    def abort(self) -> None:
        self._audio.close()
        self.tokens.abort()
        self.masks.abort()
        for path in self.files.values():
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")

    def __enter__(self) -> MultimodalBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def _record(where: str, rec: dict, folder: str):
    """A JSONL record -> (prompt, text, image pixels, audio clips), every field and media file checked."""
    text, prompt = rec.get("text"), rec.get("prompt", "")
    if not isinstance(text, str):
        raise DataError(f"{where}: expected a 'text' string")
    if not isinstance(prompt, str):
        raise DataError(f"{where}: 'prompt' must be a string")
    media = {}
    for key, load in (("images", read_image_pixels), ("audio", load_audio)):
        paths = rec.get(key, [])
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise DataError(f"{where}: '{key}' must be a list of file paths (relative to the JSONL's folder)")
        try:
            media[key] = [np.asarray(load(os.path.join(folder, p))) for p in paths]
        except MediaError as e:
            raise MediaError(f"{where}: {e}") from None
    return prompt, text, media["images"], media["audio"]


def preprocess_multimodal(input_path: str, output_prefix: str, tokenizer) -> dict:
    """JSONL records {"text", "prompt"?, "images"?, "audio"?} -> the dataset at output_prefix; returns counts.
    The tokenizer must have the media tokens; the text (after the prompt) and eod carry the loss."""
    folder = os.path.dirname(os.path.abspath(input_path))
    builder = MultimodalBuilder(output_prefix, tokenizer)
    trainable = 0
    with builder:
        for where, rec in iter_records(input_path, DataError, "JSONL file", RECORD_FIELDS):
            prompt, text, images, audio = _record(where, rec, folder)
            sizes = [len(a) for a in audio]
            check_placeholders(where, len(images), len(audio), prompt, text)
            k_img, k_aud = prompt.count(IMAGE_TOKEN), prompt.count(AUDIO_TOKEN)      # the prompt's media first
            p_ids, p_mask = encode_with_media(tokenizer, prompt, k_img, sizes[:k_aud], where, loss=0)
            t_ids, t_mask = encode_with_media(tokenizer, text, len(images) - k_img, sizes[k_aud:], where)
            ids, mask = p_ids + t_ids + [tokenizer.eod_id], p_mask + t_mask + [1]
            builder.add(ids, mask, images, audio, where)
            trainable += sum(mask[1:])
        if builder.tokens.num_docs == 0:
            raise DataError(f"{input_path}: no records")
        tokens = builder.tokens.num_tokens
        header = builder.finalize()
    return {"documents": header["num_docs"], "tokens": tokens, "trainable_tokens": trainable,
            "images": header["num_images"], "audio_clips": header["num_audio"],
            "audio_seconds": round(header["audio_samples"] / SAMPLE_RATE, 1)}


class Sample(NamedTuple):
    inputs: np.ndarray          # [n-1] int64, placeholder ids included (the adapters fill those positions)
    labels: np.ndarray          # [n-1] int64, IGNORE_INDEX off the mask
    images: np.ndarray          # uint8 [k, 1, 8, 8] in the order of the document's image runs
    audio: list                 # float32 clips [n_j] in the order of its audio runs


def _load_npy(path: str, dtype, ndim: int, what: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found ({what})")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:                       # an object array (pickle) or a corrupt header
        raise DataError(f"{path}: not a plain .npy array ({str(e).splitlines()[0]})") from None
    if arr.dtype != np.dtype(dtype) or arr.ndim != ndim:
        raise DataError(f"{path}: {arr.dtype} array of {arr.ndim} dims; expected {np.dtype(dtype).name} of {ndim}")
    return arr


class MultimodalDataset:
    """Document i -> Sample; opening checks every file of PREFIX and that they pair up (one-line DataError)."""

    def __init__(self, prefix: str):
        self.prefix, files = str(prefix), media_files(str(prefix))
        if not os.path.isfile(files["header"]):
            raise DataError(f"{files['header']}: file not found (not a multimodal dataset, or an unfinished one)")
        try:
            with open(files["header"]) as f:
                h = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{files['header']}: not JSON ({e})") from None
        if not isinstance(h, dict) or h.get("format") != FORMAT:
            raise DataError(f"{files['header']}: not a {FORMAT} header")
        if h.get("version") != VERSION:
            raise DataError(f"{files['header']}: format version {h.get('version')} is not supported "
                            f"(this code reads version {VERSION})")
        missing = [k for k in HEADER_KEYS if k not in h]
        if missing:
            raise DataError(f"{files['header']}: missing {', '.join(missing)}; truncated or corrupt")
        want = {"image_tokens": IMAGE_TOKENS, "sample_rate": SAMPLE_RATE, "image_shape": list(IMAGE_SHAPE)}
        for key, value in want.items():
            if h.get(key) != value:
                raise DataError(f"{files['header']}: {key} {h.get(key)} differs from this code's {value} "
                                "(spec.py); preprocess the data again")
        self.header, self.text = h, SFTDataset(self.prefix)          # tokens + mask, paired
        self.image_id, self.audio_id = int(h["image_token_id"]), int(h["audio_token_id"])
        self.vocab_size = self.text.vocab_size
        self.images = _load_npy(files["images"], np.uint8, 4, "images")
        self.audio_offsets = _load_npy(files["audio_offsets"], np.int64, 1, "audio offsets")
        self.table = _load_npy(files["table"], np.int64, 2, "media table")
        n_aud = len(self.audio_offsets) - 1
        problems = [
            (self.text.tokens.tokenizer_fingerprint != h["tokenizer_fingerprint"],
             f"{self.text.tokens.idx_path} was made with tokenizer {self.text.tokens.tokenizer_fingerprint}"),
            (len(self.text) != h["num_docs"], f"{self.text.tokens.idx_path} has {len(self.text)} documents"),
            (self.images.shape != (h["num_images"], *IMAGE_SHAPE), f"{files['images']} has shape {self.images.shape}"),
            (n_aud != h["num_audio"] or self.audio_offsets[0] != 0 or np.any(np.diff(self.audio_offsets) < 0)
             or self.audio_offsets[-1] != h["audio_samples"], f"{files['audio_offsets']} has {n_aud} clips"),
            (self.table.shape != (h["num_docs"] + 1, 2) or np.any(self.table[0] != 0) or np.any(np.diff(self.table, axis=0) < 0)
             or tuple(self.table[-1]) != (h["num_images"], h["num_audio"]), f"{files['table']} has shape {self.table.shape}"),
        ]
        for bad, what in problems:
            if bad:
                raise DataError(f"{what}, which does not pair with {files['header']} ({h['num_docs']} documents, "
                                f"{h['num_images']} images, {h['num_audio']} clips); preprocess them together")
        size = os.path.getsize(files["audio"]) if os.path.isfile(files["audio"]) else -1
        if size != 4 * h["audio_samples"]:
            raise DataError(f"{files['audio']}: {size} bytes, but {files['header']} says {h['audio_samples']} "
                            f"float32 samples ({4 * h['audio_samples']} bytes); truncated, missing or corrupt")
        self.audio = np.memmap(files["audio"], "<f4", "r") if size else np.zeros(0, np.float32)
        self._check_counts()

    def _check_counts(self) -> None:
        """Every document's placeholder ids equal what its media fill, checked at open for all documents
        (one pass over the tokens, memory in the placeholders only); `sample` checks the runs themselves."""
        tokens, offsets = self.text.tokens, self.text.tokens.offsets
        where = f"{self.prefix}_audio_offsets.npy"
        clip_ids = np.array([0] + [_token_count(int(n), where) for n in np.diff(self.audio_offsets)], np.int64).cumsum()
        for token, want, what in ((self.image_id, IMAGE_TOKENS * np.diff(self.table[:, 0]), "images"),
                                  (self.audio_id, np.diff(clip_ids[self.table[:, 1]]), "audio clips")):
            at = np.flatnonzero(np.asarray(tokens._tokens) == token)
            have = np.bincount(np.searchsorted(offsets, at, "right") - 1, minlength=len(tokens))
            bad = np.flatnonzero(have != want)
            if bad.size:
                i = int(bad[0])
                raise DataError(f"{self.prefix}: document {i} has {have[i]} {IMAGE_TOKEN if token == self.image_id else AUDIO_TOKEN} placeholder ids "
                                f"but its {what} fill {want[i]} ({bad.size} documents differ); placeholders and media differ")

    def __len__(self) -> int:
        return len(self.text)

    # Pickle the path, not the mapped arrays (a DataLoader worker reopens the files), as IndexedDataset does.
    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def lengths(self) -> np.ndarray:
        """Inputs per sample (tokens - 1)."""
        return self.text.lengths()

    def media(self, i: int) -> tuple[np.ndarray, list]:
        """Document i's images uint8 [k, 1, 8, 8] and clips (float32 [n_j] views of the memory map)."""
        (i0, a0), (i1, a1) = self.table[i], self.table[i + 1]
        off = self.audio_offsets
        return np.asarray(self.images[i0:i1]), [np.asarray(self.audio[off[j]:off[j + 1]]) for j in range(a0, a1)]

    def prompt_and_target(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Document i's leading ids without loss (its prompt, placeholder runs included: what generation is
        given, with `media(i)`) and the ids after them (text and eod: what it should produce)."""
        ids, mask = self.text.tokens.get(i).astype(np.int64), self.text.masks.get(i)
        k = int(np.argmax(mask != 0)) if mask.any() else len(ids)
        return ids[:k], ids[k:]

    def sample(self, i: int) -> Sample:
        inputs, labels = self.text.sample(i)
        images, audio = self.media(i)
        ids = self.text.tokens.get(i).astype(np.int64)
        check_runs(ids, self.image_id, self.audio_id, len(images), [len(a) for a in audio],
                   f"{self.prefix}: document {i}")
        return Sample(inputs, labels, images, audio)
