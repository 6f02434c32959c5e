"""Multimodal adapters (issue 16): the adapters' shapes and independence from the batch, placeholders vs
media refused in one line, no loss on placeholders, TP2+SP / PP2 / DP2 == one process (loss and every
gradient, fp32, 1e-5 relative) on batches mixing text-only, image and audio samples, and train.freeze_lm:
the decoder gets no grad buffer and no optimizer state."""
import pytest
import torch

from dist import assert_close_rel, gather_full, spawn
from mm_rows import AUDIO_ID, IMAGE_ID, VOCAB, MixedRows
from megagpt.config import ConfigError, ModelConfig, config_from_dict
from megagpt.model_size import chunk_param_numels
from megagpt.model.gpt import build_model
from megagpt.multimodal.spec import IMAGE_TOKENS, Media, audio_token_count

SEQ = 40


def model_cfg(**over):
    base = dict(vocab_size=VOCAB, max_seq_len=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                ffn_hidden_size=64, make_vocab_divisible_by=8, init_std=0.05, image_token_id=IMAGE_ID,
                audio_token_id=AUDIO_ID, adapter_hidden=16, adapter_layers=1)
    base.update(over)
    return base


def test_adapter_shapes_counts_and_batch_independence():
    model = build_model(ModelConfig(**model_cfg()), seed=1).eval()
    imgs = torch.rand(3, 1, 8, 8)
    alone = torch.cat([model.vision(imgs[i:i + 1]) for i in range(3)])
    assert model.vision(imgs).shape == (3, IMAGE_TOKENS, 32)
    torch.testing.assert_close(model.vision(imgs), alone, rtol=1e-6, atol=1e-6)   # no image sees another
    clips = [torch.randn(n) * 0.1 for n in (816, 2000, 3333)]
    out = model.audio(clips)
    assert out.shape == (sum(audio_token_count(c.shape[0]) for c in clips), 32)
    torch.testing.assert_close(out[audio_token_count(816):audio_token_count(816) + audio_token_count(2000)],
                               model.audio(clips[1:2]))
    m = ModelConfig(**model_cfg())
    assert chunk_param_numels(m, 1, 2, True, True) == [p.numel() for p in model.parameters()]
    assert [n for n, _ in model.named_parameters()][0].startswith("vision.")   # first: last in the grad buffer


@pytest.mark.parametrize("hidden,adapter", [(32, 16), (128, 64)])      # the tests' and the demo's sizes
def test_media_embeddings_start_at_the_token_embeddings_scale(hidden, adapter):
    """adapters.adapter_init_std: at init an image's and a DTMF clip's embeddings have about the token
    embeddings' rms, and the clip's vary over time (the digits). With the decoder's fixed init_std the
    audio stack shrank them ~70x (time-varying part ~300x) at the demo's sizes."""
    import numpy as np

    from megagpt.multimodal.media_io import image_to_float
    from megagpt.multimodal.synth import digit_pixels, dtmf_clip
    model = build_model(ModelConfig(**model_cfg(hidden_size=hidden, adapter_hidden=adapter, init_std=0.02,
                                                num_heads=4, adapter_layers=2)), seed=1).eval()
    rms = lambda t: float(t.detach().pow(2).mean().sqrt())  # noqa: E731
    token = rms(model.embedding.weight)
    with torch.no_grad():
        img = model.vision(image_to_float(digit_pixels()[0][:8, None]))                   # [8, 16, h]
        clip = model.audio([torch.from_numpy(dtmf_clip("1590", np.random.default_rng(0)))])   # [T', h]
    for got in (rms(img), rms(clip)):
        assert token / 3 < got < 3 * token, (got, token)
    assert float(clip.std(0).mean()) > token / 20                      # the tones change along the clip


