"""A named RNG tracker, so dropout agrees across TP ranks where it must and differs where it must.

Rule: a region whose tensor is replicated over TP (hidden states without SP) draws from the
default generator, seeded the same on every TP rank, so every rank drops the same elements.
A region whose tensor is sharded over TP (attention heads, or any [s/tp, b, h] SP shard) draws
from the "tp-sharded" generator, seeded differently per TP rank, so the shards are independent.
Pipeline stages get different seeds too (their layers are different layers).
Context parallelism (a CP group of more than one rank holding the zigzag rows of a replicated
region): every CP rank draws the mask of the whole sequence from the default generator, as one
process would, and keeps its own rows, so CP training equals the one-process run with dropout too.
"""
from __future__ import annotations

import contextlib

import torch

TP_SHARDED = "tp-sharded"


def _get_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGTracker:
    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.states: dict[str, torch.Tensor] = {}

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise ValueError(f"RNG tracker: state {name!r} exists already")
        saved, saved_cpu = _get_state(self.device), torch.get_rng_state()
        torch.manual_seed(seed)                    # seeds the CPU generator and every CUDA one
        self.states[name] = _get_state(self.device)
        _set_state(saved, self.device)
        torch.set_rng_state(saved_cpu)

    @contextlib.contextmanager
    def fork(self, name: str = TP_SHARDED):
        """Draw from the named generator inside the block, then put the default one back."""
        if name not in self.states:
            raise KeyError(f"RNG tracker: no state named {name!r}")
        saved = _get_state(self.device)
        _set_state(self.states[name], self.device)
        try:
            yield
        finally:
            self.states[name] = _get_state(self.device)
            _set_state(saved, self.device)

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states = {k: v.clone() for k, v in states.items()}


def seed_everything(seed: int, tp_rank: int = 0, pp_rank: int = 0, device="cpu") -> RNGTracker:
    """Default generator: same over TP and DP, different per pipeline stage. TP-sharded: different per TP rank."""
    base = seed + 100 * pp_rank
    torch.manual_seed(base)
    tracker = RNGTracker(device)
    tracker.add(TP_SHARDED, base + 2718 + tp_rank)
    return tracker


def dropout(x: torch.Tensor, p: float, training: bool, tracker: RNGTracker | None, sharded: bool,
            cp=None) -> torch.Tensor:
    """Dropout that draws from the right generator (see the module docstring). cp: the CP Group when
    x [s/cp, ...] holds this rank's zigzag rows of a replicated region."""
    if p == 0.0 or not training:
        return x
    if cp is not None and cp.size > 1 and not sharded:           # the whole sequence's mask, our rows of it
        from .context import zigzag_index
        full = torch.nn.functional.dropout(x.new_ones((x.shape[0] * cp.size,) + tuple(x.shape[1:])), p, True)
        return x * full.index_select(0, zigzag_index(full.shape[0], cp.size, cp.rank, x.device))
    if sharded and tracker is not None:
        with tracker.fork(TP_SHARDED):
            return torch.nn.functional.dropout(x, p, True)
    return torch.nn.functional.dropout(x, p, True)


def checkpoint(fn, tracker: RNGTracker | None, *args):
    """Activation recompute that replays the same dropout masks.

    torch's checkpoint restores the default generator for the recompute; the tracker's named
    states are snapshotted here and swapped in around the recompute as well.
    """
    import torch.utils.checkpoint as ckpt
    snapshot = tracker.get_states() if tracker is not None else None
    calls = [0]

    def run(*a):
        calls[0] += 1
        if calls[0] == 1 or tracker is None:
            return fn(*a)
        current = tracker.get_states()
        tracker.set_states(snapshot)
        try:
            return fn(*a)
        finally:
            tracker.set_states(current)
    return ckpt.checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)
