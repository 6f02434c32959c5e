"""Vocab-parallel cross-entropy with logits of magnitude ~100, where exp() overflows fp32 (above ~88)
or underflows to 0 (below ~-103) unless each row is shifted by its max first: loss and gradient
against F.cross_entropy in fp32 on the same values, TP 1/2/4, fp32 and bf16 logits."""
import pytest
import torch
import torch.nn.functional as F

from dist import assert_close_rel, spawn
from test_tensor_parallel import _ce_worker

CASES = [(tp, dtype, vocab) for dtype in ("fp32", "bf16") for tp, vocab in ((1, 40), (1, 37), (2, 40), (4, 37))]


def large_logits(dtype: torch.dtype, padded: int) -> torch.Tensor:
    """[6, 2, padded]: rows centred at +100 and at -100, spread 20."""
    g = torch.Generator().manual_seed(5)
    centre = torch.tensor([100.0, -100.0]).repeat(3).view(6, 1, 1)
    return (centre + 20 * torch.randn(6, 2, padded, generator=g)).to(dtype)


@pytest.mark.parametrize("tp,dtype,vocab", CASES, ids=[f"tp{t}-{d}-v{v}" for t, d, v in CASES])
def test_cross_entropy_with_logits_near_100(tp, dtype, vocab):
    padded = 40
    logits = large_logits(getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype]), padded)
    labels = torch.randint(0, vocab, (6, 2), generator=torch.Generator().manual_seed(6))
    ref_logits = logits[..., :vocab].float().requires_grad_(True)
    ref = F.cross_entropy(ref_logits.reshape(-1, vocab), labels.reshape(-1), reduction="none").view(6, 2)
    ref.sum().backward()
    assert torch.isfinite(ref).all() and ref.abs().max() > 10
    for r in spawn(tp, _ce_worker, logits, labels, vocab):
        assert torch.isfinite(r["loss"]).all(), r["loss"]
        assert_close_rel(r["loss"], ref.detach(), name="ce loss")
        grad, want = r["grad"][..., :vocab], ref_logits.grad
        assert grad.dtype == logits.dtype
        if dtype == "bf16":                      # fp32 inside, then rounded to the logits' dtype
            want = want.to(torch.bfloat16)
            torch.testing.assert_close(grad.float(), want.float(), rtol=2 ** -7, atol=2 ** -7 * want.abs().max().item())
        else:
            assert_close_rel(grad, want, name="ce grad")
        assert torch.all(r["grad"][..., vocab:] == 0)
