"""What CURVE (cluster/security.py) costs on the cluster's ZeroMQ sockets, against plain ZeroMQ.

    python benchmarks/cluster_curve.py [--rounds 5] [--transport ipc|tcp]

Two processes, a PUSH in one and a PULL in the other, as between the gateway and a worker:
  * small messages: round-trip time of a ~100-byte message and its answer (a token's TokenOut,
    a request's abort), median of 2,000;
  * KV frames: throughput of 1.5 MB frames (one layer of a 2,000-token chunk of the demo model,
    K or V: what a prefill worker sends a decode worker that has no data port), 200 per round.
Rounds alternate plain and CURVE because this machine's speed drifts; medians are printed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time

SECRET = b"benchmark-secret-0123456789abcdef"
SMALL = b"x" * 100
FRAME = 1_536_000
FRAMES = 200
PINGS = 2000


def _sockets(ctx, curve: bool, bind_addr: str | None, connect_addr: str | None):
    import zmq

    from splitserve.cluster import security

    keys = security.derive_keys(SECRET)
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    if curve:
        security.secure_server(pull, keys, security.MAX_WORKER_MSG_BYTES)
        security.secure_client(push, keys)
    for s in (pull, push):
        s.setsockopt(zmq.LINGER, 0)
    pull.bind(bind_addr)
    push.connect(connect_addr)
    return pull, push


def _echo(curve: bool, mine: str, theirs: str, ready) -> None:
    import zmq

    from splitserve.cluster import security

    ctx = zmq.Context()
    auth = security.start_authenticator(ctx, security.derive_keys(SECRET)) if curve else None
    pull, push = _sockets(ctx, curve, mine, theirs)
    ready.set()
    while True:
        msg = pull.recv(copy=False)
        if msg.bytes == b"stop":
            break
        if len(msg) < FRAME:  # pings are answered; a frame burst is acknowledged at its end
            push.send(msg, copy=False)
        elif msg.bytes[:4] == b"last":
            push.send(b"ack")
    pull.close(0)
    push.close(0)
    if auth is not None:
        auth.stop()
    ctx.term()


def _round(curve: bool, transport: str) -> tuple[float, float]:
    import zmq

    from splitserve.cluster import security

    d = tempfile.mkdtemp(prefix="curve-bench-")
    if transport == "ipc":
        a, b = f"ipc://{d}/a", f"ipc://{d}/b"
    else:
        import socket

        ports = []
        for _ in range(2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        a, b = (f"tcp://127.0.0.1:{p}" for p in ports)
    ready = mp.Event()
    p = mp.Process(target=_echo, args=(curve, a, b, ready))
    p.start()
    ready.wait()
    ctx = zmq.Context()
    auth = security.start_authenticator(ctx, security.derive_keys(SECRET)) if curve else None
    pull, push = _sockets(ctx, curve, b, a)
    push.send(SMALL)
    pull.recv()  # connected both ways
    rtts = []
    for _ in range(PINGS):
        t = time.perf_counter()
        push.send(SMALL)
        pull.recv()
        rtts.append(time.perf_counter() - t)
    frame, last = bytes(FRAME), b"last" + bytes(FRAME - 4)
    t = time.perf_counter()
    for i in range(FRAMES):
        push.send(last if i == FRAMES - 1 else frame, copy=False)
    pull.recv()
    gbps = FRAME * FRAMES / (time.perf_counter() - t) / 1e9
    push.send(b"stop")
    p.join()
    pull.close(0)
    push.close(0)
    if auth is not None:
        auth.stop()
    ctx.term()
    return statistics.median(rtts) * 1e6, gbps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--transport", choices=["ipc", "tcp"], default="ipc")
    args = ap.parse_args()
    results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for r in range(args.rounds):
        for curve in (False, True):
            rtt, gbps = _round(curve, args.transport)
            results[curve].append((rtt, gbps))
            print(f"round {r + 1} {'curve' if curve else 'plain'}: rtt {rtt:6.1f} us, frames {gbps:5.2f} GB/s",
                  flush=True)
    for curve in (False, True):
        rtt = statistics.median(x for x, _ in results[curve])
        gbps = statistics.median(y for _, y in results[curve])
        print(f"{args.transport} {'curve' if curve else 'plain'}: small-message round trip {rtt:.1f} us (median), "
              f"1.5 MB frames {gbps:.2f} GB/s (median)")


if __name__ == "__main__":
    main()
