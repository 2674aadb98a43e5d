"""KV transfer throughput of each transport against the machine's own limits.

    python benchmarks/kv_transfer.py [--tokens 2000] [--rounds 5]

Runs the real connector halves (KVSender in one process, KVReceiver + DecodeHandoff + Scheduler in another) for
one request's KV and reports delivered GB/s for each way the connector moves KV:
  * shm direct: the decode side's cache is a shared-memory segment; its KVPlacement (sent when it
    reserves, which overlaps the prefill's compute in the server) tells the sender where to write:
    one copy. Timed from the first layer's send, after the placement arrived.
  * shm arena: the path before a placement arrives: copy into the sender's arena, the receiver
    copies into its blocks.
  * TCP data channel: sent from the cache slots, received into the reserved slots (kv/tcp.py).
  * TCP ZeroMQ frames: the fallback for a peer without a data port (gather, frame, land).
next to:
  * memcpy: one process copying a buffer of the same size, best of torch copy_, glibc memmove
    and a streaming-store copy (the ceiling for shared memory);
  * loopback TCP: a raw socket stream between two processes (the ceiling for TCP).
Targets (issue 3): shared memory >= 80% of memcpy, TCP >= 80% of the raw loopback stream.
Rounds are interleaved (memcpy, shm, tcp-raw, tcp, ...) because this machine's bandwidth drifts.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import select
import socket
import statistics
import time

SHAPES = {
    # name: (layers, kv_heads, head_dim) -- the demo model and the ~0.85B benchmark model
    "smollm2-135m": (30, 3, 64),
    "llama-0.85b": (16, 8, 64),
}


def _caches(layers, slots, heads, dim, fill, storage=None):
    import torch

    if storage is not None:
        kv = torch.frombuffer(storage, dtype=torch.bfloat16, count=layers * 2 * slots * heads * dim)
        kv = kv.view(layers, 2, slots, heads, dim)
        kv.fill_(fill)
    else:
        kv = torch.full((layers, 2, slots, heads, dim), fill, dtype=torch.bfloat16)
    return kv, [(kv[i, 0], kv[i, 1]) for i in range(layers)]


def _receiver(addr, shape, tokens, secret, q, out, writer="", cache_name=None, data=False):
    import torch
    import zmq

    from splitserve.cluster import messages as m
    from splitserve.config import SchedulerConfig
    from splitserve.engine.request import Request
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.engine.scheduler import Scheduler
    from splitserve.kv import shm
    from splitserve.kv.connector import KVReceiver
    from splitserve.kv.handoff import DecodeHandoff, Reserve, apply_scheduler_actions

    torch.set_num_threads(1)
    layers, heads, dim = shape
    bs = 16
    blocks = tokens // bs + 8
    seg = None
    if cache_name:
        seg = shm.Segment(cache_name, size=layers * 2 * blocks * bs * heads * dim * 2)
    _, caches = _caches(layers, blocks * bs, heads, dim, 0.0, seg.buf if seg else None)
    sched = Scheduler(SchedulerConfig(num_blocks=blocks, block_size=bs, max_model_len=tokens + 16))
    ctx = zmq.Context()
    back = ctx.socket(zmq.PUSH)
    if writer:
        back.connect(writer)

    def send(_addr, frames):
        back.send_multipart([secret, *frames])

    handoff = DecodeHandoff()
    rx = KVReceiver(handoff, sched.block_manager.blocks_of, caches, bs, send=send, shared_cache=cache_name,
                    reply_to=addr, data_host="127.0.0.1" if data else None, secret=secret)

    def run(actions):  # what the engine does with the handoff's actions
        rx.execute(apply_scheduler_actions(sched, handoff, actions, time.monotonic()))
    pull = ctx.socket(zmq.PULL)
    pull.bind(addr)
    out.put(("ready", rx.data.address if rx.data else ""))
    while True:
        rid = q.get()
        if rid is None:
            break
        req = Request(rid, list(range(tokens)), SamplingParams(max_tokens=2))
        placeable = rx.expect(rid, writer, os.getppid())
        run(handoff.on(Reserve(rid, req, 0, layers, placeable), time.monotonic()))
        t_first = None
        while rid not in sched.requests or rid in sched.waiting_for_kv:
            poller = zmq.Poller()  # as the worker does: the inbox and the data sockets together
            poller.register(pull, zmq.POLLIN)
            for fd in rx.data.fds() if rx.data else ():
                poller.register(fd, zmq.POLLIN)
            for sock, _ in poller.poll(1000):
                if sock is not pull:
                    rx.data.pump(sock)
                    continue
                frames = pull.recv_multipart(copy=False)
                msg = m.decode_to_worker(frames[1].bytes)
                run(rx.on_message(msg, tuple(f.buffer for f in frames[2:])))
            run(handoff.tick(time.monotonic()))
        t_done = time.perf_counter()
        ok = bool((caches[-1][1][: tokens] == 1.0).all())
        sched.finish(rid)
        out.put((t_done, rx.bytes_received, ok))
        rx.bytes_received = 0
    pull.close(0)
    back.close(0)
    rx.close()
    ctx.term()
    if seg is not None:
        seg.unlink()


def _send_one(transport, addr, shape, tokens, rid, sender_state):
    from types import SimpleNamespace

    from splitserve.cluster import messages as m
    from splitserve.engine.scheduler import ScheduledChunk, StepPlan

    kv, caches, inbox, data_addr, tx = sender_state
    bs = 16
    table = list(range(tokens // bs + 1))
    req = SimpleNamespace(request_id=rid)
    tx.add(rid, addr, 0, "shm" if transport.startswith("shm") else "tcp", tokens, data_addr)
    if transport == "shm-direct":  # the decode side's placement (in the server it overlaps the prefill)
        tx.place(m.decode_to_worker(inbox.recv_multipart()[1]))
        assert tx.transfers[rid].path.dest is not None
    plan = StepPlan([ScheduledChunk(req, 0, tokens, True)])
    t0 = time.perf_counter()
    tx.begin_step(plan, {rid: table})
    for layer in range(shape[0]):
        tx.on_layer(layer)
    tx.end_step()
    tx.finish(rid, 7)
    while tx.data_waiting():  # what the socket could not take at once (the worker's loop does this)
        select.select([], tx.data_waiting(), [], 1.0)
        tx.flush_data()
    return t0


def _copy_gbps(nbytes):
    """One thread copying a buffer of `nbytes`, best of 3 each way: plain memcpy (the better of
    torch copy_ and glibc memmove) and the streaming-store copy the direct path itself uses."""
    import ctypes

    import torch

    from splitserve.kernels.fused import copy_stream

    torch.set_num_threads(1)
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ways = {
        "memcpy": [lambda: dst.copy_(src), lambda: ctypes.memmove(dst.data_ptr(), src.data_ptr(), nbytes)],
        "stream": [lambda: copy_stream(dst, src)],
    }
    best = {k: 0.0 for k in ways}
    for _ in range(3):
        for k, fns in ways.items():
            for fn in fns:
                t = time.perf_counter()
                fn()
                best[k] = max(best[k], nbytes / (time.perf_counter() - t) / 1e9)
    return best["memcpy"], best["stream"]


def _raw_tcp_sink(port_q, nbytes):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port_q.put(s.getsockname()[1])
    conn, _ = s.accept()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while True:
        got = 0
        while got < nbytes:
            n = conn.recv_into(view)
            if n == 0:
                return
            got += n
        conn.sendall(b"k")


def _raw_tcp_gbps(nbytes, rounds=3):
    q = mp.Queue()
    p = mp.Process(target=_raw_tcp_sink, args=(q, nbytes), daemon=True)
    p.start()
    port = q.get()
    c = socket.create_connection(("127.0.0.1", port))
    payload = memoryview(bytearray(nbytes))
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        c.sendall(payload)
        c.recv(1)
        best = max(best, nbytes / (time.perf_counter() - t) / 1e9)
    c.close()
    p.join(2)
    return best


def measure(transport, shape, tokens, rounds):
    import torch
    import zmq

    from splitserve.kv.connector import KVSender
    from splitserve.kv import shm

    torch.set_num_threads(1)
    ctx = zmq.Context()
    owner = f"kvbench{os.getpid()}"
    addr = f"ipc:///tmp/kvbench-{os.getpid()}-{transport}.sock"
    inbox, writer, cache_name = None, "", None
    if transport == "shm-direct":
        writer = f"ipc:///tmp/kvbench-{os.getpid()}-writer.sock"
        inbox = ctx.socket(zmq.PULL)
        inbox.bind(writer)
        cache_name = shm.segment_name(owner, "rx-kvcache-1")
    if transport.startswith("tcp"):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        addr = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        s.close()
    spawn = mp.get_context("spawn")
    q, out = spawn.Queue(), spawn.Queue()  # one queue per direction
    proc = spawn.Process(target=_receiver, args=(addr, shape, tokens, b"x", q, out, writer, cache_name,
                                                 transport == "tcp-data"), daemon=True)
    proc.start()
    ready, data_addr = out.get(timeout=120)
    assert ready == "ready"
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 100000)
    push.connect(addr)
    layers, heads, dim = shape
    kv, caches = _caches(layers, (tokens // 16 + 1) * 16, heads, dim, 1.0)

    def send(a, frames):
        push.send_multipart([b"x", *frames], copy=len(frames) == 1)

    tx = KVSender(owner, caches, 16, send, arena_bytes=2 * layers * tokens * 4 * heads * dim, secret=b"x")
    tx.ensure_arena()
    results = []
    for r in range(rounds + 1):  # round 0 warms both sides' mappings and allocators
        rid = f"r{r}"
        q.put(rid)
        t0 = _send_one(transport, addr, shape, tokens, rid, (kv, caches, inbox, data_addr, tx))
        t_done, nbytes, ok = out.get(timeout=120)
        assert ok, "KV did not land intact"
        tx.release(rid)  # the receiver's KVRelease, delivered by hand: the region is reused next round
        if r:
            results.append(nbytes / (t_done - t0) / 1e9)
    q.put(None)
    proc.join(5)
    push.close(0)
    if inbox is not None:
        inbox.close(0)
    tx.close()
    ctx.term()
    assert not shm.list_segments(owner)
    return statistics.median(results), nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None)
    args = ap.parse_args()
    print(f"# KV transfer, {args.tokens}-token prompt, bf16, 1 thread per side, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| model shape | KV bytes | path | GB/s | / memcpy | / streaming copy | / raw loopback |")
    print("|---|---|---|---|---|---|---|")
    notes = []
    for name in [args.shape] if args.shape else list(SHAPES):
        shape = SHAPES[name]
        nbytes = shape[0] * args.tokens * 2 * shape[1] * shape[2] * 2
        paths = [("shm-direct", "shm direct"), ("shm", "shm arena"), ("tcp-data", "TCP data channel"),
                 ("tcp", "TCP ZeroMQ frames")]
        got: dict[str, list[float]] = {p: [] for p, _ in paths}
        mc, st, raw = [], [], []
        for _ in range(args.rounds):  # interleaved A/B rounds
            m_, s_ = _copy_gbps(nbytes)
            mc.append(m_)
            st.append(s_)
            raw.append(_raw_tcp_gbps(nbytes))
            for p, _ in paths:
                got[p].append(measure(p, shape, args.tokens, 5)[0])
        mc_, st_, raw_ = (statistics.median(x) for x in (mc, st, raw))
        for p, label in paths:
            g = statistics.median(got[p])
            if p.startswith("shm"):
                print(f"| {name} | {nbytes / 1e6:.1f} MB | {label} | {g:.2f} | {g / mc_:.0%} | {g / st_:.0%} | - |")
            else:
                print(f"| {name} | {nbytes / 1e6:.1f} MB | {label} | {g:.2f} | - | - | {g / raw_:.0%} |")
        notes.append(f"{name}: memcpy {mc_:.2f} GB/s, streaming copy {st_:.2f} GB/s, raw loopback {raw_:.2f} GB/s")
    print()
    print("Ceilings (medians of the rounds' best): " + "; ".join(notes))


if __name__ == "__main__":
    main()
