"""Tests for a CUDA machine (run by tools/gpu_bench.sh; skipped without CUDA), and a CPU smoke run of
tools/gpu_bench.py so the GPU script is exercised on every `make test`.

On the GPU: a single-rank NCCL process group with a TP=1 forward/backward through ParallelState
(matching the CPU fp32 result), a finite bf16 training step with megagpt's optimizer, and the
flash-attn / SDPA attention path against the plain math of causal attention within bf16 tolerance.
Each check is a function of (device, backend), so the same code also runs on the CPU when debugging.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from megagpt.config import ModelConfig, ParallelConfig, TrainConfig
from megagpt.model.attention import _flash_attn_func, core_attention
from megagpt.model.gpt import build_model
from megagpt.optim.optimizer import build_optimizer
from megagpt.parallel.spawn import free_port
from megagpt.parallel.state import ParallelState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def small_cfg(**over) -> ModelConfig:
    base = dict(vocab_size=512, max_seq_len=128, hidden_size=128, num_layers=2, num_heads=8, num_kv_heads=2,
                ffn_hidden_size=256, make_vocab_divisible_by=128, init_std=0.05)
    return ModelConfig(**{**base, **over})


def tokens_labels(cfg, b=2, s=64, device="cpu"):
    data = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=torch.Generator().manual_seed(0))
    return data[:, :-1].contiguous().to(device), data[:, 1:].contiguous().to(device)


# ----------------------------------------------------------------------------- the checks

def check_tp1_under_process_group(backend: str) -> None:
    """One rank, a real process group: build through ParallelState.create, forward/backward, compare
    with the same model in fp32 on the CPU. The group's own all-reduce must run on the device too."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        ps = ParallelState.create(tp=1)
        x = torch.ones(4, device=ps.device)
        dist.all_reduce(x)                                   # a collective through the backend itself
        assert x.tolist() == [1.0] * 4
        cfg = small_cfg()
        tokens, labels = tokens_labels(cfg, device=ps.device)
        model = build_model(cfg, ps, device=ps.device)
        loss = model(tokens, labels).mean()
        loss.backward()
        ref = build_model(cfg)
        ref_loss = ref(tokens.cpu(), labels.cpu()).mean()
        ref_loss.backward()
        assert torch.isfinite(loss) and abs(loss.item() - ref_loss.item()) < 1e-4
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")
    finally:
        dist.destroy_process_group()


def check_bf16_training_steps(device: str) -> None:
    """Three bf16 steps on one batch with megagpt's optimizer: everything finite, the loss falls."""
    cfg = small_cfg()
    ps = ParallelState.single(device)
    model = build_model(cfg, ps, device=device, dtype=torch.bfloat16)
    tcfg = TrainConfig(seq_len=64, dtype="bf16", lr=3e-3, warmup=0, clip_grad=1.0)
    opt = build_optimizer([model], ps, tcfg, ParallelConfig(), cfg)
    tokens, labels = tokens_labels(cfg, device=device)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        opt.set_sync(True)
        loss = model(tokens, labels).sum() / labels.numel()
        opt.scale_loss(loss).backward()
        stats = opt.step(tcfg.lr)
        assert math.isfinite(stats["grad_norm"]) and not stats["skipped"]
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def math_attention(q, k, v) -> torch.Tensor:
    """Causal attention written out in fp32: q [b, s, nq, d], k/v [b, s, nkv, d] -> [b, s, nq, d]."""
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))        # [b, heads, s, d]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = q.shape[2]
    mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs @ v).transpose(1, 2)


def check_attention_paths(device: str, head_dim: int, dtype=torch.bfloat16) -> None:
    """core_attention with use_flash True (flash-attn when importable, else SDPA) and False (SDPA)
    against the math in fp32: outputs and input gradients within bf16 tolerance."""
    g = torch.Generator().manual_seed(0)
    b, s, nq, nkv = 2, 256, 8, 2
    base = [torch.randn(b, s, n, head_dim, generator=g) for n in (nq, nkv, nkv)]
    ref_in = [t.to(device).clone().requires_grad_() for t in base]
    ref = math_attention(*ref_in)
    grad_out = torch.randn(ref.shape, generator=g).to(device)
    ref.backward(grad_out)
    for use_flash in (True, False):
        inputs = [t.to(device, dtype).clone().requires_grad_() for t in base]
        out = core_attention(*inputs, dropout_p=0.0, use_flash=use_flash)
        assert out.shape == ref.shape and out.dtype == dtype
        out.backward(grad_out.to(dtype))
        torch.testing.assert_close(out.float(), ref.detach(), rtol=2e-2, atol=2e-2)
        for got, want in zip(inputs, ref_in):
            torch.testing.assert_close(got.grad.float(), want.grad, rtol=5e-2, atol=5e-2)


# ----------------------------------------------------------------------------- on the GPU

@cuda
def test_nccl_single_rank_tp1_forward_backward():
    check_tp1_under_process_group("nccl")


@cuda
def test_bf16_training_step_is_finite():
    check_bf16_training_steps("cuda")


@cuda
@pytest.mark.parametrize("head_dim", [64, 128])
def test_flash_and_sdpa_attention_match_math(head_dim):
    check_attention_paths("cuda", head_dim)
    print(f"flash-attn importable: {_flash_attn_func() is not None}")   # which path use_flash took


# ----------------------------------------------------------------------------- on the CPU

def test_gpu_bench_smoke_on_cpu(tmp_path):
    """tools/gpu_bench.py end to end with its tiny config: every contender trains and is reported."""
    out = tmp_path / "gpu.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_bench.py"), "--smoke", "--device", "cpu",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert [r["impl"] for r in res["rows"]] == ["megagpt", "megagpt + torch AdamW", "transformers"]
    for r in res["rows"]:
        assert r["finite"] and r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["mfu"] is None
    assert "tokens/s" in proc.stdout and str(out) in proc.stdout
