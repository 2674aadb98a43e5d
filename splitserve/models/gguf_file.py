"""A small, fast GGUF reader: metadata and tensor views, nothing else.

`gguf.GGUFReader` builds a numpy object per array element, which takes seconds on a
49k-token vocabulary; this parses the header with `struct` in tens of milliseconds and leaves
the tensor bytes memory-mapped. Dequantization is delegated to the `gguf` package. The
tokenizer reads its metadata with `read_gguf_metadata` (the same parser, header only).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Reads GGUF's little-endian header values from a buffer, advancing a position."""

    def __init__(self, buf, path: str) -> None:
        self.buf, self.path, self.pos = buf, path, 0

    def scalar(self, fmt: str):
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.scalar("Q")
        s = str(self.buf[self.pos : self.pos + n], "utf-8", "replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ValueError(f"{self.path}: unknown GGUF value type {vtype}")
        item_type, count = self.scalar("I"), self.scalar("Q")
        if item_type in _SCALARS:
            fmt = _SCALARS[item_type]
            values = list(struct.unpack_from(f"<{count}{fmt}", self.buf, self.pos))
            self.pos += count * struct.calcsize(fmt)
            return values
        if item_type == _STRING:  # a vocabulary: tens of thousands of strings, so no call per item
            buf, pos, unpack, out = self.buf, self.pos, struct.unpack_from, []
            append = out.append
            for _ in range(count):
                (n,) = unpack("<Q", buf, pos)
                append(str(buf[pos + 8 : pos + 8 + n], "utf-8", "replace"))
                pos += 8 + n
            self.pos = pos
            return out
        return [self.value(item_type) for _ in range(count)]

    def skip(self, vtype: int) -> None:
        if vtype in _SCALARS:
            self.pos += struct.calcsize(_SCALARS[vtype])
        elif vtype == _STRING:
            self.pos += 8 + self.scalar("Q")
        elif vtype == _ARRAY:
            item_type, count = self.scalar("I"), self.scalar("Q")
            if item_type in _SCALARS:
                self.pos += count * struct.calcsize(_SCALARS[item_type])
            else:
                for _ in range(count):
                    self.skip(item_type)
        else:
            raise ValueError(f"{self.path}: unknown GGUF value type {vtype}")


def _read_header(cur: _Cursor, prefixes: tuple[str, ...] | None) -> tuple[int, dict[str, Any]]:
    """Magic, version and the key/value section; returns (tensor count, metadata). Keys outside
    `prefixes` (None: all) are skipped without decoding their values."""
    if bytes(cur.buf[:4]) != GGUF_MAGIC:
        raise ValueError(f"{cur.path} is not a GGUF file (bad magic)")
    cur.pos = 4
    version = cur.scalar("I")
    if version not in (2, 3):
        raise ValueError(f"{cur.path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.scalar("I")
        if prefixes is None or key.startswith(prefixes):
            metadata[key] = cur.value(vtype)
        else:
            cur.skip(vtype)
    return n_tensors, metadata


def read_gguf_metadata(path: str, prefixes: Sequence[str] | None = ("general.", "tokenizer.")) -> dict[str, Any]:
    """The metadata of a GGUF file whose keys start with one of `prefixes` (None: every key).
    Only the header is read (through mmap); the tensors are never touched."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _read_header(_Cursor(buf, path), None if prefixes is None else tuple(prefixes))[1]


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first), i.e. GGUF dims reversed
    ggml_type: int
    data: np.ndarray  # raw bytes (uint8), memory-mapped

    def to_numpy(self) -> np.ndarray:
        """Dequantized float32 array of `shape`."""
        from gguf.quants import dequantize
        from gguf.constants import GGMLQuantizationType

        qtype = GGMLQuantizationType(self.ggml_type)
        if qtype == GGMLQuantizationType.F32:
            return self.data.view(np.float32).reshape(self.shape)
        if qtype == GGMLQuantizationType.F16:
            return self.data.view(np.float16).reshape(self.shape).astype(np.float32)
        rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
        return dequantize(self.data.reshape(rows, -1), qtype).reshape(self.shape)


class GGUFFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")
        cur = _Cursor(memoryview(self._mm), path)
        n_tensors, self.metadata = _read_header(cur, None)
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("I")
            dims = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.pos)
            cur.pos += 8 * n_dims
            ggml_type, offset = cur.scalar("I"), cur.scalar("Q")
            infos.append((name, dims, ggml_type, offset))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = -(-cur.pos // align) * align
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, ggml_type, offset in infos:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            n_elems = int(np.prod(dims))
            nbytes = n_elems // block * type_size
            start = data_start + offset
            self.tensors[name] = GGUFTensor(name, tuple(reversed(dims)), ggml_type, self._mm[start : start + nbytes])
