"""Retrieval-augmented generation: a BM25 index (`bm25s`) over a JSONL corpus, chunked into passages;
top-k retrieval; the prompt that shows each passage with its id; the citations parsed from an answer.

Corpus: one JSON object per line with `id` (string or integer, unique) and `text` (string), and an
optional `title` (string). Any other field is refused with one line naming the field, the file and the line.
A document longer than `chunk_words` words is split into overlapping passages; passage ids are
`<doc id>#<chunk number>`, so a citation names the document and the place in it.
The index directory holds bm25s's arrays as .npy saved and loaded with allow_pickle=False, its vocabulary
and parameters as JSON, and the passages as passages.jsonl: nothing in it is ever unpickled.

The prompt (`build_prompt`) is the one format the RAG demo trains on and `tools/rag.py ask` sends:
    question: ...
    [doc3#0] first passage
    [doc9#1] second passage
    question: ...
    answer:
(the question before the passages as well as after them, so that a decoder-only model can compare each
passage with the question while it reads it; closed book, with no passages, is "question: ...\nanswer:")
and an answer cites the ids it drew on in brackets: "Trelos [doc3#0]".

Two ways to read the top-k (`tools/rag.py ask --read`): together, all k passages in one prompt; or each
on its own (`no_answer_probs`, `most_relevant`), as RAG-Sequence and Self-RAG do: the reader is asked the
question with one passage at a time, and the passage it is least likely to answer NO_ANSWER for is the one
it answers from. Reading each needs a reader trained to say NO_ANSWER when the passage is about someone
or something else (examples/rag_demo.py); it costs k short prompts instead of one long one.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from .jsonl import iter_records

CORPUS_FIELDS = {"id": "string or integer, unique", "text": "string", "title": "optional string"}
PASSAGES = "passages.jsonl"
META = "rag.json"
_WORD = re.compile(r"\w+")
_CITE = re.compile(r"\[([^\[\]\s]+)\]")
NO_ANSWER = "unknown"      # what a reader trained to read each passage alone answers for an unrelated one


class RagError(ValueError):
    """Bad input to the index or to a query: one line naming the file, field or argument."""


@dataclass(frozen=True)
class Passage:
    pid: str           # "<doc id>#<chunk>"
    doc_id: str
    text: str
    title: str = ""


def words(text: str) -> list[str]:
    """BM25 terms: lower-cased runs of letters, digits and underscores."""
    return _WORD.findall(text.lower())


def read_corpus(path: str) -> list[dict]:
    """The documents of a JSONL corpus, checked: one line per bad record naming the file, line and field."""
    docs, seen = [], set()
    for where, rec in iter_records(path, RagError, "corpus file", CORPUS_FIELDS,
                                   "a JSON object with fields id, text[, title]"):
        for key in ("id", "text"):
            if key not in rec:
                raise RagError(f"{where}: missing field {key!r} ({CORPUS_FIELDS[key]})")
        if not isinstance(rec["id"], (str, int)) or isinstance(rec["id"], bool):
            raise RagError(f"{where}: field 'id' must be a string or integer, got {rec['id']!r}")
        for key in ("text", "title"):
            if key in rec and not isinstance(rec[key], str):
                raise RagError(f"{where}: field {key!r} must be a string, got {type(rec[key]).__name__}")
        doc_id = str(rec["id"])
        if not doc_id or any(c.isspace() or c in "[]" for c in doc_id):
            raise RagError(f"{where}: field 'id' {doc_id!r} must be non-empty, without spaces or brackets")
        if doc_id in seen:
            raise RagError(f"{where}: duplicate id {doc_id!r}")
        seen.add(doc_id)
        docs.append({"id": doc_id, "text": rec["text"], "title": rec.get("title", "")})
    if not docs:
        raise RagError(f"{path}: the corpus has no documents")
    return docs


def chunk(doc: dict, chunk_words: int = 100, overlap: int = 20) -> list[Passage]:
    """A document -> passages of at most chunk_words whitespace-separated words, each overlapping the
    previous by `overlap` words (a short document is one passage)."""
    if chunk_words < 1 or not 0 <= overlap < chunk_words:
        raise RagError(f"chunking: expected chunk_words >= 1 and 0 <= overlap < chunk_words, "
                       f"got {chunk_words} and {overlap}")
    toks = doc["text"].split()
    step, out = chunk_words - overlap, []
    for i, start in enumerate(range(0, max(len(toks) - overlap, 1), step)):
        out.append(Passage(f"{doc['id']}#{i}", doc["id"], " ".join(toks[start:start + chunk_words]),
                           doc.get("title", "")))
    return out


class Index:
    """BM25 over passages. `search` returns (passage, score) best first; ties keep corpus order."""

    def __init__(self, passages: list[Passage], retriever, params: dict):
        self.passages, self.retriever, self.params = passages, retriever, params
        self.by_id = {p.pid: p for p in passages}

    @classmethod
    def build(cls, passages: list[Passage], k1: float = 1.5, b: float = 0.75) -> Index:
        import bm25s
        if not passages:
            raise RagError("index: no passages to index")
        retriever = bm25s.BM25(k1=k1, b=b)
        # every passage gets at least one term, so bm25s's document numbering stays aligned with ours
        retriever.index([words(f"{p.title} {p.text}") or [""] for p in passages], show_progress=False)
        return cls(passages, retriever, {"k1": k1, "b": b})

    @classmethod
    def from_corpus(cls, path: str, chunk_words: int = 100, overlap: int = 20, **bm25) -> Index:
        passages = [p for d in read_corpus(path) for p in chunk(d, chunk_words, overlap)]
        index = cls.build(passages, **bm25)
        index.params.update(chunk_words=chunk_words, overlap=overlap, corpus=os.path.abspath(path))
        return index

    def scores(self, query: str) -> np.ndarray:
        vocab = self.retriever.vocab_dict
        terms = [t for t in words(query) if t in vocab]
        if not terms:
            return np.zeros(len(self.passages), dtype=np.float32)
        return np.asarray(self.retriever.get_scores(terms))

    def search(self, query: str, k: int = 3) -> list[tuple[Passage, float]]:
        if not isinstance(k, int) or k < 1:
            raise RagError(f"k: expected a positive number of passages, got {k!r}")
        s = self.scores(query)
        order = np.argsort(-s, kind="stable")[:k]
        return [(self.passages[i], float(s[i])) for i in order]

    def save(self, out_dir: str) -> None:
        """bm25s's own save with allow_pickle=False (.npy + JSON), plus passages.jsonl and rag.json."""
        os.makedirs(out_dir, exist_ok=True)
        self.retriever.save(out_dir, corpus=None, allow_pickle=False, show_progress=False)
        with open(os.path.join(out_dir, PASSAGES), "w", encoding="utf-8") as f:
            for p in self.passages:
                f.write(json.dumps({"pid": p.pid, "doc_id": p.doc_id, "text": p.text, "title": p.title},
                                   ensure_ascii=False) + "\n")
        with open(os.path.join(out_dir, META), "w") as f:
            json.dump({"format": "megagpt-rag-1", "passages": len(self.passages), **self.params}, f, indent=1)

    @classmethod
    def load(cls, index_dir: str) -> Index:
        import bm25s
        meta_path = os.path.join(index_dir, META)
        if not os.path.isfile(meta_path):
            raise RagError(f"--index: {index_dir}: not an index directory (no {META}; build one with "
                           f"`tools/rag.py index`)")
        with open(meta_path) as f:
            meta = json.load(f)
        with open(os.path.join(index_dir, PASSAGES), encoding="utf-8") as f:
            passages = [Passage(**json.loads(line)) for line in f if line.strip()]
        retriever = bm25s.BM25.load(index_dir, allow_pickle=False, load_corpus=False, show_progress=False)
        if len(passages) != meta.get("passages") or retriever.scores["num_docs"] != len(passages):
            raise RagError(f"--index: {index_dir}: {len(passages)} passages but the BM25 arrays hold "
                           f"{retriever.scores['num_docs']} (an incomplete index; rebuild it)")
        return cls(passages, retriever, {k: v for k, v in meta.items() if k not in ("format", "passages")})


