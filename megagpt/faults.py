"""Test hook: MEGAGPT_FAULT="<point>:<step>[@<rank>]" SIGKILLs one rank at that point, as `kill -9`
would, to prove that resuming never depends on a clean exit. Inert while the variable is unset.

    step       in the middle of training step <step>: after its forward/backward, before the update
    save       in the save at <step>: every rank's files written, nothing published yet
    shard      in the save at <step>: in the middle of this rank's tensor file (cut to half its length)
    publish    in the save at <step>: the step directory renamed into place, `latest` not yet updated
    republish  re-saving an existing <step>: the old copy renamed aside, the new one not yet in place

<rank>: the global rank that dies (default 0)."""
from __future__ import annotations

import os
import signal


def fault_point(point: str, step: int, rank: int = 0, cut: str | None = None) -> None:
    """Die here if MEGAGPT_FAULT names this point, step and rank. `cut`: the file being written at
    this point, first truncated to half its length, as a kill in the middle of its write leaves it."""
    fault = os.environ.get("MEGAGPT_FAULT")
    if not fault:
        return
    where, _, who = fault.partition("@")
    if where != f"{point}:{step}" or int(who or 0) != rank:
        return
    if cut is not None:
        os.truncate(cut, os.path.getsize(cut) // 2)
    os.kill(os.getpid(), signal.SIGKILL)
