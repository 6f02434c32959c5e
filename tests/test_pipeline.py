"""Pipeline executor: every layout against one process (loss and all gradients, fp32, 1e-5 relative),
the executed op order against the schedule, the saved-activation memory against the simulator's
in-flight count, and bad layouts failing with a one-line error before anything runs.

Each multi-rank group (pp=2, pp=4, tp=2 x pp=2 with SP) is one fork of the ranks that runs all of
its cases; a module fixture keeps the results so the three kinds of check share one run.
"""
import itertools
import re
import weakref

import pytest
import torch

from dist import assert_close_rel, gather_full, spawn
from megagpt.config import Config, ConfigError, ModelConfig, ParallelConfig, TrainConfig, config_from_dict
from megagpt.model.gpt import build_model
from megagpt.optim.finalize import finalize_grads
from megagpt.parallel.state import ParallelState
from megagpt.pipeline.engine import PipelineEngine, forward_only_schedule
from megagpt.pipeline.p2p import activation_shape
from megagpt.pipeline.schedule import Op, build_schedule
from megagpt.pipeline.simulate import check_no_deadlock, simulate
from megagpt.layout import Layout, balanced_counts
from megagpt.pipeline.split import build_stage, chunk_layers, describe_split, stage_chunks

SEED, B, S = 7, 2, 8


def make_cfg(pp, vp, m, layers, tp=1, sp=False, kind="1f1b", tied=False, split=None):
    raw = {"model": dict(vocab_size=97, max_seq_len=16, hidden_size=32, num_layers=layers, num_heads=4,
                         num_kv_heads=2, ffn_hidden_size=64, make_vocab_divisible_by=1, init_std=0.05,
                         tie_embeddings=tied),
           "parallel": dict(tp=tp, pp=pp, vp=vp, sequence_parallel=sp, layers_per_stage=split),
           "train": dict(seq_len=S, micro_batch_size=B, global_batch_size=B * m,
                         schedule="gpipe" if kind == "gpipe" else "1f1b")}
    return config_from_dict(raw, world_size=tp * pp)


def cases(pp):
    """(name, vp, m, layers, kind, tied, explicit split): the grid vp in {1, 2} x m in {pp, pp+1, 2pp},
    with 1 or 2 layers per chunk, and pp+1 layers (an uneven balanced split) for vp=1, m=2pp."""
    out = []
    for vp in (1, 2):
        for m, layers in ((pp, pp * vp), (pp + 1, 2 * pp * vp), (2 * pp, pp + 1 if vp == 1 else pp * vp)):
            out.append((f"{'1f1b' if vp == 1 else 'interleaved'}-vp{vp}-m{m}", vp, m, layers, "1f1b", False, None))
    if pp == 2:
        out += [("gpipe-m3", 1, 3, 3, "gpipe", False, None),
                ("tied-vp2-m4", 2, 4, 4, "1f1b", True, None),
                ("empty-chunk-vp2-m2", 2, 2, 4, "1f1b", False, [1, 0, 2, 1])]
    return out


GROUPS = {"pp2": (1, 2, False, cases(2)), "pp4": (1, 4, False, cases(4)),
          "tp2-pp2-sp": (2, 2, True, [("interleaved-vp2-m3", 2, 3, 4, "1f1b", False, None),
                                      ("1f1b-vp1-m2-tied", 1, 2, 3, "1f1b", True, None)])}


