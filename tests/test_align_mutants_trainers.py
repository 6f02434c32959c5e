"""The post-training trainers (one process each, forked) against direct computations written out here: DPO with a
reference checkpoint and distinct held-out pairs, the SFT and DPO gradients (not only their loss), SFT's resume
and evaluation in eval mode, the reward model from a base checkpoint of the same vocab, and PPO's rollout numbers
(KL, GAE, whitening, losses, gradients) from a GAE loop of its own; each kills mutants of megagpt/align/ that
the layout tests (which compare the trainers with themselves) let live."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dist import assert_close_rel, spawn, trainer_grads
from megagpt.align.chat import add_chat_tokens
from megagpt.align.prefs import dpo_rows, encode_pair
from megagpt.align.sft_data import SFTDataset, SFTRows, make_rows_batch, preprocess_conversations
from megagpt.config import ModelConfig, config_from_dict
from megagpt.data.tokenizer import Tokenizer
from megagpt.model.gpt import build_model
from megagpt.model.packing import packing_of

SEQ = 32
MODEL = dict(max_seq_len=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
             make_vocab_divisible_by=64, init_std=0.05)


def cfg_for(vocab, micro=4, glob=8, seq=SEQ, model=None, world=1, **train):
    return config_from_dict({"model": {"vocab_size": vocab, **MODEL, **(model or {})},
                             "parallel": dict(distributed_optimizer=False),
                             "train": dict(seq_len=seq, micro_batch_size=micro, global_batch_size=glob, eval_interval=0,
                                           train_iters=2, lr=1e-3, warmup=0, **train)}, world_size=world)


def _save(rank, world, vocab, seed, run_dir):
    from megagpt.checkpoint.sharded import save_checkpoint
    from megagpt.parallel.state import ParallelState
    from megagpt.pipeline.split import build_stage
    cfg = cfg_for(vocab)
    ps = ParallelState.create()
    save_checkpoint(run_dir, 1, build_stage(cfg, ps, seed=seed), ps, cfg)


def params_of(model, vocab):
    return {n: (p.detach()[:vocab] if n in ("embedding.weight", "lm_head.weight") else p.detach())
            for n, p in model.named_parameters()}


def grads_of(model, vocab):
    return {n: (p.grad[:vocab] if n in ("embedding.weight", "lm_head.weight") else p.grad)
            for n, p in model.named_parameters()}


def assert_all_close(got: dict, want: dict, what: str):
    assert sorted(got) == sorted(want), what
    for n in want:
        assert_close_rel(got[n], want[n], name=f"{what} {n}")


# ----------------------------------------------------------------------------- DPO

@pytest.fixture(scope="module")
def tok():
    return add_chat_tokens(Tokenizer.train([f"{a}+{b}={a + b} so the answer is" for a in range(20) for b in range(20)], 300))


def make_pairs(tok, lo, hi):
    return [encode_pair(tok, {"prompt": f"{a}+{a + 2}=?", "chosen": f"{a}+{a + 2}={2 * a + 2}",
                              "rejected": f"{2 * a + 1 + (a % 3)}"}) for a in range(lo, hi)]


def _dpo_worker(rank, world, vocab, pairs, held, ref_dir, run_dir):
    from megagpt.align.dpo import DPOTrainer
    tr = DPOTrainer(cfg_for(vocab), f"{run_dir}/a", pairs, eval_pairs=held, beta=0.5, reference=ref_dir)
    ev = tr.evaluate_pairs()
    rec = tr.backward(0)
    grads = trainer_grads(tr, vocab)
    firsts, backward = [], tr.backward
    tr.backward = lambda first: (firsts.append(first), backward(first))[1]
    tr.train_step()
    tr.train_step()
    at_init = DPOTrainer(cfg_for(vocab), f"{run_dir}/b", pairs, beta=0.5).evaluate_pairs()
    return {"ev": ev, "rec": rec, "grads": grads, "firsts": firsts, "at_init": at_init}


def test_dpo_reference_checkpoint_held_out_pairs_and_gradients(tmp_path, tok):
    """Policy = the initial weights, reference = another checkpoint of this model: the held-out means (5 pairs
    in batches of 4: the second batch wraps) and the first step's loss and every gradient equal a direct
    computation; steps read consecutive pairs; at initialisation no pair counts as ranked right (margin 0)."""
    vocab, beta = tok.vocab_size, 0.5
    pairs, held = make_pairs(tok, 0, 8), make_pairs(tok, 8, 13)
    spawn(1, _save, vocab, 7, str(tmp_path / "ref"), timeout=120)
    r = spawn(1, _dpo_worker, vocab, pairs, held, str(tmp_path / "ref"), str(tmp_path), timeout=180)[0]
    pol = build_model(ModelConfig(vocab_size=vocab, **MODEL), seed=1234)
    ref = build_model(ModelConfig(vocab_size=vocab, **MODEL), seed=7)

    def h_of(rows):
        tokens, labels = rows
        lp = -pol(tokens, labels).sum(1)
        with torch.no_grad():
            rp = -ref(tokens, labels).sum(1)
        return lp, rp, (lp[0::2] - lp[1::2]) - (rp[0::2] - rp[1::2])

    with torch.no_grad():
        lp, rp, h = h_of(dpo_rows(held, SEQ))
    want = {"loss": -F.logsigmoid(beta * h).mean(), "margin": beta * h.mean(), "reward_accuracy": (h > 0).double().mean(),
            "reward_chosen": beta * (lp[0::2] - rp[0::2]).mean(), "reward_rejected": beta * (lp[1::2] - rp[1::2]).mean()}
    assert 0 < want["reward_accuracy"] < 1
    for k, v in want.items():
        assert abs(r["ev"][k] - v.item()) <= 1e-5 * max(abs(v.item()), 1.0), (k, r["ev"][k], v.item())
    tokens, labels = dpo_rows(pairs, SEQ)
    _, _, h = h_of((tokens[:8], labels[:8]))                              # backward(0): pairs 0-3
    loss = -F.logsigmoid(beta * h).mean()
    loss.backward()
    assert abs(r["rec"]["loss"] - loss.item()) <= 1e-5 * loss.item()
    assert_all_close(r["grads"], grads_of(pol, vocab), "dpo")
    assert r["firsts"] == [0, 4]                                          # 8 rows a step: 4 pairs
    assert r["at_init"]["reward_accuracy"] == 0.0 and r["at_init"]["margin"] == 0.0
    assert abs(r["at_init"]["loss"] - math.log(2)) <= 1e-6


# ----------------------------------------------------------------------------- the reward model from a base

def _rm_worker(rank, world, vocab, pairs, base, run_dir):
    from megagpt.align.reward import RewardTrainer
    tr = RewardTrainer(cfg_for(vocab), run_dir, pairs, base=base)
    got = {n: p.detach().clone() for n, p in tr.chunks[0].named_parameters()}
    with torch.no_grad():
        tr.chunks[0].reward_head.zero_()                                   # every reward 0: ties
    return got, tr.evaluate_pairs()


def test_reward_model_from_a_base_of_the_same_vocab(tmp_path, tok):
    """A pretrained checkpoint of the same vocab (no reward head) loads into the reward model: its trunk read,
    the head as initialised; with all rewards equal no pair is ranked right (accuracy 0, loss ln 2)."""
    from megagpt.align.reward import RewardModel
    vocab = tok.vocab_size
    spawn(1, _save, vocab, 5, str(tmp_path / "base"), timeout=120)
    got, ev = spawn(1, _rm_worker, vocab, make_pairs(tok, 0, 8), str(tmp_path / "base"), str(tmp_path / "rm"),
                    timeout=120)[0]
    base = dict(build_model(ModelConfig(vocab_size=vocab, **MODEL), seed=5).named_parameters())
    head = build_model(ModelConfig(vocab_size=vocab, **MODEL), seed=1234, model_cls=RewardModel).reward_head
    assert sorted(got) == sorted([n for n in base if n != "lm_head.weight"] + ["reward_head"])
    for n, p in got.items():
        torch.testing.assert_close(p, (head if n == "reward_head" else base[n]).detach(), rtol=0, atol=0)
    assert ev["accuracy"] == 0.0 and ev["margin"] == 0.0 and abs(ev["loss"] - math.log(2)) <= 1e-6


# ----------------------------------------------------------------------------- SFT

def convo(i):
    a, b = 3 + i, 7 + 2 * i
    return {"messages": [{"role": "user", "content": f"{a}+{b}=?"}, {"role": "assistant", "content": f"{a}+{b}={a + b}"}]}


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    tok = add_chat_tokens(Tokenizer.train([f"{a}+{b}={a + b}" for a in range(40) for b in range(40)], 300))
    d = tmp_path_factory.mktemp("sft")
    out = []
    for name, ids in (("train", range(12)), ("held", range(20, 26))):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(convo(i)) + "\n" for i in ids))
        preprocess_conversations(str(d / f"{name}.jsonl"), str(d / name), tok)
        out.append(str(d / name))
    return tok, *out


def _sft_worker(rank, world, prefix, held, base, run_dir):
    from megagpt.align.sft import SFTTrainer
    vocab = SFTDataset(prefix).vocab_size
    out = {}
    tr = SFTTrainer(cfg_for(vocab, 2, 4), f"{run_dir}/a", prefix)
    out["loss"], out["count"] = tr.backward(0)
    out["grads"] = trainer_grads(tr, vocab)
    try:
        SFTTrainer(cfg_for(vocab - 1, 2, 4), f"{run_dir}/small", prefix)
    except ValueError as e:
        out["small"] = str(e)
    grown = SFTTrainer(cfg_for(vocab, 2, 4), f"{run_dir}/b", prefix, base=base)
    out["pad_rows"] = [tuple(p.detach()[vocab:].shape) + (float(p.detach()[vocab:].abs().sum()),)
                       for n, p in grown.chunks[0].named_parameters() if n in ("embedding.weight", "lm_head.weight")]
    grown.train_step()
    grown.save()
    trained = {n: p.detach().clone() for n, p in grown.chunks[0].named_parameters()}
    resumed = SFTTrainer(cfg_for(vocab, 2, 4), f"{run_dir}/b", prefix, load=f"{run_dir}/b", base=base)
    out["resume_diff"] = max(float((p.detach() - trained[n]).abs().max()) for n, p in resumed.chunks[0].named_parameters())
    cfg = cfg_for(vocab, 2, 4, eval_iters=1, model=dict(hidden_dropout=0.3, attention_dropout=0.1))
    tr = SFTTrainer(cfg, f"{run_dir}/c", prefix, eval_data_path=held)
    out["val"] = [tr.evaluate(), tr.evaluate()]
    out["training_after"] = all(c.training for c in tr.chunks)
    return out


def direct_sft(prefix, first_row, rows_per_step, vocab, seed=1234):
    """Sum of the per-token losses of the rows' samples, each alone, over their trainable count; its gradients."""
    data = SFTDataset(prefix)
    rows = SFTRows(data, SEQ)
    model = build_model(ModelConfig(vocab_size=vocab, **MODEL), seed=seed)
    samples = [i for r in range(first_row, first_row + rows_per_step) for i in rows.rows[r % len(rows)]]
    tokens, labels, seg = make_rows_batch(SFTRows(data, SEQ, packed=False), samples)
    loss = model(tokens, labels, packing=packing_of(seg)).sum() / (labels >= 0).sum()
    loss.backward()
    return loss.item(), grads_of(model, vocab)


