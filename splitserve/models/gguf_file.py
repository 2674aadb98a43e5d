"""A small, fast GGUF reader: metadata and tensor views, nothing else.

`gguf.GGUFReader` builds a numpy object per array element, which takes seconds on a
49k-token vocabulary; this parses the header with `struct` in tens of milliseconds and leaves
the tensor bytes memory-mapped. Dequantization is delegated to the `gguf` package.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


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
        self._buf = memoryview(self._mm)
        self._pos = 0
        if bytes(self._buf[:4]) != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        self._pos = 4
        self.version = self._scalar("I")
        if self.version < 2:
            raise ValueError(f"GGUF version {self.version} is not supported")
        n_tensors, n_kv = self._scalar("Q"), self._scalar("Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._scalar("I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._scalar("I")
            dims = struct.unpack_from(f"<{n_dims}Q", self._buf, self._pos)
            self._pos += 8 * n_dims
            ggml_type, offset = self._scalar("I"), self._scalar("Q")
            infos.append((name, dims, ggml_type, offset))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // align) * align
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, ggml_type, offset in infos:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            n_elems = int(np.prod(dims))
            nbytes = n_elems // block * type_size
            start = data_start + offset
            self.tensors[name] = GGUFTensor(name, tuple(reversed(dims)), ggml_type, self._mm[start : start + nbytes])

    def _scalar(self, fmt: str):
        (v,) = struct.unpack_from("<" + fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return v

    def _string(self) -> str:
        n = self._scalar("Q")
        s = bytes(self._buf[self._pos : self._pos + n]).decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, vtype: int):
        if vtype in _SCALARS:
            return self._scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            item_type, count = self._scalar("I"), self._scalar("Q")
            if item_type in _SCALARS and item_type != 7:
                fmt = _SCALARS[item_type]
                size = struct.calcsize(fmt)
                arr = np.frombuffer(self._buf, dtype=np.dtype("<" + fmt), count=count, offset=self._pos)
                self._pos += size * count
                return arr.tolist()
            return [self._value(item_type) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {vtype}")
