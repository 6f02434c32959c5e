"""Sharded checkpoints: saved under TP2 x DP2 with the distributed optimizer after one step, loaded
under TP1 and TP4 with bit-identical global params and optimizer state; the directory protocol
(tmp dirs, `latest`, keep-N, failed saves); and clear errors for damaged or foreign checkpoints."""
import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from dist import batch, gather_full, spawn, tiny_model_cfg
from megagpt.checkpoint.sharded import CheckpointError, load_checkpoint, load_optimizer_state, save_checkpoint
from megagpt.checkpoint.store import digest, find_checkpoint
from megagpt.config import ParallelConfig, TrainConfig
from megagpt.model.gpt import build_model
from megagpt.optim.optimizer import build_optimizer
from megagpt.parallel.state import ParallelState

CFG = tiny_model_cfg(num_kv_heads=2)         # vocab 1001 padded per tp: 1001 (tp1), 1002 (tp2), 1004 (tp4)
V = CFG.vocab_size


def _setup(tp: int, seed: int = 1234):
    ps = ParallelState.create(tp=tp) if dist.is_initialized() else ParallelState.single()
    model = build_model(CFG, ps, seed=seed)
    opt = build_optimizer([model], ps, TrainConfig(lr=1e-3, warmup=0), ParallelConfig(tp=tp), CFG)
    return ps, model, opt


