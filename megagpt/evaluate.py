"""Few-shot evaluation (the design's meta-learning hooks): k-shot tasks from local JSONL files, scored by
the log-likelihood of choices or by exact match of a generated answer, with a Wilson 95% interval.

Task file: one JSON object per line with these fields (any other field is refused, naming it and the file):
    query    string, required: the text the model continues ("Q: 2+3=?\\nA:")
    choices  list of strings: the candidate continuations (log-likelihood scoring) ...
    gold     integer: ... and the index of the right one in `choices`
    answer   string: the expected generated answer (exact-match scoring)
    id       string or integer, optional
A k-shot prompt is k solved examples (query, " ", target), each followed by a blank line, then the query;
the shots are drawn, seeded, from the other rows of the task (or from a separate shots file).
Log-likelihood: the choice whose tokens the model finds most likely after the prompt wins (the sum of its
token log-probabilities; ties go to the first). Exact match: greedy generation up to a newline or EOD,
stripped, equal to `answer` stripped.
Scoring runs on one process (tp = pp = 1): a `GPTModel`, or a one-element list of chunks.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from .jsonl import iter_records
from .generate import generate_ids

TASK_FIELDS = {"query": "string", "choices": "list of strings", "gold": "integer index into choices",
               "answer": "string", "id": "string or integer"}
TARGET_DELIMITER, FEWSHOT_DELIMITER = " ", "\n\n"


class EvalError(ValueError):
    """Bad task file or argument: one line naming the file, line and field."""


@dataclass(frozen=True)
class Example:
    query: str
    choices: tuple[str, ...] | None = None
    gold: int | None = None
    answer: str | None = None
    id: str | None = None

    def target(self) -> str:
        return self.choices[self.gold] if self.choices is not None else self.answer


def read_task(path: str) -> list[Example]:
    out = []
    for where, rec in iter_records(path, EvalError, "task file", TASK_FIELDS):
        if not isinstance(rec.get("query"), str):
            raise EvalError(f"{where}: field 'query' must be a string")
        choices, gold, answer = rec.get("choices"), rec.get("gold"), rec.get("answer")
        if (choices is None) != (gold is None):
            raise EvalError(f"{where}: fields 'choices' and 'gold' go together")
        if choices is not None:
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise EvalError(f"{where}: field 'choices' must be a list of at least 2 strings")
            if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
                raise EvalError(f"{where}: field 'gold' must be an index into choices (0..{len(choices) - 1})")
            choices = tuple(choices)
        if answer is not None and not isinstance(answer, str):
            raise EvalError(f"{where}: field 'answer' must be a string")
        if choices is None and answer is None:
            raise EvalError(f"{where}: needs 'choices' + 'gold' (log-likelihood) or 'answer' (exact match)")
        out.append(Example(rec["query"], choices, gold, answer, None if rec.get("id") is None else str(rec["id"])))
    if not out:
        raise EvalError(f"{path}: the task has no examples")
    return out


def scoring_of(examples: list[Example], scoring: str, path: str = "task") -> str:
    """'loglik' or 'exact'; 'auto' picks loglik when every row has choices, else exact."""
    if scoring == "auto":
        scoring = "loglik" if all(e.choices is not None for e in examples) else "exact"
    need = {"loglik": "choices", "exact": "answer"}
    if scoring not in need:
        raise EvalError(f"--scoring: expected auto, loglik or exact, got {scoring!r}")
    for i, e in enumerate(examples):
        if getattr(e, need[scoring]) is None:
            raise EvalError(f"{path}: row {i + 1} has no field {need[scoring]!r}, needed for {scoring} scoring")
    return scoring


def pick_shots(pool: list[Example], k: int, rng: random.Random, exclude: Example | None = None) -> list[Example]:
    # the row itself is excluded, not rows equal to it: in-context tasks repeat a query on purpose (the
    # few-shot demo's mapping tasks ask each item ~50 times and a shot with the same item is the point)
    cands = [e for e in pool if e is not exclude]
    if k > len(cands):
        raise EvalError(f"k={k}: only {len(cands)} examples to draw shots from")
    return rng.sample(cands, k)


def fewshot_prompt(example: Example, shots: list[Example]) -> str:
    solved = [f"{s.query}{TARGET_DELIMITER}{s.target()}" for s in shots]
    return FEWSHOT_DELIMITER.join(solved + [example.query])


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokenized apart (so the continuation's tokens are the same in every
    prompt); an empty context becomes the EOD token, which every document follows in training."""
    ctx = tok.encode(context) if context else [tok.eod_id]
    return ctx, tok.encode(continuation)


def _model(model):
    m = model[0] if isinstance(model, (list, tuple)) else model
    if (isinstance(model, (list, tuple)) and len(model) != 1) or m.tp.size > 1 or not (m.pre_process and m.post_process):
        raise EvalError("evaluate: scoring runs on one process (tp = pp = 1); load the model without --tp/--pp")
    return m


