"""What a run resumes besides weights and optimizer state: its step, its place in the data, and every
RNG stream. The trainer keeps one, saves its state_dict as the checkpoint's per-rank `extra` and loads
it back; the converter writes the one a new run would start from (`TrainState.fresh`).

    state_dict() = {"step": int, "consumed_samples": int,
                    "rng": {"torch": uint8 tensor, "tracker/<name>": ..., "cuda": ... (CUDA runs only)}}
"""
from __future__ import annotations

import dataclasses

import torch

from ..parallel.random import RNGTracker, seed_everything
from .store import CheckpointError

_TRACKER = "tracker/"


@dataclasses.dataclass
class TrainState:
    step: int = 0                      # optimizer steps taken
    consumed_samples: int = 0          # samples of the training data used so far
    rng: dict = dataclasses.field(default_factory=dict)   # generator states, as state_dict()'s "rng"

    @classmethod
    def fresh(cls, seed: int, tp_rank: int, pp_rank: int) -> "TrainState":
        """Step 0 of a new run at this rank: its RNG streams as seed_everything seeds them. The calling
        process's CPU generator is left as it was."""
        saved = torch.get_rng_state()
        try:
            state = cls()
            state.capture_rng(seed_everything(seed, tp_rank, pp_rank), torch.device("cpu"))
        finally:
            torch.set_rng_state(saved)
        return state

    def capture_rng(self, tracker: RNGTracker, device: torch.device) -> None:
        """Read the live generators: the CPU one, the tracker's named ones, and the device's on CUDA
        (dropout in replicated regions draws from the device's default generator)."""
        self.rng = {"torch": torch.get_rng_state(),
                    **{f"{_TRACKER}{k}": v for k, v in tracker.get_states().items()}}
        if device.type == "cuda":
            self.rng["cuda"] = torch.cuda.get_rng_state(device)

    def restore_rng(self, tracker: RNGTracker, device: torch.device) -> None:
        """Set the live generators from self.rng (the inverse of capture_rng)."""
        torch.set_rng_state(self.rng["torch"])
        if "cuda" in self.rng and device.type == "cuda":
            torch.cuda.set_rng_state(self.rng["cuda"], device)
        tracker.set_states({k[len(_TRACKER):]: v for k, v in self.rng.items() if k.startswith(_TRACKER)})

    def state_dict(self) -> dict:
        return {"step": self.step, "consumed_samples": self.consumed_samples, "rng": dict(self.rng)}

    def load_state_dict(self, state: dict) -> None:
        for field in ("step", "consumed_samples", "rng"):
            if field not in state:
                raise CheckpointError(f"training state: field {field!r} is missing from the checkpoint's extra")
        if not isinstance(state["rng"], dict) or not torch.is_tensor(state["rng"].get("torch")):
            raise CheckpointError("training state: rng.torch is not a generator state")
        self.step, self.consumed_samples = int(state["step"]), int(state["consumed_samples"])
        self.rng = dict(state["rng"])
