"""A worker process: one engine, a ZeroMQ inbox and outbox, a loop that steps while there is work.

The gateway spawns it (or, later, it joins from another host). It never unpickles: commands are
msgspec structs. It dies with its parent (PDEATHSIG plus a parent-pid check), so a crashed
gateway leaves no orphan holding memory.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from dataclasses import asdict

from splitserve.config import EngineConfig
from splitserve.cluster import messages as m

log = logging.getLogger("splitserve.worker")

STATS_INTERVAL_S = 0.25
IDLE_POLL_MS = 50


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def worker_main(worker_id: str, engine_config: dict, eos_token_ids: list[int], inbox: str, outbox: str,
                parent_pid: int, log_level: str = "INFO") -> None:
    """Entry point of the spawned process. Arguments are plain data (the spawn pickles only them)."""
    _die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    logging.basicConfig(level=log_level, format=f"%(asctime)s {worker_id} %(levelname)s %(message)s")
    import zmq

    from splitserve.engine.engine import LLMEngine

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(inbox)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(outbox)
    try:
        engine = LLMEngine(EngineConfig(**engine_config), tokenizer_eos=frozenset(eos_token_ids))
    except Exception as exc:  # report, then exit: the gateway turns this into a clear startup error
        log.exception("engine failed to start")
        push.send(m.encode(m.RequestError("", f"engine failed to start: {exc}")))
        push.close()
        ctx.term()
        sys.exit(1)
    bm = engine.scheduler.block_manager
    push.send(m.encode(m.Ready(worker_id, os.getpid(), bm.num_blocks, bm.block_size, engine.max_model_len,
                               engine.arch.vocab_size, engine.load_seconds)))
    WorkerLoop(worker_id, engine, pull, push, parent_pid).run()
    pull.close(0)
    push.close()
    ctx.term()


class WorkerLoop:
    def __init__(self, worker_id: str, engine, pull, push, parent_pid: int) -> None:
        self.worker_id = worker_id
        self.engine = engine
        self.pull = pull
        self.push = push
        self.parent_pid = parent_pid
        self.running = True
        self._last_stats = 0.0

    def run(self) -> None:
        import zmq

        while self.running:
            busy = self.engine.has_unfinished()
            if self.pull.poll(0 if busy else IDLE_POLL_MS, zmq.POLLIN):
                while True:
                    try:
                        data = self.pull.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.handle(data)
            if not self.running:
                break
            if self.engine.has_unfinished():
                outs = self.engine.step()
                if outs:
                    self.push.send(m.encode(m.Outputs([self._token_out(o) for o in outs])))
            self._maybe_send_stats()
            if not busy and os.getppid() != self.parent_pid:
                log.warning("parent gone; exiting")
                break

    def handle(self, data: bytes) -> None:
        try:
            msg = m.decode_to_worker(data)
        except Exception as exc:  # malformed or foreign: drop it, never crash
            log.warning("dropped an undecodable message: %s", exc)
            return
        if isinstance(msg, m.AddRequest):
            try:
                self.engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params, seed=msg.seed)
            except ValueError as exc:
                self.push.send(m.encode(m.RequestError(msg.request_id, str(exc))))
        elif isinstance(msg, m.AbortRequests):
            from splitserve.engine.request import RequestStatus

            status = RequestStatus.FINISHED_STOPPED if msg.stopped else RequestStatus.FINISHED_ABORTED
            for rid in msg.request_ids:
                self.engine.abort_request(rid, status)
        elif isinstance(msg, m.Shutdown):
            self.running = False

    @staticmethod
    def _token_out(o) -> m.TokenOut:
        lp = o.logprobs
        return m.TokenOut(
            o.request_id, o.new_token,
            logprob=lp.token_logprob if lp else None,
            top_logprobs=lp.top if lp else None,
            finish_reason=o.finish_reason,
            stop_reason=o.stop_reason if isinstance(o.stop_reason, int) else None,
            num_prompt_tokens=o.num_prompt_tokens,
            num_cached_tokens=o.num_cached_tokens,
        )

    def _maybe_send_stats(self) -> None:
        now = time.monotonic()
        if now - self._last_stats < STATS_INTERVAL_S:
            return
        self._last_stats = now
        s = self.engine.scheduler
        bm = s.block_manager
        self.push.send(m.encode(m.Stats(
            self.worker_id, s.num_waiting, s.num_running, bm.num_used_blocks, bm.num_free_blocks,
            bm.num_queried_tokens, bm.num_hit_tokens, s.num_preemptions, self.engine.num_steps,
        )))


def engine_config_dict(config: EngineConfig) -> dict:
    return asdict(config)


def main(argv: list[str] | None = None) -> int:
    """`python -m splitserve.cluster.worker --id W --inbox ADDR --outbox ADDR --config JSON`."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="splitserve-worker")
    ap.add_argument("--id", required=True)
    ap.add_argument("--inbox", required=True)
    ap.add_argument("--outbox", required=True)
    ap.add_argument("--config", required=True, help="EngineConfig as JSON")
    ap.add_argument("--eos", default="[]", help="extra EOS token ids as JSON")
    ap.add_argument("--parent-pid", type=int, default=os.getppid())
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    worker_main(args.id, json.loads(args.config), json.loads(args.eos), args.inbox, args.outbox,
                args.parent_pid, args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
