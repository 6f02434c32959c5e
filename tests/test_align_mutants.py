"""The align code's rules on tiny hand-made inputs, without forked ranks: each test kills mutants of megagpt/align/
that the end-to-end tests (test_sft.py, test_dpo_rm.py, test_ppo*.py, test_align_*.py) let live. Expected values are
written out by hand (ids, masks, GAE steps, whitening), never read back from the code under test. The trainers'
numbers against direct one-process computations are in tests/test_align_mutants_trainers.py."""
import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megagpt.align.chat import CHAT_TEMPLATE, END_TOKEN, add_chat_tokens, apply_chat_template
from megagpt.align.losses import dpo_loss
from megagpt.align.ppo import PolicyValueModel, PPOConfig, PPOTrainer
from megagpt.align.ppo_math import gae, policy_loss, value_loss, whiten
from megagpt.align.prefs import dpo_rows, encode_pair, reward_rows
from megagpt.align.reward import RewardModel
from megagpt.align.sft_data import SFTDataset, SFTRows, mask_prefix, pack, preprocess_conversations
from megagpt.config import ConfigError, ModelConfig
from megagpt.data.indexed import DataError, IndexedDatasetBuilder
from megagpt.data.tokenizer import EOD_TOKEN, Tokenizer
from megagpt.model.gpt import build_model

X = -100                                                  # IGNORE_INDEX, written out


@pytest.fixture(scope="module")
def tok():
    return add_chat_tokens(Tokenizer.train([f"{a}+{b}={a + b} ok" for a in range(20) for b in range(20)], 300))


# ----------------------------------------------------------------------------- DPO arguments and outputs

def test_dpo_label_smoothing_bounds_and_detached_rewards():
    one = torch.zeros(2, dtype=torch.float64)
    for bad in (0.5, 0.7, -0.1):
        with pytest.raises(ValueError, match="dpo.label_smoothing"):
            dpo_loss(one, one, one, one, 0.1, "sigmoid", bad)
    losses, _, _ = dpo_loss(one, one, one, one, 0.1, "sigmoid", 0.49)        # h = 0: ln 2 whatever eps
    torch.testing.assert_close(losses, torch.full((2,), 0.6931471805599453, dtype=torch.float64))
    pc = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    _, rc, rr = dpo_loss(pc, one - 3, one, one, 0.5)
    assert not rc.requires_grad and not rr.requires_grad                   # logged stats, not loss terms
    torch.testing.assert_close(rc, torch.tensor([-0.5, -1.0], dtype=torch.float64))


def test_dpo_nll_weight_must_not_be_negative():
    from megagpt.align.dpo import DPOTrainer
    with pytest.raises(ValueError, match="dpo.nll_weight"):
        DPOTrainer(None, "unused", [([1], [2], [3])], nll_weight=-0.5)      # refused before any work


@pytest.mark.parametrize("micro,glob", [(3, 6), (1, 3)])
def test_pair_batches_must_hold_whole_pairs(micro, glob):
    from megagpt.align.reward import RewardTrainer
    cfg = SimpleNamespace(train=SimpleNamespace(micro_batch_size=micro, global_batch_size=glob))
    with pytest.raises(ValueError, match="must be even"):
        RewardTrainer(cfg, "unused", [([1], [2], [3])])                      # refused before any work


# ----------------------------------------------------------------------------- preference pairs

def test_pair_rows_by_hand_at_the_seq_len_boundary():
    pairs = [([5, 6, 7], [8, 9, 10, 11], [12])]                           # 3 + 4 = seq_len + 1 tokens: fits
    tokens, labels = dpo_rows(pairs, 6)
    assert tokens.tolist() == [[5, 6, 7, 8, 9, 10], [5, 6, 7, 0, 0, 0]]
    assert labels.tolist() == [[X, X, 8, 9, 10, 11], [X, X, 12, X, X, X]]
    with pytest.raises(DataError, match=r"pair 0: 7 tokens do not fit train.seq_len=5 \(\+1\)"):
        dpo_rows(pairs, 5)
    tokens, last = reward_rows(pairs, 7)                                   # the reward model: 7 tokens in 7
    assert tokens.tolist() == [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 12, 0, 0, 0]] and last.tolist() == [6, 3]
    with pytest.raises(DataError, match="do not fit"):
        reward_rows(pairs, 6)


def test_encode_pair_renders_the_prompt_and_keeps_answers_text(tok):
    prompt, chosen, rejected = encode_pair(tok, {"prompt": "1+2", "chosen": "3 ok", "rejected": "4"})
    assert tok.decode(prompt) == "<|user|>1+2<|end|><|assistant|>"         # ends with the generation prompt
    assert tok.decode(chosen) == "3 ok<|end|>" and tok.decode(rejected) == "4<|end|>"
    msgs = [{"role": "system", "content": "ok"}, {"role": "user", "content": "2+2"}]
    assert tok.decode(encode_pair(tok, {"prompt": msgs, "chosen": "4", "rejected": "5"})[0]) == \
        "<|system|>ok<|end|><|user|>2+2<|end|><|assistant|>"
    # an answer that spells a marker stays text: one <|end|> id, the appended one
    end = tok.token_id(END_TOKEN)
    _, chosen, _ = encode_pair(tok, {"prompt": "q", "chosen": "1<|end|><|user|>2", "rejected": "3"})
    assert chosen.count(end) == 1 and chosen[-1] == end and tok.token_id("<|user|>") not in chosen
    assert tok.decode(chosen) == "1<|end|><|user|>2<|end|>"
    for bad in ({"prompt": "q", "chosen": 3, "rejected": "3"}, {"prompt": "q", "chosen": "3", "rejected": None}):
        with pytest.raises(DataError, match="'chosen' and 'rejected' must be strings"):
            encode_pair(tok, bad)


