"""KV-cache generation: the cache against full recompute (tokens and fp32 logits), mixed-length batches,
sampling, stopping, every layout against one process, and transformers' generate on the HF export."""
import pytest
import torch

from megagpt.config import Config, ModelConfig, ParallelConfig, TrainConfig
from megagpt.generate import generate, generate_ids, generate_recompute, stream
from megagpt.kv_cache import KVCache
from megagpt.model.gpt import build_model
from megagpt.parallel.state import ParallelState
from megagpt.pipeline.split import build_stage
from megagpt.sampling import Sampling, filter_logits, next_tokens, penalize
from dist import spawn

MODEL = dict(vocab_size=211, max_seq_len=48, hidden_size=64, num_layers=4, num_heads=8, num_kv_heads=4,
             ffn_hidden_size=96, make_vocab_divisible_by=1, init_std=0.08, use_flash_attn=False)
PROMPTS = [[5, 17, 99, 3], [42, 7, 7, 8, 150, 61, 9, 12, 33], [1]]
SAMPLED = Sampling(do_sample=True, temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.3, seed=11)


def _model(**over):
    return build_model(ModelConfig(**{**MODEL, **over}), seed=1234).eval()


def _alone(model, prompt, steps, sampling=None):
    """The reference: this prompt alone (no padding), full recompute at every token."""
    tokens, logits = generate_recompute(model, torch.tensor([prompt]), steps, sampling)
    return tokens[0, len(prompt):].tolist(), logits


@pytest.mark.parametrize("over", [{}, dict(num_kv_heads=1), dict(rope_scaling=2.0, rope_interleaved=True),
                                  dict(rope_scaling=4.0, rope_scaling_type="yarn")])
def test_cache_logits_match_recompute(over):
    model = _model(**over)
    prompt = torch.tensor([PROMPTS[1][:6], PROMPTS[1][3:]])                 # [2, 6]
    ref, ref_logits = generate_recompute(model, prompt, 12)
    cache = KVCache(model, 2, 18)
    with torch.no_grad():
        got = [model.gather_logits(model(prompt, cache=cache))[:, -1]]
        for t in range(11):
            got.append(model.gather_logits(model(ref[:, 6 + t:7 + t], cache=cache))[:, -1])
    for step, (a, e) in enumerate(zip(got, ref_logits)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * e.abs().max().item(), msg=lambda m: f"step {step}: {m}")
    assert torch.equal(generate(model, prompt, 12), ref)
    kv = model.layers["0"].attention.nkv_local                                # GQA: the cache holds KV heads only
    assert cache.k[0].shape == (2, 18, kv, MODEL["hidden_size"] // MODEL["num_heads"])


def test_mixed_lengths_batch_equals_each_prompt_alone():
    model = _model()
    for sampling in (None, Sampling(repetition_penalty=1.5)):
        got = generate_ids(model, PROMPTS, 10, sampling)
        for p, g in zip(PROMPTS, got):
            assert g == _alone(model, p, 10, sampling)[0]
    # logits of the padded rows too: prefill of a left-padded batch against each prompt alone
    cache = KVCache(model, 3, 9, torch.tensor([5, 0, 8]))
    from megagpt.generate import left_pad
    tokens, pad = left_pad(PROMPTS, 0)
    assert pad.tolist() == [5, 0, 8]
    with torch.no_grad():
        batched = model.gather_logits(model(tokens, cache=cache))[:, -1]
    for i, p in enumerate(PROMPTS):
        alone = _alone(model, p, 1)[1][0][0]
        torch.testing.assert_close(batched[i], alone, rtol=1e-5, atol=1e-5 * alone.abs().max().item())


def test_seeded_sampling_matches_recompute_and_repeats():
    model = _model()
    a = generate_ids(model, [PROMPTS[1]], 16, SAMPLED)[0]
    assert a == _alone(model, PROMPTS[1], 16, SAMPLED)[0]
    assert a == generate_ids(model, [PROMPTS[1]], 16, SAMPLED)[0]
    other = Sampling(**{**SAMPLED.__dict__, "seed": 12})
    assert a != generate_ids(model, [PROMPTS[1]], 16, other)[0]


def test_rope_positions_per_row_and_mask():
    """RoPE is shift-invariant, so outputs cannot show a wrong offset: read the positions back directly."""
    model = _model()
    cache = KVCache(model, 2, 6, torch.tensor([2, 0]))
    table = torch.arange(6, dtype=torch.float32)[:, None, None, None].expand(6, 1, 1, 3)   # value = position
    cos, _ = cache.rope(table, table, 4)
    assert cos[:, :, 0, 0].t().tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]                  # row 0: 2 pad slots first
    assert cache.mask[0, 0].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert cache.mask[1, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    cache.advance(4)
    cos, _ = cache.rope(table, table, 1)
    assert cos[0, :, 0, 0].tolist() == [2, 4] and cache.mask[:, 0, 0].int().tolist() == [[0, 0, 1, 1, 1], [1] * 5]


def test_repetition_penalty_is_transformers_rule():
    transformers = pytest.importorskip("transformers")
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 2, 3, 4], [5, 5, 6, 7], [0, 9, 10, 49]])
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    theirs = transformers.RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone())
    assert torch.equal(penalize(logits, seen, 1.7), theirs)


