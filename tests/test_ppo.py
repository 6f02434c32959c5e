"""PPO on the engine: for a fixed rollout batch, TP2+SP, PP2, DP2 and DP2 with the distributed optimizer (ZeRO-1)
give the one-process PPO losses, stats and every gradient (fp32, 1e-5 relative); in every layout the first pass
has ratio 1 (mean and max |ratio - 1| within 1e-6) and, with the policy equal to the reference, KL 0; rollouts
come from the KV-cache generator and a training step runs."""
import torch

from dist import assert_close_rel, spawn, trainer_grads
from megagpt.config import config_from_dict

V, SEQ = 61, 24


def cfg_for(tp=1, pp=1, dp=1, sp=False, zero=False, **model_over):
    model = dict(vocab_size=V, max_seq_len=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 ffn_hidden_size=64, make_vocab_divisible_by=8, init_std=0.05, **model_over)
    return config_from_dict({"model": model, "parallel": dict(tp=tp, pp=pp, sequence_parallel=sp, distributed_optimizer=zero),
                             "train": dict(seq_len=SEQ, micro_batch_size=2, global_batch_size=8, eval_interval=0,
                                           train_iters=2, lr=1e-3)}, world_size=tp * pp * dp)


PROMPTS = [[(7 * i + k) % (V - 1) + 1 for k in range(3 + i % 4)] for i in range(16)]


def completion(i):
    return [(11 * i + 3 * k) % (V - 1) + 1 for k in range(2 + i % 5)] + [0]


def check(i, comp):
    return float(i % 2) if comp[-1] == 0 else -0.5


def _worker(rank, world, layouts, run_dir, perturb, model_over=None):
    from megagpt.align.ppo import PPOConfig, PPOTrainer, checker_scores
    out = {}
    for name, (tp, pp, dp, sp, *zero) in layouts.items():
        if tp * pp * dp != world:
            continue
        tr = PPOTrainer(cfg_for(tp, pp, dp, sp, *zero, **(model_over or {})), f"{run_dir}/{name}", PROMPTS,
                        checker_scores(check), PPOConfig(kl_coef=0.1, max_new_tokens=6))
        if perturb:
            with torch.no_grad():
                for c in tr.chunks:
                    for n, p in c.named_parameters():
                        if n.endswith("fc1.weight"):
                            p.mul_(3.0)
        idx = tr.my_prompts(0)
        batch = tr.prepare(idx, [completion(i) for i in idx])
        rec = tr.backward(batch)
        grads = trainer_grads(tr, V)
        step = None
        if name == "serial":                    # a whole step: rollouts from the KV-cache generator
            tr.optimizer.zero_grad()
            step = tr.train_step()
        if tr.ps.tp.rank == 0 and tr.ps.dp.rank == 0:
            out[f"{name}@{tr.ps.pp.rank}"] = {"rec": rec, "stats": batch["stats"], "grads": grads, "step": step}
    return out


LAYOUTS = {"serial": (1, 1, 1, False), "tp2-sp": (2, 1, 1, True), "pp2": (1, 2, 1, False), "dp2": (1, 1, 2, False),
           "dp2-zero1": (1, 1, 2, False, True)}      # the default distributed optimizer: reduce-scattered grads


def assert_first_pass_ratio_one(rec, name):
    """The first pass runs the policy that sampled: every ratio exp(logp - old_logp) is 1."""
    assert rec["ratio_max_dev"] <= 1e-6 and abs(rec["ratio_mean"] - 1.0) <= 1e-6, (name, rec)


def run(tmp_path, perturb):
    res = {}
    for world in (1, 2):
        for r in spawn(world, _worker, LAYOUTS, str(tmp_path), perturb, timeout=240):
            for key, v in r.items():
                name = key.split("@")[0]
                res.setdefault(name, {**v, "grads": {}})["grads"].update(v["grads"])
    return res


def test_ppo_layouts_match_one_process(tmp_path):
    res = run(tmp_path, perturb=True)
    ref = res["serial"]
    assert ref["stats"]["kl"] != 0.0 and ref["rec"]["clip_frac"] == 0.0         # ratio 1 on the first pass
    for name in LAYOUTS:
        assert_first_pass_ratio_one(res[name]["rec"], name)
    for name in ("tp2-sp", "pp2", "dp2", "dp2-zero1"):
        got = res[name]
        for part in ("rec", "stats"):
            for k, v in ref[part].items():
                assert abs(got[part][k] - v) <= 1e-5 * max(abs(v), 1.0), (name, k, got[part][k], v)
        assert sorted(got["grads"]) == sorted(ref["grads"])
        for n, g in ref["grads"].items():
            assert_close_rel(got["grads"][n], g, name=f"{name} {n}")
    step = ref["step"]
    assert all(torch.isfinite(torch.tensor(float(step[k]))) for k in ("loss", "kl", "reward", "entropy", "clip_frac"))


def test_ppo_policy_equal_reference_kl_zero(tmp_path):
    res = spawn(1, _worker, {"serial": LAYOUTS["serial"]}, str(tmp_path), False, timeout=120)[0]
    r = next(iter(res.values()))
    assert r["stats"]["kl"] == 0.0 and r["rec"]["clip_frac"] == 0.0
    assert_first_pass_ratio_one(r["rec"], "serial")


def test_ppo_runs_without_dropout(tmp_path):
    """A config with dropout: PPO runs with it off (align/base.py, as TRL), so the first pass still has ratio 1
    (with dropout on in the update, clip_frac was 0.27 at hidden_dropout 0.3)."""
    r = spawn(1, _worker, {"serial": LAYOUTS["serial"]}, str(tmp_path), True,
              {"hidden_dropout": 0.3, "attention_dropout": 0.1}, timeout=120)[0]
    rec = next(iter(r.values()))["rec"]
    assert rec["clip_frac"] == 0.0
    assert_first_pass_ratio_one(rec, "serial with dropout in the config")


def _rm_score_worker(rank, world, pp, run_dir):
    from megagpt.align.ppo import RewardScorer
    from megagpt.align.reward import RewardTrainer
    cfg = config_from_dict({"model": cfg_for().model.__dict__, "parallel": dict(pp=pp, distributed_optimizer=False),
                            "train": dict(seq_len=SEQ, micro_batch_size=2, global_batch_size=4, eval_interval=0)},
                           world_size=pp)
    pairs = [(PROMPTS[i], completion(i), completion(i + 1)) for i in range(4)]
    rm = RewardTrainer(cfg, run_dir, pairs)
    idx = [0, 3, 5, 6]
    scores = RewardScorer(rm, PROMPTS)(idx, [completion(i) for i in idx])
    return scores if rm.ps.is_last_stage else None


def test_reward_model_scores_rollouts(tmp_path):
    """RewardScorer (PPO's score from a reward model) equals the reward model run directly, in one process
    and under PP2 (on the last stage)."""
    from megagpt.align.reward import RewardModel
    from megagpt.model.gpt import build_model
    model = build_model(cfg_for().model, seed=1234, model_cls=RewardModel)
    idx = [0, 3, 5, 6]
    want = torch.stack([model(torch.tensor([PROMPTS[i] + completion(i)]), torch.tensor([len(PROMPTS[i]) + len(completion(i)) - 1]))[0]
                        for i in idx])
    for pp in (1, 2):
        got = [r for r in spawn(pp, _rm_score_worker, pp, str(tmp_path / f"pp{pp}"), timeout=120) if r is not None][0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
