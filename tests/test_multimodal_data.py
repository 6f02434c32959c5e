"""Multimodal data: media files (one-line refusals), the indexed dataset (JSONL -> files -> rows equal the
expected tokens, labels and media; no pickle; placeholders and media must match, when preprocessing and
when reading), cuts that never split a placeholder run, the text-plus-media stream (text batches equal the text-alone
stream's), and the offline data (DTMF peaks at its two
frequencies, digits and captions agree)."""
import json
import os
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch

from megagpt.data.indexed import DataError
from megagpt.data.tokenizer import Tokenizer
from megagpt.model.packing import IGNORE_INDEX
from megagpt.multimodal.dataset import MultimodalDataset, check_runs, media_files, preprocess_multimodal
from megagpt.multimodal.media_io import MediaError, load_audio, load_image, save_audio, save_image
from megagpt.multimodal.rows import MultimodalRows, TextPlusMediaRows, make_batch
from megagpt.multimodal.spec import IMAGE_TOKENS, MIN_AUDIO_SAMPLES, SAMPLE_RATE, add_media_tokens, audio_token_count
from megagpt.multimodal.synth import (CAPTIONS, COLS_HZ, DTMF_HZ, KEYPAD, ROWS_HZ, caption_digit, digit_pixels, dtmf_clip, transcript_digits,
                                      write_digits, write_dtmf)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from PIL import Image as PIL  # noqa: E402  (the test extra installs Pillow: a missing one fails, never skips)


@pytest.fixture(scope="module")
def tok():
    base = Tokenizer.train(["a cat sat on the mat. The tones dial 1 2 3. This is a handwritten 7."] * 20, 300)
    return add_media_tokens(base)


def wav(path, n, rate=SAMPLE_RATE, channels=1, width=2, seed=0):
    data = np.random.default_rng(seed).integers(-2000, 2000, n * channels).astype(f"<i{width}" if width > 1 else "u1")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(data.tobytes())
    return str(path)


def png(path, shape=(8, 8), mode="L", fmt="PNG", seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (*shape[::-1], 3) if mode == "RGB" else shape[::-1], np.uint8)
    PIL.fromarray(arr, mode=mode).save(str(path), format=fmt)
    return str(path)


