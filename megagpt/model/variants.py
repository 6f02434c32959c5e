"""Attention variants beyond causal and sliding window: global workspace tokens and adaptive span.

Workspace tokens (model.workspace_tokens = n, model.workspace_every = k or None). The sequence of
train.seq_len positions holds n learned workspace slots at its start (and, with k, at every multiple
of k): slot p is a workspace slot iff p % k < n (p < n without k). The text fills the other slots in
order (`insert_workspace`), so each text token's label is still the next text token; workspace slots
carry no loss (`GPTModel` zeroes their per-token loss and the trainer divides by the text tokens,
`loss_tokens`). Positions: a slot's RoPE position is its index in the inserted sequence. The mask
(`workspace_mask`): causal, and key j is visible to query i iff i - j < window (the sliding window, or
everything without one), or j is a workspace slot (every token sees the workspace before it), or i is
one (a workspace token sees everything before it).

CP methods (`cp_method`): the ring (parallel/context.py) serves causal and window masks; the
workspace mask and the adaptive span are served by the all-gather method (`allgather_attention`,
`adaptive_span_attention` with a group): K/V of the whole sequence gathered over the CP group
(all-gather forward, reduce-scatter backward, a conjugate pair), then the mask for this rank's zigzag
query rows. It also serves causal and window masks (model.cp_attention=allgather).

Adaptive span (Sukhbaatar et al. 2019; model.adaptive_span): head h has a span parameter p_h; its span
is z_h = max_seq_len * clamp(p_h, 0, 1), and a key at distance x = i - j is weighted by the soft ramp
m(x) = clamp((R + z_h - x) / R, 0, 1) (R = model.span_ramp): weights softmax(scores) * m, renormalised.
The L1 penalty span_penalty * sum_layers mean_h z_h joins the loss through the gradient only
(`SpanPenalty`): each forward adds its share of the penalty's gradient to p, in proportion to its
tokens (`span_grad_weight`, set by the trainer from the loss scale), so no scalar crosses stages.
"""
from __future__ import annotations

import torch

from ..parallel.context import band_mask, zigzag_index
from ..parallel.mappings import gather_from_sp
from ..parallel.state import Group

CP_METHODS = ("auto", "ring", "allgather")


# ----------------------------------------------------------------------------- workspace tokens

def workspace_slots(seq_len: int, n: int, every: int | None, device=None) -> torch.Tensor:
    """[seq_len] bool: True at the workspace slots."""
    pos = torch.arange(seq_len, device=device)
    return (pos % every < n) if every else pos < n


def workspace_index(seq_len: int, n: int, every: int | None, device=None) -> torch.Tensor:
    """[seq_len] long: which of the n workspace vectors a slot holds (meaningless at text slots)."""
    pos = torch.arange(seq_len, device=device)
    return (pos % every if every else pos).clamp(max=max(n - 1, 0))


def loss_tokens(m, seq_len: int) -> int:
    """Text tokens (the ones with a loss) in one sequence of seq_len positions."""
    if not m.workspace_tokens:
        return seq_len
    return seq_len - int(workspace_slots(seq_len, m.workspace_tokens, m.workspace_every).sum())


def insert_workspace(m, tokens: torch.Tensor, labels: torch.Tensor):
    """tokens, labels [b, s] (a text sample) -> [b, s] with the first loss_tokens(s) text tokens placed
    at the text slots in order, and token 0 / label 0 at the workspace slots (their loss is masked)."""
    if not m.workspace_tokens:
        return tokens, labels
    b, s = tokens.shape
    text = ~workspace_slots(s, m.workspace_tokens, m.workspace_every, tokens.device)
    n = int(text.sum())
    out_t, out_l = torch.zeros_like(tokens), torch.zeros_like(labels)
    out_t[:, text], out_l[:, text] = tokens[:, :n], labels[:, :n]
    return out_t, out_l


