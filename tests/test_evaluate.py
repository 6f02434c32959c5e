"""megagpt/evaluate.py and tools/evaluate.py: log-likelihood scoring against the model's own loss and a
direct log-softmax, the exact-match path, the Wilson interval, k-shot prompts, one-line task errors."""
import json
import os
import random
import sys

import pytest
import torch

from megagpt import evaluate as ev
from megagpt.config import ModelConfig
from megagpt.data.tokenizer import Tokenizer
from megagpt.generate import generate_ids
from megagpt.loading import save_for_inference
from megagpt.model.gpt import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import evaluate as tool  # noqa: E402

MODEL = dict(vocab_size=300, max_seq_len=48, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
             ffn_hidden_size=64, make_vocab_divisible_by=1, init_std=0.1, use_flash_attn=False)
TEXT = ["the capital of frank is paris. the capital of spain is madrid.\nQ: 2+3=? A: 5\n"] * 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = Tokenizer.train(TEXT, vocab_size=290)
    tok_path = str(root / "tokenizer.json")
    tok.save(tok_path)
    model = build_model(ModelConfig(**MODEL), seed=7).eval()
    save_for_inference(str(root / "run"), model, tok_path)
    return {"model": model, "tok": tok, "root": root, "run": str(root / "run")}


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


MC = [{"query": f"the capital of {c} is", "choices": ["paris", "madrid", "rome"], "gold": g, "id": i}
      for i, (c, g) in enumerate([("frank", 0), ("spain", 1), ("ita", 2), ("span", 1), ("fran", 0), ("it", 2)])]


def test_loglikelihood_equals_the_models_own_loss_and_a_direct_log_softmax(tiny):
    m, tok = tiny["model"], tiny["tok"]
    long_ctx = tok.encode("the capital of spain is madrid. " * 6)          # longer than the 48-token window
    pairs = [(tok.encode("the capital of"), tok.encode(" paris")), ([tok.eod_id], tok.encode("madrid is")),
             (long_ctx, tok.encode(" rome"))]
    assert len(long_ctx) > MODEL["max_seq_len"]
    got = ev.loglikelihood(m, pairs, batch_size=2)                          # batches of different widths
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        seq = torch.tensor([(ctx + cont)[-(MODEL["max_seq_len"] + 1):]])
        with torch.no_grad():
            losses = m(seq[:, :-1], seq[:, 1:])                               # the engine's cross-entropy [1, s]
            logits = m.gather_logits(m(seq[:, :-1]))[0, -len(cont):].double()  # [n, V]
        want = -float(losses[0, -len(cont):].sum())
        assert abs(lp - want) < 1e-5 * max(1.0, abs(want))
        direct = torch.log_softmax(logits, -1).gather(1, seq[0, -len(cont):, None]).sum()
        assert abs(lp - float(direct)) < 1e-5 * max(1.0, abs(lp))
        assert greedy == bool((logits.argmax(-1) == seq[0, -len(cont):]).all())
    # a greedy continuation is reported greedy
    ctx = tok.encode("the capital of")
    cont = generate_ids(m, [ctx], 3)[0]
    assert ev.loglikelihood(m, [(ctx, cont)])[0][1] is True
    wrong_last = cont[:-1] + [(cont[-1] + 1) % MODEL["vocab_size"]]          # greedy means every token
    assert ev.loglikelihood(m, [(ctx, wrong_last)])[0][1] is False
    with pytest.raises(ev.EvalError, match="a continuation of 49 tokens does not fit model.max_seq_len=48"):
        ev.loglikelihood(m, [([tok.eod_id], [5] * (MODEL["max_seq_len"] + 1))])
    assert ev.encode_pair(tok, "", " paris") == ([tok.eod_id], tok.encode(" paris"))   # empty context: the EOD


def test_loglik_accuracy_is_the_argmax_of_choice_loglikelihoods(tiny):
    m, tok = tiny["model"], tiny["tok"]
    exs = [ev.Example(r["query"], tuple(r["choices"]), r["gold"]) for r in MC]
    res = ev.evaluate(m, tok, exs, k=0)
    right = 0
    for e in exs:
        lps = [ev.loglikelihood(m, [(tok.encode(e.query), tok.encode(" " + c))])[0][0] for c in e.choices]
        right += lps.index(max(lps)) == e.gold
    assert res["correct"] == right and res["n"] == len(exs) and res["scoring"] == "loglik"
    assert res["ci95"] == list(ev.wilson(right, len(exs)))
    same = ("paris", "paris")                                              # equal scores: the first choice wins
    assert ev.evaluate(m, tok, [ev.Example(e.query, same, 0) for e in exs[:3]], 0)["correct"] == 3


