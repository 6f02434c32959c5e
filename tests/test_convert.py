"""The checkpoint converter end to end (megagpt/checkpoint/convert.py, tools/convert_checkpoint.py).

- HF -> megagpt TP2 PP2 -> HF reproduces every tensor bit for bit; the training loop loads the import
  and its first loss equals transformers' loss on the same batch.
- A model trained by megagpt under TP2 PP2 and exported: transformers' logits equal megagpt's (1e-4,
  fp32), greedy generation of 32 tokens is identical, AutoTokenizer loads the run's tokenizer.
- TP2 PP2 -> TP1 PP4 with the optimizer, then 3 more steps: the losses of the original layout (1e-5
  relative); so does loading TP2 PP2 straight into TP1 PP4 (reshard on load). Resharding to TP4 PP2
  VP2 or TP1, or from TP2 DP2 (optimizer state split over DP), keeps every tensor bit for bit.
- Per TP rank pieces (GQA QKV, gate/up, vocab padding, tied and untied, interleaved RoPE) in the files;
  Mistral and Qwen2 import (and export as Llama) with transformers' logits.
- Streaming: peak memory of a conversion below a third of the model. Bad inputs: one-line errors.
"""
import importlib.util
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dist import assert_close_rel, spawn
from megagpt.checkpoint.convert import convert
from megagpt.checkpoint.hf import ConversionError, from_hf_config
from megagpt.checkpoint.sharded import CheckpointError, load_checkpoint, load_optimizer_state, save_checkpoint
from megagpt.config import ModelConfig, load_config
from megagpt.data.synthetic import SyntheticDataset
from megagpt.generate import generate
from megagpt.model.gpt import GPTModel, build_model
from megagpt.parallel.state import ParallelState
from megagpt.train import Trainer

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "configs", "tiny.yaml")
SHRINK = ["model.hidden_size=64", "model.num_layers=4", "model.ffn_hidden_size=96", "train.seq_len=32",
          "train.global_batch_size=8", "train.train_iters=5"]      # vocab 2048, 8 heads, 4 KV heads, fp32
TP2PP2 = SHRINK + ["parallel.tp=2", "parallel.pp=2"]
TP1PP4 = SHRINK + ["parallel.tp=1", "parallel.pp=4"]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(rank, world, overrides, run_dir, load, steps, save):
    """A Trainer in this layout, resumed from `load`: `steps` steps, then optionally a checkpoint."""
    trainer = Trainer(load_config(TINY, overrides, world_size=world), run_dir, None, load)
    start = trainer.step
    losses = [trainer.train_step()["loss"] for _ in range(steps)]
    if save:
        trainer.save()
    return {"start": start, "losses": losses}


def _single(path):
    """The checkpoint at `path` loaded into one process (resharded on load)."""
    cfg = load_config(TINY, SHRINK, world_size=1)
    ps = ParallelState.single()
    model = GPTModel(cfg.model, ps)
    extra = load_checkpoint(str(path), [model], ps, cfg)
    return model.eval(), extra


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """2 steps of TP2 PP2 training on synthetic data with a tokenizer in the config, checkpointed."""
    from megagpt.data.tokenizer import Tokenizer
    tmp = tmp_path_factory.mktemp("trained")
    tok_path = str(tmp / "tokenizer.json")
    Tokenizer.train(["the quick brown fox jumps over the lazy dog", "pack my box with five dozen jugs"] * 20,
                    vocab_size=300).save(tok_path)
    run_dir = str(tmp / "run")
    out = spawn(4, _train, TP2PP2 + [f"data.tokenizer={tok_path}"], run_dir, None, 2, True)
    assert all(0 < x < 10 for x in out[0]["losses"])
    return {"run_dir": run_dir, "tokenizer": tok_path}


@pytest.fixture(scope="module")
def trained_dp2(tmp_path_factory):
    """1 step of TP2 DP2 training: the distributed optimizer's state is split over the DP ranks."""
    run_dir = str(tmp_path_factory.mktemp("trained_dp2") / "run")
    spawn(4, _train, SHRINK + ["parallel.tp=2"], run_dir, None, 1, True)
    return run_dir


# ----------------------------------------------------------------------------- megagpt -> HF

