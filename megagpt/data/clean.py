"""Document quality filters (Gopher rules) and the text keys used for deduplication.

`check_document(text, cfg)` returns the name of the first rule a document fails, or None.
The rules and default thresholds follow Rae et al. 2021 (Gopher, appendix A): word count,
mean word length, symbol ratio, bullet / ellipsis lines, alphabetic words, stop words, and the
repetition rules (duplicate lines and paragraphs, top n-gram and duplicate n-gram character
fractions). A threshold set to None turns its rule off.

Dedup keys: `exact_key` is a 16-byte digest of the normalised text (lowercase, punctuation
dropped, whitespace collapsed), so a set of them costs ~100 bytes per document whatever the
document length; `minhash` is a datasketch MinHash of word n-gram shingles for near dedup.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field

from megagpt.data.indexed import DataError

_PUNCT = re.compile(r"[^\w\s]|_")
_SPACE = re.compile(r"\s+")
_PARAGRAPH = re.compile(r"\n\s*\n")
_EDGE_PUNCT = "".join(chr(c) for c in range(0x21, 0x7F) if not chr(c).isalnum()) + "“”‘’«»…—–"


def _rule(default, help: str, factory=None):
    """A threshold with its --flag help text; None as a value turns the rule off."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class FilterConfig:
    """Gopher-style thresholds. A document is removed by the first rule it fails."""
    min_words: int | None = _rule(50, "fewer words: removed")
    max_words: int | None = _rule(100_000, "more words: removed")
    min_mean_word_length: float | None = _rule(3.0, "shorter mean word length: removed")
    max_mean_word_length: float | None = _rule(10.0, "longer mean word length: removed")
    max_symbol_word_ratio: float | None = _rule(0.1, "more ('#' + '...') per word: removed")
    max_bullet_lines_ratio: float | None = _rule(0.9, "share of lines starting with a bullet")
    max_ellipsis_lines_ratio: float | None = _rule(0.3, "share of lines ending with an ellipsis")
    min_alpha_words_ratio: float | None = _rule(0.8, "share of words with a letter in them")
    min_stop_words: int | None = _rule(2, "fewer stop words: removed")
    max_dup_line_frac: float | None = _rule(0.3, "share of lines repeating an earlier line")
    max_dup_para_frac: float | None = _rule(0.3, "share of paragraphs repeating an earlier one")
    max_dup_line_char_frac: float | None = _rule(0.2, "share of characters in repeated lines")
    max_dup_para_char_frac: float | None = _rule(0.2, "share of characters in repeated paragraphs")
    max_top_ngram_char_frac: dict = _rule(
        None, "n=frac,...: characters in the most frequent word n-gram",
        factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    max_dup_ngram_char_frac: dict = _rule(
        None, "n=frac,...: characters in repeated word n-grams",
        factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})
    stop_words: tuple = _rule(("the", "be", "to", "of", "and", "that", "have", "with"),
                              "comma-separated stop words")
    bullets: tuple = _rule(("•", "●", "○", "▪", "‣", "◦", "-", "*"),
                           "comma-separated characters that start a bullet line")

    def __post_init__(self):
        # Values may come from YAML/JSON: n-gram keys as strings ("2": 0.2), null for "off".
        try:
            for name in ("max_top_ngram_char_frac", "max_dup_ngram_char_frac"):
                table = getattr(self, name) or {}
                setattr(self, name, {int(n): None if v is None else float(v)
                                     for n, v in table.items()})
            self.stop_words, self.bullets = tuple(self.stop_words or ()), tuple(self.bullets or ())
        except (TypeError, ValueError, AttributeError):
            raise DataError(f"filter config: {name} must be a mapping of n: fraction") from None
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(f.default, (int, float)) and not (
                    value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))):
                raise DataError(f"filter config: {f.name} must be a number or null, got {value!r}")

    def rule_names(self) -> list[str]:
        """Every rule's name, in the order they are checked (for a stable report)."""
        return (["too_few_words", "too_many_words", "mean_word_length", "symbol_word_ratio",
                 "bullet_lines", "ellipsis_lines", "alpha_words", "stop_words",
                 "dup_lines", "dup_paragraphs", "dup_line_chars", "dup_paragraph_chars"]
                + [f"top_{n}gram" for n in sorted(self.max_top_ngram_char_frac)]
                + [f"dup_{n}gram" for n in sorted(self.max_dup_ngram_char_frac)])

    @classmethod
    def from_file(cls, path: str) -> FilterConfig:
        """Thresholds from a YAML or JSON mapping (JSON is YAML); unknown keys are an error."""
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise DataError(f"{path}: cannot read filter config ({type(e).__name__})") from None
        if not isinstance(data, dict):
            raise DataError(f"{path}: a filter config must be a mapping of threshold: value")
        return cls().replace(data, source=path)

    def replace(self, overrides: dict, source: str = "filter config") -> FilterConfig:
        names = {f.name for f in dataclasses.fields(self)}
        for key in overrides:
            if key not in names:
                raise DataError(f"{source}: unknown filter setting {key!r} "
                                f"(known: {', '.join(sorted(names))})")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def add_filter_args(parser: argparse.ArgumentParser) -> None:
    """One --flag per FilterConfig field (--min-words 50, --max-dup-ngram-char-frac 5=0.15,...)."""
    group = parser.add_argument_group("quality filter thresholds (Gopher rules; 'none' disables one)")
    defaults = FilterConfig()
    for f in dataclasses.fields(FilterConfig):
        value = getattr(defaults, f.name)
        if isinstance(value, dict):
            value = ",".join(f"{n}={v}" for n, v in value.items())
        elif isinstance(value, tuple):
            value = ",".join(value)
        # SUPPRESS: an absent flag leaves no attribute, so the config file's value stands.
        group.add_argument("--" + f.name.replace("_", "-"), dest="filter_" + f.name,
                           default=argparse.SUPPRESS, metavar="V",
                           help=f"{f.metadata.get('help')} [default: {value}]")


