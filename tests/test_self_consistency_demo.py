"""examples/self_consistency_demo.py: its chains are right and varied, its held-out questions are never trained on,
and a tiny run goes end to end (train, greedy, votes, table, JSON, PNG)."""
import json
import os
import random
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import self_consistency_demo as demo  # noqa: E402


def test_chains_add_up_in_varied_orders():
    rng = random.Random(3)
    nums = (23, 45, 17, 38)
    chains = {demo.chain(nums, rng) for _ in range(40)}
    assert len(chains) > 5                                     # different reasoning paths to one answer
    assert len({demo.order(c) for c in chains}) == len(chains)  # told apart by the order they take the numbers
    for c in chains:
        steps, answer = c.split("#")
        assert answer == "123" and re.search(demo.ANSWER, c).group(1) == "123"
        acc, used = None, []
        for step in steps.split(","):
            a, b, s = map(int, re.fullmatch(r"(\d+)\+(\d+)=(\d+)", step).groups())
            assert a + b == s and (acc is None or a == acc)
            used += [a, b] if acc is None else [b]
            acc = s
        assert sorted(used) == sorted(nums) and demo.order(c) == tuple(used)
    assert demo.decode(demo.encode(demo.question(nums) + c + "\n")) == demo.question(nums) + c


def test_same_digits_keeps_the_sum():
    q = (59, 63, 15, 43)
    assert demo.same_digits((13, 49, 65, 53), q) and sum((13, 49, 65, 53)) == sum(q)      # digits re-paired
    assert demo.same_digits((43, 15, 59, 63), q)                                          # a well-formed order
    assert not demo.same_digits((13, 49, 65, 54), q) and not demo.same_digits((13, 49, 65), q)
    assert demo.order("13+49=62,62+65=127,127+53=180#180") == (13, 49, 65, 53) and demo.order("#5") == ()


def test_held_out_questions_are_never_drawn():
    held, draw = demo.split(200)
    keys = {tuple(sorted(q)) for q in held}
    assert len(keys) == 200
    rng = random.Random(0)
    assert not any(tuple(sorted(draw(rng))) in keys for _ in range(5000))


def test_tiny_run_end_to_end(tmp_path, capsys):
    res = demo.main(["--steps", "2", "--questions", "6", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert os.path.getsize(tmp_path / "self_consistency.png") > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["greedy_cot"]["accuracy"] == res["greedy_cot"]["accuracy"]
    dumped = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert dumped["questions"] == 6 and set(dumped["T=0.7"]) == {"1", "5", "10", "20"}
    for t in demo.TEMPERATURES:
        for n in demo.NS:
            r = res[f"T={t}"][n]
            assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] and 0.0 <= r["agreement"] <= 1.0
            assert 0.0 <= r["chain_accuracy"] <= 1.0 and 0.0 <= r["well_formed"] <= 1.0
            assert r["well_formed"] <= r["same_digits"] and r["distinct_paths"] <= n * r["same_digits"] + 1e-9
            assert r["distinct_answers"] <= n
    ex, first = res["T=0.7"][5]["example"], demo.split(6)[0][0]
    assert len(ex["chains"]) == 5 and ex["question"] == demo.question(first) and ex["answer"] == sum(first)
    assert "direct answer, greedy" in out and "chain of thought, greedy" in out
