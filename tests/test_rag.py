"""megagpt/rag.py and tools/rag.py: the BM25 index round-trips through disk without pickle, retrieves a
known fact, chunks long documents, puts passage ids in the prompt, parses citations; bad input is one line."""
import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch

from megagpt import rag
from megagpt.config import ModelConfig
from megagpt.data.tokenizer import Tokenizer
from megagpt.loading import save_for_inference
from megagpt.model.gpt import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import rag as tool  # noqa: E402

DOCS = [
    {"id": "ilsa", "text": "Ilsa Varn was born in Trelos in 1873 and worked as a glassblower."},
    {"id": "oren", "text": "Oren Kalt was born in Mirebank in 1901 and worked as a cooper.", "title": "Oren Kalt"},
    {"id": 7, "text": "Trelos is a river town. " + " ".join(f"w{i}" for i in range(60))},
]


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    return _write(tmp_path / "kb.jsonl", DOCS)


def test_index_round_trip_without_pickle(corpus, tmp_path, monkeypatch):
    index = rag.Index.from_corpus(corpus, chunk_words=20, overlap=5)
    out = str(tmp_path / "ix")
    index.save(out)
    for name in os.listdir(out):                                    # only .npy of plain numbers, JSON, JSONL
        assert name.endswith((".npy", ".json", ".jsonl")), name
        if name.endswith(".npy"):
            arr = np.load(os.path.join(out, name), allow_pickle=False)
            assert arr.dtype.kind in "fiu"
    def refuse(*a, **k):
        raise AssertionError("the index must not be unpickled")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    back = rag.Index.load(out)
    assert [p.pid for p in back.passages] == [p.pid for p in index.passages]
    for q in ("where was Oren Kalt born", "river town", "w55 w56", "nothing matches zzz"):
        assert np.array_equal(back.scores(q), index.scores(q))
        assert [(p.pid, s) for p, s in back.search(q, 3)] == [(p.pid, s) for p, s in index.search(q, 3)]
    small = str(tmp_path / "small")                                  # another index's passages over these arrays
    rag.Index.from_corpus(corpus).save(small)
    for name in (rag.PASSAGES, rag.META):
        with open(os.path.join(small, name)) as src, open(os.path.join(out, name), "w") as dst:
            dst.write(src.read())
    with pytest.raises(rag.RagError, match="3 passages but the BM25 arrays hold 6"):
        rag.Index.load(out)


def test_retrieves_a_known_fact_and_chunks(corpus):
    index = rag.Index.from_corpus(corpus, chunk_words=20, overlap=5)
    assert [p.pid for p in index.passages] == ["ilsa#0", "oren#0", "7#0", "7#1", "7#2", "7#3"]   # 65 words
    assert index.by_id["7#1"].text.split()[0] == "w10"             # 20 words, the last 5 of chunk 0 repeated
    with pytest.raises(rag.RagError, match="0 <= overlap < chunk_words, got 20 and 20"):
        rag.chunk(DOCS[2], chunk_words=20, overlap=20)                 # a step of 0 words
    assert index.search("When was Ilsa Varn born?", 1)[0][0].pid == "ilsa#0"
    assert index.search("who worked as a cooper", 1)[0][0].pid == "oren#0"
    assert index.search("w47", 2)[0][0].pid == "7#3" and index.search("w33", 1)[0][0].pid == "7#2"
    assert index.search("title words count: Oren", 1)[0][0].pid == "oren#0"
    assert all(s == 0.0 for _, s in index.search("zzz qqq", 3))      # unknown terms score nothing
    assert [p.pid for p, _ in index.search("zzz qqq", 3)] == ["ilsa#0", "oren#0", "7#0"]   # ties: corpus order
    assert [len(p.text.split()) for p in index.passages[2:]] == [20] * 4 and index.passages[-1].text.endswith("w59")
    hit, score = index.search("OREN KALT COOPER", 1)[0]               # terms are lower-cased on both sides
    assert hit.pid == "oren#0" and score > 0
    titled = rag.Index.build([rag.Passage("b#0", "b", "other plain words"), rag.Passage("a#0", "a", "plain", "Zephyr")])
    hit, score = titled.search("zephyr", 1)[0]                        # a word only in the title is indexed
    assert hit.pid == "a#0" and score > 0


