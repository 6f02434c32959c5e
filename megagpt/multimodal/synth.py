"""Real multimodal data that ships offline: captioned digit images, DTMF phone tones, Shakespeare text.

  images  scikit-learn's digits (1,797 scans of 8x8, levels 0..16 -> 8-bit PNG 'L', 0..255), each captioned
          by a templated sentence whose only numeral is its digit: "This is a handwritten 3."
  audio   DTMF (ITU-T Q.23) for random digit strings, synthesised at SAMPLE_RATE: each key is the sum of its
          row tone (697/770/852/941 Hz) and column tone (1209/1336/1477 Hz), with what a real line does to it:
          tone 40-120 ms and gap 30-80 ms drawn per key, each frequency off by up to 1.5 % (Q.24 accepts it),
          a random level and row/column twist (+-3 dB), 5 ms ramps, silence around the string and white noise
          at a random SNR (10-30 dB). Transcribed as "The tones dial 4 1 9 7."
  text    Shakespeare (module shksprdata, modern editions only): train chunks from most plays, validation
          chunks from held-out plays, so validation text is unseen.

The held-out splits are fixed by the seed. Records are JSONL for tools/preprocess_multimodal.py:
{"prompt": "<image>", "text": " This is a handwritten 3.", "images": ["digits/0003.png"]}, the media paths
relative to the JSONL's folder; the text after the prompt is what the model learns to generate, and
`caption_digit` / `transcript_digits` read the answer back from a generated text, so accuracy is measurable.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from ..data.indexed import DataError
from .media_io import save_audio, save_image
from .spec import AUDIO_TOKEN, IMAGE_TOKEN, SAMPLE_RATE

ROWS_HZ, COLS_HZ = (697, 770, 852, 941), (1209, 1336, 1477)
KEYPAD = ("123", "456", "789", "*0#")
DTMF_HZ = {key: (ROWS_HZ[r], COLS_HZ[c]) for r, keys in enumerate(KEYPAD) for c, key in enumerate(keys)}

# Each has exactly one numeral, the digit, so the first numeral of a generated caption is its answer.
CAPTIONS = ("This is a handwritten {d}.", "A picture of the digit {d}.", "Someone wrote the number {d} here.",
            "The digit in this image is {d}.", "A small scan of a handwritten {d}.")
TRANSCRIPT = "The tones dial {digits}."
HELD_OUT_PLAYS = ("tempest_gut.txt", "twelfth_night_gut.txt", "winters_tale_gut.txt")

_NUMERAL = re.compile(r"[0-9]")


def _answer_part(text: str) -> str:
    return text.split(".", 1)[0]          # every caption and transcript ends at its first full stop


def caption_digit(text: str) -> int | None:
    """The digit a (generated) caption names: its first numeral before the first '.', else None."""
    m = _NUMERAL.search(_answer_part(text))
    return int(m.group()) if m else None


def transcript_digits(text: str) -> str:
    """The digit string a (generated) transcript names: its numerals before the first '.'."""
    return "".join(_NUMERAL.findall(_answer_part(text)))


def digit_pixels() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 [1797, 8, 8] (0..16 scaled to 0..255) and their labels [1797]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digit images need scikit-learn (pip install scikit-learn)") from None
    d = load_digits()
    return np.round(d.images * (255.0 / 16.0)).astype(np.uint8), d.target.astype(np.int64)


def dtmf_clip(digits: str, rng: np.random.Generator) -> np.ndarray:
    """float32 [n] in [-1, 1] at SAMPLE_RATE: the keys of `digits` as DTMF with random timing, level, noise."""
    sr, parts = SAMPLE_RATE, []

    def silence(lo, hi):
        return np.zeros(int(rng.uniform(lo, hi) * sr), np.float64)

    parts.append(silence(0.02, 0.10))
    level = rng.uniform(0.15, 0.45)                                   # per-tone peak; the sum stays below 1
    for k, key in enumerate(digits):
        if key not in DTMF_HZ:
            raise DataError(f"DTMF: {key!r} is not a key of the keypad ({''.join(KEYPAD)})")
        if k:
            parts.append(silence(0.03, 0.08))
        t = np.arange(int(rng.uniform(0.04, 0.12) * sr)) / sr
        low, high = (f * (1 + rng.uniform(-0.015, 0.015)) for f in DTMF_HZ[key])
        twist = 10 ** (rng.uniform(-3, 3) / 20)                        # column tone level over row tone level
        tone = level * (np.sin(2 * np.pi * low * t + rng.uniform(0, 2 * np.pi))
                        + twist * np.sin(2 * np.pi * high * t + rng.uniform(0, 2 * np.pi))) / max(1.0, twist)
        ramp = min(len(t) // 2, int(0.005 * sr))                      # 5 ms raised-cosine edges: no clicks
        edge = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
        tone[:ramp] *= edge
        tone[len(tone) - ramp:] *= edge[::-1]
        parts.append(tone)
    parts.append(silence(0.02, 0.10))
    clip = np.concatenate(parts)
    signal_power = np.mean(clip ** 2)
    snr_db = rng.uniform(10, 30)
    clip = clip + rng.normal(0.0, np.sqrt(signal_power / 10 ** (snr_db / 10)), clip.shape)
    return np.clip(clip, -1.0, 1.0).astype(np.float32)


def _write_jsonl(path: str, records: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(tmp, path)


def write_digits(out: str, test_frac: float = 0.2, seed: int = 0) -> dict[str, list[dict]]:
    """out/digits/NNNN.png for all 1,797 digits; {"train": records, "test": records} (fixed split)."""
    pixels, labels = digit_pixels()
    os.makedirs(os.path.join(out, "digits"), exist_ok=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    n_test = int(round(test_frac * len(labels)))
    split = {"test": sorted(order[:n_test]), "train": sorted(order[n_test:])}
    result = {}
    for name, idx in split.items():
        recs = []
        for i in idx:
            rel = f"digits/{i:04d}.png"
            save_image(os.path.join(out, rel), pixels[i])
            caption = CAPTIONS[rng.integers(len(CAPTIONS))].format(d=int(labels[i]))
            recs.append({"prompt": IMAGE_TOKEN, "text": " " + caption, "images": [rel]})
        result[name] = recs
    return result


def write_dtmf(out: str, n_train: int = 1000, n_test: int = 200, min_len: int = 3, max_len: int = 5,
               seed: int = 0) -> dict[str, list[dict]]:
    """out/dtmf/{train,test}_NNNN.wav: DTMF of random digit strings; {"train": records, "test": records}."""
    if not 1 <= min_len <= max_len:
        raise DataError(f"DTMF: string lengths {min_len}..{max_len}; expected 1 <= min_len <= max_len")
    os.makedirs(os.path.join(out, "dtmf"), exist_ok=True)
    result = {}
    for k, (name, n) in enumerate((("train", n_train), ("test", n_test))):
        rng = np.random.default_rng([seed, k])          # the test split does not move when n_train does
        recs = []
        for i in range(n):
            digits = "".join(str(d) for d in rng.integers(0, 10, rng.integers(min_len, max_len + 1)))
            rel = f"dtmf/{name}_{i:04d}.wav"
            save_audio(os.path.join(out, rel), dtmf_clip(digits, rng))
            recs.append({"prompt": AUDIO_TOKEN, "text": " " + TRANSCRIPT.format(digits=" ".join(digits)),
                         "audio": [rel]})
        result[name] = recs
    return result


def shakespeare_text(out: str, n_train: int = 2000, n_valid: int = 200, chunk_lines: int = 4,
                     seed: int = 0) -> dict[str, list[dict]]:
    """Text-only records: chunks of the modern editions, validation from HELD_OUT_PLAYS only."""
    from ..data.shakespeare import write_shakespeare_jsonl
    tmp = os.path.join(out, "shakespeare_all.jsonl.tmp")
    write_shakespeare_jsonl(tmp, chunk_lines)
    pools = {"train": [], "valid": []}
    with open(tmp, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec["source"].endswith("_gut.txt"):
                pools["valid" if rec["source"] in HELD_OUT_PLAYS else "train"].append({"text": rec["text"]})
    os.remove(tmp)
    rng = np.random.default_rng(seed)
    result = {}
    for name, n in (("train", n_train), ("valid", n_valid)):
        pool = pools[name]
        if n > len(pool):
            raise DataError(f"Shakespeare: {n} {name} chunks asked for, the corpus has {len(pool)}")
        result[name] = [pool[i] for i in sorted(rng.choice(len(pool), n, replace=False))]
    return result


def write_demo_jsonl(out: str, seed: int = 0, n_dtmf_train: int = 1000, n_dtmf_test: int = 200,
                     n_text_train: int = 2000, n_text_valid: int = 200, dtmf_len: tuple[int, int] = (3, 5)
                     ) -> dict[str, str]:
    """Media files and JSONL for the demo under `out`; returns {split name: JSONL path}:
    train (digits, DTMF and text, shuffled together), text_train (the same text alone, in CORPUS order, play
    after play: shuffle its rows before training on it, as the demo's TextPlusMediaRows does; read in order,
    a text-alone run at the same seed and steps ended 3.0% worse on held-out text), and the held-out
    digits_test, dtmf_test, text_valid."""
    os.makedirs(out, exist_ok=True)
    digits = write_digits(out, seed=seed)
    dtmf = write_dtmf(out, n_dtmf_train, n_dtmf_test, *dtmf_len, seed=seed)
    text = shakespeare_text(out, n_text_train, n_text_valid, seed=seed)
    train = digits["train"] + dtmf["train"] + text["train"]
    train = [train[i] for i in np.random.default_rng(seed).permutation(len(train))]
    splits = {"train": train, "text_train": text["train"], "digits_test": digits["test"],
              "dtmf_test": dtmf["test"], "text_valid": text["valid"]}
    paths = {}
    for name, recs in splits.items():
        paths[name] = os.path.join(out, f"{name}.jsonl")
        _write_jsonl(paths[name], recs)
    return paths


def build_demo_data(out: str, vocab_size: int = 512, seed: int = 0, **counts) -> dict:
    """Everything the demo trains and evaluates on, under `out`: the media and JSONL (write_demo_jsonl,
    `counts` are its keyword arguments), a byte-level BPE trained on the training text with <image> and
    <audio> added (out/tokenizer.json), and each JSONL preprocessed to a dataset out/data/<split>.
    Returns {"tokenizer": path, "jsonl": {split: path}, "data": {split: prefix}, "stats": {split: counts}}."""
    from ..data.tokenizer import Tokenizer
    from .dataset import preprocess_multimodal
    from .spec import add_media_tokens
    jsonl = write_demo_jsonl(out, seed=seed, **counts)
    with open(jsonl["train"], encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tok = add_media_tokens(Tokenizer.train(texts, vocab_size))
    tok_path = os.path.join(out, "tokenizer.json")
    tok.save(tok_path)
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    data = {name: os.path.join(out, "data", name) for name in jsonl}
    stats = {name: preprocess_multimodal(jsonl[name], data[name], tok) for name in jsonl}
    return {"tokenizer": tok_path, "jsonl": jsonl, "data": data, "stats": stats}
