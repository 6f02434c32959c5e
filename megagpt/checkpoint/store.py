"""The on-disk protocol of a run directory's checkpoints: where a save writes, how it becomes
visible atomically, and how a load finds the newest complete one. No tensors here.

    run_dir/
      latest                        "step_00000200": written to a temp file, then renamed over
      step_00000100/                a complete checkpoint
        rank_00000.safetensors      this rank's tensors
        rank_00000.json             what they are (shapes, TP specs, flat ranges, extra state)
        ...
        COMPLETE                    the manifest: every file with its size and sha256
      step_00000200.tmp-3f2a.../    a save in progress, or one that was killed: never read

A save writes everything into the tmp directory, rank 0 writes COMPLETE last and renames the
directory into place, then points `latest` at it. Until that rename nothing a loader reads has
changed, so a failed or killed save cannot damage the last good checkpoint.
Names read from metadata (`latest`, the manifest) must be plain file names inside the directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

from ..faults import fault_point

FORMAT = "megagpt-sharded-v1"
MANIFEST = "COMPLETE"
LATEST = "latest"
_STEP_DIR = re.compile(r"step_(\d{8})")
_RANK_FILE = re.compile(r"rank_\d{5}\.(safetensors|json)")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or incompatible; the message says which part."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int, ext: str) -> str:
    return f"rank_{rank:05d}.{ext}"


def inside(directory: str, name: str, what: str) -> str:
    """directory/name, refusing names that are not plain file names (path traversal from metadata)."""
    if (not isinstance(name, str) or not name or name in (".", "..") or os.path.basename(name) != name
            or "\\" in name or "\0" in name):
        raise CheckpointError(f"{what}: {name!r} is not a plain file name inside {directory} (refused)")
    path = os.path.join(directory, name)
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(directory):
        raise CheckpointError(f"{what}: {name!r} resolves outside {directory} (refused)")
    return path


def digest(path: str) -> dict:
    """{"size", "sha256"} of a file, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return {"size": os.path.getsize(path), "sha256": h.hexdigest()}