def test_prompt_has_the_ids_and_citations_parse(corpus):
    index = rag.Index.from_corpus(corpus)
    hits = [p for p, _ in index.search("where was Oren Kalt born", 2)]
    prompt = rag.build_prompt(" where was Oren Kalt born ? ", hits)
    q = "question: where was Oren Kalt born ?"       # before the passages (query-aware) and after them
    assert prompt == "\n".join([q, f"[oren#0] Oren Kalt: {DOCS[1]['text']}", f"[{hits[1].pid}] {hits[1].text}",
                                q, "answer:"])
    assert rag.build_prompt("q", []) == "question: q\nanswer:"          # closed book: the question once
    cited, made_up = rag.citations("Mirebank [oren#0] [zz#9] and [oren#0]", [h.pid for h in hits])
    assert cited == ["oren#0"] and made_up == ["zz#9"]
    assert rag.citations("no citation")[0] == []
    assert rag.citations("see [the note] [oren#0]", ["oren#0"]) == (["oren#0"], [])   # ids have no spaces
    assert rag.strip_citations("Mirebank [oren#0] .") == "Mirebank ."
    assert rag.recall_at([["a", "b"], ["c", "a"]], ["a", "a"], ks=(1, 2)) == {1: 0.5, 2: 1.0}
    with pytest.raises(rag.RagError, match="recall: 1 rankings for 2 gold ids"):
        rag.recall_at([["a"]], ["a", "b"])


@pytest.mark.parametrize("row, msg", [
    ({"id": 1, "txt": "x"}, "unknown field 'txt'"),
    ({"text": "x"}, "missing field 'id'"),
    ({"id": 1, "text": 5}, "field 'text' must be a string"),
    ({"id": 1, "text": "x", "title": 5}, "field 'title' must be a string"),
    ({"id": True, "text": "x"}, "field 'id' must be a string or integer"),
    ({"id": "a b", "text": "x"}, "without spaces or brackets"),
    ({"id": "ilsa", "text": "again"}, "duplicate id 'ilsa'"),
    ("[1, 2]", "expected a JSON object"),
    ("{oops", "not a JSON object"),
])
def test_bad_corpus_rows_are_one_line_errors(tmp_path, row, msg):
    path = _write(tmp_path / "c.jsonl", [DOCS[0], row])
    with pytest.raises(rag.RagError) as e:
        rag.read_corpus(path)
    assert msg in str(e.value) and f"{path}:2" in str(e.value) and "\n" not in str(e.value)


def test_tool_index_and_ask(corpus, tmp_path, capsys):
    out = str(tmp_path / "ix")
    assert tool.main(["index", "--corpus", corpus, "--out", out, "--chunk-words", "20", "--overlap", "5"]) == 0
    assert "3 documents as 6 passages" in capsys.readouterr().out
    assert tool.main(["ask", "--index", out, "--question", "Where was Ilsa Varn born?", "-k", "2",
                      "--retrieve-only", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["passages"][0]["id"] == "ilsa#0" and "[ilsa#0] Ilsa Varn was born in Trelos" in res["prompt"]
    lines = res["prompt"].split("\n")                # the tool sends build_prompt's query-aware format
    assert lines[0] == lines[-2] == "question: Where was Ilsa Varn born?" and lines[-1] == "answer:"
    assert [line.split()[0] for line in lines[1:-2]] == [f"[{p['id']}]" for p in res["passages"]]
    # with a (random) model: the answer is generated from the prompt and its citations parsed
    root = tmp_path / "m"
    tok = Tokenizer.train([d["text"] for d in DOCS] * 5, vocab_size=300)
    root.mkdir()
    tok.save(str(root / "tokenizer.json"))
    mcfg = ModelConfig(vocab_size=320, max_seq_len=256, hidden_size=32, num_layers=2, num_heads=4,
                       ffn_hidden_size=64, make_vocab_divisible_by=1, use_flash_attn=False)
    save_for_inference(str(root / "run"), build_model(mcfg, seed=3), str(root / "tokenizer.json"))
    assert tool.main(["ask", "--index", out, "--load", str(root / "run"), "--question", "Where was Ilsa born?",
                      "--max-new-tokens", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) >= {"answer", "raw", "cited", "unknown_ids"} and len(res["passages"]) == 3
    assert res["cited"] == rag.citations(res["raw"], [p["id"] for p in res["passages"]])[0]


def _random_reader(tmp_path):
    """A random tiny model with a BPE trained on the corpus, saved for tools/rag.py; (run dir, model, tok)."""
    root = tmp_path / "m"
    root.mkdir()
    tok = Tokenizer.train([d["text"] for d in DOCS] * 5 + ["unknown"] * 5, vocab_size=300)
    tok.save(str(root / "tokenizer.json"))
    mcfg = ModelConfig(vocab_size=320, max_seq_len=256, hidden_size=32, num_layers=2, num_heads=4,
                       ffn_hidden_size=64, make_vocab_divisible_by=1, use_flash_attn=False)
    model = build_model(mcfg, seed=3).eval()
    save_for_inference(str(root / "run"), model, str(root / "tokenizer.json"))
    return str(root / "run"), model, tok


def test_read_each_judges_each_passage_alone(corpus, tmp_path):
    """no_answer_probs is p(no-answer text | the question with that one passage), by a forward pass of its
    own here; the pick (the least likely no-answer) does not depend on the passages' order."""
    _, model, tok = _random_reader(tmp_path)
    index = rag.Index.from_corpus(corpus, chunk_words=20, overlap=5)
    q = "where was Ilsa Varn born ?"
    hits = [p for p, _ in index.search(q, 3)]
    probs = rag.no_answer_probs(model, tok, q, hits, "unknown")
    for p, got in zip(hits, probs):
        ctx, cont = tok.encode(rag.build_prompt(q, [p])), tok.encode("unknown")
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ctx + cont]))[:, 0].float(), -1)        # [s, V]
        want = sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
        assert abs(got - np.exp(want)) <= 1e-5 * np.exp(want)
    assert len(set(probs)) == 3                          # three different judgements, so the pick is not a tie
    flipped = rag.no_answer_probs(model, tok, q, hits[::-1], "unknown")
    assert flipped == pytest.approx(probs[::-1], rel=1e-5)
    assert hits[rag.most_relevant(probs)] == hits[::-1][rag.most_relevant(flipped)]
    assert rag.most_relevant([0.3, 0.1, 0.2]) == 1 and rag.most_relevant([0.2, 0.2]) == 0
    with pytest.raises(rag.RagError, match="no passages"):
        rag.most_relevant([])
    with pytest.raises(rag.RagError, match="--no-answer: expected"):
        rag.no_answer_probs(model, tok, q, hits, " ")


