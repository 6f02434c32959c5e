"""A meter for the bytes autograd keeps for backward: a measured figure for the activation memory.

    with SavedTensorMeter(exclude=model.parameters()) as meter:
        loss = model(tokens, labels).sum()
    meter.bytes      # unique storages saved for backward, parameters excluded

Every tensor an autograd node saves passes through `saved_tensors_hooks`' pack hook. Several
nodes often save the same tensor or views of it, so storages are counted once (by data_ptr),
at their full size: a view keeps its whole storage alive. Parameters are weights, not
activations, and are left out. Inside a non-reentrant checkpoint torch installs its own hooks,
so what a recomputed region saves is not seen, while the inputs the checkpoint keeps for the
recompute are: exactly what recompute leaves in memory. The recompute's own transient memory
in backward is not measured.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


class SavedTensorMeter:
    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, int] = {}                   # data_ptr -> bytes
        self._hooks = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):          # tensors without storage (e.g. subclasses)
            return t
        ptr = storage.data_ptr()
        if ptr and ptr not in self.excluded:
            self.storages.setdefault(ptr, storage.nbytes())
        return t

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    @property
    def count(self) -> int:
        return len(self.storages)