def test_exact_match_path_generates_and_compares(tiny):
    m, tok = tiny["model"], tiny["tok"]
    queries = ["Q: 2+3=? A:", "the capital of spain is"]
    outs = ev.generate_until(m, tok, queries, ["\n"], max_new_tokens=6)
    for q, o in zip(queries, outs):                                         # the same as decoding by hand
        ids = generate_ids(m, [tok.encode(q)], 6, eod_id=tok.eod_id)[0]
        assert o == tok.decode([t for t in ids if t != tok.eod_id]).split("\n")[0]
    exs = [ev.Example(queries[0], answer=outs[0].strip() or "x"), ev.Example(queries[1], answer="not this")]
    res = ev.evaluate(m, tok, exs, k=0, scoring="exact", max_new_tokens=6)
    assert res["scoring"] == "exact" and res["correct"] == int(outs[0].strip() != "")
    long = "the capital of spain is madrid. " * 6                          # longer than the window: the oldest
    ids = generate_ids(m, [tok.encode(long)[-(MODEL["max_seq_len"] - 6):]], 6, eod_id=tok.eod_id)[0]   # goes
    assert ev.generate_until(m, tok, [long], ["\n"], 6) == [tok.decode([t for t in ids if t != tok.eod_id]).split("\n")[0]]
    free = ev.generate_until(m, tok, queries[:1], [], 6)[0]                # no stop string: all 6 tokens
    stop = free.strip()[len(free.strip()) // 2]                             # a character it does generate
    assert ev.generate_until(m, tok, queries[:1], [stop], 6) == [free.split(stop)[0]]


def test_generate_until_drops_the_eod(tiny, monkeypatch):
    tok = tiny["tok"]
    monkeypatch.setattr(ev, "generate_ids", lambda m, prompts, n, **kw: [tok.encode(" paris") + [tok.eod_id] for _ in prompts])
    assert ev.generate_until(tiny["model"], tok, ["q"], ["\n"], 4) == [tok.decode(tok.encode(" paris"))]


def test_evaluate_strips_both_sides_and_never_shows_a_row_as_its_own_shot(monkeypatch):
    exs = [ev.Example(f"q{i}", answer=a) for i, a in enumerate(["5", " paris\t", "x"])]
    shown, real = [], ev.fewshot_prompt
    monkeypatch.setattr(ev, "fewshot_prompt", lambda e, shots: shown.append((e, shots)) or real(e, shots))
    monkeypatch.setattr(ev, "generate_until", lambda model, tok, prompts, *a: [" 5 ", "paris", "y"])
    assert ev.evaluate(None, None, exs, k=2)["correct"] == 2
    assert len(shown) == 3 and all(len(shots) == 2 and e not in shots for e, shots in shown)
    with pytest.raises(ev.EvalError, match="k=3: only 2 examples"):
        ev.evaluate(None, None, exs, k=3)
    assert ev.scoring_of([ev.Example("q", ("a", "b"), 0, "a"), exs[0]], "auto") == "exact"   # not every row has choices
    monkeypatch.setattr(ev, "generate_until", lambda model, tok, prompts, *a: ["x"] * len(prompts))
    many, runs = [ev.Example(f"q{i}", answer="a") for i in range(8)], []
    for seed in (3, 3):                                                     # the shots are drawn from the seed
        shown.clear()
        ev.evaluate(None, None, many, k=2, seed=seed)
        runs.append(list(shown))
    assert runs[0] == runs[1]


def test_wilson_interval():
    lo, hi = ev.wilson(8, 10)
    assert abs(lo - 0.4902) < 1e-4 and abs(hi - 0.9433) < 1e-4                 # textbook values
    assert ev.wilson(0, 10)[0] == 0.0 and abs(ev.wilson(0, 10)[1] - 0.2775) < 1e-4
    assert ev.wilson(10, 10)[1] == 1.0
    rng = random.Random(0)                                                  # coverage near 95% at p = 0.3
    cover = 0
    for _ in range(2000):
        c = sum(rng.random() < 0.3 for _ in range(40))
        lo, hi = ev.wilson(c, 40)
        cover += lo <= 0.3 <= hi
    assert 0.92 < cover / 2000 < 0.98


def test_kshot_prompt_and_shots():
    exs = [ev.Example(f"q{i}", answer=f"a{i}") for i in range(8)]
    p = ev.fewshot_prompt(exs[0], [exs[3], exs[5]])
    assert p == "q3 a3\n\nq5 a5\n\nq0"
    assert ev.fewshot_prompt(exs[0], []) == "q0"
    rng = random.Random(1)
    for e in exs:
        shots = ev.pick_shots(exs, 5, rng, exclude=e)
        assert len(shots) == 5 and e not in shots and len(set(shots)) == 5
    assert ev.pick_shots(exs, 3, random.Random(4), exs[0]) == ev.pick_shots(exs, 3, random.Random(4), exs[0])
    with pytest.raises(ev.EvalError, match="k=8: only 7 examples"):
        ev.pick_shots(exs, 8, rng, exclude=exs[0])
    twin = ev.Example("q0", answer="a0")                  # an equal row is another row: it may be a shot
    assert twin in ev.pick_shots(exs[1:] + [twin], 7, random.Random(0), exclude=exs[0])


def test_rolling_windows_score_every_token_once():
    pairs = ev.rolling_windows(list(range(10, 20)), prefix=0, window=4)
    assert [c for _, c in pairs] == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19]]
    assert [c for c, _ in pairs] == [[0], [13], [15, 16, 17]]              # the last window has a full context


