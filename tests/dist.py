"""Shared helpers for the multi-rank tests: the fork harness, a tiny config, a serial reference."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megagpt.config import ModelConfig
from megagpt.model.gpt import build_model
from megagpt.optim.finalize import finalize_grads
from megagpt.parallel.spawn import RankError, spawn  # noqa: F401  (re-exported for tests)
from megagpt.parallel.state import ParallelState


def tiny_model_cfg(**over) -> ModelConfig:
    base = dict(vocab_size=1001, max_seq_len=64, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4,
                ffn_hidden_size=96, make_vocab_divisible_by=1, init_std=0.05)
    base.update(over)
    return ModelConfig(**base)


def batch(cfg: ModelConfig, b: int = 2, s: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def serial_loss_and_grads(cfg: ModelConfig, tokens, labels, seed: int = 1234):
    model = build_model(cfg, seed=seed)
    loss = model(tokens, labels).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def gather_full(t: torch.Tensor, spec, tp) -> torch.Tensor:
    """This rank's piece -> the global tensor, assembled through the parameter's ShardSpec."""
    if tp.size == 1 or spec.dim is None:
        return t.detach().clone()
    pieces = [torch.empty_like(t) for _ in range(tp.size)]
    dist.all_gather(pieces, t.detach().contiguous(), group=tp.pg)
    return spec.unshard(pieces)


def full_grads(model, tp) -> dict:
    return {n: gather_full(p.grad, p.meta.spec, tp) for n, p in model.named_parameters()}


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, name: str = ""):
    """Elementwise |a - e| <= rtol * (|e| + max|e|): relative to the tensor's scale, so entries
    near zero are not judged by their own tiny magnitude."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


def tp_worker(rank, world, cfg, tp, sp, tokens, labels):
    ps = ParallelState.create(tp=tp)
    model = build_model(cfg, ps, sequence_parallel=sp)
    loss = model(tokens, labels).mean()
    loss.backward()
    finalize_grads([model], ps, grad_of=lambda p: p.grad)
    grads = full_grads(model, ps.tp)
    return {"loss": loss.detach(), "grads": grads} if rank == 0 else None


def trainer_grads(tr, vocab: int) -> dict:
    """A post-training trainer's DP-reduced gradients after its backward, every one whole (TP-gathered; the
    embedding and LM head cut to the real vocab). ZeRO-1 leaves each DP rank the reduced sum of its own shard
    of every bucket only (the rest is stale local values): the owned shards are summed over DP first, so the
    gradients read as DDP's."""
    from megagpt.optim.finalize import finalize_grads
    buf = tr.optimizer.buffer
    buf.finish_grad_sync()
    if buf.reduce_scatter:
        full = torch.zeros_like(buf.data)
        for b in buf.buckets:
            lo, hi = buf.owned_range(b)
            full[lo:hi] = buf.data[lo:hi]
        tr.ps.dp.all_reduce(full)
        buf.data.copy_(full)
    finalize_grads(tr.chunks, tr.ps)
    return {n: gather_full(p.main_grad, p.meta.spec, tr.ps.tp)[:vocab] if n in ("embedding.weight", "lm_head.weight")
            else gather_full(p.main_grad, p.meta.spec, tr.ps.tp) for c in tr.chunks for n, p in c.named_parameters()}
