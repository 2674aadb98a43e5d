"""Chained content hashes of full KV blocks, the key of the prefix cache.

Block i's hash covers its tokens and block i-1's hash, so equal hashes mean equal prefixes.
A cryptographic hash (not Python's `hash`) keeps one tenant from forging a collision with
another tenant's prefix, and gives the same value in every process, which the router needs.

Block i's hash is BLAKE2b-128 of hash(i-1) followed by the block's token ids as int64 in the
machine's byte order, with `ROOT_HASH` before the first block.
"""

from __future__ import annotations

from array import array
from hashlib import blake2b

ROOT_HASH = b"splitserve-kv-v1"


_EMPTY = blake2b(digest_size=16)  # copying a fresh state is cheaper than building one


def _token_bytes(token_ids) -> bytes:
    if type(token_ids) is array and token_ids.typecode == "q":  # the simulator's token arrays
        return token_ids.tobytes()
    return array("q", token_ids).tobytes()


def block_hashes_for(token_ids, block_size: int, known: list[bytes] | None = None) -> list[bytes]:
    """Hashes of every full block of token_ids (a list of ints or an array("q")), extending
    `known` (a prefix of the answer) in place.

    The new blocks' tokens become bytes in one call; each block then costs one hash state copy,
    one update and a digest."""
    hashes = known if known is not None else []
    first = len(hashes)
    num_full = len(token_ids) // block_size
    if first >= num_full:
        return hashes
    parent = hashes[-1] if hashes else ROOT_HASH
    data = _token_bytes(token_ids[first * block_size : num_full * block_size])
    step = block_size * 8
    copy = _EMPTY.copy
    append = hashes.append
    for off in range(0, len(data), step):
        h = copy()
        h.update(parent + data[off : off + step])
        parent = h.digest()
        append(parent)
    return hashes