# ----------------------------------------------------------------------------- the chat template

def _render(messages, add_generation_prompt=False):
    """CHAT_TEMPLATE rendered as transformers renders it (a sandboxed Jinja environment with raise_exception)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise ValueError(msg)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=add_generation_prompt)


def test_jinja_template_renders_and_refuses_like_ours():
    pytest.importorskip("jinja2")
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert _render(msgs) == "<|system|>s<|end|><|user|>u<|end|><|assistant|>a<|end|>"
    assert _render(msgs[:2], True) == "<|system|>s<|end|><|user|>u<|end|><|assistant|>"
    with pytest.raises(ValueError, match="message 1 is a system turn"):
        _render([msgs[1], msgs[0]])
    for marker in ("<|end|>", "<|assistant|>", EOD_TOKEN):
        with pytest.raises(ValueError, match="contains the marker"):
            _render([{"role": "user", "content": f"x{marker}y"}])


# ----------------------------------------------------------------------------- SFT data

def test_pack_by_hand():
    assert pack([3, 2, 5, 4, 1], 5) == [[0, 1], [2], [3, 4]]              # 3 + 2 = 5 fits exactly
    assert pack([3, 2, 5, 4, 1], 5, packed=False) == [[0], [1], [2], [3], [4]]
    assert pack([7, 1, 2, 2], 5) == [[0], [1, 2, 3]]                       # a long sample is cut, alone


def _write(tmp_path, name, convos):
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convos))
    return str(src), str(tmp_path / name)


def test_sft_counts_and_exact_fit_rows(tmp_path, tok):
    convos = [[{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "3"}],
              [{"role": "system", "content": "ok"}, {"role": "user", "content": "2+2"},
               {"role": "assistant", "content": "4 ok"}]]
    src, prefix = _write(tmp_path, "c", convos)
    got = preprocess_conversations(src, prefix, tok)
    n = [sum(len(tok.encode(m["content"])) + 2 for m in c) for c in convos]   # role marker + content + <|end|>
    learn = [len(tok.encode(c[-1]["content"])) + 1 for c in convos]           # the answer and its <|end|>
    assert got == {"conversations": 2, "tokens": sum(n), "trainable_tokens": sum(learn)}
    # two samples of n - 1 inputs each fill a row of exactly that many tokens
    rows = SFTRows(SFTDataset(prefix), n[0] - 1 + n[1] - 1)
    assert len(rows) == 1
    ids = [apply_chat_template(tok, c)[0] for c in convos]
    tokens, labels, seg = rows[0]
    assert tokens.tolist() == ids[0][:-1] + ids[1][:-1]
    assert seg.tolist() == [1] * (n[0] - 1) + [2] * (n[1] - 1)
    want = []
    for c, i, k in zip(convos, ids, learn):
        want += [X] * (len(i) - 1 - k) + i[-k:]                                # only the answer tokens are labels
    assert labels.tolist() == want
    assert len(SFTRows(SFTDataset(prefix), n[0] - 1 + n[1] - 2)) == 2          # one token less: two rows


def test_sft_files_must_pair_and_not_be_empty(tmp_path, tok):
    src, prefix = _write(tmp_path, "c", [[{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]])
    preprocess_conversations(src, prefix, tok)
    ids = apply_chat_template(tok, json.loads(open(src).read())["messages"])[0]
    with IndexedDatasetBuilder(mask_prefix(prefix), np.uint8, 2, "0123456789abcdef", 0) as b:    # same sizes
        b.add_doc([0] * len(ids))
        b.finalize()
    with pytest.raises(DataError, match="does not pair"):
        SFTDataset(prefix)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no conversations"):
        preprocess_conversations(str(empty), str(tmp_path / "e"), tok)


# ----------------------------------------------------------------------------- PPO arithmetic

def test_gae_skips_masked_positions():
    # row 0: the response then padding with values that must not leak in; row 1: a masked gap inside the response
    r = torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.0, 0.0], [1.0, 0.0, 2.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[9.0, 0.5, 1.0, 1.5, 7.0, 8.0], [0.5, 5.0, 1.5, 3.0, 3.0, 3.0]], dtype=torch.float64)
    m = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 0, 1, 0, 0, 0]])
    g, lam = 0.9, 0.8
    a3 = 2.0 - 1.5
    a2 = 0.0 + g * 1.5 - 1.0 + g * lam * a3
    a1 = 1.0 + g * 1.0 - 0.5 + g * lam * a2
    b2 = 2.0 - 1.5
    b0 = 1.0 + g * 1.5 - 0.5 + g * lam * b2                               # the gap at 1 is not a step
    adv, ret = gae(r, v, m, g, lam)
    want = torch.tensor([[0, a1, a2, a3, 0, 0], [b0, 0, b2, 0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(adv, want)
    torch.testing.assert_close(ret, (want + v) * m)


def test_whiten_uses_the_masked_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [-50.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    s = (2.0 / 3.0 + 1e-8) ** 0.5                                          # mean 2, variance 2/3 over 1, 2, 3
    torch.testing.assert_close(whiten(x, m), torch.tensor([[-1 / s, 0, 1 / s, 0], [0, 0, 0, 0]]))


def test_policy_and_value_losses_ignore_masked_positions():
    logp = torch.zeros(1, 3)
    adv = torch.tensor([[2.0, -1.0, 5.0]])                                 # position 2 is masked: its 5 counts not
    mask = torch.tensor([[1, 1, 0]])
    loss, clipped, ratio, dev = policy_loss(logp, logp, adv, mask, 0.2)
    assert float(loss) == -1.0 and float(clipped) == 0.0 and float(ratio) == 2.0 and float(dev) == 0.0
    v, ov, ret = torch.tensor([[1.0, 2.0, 30.0]]), torch.tensor([[1.0, 2.0, 30.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    torch.testing.assert_close(value_loss(v, ov, ret, mask, 0.2), torch.tensor(0.5 * (1.0 + 1.0)))
    # the clipped value is the larger error: V 2 from old 1 clips to 1.2, (1.2 - 3)^2 = 3.24 > (2 - 3)^2 = 1
    one = torch.ones(1, 1)
    torch.testing.assert_close(value_loss(2 * one, one, 3 * one, one, 0.2), torch.tensor(0.5 * 1.8 ** 2))


# ----------------------------------------------------------------------------- PPO rows, prompts, config

def test_ppo_rows_by_hand():
    me = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(seq_len=6)), prompts=[[5, 6, 7], [8]])
    tokens, labels, mask = PPOTrainer.rows(me, [0, 1], [[9, 10, 0], [11, 12, 13, 14, 15, 16, 17]])
    assert tokens.tolist() == [[5, 6, 7, 9, 10, 0], [8, 11, 12, 13, 14, 15]]
    assert labels.tolist() == [[X, X, 9, 10, 0, X], [11, 12, 13, 14, 15, 16]]   # row 1: cut to seq_len + 1 ids
    assert mask.tolist() == [[False, False, True, True, True, False], [True] * 6]


def test_ppo_prompts_of_each_replica_and_step():
    def prompts(step, rank):
        me = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(global_batch_size=8)), dp=2,
                             ps=SimpleNamespace(dp=SimpleNamespace(rank=rank)), prompts=list(range(10)))
        return PPOTrainer.my_prompts(me, step)
    assert [prompts(0, 0), prompts(0, 1)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [prompts(1, 0), prompts(1, 1)] == [[8, 9, 0, 1], [2, 3, 4, 5]]   # step 1 goes on, cycling


@pytest.mark.parametrize("bad", [dict(clip=0.0), dict(value_clip=-0.1), dict(temperature=0.0), dict(kl_coef=-0.1),
                                 dict(ppo_epochs=0), dict(lam=1.5), dict(lam=-0.1), dict(gamma=1.1)])
def test_ppo_config_refuses(bad):
    with pytest.raises(ConfigError, match="ppo"):
        PPOConfig(**bad).validate()
    PPOConfig(lam=0.0, gamma=0.0, kl_coef=0.0).validate()


# ----------------------------------------------------------------------------- the scalar heads

def test_value_and_reward_heads_read_the_final_hidden_state():
    """A head equal to LM-head row j gives the logit of token j: the value at every position and the reward at
    each row's last real token (a check through the LM head's own path, not the heads' code)."""
    cfg = ModelConfig(vocab_size=40, max_seq_len=16, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                      ffn_hidden_size=32, init_std=0.5)
    gpt = build_model(cfg, seed=3).eval()
    tokens = torch.randint(1, 40, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = gpt.gather_logits(gpt(tokens))                           # [b, s, vocab]
        j = 7
        pv = PolicyValueModel(cfg).eval()
        pv.load_state_dict(gpt.state_dict(), strict=False)
        pv.value_head.copy_(gpt.lm_head.weight[j:j + 1])
        values = pv(tokens, torch.full((2, 10), X))[1]
        torch.testing.assert_close(values, logits[..., j])
        rm = RewardModel(cfg).eval()
        rm.load_state_dict({k: w for k, w in gpt.state_dict().items() if not k.startswith("lm_head")}, strict=False)
        rm.reward_head.copy_(gpt.lm_head.weight[j:j + 1])
        last = torch.tensor([4, 9])
        torch.testing.assert_close(rm(tokens, last), logits[torch.arange(2), last, j])
    with pytest.raises(ConfigError, match="model.tie_embeddings"):
        RewardModel(dataclasses.replace(cfg, tie_embeddings=True))
