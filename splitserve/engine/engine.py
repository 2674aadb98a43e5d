"""The synchronous engine: scheduler + runner + model, one `step()` at a time.

Everything asynchronous (HTTP, worker processes) wraps this object; tests drive it directly.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import torch

from splitserve.cluster.messages import FailureReason
from splitserve.config import EngineConfig, SchedulerConfig
from splitserve.engine.request import Request, RequestStatus
from splitserve.engine.runner import ModelRunner, kv_bytes_per_token
from splitserve.engine.sampler import TokenLogprobs
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import Scheduler
from splitserve.kv.handoff import Abort, DecodeHandoff, HandoffTimeouts, Reserve, RxState, WriterGone
from splitserve.kv.handoff import apply_scheduler_actions
from splitserve.models.llama import LlamaModel
from splitserve.models.loader import iter_weights, load_arch_config
from splitserve.models.registry import resolve_model_path
from splitserve.structured.gate import DecodeAdmission, GrammarGate

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_GB = 2.0
DEFAULT_MAX_MODEL_LEN = 8192


@dataclass(slots=True)
class StepOutput:
    request_id: str
    new_token: int | None
    logprobs: TokenLogprobs | None
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    remote: bool = False  # prefill worker: first token out, decode continues elsewhere
    # with the first token of a request that asked for them: [(position, logprob)], positions 1..n-1
    prompt_logprobs: list[tuple[int, TokenLogprobs]] | None = None


def resolve_dtype(name: str, device: torch.device, config_dtype: str | None) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.float16 if config_dtype == "float16" else torch.bfloat16
    # On CPU: bf16 where the chip has native bf16 dot products, else float32.
    return torch.bfloat16 if torch.backends.mkldnn.is_available() and _cpu_has_bf16() else torch.float32


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer_eos: frozenset[int] = frozenset(),
                 kv_cache_segment: str | None = None, kv=None) -> None:
        """`kv_cache_segment`: on CPU, keep the KV cache in this shared-memory segment (created
        here, removed by `close()`) so a same-host prefill worker can write into it directly.
        `kv`: a worker's `KVPorts` (splitserve.kv.connector): the engine then runs KV handoffs,
        both as the prefill side (KVSender) and as the decode side (DecodeHandoff + KVReceiver)."""
        t0 = time.perf_counter()
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.model_path = resolve_model_path(config.model)
        self.arch = load_arch_config(self.model_path)
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device, self.arch.torch_dtype)
        max_len = config.max_model_len or min(self.arch.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
        if self.arch.sliding_window:
            # We do not implement windowed attention; within the window it is plain attention.
            max_len = min(max_len, self.arch.sliding_window)
        self.max_model_len = max_len
        self.model = LlamaModel(self.arch, iter_weights(self.model_path, self.dtype), self.dtype, self.device, max_len)
        num_blocks = self._num_kv_blocks()
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=max_len,
            block_size=config.block_size,
            num_blocks=num_blocks,
            enable_prefix_caching=config.enable_prefix_caching,
            max_waiting=config.max_waiting,
        ))
        self.kv_segment = None
        if kv_cache_segment and self.device.type == "cpu":
            from splitserve.kv import shm

            nbytes = kv_bytes_per_token(self.model) * config.block_size * num_blocks
            try:
                self.kv_segment = shm.Segment(kv_cache_segment, size=nbytes, reserve=True)
            except OSError as exc:  # e.g. a container's small /dev/shm: KV still moves, with a staging copy
                log.warning("KV cache stays private (%.2f GB in %s: %s); same-host transfers use the arena",
                            nbytes / 1e9, shm.SHM_DIR, exc)
        self.runner = ModelRunner(self.model, num_blocks, config.block_size,
                                  kv_storage=self.kv_segment.buf if self.kv_segment else None)
        self.eos_token_ids = frozenset(self.arch.eos_token_ids) | tokenizer_eos
        self._init_kv(kv)
        self.grammars = GrammarGate(self.model_path, self.arch.vocab_size, self.eos_token_ids, clock=self.clock)
        # a decode worker's request whose KV lands before its grammar compiled waits in the gate
        self._handoff_scheduler = DecodeAdmission(self.scheduler, self.grammars)
        self._prompt_logprobs: dict[str, dict[int, TokenLogprobs]] = {}  # until the first token
        self._rng = random.Random(config.seed)
        self.num_steps = 0
        self.step_seconds = 0.0  # wall time inside step(), summed
        self.decode_steps = 0  # steps whose every chunk is one token, and their share of step_seconds
        self.decode_step_seconds = 0.0
        self.step_tokens = 0  # tokens computed, summed over steps (the autoscaler's cost model: time per token)
        self.decode_step_tokens = 0  # of them in decode-only steps (= sequences: the mean decode batch)
        self.load_seconds = time.perf_counter() - t0
        log.info("engine ready in %.2fs: %s, %s on %s, %d KV blocks of %d tokens, max_model_len=%d",
                 self.load_seconds, self.arch.family, self.dtype, self.device, num_blocks, config.block_size, max_len)

    def _init_kv(self, kv) -> None:
        self.kv_sender = self.kv_receiver = None
        self.clock = kv.clock if kv is not None else time.monotonic
        self.handoff = DecodeHandoff(kv.timeouts if kv is not None else HandoffTimeouts())
        if kv is None:
            return
        from splitserve.kv.receiver import KVReceiver
        from splitserve.kv.sender import KVSender

        caches, bs = self.runner.kv_caches, self.config.block_size
        self.kv_sender = KVSender(kv.owner, caches, bs, kv.send, reply_to=kv.reply_to, arena_bytes=kv.arena_bytes,
                                  timeouts=kv.timeouts, secret=kv.secret, poll_inbox=kv.poll_inbox, clock=kv.clock)
        self.kv_receiver = KVReceiver(self.handoff, self.scheduler.block_manager.blocks_of, caches, bs, send=kv.send,
                                      shared_cache=self.kv_segment.name if self.kv_segment else None,
                                      reply_to=kv.reply_to, data_host=kv.data_host, secret=kv.secret, clock=kv.clock)

    def _num_kv_blocks(self) -> int:
        need = -(-self.max_model_len // self.config.block_size)
        if self.config.num_kv_blocks is not None:
            if self.config.num_kv_blocks < need:
                raise ValueError(f"num_kv_blocks={self.config.num_kv_blocks} cannot hold one request of "
                                 f"max_model_len={self.max_model_len} ({need} blocks)")
            return self.config.num_kv_blocks
        per_block = kv_bytes_per_token(self.model) * self.config.block_size
        gb = self.config.kv_cache_memory_gb
        if gb is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            gb = 0.8 * free / 1e9
        if gb is None:
            gb = DEFAULT_CPU_KV_GB
        num_blocks = int(gb * 1e9 // per_block)
        if num_blocks < need:
            raise ValueError(f"KV cache of {gb} GB holds {num_blocks} blocks; one request of "
                             f"max_model_len={self.max_model_len} needs {need}")
        return num_blocks

    # ---- requests --------------------------------------------------------------------------
    def make_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     seed: int | None = None, output_token_ids: list[int] | None = None,
                     prefill_only: bool = False) -> Request:
        vocab = self.arch.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids) or any(not 0 <= t < vocab for t in output_token_ids or ()):
            raise ValueError(f"token ids must be in [0, {vocab})")
        if seed is None:
            seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        req = Request(request_id, prompt_token_ids, params, self.eos_token_ids, seed=seed,
                      output_token_ids=output_token_ids, prefill_only=prefill_only)
        self.grammars.attach(req)
        return req

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    seed: int | None = None, output_token_ids: list[int] | None = None,
                    resumed: bool = False) -> Request:
        """`resumed`: placed again after a fault elsewhere: queued ahead of new requests."""
        req = self.make_request(request_id, prompt_token_ids, params, seed, output_token_ids)
        self.grammars.admit_when_ready(req, lambda: self.scheduler.add_request(req, resumed))
        return req

    def add_prefill_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, seed: int,
                            dest_addr: str, send_from: int, transport: str,
                            output_token_ids: list[int] | None = None, data_addr: str = "",
                            resumed: bool = False, dest_pid: int = 0) -> Request:
        """Prefill here and stream the KV of tokens [send_from, end) to a decode worker."""
        req = self.make_request(request_id, prompt_token_ids, params, seed, output_token_ids, prefill_only=True)
        if not 0 <= send_from < req.num_tokens:
            raise ValueError("send_from must be inside the prompt")

        def admit() -> None:
            try:
                self.scheduler.add_request(req, resumed)
            except ValueError:
                self.kv_sender.abort(request_id)  # its decode side may have offered blocks: it hears KVStopped
                raise
            self.kv_sender.add(request_id, dest_addr, send_from, transport, req.num_tokens, data_addr, dest_pid)

        self.grammars.admit_when_ready(req, admit)
        return req

    # ---- the decode side of a KV handoff (the engine alone reserves and admits) --------------
    def reserve_kv(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, seed: int,
                   reuse_tokens: int, output_token_ids: list[int] | None = None, prefill_addr: str = "",
                   prefill_pid: int = 0, transport: str = "") -> list[tuple[str, FailureReason]]:
        """Blocks for KV a prefill worker is computing. Raises ValueError when it can never work
        (bad ids, too long); returns failures to report (the prefix it should reuse is gone).
        With a shared cache and an shm transport, the prefill worker at `prefill_addr` is told
        where to write (KVPlacement) once blocks are held."""
        req = self.make_request(request_id, prompt_token_ids, params, seed, output_token_ids)
        if req.num_tokens >= self.max_model_len:
            raise ValueError(f"prompt of {req.num_tokens} tokens does not fit max_model_len={self.max_model_len}")
        if reuse_tokens % self.config.block_size or not 0 <= reuse_tokens < req.num_tokens:
            raise ValueError("reuse_tokens must be a multiple of the block size inside the prompt")
        if request_id in self.scheduler.requests or self.handoff.state(request_id) not in (None, RxState.EARLY):
            raise ValueError(f"duplicate request id {request_id!r}")
        writer = self.kv_receiver.expect(request_id, prefill_addr if transport == "shm" else "", prefill_pid)
        event = Reserve(request_id, req, reuse_tokens, len(self.runner.kv_caches), writer)
        return self._run_handoff(self.handoff.on(event, self.clock()))

    def on_kv_message(self, msg, frames: tuple = ()) -> list[tuple[str, FailureReason]]:
        """A KVChunk, PrefillDone or KVStopped from a prefill worker. Returns failures to report."""
        return self._run_handoff(self.kv_receiver.on_message(msg, frames))

    def poll_transfers(self) -> list[tuple[str, FailureReason]]:
        """Retry reservations, admit complete transfers, time out stalls, lift fences whose writer
        is gone. Returns (request id, reason) of transfers that failed: the caller reports them."""
        if self.kv_receiver is None:
            return []
        now = self.clock()
        actions = self.handoff.tick(now)
        for rid in self.kv_receiver.writers_gone(self.handoff.fenced()):
            actions += self.handoff.on(WriterGone(rid), now)
        failed = self._run_handoff(actions)
        self.kv_receiver.expire()
        return failed

    def _run_handoff(self, actions) -> list[tuple[str, FailureReason]]:
        rest = apply_scheduler_actions(self._handoff_scheduler, self.handoff, actions, self.clock())
        return self.kv_receiver.execute(rest) if rest else []

    def abort_request(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> bool:
        self._prompt_logprobs.pop(request_id, None)
        found = False
        parked = self.grammars.drop(request_id)  # waiting for its grammar
        if self.kv_receiver is not None:
            found = self.handoff.state(request_id) not in (None, RxState.DROPPED, RxState.FAILED)
            self._run_handoff(self.handoff.on(Abort(request_id), self.clock()))
            if self.handoff.is_fenced(request_id):
                return True  # its blocks stay until the prefill worker can no longer write them
        if self.kv_sender is not None:
            self.kv_sender.abort(request_id)
        return self.scheduler.finish(request_id, status) is not None or found or parked

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.grammars.waiting)

    # ---- stepping --------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        t0 = time.perf_counter()
        if self.grammars.waiting:
            self.grammars.admit_ready()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        tables = self.scheduler.block_manager.req_blocks
        sender = self.kv_sender
        hook = None
        if sender is not None:
            sender.begin_step(plan, tables)
            hook = sender.on_layer if sender.active else None
        try:
            result = self.runner.execute(plan, tables, layer_hook=hook, constrain=self.grammars.constrain)
        finally:
            if sender is not None:
                sender.end_step()
        events = self.scheduler.update(plan, result.sampled)
        self.num_steps += 1
        for rid, entries in result.prompt_logprobs.items():
            self._prompt_logprobs.setdefault(rid, {}).update(entries)
        outputs = []
        for e in events:
            req = e.request
            remote = req.status == RequestStatus.FINISHED_REMOTE
            if e.finished and req.prefill_only and sender is not None:
                sender.finish(req.request_id, e.new_token if remote else None)
            prompt_lps = self._prompt_logprobs.pop(req.request_id, None)
            outputs.append(StepOutput(
                req.request_id, e.new_token, result.logprobs.get(req.request_id), e.finished,
                req.finish_reason if e.finished else None, req.stop_reason,
                req.num_prompt_tokens, max(req.num_cached_tokens, 0), remote,
                sorted(prompt_lps.items()) if prompt_lps else None,
            ))
        dt = time.perf_counter() - t0
        self.step_seconds += dt  # busy time: what a simulated step models
        self.step_tokens += plan.num_tokens
        if plan.num_tokens == len(plan.items):  # every chunk one token: decode only
            self.decode_steps += 1
            self.decode_step_seconds += dt
            self.decode_step_tokens += plan.num_tokens
        return outputs

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.grammars.waiting)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Offline convenience: run prompts to completion, return output token ids in order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = []
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            rid = f"gen-{self.num_steps}-{i}-{self._rng.getrandbits(32)}"
            self.add_request(rid, p, sp)
            ids.append(rid)
        outputs: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for out in self.step():
                if out.request_id in outputs and out.new_token is not None:
                    outputs[out.request_id].append(out.new_token)
        return [outputs[rid] for rid in ids]

    def is_idle(self) -> bool:
        busy_transfers = (self.kv_sender is not None and self.kv_sender.num_pending) or self.handoff.busy
        return (self.scheduler.is_idle() and not busy_transfers and not self._prompt_logprobs
                and not self.grammars.waiting)

    def close(self) -> None:
        """End every transfer, close both KV halves, stop grammar compiles, remove the shared KV
        cache segment (the mapping goes with the last tensor view)."""
        self.grammars.close()
        if self.kv_receiver is not None:
            self._run_handoff(self.handoff.close(self.clock()))
            self.kv_receiver.close()
        if self.kv_sender is not None:
            self.kv_sender.close()
        if self.kv_segment is not None:
            self.kv_segment.unlink()
            self.kv_segment.close()
            self.kv_segment = None

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()
        s = self.scheduler
        self.grammars.check_integrity([*s.running, *s.waiting, *s.kv_ready])
