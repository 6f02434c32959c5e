"""Context parallelism: zigzag sequence sharding and ring attention over the CP group.

Zigzag sharding. The sequence is cut into 2*cp chunks of c = s/(2cp) tokens; CP rank r keeps
chunks r and 2cp-1-r, in that order, so every rank holds one early and one late chunk and the causal
work is balanced. Tokens, labels, loss masks, position ids and the RoPE tables are all cut with
the one index `zigzag_index` (a rank's local order is increasing in global position, so causality
inside the local pair is the plain causal mask).

Ring attention (`ring_attention`, an autograd Function). Each rank holds q, k, v of its 2c tokens.
K and V travel around the ring (rank r sends to r+1, receives from r-1) with non-blocking
isend/irecv that are posted before the current block's compute and waited on after it. At step i
rank r holds the K/V of rank j = r - i (mod cp):
  i = 0     both local chunks against both: the causal mask;
  j < r     chunk j precedes both of r's chunks, chunk 2cp-1-j follows both: all of q against
            the first half of the K/V, no mask;
  j > r     chunk r precedes both of j's chunks, chunk 2cp-1-r follows both: the second half of q
            against all of the K/V, no mask.
Every off-diagonal step is half a block, so every rank does the same work. Block outputs merge by
online softmax with the log-sum-exp, in fp32. Backward recomputes each block's probabilities from
the final log-sum-exp (p = exp(s - lse), D = rowsum(dO * O)), K/V travel the ring again, and a
dK/dV accumulator (fp32) travels with them: after cp steps and one more hop it is back at its
owner, summed over every rank's queries. A block's gradients are computed before its accumulator is
waited for, so the accumulator's hop overlaps that compute as the K/V hop does.

Bytes per call and rank (counted in the CP group's CommCounter as send and recv, each of them;
comm_model.cp_ring_bytes is the formula): forward (cp-1) K/V blocks [2, b, s/cp, nkv, d] in the
input dtype; backward (cp-1) K/V blocks again plus cp dK/dV blocks in fp32.

Kernels (`_kernels`), each a block forward returning (out, lse) and a backward taking the final
out and lse: flash-attn's on CUDA with a 16-bit dtype when it imports; torch's fused CPU flash
kernel (aten._scaled_dot_product_flash_attention_for_cpu and its backward) on the CPU; and the
math kernel (`_torch_block_fwd/_bwd`: matmuls in fp32 on any device, the reference).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .state import Group


# ----------------------------------------------------------------------------- zigzag sharding

def zigzag_index(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global positions held by CP rank `rank`: chunks rank and 2cp-1-rank of size seq_len/(2cp)."""
    if seq_len % (2 * cp):
        raise ValueError(f"zigzag: sequence length {seq_len} is not divisible by 2*cp={2 * cp}")
    c = seq_len // (2 * cp)
    first = torch.arange(rank * c, (rank + 1) * c, device=device)
    second = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)
    return torch.cat([first, second])


def zigzag_shard(t: torch.Tensor, dim: int, cp: int, rank: int) -> torch.Tensor:
    """This rank's s/cp positions of t along dim (t holds the whole sequence there)."""
    if cp == 1:
        return t
    return t.index_select(dim, zigzag_index(t.shape[dim], cp, rank, t.device))


