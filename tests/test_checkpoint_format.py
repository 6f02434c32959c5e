"""The checkpoint format's reader and writer (megagpt/checkpoint/format.py, regions.py, train_state.py).

- regions: every rank's piece, cut from the pieces and DP shards of every other layout, equals
  ShardSpec.shard of the global tensor (GQA replicas, row- and column-split, vocab re-padding).
- Bytes read: saved under TP2 x DP2, each rank of four loading layouts pulls within 10% of its own
  shard (params + its optimizer ranges), counted by a wrapper around safetensors' slices. Verifying
  sha256 reads every file a rank opens in full: in the saved layout DP rank 0 opens only its own.
- Resume memory: a ~100 MB model resumes with peak RSS (the kernel's VmHWM) at most 1.1x the steady state.
- Conversion output is byte-identical to the code before format.py (pinned sha256 of a tiny conversion).
- TrainState round-trips the RNG streams.
"""
import hashlib
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from dist import batch, spawn, tiny_model_cfg
from megagpt.checkpoint.sharded import load_checkpoint, save_checkpoint
from megagpt.config import ModelConfig, ParallelConfig, TrainConfig
from megagpt.model.gpt import build_model
from megagpt.optim import build_optimizer
from megagpt.parallel.layers import ShardSpec
from megagpt.parallel.state import ParallelState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- regions

SPECS = {"qkv (GQA)": (ShardSpec(0, ((64, 0), (16, 2), (16, 2))), (96, 8)),
         "row-parallel": (ShardSpec(1, ((48, 0),)), (6, 48)),
         "replicated": (ShardSpec(), (10,))}