def _global_state(model, opt, ps) -> dict:
    """Every param and optimizer tensor as a global tensor, vocab rows trimmed: the layout-free truth."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = gather_full(p.detach(), p.meta.spec, ps.tp)
    state = opt.state_for_checkpoint()
    for name, p in model.named_parameters():
        e = state.get(name)                           # a DP rank may own none of a param
        for key in ("main", "exp_avg", "exp_avg_sq"):
            flat = torch.zeros(p.numel())
            if e is not None:
                flat[e["start"]:e["end"]] = e[key]
            if ps.dp.size > 1:                        # DP shards tile the local tensor: summing joins them
                dist.all_reduce(flat, group=ps.dp.pg)
            out[f"{name}/{key}"] = gather_full(flat.view(p.shape), p.meta.spec, ps.tp)
    out = {k: v[:V] if k.split("/")[0] in ("embedding.weight", "lm_head.weight") else v for k, v in out.items()}
    return {**out, "step": state["step"]}


def _train_and_save(rank, world, run_dir):
    ps, model, opt = _setup(tp=2)
    tokens, labels = batch(CFG, seed=rank // 2)
    opt.zero_grad()
    opt.scale_loss(model(tokens, labels).mean()).backward()
    opt.step(1e-3)
    save_checkpoint(run_dir, 5, [model], ps, None, {"rank": rank, "rng": torch.get_rng_state()}, opt, keep=2)
    # a save that fails on rank 1 only: every rank gets a clear error, nothing hangs, step 5 survives
    try:
        save_checkpoint(run_dir, 6, [model], ps, None, {"bad": {1, 2}} if rank == 1 else {}, opt)
        failure = None
    except CheckpointError as e:
        failure = str(e)
    return {"state": _global_state(model, opt, ps), "failure": failure}


def _load_and_report(rank, world, path, tp):
    ps, model, opt = _setup(tp=tp, seed=99)           # a different init: everything must come from the file
    extra = load_checkpoint(path, [model], ps, None, opt)
    emb = gather_full(model.embedding.weight.detach(), model.embedding.weight.meta.spec, ps.tp)
    return {"state": _global_state(model, opt, ps), "extra_rank": extra["rank"], "padding": emb[V:]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("run"))
    out = spawn(4, _train_and_save, run_dir)
    return run_dir, out[0]["state"], [o["failure"] for o in out]


def _assert_same(state, ref):
    assert set(state) == set(ref)
    for k in ref:
        if k == "step":
            assert state[k] == ref[k]
        else:
            assert torch.equal(state[k], ref[k]), k


def test_failed_save_reports_on_every_rank_and_keeps_the_last_good(saved):
    run_dir, _, failures = saved
    assert "failed on rank 1: extra.bad: a set cannot be stored" in failures[1]
    assert all("step 6" in f and "previous checkpoint is untouched" in f for f in failures)
    assert sorted(os.listdir(run_dir)) == ["latest", "step_00000005"]   # the tmp dir is gone
    assert open(os.path.join(run_dir, "latest")).read().strip() == "step_00000005"


def test_tp2_dp2_loads_bit_identical_under_tp1(saved):
    run_dir, ref, _ = saved
    ps, model, opt = _setup(tp=1, seed=99)
    extra = load_checkpoint(run_dir, [model], ps, None, opt)
    assert extra["rank"] == 0
    rng = torch.get_rng_state()                               # RNG states come back as tensors
    assert extra["rng"].dtype == rng.dtype and extra["rng"].shape == rng.shape
    _assert_same(_global_state(model, opt, ps), ref)


def test_tp2_dp2_loads_bit_identical_under_tp4(saved):
    run_dir, ref, _ = saved
    out = spawn(4, _load_and_report, run_dir, 4)
    _assert_same(out[0]["state"], ref)
    assert out[0]["padding"].shape == (3, 64) and torch.all(out[0]["padding"] == 0)   # 1004 rows: re-padded
    # tp4 x dp1 wraps onto the saved tp2 x dp2 grid: tp ranks 0..3 -> saved tp 0, 1, 0, 1 (dp 0)
    assert [o["extra_rank"] for o in out] == [0, 1, 0, 1]


def test_same_layout_returns_each_ranks_own_extra(saved):
    run_dir, ref, _ = saved
    out = spawn(4, _load_and_report, run_dir, 2)
    assert [o["extra_rank"] for o in out] == [0, 1, 2, 3]
    _assert_same(out[0]["state"], ref)


def test_load_optimizer_state_for_given_ranges(saved):
    run_dir, ref, _ = saved
    from megagpt.parallel.layers import ShardSpec
    name = "layers.1.attention.qkv.weight"                     # GQA: Q split, K/V by head
    spec = ShardSpec(0, ((64, 0), (16, 2), (16, 2)))
    state = load_optimizer_state(run_dir, {name: ((96, 64), spec, 1, 2)}, {name: (100, 700)})
    local = spec.shard(ref[f"{name}/exp_avg"], 1, 2).reshape(-1)
    assert torch.equal(state[name]["exp_avg"], local[100:700]) and state["step"] == 1


def _save_replicated_optimizer(rank, world, run_dir):
    ps = ParallelState.create(tp=1)                            # dp=2: both ranks hold the whole range (ddp)
    model = build_model(CFG, ps, seed=1)
    n = model.get_parameter("layers.0.mlp.fc2.weight").numel()
    opt = {"layers.0.mlp.fc2.weight": {"start": 0, "end": n, "exp_avg": torch.arange(n, dtype=torch.float32)},
           "step": 3}
    save_checkpoint(run_dir, 1, [model], ps, None, {}, opt)


def test_optimizer_range_saved_by_every_dp_rank_is_read_once(tmp_path):
    # the two DP replicas of [0, n) overlap fully; tp rank 1's half of fc2 [64, 96] (dim 1) is 64 runs of
    # 48, each must come from one replica only
    from megagpt.parallel.layers import ShardSpec
    spawn(2, _save_replicated_optimizer, str(tmp_path))
    name = "layers.0.mlp.fc2.weight"
    state = load_optimizer_state(str(tmp_path), {name: ((64, 96), ShardSpec(1, ((96, 0),)), 1, 2)}, {name: (0, 64 * 48)})
    assert torch.equal(state[name]["exp_avg"], torch.arange(64 * 96.).view(64, 96)[:, 48:].reshape(-1))
    assert state["step"] == 3


# ----------------------------------------------------------------------------- the directory protocol

def _single(tmp_path, steps, keep=2, **over):
    ps = ParallelState.single()
    model = build_model(tiny_model_cfg(**over), ps)
    for s in steps:
        save_checkpoint(str(tmp_path), s, [model], ps, None, {"step": s}, None, keep=keep)
    return ps, model


def test_tmp_dir_of_a_killed_save_is_ignored_and_cleaned(tmp_path):
    ps, model = _single(tmp_path, [1])
    killed = tmp_path / "step_00000002.tmp-deadbeef"
    killed.mkdir()
    (killed / "rank_00000.safetensors").write_bytes(b"half a file")
    (killed / "COMPLETE").write_text("{}")                     # even a manifest inside a tmp dir is ignored
    assert find_checkpoint(str(tmp_path)).endswith("step_00000001")
    assert load_checkpoint(str(tmp_path), [model], ps)["step"] == 1
    save_checkpoint(str(tmp_path), 3, [model], ps, None, {}, None)
    assert not killed.exists()


def test_manifest_in_a_tmp_dir_never_counts_without_latest(tmp_path):
    # a save killed after COMPLETE but before its rename; with no `latest` the newest complete wins
    ps, model = _single(tmp_path, [1])
    shutil.copytree(tmp_path / "step_00000001", tmp_path / "step_00000002.tmp-deadbeef")
    shutil.copytree(tmp_path / "step_00000001", tmp_path / "step_00000003.old-deadbeef")
    os.remove(tmp_path / "latest")
    assert find_checkpoint(str(tmp_path)).endswith("step_00000001")


def test_latest_pointer(tmp_path):
    ps, model = _single(tmp_path, [1, 2], keep=0)
    latest = tmp_path / "latest"
    assert latest.read_text().strip() == "step_00000002"
    latest.write_text("step_00000001\n")                       # rolled back by hand: honoured
    assert load_checkpoint(str(tmp_path), [model], ps)["step"] == 1
    latest.write_text("step_00000009\n")                       # names nothing complete: newest complete
    assert load_checkpoint(str(tmp_path), [model], ps)["step"] == 2
    assert load_checkpoint(str(tmp_path / "step_00000001"), [model], ps)["step"] == 1
    latest.write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="is not a step directory name"):
        load_checkpoint(str(tmp_path), [model], ps)


def test_keep_n(tmp_path):
    _single(tmp_path, [1, 2, 3, 4], keep=2)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000003", "step_00000004"]


def test_resaving_a_step_replaces_it(tmp_path):
    ps, model = _single(tmp_path, [1, 1])
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000001"]
    assert load_checkpoint(str(tmp_path), [model], ps)["step"] == 1


# ----------------------------------------------------------------------------- damaged and foreign checkpoints

@pytest.fixture
def copy(saved, tmp_path):
    step_dir = tmp_path / "step_00000005"
    shutil.copytree(os.path.join(saved[0], "step_00000005"), step_dir)
    return step_dir


def _load_tp1(path, verify=True, **over):
    ps = ParallelState.single()
    model = build_model(tiny_model_cfg(num_kv_heads=2, **over), ps)
    return load_checkpoint(str(path), [model], ps, verify=verify)


def _rewrite_manifest(step_dir, fn):
    m = json.loads((step_dir / "COMPLETE").read_text())
    fn(m)
    (step_dir / "COMPLETE").write_text(json.dumps(m))


def test_corrupt_file_same_size(copy):
    f = copy / "rank_00001.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"rank_00001.safetensors: sha256 .* \(corrupt file\)"):
        _load_tp1(copy)


def test_truncated_file(copy):
    f = copy / "rank_00000.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"rank_00000.safetensors: \d+ bytes, COMPLETE says \d+ \(truncated"):
        _load_tp1(copy)


def test_garbage_file_without_verification(copy):
    f = copy / "rank_00000.safetensors"
    size = f.stat().st_size
    f.write_bytes(b"\xff" * size)
    with pytest.raises(CheckpointError, match="rank_00000.safetensors: unreadable safetensors file"):
        _load_tp1(copy, verify=False)


def test_missing_shard(copy):
    os.remove(copy / "rank_00001.safetensors")
    with pytest.raises(CheckpointError, match="rank_00001.safetensors is listed in COMPLETE but missing"):
        _load_tp1(copy)


def test_manifest_missing_a_rank(copy):
    _rewrite_manifest(copy, lambda m: m["files"].pop("rank_00003.json"))
    with pytest.raises(CheckpointError, match="no rank_00003.json for rank 3 of 4"):
        _load_tp1(copy)


def test_tp_shard_missing_from_metadata(copy):
    meta = json.loads((copy / "rank_00001.json").read_text())
    del meta["tensors"]["layers.0.mlp.fc2.weight"]               # tp rank 1's piece of it
    (copy / "rank_00001.json").write_text(json.dumps(meta))
    _rewrite_manifest(copy, lambda m: m["files"].update({"rank_00001.json": digest(str(copy / "rank_00001.json"))}))
    with pytest.raises(CheckpointError, match="layers.0.mlp.fc2.weight: .* has no shard for tp rank 1 of 2"):
        _load_tp1(copy)


def test_wrong_shape(copy):
    f = copy / "rank_00001.safetensors"
    tensors = load_file(str(f))
    tensors["layers.0.mlp.fc2.weight"] = tensors["layers.0.mlp.fc2.weight"][:, :40].contiguous()
    save_file(tensors, str(f))
    _rewrite_manifest(copy, lambda m: m["files"].update({"rank_00001.safetensors": digest(str(f))}))
    with pytest.raises(CheckpointError, match=r"layers.0.mlp.fc2.weight: the shard of tp rank 1 has shape "
                                              r"\(64, 40\), expected \(64, 48\)"):
        _load_tp1(copy)


def test_incompatible_model_config(copy):
    with pytest.raises(CheckpointError, match=r"model.hidden_size: the checkpoint .* has 64, this model has 128"):
        _load_tp1(copy, hidden_size=128)
    with pytest.raises(CheckpointError, match=r"model.kv_heads: the checkpoint .* has 2, this model has 1"):
        _load_tp1(copy, multi_query=True)


@pytest.mark.parametrize("name", ["../rank_00000.json", "/etc/passwd", "sub/rank_00000.json", ".."])
def test_manifest_path_traversal_refused(copy, name):
    _rewrite_manifest(copy, lambda m: m["files"].update({name: {"size": 1, "sha256": "0"}}))
    with pytest.raises(CheckpointError, match="refused"):
        _load_tp1(copy)


def test_swapped_rank_metadata_refused(copy):
    # rank 1's JSON under rank 0's name (manifest re-hashed): TP pieces have equal shapes, so only the
    # rank field stops tp rank 1's piece from loading as tp rank 0's
    a, b = copy / "rank_00000.json", copy / "rank_00001.json"
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db), b.write_bytes(da)
    _rewrite_manifest(copy, lambda m: m["files"].update({n: digest(str(copy / n)) for n in (a.name, b.name)}))
    with pytest.raises(CheckpointError, match="rank_00000.json: not the megagpt-sharded-v1 metadata of rank 0"):
        _load_tp1(copy)


def test_rank_file_symlinked_outside_refused(copy, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(copy / "rank_00000.json", outside / "rank_00000.json")
    os.symlink(outside / "rank_00000.json", copy / "rank_00000.json")    # same bytes: size and sha256 agree
    with pytest.raises(CheckpointError, match=r"'rank_00000.json' resolves outside .*step_00000005 \(refused\)"):
        _load_tp1(copy)


def test_no_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        _load_tp1(tmp_path)


# ----------------------------------------------------------------------------- pipeline stages, tied embeddings

def _save_pp2_tied(rank, world, run_dir, cfg):
    ps = ParallelState.create(pp=2)
    model = build_model(cfg, ps, layer_ids=[rank], pre_process=rank == 0, post_process=rank == 1)
    with torch.no_grad():
        if rank == 1:
            model.embedding.weight.add_(1.0)       # the last stage's copy: never written, so never read back
    g = torch.Generator().manual_seed(rank)
    state = {name: {"start": 0, "end": p.numel(), **{k: torch.randn(p.numel(), generator=g)
                                                      for k in ("main", "exp_avg", "exp_avg_sq")}}
             for name, p in model.named_parameters()}
    save_checkpoint(run_dir, 1, [model], ps, None, {}, {**state, "step": 7})
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "optim": state}


def test_pp2_tied_embedding_loads_under_pp1(tmp_path):
    cfg = tiny_model_cfg(tie_embeddings=True)
    first, last = spawn(2, _save_pp2_tied, str(tmp_path), cfg)
    ps = ParallelState.single()
    model = build_model(cfg, ps, seed=99)
    load_checkpoint(str(tmp_path), [model], ps)
    expected = {**last["params"], **first["params"]}          # the embedding: the first stage's
    got = dict(model.named_parameters())
    assert set(got) == set(expected)
    for name, t in expected.items():
        assert torch.equal(got[name], t), name
    specs = {n: (tuple(p.meta.global_shape), p.meta.spec, 0, 1) for n, p in got.items()}
    state = load_optimizer_state(str(tmp_path), specs, {n: (0, p.numel()) for n, p in got.items()})
    saved = {**last["optim"], **first["optim"]}
    assert state["step"] == 7
    for name in got:
        for key in ("main", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[name][key], saved[name][key]), (name, key)


def _fake_complete(run_dir, step):
    from megagpt.checkpoint.store import step_dir_name, write_manifest
    d = os.path.join(run_dir, step_dir_name(step))
    os.makedirs(d)
    write_manifest(d, step, 0)
    return d


def test_prune_keeps_the_checkpoint_latest_names(tmp_path):
    """Resumed from step 4 of a run that reached 8, then saved 6 with keep=1: 6 must survive."""
    from megagpt.checkpoint.store import complete_checkpoints, prune
    run = str(tmp_path)
    for s in (4, 6, 8):
        _fake_complete(run, s)
    prune(run, 1, protect=os.path.join(run, "step_00000006"))
    assert [s for s, _ in complete_checkpoints(run)] == [6, 8]


def test_old_copy_of_a_killed_republish_is_restored(tmp_path):
    """A save of an existing step killed between publish's two renames leaves only the .old copy."""
    from megagpt.checkpoint.store import clean_stale, complete_checkpoints
    run = str(tmp_path)
    d = _fake_complete(run, 5)
    os.replace(d, d + ".old-abc")
    os.makedirs(os.path.join(run, "step_00000007.tmp-def"))
    clean_stale(run)
    assert [s for s, _ in complete_checkpoints(run)] == [5]
    assert sorted(os.listdir(run)) == ["step_00000005"]
