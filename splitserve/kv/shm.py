"""Named shared-memory segments for KV handoff between processes on one host.

A plain file in /dev/shm mapped with mmap: no resource tracker, no pickling, and a name that
tells whose it is (`splitserve-<cluster>-<request>`), so a janitor can remove what a dead
worker left behind.
"""

from __future__ import annotations

import glob
import mmap
import os
import re

SHM_DIR = "/dev/shm"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def segment_name(cluster_id: str, request_id: str) -> str:
    return f"splitserve-{_SAFE.sub('_', cluster_id)}-{_SAFE.sub('_', request_id)}"


def _path(name: str) -> str:
    if "/" in name or not name.startswith("splitserve-"):
        raise ValueError(f"bad segment name {name!r}")
    return os.path.join(SHM_DIR, name)


class Segment:
    """A mapped segment. The creator sizes it; a reader maps what exists."""

    def __init__(self, name: str, size: int | None = None) -> None:
        self.name = name
        path = _path(name)
        if size is not None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, max(size, 1))
            except BaseException:
                os.close(fd)
                os.unlink(path)
                raise
        else:
            fd = os.open(path, os.O_RDWR)
        try:
            self.size = os.fstat(fd).st_size
            self.buf = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)

    def close(self) -> None:
        try:
            self.buf.close()
        except BufferError:
            pass  # a tensor view is still alive; the mapping goes with it

    def unlink(self) -> None:
        unlink(self.name)


def unlink(name: str) -> None:
    try:
        os.unlink(_path(name))
    except FileNotFoundError:
        pass


def list_segments(cluster_id: str) -> list[str]:
    prefix = f"splitserve-{_SAFE.sub('_', cluster_id)}-"
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(SHM_DIR, prefix + "*")))


def remove_segments(cluster_id: str, request_prefix: str = "") -> int:
    names = [n for n in list_segments(cluster_id)
             if n.startswith(segment_name(cluster_id, request_prefix)) or not request_prefix]
    for n in names:
        unlink(n)
    return len(names)
