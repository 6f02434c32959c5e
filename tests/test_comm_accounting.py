"""The bytes every rank hands to collectives in one real training step equal comm_model's prediction,
exactly, per (kind, group) and per rank; and the training log reports them.

Each case runs one `Trainer` step in forked ranks (the same code path as pretraining: pipeline
engine, grad buffer, optimizer) and compares each rank's CommCounter with
`expected_comm_bytes(cfg, world, rank=r)`. The extra cases switch on what adds terms to the
formulas: replicated KV heads (MQA under TP2), biases and LayerNorm under SP, full recompute of
part of the layers, tied embeddings across stages, several padded DP buckets, the plain optimizer,
bf16 activations. Every torch.distributed call made during the step is also intercepted
(comm_intercept.py): its bytes and calls per (kind, group) must equal the counter's, so a
collective that bypasses the project's Group/P2P wrappers fails the test.
"""
import contextlib
import io
import json
import os

import pytest

from comm_intercept import CommInterceptor, group_names
from dist import spawn
from megagpt.comm_model import (_chunk_param_numels, expected_comm_bytes, ring_bytes_per_rank, ring_factor,
                                summary)
from megagpt.config import config_from_dict

SEQ, MICRO = 16, 2


def raw_config(model=None, parallel=None, train=None, microbatches=4, dp=1) -> dict:
    m = dict(vocab_size=1000, max_seq_len=64, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4,
             ffn_hidden_size=96, make_vocab_divisible_by=8, init_std=0.05)
    t = dict(seq_len=SEQ, micro_batch_size=MICRO, global_batch_size=MICRO * microbatches * dp, train_iters=1,
             eval_interval=0, save_interval=0, warmup=0, dtype="fp32")
    return {"model": {**m, **(model or {})}, "parallel": dict(parallel or {}), "train": {**t, **(train or {})}}


CASES = {  # name: (world size, raw config)
    "tp2": (2, raw_config(parallel=dict(tp=2))),
    "tp2-sp": (2, raw_config(parallel=dict(tp=2, sequence_parallel=True))),
    "tp2-mqa-recompute": (2, raw_config(model=dict(num_kv_heads=1, bias=True), parallel=dict(tp=2),
                                        train=dict(recompute="full", recompute_num_layers=1))),
    "tp2-sp-layernorm-bias-mqa-recompute": (2, raw_config(
        model=dict(norm="layernorm", bias=True, num_kv_heads=1, hidden_dropout=0.1), parallel=dict(tp=2, sequence_parallel=True),
        train=dict(recompute="full"))),
    "pp2": (2, raw_config(model=dict(tie_embeddings=True), parallel=dict(pp=2))),
    "pp2-vp2": (2, raw_config(model=dict(num_layers=4), parallel=dict(pp=2, vp=2))),
    "dp2": (2, raw_config(parallel=dict(bucket_size_mb=0.05), dp=2)),     # several buckets, padded
    "dp2-plain-optimizer": (2, raw_config(parallel=dict(distributed_optimizer=False), dp=2)),
    "tp2-pp2-dp2": (8, raw_config(model=dict(num_layers=4, tie_embeddings=True),
                                  parallel=dict(tp=2, pp=2, sequence_parallel=True, bucket_size_mb=0.1), dp=2)),
    "tp2-dp2-bf16": (4, raw_config(parallel=dict(tp=2, sequence_parallel=True), train=dict(dtype="bf16"), dp=2)),
}


def _one_step(rank, world, raw, run_dir, moe_rows: bool = False):
    """One Trainer step; returns the counter's records, and with moe_rows also the rows this rank's
    MoE all-to-alls moved (model/moe.py MoEContext.dispatched_rows)."""
    from megagpt.train import Trainer
    cfg = config_from_dict(raw, world)
    with contextlib.redirect_stdout(io.StringIO()):      # the split description
        trainer = Trainer(cfg, run_dir)
        with CommInterceptor(group_names(trainer.ps)) as seen:
            trainer.run()                                 # one step: resets the counter, steps, logs
    counter = trainer.ps.counter
    assert (dict(seen.records), dict(seen.calls)) == (dict(counter.records), dict(counter.calls)), \
        f"torch.distributed saw bytes {dict(seen.records)} in calls {dict(seen.calls)}; the counter " \
        f"{dict(counter.records)} in {dict(counter.calls)}"
    records = [[kind, group, n] for (kind, group), n in sorted(counter.records.items())]
    return (records, sum(c.moe.dispatched_rows() for c in trainer.chunks)) if moe_rows else records


@pytest.mark.parametrize("case", list(CASES))
def test_counted_bytes_equal_the_model(case, tmp_path):
    world, raw = CASES[case]
    cfg = config_from_dict(raw, world)
    results = spawn(world, _one_step, raw, str(tmp_path), timeout=240)
    for rank, records in enumerate(results):
        measured = {(kind, group): n for kind, group, n in records}
        expected = expected_comm_bytes(cfg, world, rank=rank, backend="gloo")
        assert measured == expected, f"{case}, rank {rank}:\n measured {measured}\n expected {expected}"
    total = expected_comm_bytes(cfg, world, backend="gloo")
    assert sum(n for records in results for *_, n in records) == sum(total.values())
    # the training log reports rank 0's counter, keyed "group/kind"
    logged = [r for r in map(json.loads, open(os.path.join(tmp_path, "metrics.jsonl"))) if "loss" in r]
    assert len(logged) == 1 and logged[0]["comm_bytes"] == summary(expected_comm_bytes(cfg, world, rank=0, backend="gloo"))


def test_param_list_matches_the_model():
    """The bucket plan is rebuilt from the config: its parameter sizes must be the model's own."""
    import torch
    from megagpt.model.gpt import GPTModel
    from megagpt.parallel.state import ParallelState
    from megagpt.pipeline.split import stage_chunks
    for world, raw in CASES.values():
        cfg = config_from_dict(raw, world)
        p = cfg.parallel
        for pp_rank in range(p.pp):
            ps = ParallelState.virtual(tp=p.tp, pp=p.pp, pp_rank=pp_rank)
            for ids, pre, post in stage_chunks(cfg, pp_rank):
                model = GPTModel(cfg.model, ps, sequence_parallel=p.sequence_parallel, layer_ids=ids,
                                 pre_process=pre, post_process=post, device=torch.device("meta"))
                assert _chunk_param_numels(cfg, ids, pre, post) == [t.numel() for t in model.parameters()]


def test_sp_moves_the_same_ring_bytes_as_tp():
    """GUIDE: SP's all-gathers + reduce-scatters cost the same ring traffic as TP's all-reduces;
    the only TP difference is SP's all-reduce of the norm-weight gradients (fp32, once a step)."""
    _, raw = CASES["tp2"]
    plain = config_from_dict(raw, 2)
    sp = config_from_dict({**raw, "parallel": {**raw["parallel"], "sequence_parallel": True}}, 2)
    tp_plain = sum(n for (k, g), n in ring_bytes_per_rank(plain, 2).items() if g == "tp")
    tp_sp = sum(n for (k, g), n in ring_bytes_per_rank(sp, 2).items() if g == "tp")
    m = plain.model
    norm_grads = (2 * m.num_layers + 1) * m.hidden_size * 4
    assert tp_sp == pytest.approx(tp_plain + ring_factor("all_reduce", 2) * norm_grads)
    assert ring_factor("all_gather", 4) * 1 == pytest.approx(3.0)     # 3 shards of the gathered 4
    assert ring_factor("reduce_scatter", 4) == pytest.approx(0.75)