def filter_config_from_args(args: argparse.Namespace, config_file: str | None = None) -> FilterConfig:
    """Defaults, then the YAML/JSON file, then the flags given on the command line."""
    cfg = FilterConfig.from_file(config_file) if config_file else FilterConfig()
    defaults = FilterConfig()
    overrides = {}
    for f in dataclasses.fields(FilterConfig):
        raw = getattr(args, "filter_" + f.name, None)
        if raw is not None:
            overrides[f.name] = _parse_flag(f.name, raw, getattr(defaults, f.name))
    return cfg.replace(overrides)


def _parse_flag(name: str, raw: str, default):
    """A flag's text as the type of the field's default; 'none' turns the rule(s) off."""
    flag = "--" + name.replace("_", "-")
    off = raw.strip().lower() == "none"
    try:
        if isinstance(default, dict):
            return {} if off else {int(k): float(v) for k, v in
                                   (item.split("=") for item in raw.split(",") if item)}
        if isinstance(default, tuple):
            return () if off else tuple(s.strip() for s in raw.split(",") if s.strip())
        return None if off else type(default)(raw)
    except ValueError:
        raise DataError(f"{flag}: cannot parse {raw!r}") from None


def _words(text: str) -> list[str]:
    """Lowercased words with punctuation stripped from their edges; empty tokens dropped."""
    out = []
    for token in text.split():
        w = token.strip(_EDGE_PUNCT).lower()
        if w:
            out.append(w)
    return out


