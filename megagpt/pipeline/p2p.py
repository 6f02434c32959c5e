"""Non-blocking point-to-point between pipeline stages: activations forward, their gradients backward.

Every tensor that crosses a stage boundary is one [s/tp (SP) or s, b, h] activation or its
gradient, of the training dtype, so both ends know its shape and dtype from the config and a
receive allocates its buffer up front, with no shape handshake. One run of consecutive comm
ops of the schedule is posted as one `batch_isend_irecv` (one NCCL group) and NOT waited on
here: the engine waits on a receive right before the op that consumes it, and on sends at the
end, so a rank never idles for a message it does not need yet. `simulate.check_no_deadlock`
proves per layout that these semantics terminate, under NCCL's in-order group completion too.
Messages between two ranks are matched in issue order, whatever they carry, which is why the
schedule keeps sends and receives in order.
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
            # its engine at start-up) makes the group's communicators exist before that. Uncounted on
            # purpose: start-up only, never a step's bytes (comm_model's docstring says so).
            dist.all_reduce(torch.zeros(1, device=self.device), group=group.pg)

    def post(self, ops: list[tuple[str, int, torch.Tensor | None]]) -> list[tuple[torch.Tensor, list]]:
        """ops: ("send", peer, tensor) or ("recv", peer, None), in the schedule's order. Posts them
        as one batch and returns, per op, (the tensor sent or the buffer being received into, the
        works to wait on before using it). gloo gives one work per op, so each op is waited on
        alone; NCCL gives one for the whole group."""
        if not ops:
            return []
        p2p_ops, tensors = [], []
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
            else:
                tensor = torch.empty(self.shape, dtype=self.dtype, device=self.device)  # [s/tp, b, h]
                p2p_ops.append(dist.P2POp(dist.irecv, tensor, self.group.ranks[peer], group=self.group.pg))
            tensors.append(tensor)
            if self.counter is not None:
                self.counter.add(direction, "pp", self.nbytes)
        works = dist.batch_isend_irecv(p2p_ops)      # each op counted above, one by one
        per_op = [[w] for w in works] if len(works) == len(ops) else [works] * len(ops)
        return list(zip(tensors, per_op))
