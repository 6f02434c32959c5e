"""Loss scaling: dynamic for fp16, a no-op (scale 1) for fp32 and bf16.

fp16 has 5 exponent bits: small gradients underflow to zero unless the loss is multiplied by a
large scale before backward (and the gradients divided by it after). Too large a scale overflows
instead, so the scale is tuned as training goes: an inf/NaN anywhere in the gradients (checked on
every rank, MAX-reduced over the world so all ranks agree) skips the step and halves the scale
(not below min_scale); `window` good steps in a row double it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..parallel.state import Group


class LossScaler:
    def __init__(self, dynamic: bool, initial_scale: float = 2.0 ** 16, window: int = 1000,
                 min_scale: float = 1.0):
        self.dynamic = dynamic
        self.scale = float(initial_scale) if dynamic else 1.0
        self.window, self.min_scale = window, float(min_scale)
        self.growth_tracker = 0                    # good steps since the last change of scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.dynamic else loss

    def unscale_(self, grads: list[torch.Tensor]) -> None:
        if self.dynamic and grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def found_inf(self, grads: list[torch.Tensor], world: Group, device) -> bool:
        """True on every rank when any rank's gradients hold an inf or a NaN."""
        # one device-side reduction, no host sync per bucket; the all-reduce's .item() is the only sync
        flag = torch.zeros(1, device=device)
        if grads:
            flag = torch.stack([(~torch.isfinite(g)).any() for g in grads]).any().float().reshape(1)
        world.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def unscale_and_check(self, grads: list[torch.Tensor], world: Group, device) -> bool:
        """The step's scaler part: unscale, check every rank for inf/NaN, update the scale.
        True when the step must be skipped. A no-op (False) unless dynamic."""
        if not self.dynamic:
            return False
        self.unscale_(grads)
        found = self.found_inf(grads, world, device)
        self.update(found)
        return found

    def update(self, found_inf: bool) -> None:
        if not self.dynamic:
            return
        if found_inf:
            self.scale = max(self.scale / 2.0, self.min_scale)
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker >= self.window:
            self.scale *= 2.0
            self.growth_tracker = 0

    def state_dict(self) -> dict:
        return {"loss_scale": self.scale, "growth_tracker": self.growth_tracker}

    def load_state_dict(self, state: dict) -> None:
        if self.dynamic:
            self.scale = float(state["loss_scale"])
            self.growth_tracker = int(state["growth_tracker"])


class ScaledLoss:
    """The loss-scale half of an optimizer's interface, for any optimizer that holds `self.scaler`."""

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale_loss(loss)

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale
