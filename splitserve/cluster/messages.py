"""Typed messages between the gateway and workers: msgspec structs over ZeroMQ, never pickle.

Every message is a tagged struct, so a socket decodes into exactly these types or fails.
"""

from __future__ import annotations

import msgspec

from splitserve.engine.sampling_params import SamplingParams


class Msg(msgspec.Struct, tag=True, array_like=True, omit_defaults=True):
    pass


# ---- gateway -> worker ------------------------------------------------------------------------
class AddRequest(Msg):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int


class AbortRequests(Msg):
    request_ids: list[str]
    stopped: bool = False  # True: finished by a stop string (counts as success), not an abort


class Shutdown(Msg):
    pass


# ---- worker -> gateway ------------------------------------------------------------------------
class Ready(Msg):
    worker_id: str
    pid: int
    num_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    load_seconds: float


class TokenOut(Msg):
    request_id: str
    token: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


class Outputs(Msg):
    items: list[TokenOut]


class RequestError(Msg):
    request_id: str
    message: str


class Stats(Msg):
    worker_id: str
    num_waiting: int
    num_running: int
    kv_blocks_used: int
    kv_blocks_free: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    num_preemptions: int
    num_steps: int


ToWorker = AddRequest | AbortRequests | Shutdown
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
