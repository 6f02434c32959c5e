"""`train.compile: true`: torch.compile of each transformer block's forward (inductor), the rest eager.

Only `Block.forward` is compiled (not the module call), so hooks on the block itself run eagerly: the
distributed optimizer's parameter-gather waits (parallel.overlap_param_gather) are registered on the
compiled block as one unit (optim/optimizer.py) instead of on its inner modules, which the compiled
graph would otherwise have to trace. Parameter names and the state dict are unchanged (no
`_orig_mod.` prefix), so checkpoints do not know whether a run was compiled.
What cannot run compiled is refused up front (config_checks.validate, `check_compile`): dropout (inductor
draws other masks than eager, so the equivalence to the eager model would break) and activation
recompute (the recompute replays the tracker's RNG states around the block, outside any graph).
"""
from __future__ import annotations

import os
import shutil

import torch
import torch.nn as nn

COMPILED_UNIT = "compiled_unit"      # marks a module whose forward is one compiled graph


def compile_problem(model_cfg, train_cfg, device_type: str = "cpu") -> str | None:
    """Why train.compile cannot run with this config (one line), or None."""
    for f in ("hidden_dropout", "attention_dropout"):
        if getattr(model_cfg, f) > 0:
            return (f"train.compile: true needs model.{f} = 0 (got {getattr(model_cfg, f)}): compiled dropout "
                    f"draws other masks than eager")
    if train_cfg.recompute != "none":
        return f"train.compile: true needs train.recompute: none (got {train_cfg.recompute!r})"
    if train_cfg.dp_mode in ("zero2", "zero3"):     # their per-unit hooks are not traced through yet
        return f"train.compile: true supports train.dp_mode ddp or zero1 (got {train_cfg.dp_mode!r})"
    if model_cfg.moe_num_experts or model_cfg.mod_layers:   # data-dependent routing shapes
        return "train.compile: true does not support mixture of experts/depths (model.moe_num_experts, model.mod_layers)"
    if model_cfg.workspace_tokens or model_cfg.adaptive_span:   # not yet checked equal to eager
        return "train.compile: true does not support model.workspace_tokens or model.adaptive_span yet"
    if device_type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
        return "train.compile: true on the CPU needs a C++ compiler for inductor (none on PATH; set CXX)"
    return None


def compile_blocks(chunks: list[nn.Module]) -> int:
    """Compile the forward of every transformer block in `chunks` in place; returns how many."""
    from .block import Block
    n = 0
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, Block):
                module.forward = torch.compile(module.forward, dynamic=False)
                setattr(module, COMPILED_UNIT, True)
                n += 1
    return n