def data(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 97, (B * m, S + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


# ----------------------------------------------------------------------------- saved-activation meter

class SavedBytesMeter:
    """Live bytes of the tensors autograd saves for backward, by the (microbatch, chunk) whose F saved
    them (the engine's current op). A storage counts once, from its first save until it is really
    freed (a weakref finalizer on the storage), so whatever the engine forgets to release shows.
    Parameters are not activations and are skipped; storages that outlive the run (the RoPE cache,
    the caller's token batch) are dropped afterwards in `replay`."""

    def __init__(self, engine, params):
        self.engine, self.events, self.live = engine, [], {}
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}

    def _free(self, sid, ptr):
        self.events.append(("free", sid))
        self.live.pop(ptr, None)

    def pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.param_ptrs and ptr not in self.live and storage.nbytes() > 0:
            op = self.engine.trace[-1]
            sid = len(self.events)
            self.live[ptr] = sid
            self.events.append(("alloc", sid, (op.microbatch, op.chunk), storage.nbytes()))
            weakref.finalize(storage, self._free, sid, ptr)
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def replay(self):
        """(peak live bytes, peak live (microbatch, chunk) count, bytes saved per (microbatch, chunk),
        microbatches whose saves outlived the run)."""
        freed = {e[1] for e in self.events if e[0] == "free"}
        kept = sorted({e[2][0] for e in self.events if e[0] == "alloc" and e[1] not in freed})
        size, key_of, per_key, live_keys = {}, {}, {}, {}
        total = peak = peak_keys = 0
        for e in self.events:
            if e[1] not in freed:
                continue
            if e[0] == "alloc":
                _, sid, key, n = e
                size[sid], key_of[sid] = n, key
                per_key[key] = per_key.get(key, 0) + n
                live_keys[key] = live_keys.get(key, 0) + n
                total += n
            elif e[1] in size:
                total -= size[e[1]]
                live_keys[key_of[e[1]]] -= size[e[1]]
            peak = max(peak, total)
            peak_keys = max(peak_keys, sum(1 for v in live_keys.values() if v > 0))
        return peak, peak_keys, per_key, kept


# ----------------------------------------------------------------------------- the ranks

def _pipeline_worker(rank, world, tp, sp, group_cases):
    ps = ParallelState.create(tp=tp, pp=world // tp)
    results = []
    for name, vp, m, layers, kind, tied, split in group_cases:
        cfg = make_cfg(ps.pp.size, vp, m, layers, tp, sp, kind, tied, split)
        tokens, labels = data(m)
        chunks = build_stage(cfg, ps, SEED)
        engine = PipelineEngine(chunks, ps, cfg, activation_shape(cfg), torch.float32, kind)

        def get_microbatch(i):
            return tokens[i * B:(i + 1) * B], labels[i * B:(i + 1) * B]

        scale = 1.0 / tokens.numel()
        called = []
        meter = SavedBytesMeter(engine, [p for c in chunks for p in c.parameters()])
        ps.counter.reset()
        with meter.hooks():
            losses = engine.forward_backward(get_microbatch, m, scale,
                                             before_last_backward=lambda: called.append(len(engine.trace)))
        p2p_bytes = dict(ps.counter.summary())
        trace = [(o.kind, o.microbatch, o.chunk, o.peer) for o in engine.trace]
        finalize_grads(chunks, ps, grad_of=lambda p: p.grad)      # what Optimizer.step runs
        grads = {n: gather_full(p.grad, p.meta.spec, ps.tp) for c in chunks for n, p in c.named_parameters()}
        eval_losses = engine.forward_backward(get_microbatch, m, scale, forward_only=True)
        eval_trace = [(o.kind, o.microbatch, o.chunk, o.peer) for o in engine.trace]
        try:  # fewer microbatches than stages: refused on every rank before any communication
            engine.forward_backward(get_microbatch, ps.pp.size - 1, scale)
            too_few = None
        except ConfigError as e:
            too_few = str(e)
        peak, peak_keys, per_key, kept = meter.replay()
        results.append(dict(
            name=name, pp_rank=ps.pp.rank, tp_rank=ps.tp.rank, losses=torch.stack(losses) if losses else None,
            eval_losses=torch.stack(eval_losses) if eval_losses else None,
            grads=grads if ps.tp.rank == 0 else {}, trace=trace, eval_trace=eval_trace, last_b_at=called,
            peak=peak, peak_keys=peak_keys, per_key=[[k[0], k[1], n] for k, n in sorted(per_key.items())],
            p2p=p2p_bytes, too_few=too_few, kept=kept))
    return results


@pytest.fixture(scope="module")
def run():
    cache = {}

    def get(group):
        if group not in cache:
            tp, pp, sp, group_cases = GROUPS[group]
            cache[group] = spawn(tp * pp, _pipeline_worker, tp, sp, group_cases, timeout=60)
        return cache[group]
    return get


def _serial(cfg, m):
    tokens, labels = data(m)
    model = build_model(cfg.model, seed=SEED)
    per_token = model(tokens, labels)                                  # [B*m, s]
    loss = per_token.mean()
    loss.backward()
    return loss.detach(), per_token.detach().view(m, B, S).sum((1, 2)), \
        {n: p.grad for n, p in model.named_parameters()}


def _case_results(ranks, index):
    """Every rank's result for case `index` of a group."""
    return [r[index] for r in ranks]


# ----------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("group", list(GROUPS))
def test_matches_one_process(run, group):
    tp, pp, sp, group_cases = GROUPS[group]
    ranks = run(group)
    for index, (name, vp, m, layers, kind, tied, split) in enumerate(group_cases):
        cfg = make_cfg(pp, vp, m, layers, tp, sp, kind, tied, split)
        ref_loss, ref_sums, ref_grads = _serial(cfg, m)
        res = _case_results(ranks, index)
        last = [r for r in res if r["losses"] is not None]
        assert len(last) == tp and all(r["pp_rank"] == pp - 1 for r in last), name
        for r in last:
            assert_close_rel(r["losses"].sum() / (B * m * S), ref_loss, name=f"{name} loss")
            assert_close_rel(r["eval_losses"], ref_sums, name=f"{name} eval loss sums")
        seen = {}
        for r in res:
            for n, g in r["grads"].items():
                ref = ref_grads[n]
                if g.shape != ref.shape:  # vocab padded for TP: the padding rows get no gradient
                    assert n.endswith(("embedding.weight", "lm_head.weight")) and torch.all(g[ref.shape[0]:] == 0)
                    g = g[: ref.shape[0]]
                assert_close_rel(g, ref, name=f"{name} {n}")
                seen[n] = seen.get(n, 0) + 1
        # every parameter once, and the tied embedding on both the first and the last stage
        expected = {n: 1 for n in ref_grads}
        if tied:
            expected["embedding.weight"] = 2
        assert seen == expected, name


# ----------------------------------------------------------------------------- executor vs schedule

@pytest.mark.parametrize("group", list(GROUPS))
def test_trace_is_the_schedule(run, group):
    tp, pp, sp, group_cases = GROUPS[group]
    for index, (name, vp, m, layers, kind, tied, split) in enumerate(group_cases):
        # on gloo the engine posts receives one op early (what check_no_deadlock's gloo model allows)
        schedules = build_schedule(kind, pp, vp, m, early_recv=True)
        forward = forward_only_schedule(pp, vp, m, early_recv=True)
        check_no_deadlock(forward, backend="gloo")
        check_no_deadlock(forward_only_schedule(pp, vp, m), backend="nccl")
        for r in _case_results(run(group), index):
            ops = schedules[r["pp_rank"]]
            # The trace is the engine's own record of what it dispatched, so this only shows that
            # batching comm ops kept the order and nothing was skipped; that the ops really ran is
            # shown independently by the p2p byte counter below and the loss/gradient equality test.
            assert r["trace"] == [(o.kind, o.microbatch, o.chunk, o.peer) for o in ops], name
            assert r["eval_trace"] == [(o.kind, o.microbatch, o.chunk, o.peer) for o in forward[r["pp_rank"]]]
            for k in ("F", "B"):  # every microbatch, once per chunk
                done = sorted((mb, c) for kk, mb, c, _ in r["trace"] if kk == k)
                assert done == [(mb, c) for mb in range(m) for c in range(vp)], (name, k)
            # before_last_backward ran once, right before the last B
            last_b = max(i for i, o in enumerate(r["trace"]) if o[0] == "B")
            assert r["last_b_at"] == [last_b], name
            # p2p bytes: one [s/tp, b, h] fp32 tensor per comm op
            nbytes = (S // tp if sp else S) * B * 32 * 4
            sends = sum(1 for o in r["trace"] if o[0].startswith("SEND"))
            recvs = sum(1 for o in r["trace"] if o[0].startswith("RECV"))
            assert r["p2p"].get("pp/send", 0) == sends * nbytes and r["p2p"].get("pp/recv", 0) == recvs * nbytes
            assert r["too_few"] and r["too_few"].startswith("train.global_batch_size"), name


# ----------------------------------------------------------------------------- activation memory

@pytest.mark.parametrize("group", list(GROUPS))
def test_saved_activations_follow_the_schedule(run, group):
    """Live saved bytes per rank peak at the simulator's in-flight count: the number of live
    (microbatch, chunk) entries equals peak_inflight exactly, and the peak bytes equal the
    worst moment of the schedule weighted by each chunk's measured bytes, which is
    peak_inflight x bytes-per-(microbatch, chunk) where a rank's chunks all save the same."""
    tp, pp, sp, group_cases = GROUPS[group]
    checked_uniform = 0
    for index, (name, vp, m, layers, kind, tied, split) in enumerate(group_cases):
        sim = simulate(build_schedule(kind, pp, vp, m))
        for r in _case_results(run(group), index):
            per_chunk = {}
            for mb, c, n in r["per_key"]:
                per_chunk.setdefault(c, set()).add(n)
            assert all(len(v) == 1 for v in per_chunk.values()), (name, "a chunk saves the same per microbatch")
            size = {c: per_chunk[c].pop() if c in per_chunk else 0 for c in range(vp)}
            assert set(per_chunk) <= set(range(vp)), name
            if split is None:  # (an explicit split may leave a chunk without layers: it saves nothing)
                assert all(n > 0 for n in size.values()), name
            expected = held = 0
            for op in build_schedule(kind, pp, vp, m)[r["pp_rank"]]:
                if op.kind in ("F", "B"):
                    held += size[op.chunk] * (1 if op.kind == "F" else -1)
                    expected = max(expected, held)
            assert held == 0
            # what outlives the run was first saved by microbatch 0 (the RoPE cache, the caller's batch):
            # a tensor of a later microbatch still alive would be a leak
            assert r["kept"] in ([], [0]), (name, r["pp_rank"], r["kept"])
            if all(n > 0 for n in size.values()):
                assert r["peak_keys"] == sim.peak_inflight[r["pp_rank"]], (name, r["pp_rank"])
            assert r["peak"] == expected, (name, r["pp_rank"], r["peak"], expected)
            if len(set(size.values())) == 1:
                checked_uniform += 1
                assert r["peak"] == sim.peak_inflight[r["pp_rank"]] * size[0], (name, r["pp_rank"])
    assert checked_uniform > 0 or group != "pp4"


# ----------------------------------------------------------------------------- layouts, no ranks needed

def _raw_cfg(num_layers=4, pp=2, vp=1, split=None, schedule="1f1b", tp=1, sp=False, seq_len=8):
    return Config(model=ModelConfig(vocab_size=97, max_seq_len=16, hidden_size=32, num_layers=num_layers,
                                    num_heads=4, num_kv_heads=2, ffn_hidden_size=64),
                  parallel=ParallelConfig(tp=tp, pp=pp, vp=vp, layers_per_stage=split, sequence_parallel=sp),
                  train=TrainConfig(seq_len=seq_len, micro_batch_size=2, global_batch_size=8, schedule=schedule))


@pytest.mark.parametrize("kwargs,field", [
    (dict(num_layers=3, pp=2, vp=2), "parallel.pp"),                 # too few layers for the chunks
    (dict(num_layers=4, pp=2, vp=1, split=[1, 1, 2]), "parallel.layers_per_stage"),
    (dict(num_layers=4, pp=2, vp=1, split=[1, 2]), "parallel.layers_per_stage"),
    (dict(num_layers=4, pp=2, vp=1, split=[5, -1]), "parallel.layers_per_stage"),
    (dict(num_layers=4, pp=1, vp=2), "parallel.vp"),
    (dict(num_layers=8, pp=2, vp=2, schedule="gpipe"), "train.schedule"),
    (dict(num_layers=4, pp=2, schedule="zigzag"), "train.schedule"),
    (dict(num_layers=4, pp=2, tp=4, sp=True, seq_len=6), "train.seq_len"),
])
def test_bad_layouts_fail_before_running(kwargs, field):
    cfg = _raw_cfg(**kwargs)
    for fn in (Layout.from_config, chunk_layers, describe_split, lambda c: stage_chunks(c, 0),
               lambda c: build_stage(c, ParallelState.virtual(tp=c.parallel.tp, pp=c.parallel.pp), 0)):
        with pytest.raises(ConfigError) as e:
            fn(cfg)
        assert str(e.value).startswith(field) and "\n" not in str(e.value)
    one_microbatch = _raw_cfg()
    one_microbatch.train.global_batch_size = 2
    with pytest.raises(ConfigError, match="^train.global_batch_size: gives 1 microbatches"):
        Layout.from_config(one_microbatch)


def test_config_and_engine_treat_schedules_alike():
    """One validator: gpipe with vp > 1 fails when the config loads, as in the engine; interleaved
    (1f1b over vp chunks) loads, as the engine runs it."""
    raw = {"model": dict(num_layers=8, hidden_size=32, num_heads=4, ffn_hidden_size=64, vocab_size=97, max_seq_len=16),
           "parallel": dict(pp=2, vp=2), "train": dict(seq_len=8, global_batch_size=4, schedule="gpipe")}
    with pytest.raises(ConfigError, match="^train.schedule: gpipe has no interleaved variant"):
        config_from_dict(raw)
    raw["train"]["schedule"] = "interleaved"
    cfg = config_from_dict(raw)
    with pytest.raises(ConfigError, match="^train.schedule: gpipe"):
        Layout.from_config(cfg, schedule="gpipe")        # what PipelineEngine(..., schedule_kind="gpipe") runs
    assert Layout.from_config(cfg).schedule == "interleaved"


def test_balanced_split():
    # the flagship: an LM head of ~0.6 layer leaves 17 layers to the last chunk, and the first
    # chunk is the lighter one of the rest (it holds the most microbatches under 1F1B)
    assert balanced_counts(70, [0, 0, 0, 0.62]) == [17, 18, 18, 17]
    assert balanced_counts(6, [0, 0, 0, 0.6]) == [1, 2, 2, 1]
    assert balanced_counts(4, [0, 2.0]) == [3, 1]                  # a big head gets its chunk almost alone
    assert balanced_counts(8, [0, 0, 0, 0]) == [2, 2, 2, 2]
    for layers in range(4, 30):
        for pp, vp in ((2, 1), (2, 2), (4, 1), (4, 2), (3, 1)):
            if layers < pp * vp or (vp > 1 and layers % (pp * vp)):
                continue
            cfg = _raw_cfg(layers, pp, vp)
            ids = [i for r in range(pp) for k in range(vp) for i in stage_chunks(cfg, r)[k][0]]
            assert sorted(ids) == list(range(layers)) and all(len(c) >= 1 for c in chunk_layers(cfg))
            costs = [len(c) for c in chunk_layers(cfg)]
            assert max(costs) - min(costs[:-1]) <= 1   # the middle of the model is even
    text = describe_split(_raw_cfg(8, 2, 2))
    assert len(text.splitlines()) == 5 and "embedding" in text.splitlines()[1] and "LM head" in text.splitlines()[-1]
    assert chunk_layers(_raw_cfg(4, 2, 2, split=[1, 0, 2, 1])) == [[0], [], [1, 2], [3]]


def _vocab_cfg(num_layers, pp, vp, vocab):
    cfg = _raw_cfg(num_layers, pp, vp)
    cfg.model.vocab_size = vocab
    return cfg


def test_balanced_split_is_optimal_with_the_lm_head_counted():
    """chunk_layers minimises the costliest chunk, the LM head's FLOPs counted on the last chunk: checked
    against every split into pp*vp runs of >= 1 layer. With a big vocabulary the head costs several
    layers, so a split that forgot it (even chunks) is not optimal and fails here."""
    for vocab in (97, 1000, 4096):
        for pp, vp in ((2, 1), (3, 1), (4, 1), (2, 2)):
            for layers in range(pp * vp, 11):
                cfg = _vocab_cfg(layers, pp, vp, vocab)
                head, chunks = Layout.from_config(cfg).head_cost(cfg.model), pp * vp

                def worst(counts):
                    return max(n + (head if c == chunks - 1 else 0.0) for c, n in enumerate(counts))
                best = min(worst([b - a for a, b in zip((0,) + cuts, cuts + (layers,))])
                           for cuts in itertools.combinations(range(1, layers), chunks - 1))
                got = chunk_layers(cfg)
                assert [i for ids in got for i in ids] == list(range(layers)) and all(got), (vocab, pp, vp, layers)
                assert worst([len(ids) for ids in got]) == pytest.approx(best, abs=1e-9), (vocab, pp, vp, layers, got)
    # the case that shows it: a head of ~14 layers leaves the last chunk one layer
    assert [len(ids) for ids in chunk_layers(_vocab_cfg(8, 2, 2, 4096))] == [2, 2, 3, 1]


def test_describe_split_names_each_chunks_rank_and_cost():
    """Each line: global chunk c on rank c % pp as local chunk c // pp (schedule.py's layout), its layers,
    and its cost, which counts the LM head on the last chunk only."""
    for pp, vp, layers, vocab in ((2, 2, 8, 4096), (4, 2, 8, 97), (3, 1, 7, 1000)):
        cfg = _vocab_cfg(layers, pp, vp, vocab)
        head = Layout.from_config(cfg).head_cost(cfg.model)
        lines = describe_split(cfg).splitlines()[1:]
        assert len(lines) == pp * vp
        for c, (line, ids) in enumerate(zip(lines, chunk_layers(cfg))):
            got = re.match(r"  chunk (\d+): rank (\d+) local (\d+): .*\((\d+)\).*  cost ([0-9.]+)$", line)
            assert got, line
            assert [int(x) for x in got.groups()[:4]] == [c, c % pp, c // pp, len(ids)], line
            expected = len(ids) + (head if c == pp * vp - 1 else 0.0)
            assert float(got.group(5)) == pytest.approx(expected, abs=0.006), line
            assert ("embedding" in line) == (c == 0) and ("LM head" in line) == (c == pp * vp - 1), line


def test_forward_only_schedules_are_gpipes_forward_half():
    """Evaluation's ops: deadlock-free on both backends over a grid, every rank's forwards in the
    training order, and for vp == 1 GPipe's forward half. With early receives (gloo) each RECV_F is
    posted before the forward that precedes its consumer, so every transfer overlaps a forward: the
    forward half of 1F1B, or receives moved early before the backward ops were dropped (vp > 1), post
    some only after that forward (there was a B in between)."""
    for pp in (2, 3, 4):
        for vp in (1, 2):
            for m in range(pp, 2 * pp + 2):
                train = build_schedule("1f1b", pp, vp, m)
                for early in (False, True):
                    forward = forward_only_schedule(pp, vp, m, early_recv=early)
                    check_no_deadlock(forward, backend="gloo")
                    if not early:
                        check_no_deadlock(forward, backend="nccl")
                    for rank, ops in enumerate(forward):
                        assert {op.kind for op in ops} <= {"F", "SEND_F", "RECV_F"}
                        assert [op for op in ops if op.kind == "F"] == [op for op in train[rank] if op.kind == "F"]
                        if not early:
                            continue
                        fwd = [i for i, op in enumerate(ops) if op.kind == "F"]
                        for i, op in enumerate(ops):
                            if op.kind == "RECV_F":
                                key = (op.microbatch, op.chunk)
                                consumer = next(j for j in fwd if (ops[j].microbatch, ops[j].chunk) == key)
                                before = [j for j in fwd if j < consumer]
                                assert not before or i < before[-1], (pp, m, rank, i, op)


def test_pp1_is_a_plain_loop_and_matches_one_process():
    """pp=1: the same engine runs F, B per microbatch (no p2p), so the training loop has one path."""
    m = 3
    cfg = make_cfg(1, 1, m, 2)
    tokens, labels = data(m)
    ps = ParallelState.single()
    chunks = build_stage(cfg, ps, SEED)
    engine = PipelineEngine(chunks, ps, cfg, activation_shape(cfg), torch.float32)
    losses = engine.forward_backward(lambda i: (tokens[i * B:(i + 1) * B], labels[i * B:(i + 1) * B]),
                                     m, 1.0 / tokens.numel())
    assert engine.trace == [Op(k, mb) for mb in range(m) for k in ("F", "B")]
    ref_loss, ref_sums, ref_grads = _serial(cfg, m)
    assert_close_rel(torch.stack(losses), ref_sums, name="loss sums")
    for n, p in chunks[0].named_parameters():
        assert_close_rel(p.grad, ref_grads[n], name=n)
    finalize_grads(chunks, ps, grad_of=lambda p: p.grad)  # nothing to sync with one stage; must not fail