def zigzag_unshard(pieces: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The inverse: every rank's piece (rank order) -> the whole sequence along dim."""
    cp = len(pieces)
    s = pieces[0].shape[dim] * cp
    out = torch.empty_like(torch.cat(pieces, dim))
    for r, piece in enumerate(pieces):
        out.index_copy_(dim, zigzag_index(s, cp, r, piece.device), piece)
    return out


# ----------------------------------------------------------------------------- block kernels

def _heads(x: torch.Tensor, nkv: int) -> torch.Tensor:
    """[b, s, n, d] -> [b, nkv, n/nkv, s, d] fp32 (query head h = kv head * group + i, as SDPA's enable_gqa)."""
    b, s, n, d = x.shape
    return x.float().permute(0, 2, 1, 3).reshape(b, nkv, n // nkv, s, d)


def band_mask(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[len(qpos), len(kpos)] bool, True where a query at global position qpos may see a key at kpos:
    causal, and with a sliding window only the `window` positions ending at the query's own."""
    diff = qpos[:, None] - kpos[None, :]
    return (diff >= 0) & (diff < window) if window is not None else diff >= 0


def _scores(q, k, mask, scale: float) -> torch.Tensor:
    """q [b, sq, nq, d], k [b, sk, nkv, d] -> scores [b, nkv, g, sq, sk] fp32, masked to -inf.
    mask: None (all visible), "causal" (sq == sk, the future hidden) or a bool [sq, sk] (True = visible)."""
    s = _heads(q, k.shape[2]) @ _heads(k, k.shape[2]).transpose(-1, -2) * scale
    if isinstance(mask, str):
        sq, sk = s.shape[-2:]
        s.masked_fill_(torch.ones(sq, sk, dtype=torch.bool, device=s.device).triu_(1), float("-inf"))
    elif mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    return s


def _torch_block_fwd(q, k, v, mask, scale: float):
    """-> out [b, sq, nq, d] fp32, lse [b, nq, sq] fp32 (-inf, with a zero output, for a row that sees nothing)."""
    b, sq, nq, d = q.shape
    s = _scores(q, k, mask, scale)                               # [b, nkv, g, sq, sk]
    lse = s.logsumexp(-1)                                        # [b, nkv, g, sq]
    safe = lse.masked_fill(lse == float("-inf"), 0.0)
    out = (s - safe.unsqueeze(-1)).exp_() @ _heads(v, v.shape[2])  # [b, nkv, g, sq, d]
    return out.reshape(b, nq, sq, d).permute(0, 2, 1, 3), lse.reshape(b, nq, sq)


def _torch_block_bwd(dout, q, k, v, lse, delta, mask, scale: float):
    """dout [b, sq, nq, d]; lse, delta [b, nq, sq] (final ones) -> dq [b, sq, nq, d], dk, dv [b, sk, nkv, d], fp32."""
    b, sq, nq, d = q.shape
    nkv = k.shape[2]
    g = nq // nkv
    p = (_scores(q, k, mask, scale) - lse.reshape(b, nkv, g, sq, 1)).exp_()   # [b, nkv, g, sq, sk]
    do = _heads(dout, nkv)                                       # [b, nkv, g, sq, d]
    dv = (p.transpose(-1, -2) @ do).sum(2)                       # [b, nkv, sk, d]
    ds = p.mul_(do @ _heads(v, nkv).transpose(-1, -2) - delta.reshape(b, nkv, g, sq, 1))
    dq = ds @ _heads(k, nkv) * scale                             # [b, nkv, g, sq, d]
    dk = (ds.transpose(-1, -2) @ _heads(q, nkv)).sum(2) * scale  # [b, nkv, sk, d]
    return (dq.reshape(b, nq, sq, d).permute(0, 2, 1, 3), dk.permute(0, 2, 1, 3), dv.permute(0, 2, 1, 3))


def _flash_kernels():
    """flash-attn's block forward/backward that return/take the lse, or None: not installed, or older
    than 2.6 (whose private signatures differ; checked, never guessed)."""
    try:
        import inspect

        from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward
        if "window_size_left" not in inspect.signature(_flash_attn_forward).parameters:
            return None
    except (ImportError, TypeError, ValueError):
        return None

    def fwd(q, k, v, causal, scale):
        q, k, v = (t.contiguous() for t in (q, k, v))
        out, lse = _flash_attn_forward(q, k, v, 0.0, scale, causal=causal, window_size_left=-1,
                                       window_size_right=-1, softcap=0.0, alibi_slopes=None,
                                       return_softmax=False)[:2]
        return out.float(), lse.float()                          # [b, sq, nq, d], [b, nq, sq]

    def bwd(dout, q, k, v, out, lse, delta, causal, scale):
        dout, q, k, v, out = (t.contiguous() for t in (dout, q, k, v, out))
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _flash_attn_backward(dout, q, k, v, out, lse.contiguous(), dq, dk, dv, 0.0, scale, causal, -1, -1, 0.0,
                             None, False)
        return dq.float(), dk.float(), dv.float()
    return fwd, bwd


def _expand(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, s, nkv, d] -> [b, nq, s, d]: each KV head repeated for its query heads (SDPA's enable_gqa)."""
    return x.repeat_interleave(groups, dim=2).transpose(1, 2)


def _cpu_fused_fwd(q, k, v, causal: bool, scale: float):
    """torch's fused CPU flash kernel (it returns the lse): out [b, sq, nq, d] fp32, lse [b, nq, sq] fp32."""
    g = q.shape[2] // k.shape[2]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), _expand(k, g), _expand(v, g), 0.0, causal, scale=scale)
    return out.transpose(1, 2).float(), lse.float()


def _cpu_fused_bwd(dout, q, k, v, out, lse, delta, causal: bool, scale: float):
    """Its backward, given the final out and lse: dq [b, sq, nq, d], dk, dv [b, sk, nkv, d], fp32."""
    b, sk, nkv, d = k.shape
    g = q.shape[2] // nkv
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.transpose(1, 2).contiguous(), q.transpose(1, 2), _expand(k, g), _expand(v, g),
        out.transpose(1, 2).contiguous(), lse.contiguous(), 0.0, causal, scale=scale)
    def fold(x):  # [b, nq, sk, d] -> summed over each KV head's query heads [b, sk, nkv, d]
        return x.transpose(1, 2).reshape(b, sk, nkv, g, d).sum(3).float()
    return dq.transpose(1, 2).float(), fold(dk), fold(dv)


def _math_bwd(dout, q, k, v, out, lse, delta, mask, scale: float):
    return _torch_block_bwd(dout, q, k, v, lse, delta, mask, scale)


def _masked(fwd, bwd):
    """A fused kernel's pair taking the ring's masks: None / "causal" go to the kernel, an explicit
    bool mask (a sliding window's band) to the math kernel."""
    def f(q, k, v, mask, scale):
        return _torch_block_fwd(q, k, v, mask, scale) if torch.is_tensor(mask) else fwd(q, k, v, mask is not None,
                                                                                          scale)

    def b(dout, q, k, v, out, lse, delta, mask, scale):
        if torch.is_tensor(mask):
            return _torch_block_bwd(dout, q, k, v, lse, delta, mask, scale)
        return bwd(dout, q, k, v, out, lse, delta, mask is not None, scale)
    return f, b


KERNELS = ("auto", "flash", "cpu_fused", "math")


def _kernels(q: torch.Tensor, kernel: str):
    """(block forward, block backward) for q's device and dtype: flash-attn on CUDA in 16 bits when it
    imports, torch's fused CPU flash kernel on the CPU, else the math kernel (any device, fp32 math)."""
    if kernel not in KERNELS:
        raise ValueError(f"ring attention: kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    flash = _flash_kernels() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if kernel == "flash" or (kernel == "auto" and flash is not None):
        if flash is None:
            raise ValueError("ring attention: the flash kernel needs flash-attn, CUDA and a 16-bit dtype")
        return _masked(*flash)
    cpu = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu") and q.device.type == "cpu"
    if kernel == "cpu_fused" or (kernel == "auto" and cpu):
        return _masked(_cpu_fused_fwd, _cpu_fused_bwd)
    return _torch_block_fwd, _math_bwd


# ----------------------------------------------------------------------------- the ring

class _Ring:
    """Non-blocking exchange with the ring neighbours of a CP group: send to r+1, receive from r-1."""

    def __init__(self, group: Group):
        self.group = group
        self.next = group.ranks[(group.rank + 1) % group.size]
        self.prev = group.ranks[(group.rank - 1) % group.size]

    def post(self, t: torch.Tensor):
        """Start sending t on and receiving a tensor like it; returns (buffer, works)."""
        buf = torch.empty_like(t)
        ops = [dist.P2POp(dist.isend, t, self.next, group=self.group.pg),
               dist.P2POp(dist.irecv, buf, self.prev, group=self.group.pg)]
        if self.group.counter is not None:
            nbytes = t.numel() * t.element_size()
            self.group.counter.add("send", self.group.name, nbytes)
            self.group.counter.add("recv", self.group.name, nbytes)
        return buf, dist.batch_isend_irecv(ops)


def _wait(works):
    for w in works:
        w.wait()


def _merge(out, lse, o, lse_o):
    """Online softmax in place: out [b, s, n, d], lse [b, n, s] (fp32) absorb a block's (o, lse_o)."""
    new = torch.logaddexp(lse, lse_o)
    out.mul_((lse - new).exp().transpose(1, 2).unsqueeze(-1)).add_(o * (lse_o - new).exp().transpose(1, 2).unsqueeze(-1))
    lse.copy_(new)


def _plan(cp: int, r: int, j: int, c: int, window: int | None):
    """What rank r computes with the K/V of rank j: (query rows, key rows, mask) or None when no
    query sees any key. Without a window: the zigzag rule of the module docstring; with one, the
    band of global positions on top (an explicit mask where it cuts a block, the block skipped
    where it hides it all)."""
    if j == r:
        qs, ks, mask = slice(None), slice(None), "causal"
    elif j < r:
        qs, ks, mask = slice(None), slice(0, c), None
    else:
        qs, ks, mask = slice(c, None), slice(None), None
    if window is None:
        return qs, ks, mask
    s = 2 * c * cp
    qpos, kpos = zigzag_index(s, cp, r)[qs], zigzag_index(s, cp, j)[ks]
    band = band_mask(qpos, kpos, window)
    if not band.any():
        return None
    return qs, ks, (mask if torch.equal(band, band_mask(qpos, kpos, None)) else band)


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group: Group, scale: float, kernel: str, window: int | None):
        """q [b, 2c, nq, d], k/v [b, 2c, nkv, d] (this rank's zigzag pair of chunks) -> [b, 2c, nq, d]."""
        cp, r, c = group.size, group.rank, q.shape[1] // 2
        block, block_bwd = _kernels(q, kernel)
        ring = _Ring(group) if cp > 1 else None
        kv = torch.stack([k, v]).contiguous()                    # [2, b, 2c, nkv, d]: one message per hop
        out = lse = None
        for i in range(cp):
            works = []
            if i + 1 < cp:
                nxt, works = ring.post(kv)                       # overlaps this block's compute
            plan = _plan(cp, r, (r - i) % cp, c, window)
            if plan is not None:
                qs, ks, mask = plan
                o, l = block(q[:, qs], kv[0, :, ks], kv[1, :, ks], mask, scale)
                if out is None:                                  # step 0: every query sees itself
                    out, lse = o.contiguous(), l.contiguous()
                else:
                    _merge(out[:, qs], lse[..., qs], o, l)
            _wait(works)
            if works:
                kv = nxt
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale, ctx.block_bwd, ctx.window = group, scale, block_bwd, window
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
        cp, r, c = group.size, group.rank, q.shape[1] // 2
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()   # [b, nq, 2c]
        ring = _Ring(group) if cp > 1 else None
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
        dkv_works = []
        for i in range(cp):
            kv_works = []
            if i + 1 < cp:
                nxt, kv_works = ring.post(kv)
            plan = _plan(cp, r, (r - i) % cp, c, ctx.window)
            if plan is not None:                                 # computed while the accumulator arrives
                qs, ks, mask = plan
                gq, gk, gv = ctx.block_bwd(dout[:, qs], q[:, qs], kv[0, :, ks], kv[1, :, ks], out[:, qs],
                                           lse[..., qs], delta[..., qs], mask, scale)
                dq[:, qs] += gq
            _wait(dkv_works)                                     # the accumulator for this K/V block
            if plan is not None:
                dkv[0, :, ks] += gk
                dkv[1, :, ks] += gv
            if ring is not None:                                 # on to the next holder (the owner after cp hops)
                dkv, dkv_works = ring.post(dkv)
            _wait(kv_works)
            if kv_works:
                kv = nxt
        _wait(dkv_works)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Group,
                   scale: float | None = None, kernel: str = "auto", window: int | None = None) -> torch.Tensor:
    """Causal attention over the whole sequence of a CP group, each rank holding its zigzag pair:
    q [b, s/cp, nq, d], k/v [b, s/cp, nkv, d] -> [b, s/cp, nq, d]. kernel: see KERNELS / `_kernels`;
    window: a sliding window of that many tokens (`band_mask`), exact: blocks it cuts get an explicit
    mask (math kernel), blocks it hides are skipped, and the K/V still make every hop."""
    if q.shape[1] % 2:
        raise ValueError(f"ring attention: the local sequence {q.shape[1]} is not two equal zigzag chunks")
    return RingAttention.apply(q, k, v, group, q.shape[-1] ** -0.5 if scale is None else scale, kernel, window)
