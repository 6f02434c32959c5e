"""RMSNorm's CPU autograd Function (the fused forward kernel, a four-pass backward) against F.rms_norm's
recorded decomposition: the forward bit for bit, input and weight gradients to 1e-6, a strided input,
a frozen weight, a float64 gradcheck, and which path Norm takes."""
import pytest
import torch
import torch.nn.functional as F

from megagpt.model.norm import Norm, RMSNormCPU


@pytest.mark.parametrize("strided", [False, True])
def test_function_matches_decomposition(strided):
    g = torch.Generator().manual_seed(0)
    s, b, h = 9, 3, 32
    base = torch.randn(s, b, 2 * h, generator=g) * 3
    x = base[..., :h] if strided else base[..., :h].contiguous()     # a strided view, as a split passes it
    w = torch.randn(h, generator=g)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    w1, w2 = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out, ref = RMSNormCPU.apply(x1, w1, 1e-5), F.rms_norm(x2, (h,), w2, 1e-5)
    assert torch.equal(out, ref)                                       # the same kernel's roundings
    up = torch.randn(ref.shape, generator=g)
    (out * up).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-6, atol=1e-6)
    assert not torch.equal(x1.grad, torch.zeros_like(x1.grad))


def test_frozen_weight_and_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormCPU.apply(a, b, 1e-5), (x, w))
    frozen = w.detach()
    RMSNormCPU.apply(x, frozen, 1e-5).sum().backward()
    assert x.grad is not None and frozen.grad is None


def test_norm_takes_the_function_only_under_autograd_in_fp32():
    n = Norm(16, "rmsnorm", 1e-5, False)
    x = torch.randn(3, 2, 16, requires_grad=True)
    assert type(n(x).grad_fn).__name__ == "RMSNormCPUBackward"
    with torch.no_grad():
        assert n(x).grad_fn is None
    half = Norm(16, "rmsnorm", 1e-5, False, dtype=torch.bfloat16)
    assert type(half(x.detach().bfloat16().requires_grad_()).grad_fn).__name__ != "RMSNormCPUBackward"
