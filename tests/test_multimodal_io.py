"""Multimodal generation and serving (issue 16): the KV-cache prefill with media equals recomputing the whole
sequence, tools/generate.py --image/--audio, the server's `media` extension (path or base64; runs in the
engine) and bad input in one line: an image of the wrong size or mode, audio at another sample rate, a
missing file, placeholders that do not match the media."""
import base64
import os
import sys
import wave

import numpy as np
import pytest
import torch

from megagpt.checkpoint.sharded import save_checkpoint
from megagpt.config import Config, DataConfig, ModelConfig, ParallelConfig, TrainConfig
from megagpt.data.tokenizer import Tokenizer
from megagpt.generate import generate_ids
from megagpt.loading import load_for_generation
from megagpt.multimodal.media_io import load_audio, load_image, save_audio, save_image
from megagpt.multimodal.prompt import media_prompt
from megagpt.multimodal.spec import add_media_tokens
from megagpt.parallel.state import ParallelState
from megagpt.pipeline.split import build_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import generate as tool  # noqa: E402

TEXT = "the tones dial one two three, this is a handwritten digit"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmgen")
    tok = add_media_tokens(Tokenizer.train([TEXT] * 20, vocab_size=280))
    tok_path = str(root / "tokenizer.json")
    tok.save(tok_path)
    model = dict(vocab_size=tok.vocab_size, max_seq_len=96, hidden_size=32, num_layers=2, num_heads=4,
                 num_kv_heads=2, ffn_hidden_size=64, make_vocab_divisible_by=1, init_std=0.1, use_flash_attn=False,
                 image_token_id=tok.token_id("<image>"), audio_token_id=tok.token_id("<audio>"), adapter_hidden=16,
                 adapter_layers=1)
    cfg = Config(model=ModelConfig(**model), parallel=ParallelConfig(), data=DataConfig(tokenizer=tok_path),
                 train=TrainConfig(seq_len=96, micro_batch_size=1, global_batch_size=1))
    ps = ParallelState.single()
    save_checkpoint(str(root / "run"), 1, build_stage(cfg, ps, seed=7), ps, cfg, {})
    rng = np.random.default_rng(0)
    save_image(root / "digit.png", rng.integers(0, 256, (8, 8)))
    save_audio(root / "tones.wav", 0.3 * np.sin(np.arange(1600) * 0.9) + 0.01 * rng.standard_normal(1600))
    from PIL import Image
    Image.fromarray(rng.integers(0, 256, (9, 8), dtype=np.uint8), mode="L").save(root / "big.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), mode="RGB").save(root / "rgb.png")
    with wave.open(str(root / "16k.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((rng.standard_normal(4000) * 3000).astype("<i2").tobytes())
    chunks, _, tok2, eod = load_for_generation(str(root / "run"))
    return {"run": str(root / "run"), "root": root, "chunks": chunks, "tok": tok2, "eod": eod}


def _recompute(model, ids, media, n):
    """Greedy by re-running the whole sequence (media embedded every time): no cache."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model.gather_logits(model(torch.tensor([out]), media=media))[0, -1]
            out.append(int(logits.argmax()))
    return out[len(ids):]


def test_cached_prefill_with_media_equals_recompute(ckpt):
    root, tok, chunks = ckpt["root"], ckpt["tok"], ckpt["chunks"]
    ids, media = media_prompt(tok, chunks[0].cfg, "the <image> and <audio> dial", [load_image(root / "digit.png")],
                              [load_audio(root / "tones.wav")])
    assert media.placeholder_counts() == (16, sum(i == tok.token_id("<audio>") for i in ids))
    got = generate_ids(chunks, [ids], 8, media=media)[0]
    assert got == _recompute(chunks[0], ids, media, 8)
    flipped = type(media)(1.0 - media.images, [-a for a in media.audio])   # other media, same prompt ids
    assert generate_ids(chunks, [ids], 8, media=flipped)[0] == _recompute(chunks[0], ids, flipped, 8)
    with torch.no_grad():                                                  # and the media reach the logits
        a = chunks[0].gather_logits(chunks[0](torch.tensor([ids]), media=media))
        b = chunks[0].gather_logits(chunks[0](torch.tensor([ids]), media=flipped))
    assert float((a - b).abs().max()) > 1e-3


def test_generate_tool_with_image_and_audio(ckpt, capsys):
    root, tok, chunks = ckpt["root"], ckpt["tok"], ckpt["chunks"]
    argv = ["--load", ckpt["run"], "--prompt", "<image> this is", "--image", str(root / "digit.png"),
            "--max-new-tokens", "6", "--print-ids", "--no-eod"]
    assert tool.main(argv) == 0
    printed = [int(x) for x in capsys.readouterr().out.strip().splitlines()[-1].split()]
    ids, media = media_prompt(tok, chunks[0].cfg, "<image> this is", [load_image(root / "digit.png")])
    assert printed == generate_ids(chunks, [ids], 6, media=media)[0]
    assert tool.main(["--load", ckpt["run"], "--prompt", "<audio>", "--audio", str(root / "tones.wav"),
                      "--max-new-tokens", "3", "--print-ids"]) == 0


@pytest.mark.parametrize("args,message", [
    (["--prompt", "<image>", "--image", "big.png"], "image of 8x9 pixels; expected an 8x8 grayscale PNG"),
    (["--prompt", "<image>", "--image", "rgb.png"], "image mode 'RGB'"),
    (["--prompt", "<audio>", "--audio", "16k.wav"], "16000 Hz"),
    (["--prompt", "<image>", "--image", "nowhere.png"], "nowhere.png: image file not found"),
    (["--prompt", "<image> <image>", "--image", "digit.png"], "2 <image> placeholders in the text but 1 images"),
    (["--prompt", "a digit", "--image", "digit.png"], "0 <image> placeholders in the text but 1 images"),
    (["--prompt", "<audio>"], "1 <audio> placeholder in the text but 0 audio clips"),
])
def test_generate_tool_bad_media_one_line(ckpt, capsys, args, message):
    argv = ["--load", ckpt["run"], "--max-new-tokens", "2"] + [
        str(ckpt["root"] / a) if a.endswith((".png", ".wav")) else a for a in args]
    assert tool.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("generate: ") and message in err and "\n" not in err, err


def _request(ckpt, body):
    from megagpt.openai_api import parse_request
    c = ckpt["chunks"][0].cfg
    return parse_request("completion", {"model": "mm", **body}, ckpt["tok"], model="mm", context=c.max_seq_len,
                         vocab=c.vocab_size, max_n=4, model_cfg=c)


def test_server_media_path_and_base64_run_in_the_engine(ckpt):
    from megagpt.serving import Engine
    root, tok, chunks = ckpt["root"], ckpt["tok"], ckpt["chunks"]
    png = base64.b64encode((root / "digit.png").read_bytes()).decode()
    by_path = _request(ckpt, dict(prompt="<image> is", max_tokens=5, temperature=0,
                                  media={"images": [str(root / "digit.png")]}))
    by_b64 = _request(ckpt, dict(prompt="<image> is", max_tokens=5, temperature=0, media={"images": [{"base64": png}]}))
    assert by_path.media == by_b64.media and by_path.prompts == by_b64.prompts
    engine = Engine(chunks, ParallelState.single(), tok, ckpt["eod"], max_batch=8)
    plain = _request(ckpt, dict(prompt="is", max_tokens=5, temperature=0))
    jobs = [engine.submit(r, None) for r in (by_path, plain, by_b64)]
    batches = []
    while engine.backlog or not engine.jobs.empty():
        batches.append(engine.next_batch())
        engine.run_batch(batches[-1])
    assert [[jobs.index(j) for j in b] for b in batches] == [[0], [1], [2]]      # media requests run alone
    ids, media = media_prompt(tok, chunks[0].cfg, "<image> is", [load_image(root / "digit.png")])
    want = generate_ids(chunks, [ids], 5, media=media, eod_id=ckpt["eod"])[0]
    for job in (jobs[0], jobs[2]):
        while True:
            kind, *rest = job.events.get_nowait()
            if kind == "done":
                break
        assert rest[0][0]["ids"] == want


@pytest.mark.parametrize("media,message", [
    ({"images": ["rgb.png"]}, "image mode 'RGB'"),
    ({"audio": ["16k.wav"]}, "16000 Hz"),
    ({"images": ["nowhere.png"]}, "image file not found"),
    ({"images": [{"base64": "!!!"}]}, "media.images[0]: base64 content that does not decode"),
    ({"images": [{"base64": base64.b64encode(b"not a png").decode()}]}, "media.images[0]: not a readable image"),
    ({"images": ["digit.png", "digit.png"]}, "1 <image> placeholder in the text but 2 images"),
    ({"video": []}, "media: expected"),
])
def test_server_bad_media_is_400_one_line(ckpt, media, message):
    from megagpt.openai_api import APIError
    fix = {k: [str(ckpt["root"] / x) if isinstance(x, str) else x for x in v] for k, v in media.items()}
    with pytest.raises(APIError) as e:
        _request(ckpt, dict(prompt="<image>" if "images" in media else "<audio>", max_tokens=2, media=fix))
    assert e.value.status == 400 and message in e.value.message and "\n" not in e.value.message, e.value.message
    with pytest.raises(APIError, match="only with /v1/completions"):
        _request(ckpt, dict(prompt=["<image>"], max_tokens=2, media={"images": []}))


def test_train_cli_trains_and_refuses_bad_data_in_one_line(ckpt, tmp_path, capsys):
    """examples/train_multimodal.py on a dataset preprocessed from JSONL with an image and a clip: a step runs and
    its checkpoint generates with the image; a missing dataset and a model id that is not the data's are one line."""
    import json

    from megagpt.multimodal.dataset import preprocess_multimodal
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import train_multimodal
    root, tok = ckpt["root"], ckpt["tok"]
    recs = [{"prompt": "<image>", "text": " this is a handwritten digit", "images": [str(root / "digit.png")]},
            {"prompt": "<audio>", "text": " the tones dial one two", "audio": [str(root / "tones.wav")]},
            {"text": TEXT}]
    (tmp_path / "mm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    preprocess_multimodal(str(tmp_path / "mm.jsonl"), str(tmp_path / "mm"), tok)
    common = ["--data", str(tmp_path / "mm"), "--run-dir", str(tmp_path / "run"), "--train-iters", "2",
              "model.max_seq_len=64", "train.seq_len=64", "model.hidden_size=32", "model.num_heads=4",
              "model.num_layers=1", "model.ffn_hidden_size=64", "train.micro_batch_size=2",
              "train.global_batch_size=2", "model.adapter_hidden=16", "model.adapter_layers=1",
              f"data.tokenizer={root / 'tokenizer.json'}"]
    assert train_multimodal.main(common) == 0
    assert tool.main(["--load", str(tmp_path / "run"), "--prompt", "<image>", "--image", str(root / "digit.png"),
                      "--max-new-tokens", "3", "--print-ids"]) == 0
    capsys.readouterr()
    assert train_multimodal.main(["--data", str(tmp_path / "nothing"), "--run-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nothing.media.json: file not found" in err and "\n" not in err
    assert train_multimodal.main(common + ["model.image_token_id=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.image_token_id: 3, but" in err and "\n" not in err, err