def test_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    p = logits.softmax(-1)[0]                                   # 0.64, 0.24, 0.09, 0.03
    keep2 = float(p[0] + p[1]) - 1e-3
    assert torch.isinf(filter_logits(logits, 0, keep2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.5)).tolist() == [[False, True, True, True]]
    for bad in (0.0, 1.5, -1):
        with pytest.raises(ValueError, match=r"^sampling.top_p: expected a number in \(0, 1\]"):
            Sampling(top_p=bad).validate()


def test_stop_on_eod_stop_function_and_streaming():
    model = _model()
    free = _alone(model, PROMPTS[1], 12)[0]
    eod = free[4]                                                   # pretend the 5th token is the EOD
    streamed = []
    got = generate_ids(model, [PROMPTS[1], PROMPTS[0], PROMPTS[1]], 12, eod_id=eod,
                       on_token=lambda tok, done: streamed.append((tok.tolist(), done.tolist())))
    assert got[0] == got[2] == free[:free.index(eod) + 1]           # the EOD ends every row that meets it
    other = _alone(model, PROMPTS[0], 12)[0]                        # a row still running goes on to its own end
    assert got[1] == (other[:other.index(eod) + 1] if eod in other else other) and len(got[1]) > len(got[0])
    assert [s[0][0] for s in streamed][:len(got[0])] == got[0]      # the stream carries the same tokens, in order
    assert streamed[len(got[0]) - 1][1][0] is True
    assert {s[0][0] for s in streamed[len(got[0]):]} == {eod}       # a finished row yields the EOD after its end
    stop_at = free[2]
    got = generate_ids(model, [PROMPTS[1]], 12, stop=lambda ids: ids[-1] == stop_at)
    assert got[0] == free[:free.index(stop_at) + 1]
    with pytest.raises(ValueError, match="^prompt: 48 tokens leave no room"):
        next(stream(model, [[1] * 48], 4))
    assert len(list(stream(model, [[1] * 45], 10))) == 3             # the context fills: 48 - 45 tokens, not fewer


def test_temperature_before_top_p_and_greedy_ties():
    """Draw frequencies of one 2-token row: T=2 makes p = softmax([1, 0]) = (0.73, 0.27), so top_p=0.8
    keeps both tokens; without T (or with T after the cut) token 1 is cut, with T twice p0 = 0.62."""
    logits = torch.tensor([[2.0, 0.0]]).expand(4000, 2)
    cfg = Sampling(do_sample=True, temperature=2.0, top_p=0.8)
    tok = next_tokens(logits, torch.zeros(4000, 2, dtype=torch.bool), cfg, torch.Generator().manual_seed(0))
    assert abs((tok == 0).float().mean().item() - torch.tensor([1.0, 0.0]).softmax(-1)[0].item()) < 0.03
    tie = torch.tensor([[1.0, 3.0, 3.0, 0.0]])                    # greedy ties: the first, as torch and transformers
    assert next_tokens(tie, torch.zeros(1, 4, dtype=torch.bool), Sampling(), None).tolist() == [1]


def test_draw_never_picks_a_filtered_token(monkeypatch):
    """The edge of the uniform draw (torch.rand can return 0.0): still a token inside the top-k."""
    monkeypatch.setattr(torch, "rand", lambda b, one, **kw: torch.zeros(b, one, dtype=kw.get("dtype")))
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]])                 # top_k=2 keeps tokens 1 and 2 only
    tok = next_tokens(logits, torch.zeros(1, 4, dtype=torch.bool), Sampling(do_sample=True, top_k=2), None)
    assert tok.item() in (1, 2)


def test_generate_samples_when_top_p_is_set():
    model, prompt = _model(), torch.tensor([PROMPTS[1]])
    nucleus = generate(model, prompt, 8, top_p=0.9, seed=3)
    assert torch.equal(nucleus, generate(model, prompt, 8, top_p=0.9, seed=3, do_sample=True))
    assert not torch.equal(nucleus, generate(model, prompt, 8))