def test_sft_gradients_resume_and_eval_mode(tmp_path, sft_data):
    """SFT's first step: the loss and every gradient of sum / trainable count; a model of a smaller vocab is
    refused; a base of a smaller vocab grows with zero padding rows, and a resumed run keeps its trained
    weights (the base is not loaded again); evaluation runs in eval mode (dropout off) and restores training."""
    tok, prefix, held = sft_data
    vocab = tok.vocab_size
    spawn(1, _save, vocab - 4, 99, str(tmp_path / "base"), timeout=120)
    r = spawn(1, _sft_worker, prefix, held, str(tmp_path / "base"), str(tmp_path), timeout=240)[0]
    loss, grads = direct_sft(prefix, 0, 4, vocab)
    assert abs(r["loss"] - loss) <= 1e-5 * loss
    assert_all_close(r["grads"], grads, "sft")
    assert r["small"].startswith(f"model.vocab_size: {vocab - 1} is smaller than the vocab {vocab}")
    pad = -vocab % 64                                                     # rows past the vocab: zero, not grown
    assert r["pad_rows"] == [(pad, MODEL["hidden_size"], 0.0)] * 2 and pad > 0 and r["resume_diff"] == 0.0
    want = direct_sft(held, 0, 4, vocab)[0]                               # eval: no dropout, one batch of 4 rows
    assert all(abs(v - want) <= 1e-5 * want for v in r["val"]) and r["training_after"]