def build_prompt(question: str, passages: list[Passage]) -> str:
    """The question, the passages each with its id in brackets, the question again, then "answer:"; with
    no passages (closed book) just the question and "answer:". The question comes first too so that a
    decoder-only model reads each passage already knowing whom it is asked about (query-aware
    contextualization, Liu et al. 2023, "Lost in the Middle")."""
    q = f"question: {question.strip()}"
    lines = [f"[{p.pid}] {p.title + ': ' if p.title else ''}{p.text}" for p in passages]
    return "\n".join(([q] if passages else []) + lines + [q, "answer:"])


def check_no_answer(no_answer: str) -> str:
    """The reader's no-answer text, refused when blank (every passage would then be judged on nothing)."""
    if not no_answer.strip():
        raise RagError("--no-answer: expected the reader's no-answer text, got an empty string")
    return no_answer


def no_answer_probs(model, tok, question: str, passages: list[Passage], no_answer: str = NO_ANSWER
                    ) -> list[float]:
    """p(the reader's answer is `no_answer` | the question and this one passage), for each passage read
    alone in build_prompt's format: the reader's own judgement that the passage does not answer it."""
    from .evaluate import encode_pair, loglikelihood       # torch only when a model is asked
    pairs = [encode_pair(tok, build_prompt(question, [p]), check_no_answer(no_answer)) for p in passages]
    return [math.exp(lp) for lp, _ in loglikelihood(model, pairs)]


def most_relevant(p_no_answer: list[float]) -> int:
    """The passage the reader is least likely to find no answer in (the first of equals). Each passage is
    judged alone, so the pick does not depend on the retriever's order, only on what the passages say."""
    if not p_no_answer:
        raise RagError("no passages to choose from")
    return min(range(len(p_no_answer)), key=p_no_answer.__getitem__)


def citations(answer: str, known: list[str] | set[str] | None = None) -> tuple[list[str], list[str]]:
    """The ids an answer cites in brackets, in order without repeats: (cited ids among `known`, other
    bracketed ids, which the answer made up). With known=None every bracketed id counts as cited."""
    cited, unknown = [], []
    for pid in _CITE.findall(answer):
        bucket = cited if known is None or pid in known else unknown
        if pid not in bucket:
            bucket.append(pid)
    return cited, unknown


def strip_citations(answer: str) -> str:
    """The answer without its bracketed ids, whitespace collapsed."""
    return " ".join(_CITE.sub(" ", answer).split())


def recall_at(ranked: list[list[str]], gold: list[str], ks=(1, 3, 5)) -> dict[int, float]:
    """Share of queries whose gold id is in the first k retrieved ids, for each k."""
    if len(ranked) != len(gold) or not gold:
        raise RagError(f"recall: {len(ranked)} rankings for {len(gold)} gold ids")
    return {k: sum(g in r[:k] for r, g in zip(ranked, gold)) / len(gold) for k in ks}
