"""The one JSONL record reader of the project's inputs (RAG corpora, evaluation tasks, chat data):
one JSON object per line, blank lines skipped, and every bad line a one-line error naming the file,
line and, for an unknown field, the field."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator


def iter_records(path: str, error: type[Exception], what: str, fields=None,
                 expected: str = "a JSON object") -> Iterator[tuple[str, dict]]:
    """Yield (where, record) for each non-blank line of `path`, where = "path:line". `what` names the
    file in the not-found error ("task file"); `fields`, if given, are the only keys allowed."""
    if not os.path.isfile(path):
        raise error(f"{path}: {what} not found")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: not a JSON object ({e.msg})") from None
            if not isinstance(rec, dict):
                raise error(f"{where}: expected {expected}")
            for key in rec if fields is not None else ():
                if key not in fields:
                    raise error(f"{where}: unknown field {key!r} (expected {', '.join(fields)})")
            yield where, rec
