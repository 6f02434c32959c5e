"""DPO and the reward model: the losses against their formulas, the pair rows (answers only, rewards at
the last real token), ln 2 at initialisation, and TP2+SP, PP2, DP2 against one process (loss and every
gradient, fp32, 1e-5 relative; DP2 also with the default distributed optimizer, ZeRO-1) and against a direct
one-process computation without the engine; held-out means count each pair once when the batch wraps."""
import math

import pytest
import torch
import torch.nn.functional as F

from dist import assert_close_rel, spawn, trainer_grads
from megagpt.align.chat import END_TOKEN, add_chat_tokens
from megagpt.align.losses import dpo_loss, reward_pair_loss
from megagpt.align.prefs import dpo_rows, encode_pair, reward_rows
from megagpt.config import ModelConfig, config_from_dict
from megagpt.data.indexed import DataError
from megagpt.data.tokenizer import Tokenizer
from megagpt.model.gpt import build_model
from megagpt.model.packing import IGNORE_INDEX

SEQ = 32


@pytest.fixture(scope="module")
def tok():
    return add_chat_tokens(Tokenizer.train([f"{a}+{b}={a + b} so the answer is" for a in range(20) for b in range(20)], 300))


def make_pairs(tok, n=8):
    recs = [{"prompt": f"{a}+{a + 2}=?", "chosen": f"{a}+{a + 2}={2 * a + 2}", "rejected": f"{2 * a + 1 + (a % 3)}"}
            for a in range(n)]
    return [encode_pair(tok, r) for r in recs]


def test_losses_match_formulas():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    h = (pc - pr) - (rc - rr)
    for beta, eps in ((0.1, 0.0), (0.5, 0.2)):
        losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta, "sigmoid", eps)
        sig = lambda z: 1 / (1 + torch.exp(-z))  # noqa: E731
        want = -(1 - eps) * torch.log(sig(beta * h)) - eps * torch.log(sig(-beta * h))
        torch.testing.assert_close(losses, want)
        torch.testing.assert_close(cr, beta * (pc - rc))
        torch.testing.assert_close(rj, beta * (pr - rr))
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, 0.25, "ipo")
    torch.testing.assert_close(ipo, (h - 2.0) ** 2)
    same = torch.tensor([-3.0, -7.0])
    assert torch.allclose(dpo_loss(same, same - 1, same, same - 1, 0.1)[0], torch.full((2,), math.log(2.0)))
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="dpo.beta"):
            dpo_loss(pc, pr, rc, rr, bad)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, 0.1, "hinge?")
    torch.testing.assert_close(reward_pair_loss(pc, pr, 0.5), torch.log1p(torch.exp(-(pc - pr - 0.5))))


def test_pair_rows(tok):
    pairs = make_pairs(tok, 3)
    with pytest.raises(DataError, match="the same answer"):
        encode_pair(tok, {"prompt": "x", "chosen": "4", "rejected": "4"})
    tokens, labels = dpo_rows(pairs, SEQ)
    last_t, last = reward_rows(pairs, SEQ)
    end = tok.token_id(END_TOKEN)
    for k, (prompt, c, r) in enumerate(pairs):
        for j, ans in enumerate((c, r)):
            row = 2 * k + j
            kept = labels[row][labels[row] != IGNORE_INDEX].tolist()
            assert kept == ans                                            # exactly the answer and its <|end|>
            assert tokens[row, :len(prompt)].tolist() == prompt
            assert int(last_t[row, last[row]]) == end and int(last[row]) == len(prompt) + len(ans) - 1
    with pytest.raises(DataError, match="train.seq_len"):
        dpo_rows(pairs, 4)


def mcfg(vocab):
    return dict(vocab_size=vocab, max_seq_len=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                ffn_hidden_size=64, make_vocab_divisible_by=8, init_std=0.05)


def cfg_for(vocab, tp=1, pp=1, dp=1, sp=False, zero=False, **model_over):
    return config_from_dict({"model": {**mcfg(vocab), **model_over}, "parallel": dict(tp=tp, pp=pp, sequence_parallel=sp,
                                                                                      distributed_optimizer=zero),
                             "train": dict(seq_len=SEQ, micro_batch_size=4, global_batch_size=8, eval_interval=0,
                                           train_iters=1)}, world_size=tp * pp * dp)