# ----------------------------------------------------------------------------- PPO

V, PSEQ, GAMMA, LAM, KL, VF = 61, 24, 0.9, 0.8, 0.1, 0.7
PROMPTS = [[(7 * i + k) % (V - 1) + 1 for k in range(3 + i % 4)] for i in range(16)]


def completion(i):
    return [(11 * i + 3 * k) % (V - 1) + 1 for k in range(2 + i % 5)] + [0]


def check(i, comp):
    return float(i % 2) if i % 3 else (-0.5 if i % 2 else 0.0)            # scores 1, 0 and -0.5


def ppo_cfg(world=1):
    return cfg_for(V, 2, 8, PSEQ, model=dict(max_seq_len=32), world=world)


def _ppo_worker(rank, world, run_dir):
    from megagpt.align.ppo import PPOConfig, PPOTrainer, checker_scores
    tr = PPOTrainer(ppo_cfg(), run_dir, PROMPTS, checker_scores(check),
                    PPOConfig(kl_coef=KL, gamma=GAMMA, lam=LAM, vf_coef=VF, max_new_tokens=6))
    with torch.no_grad():
        for n, p in tr.chunks[0].named_parameters():
            if n.endswith("fc1.weight"):
                p.mul_(3.0)
    idx = tr.my_prompts(0)
    batch = tr.prepare(idx, [completion(i) for i in idx])
    rec = tr.backward(batch)
    grads = trainer_grads(tr, V)
    step = tr.train_step()
    ref = {n: t.clone() for n, t in tr.ref_params[0].items()}
    return {"batch": {k: batch[k] for k in ("adv", "returns", "stats", "count")}, "rec": rec, "grads": grads,
            "step": step, "ref": ref}