def test_trained_export_matches_transformers(trained, tmp_path):
    hf_dir = tmp_path / "hf"
    convert(trained["run_dir"], str(hf_dir), "hf")
    assert sorted(os.listdir(hf_dir)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), attn_implementation="eager").eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.dtype == torch.float32
    model, extra = _single(trained["run_dir"])
    fresh = build_model(model.cfg, seed=1234)          # the run's initial weights: training moved them
    assert extra["step"] == 2 and not torch.equal(model.lm_head.weight, fresh.lm_head.weight)
    tokens = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model.gather_logits(model(tokens)), hf(input_ids=tokens).logits
    diff = (ours - theirs).abs().max().item()
    print(f"max |logit diff| megagpt vs transformers: {diff:.2e}")
    assert ours.shape == theirs.shape == (2, 24, 2048) and diff <= 1e-4

    prompt = tokens[:1, :8]
    ours = generate(model, prompt, 32)                       # greedy, no eos
    theirs = hf.generate(prompt, do_sample=False, max_new_tokens=32, attention_mask=torch.ones_like(prompt),
                         min_new_tokens=32, pad_token_id=0)   # min_new_tokens: the eos never stops it
    assert ours.shape == theirs.shape == (1, 40) and torch.equal(ours, theirs)

    from megagpt.data.tokenizer import Tokenizer
    mine = Tokenizer.load(trained["tokenizer"])
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    text = "the lazy fox packs five jugs"
    assert tok(text, add_special_tokens=False)["input_ids"] == mine.encode(text)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == mine.eod_id == hf.config.eos_token_id