def one_line(excinfo, *fragments):
    msg = str(excinfo.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg


# ----------------------------------------------------------------------------- media files

def test_media_round_trip(tmp_path):
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    save_image(tmp_path / "a.png", pixels)
    img = load_image(str(tmp_path / "a.png"))
    assert img.dtype == torch.float32 and img.shape == (1, 8, 8)
    assert torch.equal(img[0], torch.from_numpy(pixels.astype(np.float32) / 255))
    clip = np.sin(np.arange(2000) / 7.0).astype(np.float32) * 0.5
    save_audio(tmp_path / "a.wav", clip)
    got = load_audio(str(tmp_path / "a.wav"))
    assert got.dtype == torch.float32 and got.shape == (2000,)
    assert float((got - torch.from_numpy(clip)).abs().max()) < 1e-4


BAD_MEDIA = {   # name -> (writer, loader, fragments of the one line)
    "image_shape": (lambda d: png(d / "x.png", shape=(16, 8)), load_image, ["x.png", "16x8 pixels", "8x8"]),
    "image_mode": (lambda d: png(d / "x.png", mode="RGB"), load_image, ["x.png", "mode 'RGB'", "'L'"]),
    "image_jpeg": (lambda d: png(d / "x.png", fmt="JPEG"), load_image, ["x.png", "JPEG", "PNG"]),
    "image_garbage": (lambda d: (d / "x.png").write_bytes(b"not an image") and str(d / "x.png"), load_image,
                      ["x.png", "not a readable image"]),
    "image_missing": (lambda d: str(d / "nope.png"), load_image, ["nope.png", "image file not found"]),
    "audio_rate": (lambda d: wav(d / "x.wav", 4000, rate=16000), load_audio, ["x.wav", "16000 Hz", "8000 Hz"]),
    "audio_stereo": (lambda d: wav(d / "x.wav", 4000, channels=2), load_audio, ["x.wav", "stereo", "mono"]),
    "audio_8bit": (lambda d: wav(d / "x.wav", 4000, width=1), load_audio, ["x.wav", "8-bit", "16-bit"]),
    "audio_short": (lambda d: wav(d / "x.wav", MIN_AUDIO_SAMPLES - 1), load_audio,
                    ["x.wav", f"{MIN_AUDIO_SAMPLES - 1} samples", f"at least {MIN_AUDIO_SAMPLES}"]),
    "audio_garbage": (lambda d: (d / "x.wav").write_bytes(b"RIFFxx") and str(d / "x.wav"), load_audio,
                      ["x.wav", "not a PCM WAV"]),
    "audio_missing": (lambda d: str(d / "nope.wav"), load_audio, ["nope.wav", "audio file not found"]),
}


@pytest.mark.parametrize("case", BAD_MEDIA)
def test_bad_media_is_one_line(case, tmp_path):
    write, load, fragments = BAD_MEDIA[case]
    path = write(tmp_path)
    with pytest.raises(MediaError) as e:
        load(path)
    one_line(e, *fragments)
    assert isinstance(e.value, DataError)       # loading.INPUT_ERRORS prints it as one line


# ----------------------------------------------------------------------------- dataset round trip

def _expected(tok, prompt_parts, text_parts, sizes):
    """ids and mask by hand: a list of str pieces or ("img",) / ("aud", k) markers."""
    ids, mask = [], []
    for parts, loss in ((prompt_parts, 0), (text_parts, 1)):
        for p in parts:
            if isinstance(p, str):
                piece = tok.encode(p)
                ids, mask = ids + piece, mask + [loss] * len(piece)
            else:
                n = IMAGE_TOKENS if p[0] == "img" else audio_token_count(sizes[p[1]])
                ids, mask = ids + [tok.token_id("<" + ("image" if p[0] == "img" else "audio") + ">")] * n, mask + [0] * n
    return ids + [tok.eod_id], mask + [1]


@pytest.fixture
def corpus(tmp_path, tok):
    """Records of every shape: text only, image with prompt, audio, audio then image, adjacent images and clips."""
    img = [png(tmp_path / f"i{k}.png", seed=k) for k in range(4)]
    aud = [wav(tmp_path / f"a{k}.wav", n, seed=k) for k, n in enumerate([1200, 3000, 900, 2000])]
    recs = [
        ({"text": "a cat sat on the mat."}, [], [], [], ["a cat sat on the mat."]),
        ({"prompt": "<image>", "text": " a cat", "images": ["i0.png"]}, [0], [], [("img",)], [" a cat"]),
        ({"text": "the tones <audio> dial 1 2 3.", "audio": ["a0.wav"]}, [], [0], [], ["the tones ", ("aud", 0), " dial 1 2 3."]),
        ({"prompt": "<audio> then <image>", "text": " mat", "images": ["i1.png"], "audio": ["a1.wav"]}, [1], [1],
         [("aud", 0), " then ", ("img",)], [" mat"]),
        ({"text": "<image><image> two<audio><audio>", "images": ["i2.png", "i3.png"], "audio": ["a2.wav", "a3.wav"]},
         [2, 3], [2, 3], [], [("img",), ("img",), " two", ("aud", 0), ("aud", 1)]),
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r[0]) + "\n" for r in recs))
    expected = []
    for rec, ii, aa, prompt_parts, text_parts in recs:
        clips = [load_audio(aud[k]) for k in aa]
        ids, mask = _expected(tok, prompt_parts, text_parts, [len(c) for c in clips])
        expected.append((ids, mask, [load_image(img[k]) for k in ii], clips))
    stats = preprocess_multimodal(str(tmp_path / "d.jsonl"), str(tmp_path / "mm"), tok)
    assert stats["documents"] == 5 and stats["images"] == 4 and stats["audio_clips"] == 4
    return str(tmp_path / "mm"), expected