def test_ppo_rollout_numbers_and_gradients_by_hand(tmp_path):
    """For a fixed rollout (policy = fc1 x 3, reference = the initial weights): KL, entropy, reward and accuracy,
    the whitened GAE advantages and the returns, the first pass's losses and every gradient equal a direct
    computation; a step's first pass has ratio 1 and its second does not; the reference stays frozen."""
    from megagpt.align.ppo import PolicyValueModel
    r = spawn(1, _ppo_worker, str(tmp_path), timeout=240)[0]
    cfg = ppo_cfg().model
    ref = build_model(cfg, seed=1234, model_cls=PolicyValueModel)
    pol = build_model(cfg, seed=1234, model_cls=PolicyValueModel)
    with torch.no_grad():
        for n, p in pol.named_parameters():
            if n.endswith("fc1.weight"):
                p.mul_(3.0)
    idx = list(range(8))
    tokens = torch.zeros(8, PSEQ, dtype=torch.long)
    labels = torch.full((8, PSEQ), -100)
    spans = []
    for row, i in enumerate(idx):
        ids, p = PROMPTS[i] + completion(i), len(PROMPTS[i])
        tokens[row, :len(ids) - 1] = torch.tensor(ids[:-1])
        labels[row, p - 1:len(ids) - 1] = torch.tensor(ids[p:])
        spans.append(range(p - 1, len(ids) - 1))
    mask = labels != -100
    out = pol(tokens, labels)
    logp, values = -out[0], out[1]
    with torch.no_grad():
        ref_logp = -ref(tokens, labels)[0]
    scores = torch.tensor([check(i, completion(i)) for i in idx])
    lp, v = logp.detach().double(), values.detach().double()
    adv = torch.zeros(8, PSEQ, dtype=torch.float64)
    kl_sum = 0.0
    for row, span in enumerate(spans):
        a_next = v_next = 0.0
        for t in reversed(span):
            kl = float(lp[row, t] - ref_logp[row, t])
            kl_sum += kl
            reward = -KL * kl + (float(scores[row]) if t == span[-1] else 0.0)
            a_next = reward + GAMMA * v_next - float(v[row, t]) + GAMMA * LAM * a_next
            v_next = float(v[row, t])
            adv[row, t] = a_next
    returns = (adv + v) * mask
    a = adv[mask]
    white = (adv - a.mean()) / (a.var(unbiased=False) + 1e-8) ** 0.5 * mask
    count = int(mask.sum())
    ratio = torch.exp(logp - logp.detach())
    pl = (-white.float() * ratio * mask).sum()
    vl = (0.5 * (values - returns.float()) ** 2 * mask).sum()
    ((pl + VF * vl) / count).backward()
    b = r["batch"]
    assert b["count"] == count
    torch.testing.assert_close(b["adv"].double(), white, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b["returns"].double(), returns, rtol=1e-5, atol=1e-5)
    want = {"kl": kl_sum / 8, "entropy": -float((lp * mask).sum()) / count, "reward": float(scores.mean()),
            "accuracy": float((scores > 0).double().mean())}
    for k, val in want.items():
        assert abs(b["stats"][k] - val) <= 1e-5 * max(abs(val), 1e-2), (k, b["stats"][k], val)
    err = float((((values.detach() - returns.float()) ** 2) * mask).sum()) / count
    for k, val in (("value_loss", vl.item() / count), ("loss", (pl + VF * vl).item() / count), ("value_error", err)):
        assert abs(r["rec"][k] - val) <= 1e-5 * abs(val), (k, r["rec"][k], val)
    assert_all_close(r["grads"], grads_of(pol, V), "ppo")
    assert r["step"]["first_ratio_max_dev"] <= 1e-6 < 1e-4 < r["step"]["ratio_max_dev"]   # two epochs: the second moved
    for n, p in ref.named_parameters():
        torch.testing.assert_close(r["ref"][n], p.detach(), rtol=0, atol=0)