@pytest.mark.parametrize("row, msg", [
    ({"query": "q", "answer": "a", "lable": 1}, "unknown field 'lable'"),
    ({"query": "q", "choices": ["a", "b"]}, "'choices' and 'gold' go together"),
    ({"query": "q", "choices": ["a", "b"], "gold": 2}, "'gold' must be an index into choices"),
    ({"query": "q", "choices": ["a", "b"], "gold": True}, "'gold' must be an index into choices"),
    ({"query": 3, "answer": "a"}, "'query' must be a string"),
    ({"query": "q"}, "needs 'choices' + 'gold'"),
    ("{not json", "not a JSON object"),
])
def test_bad_task_rows_are_one_line_errors(tmp_path, row, msg):
    path = _write(tmp_path / "t.jsonl", [{"query": "ok", "answer": "a"}, row])
    with pytest.raises(ev.EvalError) as e:
        ev.read_task(path)
    assert msg in str(e.value) and f"{path}:2" in str(e.value) and "\n" not in str(e.value)


def test_tool_reports_k_0_1_5_with_intervals(tiny, tmp_path, capsys):
    task = _write(tmp_path / "capitals.jsonl", MC)
    out = tmp_path / "res.json"
    assert tool.main(["--load", tiny["run"], "--task", task, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["k"] for r in res] == [0, 1, 5] and all(r["n"] == len(MC) for r in res)
    want0 = ev.evaluate(tiny["model"], tiny["tok"], ev.read_task(task), 0)
    assert res[0]["correct"] == want0["correct"]
    text = capsys.readouterr().out
    assert "capitals.jsonl" in text and "95% CI" in text
    bad = _write(tmp_path / "bad.jsonl", [{"query": "q", "choices": ["a", "b"], "gold": 0, "golden": 1}])
    assert tool.main(["--load", tiny["run"], "--task", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown field 'golden'" in err and "bad.jsonl:1" in err
    assert tool.main(["--load", tiny["run"], "--task", task, "--scoring", "exact"]) == 2
    assert "no field 'answer'" in capsys.readouterr().err
    assert tool.main(["--load", str(tmp_path / "none"), "--task", task]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_fewshot_demo_repeats_are_found_by_content_not_by_distance():
    """The repeat sequences mixed into the few-shot demo's training: every word with a loss is the word
    after an earlier occurrence of its predecessor (induction can predict it), and the distance to that
    occurrence varies (a fixed one let a head find the repeat by position alone, which does not transfer
    to matching an item against the shots)."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import fewshot_demo as demo
    rng, distances = random.Random(0), set()
    for _ in range(200):
        words, mask = demo.repeat_sequence(rng)
        assert len(words) == len(mask) == 24 and any(mask)
        n = len(words) - mask.index(True) + 1                 # the repeat's length
        distances.add(n)
        for i in (i for i, m in enumerate(mask) if m):
            assert words[i] == words[i - n] and words[i - 1] == words[i - 1 - n]
    assert len(distances) >= 5
