"""zero2/zero3 bytes: one real Trainer step's collectives (counted by the Group wrappers and intercepted
at torch.distributed, which must agree) equal comm_model's prediction exactly, per rank and (kind,
group); zero3 gathers each layer twice per microbatch with or without full recompute; with one
microbatch in fp32 zero3 moves 1.5x zero1's DP bytes less the root unit's second gather."""
import contextlib
import io

import pytest

from comm_intercept import CommInterceptor, group_names
from dist import spawn
from megagpt.comm_model import expected_comm_bytes, ring_factor
from megagpt.config import config_from_dict
from megagpt.model_size import chunk_param_numels
from test_comm_accounting import raw_config


def _one_step(rank, world, raw, run_dir):
    """One Trainer.train_step (not run(): its end makes zero3's weights whole for the reader, a gather
    outside the step), counted and intercepted."""
    from megagpt.train import Trainer
    cfg = config_from_dict(raw, world)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(cfg, run_dir)
    counter = trainer.ps.counter
    with CommInterceptor(group_names(trainer.ps)) as seen:
        counter.reset()
        trainer.train_step()
    assert (dict(seen.records), dict(seen.calls)) == (dict(counter.records), dict(counter.calls)), \
        f"torch.distributed saw {dict(seen.records)} in {dict(seen.calls)}; the counter {dict(counter.records)}"
    return [[kind, group, n] for (kind, group), n in sorted(counter.records.items())]

CASES = {  # name: (world size, raw config)
    "dp2-zero2": (2, raw_config(parallel=dict(bucket_size_mb=0.05), train=dict(dp_mode="zero2"), dp=2)),
    "dp2-zero3": (2, raw_config(train=dict(dp_mode="zero3"), dp=2)),
    "dp2-zero2-fp16": (2, raw_config(train=dict(dp_mode="zero2", dtype="fp16"), dp=2)),   # the loss scaler's path
    "dp2-zero3-recompute": (2, raw_config(train=dict(dp_mode="zero3", recompute="full"), dp=2)),
    "tp2-dp2-bf16-zero3": (4, raw_config(model=dict(num_kv_heads=1), parallel=dict(tp=2, sequence_parallel=True),
                                         train=dict(dtype="bf16", dp_mode="zero3"), dp=2)),
    "pp2-vp2-dp2-zero3-tied": (4, raw_config(model=dict(num_layers=4, tie_embeddings=True), parallel=dict(pp=2, vp=2),
                                             train=dict(dp_mode="zero3"), dp=2)),
    "pp2-dp2-zero2-gpipe": (4, raw_config(model=dict(tie_embeddings=True), parallel=dict(pp=2),
                                          train=dict(dp_mode="zero2", schedule="gpipe"), dp=2)),
    "tp2-pp2-dp2-zero3": (8, raw_config(model=dict(num_layers=4, tie_embeddings=True),
                                        parallel=dict(tp=2, pp=2, sequence_parallel=True),
                                        train=dict(dp_mode="zero3"), dp=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_zero_bytes_equal_the_model(case, tmp_path):
    world, raw = CASES[case]
    cfg = config_from_dict(raw, world)
    results = spawn(world, _one_step, raw, str(tmp_path), timeout=240)
    for rank, records in enumerate(results):
        measured = {(kind, group): n for kind, group, n in records}
        expected = expected_comm_bytes(cfg, world, rank=rank, backend="gloo")
        assert measured == expected, f"{case}, rank {rank}:\n measured {measured}\n expected {expected}"


def test_zero3_moves_one_and_a_half_times_zero1(tmp_path):
    """One microbatch, fp32, DP2, a small vocab: zero1 = one reduce-scatter + one all-gather of every
    element; zero3 = one reduce-scatter, two gathers of each layer and one of the root (embedding, final
    norm, head). On the wire (ring factors applied to the intercepted bytes): 1.5 - 0.5 * root share."""
    wire = {}
    model = dict(num_layers=4, vocab_size=64)
    for mode in ("zero1", "zero3"):
        raw = raw_config(model=model, train=dict(dp_mode=mode), microbatches=1, dp=2)
        records = spawn(2, _one_step, raw, str(tmp_path / mode), timeout=240)[0]
        wire[mode] = sum(n * ring_factor(kind, 2) for kind, group, n in records if group == "dp")
    cfg = config_from_dict(raw_config(model=model, microbatches=1, dp=2), 2)
    numels = chunk_param_numels(cfg.model, 1, 4, True, True)
    root = numels[0] + sum(numels[-2:])
    want = 1.5 - 0.5 * root / sum(numels)             # the root unit is gathered once, not twice
    ratio = wire["zero3"] / wire["zero1"]
    assert abs(ratio - want) < 1e-3, f"zero3 / zero1 DP wire bytes {ratio:.4f}, expected {want:.4f}"
    print(f"zero3/zero1 DP wire bytes: {ratio:.4f} (root unit {root / sum(numels):.1%} of the params)")
