"""Typed messages between the gateway and workers: msgspec structs over ZeroMQ, never pickle.

Every message is a tagged struct, so a socket decodes into exactly these types or fails. Every
frame travels as [cluster secret, message (, payload)]; a receiver drops frames whose secret
does not match, so a stray or hostile peer on the network cannot drive a worker.
"""

from __future__ import annotations

import hmac

import msgspec

from splitserve.engine.sampling_params import SamplingParams


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


class ReserveKV(Msg):
    """Reserve blocks for a request whose KV a prefill worker is about to send."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    reuse_tokens: int  # take tokens [0, reuse_tokens) from the local prefix cache
    output_token_ids: list[int] = []


class AbortRequests(Msg):
    request_ids: list[str]
    stopped: bool = False  # True: finished by a stop string (counts as success), not an abort


class Shutdown(Msg):
    pass


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


class PrefillDone(Msg):
    request_id: str
    first_token: int
    num_layers: int
    token_end: int  # KV covers tokens [send_from, token_end)


class KVRelease(Msg):
    """Decode side -> prefill side: done with (or gave up on) this request's arena region."""

    request_id: str


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


class Outputs(Msg):
    worker_id: str
    items: list[TokenOut]


class RequestError(Msg):
    request_id: str
    message: str
    worker_id: str = ""
    retryable: bool = False  # a transfer failed or timed out: place the request again


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


ToWorker = AddRequest | PrefillRequest | ReserveKV | AbortRequests | Shutdown | KVChunk | PrefillDone | KVRelease
FromWorker = Ready | Outputs | RequestError | Stats

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_from_worker = msgspec.msgpack.Decoder(FromWorker)


def encode(msg: Msg) -> bytes:
    return _encoder.encode(msg)


def decode_to_worker(data: bytes) -> ToWorker:
    return _to_worker.decode(data)


def decode_from_worker(data: bytes) -> FromWorker:
    return _from_worker.decode(data)


def check_secret(frame: bytes, secret: bytes) -> bool:
    return hmac.compare_digest(bytes(frame), secret)
