"""Vocab-parallel cross-entropy: each TP rank holds logits [s, b, V/tp] and the full logits are never gathered.

Per token: loss = log(sum_v exp(z_v)) - z_label. The max, the sum of exponentials and the label's
logit are each reduced over TP (three small all-reduces of [s, b]). Columns of the padded vocab
(ids >= vocab_size) are masked out, so the loss does not depend on how much padding TP needed.

With TP = 1 nothing is reduced, and one fused softmax replaces the shift / exp / sum / divide passes
over the logits. The loss needs log(sum_v exp(z_v - max)), and the softmax holds it exactly where the
row's max sits: there p = 1/sum, so loss = -log(max_v p_v) - (z_label - max), never underflowing
(max_v p_v >= 1/V). The softmax is kept for the backward, softmax - onehot, done in place.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .state import Group


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, tp: Group, vocab_size: int):
        logits = logits.float()                                   # [s, b, V/tp]
        local_v = logits.shape[-1]
        start = tp.rank * local_v
        pad_from = vocab_size - start                             # local columns >= this are padding
        if pad_from < local_v:
            logits = logits.clone()
            logits[..., max(pad_from, 0):] = torch.finfo(logits.dtype).min
        row_max = logits.amax(dim=-1)                             # [s, b]; amax skips the unused argmax
        if tp.size > 1:
            tp.all_reduce(row_max, op=dist.ReduceOp.MAX)
        shifted = logits - row_max.unsqueeze(-1)
        outside = (labels < start) | (labels >= start + local_v)
        local_labels = (labels - start).masked_fill(outside, 0)
        label_logit = shifted.gather(-1, local_labels.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp_()                                      # reuse the buffer: [s, b, V/tp]
        sum_exp = exp.sum(dim=-1)
        if tp.size > 1:                                           # one call for both sums
            both = torch.stack([label_logit, sum_exp])
            tp.all_reduce(both)
            label_logit, sum_exp = both[0], both[1]
        loss = sum_exp.log() - label_logit                        # [s, b]
        exp.div_(sum_exp.unsqueeze(-1))                           # softmax, kept for backward
        ctx.save_for_backward(exp, local_labels, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_labels, outside = ctx.saved_tensors
        grad = softmax                                            # d loss / d z = softmax - onehot(label)
        grad.scatter_add_(-1, local_labels.unsqueeze(-1), (~outside).to(grad.dtype).neg().unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None


class _SerialCE(torch.autograd.Function):
    """TP = 1 over the real vocabulary (padding columns dropped), see the module docstring."""
    @staticmethod
    def forward(ctx, logits, labels, vocab_size: int):
        z = logits[..., :vocab_size]                                                     # [s, b, V]
        row_max = z.amax(dim=-1).float()                                                 # [s, b]
        probs = torch.softmax(z, dim=-1, dtype=torch.float32)                            # [s, b, V]
        label_logit = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1).float()             # [s, b]
        loss = probs.amax(dim=-1).log_().neg_().sub_(label_logit - row_max)              # [s, b]
        ctx.save_for_backward(probs, labels)
        ctx.padded, ctx.in_dtype = logits.shape[-1], logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        probs, labels = ctx.saved_tensors
        g = grad_loss.unsqueeze(-1)                                                      # [s, b, 1]
        grad = probs.mul_(g)                                                             # softmax * dloss
        grad.scatter_add_(-1, labels.unsqueeze(-1), g.neg())                             # - onehot * dloss
        if ctx.padded > grad.shape[-1]:
            grad = torch.nn.functional.pad(grad, (0, ctx.padded - grad.shape[-1]))
        return grad.to(ctx.in_dtype), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp: Group,
                                 vocab_size: int) -> torch.Tensor:
    """logits [s, b, V/tp], labels [s, b] -> per-token loss [s, b] in fp32."""
    if tp.size == 1:
        return _SerialCE.apply(logits, labels, vocab_size)
    return _VocabParallelCE.apply(logits, labels, tp, vocab_size)
