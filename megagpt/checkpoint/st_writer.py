"""Write a safetensors file tensor by tensor from a header planned up front, so a converter never
holds more than one tensor: the header (names, dtypes, shapes, offsets) is known before any data."""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct

import torch

from .hf import ConversionError

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class SafetensorsWriter:
    """A safetensors file written one tensor at a time. The header (names, dtypes, shapes, offsets) is
    planned before any data, so only the tensor being written is in memory; tensors must then come in
    plan order. The sha256 is computed on the way, for the manifest."""

    def __init__(self, path: str, plan: list[tuple[str, torch.dtype, tuple]], metadata: dict | None = None):
        header, offset = {}, 0
        for key, dtype, shape in plan:
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        if metadata:
            header["__metadata__"] = metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)                 # data starts 8-byte aligned, as safetensors writes it
        self.path, self.plan, self.next = path, plan, 0
        self.file, self.hash, self.size = open(path, "wb"), hashlib.sha256(), 0
        self._emit(struct.pack("<Q", len(blob)) + blob)

    def _emit(self, data) -> None:
        self.file.write(data)
        self.hash.update(data)
        self.size += len(memoryview(data).cast("B"))

    def _claim(self, key: str, dtype, shape: tuple) -> int:
        """Check that (key, dtype, shape) is the next planned tensor; returns its size in bytes."""
        want = self.plan[self.next] if self.next < len(self.plan) else None
        if want != (key, dtype, tuple(shape)):
            raise ConversionError(f"{self.path}: got {(key, dtype, tuple(shape))}, planned {want}")
        self.next += 1
        return math.prod(shape) * torch.empty((), dtype=dtype).element_size()

    def write(self, key: str, t: torch.Tensor) -> None:
        self._claim(key, t.dtype, tuple(t.shape))
        self._emit(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy())

    def write_zeros(self, key: str) -> None:
        """The next planned tensor, all zeros, written without allocating it."""
        _, dtype, shape = self.plan[self.next] if self.next < len(self.plan) else (key, None, ())
        left = self._claim(key, dtype, shape)
        block = bytes(min(left, 1 << 20))
        while left:
            n = min(left, len(block))
            self._emit(memoryview(block)[:n])
            left -= n

    def close(self) -> dict:
        if self.next != len(self.plan):
            raise ConversionError(f"{self.path}: {len(self.plan) - self.next} planned tensors never written")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return {"size": self.size, "sha256": self.hash.hexdigest()}