def test_placeholders_replaced_and_counts_refused():
    model = build_model(ModelConfig(**model_cfg()), seed=1)
    rows = MixedRows(3, SEQ)
    tokens, labels, seg, media = rows.batch([0, 1, 2])
    x = model.embed(tokens, media)                                      # [s, b, h]
    img_rows = x[tokens.t() == IMAGE_ID].view(-1, IMAGE_TOKENS, 32)
    torch.testing.assert_close(img_rows, model.vision(media.images))
    torch.testing.assert_close(x[tokens.t() == AUDIO_ID], model.audio(media.audio))
    text = (tokens.t() != IMAGE_ID) & (tokens.t() != AUDIO_ID)
    torch.testing.assert_close(x[text], model.embedding.weight[tokens.t()[text]])
    for bad, word in ((Media(None, media.audio), "more placeholders than media"),
                      (Media(torch.cat([media.images] * 2), media.audio), "fewer placeholders than media"),
                      (Media(media.images, []), "<audio>"), (None, "<image>")):
        with pytest.raises(ValueError, match=word) as e:
            model(tokens, labels, media=bad)
        assert "\n" not in str(e.value)


def test_no_loss_on_placeholders():
    from megagpt.multimodal.trainer import mask_placeholders
    tokens, labels, _, _ = MixedRows(3, SEQ).batch([0, 1, 2])
    m = ModelConfig(**model_cfg())
    masked = mask_placeholders(m, labels)
    ph = (labels == IMAGE_ID) | (labels == AUDIO_ID)
    assert ph.any() and bool((masked[ph] < 0).all()) and torch.equal(masked[~ph], labels[~ph])


@pytest.mark.parametrize("field,value,word", [("model.image_token_id", 62, "image_token_id"),
                                              ("model.audio_token_id", IMAGE_ID, "one id per medium"),
                                              ("model.adapter_hidden", 6, "multiple of 4")])
def test_config_errors(field, value, word):
    section, key = field.split(".")
    raw = {"model": model_cfg(), "train": dict(seq_len=SEQ)}
    raw[section][key] = value
    with pytest.raises(ConfigError, match=word):
        config_from_dict(raw)
    with pytest.raises(ConfigError, match="freeze_lm"):
        config_from_dict({"model": model_cfg(image_token_id=None, audio_token_id=None),
                          "train": dict(seq_len=SEQ, freeze_lm=True)})


# ----------------------------------------------------------------------------- layouts vs one process

def mm_cfg(tp=1, pp=1, dp=1, sp=False, m=2, freeze=False, dist_opt=False):
    raw = {"model": model_cfg(),
           "parallel": dict(tp=tp, pp=pp, sequence_parallel=sp, distributed_optimizer=dist_opt),
           "train": dict(seq_len=SEQ, micro_batch_size=2, global_batch_size=2 * m * dp, eval_interval=0,
                         train_iters=1, freeze_lm=freeze)}
    return config_from_dict(raw, world_size=tp * pp * dp)


