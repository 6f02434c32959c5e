"""Harmful-content curation (megagpt/data/harmful.py) in preprocessing, on planted documents.

Clean: 40 chunks of Shakespeare (real text, with its oaths and insults) and 10 pseudo-English ones.
Harmful: 20 documents whose lines are half abusive (profanity, insults), half Shakespeare; 6 more carry
a planted word-list term (placeholder tokens, not real slurs) 30 times in 300 words, while one clean
document carries it once (3 per 1000 words, under the threshold of 5). Through tools/preprocess_data.py:
the removals are counted per rule in the stats, precision and recall of the classifier stage are
printed and must be >= 0.9, and the audit sample holds the removed documents with rule and score."""
import json
import os
import random
import sys

import pytest

from megagpt.data.harmful import HarmConfig, check_harm
from megagpt.data.indexed import DataError
from megagpt.data.shakespeare import write_shakespeare_jsonl
from test_preprocess import prose, write_jsonl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import preprocess_data  # noqa: E402

pytest.importorskip("profanity_check")

ABUSE = ["you are a fucking idiot", "shut the fuck up you stupid bitch", "this is bullshit you worthless piece of shit",
         "go to hell you dumb asshole", "fuck off and die you pathetic loser", "what a load of crap, screw you moron"]


def planted(tmp_path):
    path = str(tmp_path / "shk.jsonl")
    write_shakespeare_jsonl(path, chunk_lines=20)
    plays = [json.loads(line)["text"] for line in open(path, encoding="utf-8")]
    rng = random.Random(0)
    clean = plays[::len(plays) // 40][:40] + [prose(i) for i in range(10)]
    words = prose(99).split(" ")
    words[150] = "xslurx"
    clean.append(" ".join(words))                                  # one mention: kept
    harmful = []
    for i in range(20):
        lines = plays[1000 + i].splitlines()[:12]
        for k in range(0, 12, 2):
            lines[k] = rng.choice(ABUSE)
        harmful.append("\n".join(lines))
    listed = []
    for i in range(6):
        w = prose(300 + i).split(" ")
        for k in range(0, len(w), 10):
            w[k] = rng.choice(["xslurx", "xslurxes", "badterm"])
        listed.append(" ".join(w))
    docs = [(d, "clean") for d in clean] + [(d, "harmful_classifier") for d in harmful] + \
           [(d, "harmful_wordlist") for d in listed]
    rng.shuffle(docs)
    return docs


def test_planted_documents_precision_recall_and_audit(tmp_path):
    docs = planted(tmp_path)
    src = write_jsonl(tmp_path / "in.jsonl", [d for d, _ in docs])
    (tmp_path / "words.txt").write_text("# planted placeholder terms\nxslurx(es)?\nbadterm\n")
    prefix = str(tmp_path / "out" / "c")
    rc = preprocess_data.main(["--input", src, "--output-prefix", prefix, "--vocab-size", "400", "--quiet",
                               "--no-filter", "--no-dedup", "--harm-filter", "--harm-wordlist",
                               str(tmp_path / "words.txt"), "--harm-sample-size", "100"])
    assert rc == 0
    stats = json.load(open(prefix + ".stats.json"))
    sample = [json.loads(line) for line in open(prefix + ".harmful_sample.jsonl", encoding="utf-8")]
    removed = {row["doc"]: row["rule"] for row in sample}
    assert len(sample) == stats["docs_removed"] == sum(stats["removed"][r] for r in ("harmful_classifier",
                                                                                       "harmful_wordlist"))
    assert stats["removed"]["harmful_wordlist"] == 6 and all(
        removed.get(i) == "harmful_wordlist" for i, (_, want) in enumerate(docs) if want == "harmful_wordlist")
    for row in sample:
        assert row["text"] == docs[row["doc"]][0] and row["score"] > 0
    truth = {i for i, (_, want) in enumerate(docs) if want == "harmful_classifier"}
    flagged = {i for i, rule in removed.items() if rule == "harmful_classifier"}
    precision = len(truth & flagged) / max(1, len(flagged))
    recall = len(truth & flagged) / len(truth)
    print(f"harmful_classifier on {len(docs)} planted docs: precision {precision:.3f}, recall {recall:.3f}; "
          f"removed {stats['removed']['harmful_classifier']} + {stats['removed']['harmful_wordlist']} (word list)")
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    assert stats["docs_kept"] == 51 - len(flagged - truth)


def test_thresholds_and_errors():
    text = "\n".join(["you are a fucking idiot"] + ["the king rode to the castle with his men"] * 4)
    assert check_harm(text, HarmConfig(max_flagged_lines=0.1))[0] == "harmful_classifier"   # 1 of 5 lines
    assert check_harm(text, HarmConfig(max_flagged_lines=0.2))[0] is None
    assert check_harm(text, HarmConfig(line_threshold=None))[0] is None
    with pytest.raises(DataError, match="--harm-line-threshold 1.5"):
        HarmConfig(line_threshold=1.5)
    with pytest.raises(DataError, match="needs --harm-wordlist"):
        HarmConfig(max_hits_per_1k_words=3)
    with pytest.raises(DataError, match="is not a regex"):
        HarmConfig(patterns=("(unclosed",), max_hits_per_1k_words=3)


def test_missing_package_is_a_one_line_error(monkeypatch):
    from megagpt.data import harmful
    harmful.classifier.cache_clear()
    monkeypatch.setitem(sys.modules, "profanity_check", None)          # as if not installed
    with pytest.raises(DataError, match="needs the alt-profanity-check package") as e:
        HarmConfig()
    assert "\n" not in str(e.value)
    HarmConfig(line_threshold=None, patterns=("badterm",), max_hits_per_1k_words=5)   # the word list alone runs
    harmful.classifier.cache_clear()