@torch.no_grad()
def loglikelihood(model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 16
                  ) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding gives exactly the continuation) for
    each (context ids, continuation ids). A context too long for the window loses its oldest tokens."""
    m = _model(model).eval()
    L = m.cfg.max_seq_len
    rows = []
    for ctx, cont in pairs:
        if not cont or len(cont) > L:
            raise EvalError(f"loglikelihood: a continuation of {len(cont)} tokens does not fit "
                            f"model.max_seq_len={L}")
        seq = (list(ctx) + list(cont))[-(L + 1):]          # the model sees seq[:-1], predicts seq[1:]
        rows.append((seq, len(cont)))
    out = []
    dev = next(m.parameters()).device
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        width = max(len(s) for s, _ in batch) - 1
        x = torch.tensor([s[:-1] + [0] * (width - len(s) + 1) for s, _ in batch], device=dev)   # [b, s]
        logp = torch.log_softmax(m.gather_logits(m(x)).float(), dim=-1)                        # [b, s, V]
        for r, (seq, n) in enumerate(batch):
            pos = torch.arange(len(seq) - 1 - n, len(seq) - 1, device=dev)
            want = torch.tensor(seq[-n:], device=dev)
            lp = logp[r, pos]                                                                    # [n, V]
            out.append((float(lp.gather(1, want[:, None]).sum()), bool((lp.argmax(-1) == want).all())))
    return out


def rolling_windows(ids: list[int], prefix: int, window: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that score every token of `ids` once: disjoint windows of up to
    `window` predicted tokens, each given the token before it (the first one: `prefix`, the EOD)."""
    seq, out = [prefix] + list(ids), []
    for a in range(1, len(seq), window):
        b = min(a + window, len(seq))
        out.append((seq[max(0, b - 1 - window):a], seq[a:b]))
    return out


def loglikelihood_rolling(model, tok, text: str, batch_size: int = 16) -> float:
    """log p(text): the sum over its tokens, in disjoint windows of model.max_seq_len."""
    ids = tok.encode(text)
    if not ids:
        return 0.0
    pairs = rolling_windows(ids, tok.eod_id, _model(model).cfg.max_seq_len)
    return sum(lp for lp, _ in loglikelihood(model, pairs, batch_size))


def generate_until(model, tok, contexts: list[str], until: list[str], max_new_tokens: int = 32,
                   batch_size: int = 16) -> list[str]:
    """Greedy continuations of each context, cut before the first stop string (and at EOD)."""
    m = _model(model)
    L, outs = m.cfg.max_seq_len, []
    keep = max(1, L - max_new_tokens)                      # room for the answer: the oldest context goes
    for i in range(0, len(contexts), batch_size):
        prompts = [(tok.encode(c) if c else [tok.eod_id])[-keep:] for c in contexts[i:i + batch_size]]
        stop = (lambda ids: any(s in tok.decode(ids) for s in until)) if until else None
        for ids in generate_ids(m, prompts, max_new_tokens, eod_id=tok.eod_id, stop=stop):
            text = tok.decode([t for t in ids if t != tok.eod_id])
            for s in until:
                text = text.split(s)[0]
            outs.append(text)
    return outs


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for a proportion (95% for z = 1.96)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, mid - half), min(1.0, mid + half)


def evaluate(model, tok, examples: list[Example], k: int, scoring: str = "auto", seed: int = 0,
             shots_pool: list[Example] | None = None, max_new_tokens: int = 32, batch_size: int = 16) -> dict:
    """Accuracy of the model on `examples` with k shots each: {k, n, correct, accuracy, ci95, scoring}."""
    scoring = scoring_of(examples, scoring)
    if not isinstance(k, int) or k < 0:
        raise EvalError(f"k: expected a non-negative number of shots, got {k!r}")
    rng, pool = random.Random(seed), shots_pool if shots_pool is not None else examples
    prompts = [fewshot_prompt(e, pick_shots(pool, k, rng, exclude=e)) for e in examples]
    if scoring == "loglik":
        pairs, owner = [], []
        for j, (e, p) in enumerate(zip(examples, prompts)):
            for c in e.choices:
                pairs.append(encode_pair(tok, p, TARGET_DELIMITER + c))
                owner.append(j)
        scores = loglikelihood(model, pairs, batch_size)
        per = [[] for _ in examples]
        for j, (lp, _) in zip(owner, scores):
            per[j].append(lp)
        right = [max(range(len(s)), key=lambda c: (s[c], -c)) == e.gold for s, e in zip(per, examples)]
    else:
        outs = generate_until(model, tok, prompts, ["\n"], max_new_tokens, batch_size)
        right = [o.strip() == e.answer.strip() for o, e in zip(outs, examples)]
    correct, n = sum(right), len(examples)
    lo, hi = wilson(correct, n)
    return {"k": k, "n": n, "correct": correct, "accuracy": correct / n, "ci95": [lo, hi], "scoring": scoring}
