"""Typed messages between the gateway and workers: msgspec structs over ZeroMQ, never pickle.

Every message is a tagged struct, so a socket decodes into exactly these types or fails. Every
frame travels as [message (, payload)] over ZeroMQ CURVE connections that only holders of the
cluster secret can open (cluster/security.py), so a stray or hostile peer cannot drive a worker.
"""

from __future__ import annotations

import enum

import msgspec

from splitserve.engine.sampling_params import SamplingParams


class FailureReason(enum.Enum):
    """Why a worker failed a request; the gateway's retry policy (cluster/orchestrator.py) decides on it."""

    INVALID = "invalid"  # the request can never work (bad ids, too long): the client's error
    PREFIX_EVICTED = "prefix_evicted"  # the prefix the router counted on left the decode cache
    TRANSFER_STALLED = "transfer_stalled"  # KV stopped arriving mid-transfer
    KV_LOST = "kv_lost"  # some KV never arrived (a broken data connection)
    WRITER_STOPPED = "writer_stopped"  # the prefill side ended without finishing the transfer
    WORKER_ERROR = "worker_error"  # an unexpected error on the worker
    WORKER_DIED = "worker_died"  # (gateway) a worker of the attempt died or could not be reached
    QUEUE_FULL = "queue_full"  # the worker's bounded waiting queue is full


class Msg(msgspec.Struct, tag=True, array_like=True, omit_defaults=True):
    pass


# ---- gateway -> worker ------------------------------------------------------------------------
class AddRequest(Msg):
    """Prefill and decode here (aggregated, or conditional local prefill on a decode worker)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    output_token_ids: list[int] = []  # already sent to the client: recomputed, counted as output
    resumed: bool = False  # placed again after a fault: queued ahead of new requests


class PrefillRequest(Msg):
    """Prefill here, stream each layer's KV to `dest_addr`, report the first token to the gateway."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    dest_worker: str
    dest_addr: str
    send_from: int  # the decode worker caches tokens [0, send_from) already
    transport: str  # "shm" | "tcp"
    output_token_ids: list[int] = []
    dest_data_addr: str = ""  # tcp: the decode worker's raw KV data port (HOST:PORT), if it has one
    resumed: bool = False  # placed again after a fault: queued ahead of new requests
    dest_pid: int = 0  # same host: the decode worker's process, the reader of its arena regions


class ReserveKV(Msg):
    """Reserve blocks for a request whose KV a prefill worker is about to send."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    reuse_tokens: int  # take tokens [0, reuse_tokens) from the local prefix cache
    output_token_ids: list[int] = []
    prefill_addr: str = ""  # the prefill worker's inbox, for a KVPlacement (same host, shm)
    prefill_pid: int = 0  # same host: lets the decode side tell when a writer can no longer write
    transport: str = ""


class AbortRequests(Msg):
    request_ids: list[str]
    stopped: bool = False  # True: finished by a stop string (counts as success), not an abort


class Shutdown(Msg):
    pass


class Welcome(Msg):
    """The gateway took this worker's Ready: it stops announcing itself."""

    worker_id: str


# ---- prefill worker -> decode worker ----------------------------------------------------------
class KVChunk(Msg):
    """Canonical KV wire format: one layer, a run of tokens; K is [tokens, heads, head_dim], V the same.

    K and V are in shared memory (`shm_name` at `k_offset` and `v_offset`) or in the next two
    frames (TCP). Positions are absolute token indices and dtype and shape travel with the data,
    so the two sides may differ in block size and dtype.
    """

    request_id: str
    layer: int
    token_start: int
    num_tokens: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    reply_to: str = ""  # the sender's inbox, for KVRelease
    shm_name: str | None = None
    arena: bool = False  # shm_name is the sender's long-lived arena (release it) or a one-off segment (unlink it)
    k_offset: int = 0
    v_offset: int = 0
    direct: bool = False  # already written into the receiver's own cache (after a KVPlacement)
    num_layers_covered: int = 1  # a direct notice covers layers [layer, layer + num_layers_covered)


