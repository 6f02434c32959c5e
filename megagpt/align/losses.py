"""Sequence-level preference losses, as plain functions of per-sequence numbers (tested against the formulas).

DPO (Rafailov et al. 2023): with summed completion log-probabilities of the policy (pi_*) and of the
frozen reference (ref_*) for the chosen (c) and rejected (r) answer,
    h = (pi_c - pi_r) - (ref_c - ref_r)
    sigmoid   loss = -(1 - eps) log s(beta h) - eps log s(-beta h)   (eps > 0: conservative DPO, labels
                                                                     flipped with probability eps)
    ipo       loss = (h - 1 / (2 beta))^2                            (Azar et al. 2023)
The implicit rewards are beta (pi - ref) of each answer; their margin is chosen - rejected.
At initialisation (policy = reference) h = 0: the sigmoid loss is exactly ln 2.
Reward model (InstructGPT): loss = -log s(r_c - r_r - margin).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSSES = ("sigmoid", "ipo")


def check_dpo_args(beta: float, loss_type: str, label_smoothing: float) -> None:
    if not beta > 0:
        raise ValueError(f"dpo.beta: must be > 0, got {beta}")
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"dpo.loss_type: must be one of {list(DPO_LOSSES)}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo.label_smoothing: must be in [0, 0.5), got {label_smoothing}")


def dpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """Per-pair [n] -> (losses [n], chosen rewards [n], rejected rewards [n]); rewards are detached."""
    check_dpo_args(beta, loss_type, label_smoothing)
    h = (pi_c - pi_r) - (ref_c - ref_r).to(pi_c.dtype)
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    return losses, beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()


def reward_pair_loss(r_c: torch.Tensor, r_r: torch.Tensor, margin: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Per-pair [n] -> losses [n]."""
    return -F.logsigmoid(r_c - r_r - margin)
