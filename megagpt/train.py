"""The training loop: the one place where model, pipeline, optimizer, data and checkpoints meet.

    torchrun --nproc-per-node=8 examples/pretrain.py --config examples/configs/tiny.yaml --tp 2 --pp 2

Each step: the pipeline engine runs this rank's schedule over the microbatches of the global
batch (gradients accumulate, DP reduction starts on the last backward), then the optimizer
reduces, clips and updates. Rank 0 logs to the console, `metrics.jsonl` and TensorBoard
(megagpt/metrics_log.py). The Config arrives whole: megagpt/cli.py resolves it.
"""
from __future__ import annotations

import itertools
import math
import os
import resource
import time

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint.train_state import TrainState
from .config import DTYPES, Config
from .model_size import device_peak_tflops, flops_per_token
from .data.blend import BlendedDataset, blend_parts
from .data.curriculum import curriculum_assignment, seq_len_at
from .data.sampler import MicroBatchSampler, make_batch
from .data.synthetic import SyntheticDataset
from .faults import fault_point
from .layout import Layout
from .malloc_tuning import tune_malloc
from .metrics_log import Logger
from .model.compile import compile_blocks
from .model.moe import update_router_biases
from .multimodal.adapters import freeze_decoder
from .model.variants import insert_workspace, loss_tokens, mean_spans, set_span_grad_weight
from .optim.lr import lr_at
from .optim.optimizer import build_optimizer
from .parallel.context import zigzag_shard
from .parallel.random import seed_everything
from .parallel.state import ParallelState, init_distributed
from .pipeline.engine import PipelineEngine
from .pipeline.split import build_stage, describe_split