class KVStopped(Msg):
    """Prefill side -> decode side: no more writes for this request (it ended without PrefillDone)."""

    request_id: str


class PrefillDone(Msg):
    request_id: str
    first_token: int
    num_layers: int
    token_end: int  # KV covers tokens [send_from, token_end)
    send_seconds: float = 0.0  # time the sender spent moving this request's KV (not queue or prefill)


class KVRelease(Msg):
    """Decode side -> prefill side: done with (or gave up on) this request's arena region."""

    request_id: str


class KVPlacement(Msg):
    """Decode side -> prefill side, same host: write this request's KV straight into my cache.

    The decode worker's KV cache is a shared-memory segment, [layers, 2, slots, heads, head_dim];
    `block_ids` are the blocks reserved for the request. The prefill worker copies each computed
    layer into those slots (one copy, no staging) and sends a `direct` KVChunk notice. It must end
    every placed transfer with PrefillDone or KVStopped: until then the decode side keeps the
    blocks, so a late write can never land in a block handed to someone else.
    """

    request_id: str
    cache_name: str
    num_layers: int
    num_slots: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int
    block_ids: list[int]
    reply_to: str  # the decode worker's inbox
    pid: int = 0  # the decode worker's process: its cache is unmapped here once it is gone


# ---- worker -> gateway ------------------------------------------------------------------------
class Ready(Msg):
    worker_id: str
    pid: int
    role: str
    address: str
    num_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    load_seconds: float
    host: str = ""
    kv_data_addr: str = ""  # HOST:PORT of its raw TCP KV data port


class Heartbeat(Msg):
    """Sent by a worker's heartbeat thread every HEARTBEAT_INTERVAL_S, also during long steps."""

    worker_id: str
    pid: int


class TokenOut(Msg):
    request_id: str
    token: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    remote: bool = False  # a prefill worker's first token; decode continues elsewhere
    # echo + logprobs: (position, logprob, top) for prompt positions 1..n-1, with the first token
    prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None


class Outputs(Msg):
    worker_id: str
    items: list[TokenOut]


class RequestError(Msg):
    request_id: str
    message: str
    worker_id: str = ""
    reason: FailureReason = FailureReason.INVALID


class Stats(Msg):
    worker_id: str
    num_waiting: int
    num_running: int
    num_waiting_for_kv: int
    kv_blocks_used: int
    kv_blocks_free: int
    queued_prefill_tokens: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    num_preemptions: int
    num_steps: int
    kv_bytes_sent: int = 0
    kv_bytes_received: int = 0
    kv_transfer_seconds: float = 0.0  # summed over completed incoming transfers
    kv_transfers_done: int = 0
    kv_transfers_failed: int = 0
    active_transfers: int = 0
    kv_events: list[tuple[str, bytes]] = []
    kv_bytes_direct: int = 0  # moved with no staging copy: shm writes into a peer's cache, TCP into ours
    step_seconds: float = 0.0  # wall time inside engine steps, summed (busy time)
    decode_steps: int = 0  # steps whose every chunk is one token
    decode_step_seconds: float = 0.0
    step_tokens: int = 0  # tokens computed in all steps (with step_seconds: the cost per token)
    decode_step_tokens: int = 0  # of them in decode-only steps (/ decode_steps: the mean decode batch)
    loop_overhead_seconds: float = 0.0  # worker loop time around steps taken back to back (outside step_seconds)
    loop_overhead_steps: int = 0


ToWorker = (AddRequest | PrefillRequest | ReserveKV | AbortRequests | Shutdown | KVChunk | PrefillDone | KVRelease
            | KVPlacement | KVStopped | Welcome)
FromWorker = Ready | Outputs | RequestError | Stats | Heartbeat

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_from_worker = msgspec.msgpack.Decoder(FromWorker)


def encode(msg: Msg) -> bytes:
    return _encoder.encode(msg)


def decode_to_worker(data: bytes) -> ToWorker:
    return _to_worker.decode(data)


def decode_from_worker(data: bytes) -> FromWorker:
    return _from_worker.decode(data)