@pytest.mark.parametrize("packed", [True, False])
def test_jsonl_to_rows_round_trip(corpus, tok, packed):
    prefix, expected = corpus
    ds = MultimodalDataset(prefix)
    seq = 120
    rows = MultimodalRows(ds, seq, packed=packed)
    tokens, labels, segments, media = make_batch(rows, range(len(rows)))
    want_t, want_l, want_s, want_img, want_aud = [], [], [], [], []
    row_t, row_l, row_s = [], [], []
    for k, (ids, mask, imgs, clips) in enumerate(expected):
        x, y = ids[:-1], [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
        if row_t and (not packed or len(row_t) + len(x) > seq):
            want_t.append(row_t), want_l.append(row_l), want_s.append(row_s)
            row_t, row_l, row_s = [], [], []
        row_t, row_l, row_s = row_t + x, row_l + y, row_s + [len(set(row_s)) + 1] * len(x)
        want_img += imgs
        want_aud += clips
    want_t.append(row_t), want_l.append(row_l), want_s.append(row_s)
    assert tokens.shape == (len(want_t), seq)
    for r in range(len(want_t)):
        n = len(want_t[r])
        assert tokens[r, :n].tolist() == want_t[r] and labels[r, :n].tolist() == want_l[r]
        assert segments[r, :n].tolist() == want_s[r] and not segments[r, n:].any()
        assert (labels[r, n:] == IGNORE_INDEX).all()
    assert torch.equal(media.images, torch.stack(want_img))                 # row-major run order
    assert len(media.audio) == len(want_aud) and all(torch.equal(a, b) for a, b in zip(media.audio, want_aud))
    image_id, audio_id = tok.token_id("<image>"), tok.token_id("<audio>")
    assert media.placeholder_counts() == (int((tokens == image_id).sum()), int((tokens == audio_id).sum()))
    assert not ((labels == image_id) | (labels == audio_id)).any()            # no loss predicts a placeholder
    prompt, target = ds.prompt_and_target(1)                                  # {"prompt": "<image>", "text": " a cat"}
    assert prompt.tolist() == [image_id] * IMAGE_TOKENS and target.tolist() == tok.encode(" a cat") + [tok.eod_id]


def test_no_pickle(corpus):
    prefix, _ = corpus
    files = media_files(prefix)
    for key in ("images", "audio_offsets", "table"):
        np.load(files[key], allow_pickle=False)                              # plain arrays
    np.save(files["images"], np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError) as e:
        MultimodalDataset(prefix)
    one_line(e, "_images.npy", "not a plain .npy array")


def test_files_must_pair_up(corpus):
    prefix, _ = corpus
    files = media_files(prefix)
    with open(files["audio"], "r+b") as f:
        f.truncate(os.path.getsize(files["audio"]) - 4)
    with pytest.raises(DataError) as e:
        MultimodalDataset(prefix)
    one_line(e, "_audio.bin", "truncated")
    header = json.load(open(files["header"]))
    os.remove(files["header"])
    with pytest.raises(DataError) as e:
        MultimodalDataset(prefix)
    one_line(e, ".media.json", "not found")
    json.dump({**header, "version": 9}, open(files["header"], "w"))
    with pytest.raises(DataError) as e:
        MultimodalDataset(prefix)
    one_line(e, "version 9")


@pytest.mark.parametrize("way", ["more_placeholders", "fewer_placeholders"])
def test_placeholder_media_mismatch_when_opening(corpus, way):
    """Documents (start rows of the table): 0 text, 1 one image, 2 a clip, 3 a clip and an image, 4 two of each.
    The table moves document 1's image to document 2, or document 3's image to document 1."""
    prefix, _ = corpus
    files = media_files(prefix)
    table = np.load(files["table"], allow_pickle=False)
    if way == "more_placeholders":
        table[2, 0] = 0                             # doc 1: 16 <image> ids, no image (doc 2: an image, no ids)
    else:
        table[2:4, 0] = 2                           # doc 1: 16 <image> ids, two images (doc 3: 16 ids, none)
    np.save(files["table"], table, allow_pickle=False)
    with pytest.raises(DataError) as e:
        MultimodalDataset(prefix)
    one_line(e, "document 1 has 16 <image> placeholder ids", f"images fill {0 if way == 'more_placeholders' else 32}")


def test_runs_checked_when_reading(corpus, tok):
    """The counts are right but a run is split: document 4's 32 <image> ids lose one to an <audio> id and
    gain one back from its audio run, so no image run is a whole number of images."""
    prefix, _ = corpus
    ds = MultimodalDataset(prefix)
    start = int(ds.text.tokens.offsets[4])
    del ds
    ids = np.memmap(prefix + ".bin", dtype=np.uint16, mode="r+")
    image_id, audio_id = tok.token_id("<image>"), tok.token_id("<audio>")
    aud = start + int(np.argmax(ids[start:] == audio_id))
    assert ids[start + 5] == image_id and aud > start + 32
    ids[start + 5], ids[aud] = audio_id, image_id
    ids.flush()
    del ids
    ds = MultimodalDataset(prefix)                  # per-document counts still agree
    ds.sample(3)
    with pytest.raises(DataError) as e:
        ds.sample(4)
    one_line(e, "document 4", "32 <image> placeholder ids but 2 images", "placeholders and media differ")


def test_check_runs_matches_runs_to_media():
    a, b = audio_token_count(1000), audio_token_count(3000)
    img, aud = 7, 9

    def ids(*runs):
        return np.concatenate([np.full(n, t) for t, n in runs] + [np.array([1])])

    check_runs(ids((aud, a + b), (img, 2 * IMAGE_TOKENS)), img, aud, 2, [1000, 3000], "x")   # adjacent media
    check_runs(ids((aud, a), (1, 1), (aud, b)), img, aud, 0, [1000, 3000], "x")
    for bad, n_img, sizes in [(ids((aud, a), (1, 1), (aud, b)), 0, [3000, 1000]), (ids((aud, a), (1, 1), (aud, b - 1)), 0, [1000, 3000]),
                              (ids((img, IMAGE_TOKENS + 1)), 1, []), (ids((aud, a)), 0, [1000, 3000])]:
        with pytest.raises(DataError) as e:
            check_runs(bad, img, aud, n_img, sizes, "doc 5")
        one_line(e, "doc 5", "placeholders and media differ")


def _write(tmp_path, rec):
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    return str(tmp_path / "d.jsonl")


PREPROCESS_ERRORS = {
    "more_images_placeholders": ({"text": "<image> <image>", "images": ["i.png"]}, ["d.jsonl:1", "2 <image>", "1 images"]),
    "fewer_images_placeholders": ({"text": "no image", "images": ["i.png"]}, ["0 <image>", "1 images"]),
    "more_audio_placeholders": ({"text": "<audio>"}, ["1 <audio>", "0 audio clips"]),
    "fewer_audio_placeholders": ({"prompt": "<audio>", "text": "x", "audio": ["a.wav", "a.wav"]},
                                 ["1 <audio>", "2 audio clips"]),
    "missing_media": ({"text": "<image>", "images": ["gone.png"]}, ["d.jsonl:1", "gone.png", "image file not found"]),
    "bad_rate": ({"text": "<audio>", "audio": ["fast.wav"]}, ["d.jsonl:1", "fast.wav", "16000 Hz"]),
    "bad_mode": ({"text": "<image>", "images": ["rgb.png"]}, ["rgb.png", "mode 'RGB'"]),
    "unknown_field": ({"text": "x", "image": ["i.png"]}, ["d.jsonl:1", "unknown field 'image'"]),
    "text_type": ({"text": 3}, ["d.jsonl:1", "'text' string"]),
    "media_type": ({"text": "<image>", "images": "i.png"}, ["'images' must be a list"]),
}


@pytest.mark.parametrize("case", PREPROCESS_ERRORS)
def test_preprocess_refuses_in_one_line(case, tmp_path, tok, capsys):
    png(tmp_path / "i.png"), png(tmp_path / "rgb.png", mode="RGB")
    wav(tmp_path / "a.wav", 2000), wav(tmp_path / "fast.wav", 4000, rate=16000)
    rec, fragments = PREPROCESS_ERRORS[case]
    tok.save(tmp_path / "tok.json")
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from preprocess_multimodal import main
    rc = main(["--input", _write(tmp_path, rec), "--tokenizer", str(tmp_path / "tok.json"),
               "--output-prefix", str(tmp_path / "out" / "mm")])
    out = capsys.readouterr()
    lines = (out.out + out.err).splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert all(f in lines[0] for f in fragments), lines[0]
    assert not os.path.exists(tmp_path / "out" / "mm.media.json")            # nothing half-written is left
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".tmp")]


