"""RoPE's rotate-half autograd Function (halves written in place, the backward the inverse rotation)
against the chunk + cat formula through autograd: outputs and input gradients, full and partial
rotary fractions, per-row tables (generation), the forward bit for bit, gradients to 1e-6, and a float64 gradcheck."""
import pytest
import torch

from megagpt.model.rope import _RotateHalf, apply_rope, rope_tables


def reference(x, cos, sin):
    rot = 2 * cos.shape[-1]
    x1, x2 = x[..., :rot].chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot:]], dim=-1)


@pytest.mark.parametrize("d,rot,per_row", [(16, 16, False), (16, 8, False), (12, 12, True)])
def test_rotate_half_matches_chunk_cat(d, rot, per_row):
    g = torch.Generator().manual_seed(0)
    s, b, h = 7, 3, 4
    cos, sin = rope_tables(s + 5, rot, 10000.0, 1.0, "cpu")
    cos, sin = cos[5:], sin[5:]                                     # positions 5.. (not starting at 0)
    if per_row:                                                    # [s, b, 1, rot/2]: a table per row
        cos, sin = cos.expand(s, b, 1, rot // 2).clone(), sin.expand(s, b, 1, rot // 2).clone()
        cos[:, 1], sin[:, 1] = cos[:, 1].roll(1, 0), sin[:, 1].roll(1, 0)
    qkv = torch.randn(s, b, 3 * h * d, generator=g)
    x = qkv[..., : h * d].view(s, b, h, d)                         # a strided view, as attention passes it
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    out, ref = apply_rope(x1, cos, sin, False), reference(x2, cos, sin)
    assert out.is_contiguous() and out.shape == ref.shape
    assert torch.equal(out, ref)                                    # the same roundings, bit for bit
    up = torch.randn(ref.shape, generator=g)
    (out * up).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-6)
    assert not torch.equal(out[..., :rot], x[..., :rot])           # it did rotate


def test_rotate_half_gradcheck():
    g = torch.Generator().manual_seed(1)
    cos, sin = rope_tables(5, 6, 100.0, 1.0, "cpu", torch.float64)
    x = torch.randn(5, 2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _RotateHalf.apply(t, cos, sin), (x,))