def _worker(rank, world, kind, layouts, vocab, pairs, run_dir, kw):
    from megagpt.align.dpo import DPOTrainer
    from megagpt.align.reward import RewardTrainer
    out = {}
    for name, (tp, pp, dp, sp, *zero) in layouts.items():
        if tp * pp * dp != world:
            continue
        cfg = cfg_for(vocab, tp, pp, dp, sp, *zero)
        cls = DPOTrainer if kind == "dpo" else RewardTrainer
        tr = cls(cfg, f"{run_dir}/{name}", pairs, **kw)
        if kind == "dpo":        # move the policy off the reference first, so the loss is not just ln 2 (fc1 x 3)
            with torch.no_grad():
                for c in tr.chunks:
                    for n, p in c.named_parameters():
                        if n.endswith("fc1.weight"):
                            p.mul_(3.0)
        rec = tr.backward(1)
        grads = trainer_grads(tr, vocab)
        ev = tr.evaluate_pairs()
        if tr.ps.tp.rank == 0 and tr.ps.dp.rank == 0:
            out[f"{name}@{tr.ps.pp.rank}"] = {"rec": rec, "grads": grads, "eval": ev}
    return out


LAYOUTS = {"serial": (1, 1, 1, False), "tp2-sp": (2, 1, 1, True), "pp2": (1, 2, 1, False), "dp2": (1, 1, 2, False),
           "dp2-zero1": (1, 1, 2, False, True)}      # the default distributed optimizer: reduce-scattered grads


def run_layouts(kind, tok, tmp_path, kw):
    pairs = make_pairs(tok)
    res = {}
    for world in (1, 2):
        for r in spawn(world, _worker, kind, LAYOUTS, tok.vocab_size, pairs, str(tmp_path), kw, timeout=240):
            for key, v in r.items():
                name = key.split("@")[0]
                res.setdefault(name, {**v, "grads": {}})["grads"].update(v["grads"])
    ref = res["serial"]
    for name in ("tp2-sp", "pp2", "dp2", "dp2-zero1"):
        got = res[name]
        for k, v in ref["rec"].items():   # implicit rewards are beta (pi - ref), differences of sums of
            # ~20 log-probs each (|beta pi| ~ 1): 1e-5 relative to that scale, not to the small difference
            assert abs(got["rec"][k] - v) <= 1e-5 * max(abs(v), 1.0), (name, k, got["rec"][k], v)
        assert abs(got["eval"]["loss"] - ref["eval"]["loss"]) <= 1e-5 * abs(ref["eval"]["loss"])
        assert sorted(got["grads"]) == sorted(ref["grads"])
        for n, g in ref["grads"].items():
            assert_close_rel(got["grads"][n], g, name=f"{name} {n}")
    return pairs, ref


@pytest.mark.parametrize("nll_weight", [0.0, 0.5])
def test_dpo_layouts_match_one_process_and_formula(tmp_path, tok, nll_weight):
    """nll_weight > 0: DPO + the chosen answers' mean per-token NLL (align/dpo.py), the same in every layout."""
    beta = 1.0
    pairs, ref = run_layouts("dpo", tok, tmp_path, {"beta": beta, "nll_weight": nll_weight})
    # direct: reference = the initial model, policy = fc1 x 3; backward(1): the global batch of pairs 1..4
    model = build_model(ModelConfig(**mcfg(tok.vocab_size)), seed=1234)
    tokens, labels = dpo_rows(pairs, SEQ)
    rows = slice(2, 10)
    ref_logp = -model(tokens[rows], labels[rows]).sum(1).detach()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("fc1.weight"):
                p.mul_(3.0)
    logp = -model(tokens[rows], labels[rows]).sum(1)
    h = (logp[0::2] - logp[1::2]) - (ref_logp[0::2] - ref_logp[1::2])
    n_chosen = (labels[rows][0::2] != IGNORE_INDEX).sum(1)
    want = (-F.logsigmoid(beta * h) - nll_weight * logp[0::2] / n_chosen).mean()
    assert abs(ref["rec"]["loss"] - want.item()) <= 1e-5 * want.item()
    margin = beta * ((logp[0::2] - ref_logp[0::2]) - (logp[1::2] - ref_logp[1::2]))
    assert abs(ref["rec"]["margin"] - margin.mean().item()) <= 1e-5 * max(abs(margin.mean().item()), 1e-3)
    assert abs(ref["rec"]["loss"] - math.log(2)) > 1e-3                  # the policy really moved


