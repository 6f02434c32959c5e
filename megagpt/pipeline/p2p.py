"""Batched point-to-point between pipeline stages: activations forward, their gradients backward.

Every tensor that crosses a stage boundary is one [s/tp (SP) or s, b, h] activation or its
gradient, of the training dtype, so both ends know its shape and dtype from the config and a
receive allocates its buffer up front, with no shape handshake. One run of consecutive comm
ops of the schedule becomes one `batch_isend_irecv`, waited on before we return: the schedule
puts each receive in the same round as its send, so blocking batches cannot deadlock
(`schedule.check_no_deadlock` proves it per layout). Messages between two ranks are matched in
issue order, whatever they carry, which is why the schedule keeps sends and receives in order.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..config import Config
from ..layout import Layout
from ..parallel.state import CommCounter, Group


def activation_shape(cfg: Config) -> tuple[int, int, int]:
    """The shape of what crosses a stage boundary: [s/tp, b, h] with sequence parallelism, else [s, b, h]."""
    return Layout.from_config(cfg).activation_shape(cfg.model)


class P2P:
    """Sends and receives of one fixed-shape tensor kind over the pipeline group `group`.

    Peers are pipeline ranks (indices into group.ranks), as in the schedule's ops. Bytes are
    recorded in `counter` under group "pp": one "send" and one "recv" entry per tensor."""

    def __init__(self, group: Group, counter: CommCounter | None, shape: tuple, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.group, self.counter = group, counter
        self.shape, self.dtype, self.device = tuple(shape), dtype, torch.device(device)
        self.nbytes = torch.Size(self.shape).numel() * torch.empty((), dtype=dtype).element_size()
        if group.size > 1 and dist.get_backend(group.pg) == "nccl":
            # NCCL: the first batched p2p on a group must involve all its ranks, and the first
            # batches of a pipeline involve only neighbours. A collective here (every rank builds
            # its engine at start-up) makes the group's communicators exist before that.
            dist.all_reduce(torch.zeros(1, device=self.device), group=group.pg)

    def communicate(self, ops: list[tuple[str, int, torch.Tensor | None]]) -> list[torch.Tensor | None]:
        """ops: ("send", peer, tensor) or ("recv", peer, None), in the schedule's order. Posts them
        as one batch, waits, and returns the received tensors (None at the sends' positions)."""
        if not ops:
            return []
        p2p_ops, received = [], []
        for direction, peer, tensor in ops:
            if not 0 <= peer < self.group.size or peer == self.group.rank:
                raise ValueError(f"p2p: bad peer {peer} for pipeline rank {self.group.rank} of {self.group.size}")
            if direction == "send":
                # a wrong shape would hang or abort inside gloo/NCCL: say it here instead
                if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
                    raise ValueError(f"p2p: sending {tuple(tensor.shape)} {tensor.dtype}, but the pipeline "
                                     f"exchanges {self.shape} {self.dtype}")
                tensor = tensor.detach().contiguous()
                p2p_ops.append(dist.P2POp(dist.isend, tensor, self.group.ranks[peer], group=self.group.pg))
                received.append(None)
            else:
                tensor = torch.empty(self.shape, dtype=self.dtype, device=self.device)  # [s/tp, b, h]
                p2p_ops.append(dist.P2POp(dist.irecv, tensor, self.group.ranks[peer], group=self.group.pg))
                received.append(tensor)
            if self.counter is not None:
                self.counter.add(direction, "pp", self.nbytes)
        for request in dist.batch_isend_irecv(p2p_ops):
            request.wait()
        return received
