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
from typing import Callable

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

    def __init__(self, name: str, size: int | None = None, populate: bool = False, reserve: bool = False) -> None:
        """`populate` faults every page in at creation, so later copies run at memory speed
        instead of paying a page fault per 4 KiB. `reserve` allocates the memory now (OSError when
        /dev/shm cannot hold it) instead of failing with SIGBUS on first touch later."""
        self.name = name
        path = _path(name)
        if size is not None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, max(size, 1))
                if reserve:
                    os.posix_fallocate(fd, 0, max(size, 1))
            except BaseException:
                os.close(fd)
                os.unlink(path)
                raise
        else:
            fd = os.open(path, os.O_RDWR)
        try:
            self.size = os.fstat(fd).st_size
            flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
            self.buf = mmap.mmap(fd, self.size, flags=flags)
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


LONG_LIVED = ("-arena-", "-kvcache-")  # a worker's arena or KV cache, not a request's segment


def list_segments(cluster_id: str, arenas: bool = True) -> list[str]:
    """One cluster's segments, or every splitserve segment on the host when cluster_id is "".
    `arenas=False` leaves out the long-lived ones (arenas, shared KV caches): per-request only."""
    prefix = f"splitserve-{_SAFE.sub('_', cluster_id)}-" if cluster_id else "splitserve-"
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(SHM_DIR, prefix + "*")))
    return names if arenas else [n for n in names if not any(tag in n for tag in LONG_LIVED)]


def remove_segments(cluster_id: str, request_prefix: str = "") -> int:
    names = [n for n in list_segments(cluster_id)
             if n.startswith(segment_name(cluster_id, request_prefix)) or not request_prefix]
    for n in names:
        unlink(n)
    return len(names)


class Arena:
    """A long-lived, pre-faulted segment carved into per-transfer regions (first fit, page aligned).

    The prefill side writes a transfer's KV into its region; the decode side maps the arena once
    and copies from it, possibly long after (it may wait for blocks). A region returns to the free
    list only when its reader can no longer read it: the decode side released it (done or gave up),
    or its reader process is gone. Never by age: a region reused while its reader still copies
    from it would hand that reader another request's KV.
    """

    ALIGN = 4096

    def __init__(self, name: str, size: int) -> None:
        self.segment = Segment(name, size=size, populate=True)
        self.name = name
        self.size = self.segment.size
        self.free: list[tuple[int, int]] = [(0, self.size)]  # (offset, length), sorted by offset
        self.allocs: dict[str, tuple[int, int, int]] = {}  # key -> (offset, length, reader pid or 0)

    def alloc(self, key: str, nbytes: int, reader_pid: int = 0) -> int | None:
        """A region for `key`, read by process `reader_pid` (0: not known yet); None when full."""
        need = -(-nbytes // self.ALIGN) * self.ALIGN
        for i, (off, length) in enumerate(self.free):
            if length >= need:
                if length == need:
                    del self.free[i]
                else:
                    self.free[i] = (off + need, length - need)
                self.allocs[key] = (off, need, reader_pid)
                return off
        return None

    def release(self, key: str) -> bool:
        a = self.allocs.pop(key, None)
        if a is None:
            return False
        off, length, _ = a
        self.free.append((off, length))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for o, n in self.free:
            if merged and merged[-1][0] + merged[-1][1] == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((o, n))
        self.free = merged
        return True

    def set_reader(self, key: str, pid: int) -> None:
        a = self.allocs.get(key)
        if a is not None and pid and not a[2]:
            self.allocs[key] = (a[0], a[1], pid)

    def reclaim(self, reader_gone: Callable[[int], bool]) -> list[str]:
        """Free the regions whose reader process is gone; a region of an unknown reader stays."""
        orphans = [k for k, (_, _, pid) in self.allocs.items() if pid and reader_gone(pid)]
        for k in orphans:
            self.release(k)
        return orphans

    @property
    def bytes_in_use(self) -> int:
        return sum(n for _, n, _ in self.allocs.values())

    def close(self) -> None:
        self.segment.close()
        self.segment.unlink()