def workspace_mask(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None, slots: torch.Tensor) -> torch.Tensor:
    """[len(qpos), len(kpos)] bool (True = visible): causal; within the window, or a workspace key, or
    a workspace query. slots: [seq_len] bool over global positions."""
    causal = qpos[:, None] >= kpos[None, :]
    near = band_mask(qpos, kpos, window)
    return causal & (near | slots[kpos][None, :] | slots[qpos][:, None])


def attention_mask(m, seq_len: int, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
    """The model's dense mask between global query and key positions (causal, window, workspace)."""
    if m.workspace_tokens:
        slots = workspace_slots(seq_len, m.workspace_tokens, m.workspace_every, qpos.device)
        return workspace_mask(qpos, kpos, m.attention_window, slots)
    return band_mask(qpos, kpos, m.attention_window)


def cp_method(m) -> str:
    """The CP method serving m's mask: model.cp_attention, or with "auto" the ring for causal and window
    masks and the all-gather for workspace tokens (the ring cannot serve them)."""
    if m.cp_attention != "auto":
        return m.cp_attention
    return "allgather" if m.workspace_tokens or m.adaptive_span else "ring"


def blocked_attention(q, k, v, m, block: int = 128) -> torch.Tensor:
    """One process, the mask of `attention_mask` computed sparsely: q [b, s, nq, d], k/v [b, s, nkv, d] ->
    [b, s, nq, d]. Each block of `block` queries attends to the keys its window reaches plus the
    workspace keys before them (SDPA with the exact mask over those keys); workspace query rows, which
    see their whole past, are recomputed against every key. FLOPs ~ s * (window + block + workspace
    slots) instead of s^2 / 2."""
    import torch.nn.functional as F
    s, dev, w = q.shape[1], q.device, m.attention_window or q.shape[1]
    slots = workspace_slots(s, m.workspace_tokens, m.workspace_every, dev)
    slot_pos = slots.nonzero().flatten()
    gqa = q.shape[2] != k.shape[2]

    def attend(qpos, kpos):                                       # [b, len(qpos), nq, d]
        o = F.scaled_dot_product_attention(q[:, qpos].transpose(1, 2), k[:, kpos].transpose(1, 2),
                                           v[:, kpos].transpose(1, 2), attn_mask=attention_mask(m, s, qpos, kpos),
                                           enable_gqa=gqa)
        return o.transpose(1, 2)
    outs = []
    for a in range(0, s, block):
        qpos = torch.arange(a, min(a + block, s), device=dev)
        lo = max(0, a - w + 1)
        kpos = torch.cat([slot_pos[slot_pos < lo], torch.arange(lo, qpos[-1] + 1, device=dev)])
        outs.append(attend(qpos, kpos))
    out = torch.cat(outs, 1)
    if len(slot_pos):                                             # workspace rows see everything before them
        out = out.index_copy(1, slot_pos, attend(slot_pos, torch.arange(s, device=dev)))
    return out


# ----------------------------------------------------------------------------- the all-gather CP method

def gather_kv(k, v, group: Group, seq_len: int):
    """This rank's zigzag k/v [b, s/cp, nkv, d] -> the whole sequence's [b, s, nkv, d] each, in global order:
    all-gather over the CP group forward, reduce-scatter of dK/dV backward (a conjugate pair)."""
    cp = group.size
    kv = torch.stack([k, v]).permute(2, 0, 1, 3, 4).contiguous()  # [s/cp, 2, b, nkv, d]
    full = gather_from_sp(kv, group)                               # [s, 2, b, nkv, d], rank order
    order = torch.cat([zigzag_index(seq_len, cp, j, k.device) for j in range(cp)])
    inv = torch.empty_like(order)
    inv[order] = torch.arange(seq_len, device=k.device)
    full = full.index_select(0, inv)                               # global order
    return full[:, 0].transpose(0, 1), full[:, 1].transpose(0, 1)  # [b, s, nkv, d] each


def allgather_attention(q, k, v, group: Group, m, seq_len: int) -> torch.Tensor:
    """q [b, s/cp, nq, d], k/v [b, s/cp, nkv, d] (this rank's zigzag pair) -> [b, s/cp, nq, d]:
    K/V of the whole sequence gathered over the CP group (`gather_kv`), then the model's mask for this
    rank's query rows (causal, window, workspace; the adaptive span has its own, `adaptive_span_attention`)."""
    import torch.nn.functional as F
    kf, vf = gather_kv(k, v, group, seq_len)
    qpos = zigzag_index(seq_len, group.size, group.rank, q.device)
    mask = attention_mask(m, seq_len, qpos, torch.arange(seq_len, device=q.device))   # [s/cp, s]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2),
                                         attn_mask=mask, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------- adaptive span

def span_of(p: torch.Tensor, max_span: int) -> torch.Tensor:
    """Span parameters [heads] -> spans in tokens [heads]."""
    return p.clamp(0.0, 1.0) * max_span


def adaptive_span_attention(q, k, v, p, ramp: int, max_span: int, group: Group | None = None) -> torch.Tensor:
    """q [b, s, nq, d], k/v [b, s, nkv, d], p [nq] -> [b, s, nq, d]: causal softmax weights times the
    soft ramp m(i - j) of each head's span, renormalised (fp32 math). Under CP (group) q, k, v are this
    rank's zigzag rows: K/V are gathered whole (`gather_kv`, the all-gather CP method)."""
    b, s, nq, d = q.shape
    i = j = torch.arange(s, device=q.device)
    if group is not None and group.size > 1:
        seq_len = s * group.size
        k, v = gather_kv(k, v, group, seq_len)
        i, j = zigzag_index(seq_len, group.size, group.rank, q.device), torch.arange(seq_len, device=q.device)
    g = nq // k.shape[2]
    qh = q.float().transpose(1, 2)                                 # [b, nq, s, d]
    kh, vh = (t.float().repeat_interleave(g, dim=2).transpose(1, 2) for t in (k, v))
    scores = qh @ kh.transpose(-1, -2) * d ** -0.5                 # [b, nq, s, S]
    dist = (i[:, None] - j[None, :]).float()                       # [s, S]: query minus key position
    scores = scores.masked_fill(dist < 0, float("-inf"))
    ramp_mask = ((ramp + span_of(p, max_span)[:, None, None] - dist) / ramp).clamp(0.0, 1.0)   # [nq, s, S]
    w = scores.softmax(-1) * ramp_mask
    w = w / w.sum(-1, keepdim=True)
    return (w @ vh).transpose(1, 2).to(q.dtype)


class SpanPenalty(torch.autograd.Function):
    """Identity on x; backward adds weight * d(penalty)/dp to p's gradient, penalty = coeff * mean_h z_h
    over the model's num_heads heads (this rank holds some of them: TP splits heads)."""

    @staticmethod
    def forward(ctx, x, p, coeff: float, num_heads: int, max_span: int, weight: float):
        ctx.save_for_backward(p)
        ctx.scale = weight * coeff * max_span / num_heads
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (p,) = ctx.saved_tensors
        inside = ((p >= 0) & (p <= 1)).to(p.dtype)                 # the clamp's gradient
        return grad, inside * ctx.scale, None, None, None, None


def set_span_grad_weight(chunks, weight: float) -> None:
    """Each forward's share of the span penalty's gradient: the trainer passes loss_scale times the
    tokens of one microbatch on this rank, so the shares of a step sum to the loss scale."""
    for c in chunks:
        for mod in c.modules():
            if hasattr(mod, "span_grad_weight"):
                mod.span_grad_weight = weight


def mean_spans(chunks, max_span: int) -> dict[str, float]:
    """Mean span (tokens) per layer over this rank's heads: {"span/layer<i>": z}."""
    out = {}
    for c in chunks:
        for name, p in c.named_parameters():
            if name.endswith("attention.span"):
                out[f"span/layer{name.split('.')[1]}"] = float(span_of(p.detach(), max_span).mean())
    return out