def fsync_path(path: str) -> None:
    """Flush a file's or a directory's entry to disk, so a rename after it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, obj, atomic: bool = False) -> None:
    target = path
    if atomic:
        path = f"{path}.tmp-{os.getpid()}"
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if atomic:
        os.replace(path, target)


def read_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{what}: missing ({path})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what}: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------- saving (rank 0)

def clean_stale(run_dir: str) -> None:
    """Remove directories left by killed saves (they were never visible to a loader). A `.old-`
    copy whose step directory is gone (a save killed between publish's two renames) is the only
    complete copy of that step: it is renamed back instead."""
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if not _STEP_DIR.match(name):
            continue
        if ".old-" in name:
            final = path.split(".old-")[0]
            if not os.path.exists(final):
                os.replace(path, final)
                continue
        if ".tmp-" in name or ".old-" in name:
            shutil.rmtree(path, ignore_errors=True)


def write_manifest(tmp_dir: str, step: int, world_size: int) -> None:
    """Rank 0, after every rank has written: COMPLETE lists all 2 * world_size files with their
    size and sha256. Each rank hashed its own safetensors file (it is large); the JSONs are hashed here."""
    files = {}
    for rank in range(world_size):
        meta_name = rank_file(rank, "json")
        meta = read_json(os.path.join(tmp_dir, meta_name), f"{meta_name} of step {step}")
        files[rank_file(rank, "safetensors")] = meta["tensor_file"]
        files[meta_name] = digest(os.path.join(tmp_dir, meta_name))
    write_json(os.path.join(tmp_dir, MANIFEST), {"format": FORMAT, "step": step, "world_size": world_size,
                                                 "files": files})
    fsync_path(tmp_dir)


def publish(run_dir: str, tmp_dir: str, step: int, nonce: str) -> str:
    """Rename the finished tmp directory into place and point `latest` at it."""
    final = os.path.join(run_dir, step_dir_name(step))
    old = None
    if os.path.exists(final):                  # the same step saved again (a resumed run): swap it out
        old = f"{final}.old-{nonce}"
        os.replace(final, old)
        fault_point("republish", step)                  # test hooks (faults.py): inert unless asked
    os.replace(tmp_dir, final)
    fsync_path(run_dir)
    fault_point("publish", step)
    with open(os.path.join(run_dir, f"{LATEST}.tmp-{nonce}"), "w") as f:
        f.write(step_dir_name(step) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.path.join(run_dir, f"{LATEST}.tmp-{nonce}"), os.path.join(run_dir, LATEST))
    fsync_path(run_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def prune(run_dir: str, keep: int, protect: str | None = None) -> None:
    """Keep the newest `keep` complete checkpoints (keep <= 0 keeps all), and always `protect`, the
    one `latest` now names: after resuming from an older step it need not be the newest."""
    if keep <= 0:
        return
    for _, path in complete_checkpoints(run_dir)[:-keep]:
        if protect is None or os.path.abspath(path) != os.path.abspath(protect):
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- finding and checking

def complete_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every step directory with a manifest, oldest first; tmp directories never match."""
    out = []
    for name in os.listdir(run_dir):
        m = _STEP_DIR.fullmatch(name)
        if m and os.path.isfile(os.path.join(run_dir, name, MANIFEST)):
            out.append((int(m.group(1)), os.path.join(run_dir, name)))
    return sorted(out)


def find_checkpoint(path: str) -> str:
    """The step directory to load: `path` itself when it holds a manifest, else the run directory's
    `latest` (when it names a complete checkpoint), else its newest complete checkpoint."""
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return path
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        with open(latest) as f:
            name = f.read().strip()
        if not _STEP_DIR.fullmatch(name):
            raise CheckpointError(f"{latest}: {name!r} is not a step directory name (refused)")
        target = os.path.join(path, name)
        if os.path.isfile(os.path.join(target, MANIFEST)):
            return target
    found = complete_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path}: no complete checkpoint (no step_XXXXXXXX directory with a {MANIFEST} file)")
    return found[-1][1]


def read_manifest(step_dir: str) -> dict:
    """The validated manifest: plain names only, one JSON and one safetensors file per rank, each
    present with its recorded size (a truncated file is caught here, before anything is read)."""
    manifest = read_json(os.path.join(step_dir, MANIFEST), f"{step_dir}/{MANIFEST}")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{step_dir}/{MANIFEST}: not a {FORMAT} manifest")
    files, world = manifest.get("files"), manifest.get("world_size")
    if not isinstance(files, dict) or not isinstance(world, int) or world < 1:
        raise CheckpointError(f"{step_dir}/{MANIFEST}: malformed (needs world_size and files)")
    for name, entry in files.items():
        path = inside(step_dir, name, f"{MANIFEST} file list")
        if not _RANK_FILE.fullmatch(name):
            raise CheckpointError(f"{MANIFEST} file list: {name!r} is not a rank file name (refused)")
        if not os.path.isfile(path):
            raise CheckpointError(f"{step_dir}: {name} is listed in {MANIFEST} but missing")
        size = os.path.getsize(path)
        if size != entry.get("size"):
            raise CheckpointError(f"{step_dir}/{name}: {size} bytes, {MANIFEST} says {entry.get('size')} "
                                  f"(truncated or overwritten)")
    for rank in range(world):
        for ext in ("json", "safetensors"):
            if rank_file(rank, ext) not in files:
                raise CheckpointError(f"{step_dir}/{MANIFEST}: no {rank_file(rank, ext)} for rank {rank} of {world}")
    return manifest


def verify_file(step_dir: str, name: str, manifest: dict) -> None:
    """Compare a file's sha256 with the manifest (catches corruption that keeps the size)."""
    expected = manifest["files"][name]["sha256"]
    actual = digest(inside(step_dir, name, MANIFEST))["sha256"]
    if actual != expected:
        raise CheckpointError(f"{step_dir}/{name}: sha256 {actual[:12]}... does not match {MANIFEST}'s "
                              f"{expected[:12]}... (corrupt file)")