def _worker(rank, world, layouts, run_dir, first):
    from megagpt.multimodal.trainer import MultimodalTrainer
    from megagpt.optim.finalize import finalize_grads
    out = {}
    for name, (tp, pp, dp, sp) in layouts.items():
        if tp * pp * dp != world:
            continue
        tr = MultimodalTrainer(mm_cfg(tp, pp, dp, sp, m=4 // dp), f"{run_dir}/{name}", MixedRows(24, SEQ))
        loss, count = tr.backward(first)
        tr.optimizer.buffer.finish_grad_sync()
        finalize_grads(tr.chunks, tr.ps)
        grads = {n: gather_full(p.main_grad, p.meta.spec, tr.ps.tp)[:VOCAB] if n in ("embedding.weight", "lm_head.weight")
                 else gather_full(p.main_grad, p.meta.spec, tr.ps.tp) for c in tr.chunks for n, p in c.named_parameters()}
        if tr.ps.dp.rank == 0:        # every TP rank: each must hold the whole (summed) adapter gradient
            tag = name if tr.ps.tp.rank == 0 else f"{name}/tp{tr.ps.tp.rank}"
            out[f"{tag}@pp{tr.ps.pp.rank}"] = {"loss": loss, "count": count, "grads": grads}
    return out


def direct_loss(first, n):
    """The one-process loss computed without the trainer or the engine: one forward of the whole step."""
    from megagpt.model.packing import packing_of
    from megagpt.multimodal.trainer import mask_placeholders
    m = ModelConfig(**model_cfg())
    model = build_model(m, seed=1234)
    rows = MixedRows(24, SEQ)
    tokens, labels, seg, media = rows.batch([i % len(rows) for i in range(first, first + n)])
    labels = mask_placeholders(m, labels)
    return (model(tokens, labels, packing=packing_of(seg), media=media).sum() / (labels >= 0).sum()).item()


LAYOUTS = {"serial": (1, 1, 1, False), "tp2-sp": (2, 1, 1, True), "pp2": (1, 2, 1, False), "dp2": (1, 1, 2, False)}


def test_layouts_match_one_process(tmp_path):
    first = 20                                  # wraps around the 24 samples; every kind in every microbatch mix
    res = {}
    for world in (1, 2):
        for r in spawn(world, _worker, LAYOUTS, str(tmp_path), first, timeout=300):
            for key, v in r.items():
                name = key.split("@")[0]
                res.setdefault(name, {**v, "grads": {}})["grads"].update(v["grads"])
    ref = res["serial"]
    assert abs(ref["loss"] - direct_loss(first, 8)) <= 1e-5 * ref["loss"]
    assert any(n.startswith("vision.") for n in ref["grads"]) and any(n.startswith("audio.") for n in ref["grads"])
    assert float(ref["grads"]["vision.stem1.weight"].abs().sum()) > 0 and float(ref["grads"]["audio.convs.0.weight"].abs().sum()) > 0
    assert sorted(res) == ["dp2", "pp2", "serial", "tp2-sp", "tp2-sp/tp1"]
    for name in ("tp2-sp", "tp2-sp/tp1", "pp2", "dp2"):
        got = res[name]
        assert got["count"] == ref["count"] > 0
        assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (name, got["loss"], ref["loss"])
        assert sorted(got["grads"]) == sorted(ref["grads"])
        for n, g in ref["grads"].items():
            assert_close_rel(got["grads"][n], g, name=f"{name} {n}")


# ----------------------------------------------------------------------------- adapters only

def _frozen_worker(rank, world, run_dir, pp, dist_opt):
    from megagpt.multimodal.trainer import MultimodalTrainer
    tr = MultimodalTrainer(mm_cfg(pp=pp, freeze=True, dist_opt=dist_opt), run_dir, MixedRows(24, SEQ))
    before = {n: p.detach().clone() for c in tr.chunks for n, p in c.named_parameters()}
    rec = tr.train_step()
    trainable = {n for c in tr.chunks for n, p in c.named_parameters() if p.requires_grad}
    with_buffer = {n for c in tr.chunks for n, p in c.named_parameters() if hasattr(p, "main_grad")}
    state = tr.optimizer.update.state_for_checkpoint()             # what a checkpoint stores, by name
    changed = {n for c in tr.chunks for n, p in c.named_parameters() if not torch.equal(p.detach(), before[n])}
    return {"trainable": sorted(trainable), "buffer": sorted(with_buffer), "changed": sorted(changed),
            "state_keys": sorted(str(k) for k in _walk_keys(state)), "loss": rec["loss"],
            "numel": tr.optimizer.buffer.data.numel()}


def _walk_keys(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk_keys(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk_keys(v, f"{prefix}/{i}")
    else:
        yield prefix


@pytest.mark.parametrize("pp,dist_opt", [(1, False), (2, False), (2, True)])
def test_freeze_lm_trains_adapters_only(tmp_path, pp, dist_opt):
    results = spawn(pp, _frozen_worker, str(tmp_path), pp, dist_opt, timeout=240)
    adapters = sum(p.numel() for n, p in build_model(ModelConfig(**model_cfg()), seed=1).named_parameters()
                   if n.split(".")[0] in ("vision", "audio"))
    first = results[0]
    assert first["trainable"] and all(n.split(".")[0] in ("vision", "audio") for n in first["trainable"])
    assert first["buffer"] == first["trainable"] == first["changed"]       # only they move, only they hold grads
    assert first["numel"] == adapters
    assert first["state_keys"] and all(k.split("/")[1].split(".")[0] in ("vision", "audio") for k in first["state_keys"])
    for r in results[1:]:                                                  # the later stage: nothing trainable
        assert r["trainable"] == r["buffer"] == r["changed"] == [] and r["numel"] == 0
    assert results[-1]["loss"] > 0


def _cp_worker(rank, world):
    from megagpt.parallel.state import ParallelState
    ps = ParallelState.create(cp=2)
    model = build_model(ModelConfig(**model_cfg()), ps)
    tokens, labels, _, media = MixedRows(3, SEQ).batch([0, 1, 2])
    text = model(tokens[:1, : SEQ // 2], labels[:1, : SEQ // 2])          # text only: CP runs
    try:
        model(tokens, labels, media=media)                                # counts match; CP refuses
    except ValueError as e:
        return {"error": str(e), "text_ok": bool(torch.isfinite(text).all())}
    return {"error": None}


def test_context_parallel_with_media_is_refused_in_one_line():
    r = spawn(2, _cp_worker, timeout=120)[0]
    assert r["text_ok"] and "parallel.cp=2" in r["error"] and "\n" not in r["error"]


def _steps_worker(rank, world, run_dir, dp_mode):
    from megagpt.multimodal.trainer import MultimodalTrainer
    cfg = mm_cfg(dp=2, m=2, dist_opt=dp_mode != "ddp")
    cfg.train.dp_mode = dp_mode
    tr = MultimodalTrainer(cfg, f"{run_dir}/{dp_mode}", MixedRows(24, SEQ))
    losses = [tr.train_step()["loss"] for _ in range(3)]
    tr.optimizer.finish_param_sync()                                  # zero3: every unit whole again
    adapters = {n: p.detach().clone() for n, p in tr.chunks[0].named_parameters() if n.split(".")[0] in ("vision", "audio")}
    return {"losses": losses, "adapters": adapters}


def test_dp2_sharded_optimizers_take_the_same_steps(tmp_path):
    """DP2 with ZeRO-1 and ZeRO-3 (the adapters sit in the first stage's root unit) give DDP's losses over
    three steps and the same adapter weights after them (1e-5): the adapters reach every optimizer."""
    ref = spawn(2, _steps_worker, str(tmp_path), "ddp", timeout=240)[0]
    for mode in ("zero1", "zero3"):
        got = spawn(2, _steps_worker, str(tmp_path), mode, timeout=240)[0]
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got["losses"], ref["losses"])), (mode, got, ref)
        assert sorted(got["adapters"]) == sorted(ref["adapters"]) and ref["adapters"]
        for n, w in ref["adapters"].items():                       # the adapters' updated weights, not only the loss
            g = got["adapters"][n]
            if n.endswith("qkv.bias"):   # a key bias shifts a row's scores alike: its gradient is 0 up to rounding,
                d = w.shape[0] // 3      # which Adam scales to lr-sized steps of random sign; q and v parts compared
                w, g = torch.cat([w[:d], w[2 * d:]]), torch.cat([g[:d], g[2 * d:]])
            assert_close_rel(g, w, name=f"{mode} {n}")


# ----------------------------------------------------------------------------- validation data

def _valid_worker(rank, world, run_dir):
    import dataclasses
    from megagpt.multimodal.trainer import MultimodalTrainer
    cfg = mm_cfg()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_interval=1))
    no_valid = MultimodalTrainer(cfg, f"{run_dir}/none", MixedRows(24, SEQ))
    try:
        no_valid.evaluate()
        raised = ""
    except ValueError as e:
        raised = str(e)
    held = MultimodalTrainer(cfg, f"{run_dir}/held", MixedRows(24, SEQ), MixedRows(8, SEQ))
    return {"interval": no_valid.cfg.train.eval_interval, "raised": raised,
            "held_interval": held.cfg.train.eval_interval, "held_is_valid": held.valid_data is not held.train_data,
            "val": held.evaluate()}


def test_no_training_rows_as_validation(tmp_path):
    """Without held-out data there is no validation (a training-set loss is never logged as val_loss);
    with it, val_loss is computed on it."""
    r = spawn(1, _valid_worker, str(tmp_path), timeout=120)[0]
    assert r["interval"] == 0 and "--valid" in r["raised"]
    assert r["held_interval"] == 1 and r["held_is_valid"] and r["val"] > 0
