"""Raw text -> filtered, deduplicated, tokenized PREFIX.bin / PREFIX.idx (see indexed.py).

Two streaming passes keep memory bounded by the number of documents, not their size:

  pass 1  read documents, apply the quality filters, drop exact duplicates (a set of 16-byte
          digests) and near duplicates (MinHash LSH); kept documents go to PREFIX.kept.jsonl.tmp
  (bpe)   with --vocab-size, train a byte-level BPE from an iterator over that file and save it
          as tokenizer.json next to the output; with --tokenizer, use the given one
  pass 2  tokenize the kept documents in batches, append the end-of-document token, stream the
          ids into the indexed dataset, renamed into place at the end

With workers > 1 the per-document work (filters, MinHash, encode_batch) runs in a process pool,
but every decision (dedup, output order) is made in the parent in input order, so the output
bytes do not depend on the worker count. Removals are counted per rule, printed at the end and
written to PREFIX.stats.json.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import gzip
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from megagpt.data.clean import FilterConfig, NearDupIndex, check_document, exact_key, minhash
from megagpt.data.harmful import RULES as HARM_RULES, HarmConfig, check_harm_batch
from megagpt.data.indexed import DataError, IndexedDatasetBuilder, best_dtype
from megagpt.data.tokenizer import Tokenizer

_BATCH_CHARS = 8_000_000   # cap on characters per task: bounds memory whatever the doc sizes


def check_inputs(paths: Iterable[str]) -> list[str]:
    """Fail before any work if an input is missing or empty (one line naming the file)."""
    paths = [str(p) for p in paths]
    if not paths:
        raise DataError("no input files given")
    for path in paths:
        if not os.path.exists(path):
            raise DataError(f"{path}: input file not found")
        if not os.path.isfile(path):
            raise DataError(f"{path}: input is not a regular file")
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: input file is empty")
    return paths


def _open_text(path: str):
    # Undecodable bytes become U+FFFD: one bad byte should not end a long run.
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


SPLIT_TEXT_HELP = ("how a plain-text file (not .jsonl/.json) is cut into documents: file (the whole "
                   "file is one document), paragraph (blank lines separate documents) or "
                   "lines:N (every N lines are one document)")


def parse_split_text(spec: str) -> int | str:
    """--split-text: 'file' | 'paragraph' | 'lines:N' -> 'file', 'paragraph' or N (a positive int)."""
    if spec in ("file", "paragraph"):
        return spec
    if spec.startswith("lines:"):
        try:
            n = int(spec[len("lines:"):])
        except ValueError:
            n = 0
        if n >= 1:
            return n
    raise DataError(f"--split-text {spec!r}: expected file, paragraph or lines:N with N >= 1")


def _split_lines(f, split: int | str) -> Iterator[str]:
    """Documents of one open text file: paragraphs, or groups of `split` lines; each without its
    last newline. Streams the file: a document is the only thing held in memory."""
    doc: list[str] = []
    for line in f:
        if split == "paragraph":
            if line.strip():
                doc.append(line)
                continue
            if doc:                        # a blank line ends the paragraph
                yield "".join(doc).rstrip("\n")
            doc = []
            continue
        doc.append(line)
        if len(doc) == split:
            yield "".join(doc).rstrip("\n")
            doc = []
    if doc:
        yield "".join(doc).rstrip("\n")


def iter_documents(paths: Iterable[str], json_key: str = "text", split_text: str = "file") -> Iterator[str]:
    """Documents of the inputs in order: one per JSONL line (.jsonl/.json, optionally .gz); from a
    plain-text file (any other name) one per file, paragraph or N lines, as `split_text` says."""
    split = parse_split_text(split_text)
    for path in paths:
        name = path[:-3] if path.endswith(".gz") else path
        with _open_text(path) as f:
            if not name.endswith((".jsonl", ".json")):
                if split == "file":
                    yield f.read()
                else:
                    yield from _split_lines(f, split)
                continue
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or json_key not in obj:
                    raise DataError(f"{path}:{lineno}: no {json_key!r} field (see --json-key)")
                text = obj[json_key]
                if not isinstance(text, str):
                    raise DataError(f"{path}:{lineno}: field {json_key!r} is not a string")
                yield _valid_utf8(text)


def _valid_utf8(text: str) -> str:
    # JSON can carry lone surrogates ("\ud800"), which neither UTF-8 files nor the tokenizer
    # accept; they become '?' rather than failing the run.
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="replace").decode("utf-8")


def _iter_kept(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def _batches(texts: Iterable[str], max_docs: int) -> Iterator[list[str]]:
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= max_docs or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


@dataclass(frozen=True)
class _Pass1:
    """What a worker needs to analyse a batch in pass 1 (pickled with each task)."""
    filter_config: FilterConfig | None   # None: --no-filter
    dedup: bool
    near_dedup: bool
    shingle_size: int
    num_perm: int
    harm: HarmConfig | None = None       # None: no harmful-content stage


def _analyse_batch(texts: list[str], s: _Pass1) -> list[tuple]:
    """Per document: (rule that removes it or None, exact digest, MinHash values or None, harm score)."""
    out = []
    reasons = [("empty" if not text.strip() else check_document(text, s.filter_config) if s.filter_config else None,
                0.0) for text in texts]
    if s.harm is not None:                    # the harm stage, batched, on what the quality rules kept
        todo = [i for i, (reason, _) in enumerate(reasons) if reason is None]
        for i, verdict in zip(todo, check_harm_batch([texts[i] for i in todo], s.harm)):
            reasons[i] = verdict
    for text, (reason, score) in zip(texts, reasons):
        if reason:
            out.append((reason, None, None, score))
            continue
        key = exact_key(text) if s.dedup else None
        sig = minhash(text, s.shingle_size, s.num_perm).hashvalues if s.near_dedup else None
        out.append((None, key, sig, 0.0))
    return out


def _encode_texts(tok: Tokenizer, texts: list[str], dtype: str) -> list[np.ndarray]:
    eod = [tok.eod_id]
    return [np.asarray(ids + eod, dtype=dtype) for ids in tok.encode_batch(texts)]


@functools.lru_cache(maxsize=2)
def _worker_tokenizer(path: str, fingerprint: str) -> Tokenizer:
    # Each pool process loads the tokenizer once; the fingerprint in the key makes a changed
    # file a cache miss, and the check below catches a file replaced mid-run.
    tok = Tokenizer.load(path)
    if tok.fingerprint != fingerprint:
        raise DataError(f"{path}: tokenizer changed while preprocessing")
    return tok


def _encode_in_worker(path: str, fingerprint: str, texts: list[str], dtype: str) -> list[np.ndarray]:
    return _encode_texts(_worker_tokenizer(path, fingerprint), texts, dtype)


def _worker_init() -> None:
    # One process per core already: tokenizers' own thread pool would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _ordered_map(pool, fn: Callable, tasks: Iterable[tuple], in_flight: int) -> Iterator[tuple]:
    """Yield (task, fn(*task)) in task order, with at most `in_flight` tasks queued.

    Pool.imap would read the whole input ahead into its queue; this keeps memory bounded.
    """
    if pool is None:
        for task in tasks:
            yield task, fn(*task)
        return
    queue = collections.deque()
    for task in tasks:
        queue.append((task, pool.apply_async(fn, task)))
        if len(queue) >= in_flight:
            task, res = queue.popleft()
            yield task, res.get()
    while queue:
        task, res = queue.popleft()
        yield task, res.get()


def _filter_and_dedup(pool, inputs: list[str], json_key: str, split_text: str, settings: _Pass1,
                      near_index: NearDupIndex | None, kept_path: str, removed: dict,
                      batch_size: int, in_flight: int, progress: bool,
                      harm_sample: list | None = None) -> tuple[int, int]:
    """Pass 1: decide each document in input order, write the kept ones to `kept_path`.

    Workers compute the filter verdict and the dedup keys; the dedup state (digest set, LSH)
    lives here, so the decisions are the same whatever the worker count. Returns (in, kept).
    """
    from tqdm import tqdm

    docs_in = docs_kept = 0
    exact_seen: set[bytes] = set()
    docs = iter_documents(inputs, json_key, split_text)
    tasks = ((batch, settings) for batch in _batches(docs, batch_size))
    with open(kept_path, "w", encoding="utf-8") as kept, \
            tqdm(desc="filter+dedup", unit="doc", file=sys.stderr, disable=not progress) as bar:
        for (batch, _), results in _ordered_map(pool, _analyse_batch, tasks, in_flight):
            for text, (reason, key, sig, score) in zip(batch, results):
                docs_in += 1
                if reason is None and key is not None:
                    if key in exact_seen:
                        reason = "exact_dup"
                    exact_seen.add(key)
                if reason is None and sig is not None and not near_index.add_if_new(docs_in, sig):
                    reason = "near_dup"
                if reason is not None:
                    removed[reason] += 1
                    if reason in HARM_RULES and harm_sample is not None and len(harm_sample) < settings.harm.sample_size:
                        harm_sample.append({"doc": docs_in - 1, "rule": reason, "score": round(score, 4), "text": text})
                    continue
                kept.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                docs_kept += 1
            bar.update(len(batch))
    return docs_in, docs_kept


def _tokenize(pool, tok: Tokenizer, tokenizer_path: str, kept_path: str, docs_kept: int,
              builder: IndexedDatasetBuilder, batch_size: int, in_flight: int,
              progress: bool) -> None:
    """Pass 2: encode the kept documents in order, each followed by the eod token."""
    from tqdm import tqdm

    batches = _batches(_iter_kept(kept_path), batch_size)
    dtype = builder.dtype.name
    if pool is None:
        fn, tasks = functools.partial(_encode_texts, tok), ((b, dtype) for b in batches)
    else:   # workers load the tokenizer from its file once each (see _worker_tokenizer)
        fn, tasks = _encode_in_worker, ((tokenizer_path, tok.fingerprint, b, dtype) for b in batches)
    with tqdm(total=docs_kept, desc="tokenize", unit="doc", file=sys.stderr,
              disable=not progress) as bar:
        for _, docs in _ordered_map(pool, fn, tasks, in_flight):
            for ids in docs:
                builder.add_doc(ids)
            bar.update(len(docs))


def preprocess(inputs: Iterable[str] | str, output_prefix: str, *, vocab_size: int | None = None,
               tokenizer: str | None = None, json_key: str = "text", split_text: str = "file",
               workers: int = 1,
               do_filter: bool = True, filter_config: FilterConfig | None = None,
               dedup: bool = True, near_dedup: bool = True, near_dup_threshold: float = 0.8,
               shingle_size: int = 5, num_perm: int = 128, batch_size: int = 256,
               progress: bool = True, report: bool = True, harm: HarmConfig | None = None) -> dict:
    """Build OUTPUT_PREFIX.bin/.idx from the inputs; returns the stats (also in .stats.json).

    Exactly one of `vocab_size` (train a BPE, saved as tokenizer.json next to the output) and
    `tokenizer` (path of a tokenizer.json) must be given. `dedup=False` turns off both exact
    and near dedup; `near_dedup=False` only the latter. `split_text` cuts plain-text files into
    documents: "file" (one each), "paragraph" or "lines:N" (see SPLIT_TEXT_HELP). `harm`: the
    harmful-content stage (harmful.py), after the quality rules; its removed documents are sampled to
    OUTPUT_PREFIX.harmful_sample.jsonl.
    """
    start = time.time()
    # Everything that can be wrong with the arguments fails here, before any work.
    inputs = check_inputs([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)
    if (vocab_size is None) == (tokenizer is None):
        raise DataError("give exactly one of --vocab-size N (train a BPE tokenizer) "
                        "or --tokenizer tokenizer.json (use an existing one)")
    if vocab_size is not None and vocab_size < 257:
        raise DataError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at "
                        "least 257 (256 bytes + the end-of-document token)")
    if workers < 1 or batch_size < 1 or shingle_size < 1:
        raise DataError("--workers, batch size and shingle size must be >= 1")
    parse_split_text(split_text)
    tok = Tokenizer.load(tokenizer) if tokenizer else None
    near_index = NearDupIndex(near_dup_threshold, num_perm) if dedup and near_dedup else None
    cfg = (filter_config or FilterConfig()) if do_filter else None
    settings = _Pass1(cfg, dedup, near_index is not None, shingle_size, num_perm, harm)

    output_prefix = str(output_prefix)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    kept_path = output_prefix + ".kept.jsonl.tmp"
    removed = dict.fromkeys(["empty"] + (cfg.rule_names() if cfg else []) + (list(HARM_RULES) if harm else [])
                            + ["exact_dup", "near_dup"], 0)
    harm_sample = [] if harm else None
    in_flight = 2 * workers      # tasks queued ahead: keeps workers busy, memory bounded
    # spawn, not fork: the parent may hold threads (torch, tokenizers) that fork would copy.
    pool = (multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init)
            if workers > 1 else None)
    builder = None
    try:
        docs_in, docs_kept = _filter_and_dedup(pool, inputs, json_key, split_text, settings, near_index,
                                               kept_path, removed, batch_size, in_flight, progress, harm_sample)
        near_index = None    # free the LSH before tokenizing
        if docs_kept == 0:
            raise DataError(f"{', '.join(inputs)}: no documents left of {docs_in} after filtering "
                            f"and dedup ({', '.join(f'{k}={v}' for k, v in removed.items() if v)})")
        if tok is None:
            if progress:
                print(f"training byte-level BPE (vocab {vocab_size}) on {docs_kept} documents",
                      file=sys.stderr)
            tok = Tokenizer.train(_iter_kept(kept_path), vocab_size, length=docs_kept)
            tokenizer = os.path.join(out_dir, "tokenizer.json")
            tok.save(tokenizer)
        builder = IndexedDatasetBuilder(output_prefix, best_dtype(tok.vocab_size), tok.vocab_size,
                                        tok.fingerprint, tok.eod_id)
        _tokenize(pool, tok, tokenizer, kept_path, docs_kept, builder, batch_size, in_flight,
                  progress)
        num_tokens, dtype = builder.num_tokens, builder.dtype.name
        builder.finalize()
        builder = None
    finally:
        if builder is not None:
            builder.abort()
        if pool is not None:
            pool.terminate()
            pool.join()
        if os.path.exists(kept_path):
            os.remove(kept_path)

    stats = {
        "inputs": inputs, "output_prefix": output_prefix, "split_text": split_text,
        "docs_in": docs_in, "docs_kept": docs_kept,
        "docs_removed": docs_in - docs_kept, "removed": removed,
        "tokens": num_tokens, "dtype": dtype,
        "tokenizer": os.path.abspath(tokenizer), "vocab_size": tok.vocab_size,
        "tokenizer_fingerprint": tok.fingerprint, "eod_id": tok.eod_id,
        "filter_config": cfg.to_dict() if cfg else None,
        "dedup": dedup, "near_dedup": settings.near_dedup,
        "near_dup_threshold": near_dup_threshold, "shingle_size": shingle_size,
        "num_perm": num_perm, "workers": workers, "seconds": round(time.time() - start, 2),
    }
    if harm is not None:
        sample_path = output_prefix + ".harmful_sample.jsonl"
        with open(sample_path, "w", encoding="utf-8") as f:
            for row in harm_sample:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        stats.update(harm_config={k: v for k, v in dataclasses.asdict(harm).items() if k != "patterns"}
                     | {"patterns": len(harm.patterns)}, harmful_sample=sample_path)
    stats_path = output_prefix + ".stats.json"
    with open(stats_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2, ensure_ascii=False)
    os.replace(stats_path + ".tmp", stats_path)
    if report:
        print(format_report(stats), file=sys.stderr)
    return stats


def format_report(stats: dict) -> str:
    """Human-readable summary: documents in/kept, removals per rule, tokens, tokenizer."""
    n_in = stats["docs_in"]
    pct = 100.0 * stats["docs_kept"] / max(1, n_in)
    lines = [f"preprocess: {n_in} documents in, {stats['docs_kept']} kept ({pct:.1f}%), "
             f"{stats['tokens']:,} tokens ({stats['dtype']})",
             "  removed by rule:"]
    width = max(len(k) for k in stats["removed"])
    for rule, count in stats["removed"].items():
        lines.append(f"    {rule:<{width}}  {count:>8}  ({100.0 * count / max(1, n_in):.2f}%)")
    lines.append(f"  tokenizer: vocab {stats['vocab_size']}, fingerprint "
                 f"{stats['tokenizer_fingerprint']}, eod id {stats['eod_id']} ({stats['tokenizer']})")
    prefix = stats["output_prefix"]
    lines.append(f"  wrote {prefix}.bin, {prefix}.idx, {prefix}.stats.json "
                 f"in {stats['seconds']:.1f} s")
    return "\n".join(lines)
