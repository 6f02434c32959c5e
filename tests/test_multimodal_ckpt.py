"""Multimodal checkpoints (issue 16): the adapters are saved and resharded with the rest (a TP2+SP run's
checkpoint loads into TP1 with equal weights and loss, and converts to TP1 bit-exactly), and an HF export
keeps the language model loadable by transformers (its logits equal megagpt's on text) with the adapters
in adapters.safetensors, which the import reads back bit-exactly."""
import json
import os

import pytest
import torch

from dist import gather_full, spawn
from mm_rows import VOCAB, MixedRows
from test_multimodal_core import SEQ, mm_cfg
from megagpt.checkpoint.convert import convert
from megagpt.multimodal.hf_adapters import ADAPTERS_FILE, HF_KEY, adapter_names


def _run(rank, world, run_dir, tp, load):
    from megagpt.multimodal.trainer import MultimodalTrainer
    cfg = mm_cfg(tp=tp, sp=tp > 1)
    cfg.model.tie_embeddings = False
    tr = MultimodalTrainer(cfg, run_dir, MixedRows(24, SEQ), MixedRows(24, SEQ), load=load)   # eval rows: the same rows
    if load is None:
        tr.train_step()
        tr.save()
    tr.eval_mode(True)
    loss = tr._eval_batch(1)[0]
    weights = {n: gather_full(p, p.meta.spec, tr.ps.tp) for c in tr.chunks for n, p in c.named_parameters()}
    return {"loss": loss, "weights": weights}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("mmckpt")
    two = spawn(2, _run, str(d / "tp2"), 2, None, timeout=240)[0]
    return d, two


def test_tp2_checkpoint_loads_into_tp1(saved):
    d, two = saved
    one = spawn(1, _run, str(d / "tp1"), 1, str(d / "tp2"), timeout=240)[0]
    assert any(n.startswith("vision.") for n in one["weights"]) and any(n.startswith("audio.") for n in one["weights"])
    for n, w in two["weights"].items():
        got = one["weights"][n]
        torch.testing.assert_close(got[:VOCAB] if "embedding" in n or "lm_head" in n else got,
                                   w[:VOCAB] if "embedding" in n or "lm_head" in n else w, rtol=0, atol=0, msg=n)
    assert abs(one["loss"] - two["loss"]) <= 1e-5 * abs(two["loss"])


def test_hf_export_keeps_lm_loadable_and_adapters_round_trip(saved, tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open
    d, two = saved
    hf_dir = tmp_path / "hf"
    convert(str(d / "tp2"), str(hf_dir), "hf")
    files = sorted(os.listdir(hf_dir))
    assert ADAPTERS_FILE in files and "model.safetensors" in files
    config = json.loads((hf_dir / "config.json").read_text())
    assert config[HF_KEY]["image_token_id"] == 60 and config[HF_KEY]["file"] == ADAPTERS_FILE
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
        assert not any(k.startswith(("vision.", "audio.")) for k in f.keys())       # the LM file: Llama's only
    with safe_open(str(hf_dir / ADAPTERS_FILE), framework="pt") as f:
        assert json.loads(f.metadata()[HF_KEY])["adapter_hidden"] == 16
        for n in f.keys():
            torch.testing.assert_close(f.get_tensor(n), two["weights"][n], rtol=0, atol=0)
        assert sorted(f.keys()) == sorted(n for n in two["weights"] if n.split(".")[0] in ("vision", "audio"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), attn_implementation="eager").eval()
    from megagpt.config import ModelConfig
    from megagpt.model.gpt import GPTModel
    cfg = mm_cfg().model
    cfg.tie_embeddings = False
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(two["weights"][n][: p.shape[0]])
        tokens = torch.randint(0, 60, (2, 12))
        ours = model.gather_logits(model(tokens))
        theirs = hf(tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    back = tmp_path / "back"
    convert(str(hf_dir), str(back), "megagpt", tp=2, with_optimizer=True)
    one = spawn(1, _run, str(tmp_path / "again"), 1, str(back), timeout=240)[0]
    for n in adapter_names(ModelConfig(**{**cfg.__dict__})):
        torch.testing.assert_close(one["weights"][n], two["weights"][n], rtol=0, atol=0, msg=n)
    assert abs(one["loss"] - two["loss"]) <= 1e-5 * abs(two["loss"])