def test_sharded_bf16_export(trained, tmp_path):
    """--max-shard-size splits the weights with an index; --dtype bf16 casts them (and says so)."""
    one, many = tmp_path / "one", tmp_path / "many"
    convert(trained["run_dir"], str(one), "hf")
    convert(trained["run_dir"], str(many), "hf", dtype="bf16", max_shard_size="100KB")
    index = json.loads((many / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    shards = [load_file(str(many / f)) for f in files]
    # a shard's tensors stay under the limit unless one tensor alone is larger (the 256 KB embedding)
    assert len(files) > 3 and all(sum(t.numel() * 2 for t in shard.values()) <= 100_000 or len(shard) == 1
                                  for shard in shards)
    assert json.loads((many / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ref = load_file(str(one / "model.safetensors"))
    got = {k: v for shard in shards for k, v in shard.items()}
    assert set(got) == set(ref) == set(index["weight_map"])
    assert all(torch.equal(got[k], ref[k].to(torch.bfloat16)) for k in ref)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(many))
    assert hf.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- megagpt -> megagpt

def test_reshard_tp2pp2_to_tp1pp4_continues_training(trained, tmp_path):
    converted = str(tmp_path / "tp1pp4")
    convert(trained["run_dir"], converted, "megagpt", tp=1, pp=4, with_optimizer=True)
    ref = spawn(4, _train, TP2PP2, str(tmp_path / "a"), trained["run_dir"], 3, False)[0]
    conv = spawn(4, _train, TP1PP4, str(tmp_path / "b"), converted, 3, False)[0]
    direct = spawn(4, _train, TP1PP4, str(tmp_path / "c"), trained["run_dir"], 3, False)[0]
    assert ref["start"] == conv["start"] == direct["start"] == 2
    expected = torch.tensor(ref["losses"], dtype=torch.float64)
    for name, got in (("converted", conv), ("reshard on load", direct)):
        got = torch.tensor(got["losses"], dtype=torch.float64)
        print(f"{name}: losses {got.tolist()}, max relative diff {((got - expected).abs() / expected).max():.1e}")
        assert_close_rel(got, expected, 1e-5, name)


@pytest.mark.parametrize("source,tp,pp,vp", [("tp2pp2", 4, 2, 2), ("tp2pp2", 1, 1, 1), ("tp2dp2", 1, 2, 1)])
def test_reshard_is_bit_exact(request, tmp_path, source, tp, pp, vp):
    """Every weight and optimizer tensor of the output equals the input's, whatever the two layouts."""
    run_dir = request.getfixturevalue("trained")["run_dir"] if source == "tp2pp2" else request.getfixturevalue(
        "trained_dp2")
    step = 2 if source == "tp2pp2" else 1
    out = tmp_path / "out"
    convert(run_dir, str(out), "megagpt", tp=tp, pp=pp, vp=vp, with_optimizer=True)
    step_dir = out / f"step_{step:08d}"
    assert (out / "latest").read_text().strip() == step_dir.name and (step_dir / "COMPLETE").is_file()
    metas = [json.loads((step_dir / f"rank_{r:05d}.json").read_text()) for r in range(tp * pp)]
    if vp == 2:                                    # pp rank 0 holds global chunks 0 and 2: layers 0 and 2
        assert {n.split(".")[1] for n in metas[0]["tensors"] if n.startswith("layers.")} == {"0", "2"}
    ref, _ = _single(run_dir)
    got, extra = _single(out)
    assert extra["step"] == step
    params = dict(got.named_parameters())
    for name, p in ref.named_parameters():
        assert torch.equal(params[name], p), name
    specs = {n: (tuple(p.meta.global_shape), p.meta.spec, 0, 1) for n, p in params.items()}
    ranges = {n: (0, p.numel()) for n, p in params.items()}
    a = load_optimizer_state(run_dir, specs, ranges)
    b = load_optimizer_state(str(out), specs, ranges)
    assert a["step"] == b["step"] == step
    for name in params:
        for key in ("main", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a[name][key], b[name][key]), (name, key)


# ----------------------------------------------------------------------------- HF -> megagpt

def _random_hf(path, arch="LlamaForCausalLM", **over):
    """A random HF model (norms and biases perturbed, so a swapped norm or a dropped bias would show),
    saved by transformers."""
    kind = arch.removesuffix("ForCausalLM")
    cfg = getattr(transformers, f"{kind}Config")(**{**dict(
        vocab_size=2048, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, architectures=[arch]), **over})
    torch.manual_seed(0)
    hf = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    hf.save_pretrained(str(path), safe_serialization=True)
    return hf


def test_hf_round_trip_bit_exact_and_training_loads_it(tmp_path):
    hf = _random_hf(tmp_path / "hf")
    mg, back = tmp_path / "mg", tmp_path / "back"
    convert(str(tmp_path / "hf"), str(mg), "megagpt", tp=2, pp=2, with_optimizer=True)
    assert (mg / "latest").read_text().strip() == "step_00000000"
    assert len([f for f in os.listdir(mg / "step_00000000") if f.endswith(".safetensors")]) == 4
    convert(str(mg), str(back), "hf")
    a, b = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert set(a) == set(b) and len(a) == 2 + 1 + 4 * 9
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name

    model, _ = _single(mg)
    tokens = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model.gather_logits(model(tokens)), hf(input_ids=tokens).logits, atol=1e-4, rtol=0)

    # the training loop resumes from the import; its first loss is transformers' loss on the same batch
    out = spawn(4, _train, TP2PP2, str(tmp_path / "run"), str(mg), 1, False)[0]
    data = SyntheticDataset(2048, 32, 8, seed=1234)
    samples = torch.stack([torch.as_tensor(data[i]) for i in range(8)])
    with torch.no_grad():
        loss = F.cross_entropy(hf(input_ids=samples[:, :-1]).logits.reshape(-1, 2048), samples[:, 1:].reshape(-1))
    assert out["start"] == 0
    assert abs(out["losses"][0] - loss.item()) <= 1e-5 * loss.item()


@pytest.mark.parametrize("arch,over", [("MistralForCausalLM", dict(sliding_window=None)),
                                       ("Qwen2ForCausalLM", dict(tie_word_embeddings=True, vocab_size=300))])
def test_mistral_and_qwen2_import_and_export_as_llama(arch, over, tmp_path):
    """Qwen2's q/k/v biases (and no others) come in; the export is a Llama with the same logits."""
    hf = _random_hf(tmp_path / "hf", arch, num_hidden_layers=2, **over)
    convert(str(tmp_path / "hf"), str(tmp_path / "mg"), "megagpt", tp=2, pp=2)
    convert(str(tmp_path / "mg"), str(tmp_path / "llama"), "hf")
    llama = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "llama")).eval()
    assert type(llama).__name__ == "LlamaForCausalLM"
    model = GPTModel(from_hf_config(hf.config.to_dict(), use_flash_attn=False), ParallelState.single()).eval()
    load_checkpoint(str(tmp_path / "mg"), [model], ParallelState.single())
    tokens = torch.randint(0, hf.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits
        torch.testing.assert_close(model.gather_logits(model(tokens)), ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(llama(input_ids=tokens).logits, ref, atol=1e-4, rtol=0)


CASES = {   # per case: the model, and what the TP2 files must show
    "gqa-untied-vocab-padded": dict(vocab_size=1001, num_kv_heads=2),   # 1001 rows -> 1024 at tp2
    "mqa-tied": dict(num_kv_heads=1, tie_embeddings=True),              # the one K/V head on both ranks
    "rope-interleaved": dict(rope_interleaved=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layout_pieces_through_the_converter(case, tmp_path):
    cfg = ModelConfig(**{**dict(vocab_size=1024, max_seq_len=64, hidden_size=64, num_layers=2, num_heads=8,
                                num_kv_heads=2, ffn_hidden_size=96, init_std=0.05, use_flash_attn=False),
                         **CASES[case]})
    model = build_model(cfg, seed=7).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape))
    save_checkpoint(str(tmp_path / "src"), 3, [model], ParallelState.single(), cfg)
    convert(str(tmp_path / "src"), str(tmp_path / "hf"), "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager").eval()
    w = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert w["model.embed_tokens.weight"].shape == (cfg.vocab_size, 64)               # padding removed
    assert ("lm_head.weight" in w) != cfg.tie_embeddings and hf.config.tie_word_embeddings == cfg.tie_embeddings
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.gather_logits(model(tokens))
        torch.testing.assert_close(hf(input_ids=tokens).logits, ours, atol=1e-4, rtol=0)

    mg = tmp_path / "mg"
    convert(str(tmp_path / "hf"), str(mg), "megagpt", tp=2, pp=2)
    files = [load_file(str(mg / "step_00000000" / f"rank_{r:05d}.safetensors")) for r in range(4)]   # tp fastest
    padded = torch.cat([w["model.embed_tokens.weight"], torch.zeros(1024 - cfg.vocab_size, 64)])
    q, k, v = (w[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv")
    gate, up = w["model.layers.0.mlp.gate_proj.weight"], w["model.layers.0.mlp.up_proj.weight"]
    kv = cfg.kv_heads
    for r in range(2):                                   # computed here from the HF tensors, not via ShardSpec
        head = slice(r * 8, r * 8 + 8) if kv == 2 else slice(0, 8)        # head_dim 8: this rank's K/V head
        assert torch.equal(files[r]["embedding.weight"], padded[r * 512:(r + 1) * 512])
        assert torch.equal(files[r]["layers.0.attention.qkv.weight"],
                           torch.cat([q[r * 32:(r + 1) * 32], k[head], v[head]]))
        assert torch.equal(files[r]["layers.0.mlp.fc1.weight"], torch.cat([gate[r * 48:(r + 1) * 48],
                                                                            up[r * 48:(r + 1) * 48]]))
        assert torch.equal(files[r]["layers.0.attention.proj.weight"],
                           w["model.layers.0.self_attn.o_proj.weight"][:, r * 32:(r + 1) * 32])
        last = files[2 + r]                               # pp rank 1
        assert "embedding.weight" not in last            # a tied copy is never written
        if not cfg.tie_embeddings:
            lm_head = torch.cat([w["lm_head.weight"], torch.zeros(1024 - cfg.vocab_size, 64)])
            assert torch.equal(last["lm_head.weight"], lm_head[r * 512:(r + 1) * 512])

    imported = from_hf_config(hf.config.to_dict(), use_flash_attn=False)      # rotate-half, whatever the source
    back = GPTModel(imported, ParallelState.single()).eval()
    load_checkpoint(str(mg), [back], ParallelState.single())
    with torch.no_grad():
        got = back.gather_logits(back(tokens))
    if cfg.rope_interleaved:                             # the same function with Q/K rows permuted
        torch.testing.assert_close(got, ours, atol=1e-4, rtol=0)
    else:
        assert torch.equal(got, ours)


# ----------------------------------------------------------------------------- streaming

@pytest.mark.timeout(30)
def test_conversion_memory_stays_below_a_third_of_the_model(tmp_path):
    """A 91 MiB model (24 layers, largest tensor 2 MiB) converts both ways in a fresh process; each
    conversion's peak memory above the resident memory it started from stays under a third of the
    model (tools/convert_memory_check.py shows the same for a 488 MiB model)."""
    check = _tool("convert_memory_check")
    size = check.make_hf_dir(str(tmp_path / "hf"), hidden=256, layers=24, heads=8, kv_heads=2, ffn=1024, vocab=2048)
    assert size > 90e6
    to_mg, to_hf = check.measure([(str(tmp_path / "hf"), str(tmp_path / "mg"), "megagpt", dict(tp=2, pp=2)),
                                  (str(tmp_path / "mg"), str(tmp_path / "back"), "hf", {})])
    print(f"model {size / 2**20:.0f} MiB; peak over baseline: HF -> megagpt {to_mg['peak_over_baseline'] / 2**20:.1f}"
          f" MiB, megagpt -> HF {to_hf['peak_over_baseline'] / 2**20:.1f} MiB")
    assert to_mg["peak_over_baseline"] < size / 3 and to_hf["peak_over_baseline"] < size / 3


# ----------------------------------------------------------------------------- bad inputs

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A one-process megagpt checkpoint, its HF export and a sharded HF export."""
    tmp = tmp_path_factory.mktemp("small")
    cfg = ModelConfig(vocab_size=256, max_seq_len=64, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2,
                      ffn_hidden_size=96, use_flash_attn=False)
    save_checkpoint(str(tmp / "mg"), 1, [build_model(cfg)], ParallelState.single(), cfg)
    convert(str(tmp / "mg"), str(tmp / "hf"), "hf")
    convert(str(tmp / "mg"), str(tmp / "hf_sharded"), "hf", max_shard_size="40KB")
    return tmp


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _wrong_shape(d):
    w = load_file(str(d / "model.safetensors"))
    w["model.layers.0.self_attn.o_proj.weight"] = w["model.layers.0.self_attn.o_proj.weight"][:, :32].contiguous()
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})


BAD = {  # name: (source dir, how to break it, error)
    "hf-truncated": ("hf", lambda d: _truncate(d / "model.safetensors"),
                     r"model.safetensors: unreadable safetensors file"),
    "hf-missing-shard": ("hf_sharded", lambda d: os.remove(next(d.glob("model-00002-of-*.safetensors"))),
                         r"model-00002-of-\d+.safetensors is named by model.safetensors.index.json but missing"),
    "hf-wrong-shape": ("hf", _wrong_shape,
                       r"model.layers.0.self_attn.o_proj.weight has shape \(64, 32\), config.json gives \(64, 64\)"),
    "hf-unknown-architecture": ("hf", lambda d: _edit_json(d / "config.json", lambda c: c.update(
        architectures=["GPT2LMHeadModel"])), r"architectures: 'GPT2LMHeadModel' is not supported"),
    "hf-path-leaves-directory": ("hf_sharded", lambda d: _edit_json(d / "model.safetensors.index.json", lambda i: i[
        "weight_map"].update({"model.norm.weight": "../evil.safetensors"})), r"refused"),
    "megagpt-truncated": ("mg", lambda d: _truncate(d / "step_00000001" / "rank_00000.safetensors"),
                          r"rank_00000.safetensors: \d+ bytes, COMPLETE says \d+ \(truncated"),
    "megagpt-missing-file": ("mg", lambda d: os.remove(d / "step_00000001" / "rank_00000.safetensors"),
                             r"rank_00000.safetensors is listed in COMPLETE but missing"),
    "megagpt-manifest-path-leaves-directory": ("mg", lambda d: _edit_json(d / "step_00000001" / "COMPLETE", lambda m: m[
        "files"].update({"../rank_00000.json": {"size": 1, "sha256": "0"}})), r"refused"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gives_a_one_line_error(small, tmp_path, case):
    name, breakit, message = BAD[case]
    src = tmp_path / name
    shutil.copytree(small / name, src)
    breakit(src)
    to = "megagpt" if name.startswith("hf") else "hf"
    with pytest.raises((ConversionError, CheckpointError)) as err:
        convert(str(src), str(tmp_path / "out"), to)
    assert len(str(err.value).splitlines()) == 1
    assert err.match(message)
    assert not (tmp_path / "out").exists()             # checked before anything is written


def test_cli(small, tmp_path, capsys):
    cli = _tool("convert_checkpoint")
    assert cli.main(["--input", str(small / "hf"), "--output", str(tmp_path / "mg"), "--to", "megagpt",
                     "--tp", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ranks"] == 2 and summary["step"] == 0
    assert cli.main(["--input", str(small / "mg"), "--output", str(small / "hf"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "refusing to overwrite" in err
    assert cli.main(["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "x"), "--to", "hf"]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert cli.main(["--input", str(small / "hf"), "--output", str(tmp_path / "x"), "--to", "megagpt", "--tp", "3"]) == 2
    assert capsys.readouterr().err == "error: model.num_heads: 8 is not divisible by parallel.tp=3\n"