def _dup_fractions(items: list[str]) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of characters in those repeats)."""
    if not items:
        return 0.0, 0.0
    seen, dup_count, dup_chars = set(), 0, 0
    for item in items:
        if item in seen:
            dup_count += 1
            dup_chars += len(item)
        seen.add(item)
    return dup_count / len(items), dup_chars / max(1, sum(len(i) for i in items))


def _top_ngram_char_frac(words: list[str], n: int, total_chars: int) -> float:
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0.0
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(len(w) for w in gram) / total_chars


def _dup_ngram_char_frac(words: list[str], n: int, total_chars: int) -> float:
    """Characters of words covered by a repeat (not the first occurrence) of some n-gram.

    Each word counts once however many repeated n-grams overlap it.
    """
    seen, covered = set(), [False] * len(words)
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        if gram in seen:
            covered[i:i + n] = [True] * n
        seen.add(gram)
    return sum(len(w) for w, c in zip(words, covered) if c) / total_chars


def check_document(text: str, cfg: FilterConfig) -> str | None:
    """The name of the first rule `text` fails (see FilterConfig.rule_names), or None."""
    raw_words = text.split()
    words = _words(text)
    n_raw = len(raw_words)
    if cfg.min_words is not None and len(words) < cfg.min_words:
        return "too_few_words"
    if cfg.max_words is not None and len(words) > cfg.max_words:
        return "too_many_words"
    total_chars = sum(len(w) for w in words)
    mean_len = total_chars / max(1, len(words))
    if ((cfg.min_mean_word_length is not None and mean_len < cfg.min_mean_word_length)
            or (cfg.max_mean_word_length is not None and mean_len > cfg.max_mean_word_length)):
        return "mean_word_length"
    if cfg.max_symbol_word_ratio is not None:
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / max(1, n_raw) > cfg.max_symbol_word_ratio:
            return "symbol_word_ratio"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    n_lines = max(1, len(lines))
    if cfg.max_bullet_lines_ratio is not None and cfg.bullets:
        bulleted = sum(line.startswith(cfg.bullets) for line in lines)
        if bulleted / n_lines > cfg.max_bullet_lines_ratio:
            return "bullet_lines"
    if cfg.max_ellipsis_lines_ratio is not None:
        trailing = sum(line.endswith(("...", "…")) for line in lines)
        if trailing / n_lines > cfg.max_ellipsis_lines_ratio:
            return "ellipsis_lines"
    if cfg.min_alpha_words_ratio is not None:
        alpha = sum(any(c.isalpha() for c in w) for w in raw_words)
        if alpha / max(1, n_raw) < cfg.min_alpha_words_ratio:
            return "alpha_words"
    if cfg.min_stop_words is not None:
        stop = set(cfg.stop_words)
        if sum(w in stop for w in words) < cfg.min_stop_words:
            return "stop_words"

    line_frac, line_chars = _dup_fractions(lines)
    paragraphs = [p.strip() for p in _PARAGRAPH.split(text) if p.strip()]
    para_frac, para_chars = _dup_fractions(paragraphs)
    for value, limit, rule in ((line_frac, cfg.max_dup_line_frac, "dup_lines"),
                               (para_frac, cfg.max_dup_para_frac, "dup_paragraphs"),
                               (line_chars, cfg.max_dup_line_char_frac, "dup_line_chars"),
                               (para_chars, cfg.max_dup_para_char_frac, "dup_paragraph_chars")):
        if limit is not None and value > limit:
            return rule
    total_chars = max(1, total_chars)
    for n, limit in sorted(cfg.max_top_ngram_char_frac.items()):
        if limit is not None and _top_ngram_char_frac(words, n, total_chars) > limit:
            return f"top_{n}gram"
    for n, limit in sorted(cfg.max_dup_ngram_char_frac.items()):
        if limit is not None and _dup_ngram_char_frac(words, n, total_chars) > limit:
            return f"dup_{n}gram"
    return None


def normalize(text: str) -> str:
    """Lowercase, punctuation dropped, whitespace collapsed: the text exact dedup compares."""
    return _SPACE.sub(" ", _PUNCT.sub("", text.lower())).strip()


def exact_key(text: str) -> bytes:
    """16-byte digest of the normalised text (the set stores these, never the texts)."""
    return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).digest()


def shingles(text: str, n: int) -> set[bytes]:
    """Word n-grams of the normalised text; a document shorter than n is one shingle."""
    words = normalize(text).split()
    if len(words) <= n:
        return {" ".join(words).encode("utf-8")} if words else set()
    return {" ".join(words[i:i + n]).encode("utf-8") for i in range(len(words) - n + 1)}


@functools.lru_cache(maxsize=4)
def _minhash_template(num_perm: int, seed: int):
    # Drawing the permutations costs more than hashing a short document; draw them once per
    # process and share them (same seed gives the same permutations in every worker).
    from datasketch import MinHash
    return MinHash(num_perm=num_perm, seed=seed, scheme="affine32")


def minhash(text: str, shingle_size: int, num_perm: int = 128, seed: int = 1):
    """datasketch MinHash (affine32 scheme) of the document's word shingles."""
    from datasketch import MinHash
    template = _minhash_template(num_perm, seed)
    m = MinHash(num_perm=num_perm, seed=seed, permutations=template.permutations, scheme="affine32")
    m.update_batch(list(shingles(text, shingle_size)))
    return m


class NearDupIndex:
    """MinHash LSH over the documents kept so far; `add_if_new` says whether a doc is new.

    LSH candidates are confirmed with the MinHash Jaccard estimate, so a document counts as a
    near duplicate only when its estimated similarity to a kept one is >= threshold (the LSH
    banding alone lets through some pairs well below it).
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, seed: int = 1):
        from datasketch import MinHashLSH

        if not 0.0 < threshold <= 1.0:
            raise DataError(f"--near-dup-threshold {threshold} must be in (0, 1]")
        self.threshold, self.num_perm, self.seed = threshold, num_perm, seed
        try:
            self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        except ValueError:
            # Near 1.0 datasketch's optimum is a single band, which it refuses. Two bands find
            # more candidates than one; the Jaccard check below keeps the threshold exact.
            self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm,
                                   params=(2, num_perm // 2))
        self._signatures: dict[int, object] = {}   # key -> uint32 hash values (512 B at 128 perms)

    def add_if_new(self, key: int, hashvalues) -> bool:
        from datasketch import MinHash

        m = MinHash(num_perm=self.num_perm, seed=self.seed, hashvalues=hashvalues,
                    permutations=_minhash_template(self.num_perm, self.seed).permutations,
                    scheme="affine32")
        for other in self._lsh.query(m):
            if (self._signatures[other] == m.hashvalues).mean() >= self.threshold:
                return False
        self._lsh.insert(key, m, check_duplication=False)
        self._signatures[key] = m.hashvalues
        return True