def _init_worker(rank, world, vocab, pairs, run_dir, kw, model_over=None):
    from megagpt.align.dpo import DPOTrainer
    tr = DPOTrainer(cfg_for(vocab, **(model_over or {})), run_dir, pairs, **kw)
    return {"rec": tr.backward(0), "eval": tr.evaluate_pairs(),
            "dropout": (tr.cfg.model.hidden_dropout, tr.cfg.model.attention_dropout)}


def test_dpo_runs_without_dropout(tmp_path, tok, capfd):
    """A config with dropout: DPO runs with it off (align/base.py, as TRL), so the loss at initialisation is
    still ln 2 (with dropout on in the update it was 0.70093 at hidden_dropout 0.3), and says so."""
    r = spawn(1, _init_worker, tok.vocab_size, make_pairs(tok), str(tmp_path), {"beta": 0.1},
              {"hidden_dropout": 0.3, "attention_dropout": 0.1}, timeout=120)[0]
    assert abs(r["rec"]["loss"] - math.log(2)) <= 1e-6 * math.log(2) and r["rec"]["margin"] == 0.0
    assert r["dropout"] == (0.0, 0.0)
    assert "dpo: runs with dropout off (model.hidden_dropout=0.3 and model.attention_dropout=0.1" in capfd.readouterr().out


def test_dpo_at_init_is_ln2_and_bad_reference(tmp_path, tok):
    pairs = make_pairs(tok)
    for loss_type, want in (("sigmoid", math.log(2)), ("ipo", (1 / (2 * 0.1)) ** 2)):
        r = spawn(1, _init_worker, tok.vocab_size, pairs, str(tmp_path / loss_type), {"beta": 0.1, "loss_type": loss_type},
                  timeout=120)[0]
        assert abs(r["rec"]["loss"] - want) <= 1e-6 * want and r["rec"]["margin"] == 0.0
        assert abs(r["eval"]["loss"] - want) <= 1e-6 * want
    # a reference checkpoint of another model: one line naming the field
    spawn(1, _save_other, tok.vocab_size, str(tmp_path / "other"), timeout=120)
    with pytest.raises(Exception, match="model.hidden_size"):
        spawn(1, _init_worker, tok.vocab_size, pairs, str(tmp_path / "x"), {"reference": str(tmp_path / "other")},
              timeout=120)


def _save_other(rank, world, vocab, run_dir):
    from megagpt.checkpoint.sharded import save_checkpoint
    from megagpt.parallel.state import ParallelState
    from megagpt.pipeline.split import build_stage
    cfg = config_from_dict({"model": {**mcfg(vocab), "hidden_size": 48, "ffn_hidden_size": 96},
                            "train": dict(seq_len=SEQ, micro_batch_size=1, global_batch_size=1)}, world_size=1)
    ps = ParallelState.create()
    save_checkpoint(run_dir, 1, build_stage(cfg, ps, seed=1), ps, cfg)


def test_reward_model_layouts_match_one_process_and_formula(tmp_path, tok):
    from megagpt.align.reward import RewardModel
    margin = 0.3
    pairs, ref = run_layouts("rm", tok, tmp_path, {"margin": margin})
    model = build_model(ModelConfig(**mcfg(tok.vocab_size)), seed=1234, model_cls=RewardModel)
    tokens, last = reward_rows(pairs, SEQ)
    r = model(tokens[2:10], last[2:10])
    want = -F.logsigmoid(r[0::2] - r[1::2] - margin).mean()
    assert abs(ref["rec"]["loss"] - want.item()) <= 1e-5 * want.item()
    acc = ((r[0::2] - r[1::2]) > 0).float().mean().item()
    assert ref["rec"]["accuracy"] == acc
    # the reward is read at the last real token: what follows it (padding) changes nothing
    noisy = tokens[2:10].clone()
    for i in range(8):
        noisy[i, int(last[2 + i]) + 1:] = 7
    torch.testing.assert_close(model(noisy, last[2:10]), r, rtol=0, atol=0)


