"""Harmful-content curation: a filter stage of preprocessing (preprocess.py runs it after the quality rules).

Two rules, each with its own threshold, each off when its threshold is None:
  harmful_classifier  the `alt-profanity-check` package's model (a linear SVM over a TF-IDF of words,
                      shipped inside the package, so it runs offline) scores every non-empty line;
                      a document is removed when the share of its lines scoring >= line_threshold
                      exceeds max_flagged_lines (a long text with one coarse line is kept, a rant is not);
  harmful_wordlist    a word or regex list (one pattern per line, matched case-insensitively on word
                      boundaries): a document is removed when its matches per 1000 words exceed
                      max_hits_per_1k_words.
Removals are counted under those names in the stats, and up to `sample_size` removed documents (the
first ones, in input order: deterministic) go to PREFIX.harmful_sample.jsonl with their rule and score,
for an audit. The model's two files are joblib (pickle) files of the installed, pinned package, loaded
by the package's own code: the project's rule against unpickling applies to files a run is handed, and
no such file is ever unpickled here.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from megagpt.data.indexed import DataError

RULES = ("harmful_classifier", "harmful_wordlist")


@dataclass(frozen=True)
class HarmConfig:
    line_threshold: float | None = 0.9          # classifier probability at which a line is flagged
    max_flagged_lines: float = 0.2              # share of flagged lines above which a document goes
    patterns: tuple = ()                        # words or regexes
    max_hits_per_1k_words: float | None = None  # word-list matches per 1000 words above which a document goes
    sample_size: int = 50

    def __post_init__(self):
        if self.line_threshold is not None and not 0.0 < self.line_threshold <= 1.0:
            raise DataError(f"--harm-line-threshold {self.line_threshold} must be in (0, 1]")
        if not 0.0 <= self.max_flagged_lines < 1.0:
            raise DataError(f"--harm-max-flagged-lines {self.max_flagged_lines} must be in [0, 1)")
        if self.max_hits_per_1k_words is not None and self.max_hits_per_1k_words < 0:
            raise DataError(f"--harm-max-hits-per-1k-words {self.max_hits_per_1k_words} must be >= 0")
        if self.max_hits_per_1k_words is not None and not self.patterns:
            raise DataError("--harm-max-hits-per-1k-words needs --harm-wordlist FILE (the patterns)")
        for p in self.patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise DataError(f"harm word list: pattern {p!r} is not a regex ({e})") from None
        if self.line_threshold is not None:
            classifier()                        # missing package: fails here, before any work

    @staticmethod
    def read_patterns(path: str) -> tuple:
        try:
            with open(path, encoding="utf-8") as f:
                return tuple(line.strip() for line in f if line.strip() and not line.startswith("#"))
        except OSError as e:
            raise DataError(f"{path}: cannot read the harm word list ({type(e).__name__})") from None


@functools.lru_cache(maxsize=1)
def classifier():
    """alt-profanity-check's predict_prob (loaded once per process)."""
    try:
        from profanity_check import predict_prob
    except ImportError:
        raise DataError("the harmful-content classifier needs the alt-profanity-check package "
                        "(pip install alt-profanity-check), or --harm-line-threshold none") from None
    return predict_prob


@functools.lru_cache(maxsize=4)
def _compiled(patterns: tuple):
    return re.compile(r"\b(?:" + "|".join(f"(?:{p})" for p in patterns) + r")\b", re.IGNORECASE)


def check_harm(text: str, cfg: HarmConfig) -> tuple[str | None, float]:
    """(the rule that removes `text` or None, its score: flagged-line share or hits per 1000 words)."""
    return check_harm_batch([text], cfg)[0]


def check_harm_batch(texts: list[str], cfg: HarmConfig) -> list[tuple[str | None, float]]:
    """check_harm of each text; the classifier scores every line of the batch in one call (a call
    costs ~20 ms, a line ~30 us)."""
    out: list[tuple[str | None, float]] = [(None, 0.0)] * len(texts)
    if cfg.max_hits_per_1k_words is not None:
        pattern = _compiled(cfg.patterns)
        for i, text in enumerate(texts):
            rate = 1000.0 * len(pattern.findall(text)) / max(1, len(text.split()))
            if rate > cfg.max_hits_per_1k_words:
                out[i] = ("harmful_wordlist", rate)
    if cfg.line_threshold is not None:
        todo = [(i, [line for line in texts[i].splitlines() if line.strip()]) for i in range(len(texts))
                if out[i][0] is None]
        todo = [(i, lines) for i, lines in todo if lines]
        if todo:
            flagged = classifier()([line for _, lines in todo for line in lines]) >= cfg.line_threshold
            at = 0
            for i, lines in todo:
                share = float(flagged[at:at + len(lines)].mean())
                at += len(lines)
                if share > cfg.max_flagged_lines:
                    out[i] = ("harmful_classifier", share)
    return out