def test_tool_read_each(corpus, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "ix")
    assert tool.main(["index", "--corpus", corpus, "--out", out, "--chunk-words", "20", "--overlap", "5"]) == 0
    capsys.readouterr()
    assert tool.main(["ask", "--index", out, "--question", "Where was Ilsa Varn born?", "-k", "2",
                      "--retrieve-only", "--read", "each", "--json"]) == 0
    prompts = json.loads(capsys.readouterr().out)["prompt"].split("\n\n")       # one prompt a passage
    assert len(prompts) == 2 and all(p.count("[") == 1 and p.endswith("answer:") for p in prompts)
    run, _, _ = _random_reader(tmp_path)
    assert tool.main(["ask", "--index", out, "--load", run, "--question", "Where was Ilsa born?", "--read", "each",
                      "--max-new-tokens", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    p_none = [h["p_no_answer"] for h in res["passages"]]
    assert len(p_none) == 3 and res["read_from"] == res["passages"][int(np.argmin(p_none))]["id"]
    assert res["cited"] == rag.citations(res["raw"], [p["id"] for p in res["passages"]])[0]
    # the answer comes from the one passage judged most relevant, wherever BM25 ranked it
    real_answer, read = tool.answer, []
    monkeypatch.setattr(rag, "no_answer_probs", lambda model, tok, q, ps, none: [0.9, 0.2, 0.5][:len(ps)])
    monkeypatch.setattr(tool, "answer", lambda *a: read.append([p.pid for p, _ in a[4]]) or real_answer(*a))
    assert tool.main(["ask", "--index", out, "--load", run, "--question", "Where was Ilsa born?", "--read", "each",
                      "--max-new-tokens", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert read == [[res["passages"][1]["id"]]] and res["read_from"] == res["passages"][1]["id"]
    assert tool.main(["ask", "--index", out, "--load", run, "--question", "q", "--no-answer", "none"]) == 2
    assert capsys.readouterr().err.strip() == "rag: ask: --no-answer is for --read each"
    # a blank no-answer text is refused before the index or the checkpoint is read
    assert tool.main(["ask", "--index", str(tmp_path / "none"), "--load", str(tmp_path / "none"), "--question", "q",
                      "--read", "each", "--no-answer", " "]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "rag: --no-answer: expected the reader's no-answer text, got an empty string"


def test_tool_bad_input_one_liners(corpus, tmp_path, capsys):
    cases = [
        (["index", "--corpus", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")], "corpus file not found"),
        (["index", "--corpus", corpus, "--out", str(tmp_path / "o"), "--overlap", "200"], "0 <= overlap < chunk_words"),
        (["ask", "--index", str(tmp_path), "--question", "q", "--retrieve-only"], "not an index directory"),
        (["ask", "--index", str(tmp_path), "--question", "q"], "--load DIR is required"),
    ]
    for argv, msg in cases:
        assert tool.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err, (argv, err)
    out = str(tmp_path / "ix")
    assert tool.main(["index", "--corpus", corpus, "--out", out]) == 0
    assert tool.main(["ask", "--index", out, "--question", "q", "-k", "0", "--retrieve-only"]) == 2
    assert "k: expected a positive number" in capsys.readouterr().err


def test_rag_demo_training_samples_never_show_the_knowledge_base(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import random
    import rag_demo as demo
    kb, pools = demo.invent_world(0)
    corpus = _write(tmp_path / "kb.jsonl", [{"id": p["id"], "text": p["text"]} for p in kb])
    index = rag.Index.from_corpus(corpus)
    tok = demo.word_tokenizer(kb, index, pools)
    taken, rng = {tuple(p["name"].split()) for p in kb}, random.Random(0)
    for i in range(50):
        ids, spans = demo.example(tok, rng, pools, taken, len(kb), closed=i % 5 == 0)
        prompt = tok.decode(ids[:spans[0][0]])
        assert len(spans) == (1 if i % 5 == 0 else 4) and spans[-1][1] == len(ids) and "<unk>" not in tok.decode(ids)
        asked = prompt.split("question: ")
        assert len(asked) == (2 if i % 5 == 0 else 3) and (i % 5 == 0 or asked[2].startswith(asked[1].split(" [")[0]))
        for j, (a, b) in enumerate(spans):
            question, target = tok.decode(ids[:a]).split("question: ")[-1], tok.decode(ids[a:b - 1])
            name = question.split(" born ?")[0].split(" work as")[0].split(" ", 2)[-1]
            assert ids[b - 1] == tok.eod_id and tuple(name.split()) not in taken
            if i % 5:
                cited = rag.citations(target)[0]
                assert len(cited) == 1 and f"[{cited[0]}] {name} " in prompt    # a passage shown
                assert rag.strip_citations(target) in prompt.split(f"[{cited[0]}]")[1].split("[")[0]
            else:
                assert "[" not in prompt + target


def test_rag_demo_distractors_share_a_name_part_as_bm25_neighbours_do(tmp_path):
    """Each distractor shares the first or the last name with the person asked, independently: BM25's top-3
    on the knowledge base mostly shows two that share the same part, so training must show that case too
    (an earlier version always showed one of each, and the person asked was simply the one in the middle)."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import random
    from collections import Counter
    import rag_demo as demo
    kb, pools = demo.invent_world(0)
    index = rag.Index.from_corpus(_write(tmp_path / "kb.jsonl", [{"id": p["id"], "text": p["text"]} for p in kb]))
    tok = demo.word_tokenizer(kb, index, pools)
    taken, rng, shapes = {tuple(p["name"].split()) for p in kb}, random.Random(0), Counter()
    for _ in range(300):
        ids, spans = demo.example(tok, rng, pools, taken, len(kb), closed=False)
        prompt = tok.decode(ids[:spans[0][0]])
        names = [tuple(line.split()[1:3]) for line in prompt.split("[p")[1:]]
        asked = tuple(prompt.split("question: ")[1].split(" born ?")[0].split(" work as")[0].split()[-2:])
        others = [n for n in names if n != asked]
        assert asked in names and len(set(names)) == len(names)
        parts = sorted("first" if n[0] == asked[0] else "last" for n in others)
        assert all((n[0] == asked[0]) != (n[1] == asked[1]) for n in others)      # exactly one part shared
        shapes[tuple(parts)] += 1
    assert set(shapes) == {(), ("first",), ("last",), ("first", "first"), ("last", "last"), ("first", "last")}
    counts = Counter(demo.shared_parts(index, demo.questions(kb)))
    assert counts["first"] + counts["last"] > 0.9 * sum(counts.values())       # what BM25 shows at top-3


def test_rag_demo_read_each_samples(tmp_path):
    """--read each trains on one invented person's record at a time: each question asks about that person
    (answered from the record and cited) or about someone else, who shares the first name, the last name
    or neither with them, answered NO_ANSWER; nothing of the knowledge base is shown."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import random
    from collections import Counter
    import rag_demo as demo
    kb, pools = demo.invent_world(0)
    index = rag.Index.from_corpus(_write(tmp_path / "kb.jsonl", [{"id": p["id"], "text": p["text"]} for p in kb]))
    tok = demo.word_tokenizer(kb, index, pools, (rag.NO_ANSWER,))
    taken, rng, kinds = {tuple(p["name"].split()) for p in kb}, random.Random(0), Counter()
    for i in range(200):
        ids, spans = demo.example_each(tok, rng, pools, taken, len(kb), closed=i % 10 == 0)
        text = tok.decode(ids)
        assert "<unk>" not in text and spans[-1][1] == len(ids)
        if i % 10 == 0:
            assert len(spans) == 1 and "[" not in text
            continue
        _, q1, q2 = tok.decode(ids[:spans[0][0]]).split("question: ")    # question, [pid] record, question, answer:
        assert q1.startswith(q2[:-len("answer:")]) and q2.endswith(" answer:") and q1.count("[") == 1
        pid, first, last, city, year, trade = q1[q1.index("["):].split()[:6]
        assert (first, last) not in taken and len(spans) == 4
        for a, b in spans:
            q = tok.decode(ids[:a]).split("question: ")[-1]
            name = tuple(q.split(" born ?")[0].split(" work as")[0].split()[-2:])
            target = tok.decode(ids[a:b - 1])
            if name == (first, last):
                value = {"where": city, "when": year, "what": trade}[q.split()[0]]
                assert target == f"{value} {pid}" and ids[b - 1] == tok.eod_id
                kinds["same"] += 1
            else:                  # someone else, never a knowledge-base name (no label to learn by heart)
                assert target == rag.NO_ANSWER and name not in taken
                kinds["first" if name[0] == first else "last" if name[1] == last else "neither"] += 1
    n = sum(kinds.values())
    # asked about someone else: sharing the first name, the last or neither, at 0.4 : 0.4 : 0.2
    assert 0.4 < kinds["same"] / n < 0.6 and min(kinds["first"], kinds["last"]) > 1.3 * kinds["neither"] > 0


def test_rag_demo_read_each_copies_first(tmp_path, monkeypatch):
    """--read each, copy first: for the first --copy-first share of the steps every question is about the
    person shown (no NO_ANSWER target), then half about someone else."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import random
    import rag_demo as demo
    kb, pools = demo.invent_world(0)
    index = rag.Index.from_corpus(_write(tmp_path / "kb.jsonl", [{"id": p["id"], "text": p["text"]} for p in kb]))
    tok = demo.word_tokenizer(kb, index, pools, (rag.NO_ANSWER,))
    taken, rng = {tuple(p["name"].split()) for p in kb}, random.Random(0)
    no_answer = tok.encode(rag.NO_ANSWER)
    for _ in range(50):
        ids, spans = demo.example_each(tok, rng, pools, taken, len(kb), closed=False, p_other=0.0)
        assert len(spans) == 4 and all(ids[a:b - 1] != no_answer for a, b in spans)
    log = tmp_path / "p_other.txt"
    real = demo.example_each
    def logged(*a, p_other, **k):                 # runs in the forked rank: the file carries it back
        with open(log, "a") as f:
            f.write(f"{p_other}\n")
        return real(*a, p_other=p_other, **k)
    monkeypatch.setattr(demo, "example_each", logged)
    demo.train(tok, kb, pools, 10, str(tmp_path), world=1, read="each", copy_first=0.3)
    seen = [float(x) for x in log.read_text().split()]
    per_step = [set(seen[i:i + 32]) for i in range(0, len(seen), 32)]     # a row per sample, 32 a step
    assert per_step == [{0.0}] * 3 + [{0.5}] * 7


def test_rag_demo_read_each_scores_the_passage_it_picks(tmp_path, monkeypatch):
    """score(read="each") answers from the passage no_answer_probs ranks lowest, wherever BM25 put it."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import rag_demo as demo
    kb, pools = demo.invent_world(0)
    index = rag.Index.from_corpus(_write(tmp_path / "kb.jsonl", [{"id": p["id"], "text": p["text"]} for p in kb]))
    tok = demo.word_tokenizer(kb, index, pools, (rag.NO_ANSWER,))
    model = demo.build_model(demo.reader_config(tok, "each"), seed=0).eval()
    qs = demo.questions(kb[:8])
    judged = []
    def last_is_relevant(model, tok, q, ps):           # BM25's third passage: never the person asked here
        judged.append(len(ps))
        return [1.0] * (len(ps) - 1) + [0.0]
    monkeypatch.setattr(demo, "no_answer_probs", last_is_relevant)
    res = demo.score(model, tok, index, qs, 3, read="each")
    assert judged == [3] * len(qs) and res["picked_gold"] == 0.0 and 0 <= res["no_answer"] <= 1
    third = [index.search(q, 3)[2][0] for _, _, q in qs]
    assert res["example"]["prompt"] == rag.build_prompt(qs[0][2], [third[0]])
    # accuracy by question form: a reader that copies only the city scores 1, 0, 0
    monkeypatch.setattr(demo, "answer_all", lambda m, t, prompts: [p["city"] if a == "city" else "x" for p, a, _ in qs])
    assert demo.score(model, tok, index, qs, 1)["by_form"] == {"city": 1.0, "year": 0.0, "trade": 0.0}


def _reader_grads_dp2(rank, world, kb, pools, rows_all):
    """One DP rank of the RAG demo's training step on its half of a fixed batch."""
    import rag_demo as demo
    from megagpt.parallel.state import ParallelState
    from megagpt.rag import Index
    dp = ParallelState.create().dp
    tok = demo.word_tokenizer(kb, Index.from_corpus(rows_all["corpus"]), pools)
    model = demo.build_model(demo.reader_config(tok), seed=0)
    loss = demo.reader_loss(model, tok, rows_all["rows"][rank::world], dp)
    loss.backward()
    shown = demo.sum_grads(list(model.parameters()), dp, loss)
    return {"loss": shown, "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def test_rag_demo_dp2_step_equals_one_process_with_the_full_output_layer(tmp_path):
    """The demo trains over two forked ranks with the output layer on the answer positions only: its loss
    and every gradient equal one process's answer-masked mean over all positions (fp32, 1e-5 relative)."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import random
    import rag_demo as demo
    from tests.dist import spawn
    kb, pools = demo.invent_world(0)
    corpus = _write(tmp_path / "kb.jsonl", [{"id": p["id"], "text": p["text"]} for p in kb])
    tok = demo.word_tokenizer(kb, rag.Index.from_corpus(corpus), pools)
    rng, taken = random.Random(3), {tuple(p["name"].split()) for p in kb}
    rows = [demo.example(tok, rng, pools, taken, len(kb), closed=i % 4 == 0) for i in range(8)]
    model = demo.build_model(demo.reader_config(tok), seed=0)
    tokens, targets, answers = demo.batch_of(tok, rows)
    loss = (model(tokens, targets) * answers).sum() / answers.sum()          # every position through the head
    loss.backward()
    loss = float(loss.detach())
    for r in spawn(2, _reader_grads_dp2, kb, pools, {"rows": rows, "corpus": corpus}):
        assert abs(r["loss"] - loss) <= 1e-5 * loss
        for n, p in model.named_parameters():
            torch.testing.assert_close(r["grads"][n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_rag_attention_labels_each_token_by_its_passage_and_place():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import rag_attention
    words = "question: where was A B born ? [p001#0] A B was born in C . [p002#0] A D was born in E . " \
            "question: where was A B born ? answer:".split()
    labels = rag_attention.roles(words, "p002")
    assert labels[0] == ("q", 1) and labels[7] == ("other", 1) and labels[8] == ("other", 2)
    assert labels[13] == ("other", 7) and labels[15] == ("gold", 1) and labels[21] == ("gold", 7)
    assert labels[-1] == ("q", 8)
    assert rag_attention.query_position(words, "answer") == len(words) - 1
    assert rag_attention.query_position(words, "name") == len(words) - 5 and words[-5] == "A"    # the last line's


@pytest.mark.parametrize("argv, msg", [(["--copy-first", "1.5"], "--copy-first: expected a fraction in [0, 1), got 1.5"),
                                       (["--ranks", "3"], "--ranks: expected a divisor of the batch of 32, got 3"),
                                       (["--steps", "0"], "--steps: expected a positive number, got 0")])
def test_rag_demo_bad_flags_are_one_line_errors(argv, msg, capsys, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import rag_demo as demo
    with pytest.raises(SystemExit):
        demo.main(argv + ["--out", str(tmp_path / "never")])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(msg)
    assert not (tmp_path / "never").exists()                   # refused before any work