def _pref_cli(rank, world, argv):
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    import preference
    return preference.main(argv)


def test_preference_cli(tmp_path, tok, capfd):
    """examples/preference.py: DPO under PP2 and the reward model in one process train and report held-out
    numbers; beta <= 0 and identical answers are one-line errors before any work."""
    import json
    tok_path = str(tmp_path / "tok.json")
    tok.save(tok_path)
    recs = [{"prompt": f"{a}+{a + 2}=?", "chosen": f"{2 * a + 2}", "rejected": f"{2 * a + 3}"} for a in range(8)]
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    arch = [f"model.{k}={v}" for k, v in mcfg(tok.vocab_size).items() if k != "vocab_size"] + [
        f"train.seq_len={SEQ}", "train.micro_batch_size=4", "train.global_batch_size=8", "train.eval_interval=0",
        "--train-iters", "2"]
    common = ["--pairs", str(src), "--tokenizer", tok_path, *arch]
    assert spawn(2, _pref_cli, ["--mode", "dpo", "--pp", "2", "--run-dir", str(tmp_path / "d"), *common], timeout=240) == [0, 0]
    assert spawn(1, _pref_cli, ["--mode", "rm", "--run-dir", str(tmp_path / "r"), *common], timeout=240) == [0]
    for d in ("d", "r"):
        assert [json.loads(x)["step"] for x in open(tmp_path / d / "metrics.jsonl")] == [1, 2]
    assert spawn(1, _pref_cli, ["--mode", "dpo", "--beta", "0", "--run-dir", str(tmp_path / "x"), *common], timeout=60) == [2]
    src.write_text(json.dumps({"prompt": "q", "chosen": "1", "rejected": "1"}) + "\n")
    assert spawn(1, _pref_cli, ["--mode", "rm", "--run-dir", str(tmp_path / "y"), *common], timeout=60) == [2]
    err = capfd.readouterr().err
    assert "dpo.beta: must be > 0" in err and "p.jsonl:1: 'chosen' and 'rejected' are the same answer" in err


def _eval_worker(rank, world, vocab, pairs, held, run_dir):
    from megagpt.align.reward import RewardTrainer
    tr = RewardTrainer(cfg_for(vocab, dp=world), run_dir, pairs, eval_pairs=held)
    return tr.evaluate_pairs()


def test_held_out_pairs_counted_once(tmp_path, tok):
    """5 held-out pairs in global batches of 4: the second batch wraps (pairs 0-2 again), and the means are
    still over the 5 pairs, each once, in one process and under DP2 (the wrapped pairs on both replicas)."""
    from megagpt.align.reward import RewardModel
    pairs, held = make_pairs(tok), make_pairs(tok, 13)[8:]
    model = build_model(ModelConfig(**mcfg(tok.vocab_size)), seed=1234, model_cls=RewardModel)
    tokens, last = reward_rows(held, SEQ)
    with torch.no_grad():
        r = model(tokens, last)
    d = r[0::2] - r[1::2]
    want = {"loss": -F.logsigmoid(d).mean().item(), "accuracy": (d > 0).double().mean().item(),
            "margin": d.mean().item(), "reward_chosen": r[0::2].mean().item()}
    assert len(set(d.tolist())) == 5                                   # 5 different pairs
    for dp in (1, 2):
        got = spawn(dp, _eval_worker, tok.vocab_size, pairs, held, str(tmp_path / f"dp{dp}"), timeout=120)[0]
        for k, v in want.items():
            assert abs(got[k] - v) <= 1e-5 * max(abs(v), 1e-3), (dp, k, got[k], v)
