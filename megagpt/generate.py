"""Generation with a KV cache, in one process or in any TP x PP (x vp) layout; DP ranks are independent replicas.

Every rank of a model replica calls the same function with the same prompts. A step runs the model's
chunks in global chunk order: chunk c lives on pipeline rank c % pp (pipeline/split.py's layout), its
input is the tokens (chunk 0) or the hidden states [s, b, h] received from the previous chunk's rank
through `pipeline.p2p.P2P` (counted under "pp"), and each chunk keeps its own `KVCache`.
The first step (prefill) runs the left-padded prompts [b, P]; each later step (decode) runs one token.

Every rank picks the same token: the last stage's TP rank 0 draws it from the gathered logits with
the seeded generator, then `Group.broadcast` sends it over the last stage's TP group and along each
pipeline group from the last stage. So only one generator advances, and every rank sees the tokens it
needs (the first stage to embed them, all ranks to stop together).
Not supported: sequence parallelism inside generation (build the model without it; the weights are the
same) and context parallelism (cp > 1) -- both are refused with one line.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .kv_cache import KVCache
from .parallel.state import ParallelState
from .pipeline.p2p import P2P
from .sampling import Sampling, next_tokens


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> tokens [b, P] right-aligned, and each row's pad count [b]."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompt: every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)
    return tokens, torch.tensor([width - len(p) for p in prompts], dtype=torch.long)


class Runner:
    """One forward step of a model replica's chunks over their caches, on every rank of the replica."""

    def __init__(self, chunks, ps: ParallelState | None = None):
        self.chunks = list(chunks) if isinstance(chunks, (list, tuple)) else [chunks]
        self.ps = ps or self.chunks[0].ps
        if self.ps.sizes.get("cp", 1) > 1:
            raise ValueError("generation: context parallelism (parallel.cp > 1) is not supported")
        self.pp, self.me = self.ps.pp.size, self.ps.pp.rank
        self.n = self.pp * len(self.chunks)                       # global chunks
        self.cfg = self.chunks[0].cfg
        self._p2p: dict[tuple, P2P] = {}
        for c in self.chunks:
            c.eval()

    @property
    def is_last(self) -> bool:
        return self.me == self.pp - 1

    def _link(self, shape) -> P2P:
        if shape not in self._p2p:
            p = next(self.chunks[0].parameters())
            self._p2p[shape] = P2P(self.ps.pp, self.ps.counter, shape, p.dtype, p.device)
        return self._p2p[shape]

    def new_caches(self, batch: int, max_len: int, pad: torch.Tensor) -> list[KVCache]:
        caches = [KVCache(c, batch, max_len, pad) for c in self.chunks]
        for c in caches:
            c.last_only = True
        return caches

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, caches: list[KVCache], media=None) -> torch.Tensor | None:
        """tokens [b, s] (the same on every rank) -> the last slot's logits [b, vocab] (fp32) on the
        last stage, None elsewhere. media (a multimodal spec.Media): the prompts' images and audio,
        embedded by the first chunk into their placeholder rows (the prefill)."""
        b, s = tokens.shape
        shape = (s, b, self.cfg.hidden_size)                      # what crosses a stage boundary
        x, sends = tokens, []
        for c in range(self.n):
            if c % self.pp != self.me:
                continue
            prev = (c - 1) % self.pp
            if c > 0 and prev != self.me:
                ((x, works),) = self._link(shape).post([("recv", prev, None)])
                for w in works:
                    w.wait()
            kw = {"media": media} if c == 0 and media is not None else {}
            x = self.chunks[c // self.pp](x, cache=caches[c // self.pp], **kw)   # [s, b, h], or logits [s, b, V/tp]
            nxt = (c + 1) % self.pp
            if c < self.n - 1 and nxt != self.me:
                sends += self._link(shape).post([("send", nxt, x)])
        for _, works in sends:
            for w in works:
                w.wait()
        if not self.is_last:
            return None
        return self.chunks[-1].gather_logits(x[-1:])[:, 0].float()     # [b, vocab]

    def pick(self, logits: torch.Tensor | None, seen: torch.Tensor, sampling: Sampling,
             generator: torch.Generator | None) -> torch.Tensor:
        """The next token of each row [b] on every rank: drawn on the last stage's TP rank 0, broadcast."""
        tp, b = self.ps.tp, seen.shape[0]
        if self.is_last and tp.rank == 0:
            tok = next_tokens(logits, seen, sampling, generator)
        else:
            tok = torch.empty(b, dtype=torch.long, device=seen.device)
        if self.is_last:
            tp.broadcast(tok, 0)
        self.ps.pp.broadcast(tok, self.pp - 1)
        return tok


@torch.no_grad()
def stream(chunks, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling | None = None, *,
           ps: ParallelState | None = None, eod_id: int | None = None,
           stop: Callable[[list[int]], bool] | None = None, num_samples: int = 1,
           generator: torch.Generator | None = None, media=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (tokens [B], finished [B]) once per new token, B = len(prompts) * num_samples (row i's
    samples are rows i*n .. i*n+n-1). media: the prompts' images and audio (multimodal spec.Media, in
    the order of their placeholder runs), used by the prefill. A row finishes on eod_id or when stop(its generated ids) is
    true; finished rows then yield eod_id (or 0). Stops when every row has finished or after
    max_new_tokens (fewer if the context fills). The prompts are prefilled once, whatever num_samples."""
    sampling = (sampling or Sampling()).validate()
    run = Runner(chunks, ps)
    cfg, dev = run.cfg, next(run.chunks[0].parameters()).device
    tokens, pad = left_pad(prompts, eod_id or 0)
    width = tokens.shape[1]
    if width >= cfg.max_seq_len:
        raise ValueError(f"prompt: {width} tokens leave no room in the context of model.max_seq_len={cfg.max_seq_len}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
    steps = min(max_new_tokens, cfg.max_seq_len - width)
    b, n = tokens.shape[0], num_samples
    if generator is None and sampling.do_sample:
        generator = torch.Generator(dev).manual_seed(sampling.seed)
    seen = torch.zeros(b, cfg.vocab_size, dtype=torch.bool, device=dev)    # for the repetition penalty
    for i, p in enumerate(prompts):
        seen[i, torch.tensor(p, dtype=torch.long, device=dev)] = True
    caches = run.new_caches(b, width + steps, pad.to(dev))
    logits = run.forward(tokens.to(dev), caches, media.to(dev) if media is not None else None)  # prefill: [b, V]
    if n > 1:                                                               # share the prompt's cache
        caches = [c.repeat(n) for c in caches]
        seen = seen.repeat_interleave(n, dim=0)
        logits = logits.repeat_interleave(n, dim=0) if logits is not None else None
    done = torch.zeros(b * n, dtype=torch.bool, device=dev)
    generated: list[list[int]] = [[] for _ in range(b * n)]
    filler = eod_id if eod_id is not None else 0
    for step in range(steps):
        tok = run.pick(logits, seen, sampling, generator)
        tok = torch.where(done, torch.full_like(tok, filler), tok)
        seen[torch.arange(b * n, device=dev), tok] |= ~done
        for r in (~done).nonzero().flatten().tolist():
            generated[r].append(int(tok[r]))
            if (eod_id is not None and generated[r][-1] == eod_id) or (stop is not None and stop(generated[r])):
                done[r] = True
        yield tok, done.clone()
        if bool(done.all()) or step == steps - 1:
            return
        logits = run.forward(tok[:, None], caches)


def generate_ids(chunks, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling | None = None,
                 on_token: Callable[[torch.Tensor, torch.Tensor], None] | None = None, **kwargs) -> list[list[int]]:
    """The generated ids of each row (the EOD that ended it included), on every rank. on_token(tokens,
    finished) is called for each step as it is produced (streaming)."""
    out = None
    for tok, done in stream(chunks, prompts, max_new_tokens, sampling, **kwargs):
        if on_token is not None:
            on_token(tok, done)
        if out is None:
            out, was_done = [[] for _ in range(tok.shape[0])], torch.zeros_like(done)
        for r in (~was_done).nonzero().flatten().tolist():
            out[r].append(int(tok[r]))
        was_done = done
    return out


def generate(model, prompt: torch.Tensor, new_tokens: int, top_k: int = 0, temperature: float = 1.0,
             generator: torch.Generator | None = None, eod_id: int | None = None, *, top_p: float = 1.0,
             repetition_penalty: float = 1.0, do_sample: bool | None = None, seed: int = 0,
             ps: ParallelState | None = None) -> torch.Tensor:
    """prompt [b, s] -> [b, s + k], k <= new_tokens (rows that finished early are filled with eod_id).
    `model` is a GPTModel or this rank's list of chunks. Samples when do_sample, or (when None) when
    top_k > 0 or top_p < 1; greedy otherwise."""
    do_sample = (top_k > 0 or top_p < 1.0) if do_sample is None else do_sample
    sampling = Sampling(do_sample, temperature, top_k, top_p, repetition_penalty, seed)
    steps = [tok for tok, _ in stream(model, prompt.tolist(), new_tokens, sampling, ps=ps, eod_id=eod_id,
                                      generator=generator)]
    return torch.cat([prompt, torch.stack(steps, dim=1).to(prompt.device)], dim=1)


@torch.no_grad()
def generate_recompute(model, prompt: torch.Tensor, new_tokens: int, sampling: Sampling | None = None,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The reference without a cache (one process, rows of equal length): re-runs the whole prefix for
    every token, with generation's routing (mixture of depths by its causal predictor, model/mod.py).
    Returns tokens [b, s + new_tokens] and each step's logits [b, vocab]."""
    sampling = (sampling or Sampling()).validate()
    if generator is None and sampling.do_sample:
        generator = torch.Generator().manual_seed(sampling.seed)
    model.eval()
    tokens, all_logits = prompt, []
    seen = torch.zeros(prompt.shape[0], model.cfg.vocab_size, dtype=torch.bool).scatter_(1, prompt, True)
    model.moe.causal_routing, before = True, model.moe.causal_routing
    try:
        for _ in range(new_tokens):
            logits = model.gather_logits(model(tokens))[:, -1, :].float()     # [b, vocab]
            all_logits.append(logits)
            nxt = next_tokens(logits, seen, sampling, generator)
            seen[torch.arange(len(nxt)), nxt] = True
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    finally:
        model.moe.causal_routing = before
    return tokens, all_logits
