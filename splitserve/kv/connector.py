"""The KV connector: what a worker hands its engine so that the engine can run KV handoffs.

A worker builds one `KVPorts` (how to reach peers, its own inbox address, a poll of its inbox for
placements that arrive between layers) and passes it to `LLMEngine` at construction; the engine
builds both halves from it and owns the handoff:

  * `kv/sender.py` - the prefill side (`KVSender`), shipping each layer as it is computed by the
    transfer's path (`kv/transports.py`);
  * `kv/receiver.py` - the decode side's data plane (`KVReceiver`), landing KV in reserved blocks;
  * `kv/handoff.py` - the decode side's states, timeouts and fence rule (`DecodeHandoff`), pure,
    shared with the simulator;
  * `kv/layout.py` - slots, runs and dtype names of the canonical wire format.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from splitserve.kv.handoff import HandoffTimeouts
from splitserve.kv.layout import paired_runs, slot_runs, token_slots
from splitserve.kv.receiver import KVReceiver
from splitserve.kv.sender import DEFAULT_ARENA_BYTES, KVSender

__all__ = ["KVPorts", "KVReceiver", "KVSender", "paired_runs", "slot_runs", "token_slots"]


@dataclass(frozen=True)
class KVPorts:
    """A worker's means of KV handoff, given to its engine at construction."""

    owner: str  # prefix of the shared-memory segments this worker creates
    send: Callable[[str, list], None]  # (peer inbox address, frames)
    reply_to: str = ""  # this worker's inbox address
    poll_inbox: Callable[[], None] | None = None  # between layers: apply KVPlacements that arrived
    data_host: str | None = None  # open a raw TCP KV data port on this host (decode workers)
    secret: bytes = b""  # presented and checked on the raw TCP data channel
    arena_bytes: int = DEFAULT_ARENA_BYTES
    timeouts: HandoffTimeouts = HandoffTimeouts()
    clock: Callable[[], float] = time.monotonic