def test_num_samples_rows_follow_their_prompt():
    """n copies of each of several (left-padded) prompts: row i*n+j continues prompt i, cache and penalty included."""
    model, greedy = _model(), Sampling(repetition_penalty=1.5)
    one = generate_ids(model, PROMPTS, 6, greedy)
    assert generate_ids(model, PROMPTS, 6, greedy, num_samples=2) == [g for g in one for _ in range(2)]


def test_cache_takes_several_tokens_after_the_prefill():
    model = _model()
    prompt = torch.tensor([PROMPTS[1]])                                     # [1, 9]
    want = model.gather_logits(model(prompt))[0, 4:].detach()
    cache = KVCache(model, 1, 9)
    with torch.no_grad():
        model(prompt[:, :4], cache=cache)
        got = model.gather_logits(model(prompt[:, 4:], cache=cache))[0]   # 5 new tokens at once
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_self_consistency_shares_the_prefill():
    model = _model()
    n = 5
    got = generate_ids(model, [PROMPTS[1]], 8, SAMPLED, num_samples=n)
    assert len(got) == n and len({tuple(g) for g in got}) > 1            # different chains
    # the same rows as n copies of the prompt in one batch (prefilled n times): the shared cache changes nothing
    copies = generate_ids(model, [PROMPTS[1]] * n, 8, SAMPLED)
    assert got == copies


# ----------------------------------------------------------------------------- layouts

def _layout_worker(rank, world, tp, pp, vp, prompts, steps, sampled):
    ps = ParallelState.create(tp=tp, pp=pp)
    cfg = Config(model=ModelConfig(**MODEL), parallel=ParallelConfig(tp=tp, pp=pp, vp=vp, world_size=world),
                 train=TrainConfig(seq_len=32, micro_batch_size=1, global_batch_size=pp))
    chunks = build_stage(cfg, ps, seed=1234)
    ps.counter.reset()
    greedy = generate_ids(chunks, prompts, steps, ps=ps)
    sent = ps.counter.records.get(("send", "pp"), 0)
    samples = generate_ids(chunks, prompts, steps, Sampling(**sampled), ps=ps)
    # each rank seeds its own generator differently: only the drawing rank's counts, so all ranks agree
    own = generate_ids(chunks, prompts, steps, Sampling(**{**sampled, "seed": 100 + rank}), ps=ps)
    return {"greedy": greedy, "sampled": samples, "own_seed": own, "pp_bytes": sent}


@pytest.mark.parametrize("tp,pp,vp", [(2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 2, 2)])
def test_layouts_generate_the_one_process_tokens(tp, pp, vp):
    model = _model()
    steps = 8
    greedy = generate_ids(model, PROMPTS, steps)
    sampled = generate_ids(model, PROMPTS, steps, SAMPLED)
    res = spawn(tp * pp, _layout_worker, tp, pp, vp, PROMPTS, steps, dict(SAMPLED.__dict__), timeout=180)
    for rank, r in enumerate(res):
        assert r["greedy"] == greedy, f"rank {rank}"
        assert r["sampled"] == sampled, f"rank {rank}"
        assert r["own_seed"] == res[0]["own_seed"], f"rank {rank} picked other tokens than rank 0"
    if pp > 1:   # hidden states [s, b, h] cross each of the pp*vp-1 chunk boundaries once per step, counted
        b, h, width = len(PROMPTS), MODEL["hidden_size"], max(map(len, PROMPTS))
        per_boundary = 4 * b * h * (width + steps - 1)
        assert sum(r["pp_bytes"] for r in res) == (pp * vp - 1) * tp * per_boundary


# ----------------------------------------------------------------------------- transformers

def test_transformers_generate_gives_the_same_greedy_tokens():
    transformers = pytest.importorskip("transformers")
    from megagpt.checkpoint.hf import iter_megagpt_to_hf, to_hf_config
    transformers.logging.set_verbosity_error()
    model = _model(vocab_size=256)
    cfg = model.cfg
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_hf_config(cfg), attn_implementation="eager"))
    missing = hf.load_state_dict(dict(iter_megagpt_to_hf(model.state_dict().items(), cfg)), strict=False)
    assert not missing.unexpected_keys and not missing.missing_keys
    hf.eval()
    steps = 16
    ids, pad = torch.zeros(3, 9, dtype=torch.long), torch.tensor([5, 0, 8])
    mask = torch.ones_like(ids)
    for i, p in enumerate(PROMPTS):
        ids[i, pad[i]:] = torch.tensor(p)
        mask[i, :pad[i]] = 0
    for penalty in (1.0, 1.3):            # transformers' repetition penalty: the same rule, the same tokens
        ours = generate_ids(model, PROMPTS, steps, Sampling(repetition_penalty=penalty))
        theirs = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=steps, min_new_tokens=steps,
                             pad_token_id=0, eos_token_id=None, repetition_penalty=penalty)
        assert theirs[:, 9:].tolist() == ours, f"repetition_penalty={penalty}"