def _ppo_second_pass(rank, world, run_dir):
    from megagpt.align.ppo import PPOConfig, PPOTrainer, checker_scores
    tr = PPOTrainer(ppo_cfg(world), run_dir, PROMPTS, checker_scores(check), PPOConfig(kl_coef=KL, max_new_tokens=6))
    idx = tr.my_prompts(0)
    batch = tr.prepare(idx, [completion(i) for i in idx])
    first = tr.backward(batch)
    tr.optimizer.step(1e-3)
    return first, tr.backward(batch)


def test_ppo_ratio_max_dev_is_the_max_over_replicas(tmp_path):
    """After an update, max |ratio - 1| under DP2 (each replica half the rows) is the one-process max over all
    rows, not a sum over the replicas."""
    (one_first, one), = spawn(1, _ppo_second_pass, str(tmp_path / "one"), timeout=120)
    two = spawn(2, _ppo_second_pass, str(tmp_path / "two"), timeout=120)
    assert one_first["ratio_max_dev"] <= 1e-6 and one["ratio_max_dev"] > 1e-3
    for first, second in two:
        assert first["ratio_max_dev"] <= 1e-6
        assert abs(second["ratio_max_dev"] - one["ratio_max_dev"]) <= 1e-3 * one["ratio_max_dev"], (second, one)