class Trainer:
    model_cls = None           # a GPTModel subclass for another head (align/reward.py), None: GPTModel

    def __init__(self, cfg: Config, run_dir: str, data_path: str | None = None, load: str | None = None):
        self.cfg, self.run_dir = cfg, run_dir
        p, t = cfg.parallel, cfg.train
        self.ps = ParallelState.create(tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep, order=p.order)
        self.layout = Layout.from_config(cfg, self.ps.world_size)
        self.is_logger = self.ps.rank == 0
        self.tracker = seed_everything(t.seed, self.ps.tp.rank, self.ps.pp.rank, self.ps.device)
        self.dtype = DTYPES[t.dtype]
        said = tune_malloc(self.ps.device.type) if t.malloc_tuning else None
        if self.is_logger:
            print(describe_split(cfg), flush=True)
            if said:
                print(said, flush=True)
            if self.layout.sp and self.ps.tp.size > 1:     # the per-backend choice (parallel/state.py)
                how = {"all_reduce": "an all-reduce + this rank's slice (faster on gloo)",
                       "reduce_scatter": "reduce-scatters"}[self.ps.tp.sp_reduce]
                print(f"sequence parallelism on {dist.get_backend()}: TP reduce-scatters run as {how}", flush=True)
        self.chunks = build_stage(cfg, self.ps, seed=t.seed, tracker=self.tracker, dtype=self.dtype,
                                  layout=self.layout, model_cls=self.model_cls)
        if t.freeze_lm:                    # adapters only (multimodal/adapters.py): before the optimizer's walk
            freeze_decoder(self.chunks)
        if t.compile:
            n = compile_blocks(self.chunks)
            if self.is_logger:
                print(f"train.compile: torch.compile of each transformer block ({n} on rank 0)", flush=True)
        self.optimizer = build_optimizer(self.chunks, self.ps, t, p, cfg.model)
        self.engine = PipelineEngine(self.chunks, self.ps, cfg, self.layout.activation_shape(cfg.model), self.dtype)
        self.dp = self.ps.dp.size
        self.num_microbatches = self.layout.num_microbatches
        self.state = TrainState()          # step, consumed samples, RNG streams: what a resume restores
        self._build_data(data_path)
        if load:
            self._load(load)

    step = property(lambda self: self.state.step, lambda self, v: setattr(self.state, "step", v))
    consumed_samples = property(lambda self: self.state.consumed_samples,
                                lambda self, v: setattr(self.state, "consumed_samples", v))

    # ------------------------------------------------------------------ data
    def _build_data(self, data_path):
        t = self.cfg.train
        n_train = t.train_iters * t.global_batch_size
        n_valid = max(1, t.eval_iters) * t.global_batch_size * max(1, t.train_iters // max(1, t.eval_interval) + 1)
        self.needs_data = self.ps.is_first_stage or self.ps.is_last_stage
        weights, prefixes = blend_parts(self.cfg.data.blend, data_path)
        if not prefixes:
            self.train_data = SyntheticDataset(self.cfg.model.vocab_size, t.seq_len, n_train, t.seed)
            self.valid_data = SyntheticDataset(self.cfg.model.vocab_size, t.seq_len, n_valid, t.seed + 1)
            return
        from .data.gpt_dataset import build_train_valid_test
        from .data.indexed import fit_model_vocab
        total = sum(weights)
        fit_model_vocab(prefixes, self.cfg.model.vocab_size)  # every rank checks the files first: all fail alike
        knots = self.cfg.data.curriculum
        order = curriculum_assignment(knots, t.global_batch_size, n_train) if knots else None
        need = (np.bincount(order[0], minlength=len(prefixes)) if knots else
                [int(n_train * w / total) for w in weights])
        def build():  # each part gets its weighted share plus slack: the blend keeps the weights exactly
            return [build_train_valid_test(
                prefix, seq_len=t.seq_len, num_samples=(int(n) + 2, int(n_valid * w / total) + 2, 0),
                split=self.cfg.data.split, seed=t.seed)
                for w, n, prefix in zip(weights, need, prefixes)]
        # rank 0 builds the sample-index caches first; the others then load them instead of racing
        parts = build() if self.ps.rank == 0 else None
        dist.barrier()
        if parts is None:
            parts = build()
        if len(parts) == 1:
            self.train_data, self.valid_data = parts[0][0], parts[0][1]
        else:
            self.train_data = BlendedDataset([p[0] for p in parts], weights, n_train, assignment=order)
            self.valid_data = BlendedDataset([p[1] for p in parts], weights, n_valid)

    def _microbatch_fn(self, dataset, first_sample: int, length: int | None = None):
        """Microbatch i of the global batch starting at first_sample: DP ranks read disjoint samples,
        and only the first stage (tokens) and the last (labels) read at all. CP ranks read the same
        samples and keep their zigzag pair of chunks of each sequence (parallel/context.py)."""
        sampler = MicroBatchSampler(len(dataset), first_sample, self.cfg.train.micro_batch_size,
                                    self.ps.dp.rank, self.dp)
        indices = list(itertools.islice(sampler, self.num_microbatches))

        def get(i):
            if not self.needs_data:
                return None, None
            tokens, labels = make_batch(dataset, indices[i])              # [b, s] each
            if length is not None and length < tokens.shape[1]:           # seq-length warm-up: the first tokens
                tokens, labels = tokens[:, :length].contiguous(), labels[:, :length].contiguous()
            tokens, labels = insert_workspace(self.cfg.model, tokens, labels)   # workspace slots (if any)
            tokens, labels = (zigzag_shard(t, 1, self.ps.cp.size, self.ps.cp.rank)   # [b, s/cp] each
                              for t in (tokens, labels))
            return (tokens.to(self.ps.device) if self.ps.is_first_stage else None,
                    labels.to(self.ps.device) if self.ps.is_last_stage else None)
        return get

    # ------------------------------------------------------------------ one step
    def _global_loss(self, per_mb: list, length: int | None = None) -> float:
        """Sum of token losses on the last stage's TP rank 0 of each DP replica and CP rank (each holds
        its own tokens' sum) -> the global mean over every token of the global batch."""
        t = self.cfg.train
        total = torch.zeros(1, dtype=torch.float64, device=self.ps.device)  # nccl reduces device tensors
        if self.ps.is_last_stage and self.ps.tp.rank == 0:
            total += torch.stack([x.double() for x in per_mb]).sum() if per_mb else 0.0  # no host sync per microbatch
        self.ps.world.all_reduce(total)
        return total.item() / (t.global_batch_size * loss_tokens(self.cfg.model, length or t.seq_len))

    def train_step(self) -> dict:
        t = self.cfg.train
        length = seq_len_at(self.step, t.seq_len, self.cfg.data.seq_len_warmup, self.layout.seq_multiple)
        tokens = t.global_batch_size * loss_tokens(self.cfg.model, length)   # the tokens with a loss
        lr = lr_at(self.step, t)
        self.optimizer.zero_grad()
        self.optimizer.set_sync(False)
        loss_scale = self.optimizer.loss_scale / tokens
        if self.cfg.model.adaptive_span:      # each microbatch's share of the span penalty's gradient
            set_span_grad_weight(self.chunks, loss_scale * t.micro_batch_size * (length // self.ps.cp.size))
        per_mb = self.engine.forward_backward(
            self._microbatch_fn(self.train_data, self.consumed_samples, length), self.num_microbatches, loss_scale,
            before_last_backward=lambda: self.optimizer.set_sync(True))
        self._maybe_fault("step")
        stats = self.optimizer.step(lr)
        update_router_biases(self.chunks, self.ps.dp)      # MoE auxiliary-loss-free balancing, if on
        self.consumed_samples += t.global_batch_size
        self.step += 1
        spans = mean_spans(self.chunks, self.cfg.model.max_seq_len) if self.cfg.model.adaptive_span else {}
        return {"loss": self._global_loss(per_mb, length), "lr": lr, **stats, **spans}

    @torch.no_grad()
    def evaluate(self) -> float:
        t = self.cfg.train
        self.optimizer.finish_param_sync()
        for c in self.chunks:
            c.eval()
        total = 0.0
        for k in range(t.eval_iters):
            per_mb = self.engine.forward_backward(self._microbatch_fn(self.valid_data, k * t.global_batch_size),
                                                  self.num_microbatches, 1.0, forward_only=True)
            total += self._global_loss(per_mb)
        for c in self.chunks:
            c.train()
        return total / max(1, t.eval_iters)

    def _maybe_fault(self, where: str):
        """Test hook (faults.py): MEGAGPT_FAULT=step:N (or save:N) SIGKILLs a rank in the middle of step N
        (or of the save at step N), as `kill -9` would, to prove resume never depends on a clean exit."""
        fault_point(where, self.step + (1 if where == "step" else 0), self.ps.rank)

    # ------------------------------------------------------------------ checkpoints
    def save(self):
        from .checkpoint.sharded import save_checkpoint
        self.state.capture_rng(self.tracker, self.ps.device)
        save_checkpoint(self.run_dir, self.step, self.chunks, self.ps, self.cfg, self.state.state_dict(),
                        self.optimizer, keep=self.cfg.train.keep_checkpoints,
                        before_publish=lambda: self._maybe_fault("save"))

    def _load(self, path):
        from .checkpoint.sharded import load_checkpoint
        self.state.load_state_dict(load_checkpoint(path, self.chunks, self.ps, self.cfg, self.optimizer))
        self.state.restore_rng(self.tracker, self.ps.device)
        if self.is_logger:
            print(f"resumed from {path} at step {self.step} ({self.consumed_samples} samples consumed)", flush=True)

    # ------------------------------------------------------------------ the loop
    def run(self) -> list[dict]:
        t, m = self.cfg.train, self.cfg.model
        os.makedirs(self.run_dir, exist_ok=True)
        log = Logger(self.run_dir, self.is_logger, t.train_iters, self.step)
        flops = flops_per_token(m, t.seq_len)
        peak = t.peak_tflops or device_peak_tflops(self.ps.device)
        history = []
        if self.step == 0 and t.eval_interval:  # where the validation loss starts, for the curves
            val = self.evaluate()
            log.log({"step": 0, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))})
        while self.step < t.train_iters:
            self.ps.counter.reset()
            start = time.perf_counter()
            rec = self.train_step()
            elapsed = time.perf_counter() - start
            tok_s = t.global_batch_size * t.seq_len / elapsed
            rec.update(step=self.step, step_time_s=elapsed, tokens_per_s=tok_s,
                       tflops_per_rank=flops * tok_s / self.ps.world_size / 1e12, memory_gb=_memory_gb(self.ps))
            rec["mfu"] = rec["tflops_per_rank"] / peak if peak else None     # None: no known peak (CPU)
            rec["comm_bytes"] = self.ps.counter.summary()
            if t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.train_iters):
                rec["val_loss"] = self.evaluate()
                rec["val_ppl"] = math.exp(min(rec["val_loss"], 50.0))
            if self.step % t.log_interval == 0 or "val_loss" in rec or self.step == t.train_iters:
                log.log(rec)
            history.append(rec)
            if t.save_interval and self.step % t.save_interval == 0:
                self.save()
        self.optimizer.finish_param_sync()      # the trained weights, whole, for whoever reads them next
        log.close()
        return history


def _memory_gb(ps: ParallelState) -> float:
    if ps.device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kB -> GiB


def train_main(cfg: Config, run_dir: str, load: str | None = None) -> int:
    """Train the fully resolved `cfg` (megagpt/cli.py builds it) on the launcher's ranks."""
    init_distributed()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    trainer = Trainer(cfg, run_dir, cfg.data.path, load)
    trainer.run()
    dist.barrier()
    dist.destroy_process_group()
    return 0
