"""A worker process: one engine, a ZeroMQ inbox, a loop that steps while there is work.

Roles are routing hints: every worker can prefill and decode locally, prefill for a peer
(shipping KV layer by layer) and decode a request whose KV a peer sends. The gateway spawns
workers, or a worker joins a running gateway from another host (`splitserve worker --join`).

Every socket is a ZeroMQ CURVE socket keyed from the cluster secret (cluster/security.py): only
cluster members connect, every message is encrypted, every frame size is bounded. Nothing is
unpickled. A heartbeat thread beats to the gateway (cluster/liveness.py). A spawned worker dies
with its parent (PDEATHSIG plus a parent check from the heartbeat thread) and removes its
shared-memory segments first, so a crashed gateway leaves no orphan and no /dev/shm file.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import time

from splitserve.cluster import messages as m
from splitserve.cluster import security
from splitserve.cluster.logthrottle import ThrottledWarning
from splitserve.config import EngineConfig

log = logging.getLogger("splitserve.worker")

STATS_INTERVAL_S = 0.25
IDLE_POLL_MS = 50
TRANSFER_POLL_MS = 2
SECRET_ENV = "SPLITSERVE_CLUSTER_SECRET"


def exit_removing_segments(segment_owner: str) -> None:
    """Remove this worker's shared-memory segments (arena, KV cache, per-request), then exit now.
    Safe from any thread or signal handler: unlinking leaves live mappings intact."""
    from splitserve.kv import shm

    try:
        shm.remove_segments(segment_owner)
    finally:
        os._exit(0)


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Worker:
    def __init__(self, worker_id: str, role: str, make_engine, secret: bytes, ctx, inbox_bind: str,
                 gateway_addr: str, cluster_id: str, parent_pid: int | None) -> None:
        """`make_engine(kv_ports)` builds the engine once the sockets exist: the worker hands it
        what KV handoff needs (peer sends, its inbox address, an inbox poll) at construction."""
        import zmq

        from splitserve.kv.connector import KVPorts
        from splitserve.kv.tcp import data_host

        self.worker_id, self.role, self.secret = worker_id, role, secret
        self.keys = security.derive_keys(secret)
        self.parent_pid = parent_pid
        self.ctx = ctx
        self.heartbeat = None  # started once Ready is sent (run_worker)
        self.inbox = security.secure_server(ctx.socket(zmq.PULL), self.keys, security.MAX_WORKER_MSG_BYTES)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.bind(inbox_bind)
        self.address = self.inbox.getsockopt(zmq.LAST_ENDPOINT).decode()
        if self.address.startswith("tcp://0.0.0.0:"):
            self.address = self.address.replace("0.0.0.0", socket.gethostname())
        self.gateway = security.secure_client(ctx.socket(zmq.PUSH), self.keys)
        self.gateway.setsockopt(zmq.LINGER, 2000)
        self.gateway.connect(gateway_addr)
        self.peers: dict[str, object] = {}
        self.deferred: list = []  # messages read between layers, handled after the step
        try:
            self.engine = engine = make_engine(KVPorts(
                cluster_id, self.send_peer, reply_to=self.address, poll_inbox=self.fetch_placements,
                data_host=data_host(self.address) if role == "decode" else None, secret=secret))
        except BaseException:
            self.inbox.close(0)
            self.gateway.close(0)
            raise
        self.poller = zmq.Poller()  # the inbox, plus the raw KV data sockets while they exist
        self.poller.register(self.inbox, zmq.POLLIN)
        self._polled: dict[int, int] = {}  # raw fd -> registered flags
        if role == "prefill":
            engine.kv_sender.ensure_arena()  # fault its pages in now, not during the first request
        engine.scheduler.block_manager.events = []
        self.running = True
        # Loop iterations that stepped with no idle wait: their time outside the step (polling,
        # sending outputs, stats), so the autoscaler's simulator can charge a step its whole cycle.
        self.loop_overhead_s = 0.0
        self.loop_overhead_steps = 0
        self._last_stats = 0.0
        self.dropped_frames = 0
        self._warn_dropped = ThrottledWarning(log)

    # ---- sockets -------------------------------------------------------------------------
    def to_gateway(self, msg: m.Msg) -> None:
        self.gateway.send(m.encode(msg))

    def send_peer(self, addr: str, frames: list) -> None:
        import zmq

        sock = self.peers.get(addr)
        if sock is None:
            sock = security.secure_client(self.ctx.socket(zmq.PUSH), self.keys, security.MAX_WORKER_MSG_BYTES)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.connect(addr)
            self.peers[addr] = sock
        sock.send_multipart(frames, copy=len(frames) == 1)

    def ready_message(self, load_seconds: float) -> m.Ready:
        e = self.engine
        bm = e.scheduler.block_manager
        data = e.kv_receiver.data
        return m.Ready(self.worker_id, os.getpid(), self.role, self.address, bm.num_blocks, bm.block_size,
                       e.max_model_len, e.arch.vocab_size, load_seconds, socket.gethostname(),
                       data.address if data else "")

    # ---- loop ----------------------------------------------------------------------------
    def run(self) -> None:
        import zmq

        engine = self.engine
        while self.running:
            t_iter = time.perf_counter()
            stepped_s = -1.0
            if self.deferred:
                deferred, self.deferred = self.deferred, []
                for frames in deferred:
                    self.handle(frames)
            busy = engine.has_work()
            transfers = engine.kv_receiver.busy
            timeout = 0 if busy else (TRANSFER_POLL_MS if transfers else IDLE_POLL_MS)
            data_in = engine.kv_receiver.data
            sending = engine.kv_sender.data_waiting()
            for sock, ev in self._poll(data_in, sending, timeout):
                if sock is self.inbox:
                    while True:
                        try:
                            # copy=False: KV payload frames are read in place, not copied into bytes first
                            frames = self.inbox.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self.handle(frames)
                elif sock in sending:  # writable, or an error the flush will find
                    engine.kv_sender.flush_data()
                elif data_in is not None:
                    data_in.pump(sock)
            if not self.running:
                break
            engine.kv_sender.poll()
            self._report_failures(engine.poll_transfers())
            if engine.has_work():
                before = engine.step_seconds
                outs = engine.step()
                stepped_s = engine.step_seconds - before
                if outs:
                    self.to_gateway(m.Outputs(self.worker_id, [self._token_out(o) for o in outs]))
            for rid, message, queue_full in engine.grammars.take_failures():  # compile failed, or no room after it
                reason = m.FailureReason.QUEUE_FULL if queue_full else m.FailureReason.INVALID
                self.to_gateway(m.RequestError(rid, message, self.worker_id, reason))
            self._maybe_send_stats()
            if busy and stepped_s >= 0:
                self.loop_overhead_s += time.perf_counter() - t_iter - stepped_s
                self.loop_overhead_steps += 1
            if not busy and self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.warning("parent gone; exiting")
                break

    def _poll(self, data_in, sending: list[int], timeout: int) -> list:
        """One poll for the inbox and the raw KV data sockets (incoming chunks, queued sends).
        The poller persists; raw fds are (un)registered only when the set changes."""
        import zmq

        want = dict.fromkeys(data_in.fds() if data_in else (), zmq.POLLIN)
        want.update(dict.fromkeys(sending, zmq.POLLOUT))
        if want != self._polled:
            for fd in self._polled.keys() - want.keys():
                self.poller.unregister(fd)
            for fd, flags in want.items():
                if self._polled.get(fd) != flags:
                    self.poller.register(fd, flags)  # registering again updates the flags
            self._polled = want
        return self.poller.poll(timeout)

    def fetch_placements(self) -> None:
        """Between layers of a step: apply KVPlacements now, keep every other message for later."""
        import zmq

        while True:
            try:
                frames = self.inbox.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if frames:
                try:
                    msg = m.decode_to_worker(frames[0].bytes)
                except Exception:
                    msg = None
                if isinstance(msg, m.KVPlacement):
                    self.engine.kv_sender.place(msg)
                    continue
            self.deferred.append(frames)

    def handle(self, frames: list) -> None:
        try:
            msg = m.decode_to_worker(frames[0].bytes)
        except Exception as exc:  # malformed: drop it, never crash
            self.dropped_frames += 1
            self._warn_dropped("dropped an undecodable message: %s", exc)
            return
        e = self.engine
        try:
            if isinstance(msg, (m.KVChunk, m.PrefillDone, m.KVStopped)):
                frames_in = tuple(f.buffer for f in frames[1:])
                self._report_failures(e.on_kv_message(msg, frames_in))
            elif isinstance(msg, m.KVRelease):
                e.kv_sender.release(msg.request_id)
            elif isinstance(msg, m.KVPlacement):
                e.kv_sender.place(msg)
            elif isinstance(msg, m.AddRequest):
                e.add_request(msg.request_id, msg.prompt_token_ids, msg.params, seed=msg.seed,
                              output_token_ids=msg.output_token_ids, resumed=msg.resumed)
            elif isinstance(msg, m.PrefillRequest):
                e.add_prefill_request(msg.request_id, msg.prompt_token_ids, msg.params, msg.seed, msg.dest_addr,
                                      msg.send_from, msg.transport, msg.output_token_ids, msg.dest_data_addr,
                                      resumed=msg.resumed, dest_pid=msg.dest_pid)
            elif isinstance(msg, m.ReserveKV):
                self._report_failures(e.reserve_kv(
                    msg.request_id, msg.prompt_token_ids, msg.params, msg.seed, msg.reuse_tokens,
                    msg.output_token_ids, msg.prefill_addr, msg.prefill_pid, msg.transport))
            elif isinstance(msg, m.AbortRequests):
                from splitserve.engine.request import RequestStatus

                status = RequestStatus.FINISHED_STOPPED if msg.stopped else RequestStatus.FINISHED_ABORTED
                for rid in msg.request_ids:
                    e.abort_request(rid, status)
            elif isinstance(msg, m.Shutdown):
                self.running = False
            elif isinstance(msg, m.Welcome):
                if self.heartbeat is not None:
                    self.heartbeat.welcomed.set()
        except ValueError as exc:
            from splitserve.engine.scheduler import QueueFull

            reason = m.FailureReason.QUEUE_FULL if isinstance(exc, QueueFull) else m.FailureReason.INVALID
            rid = getattr(msg, "request_id", "")
            self.to_gateway(m.RequestError(rid, str(exc), self.worker_id, reason))
        except Exception as exc:  # a bad chunk or similar: fail that request, keep serving
            log.exception("error handling %s", type(msg).__name__)
            rid = getattr(msg, "request_id", "")
            if rid:
                e.abort_request(rid)
                self.to_gateway(m.RequestError(rid, f"worker error: {exc}", self.worker_id,
                                               m.FailureReason.WORKER_ERROR))

    def _report_failures(self, failures) -> None:
        for rid, reason in failures:
            self.to_gateway(m.RequestError(rid, f"KV transfer failed ({reason.value})", self.worker_id, reason))

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
            remote=o.remote,
            prompt_logprobs=[(p, e.token_logprob, e.top) for p, e in o.prompt_logprobs] if o.prompt_logprobs else None,
        )

    def _maybe_send_stats(self) -> None:
        now = time.monotonic()
        if now - self._last_stats < STATS_INTERVAL_S:
            return
        self._last_stats = now
        self.to_gateway(self.stats())

    def stats(self) -> m.Stats:
        e = self.engine
        s = e.scheduler
        bm = s.block_manager
        rx, tx = e.kv_receiver, e.kv_sender
        events, bm.events = bm.events, []
        return m.Stats(
            self.worker_id, s.num_waiting + len(s.kv_ready), s.num_running, len(s.waiting_for_kv) + e.handoff.num_reserving,
            bm.num_used_blocks, bm.num_free_blocks, s.num_waiting_tokens, bm.num_queried_tokens, bm.num_hit_tokens,
            s.num_preemptions, e.num_steps, tx.bytes_sent, rx.bytes_received, rx.transfer_seconds, rx.num_done,
            rx.num_failed, rx.num_active + tx.num_pending, events,
            tx.bytes_direct + (rx.data.bytes_direct if rx.data else 0), e.step_seconds,
            e.decode_steps, e.decode_step_seconds, e.step_tokens, e.decode_step_tokens,
            self.loop_overhead_s, self.loop_overhead_steps,
        )

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.engine.close()
        for sock in self.peers.values():
            sock.close(0)
        self.inbox.close(0)
        self.gateway.close()


def run_worker(worker_id: str, role: str, engine_config: dict, eos_token_ids: list[int], inbox: str,
               gateway_addr: str, cluster_id: str, secret: bytes, parent_pid: int | None) -> int:
    import zmq

    from splitserve.cluster.liveness import HeartbeatThread
    from splitserve.engine.engine import LLMEngine
    from splitserve.kv import shm

    try:
        keys = security.derive_keys(security.check_secret_strength(secret))
    except security.WeakSecretError as exc:
        log.error("%s", exc)
        return 2
    if threading.current_thread() is threading.main_thread():
        # SIGTERM: the gateway died (PDEATHSIG) or an operator asks. Segments first, then out.
        signal.signal(signal.SIGTERM, lambda *_: exit_removing_segments(cluster_id))
    ctx = zmq.Context()
    auth = security.start_authenticator(ctx, keys)
    try:
        t0 = time.perf_counter()

        # A decode worker keeps its CPU KV cache in shared memory: same-host prefill workers write
        # each request's KV straight into its blocks (KVPlacement), one copy instead of two.
        kv_segment = shm.segment_name(cluster_id, f"kvcache-{os.getpid()}") if role == "decode" else None

        def make_engine(kv_ports):
            return LLMEngine(EngineConfig(**engine_config), tokenizer_eos=frozenset(eos_token_ids),
                             kv_cache_segment=kv_segment, kv=kv_ports)

        worker = Worker(worker_id, role, make_engine, secret, ctx, inbox, gateway_addr, cluster_id, parent_pid)
    except Exception as exc:  # report, then exit: the gateway turns this into a clear startup error
        log.exception("worker failed to start")
        shm.remove_segments(cluster_id)
        gateway = security.secure_client(ctx.socket(zmq.PUSH), keys)
        gateway.setsockopt(zmq.LINGER, 2000)
        gateway.connect(gateway_addr)
        gateway.send(m.encode(m.RequestError("", f"{worker_id} failed to start: {exc}", worker_id)))
        gateway.close()
        auth.stop()
        ctx.term()
        return 1
    ready = worker.ready_message(time.perf_counter() - t0)
    worker.to_gateway(ready)
    worker.heartbeat = HeartbeatThread(ctx, keys, gateway_addr, ready, parent_pid,
                                       on_orphaned=lambda: exit_removing_segments(cluster_id))
    worker.heartbeat.start()
    log.info("%s (%s) ready at %s", worker_id, role, worker.address)
    try:
        worker.run()
    finally:
        worker.close()
        auth.stop()
        ctx.term()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Spawned by the gateway: `python -m splitserve.cluster.worker --id W --role R ...`."""
    import argparse
    import json

    from splitserve.process_signals import exit_on_sigterm, ignore_ctrl_c

    ignore_ctrl_c()  # a terminal's Ctrl-C reaches the whole group: stopping workers is the gateway's job

    ap = argparse.ArgumentParser(prog="splitserve-worker")
    ap.add_argument("--id", required=True)
    ap.add_argument("--role", default="both", choices=["prefill", "decode", "both"])
    ap.add_argument("--inbox", required=True, help="address to bind: ipc://PATH or tcp://HOST:PORT")
    ap.add_argument("--gateway", required=True, help="the gateway's collector address")
    ap.add_argument("--cluster-id", required=True)
    ap.add_argument("--config", required=True, help="EngineConfig as JSON")
    ap.add_argument("--eos", default="[]", help="extra EOS token ids as JSON")
    ap.add_argument("--parent-pid", type=int, default=None)
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    if args.parent_pid is not None:
        _die_with_parent()
        if os.getppid() != args.parent_pid:  # it died before PDEATHSIG was armed
            return 1
    signal.signal(signal.SIGTERM, exit_on_sigterm)  # once, quietly (see process_signals)
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s {args.id} %(levelname)s %(message)s")
    secret = os.environ.get(SECRET_ENV, "").encode()
    if not secret:
        print(f"{SECRET_ENV} must hold the cluster secret", file=sys.stderr)
        return 2
    return run_worker(args.id, args.role, json.loads(args.config), json.loads(args.eos), args.inbox, args.gateway,
                      args.cluster_id, secret, args.parent_pid)


if __name__ == "__main__":
    sys.exit(main())
