"""Quality filters (one planted document per Gopher rule), dedup keys, near-dup index and the
threshold config (file + flags)."""
import argparse
import json
import random

import pytest

from megagpt.data.clean import (FilterConfig, NearDupIndex, add_filter_args, check_document,
                                exact_key, filter_config_from_args, minhash, normalize)
from megagpt.data.indexed import DataError

STOP = ["the", "of", "and", "to", "with"]


def words(rng, n):
    """Pseudo-English: distinct made-up words of 4-8 letters, a stop word now and then."""
    out = []
    for _ in range(n):
        if rng.random() < 0.25:
            out.append(rng.choice(STOP))
        else:
            out.append("".join(rng.choice("bcdfgklmnprstv") + rng.choice("aeiou")
                               for _ in range(rng.randint(2, 4))))
    return out


def prose(seed, n_words=120, per_line=12):
    w = words(random.Random(seed), n_words)
    return "\n".join(" ".join(w[i:i + per_line]) for i in range(0, n_words, per_line))


def lines_of(seed, n_lines, per_line, fmt="{}"):
    rng = random.Random(seed)
    return "\n".join(fmt.format(" ".join(words(rng, per_line))) for _ in range(n_lines))


CFG = FilterConfig()

PLANTED = {
    "too_few_words": "The ancient mariner stopped travellers with glittering eyes.",
    "mean_word_length": " ".join(["the", "of"] + ["extraordinarilylongword"] * 60),
    "symbol_word_ratio": lines_of(1, 15, 5, "### {}"),
    "bullet_lines": lines_of(2, 10, 8, "- {}"),
    "ellipsis_lines": lines_of(3, 10, 20, "{} ..."),
    "alpha_words": " ".join(words(random.Random(4), 60) + ["12345"] * 20),
    "stop_words": " ".join(w for w in words(random.Random(5), 200) if w not in STOP),
    "dup_lines": "\n".join(["the ancient mariner stopped one of three travellers"] * 50),
}


def test_clean_prose_passes():
    for seed in range(20):
        assert check_document(prose(seed), CFG) is None


@pytest.mark.parametrize("rule", sorted(PLANTED))
def test_planted_junk_fails_its_rule(rule):
    assert check_document(PLANTED[rule], CFG) == rule


def test_repetition_rules():
    # Repeated paragraphs, with the line rules off (a repeated paragraph repeats its lines).
    para = [lines_of(s, 2, 10) for s in range(4)]
    text = "\n\n".join(para + [para[0], para[1], para[0]])
    assert check_document(text, CFG) == "dup_lines"
    cfg = FilterConfig(max_dup_line_frac=None, max_dup_line_char_frac=None)
    assert check_document(text, cfg) == "dup_paragraphs"
    # One bigram in every line: 20 * len("goldenapple") over ~40% of the characters.
    rng = random.Random(6)
    text = "\n".join(f"{' '.join(words(rng, 2))} golden apple {' '.join(words(rng, 2))}"
                     for _ in range(20))
    assert check_document(text, CFG) == "top_2gram"
    # A 5-word phrase repeated in a long text: with the top-n-gram rules off, dup 5-grams catch it.
    rng = random.Random(7)
    phrase = "quick brown foxes jumped high"
    text = "\n".join(f"{' '.join(words(rng, 8))} {phrase}" for _ in range(12))
    cfg = FilterConfig(max_top_ngram_char_frac={})
    assert check_document(text, cfg) == "dup_5gram"


def test_thresholds_change_outcomes():
    text = prose(0, n_words=120)
    assert check_document(text, FilterConfig(min_words=200)) == "too_few_words"
    assert check_document(text, FilterConfig(max_words=100)) == "too_many_words"
    assert check_document(text, FilterConfig(min_words=None, max_words=None)) is None
    assert check_document(PLANTED["too_few_words"], FilterConfig(min_words=None)) is None


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "filters.json"
    path.write_text(json.dumps({"min_words": 10, "max_dup_ngram_char_frac": {"5": 0.5}}))
    parser = argparse.ArgumentParser()
    add_filter_args(parser)
    args = parser.parse_args(["--min-words", "20", "--max-top-ngram-char-frac", "2=0.3,3=0.25",
                              "--max-ellipsis-lines-ratio", "none", "--stop-words", "a,an"])
    cfg = filter_config_from_args(args, str(path))
    assert cfg.min_words == 20                                  # flag beats file
    assert cfg.max_dup_ngram_char_frac == {5: 0.5}              # file beats default
    assert cfg.max_top_ngram_char_frac == {2: 0.3, 3: 0.25}
    assert cfg.max_ellipsis_lines_ratio is None and cfg.stop_words == ("a", "an")
    assert cfg.rule_names()[-1] == "dup_5gram"
    off = filter_config_from_args(parser.parse_args(["--max-dup-ngram-char-frac", "none"]))
    assert off.max_dup_ngram_char_frac == {} and off.rule_names()[-1] == "top_4gram"
    yaml_path = tmp_path / "bad.yaml"
    yaml_path.write_text("min_wordz: 3\n")
    with pytest.raises(DataError, match=r"bad\.yaml: unknown filter setting 'min_wordz'"):
        FilterConfig.from_file(str(yaml_path))
    yaml_path.write_text("min_words: lots\n")
    with pytest.raises(DataError, match="min_words must be a number or null, got 'lots'"):
        FilterConfig.from_file(str(yaml_path))
    yaml_path.write_text("max_top_ngram_char_frac: null\nmax_words: null\n")
    cfg = FilterConfig.from_file(str(yaml_path))
    assert cfg.max_top_ngram_char_frac == {} and cfg.max_words is None
    with pytest.raises(DataError, match="--min-words: cannot parse 'many'"):
        filter_config_from_args(parser.parse_args(["--min-words", "many"]))


def test_exact_key_normalisation():
    a = "Hello,   World!\nThe end."
    assert normalize(a) == "hello world the end"
    assert exact_key(a) == exact_key("hello world -- THE END") and len(exact_key(a)) == 16
    assert exact_key(a) != exact_key("hello world the ends")


def test_near_dup_index():
    base = prose(10, n_words=300).split(" ")
    edited = list(base)
    edited[50], edited[200] = "zzyzx", "qwerty"
    other = prose(11, n_words=300)
    index = NearDupIndex(threshold=0.8)
    sig = lambda t: minhash(t, shingle_size=5).hashvalues      # noqa: E731
    assert index.add_if_new(0, sig(" ".join(base)))
    assert index.add_if_new(1, sig(other))
    assert not index.add_if_new(2, sig(" ".join(edited)))       # two words changed: a near dup
    # Half the document rewritten is not a near duplicate.
    half = " ".join(base[:150]) + " " + " ".join(other.split(" ")[150:])
    assert index.add_if_new(3, sig(half))
    with pytest.raises(DataError, match="near-dup-threshold"):
        NearDupIndex(threshold=1.5)
