"""MoE checkpoints: the auxiliary-loss-free selection bias is saved, restored on resume (exactly) and
resharded; the converter imports HF Mixtral at --ep 2 (experts stored as each ep rank's piece), loads
at EP2 and exports back bit-exact."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist import spawn
from megagpt.checkpoint.convert import convert
from megagpt.checkpoint.format import Reader
from megagpt.checkpoint.hf_mixtral import megagpt_to_mixtral, to_mixtral_config
from megagpt.config import config_from_dict
from megagpt.model.gpt import build_model
from megagpt.model.moe import MoE
from test_hf_mixtral import mixtral_cfg
from test_moe_parallel import raw_cfg

RATE = 0.05


def _biases(chunks) -> list[torch.Tensor]:
    return [m.selection_bias.clone() for c in chunks for m in c.modules() if isinstance(m, MoE)]


def _resume_worker(rank, world, ep, path, steps, save_at=None, load=None):
    """Train `steps` steps (synthetic tokens) at EP ep over `world` ranks, from `load` if given; save at
    step save_at. Returns (losses, the biases right after the load, the biases at the end)."""
    from megagpt.train import Trainer
    raw = raw_cfg("ep2")
    raw["model"].update(moe_router_bias_rate=RATE)
    raw["parallel"].update(ep=ep)
    raw["train"].update(train_iters=5, eval_interval=0, log_interval=100)
    trainer = Trainer(config_from_dict(raw, world_size=world), path, load=load)
    start = _biases(trainer.chunks)
    losses = []
    for _ in range(steps):
        losses.append(trainer.train_step()["loss"])
        if trainer.step == save_at:
            trainer.save()
    return losses, start, _biases(trainer.chunks)


def test_selection_bias_is_restored_exactly_on_resume_and_resharded(tmp_path):
    """EP2 x DP1 over 2 ranks: 5 steps straight, against 3 steps + save + a new run loading it + 2 steps:
    the same losses and biases, bit for bit (the bias moved in the first 3 steps, so a resume that
    restarted it at zero would route differently). The same checkpoint loaded in one process (EP1)
    starts from the saved biases exactly and continues with the same losses to 1e-5 relative."""
    straight = spawn(2, _resume_worker, 2, str(tmp_path / "a"), 5, timeout=240)[0]
    first = spawn(2, _resume_worker, 2, str(tmp_path / "b"), 3, 3, timeout=240)[0]
    resumed = spawn(2, _resume_worker, 2, str(tmp_path / "c"), 2, None, str(tmp_path / "b"), timeout=240)
    saved = first[2]
    assert any(b.abs().sum() > 0 for b in saved)             # the bias did move before the save
    for losses, start, end in resumed:                       # both ranks hold the same biases
        assert all(torch.equal(s, b) for s, b in zip(start, saved))
        assert first[0] + losses == straight[0]
        assert all(torch.equal(e, b) for e, b in zip(end, straight[2]))
    one = spawn(1, _resume_worker, 1, str(tmp_path / "d"), 2, None, str(tmp_path / "b"), timeout=240)[0]
    assert all(torch.equal(s, b) for s, b in zip(one[1], saved))
    assert one[0] == pytest.approx(straight[0][3:], rel=1e-5)


def _write_mixtral(path, cfg, seed):
    model = build_model(cfg, seed=seed)
    tensors = {k: v.contiguous() for name, p in model.named_parameters()
               for k, v in megagpt_to_mixtral(name, p.detach(), cfg)}
    os.makedirs(path)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(to_mixtral_config(cfg), f)
    return tensors


def _load_ep2(rank, world, run):
    """The EP2 model (dp = 2) loaded from `run`: this rank's named parameters."""
    from megagpt.checkpoint.sharded import find_checkpoint, load_checkpoint
    from megagpt.parallel.state import ParallelState
    from megagpt.pipeline.split import build_stage
    with Reader(find_checkpoint(run)) as reader:                       # the run config the converter wrote
        cfg = config_from_dict(reader.metas[0].config, world_size=world)
    ps = ParallelState.create(ep=cfg.parallel.ep)
    chunks = build_stage(cfg, ps, seed=0)
    load_checkpoint(run, chunks, ps, cfg)
    return {n: p.detach().clone() for n, p in chunks[0].named_parameters()}


def test_converter_mixtral_to_ep2_and_back_is_exact(tmp_path):
    """HF Mixtral -> megagpt --ep 2: two rank files, each holding half of every layer's experts (its EP
    piece) and rank 0 the dense weights; the EP2 model loads it with each rank's experts the HF
    experts' half; megagpt (EP2) -> HF gives back every HF tensor bit-exact."""
    cfg = mixtral_cfg()
    hf = _write_mixtral(str(tmp_path / "hf"), cfg, seed=11)
    summary = convert(str(tmp_path / "hf"), str(tmp_path / "run"), "megagpt", ep=2)
    assert summary["ranks"] == 2
    with Reader(summary["path"]) as reader:
        for r, meta in enumerate(reader.metas):
            fc1 = meta.tensors["layers.0.mlp.experts.fc1.weight"]
            assert (fc1.tp.rank, fc1.tp.size) == (r, 2)
            assert ("embedding.weight" in meta.tensors) == (r == 0)
    ranks = spawn(2, _load_ep2, str(tmp_path / "run"), timeout=240)
    E, f = cfg.moe_num_experts, cfg.expert_ffn
    for r, params in enumerate(ranks):
        fc1 = params["layers.1.mlp.experts.fc1.weight"]                  # [E/2, 2f, h]
        for j in range(E // 2):
            e = r * E // 2 + j
            assert torch.equal(fc1[j, :f], hf[f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight"])
            assert torch.equal(fc1[j, f:], hf[f"model.layers.1.block_sparse_moe.experts.{e}.w3.weight"])
        assert torch.equal(params["layers.1.mlp.router.weight"], hf["model.layers.1.block_sparse_moe.gate.weight"])
    convert(str(tmp_path / "run"), str(tmp_path / "back"), "hf")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert back.keys() == hf.keys()
    for k, v in hf.items():
        assert torch.equal(back[k], v), k


def test_converter_ep_errors_are_one_line(tmp_path):
    from megagpt.checkpoint.hf import ConversionError
    from megagpt.config import ConfigError
    _write_mixtral(str(tmp_path / "hf"), mixtral_cfg(), seed=1)
    convert(str(tmp_path / "hf"), str(tmp_path / "run"), "megagpt")
    for src, kwargs, exc, start in [("hf", dict(to="megagpt", ep=3), ConfigError, "parallel.ep: 3 does not divide"),
                                    ("run", dict(to="hf", ep=2), ConversionError, "--tp/--pp/--vp/--ep")]:
        with pytest.raises(exc) as e:
            convert(str(tmp_path / src), str(tmp_path / "out"), **kwargs)
        assert str(e.value).startswith(start) and "\n" not in str(e.value), str(e.value)