def test_tool_prints_one_line_and_saves_grown_tokenizer(tmp_path, tok):
    """The real command line: counts on success (tokenizer grown and saved), one line on bad input."""
    base = Tokenizer.train(["a cat sat on the mat."] * 5, 270)
    base.save(tmp_path / "base.json")
    png(tmp_path / "i.png")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_multimodal.py"), "--tokenizer",
           str(tmp_path / "base.json"), "--output-prefix", str(tmp_path / "mm")]
    good = subprocess.run(cmd + ["--input", _write(tmp_path, {"prompt": "<image>", "text": "a cat", "images": ["i.png"]})],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert good.returncode == 0, good.stderr
    stats = json.loads(good.stdout)
    assert stats["images"] == 1 and stats["vocab_size"] == base.vocab_size + 2
    grown = Tokenizer.load(stats["tokenizer"])
    assert MultimodalDataset(str(tmp_path / "mm")).image_id == grown.token_id("<image>") == base.vocab_size
    bad = subprocess.run(cmd + ["--input", _write(tmp_path, {"text": "<image>", "images": ["x.png"]})],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and bad.stdout.count("\n") == 1 and bad.stdout.startswith("error: "), bad.stdout
    assert "x.png: image file not found" in bad.stdout


# ----------------------------------------------------------------------------- cuts

def test_cut_never_splits_a_run(tmp_path, tok):
    wav(tmp_path / "a.wav", 4000)
    n_aud = audio_token_count(4000)
    text = tok.encode("a cat sat")
    _write(tmp_path, {"text": "a cat sat<audio> on the mat.", "audio": ["a.wav"]})
    preprocess_multimodal(str(tmp_path / "d.jsonl"), str(tmp_path / "mm"), tok)
    ds = MultimodalDataset(str(tmp_path / "mm"))
    seq = len(text) + n_aud // 2                       # the cut would fall inside the audio run
    rows = MultimodalRows(ds, seq)
    tokens, labels, segments, media = make_batch(rows, [0])
    assert tokens[0, :len(text)].tolist() == text and (segments[0, len(text):] == 0).all()
    assert media.images is None and media.audio == []                       # its clip left with its run
    assert media.placeholder_counts() == (0, 0)
    rows = MultimodalRows(ds, len(text) + n_aud)       # a cut right after the run keeps it whole, with its clip
    tokens, _, _, media = make_batch(rows, [0])
    assert len(media.audio) == 1 and int((tokens == ds.audio_id).sum()) == n_aud

    _write(tmp_path, {"prompt": "<audio>", "text": "a cat", "audio": ["a.wav"]})
    preprocess_multimodal(str(tmp_path / "d.jsonl"), str(tmp_path / "mm2"), tok)
    with pytest.raises(DataError) as e:
        MultimodalRows(MultimodalDataset(str(tmp_path / "mm2")), n_aud - 1)
    one_line(e, "document 0", f"run of {n_aud} placeholder ids", f"seq_len {n_aud - 1}")


# ----------------------------------------------------------------------------- the offline data

def test_dtmf_peaks_at_its_two_frequencies():
    rng = np.random.default_rng(1)
    for key in "0123456789":
        clip = dtmf_clip(key, rng)
        assert clip.dtype == np.float32 and np.abs(clip).max() <= 1
        spectrum = np.abs(np.fft.rfft(clip * np.hanning(len(clip)), 8 * SAMPLE_RATE))   # 0.125 Hz bins
        hz = np.fft.rfftfreq(8 * SAMPLE_RATE, 1 / SAMPLE_RATE)
        low, high = DTMF_HZ[key]
        low_band, high_band = (hz > 600) & (hz < 1100), (hz > 1100) & (hz < 1700)
        assert hz[low_band][spectrum[low_band].argmax()] == pytest.approx(low, rel=0.02)
        assert hz[high_band][spectrum[high_band].argmax()] == pytest.approx(high, rel=0.02)
        peaks = np.sort(hz[np.argsort(spectrum)[-1:]])      # the strongest bin of all is one of the two
        assert min(abs(peaks[0] - low), abs(peaks[0] - high)) < 0.02 * high


def dtmf_receiver(clip, win=160, hop=40):
    """A classic DTMF receiver, independent of the synthesiser: per 20 ms frame, the strongest row and column
    tone when the two hold over half the frame's energy; a key is 2+ frames of the same pair."""
    w, t = np.hanning(win), np.arange(win) / SAMPLE_RATE
    basis = np.exp(-2j * np.pi * np.outer(ROWS_HZ + COLS_HZ, t)) * w
    frames = []
    for s in range(0, len(clip) - win + 1, hop):
        x = clip[s:s + win].astype(np.float64)
        power = np.abs(basis @ x) ** 2
        r, c = int(np.argmax(power[:4])), int(np.argmax(power[4:]))
        all_tone = np.sum((w * x) ** 2) * w.sum() ** 2 / (2 * np.sum(w ** 2))   # the power if x were only tones
        frames.append(KEYPAD[r][c] if power[r] + power[4 + c] > 0.5 * all_tone else None)
    keys, prev, run = [], None, 0
    for k in frames + [None]:
        if k == prev:
            run += 1
            continue
        if prev is not None and run >= 2:
            keys.append(prev)
        prev, run = k, 1
    return "".join(keys)


def test_dtmf_files_transcripts_and_held_out_split(tmp_path):
    recs = write_dtmf(str(tmp_path), n_train=36, n_test=4, seed=3)
    again = write_dtmf(str(tmp_path / "again"), n_train=5, n_test=4, seed=3)
    assert recs["test"] == again["test"]                                         # the test split does not move
    assert open(tmp_path / "dtmf/test_0003.wav", "rb").read() == open(tmp_path / "again/dtmf/test_0003.wav", "rb").read()
    lengths = set()
    for r in recs["train"] + recs["test"]:
        digits = transcript_digits(r["text"])
        assert 3 <= len(digits) <= 5 and r["prompt"] == "<audio>"
        clip = load_audio(str(tmp_path / r["audio"][0]))
        lengths.add(len(clip))
        assert len(clip) >= 0.15 * SAMPLE_RATE
        assert dtmf_receiver(clip.numpy()) == digits                            # the audio says what the text says
    assert len(lengths) == 40                                                    # durations vary


def test_digits_png_levels_and_captions(tmp_path):
    pixels, labels = digit_pixels()
    assert pixels.shape == (1797, 8, 8) and pixels.max() == 255
    recs = write_digits(str(tmp_path), seed=0)
    assert len(recs["train"]) + len(recs["test"]) == 1797 and len(recs["test"]) == 359
    names = [r["images"][0] for r in recs["train"] + recs["test"]]
    assert len(set(names)) == 1797
    used = set()
    for r in recs["train"][:50] + recs["test"]:
        i = int(r["images"][0][7:11])
        assert caption_digit(r["text"]) == labels[i]
        assert torch.equal(load_image(str(tmp_path / r["images"][0]))[0], torch.from_numpy(pixels[i] / 255.0).float())
        used.add(r["text"].split(str(labels[i]))[0])
    assert len(used) == len(CAPTIONS)                    # every template is used
    assert write_digits(str(tmp_path / "again"), seed=0)["test"] == recs["test"]


def test_answers_read_back_from_generated_text():
    assert caption_digit(" This is a handwritten 3.<|endoftext|> 8") == 3
    assert caption_digit(" A picture of the digit.") is None
    assert transcript_digits(" The tones dial 4 1 9 7. 5 5") == "4197"


# ----------------------------------------------------------------------------- text plus media rows
def test_text_plus_media_rows_keep_the_text_alone_stream():
    """Each global batch of the mixed stream holds exactly the text rows of the same batch of the text-alone
    stream of that seed, in order, then media rows; every media row appears once per pass over the media."""
    text, media = [f"t{i}" for i in range(50)], [f"m{i}" for i in range(7)]
    alone, mixed = TextPlusMediaRows(text, None, 4, seed=3), TextPlusMediaRows(text, media, 4, 3, seed=3)
    assert alone.steps == mixed.steps == 12 and (alone.global_batch, mixed.global_batch) == (4, 7)
    assert len(alone) == 48 and len(mixed) == 84
    seen_text, seen_media = [], []
    for k in range(mixed.steps):
        batch = [mixed[k * 7 + j] for j in range(7)]
        assert batch[:4] == [alone[k * 4 + j] for j in range(4)]
        seen_text += batch[:4]
        seen_media += batch[4:]
    assert len(set(seen_text)) == 48 and all(r.startswith("t") for r in seen_text)       # one pass, no repeat
    assert all(sorted(seen_media[p:p + 7]) == sorted(media) for p in range(0, 35, 7))    # each pass: all of them
    assert seen_media[:7] != seen_media[7:14]                                            # re-shuffled per pass
    assert [alone[i] for i in range(48)] != [TextPlusMediaRows(text, None, 4, seed=4)[i] for i in range(48)]
    assert mixed[84] == mixed[0]                                                         # wraps as rows do
    for bad in (dict(media=None, media_per_step=2), dict(media=media, media_per_step=0), dict(text_per_step=0)):
        args = dict(text=text, media=None, text_per_step=4, media_per_step=0) | bad
        with pytest.raises(ValueError, match="rows: text_per_step"):
            TextPlusMediaRows(**args)