@pytest.mark.parametrize("name", list(SPECS))
def test_regions_cut_every_layout_from_every_other(name):
    from megagpt.checkpoint.regions import box_reads, flat_reads
    spec, shape = SPECS[name]
    full = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape) + 1
    for saved_tp, tp in itertools.product([1, 2, 4], [1, 2, 4]):
        saved = [(spec, shape, r, saved_tp) for r in range(saved_tp)]
        pieces = [spec.shard(full, r, saved_tp) for r in range(saved_tp)]
        # each saved piece's flat tensor in three uneven DP shards: (file, lo, hi) -> data
        shards = [[((i, a), a, z) for a, z in zip(c, c[1:])]
                  for i, p in enumerate(pieces) for c in [[0, p.numel() // 3, 2 * p.numel() // 3 + 1, p.numel()]]]
        files = {f: pieces[f[0]].reshape(-1)[a:z] for s in shards for f, a, z in s}
        for rank in range(tp):
            want = (spec, shape, rank, tp)
            ref = spec.shard(full, rank, tp)
            out = torch.zeros(ref.shape)
            reads, volume = box_reads(want, saved)
            for i, src, dst in reads:
                out[dst] = pieces[i][src]
            assert torch.equal(out, ref) and volume == ref.numel(), (saved_tp, tp, rank)
            n = ref.numel()
            for start, end in [(0, n), (3, n - 2), (n // 2, n // 2 + 1)]:
                flat = torch.zeros(end - start)
                reads, count = flat_reads(want, start, end, saved, shards)
                for f, src, dst, k in reads:
                    flat[dst:dst + k] = files[f][src - f[1]:src - f[1] + k]
                assert torch.equal(flat, ref.reshape(-1)[start:end]), (saved_tp, tp, rank, start, end)
                assert sum(k for *_, k in reads) == count == end - start      # every element read once


def test_regions_repad_the_vocab():
    from megagpt.checkpoint.regions import box_reads, flat_reads
    full = torch.arange(24 * 5.).reshape(24, 5) + 1
    full[21:] = 0                                   # 21 real rows, padded to 24 (saved) and 22 (loaded)
    saved_spec, spec = ShardSpec(0, ((24, 0),)), ShardSpec(0, ((22, 0),))
    for saved_tp, tp in [(4, 2), (1, 2), (2, 1)]:
        saved = [(saved_spec, (24, 5), r, saved_tp) for r in range(saved_tp)]
        pieces = [saved_spec.shard(full, r, saved_tp) for r in range(saved_tp)]
        for rank in range(tp):
            ref = spec.shard(full[:22], rank, tp)
            out = torch.zeros(ref.shape)
            for i, src, dst in box_reads((spec, (22, 5), rank, tp), saved, rows=21)[0]:
                out[dst] = pieces[i][src]
            assert torch.equal(out, ref)
            flat = torch.zeros(ref.numel())
            shards = [[(i, 0, p.numel())] for i, p in enumerate(pieces)]
            for f, src, dst, k in flat_reads((spec, (22, 5), rank, tp), 0, ref.numel(), saved, shards, rows=21)[0]:
                flat[dst:dst + k] = pieces[f].reshape(-1)[src:src + k]
            assert torch.equal(flat, ref.reshape(-1))


# ----------------------------------------------------------------------------- bytes read per rank

CFG = tiny_model_cfg(num_kv_heads=2, hidden_size=128, num_heads=8, ffn_hidden_size=256)


def _setup(tp):
    import torch.distributed as dist
    ps = ParallelState.create(tp=tp) if dist.is_initialized() else ParallelState.single()
    model = build_model(CFG, ps, seed=99)
    return ps, model, build_optimizer([model], ps, TrainConfig(lr=1e-3, warmup=0), ParallelConfig(tp=tp), CFG)


def _save(rank, world, run_dir):
    ps, model, opt = _setup(2)
    tokens, labels = batch(CFG, seed=rank)
    opt.scale_loss(model(tokens, labels).mean()).backward()
    opt.step(1e-3)
    save_checkpoint(run_dir, 1, [model], ps, None, {}, opt)


def _load_counting(rank, world, run_dir, tp):
    """Load with safetensors' slices wrapped: every tensor they hand out is counted here, outside the
    Reader. Returns (bytes pulled, the Reader's own count, this rank's shard in bytes, bytes hashed
    to verify the files it opened)."""
    from megagpt.checkpoint import format as fmt
    original, pulled = fmt.safe_open, [0]

    class Slice:
        def __init__(self, inner):
            self.inner = inner

        def get_shape(self):
            return self.inner.get_shape()

        def __getitem__(self, index):
            t = self.inner[index]
            pulled[0] += t.numel() * t.element_size()
            return t

    class File:
        def __init__(self, path, framework):
            self.inner = original(path, framework=framework)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, key):
            return Slice(self.inner.get_slice(key))

    ps, model, opt = _setup(tp)
    stats = {}
    fmt.safe_open = File
    try:
        load_checkpoint(run_dir, [model], ps, None, opt, stats=stats)
    finally:
        fmt.safe_open = original
    shard = sum(p.numel() * p.element_size() for p in model.parameters())
    shard += sum(3 * 4 * (end - start) for start, end in opt.owned_ranges().values())
    return pulled[0], stats["bytes_read"], shard, stats["bytes_hashed"]


@pytest.fixture(scope="module")
def saved_tp2_dp2(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("tp2dp2"))
    spawn(4, _save, run_dir)
    return run_dir


@pytest.mark.parametrize("world,tp", [(4, 2), (4, 4), (4, 1), (1, 1)])
def test_each_rank_reads_about_its_own_shard(saved_tp2_dp2, world, tp):
    out = spawn(world, _load_counting, saved_tp2_dp2, tp) if world > 1 else [_load_counting(0, 1, saved_tp2_dp2, 1)]
    for rank, (pulled, counted, shard, hashed) in enumerate(out):
        print(f"world {world} tp {tp} rank {rank}: read {pulled} B, shard {shard} B ({pulled / shard:.3f}); "
              f"sha256 over {hashed} B ({hashed / shard:.3f})")
        assert pulled == counted
        assert abs(pulled - shard) <= 0.1 * shard, (rank, pulled, shard)
        if (world, tp) == (4, 2) and rank < 2:    # the saved layout, DP rank 0: only its own file is opened
            assert hashed <= 1.1 * shard, (rank, hashed, shard)


# ----------------------------------------------------------------------------- resume memory

_RESUME = r"""
import ctypes, gc, json, sys
import torch
torch.set_num_threads(1)
from megagpt.checkpoint.sharded import load_checkpoint, save_checkpoint
from megagpt.config import ModelConfig, ParallelConfig, TrainConfig
from megagpt.model.gpt import build_model
from megagpt.optim import build_optimizer
from megagpt.parallel.state import ParallelState

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

cfg = ModelConfig(vocab_size=4096, max_seq_len=64, hidden_size=512, num_layers=7, num_heads=8,
                  ffn_hidden_size=1408, use_flash_attn=False)
ps = ParallelState.single()
model = build_model(cfg, ps)
opt = build_optimizer([model], ps, TrainConfig(lr=1e-3, warmup=0), ParallelConfig(), cfg)
tokens = torch.randint(0, 4096, (1, 33))
opt.scale_loss(model(tokens[:, :-1], tokens[:, 1:]).mean()).backward()
opt.step(1e-3)

def steady():
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)          # freed heap memory back to the OS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                 # the peak RSS (VmHWM) starts again from the current RSS
    return status("VmRSS")

out = {"model": sum(p.numel() * 4 for p in model.parameters()), "steady_save": steady()}
save_checkpoint(sys.argv[1], 1, [model], ps, None, {}, opt)
out.update(peak_save=status("VmHWM"), steady=steady())
load_checkpoint(sys.argv[1], [model], ps, None, opt)
print(json.dumps({**out, "peak": status("VmHWM"), "after": status("VmRSS")}))
"""


@pytest.mark.timeout(120)
def test_resume_peak_memory_within_ten_percent_of_steady_state(tmp_path):
    """A ~100 MB fp32 model with its optimizer: resuming (and saving) never holds a second copy of the
    weights or of the optimizer state (the old load cloned the main weights and both Adam moments:
    12 bytes/param). Measured: the kernel's peak RSS (VmHWM, reset through /proc/self/clear_refs) against
    the RSS just before, at rest with model, gradients and optimizer state allocated."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    run = subprocess.run([sys.executable, "-c", _RESUME, str(tmp_path)], capture_output=True, text=True, env=env,
                         cwd=str(tmp_path), timeout=110)
    assert run.returncode == 0, run.stderr[-2000:]
    m = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"model {m['model'] / 2**20:.0f} MiB; steady RSS {m['steady'] / 2**20:.0f} MiB, peak during resume "
          f"{m['peak'] / 2**20:.0f} MiB ({m['peak'] / m['steady']:.3f}x), after {m['after'] / 2**20:.0f} MiB")
    print(f"save: steady {m['steady_save'] / 2**20:.0f} MiB, peak {m['peak_save'] / 2**20:.0f} MiB "
          f"({m['peak_save'] / m['steady_save']:.3f}x)")
    assert m["model"] > 95e6
    assert m["peak"] <= 1.1 * m["steady"]
    assert m["peak_save"] <= 1.1 * m["steady_save"]           # a save streams the live state, no copy


# ----------------------------------------------------------------------------- byte-identical conversion

# sha256 over (relative path, contents) of every file _convert_tiny writes, from the converter before
# format.py (commit 45a9228). A change to the file format changes it: re-pin only on purpose.
# Re-pinned once when parallel.overlap_param_gather joined the Config (issue 10): every safetensors file of
# this conversion stayed byte-identical to the code before, and each rank JSON differs only by that field.
# Re-pinned at the merge of issues 12/14/17/18 (session 20), when new Config fields joined the rank JSON
# (model.attention_window, workspace_*, cp_attention, adaptive_span, span_*; train.dp_mode, data.curriculum,
# data.seq_len_warmup; model.moe_*, model.mod_*; train.compile): every safetensors file
# byte-identical to a7befc5's; each rank JSON differs by those fields only (each COMPLETE manifest by those
# JSONs' hashes). Checked with a script converting with both trees and diffing the files.
# Re-pinned for model.rope_scaling_type (wt-rope): safetensors and the HF directory byte-identical to
# main 451fcd4's; each rank JSON gains "rope_scaling_type": "linear" (each COMPLETE manifest those JSONs' hashes).
# Re-pinned for the multimodal adapters (wt-mmcore, issue 16): every safetensors file and the HF directory
# byte-identical to main baa900d's; each rank JSON gains model.image_token_id, audio_token_id, adapter_hidden,
# adapter_layers and train.freeze_lm (each COMPLETE manifest those JSONs' hashes).
# Re-pinned for train.grad_accum_fusion and train.malloc_tuning (wt-perf3, issue 18): every safetensors file
# and the HF directory byte-identical to main a89bbb0's; each rank JSON gains those two fields (each COMPLETE
# manifest those JSONs' sizes and hashes).
# Re-pinned for parallel.bucket_size_mb 40 -> 25 (stop 23): every safetensors file and the HF directory
# byte-identical to main 298be6f's; each rank JSON's bucket_size_mb changes (each COMPLETE manifest its hashes).
# Re-pinned for train.peak_tflops 989.0 -> null (stop 24: MFU against the device's own peak, n/a on the CPU):
# again every safetensors file and the HF directory byte-identical; only the rank JSONs and COMPLETE changed.
PINNED = "933ed39912ed51b68957eef4f536799e5795ccaf5b3a2ede61b8b0fad9084d9d"


def _convert_tiny(out: str) -> str:
    """Save a tiny padded-vocab checkpoint (with optimizer state and an RNG tensor in extra) and convert
    it: to TP2 PP2 with the optimizer, to HF, HF back to TP2 with a fresh optimizer, and to bf16 TP1."""
    from megagpt.checkpoint.convert import convert
    cfg = ModelConfig(vocab_size=250, max_seq_len=64, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2,
                      ffn_hidden_size=96, make_vocab_divisible_by=4, use_flash_attn=False)
    model = build_model(cfg, ParallelState.single(), seed=7)
    g = torch.Generator().manual_seed(3)
    state = {n: {"start": 0, "end": p.numel(), **{k: torch.randn(p.numel(), generator=g)
                                                   for k in ("main", "exp_avg", "exp_avg_sq")}}
             for n, p in model.named_parameters()}
    src = os.path.join(out, "src")
    save_checkpoint(src, 3, [model], ParallelState.single(), None,
                    {"step": 3, "rng": torch.Generator().manual_seed(5).get_state()[:64]},
                    {**state, "step": 3, "loss_scale": 1.0, "growth_tracker": 0})
    convert(src, os.path.join(out, "c", "tp2pp2"), "megagpt", tp=2, pp=2, with_optimizer=True)
    convert(src, os.path.join(out, "c", "hf"), "hf")
    convert(os.path.join(out, "c", "hf"), os.path.join(out, "c", "from_hf"), "megagpt", tp=2, with_optimizer=True)
    convert(os.path.join(out, "c", "tp2pp2"), os.path.join(out, "c", "bf16"), "megagpt", with_optimizer=True,
            dtype="bf16")
    h = hashlib.sha256()
    for root, dirs, files in os.walk(os.path.join(out, "c")):
        dirs.sort()
        for f in sorted(files):
            path = os.path.join(root, f)
            h.update(os.path.relpath(path, out).encode() + b"\0")
            with open(path, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def test_conversion_is_byte_identical_to_the_pinned_output(tmp_path):
    assert _convert_tiny(str(tmp_path)) == PINNED


# ----------------------------------------------------------------------------- training state

def test_train_state_round_trips_every_rng_stream():
    from megagpt.checkpoint.train_state import TrainState
    from megagpt.parallel.random import TP_SHARDED, seed_everything
    tracker = seed_everything(11, tp_rank=1, pp_rank=0)
    state = TrainState(step=4, consumed_samples=32)
    state.capture_rng(tracker, torch.device("cpu"))
    saved = TrainState()
    saved.load_state_dict(state.state_dict())
    expect_default = torch.rand(3)
    with tracker.fork(TP_SHARDED):
        expect_tracked = torch.rand(3)
    other = seed_everything(99)
    saved.restore_rng(other, torch.device("cpu"))
    assert (saved.step, saved.consumed_samples) == (4, 32)
    assert torch.equal(torch.rand(3), expect_default)
    with other.fork(TP_SHARDED):
        assert torch.equal(torch.rand(3), expect_tracked)
    fresh = TrainState.fresh(11, tp_rank=1, pp_rank=0).state_dict()     # what a new run at (tp 1, pp 0) has
    assert torch.equal(fresh["rng"][f"tracker/{TP_SHARDED}"], seed_everything(11, 1, 0).get_states()[TP_SHARDED])
    with pytest.raises(ValueError, match="field 'consumed_samples' is missing"):
        TrainState().load_state_dict({"step": 1, "rng": {}})


@pytest.mark.parametrize("distributed", [True, False])
def test_resume_restores_either_optimizer_exactly(tmp_path, distributed):
    """Save after a step, load into a fresh model and optimizer (a different init): the optimizer state
    (fed to it lazily, tensor by tensor) and the weights are the saved ones, bit for bit."""
    cfg = tiny_model_cfg()

    def setup(seed):
        model = build_model(cfg, ParallelState.single(), seed=seed)
        par = ParallelConfig(distributed_optimizer=distributed)
        return model, build_optimizer([model], ParallelState.single(), TrainConfig(lr=1e-3, warmup=0), par, cfg)

    model, opt = setup(1)
    tokens, labels = batch(cfg)
    opt.scale_loss(model(tokens, labels).mean()).backward()
    opt.step(1e-3)
    save_checkpoint(str(tmp_path), 1, [model], ParallelState.single(), None, {}, opt)
    model2, opt2 = setup(2)
    load_checkpoint(str(tmp_path), [model2], ParallelState.single(), None, opt2)
    want, got = opt.state_for_checkpoint(), opt2.state_for_checkpoint()
    assert want.keys() == got.keys() and got["step"] == 1
    for name, entry in want.items():
        if isinstance(entry, dict):
            for key, t in entry.items():
                assert torch.equal(torch.as_tensor(got[name][key]), torch.as_tensor(t)), (name, key)
    for (name, p), q in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), name