# ----------------------------------------------------------------------------- self-consistency

def test_majority_vote_and_regex():
    from megagpt.self_consistency import majority_vote, regex_extractor
    assert majority_vote(["3", "4", "3", None]) == ("3", 0.5, {"3": 2, "4": 1})
    assert majority_vote(["4", "3"])[0] == "4" and majority_vote([None, None]) == (None, 0.0, {})
    assert majority_vote(["", "", "4", None]) == ("4", 0.25, {"4": 1})        # a blank answer is no answer
    extract = regex_extractor(r"A: *(\d+)", lambda ids: " ".join(f"A: {i}" for i in ids))
    assert extract([7, 12]) == "12" and regex_extractor(r"\d+", lambda ids: "none")([1]) is None
    assert regex_extractor(r"#(.*)", lambda ids: "1+2=3# 3 ")([1]) == "3"     # " 3 " and "3" are one answer
    with pytest.raises(ValueError, match="^answer regex: '\\(' does not compile"):
        regex_extractor("(", str)


def _input_shapes(model):
    """The token shapes [b, s] of every forward call, and the hook to remove."""
    shapes = []
    return shapes, model.register_forward_pre_hook(lambda m, args, kw: shapes.append(tuple(args[0].shape)),
                                                   with_kwargs=True)


def test_self_consistency_prefills_once():
    from megagpt.self_consistency import self_consistency
    model = _model()
    shapes, hook = _input_shapes(model)
    vote = self_consistency(model, PROMPTS[1], 6, 5, SAMPLED, lambda ids: str(ids[0] % 3))
    hook.remove()
    assert shapes == [(1, len(PROMPTS[1]))] + [(6, 1)] * 4          # one prefill of one prompt row, then 6-row decodes
    assert vote.chains == generate_ids(model, [PROMPTS[1]], 5, SAMPLED, num_samples=6)
    assert vote.answers == [str(c[0] % 3) for c in vote.chains]
    assert vote.agreement == vote.counts[vote.answer] / 6 and sum(vote.counts.values()) == 6


def test_self_consistency_batch_votes_each_prompt():
    from megagpt.self_consistency import majority_vote, self_consistency_batch
    model, n = _model(), 4
    shapes, hook = _input_shapes(model)
    votes = self_consistency_batch(model, PROMPTS, n, 5, SAMPLED, lambda ids: str(ids[-1] % 4) if ids[0] % 5 else None)
    hook.remove()
    assert shapes == [(3, 9)] + [(3 * n, 1)] * 4                    # the three prompts prefilled once, padded to 9
    chains = generate_ids(model, PROMPTS, 5, SAMPLED, num_samples=n)
    assert [v.chains for v in votes] == [chains[i * n:(i + 1) * n] for i in range(3)]
    for v in votes:
        assert v.answers == [str(c[-1] % 4) if c[0] % 5 else None for c in v.chains]
        assert (v.answer, v.agreement, v.counts) == majority_vote(v.answers)
    for bad, msg in ((0, "got 0"), (2.0, "got 2.0")):
        with pytest.raises(ValueError, match=f"^self_consistency: expected a positive number of chains, {msg}$"):
            self_consistency_batch(model, PROMPTS, bad, 5, SAMPLED, str)
    with pytest.raises(ValueError, match="^self_consistency: greedy chains are all the same"):
        self_consistency_batch(model, PROMPTS, 2, 5, Sampling(), str)
    assert self_consistency_batch(model, PROMPTS, 1, 5, Sampling(), str)[1].chains == [generate_ids(model, PROMPTS, 5)[1]]


def test_unsupported_combinations_are_one_line():
    class CP2:                                                # the one thing Runner asks of the layout
        sizes = {"cp": 2}
    with pytest.raises(ValueError) as e:
        generate_ids(_model(), [[1, 2]], 2, ps=CP2())
    assert "context parallelism (parallel.cp > 1) is not supported" in str(e.value) and "\n" not in str(e.value)
