"""20,000 idle connections against a real server, then a real request: is it still served?

    python benchmarks/idle_connections.py [--connections 20000] [--slow-header 200] [--model demo]

Starts `splitserve serve` (default connection limits: 2,048 connections, 15 s to send the
headers), opens N TCP connections that never send a byte plus some that send half a request
line and stop, then times a real completion request while they are all still held open on the
client side (by client processes of 5,000 connections each, so no process nears a descriptor
limit). Prints how many of the idle connections the server had closed, the gateway's open
descriptors, and the request's status and latency.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import select
import socket
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splitserve.testing import ServerProcess  # noqa: E402


def raise_nofile(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, wanted), hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def closed_by_server(socks: list[socket.socket]) -> int:
    """How many of `socks` the server has closed (readable: EOF or reset)."""
    poller = select.poll()
    for s in socks:
        poller.register(s, select.POLLIN)
    return len(poller.poll(0))


def holder(addr: tuple[str, int], n: int, payload: bytes, pipe) -> None:
    """A client process holding `n` connections (one process cannot hold 20,000 under a
    20,000-descriptor hard limit): opens them, reports, answers "count", closes on "quit"."""
    raise_nofile(n + 100)
    socks = []
    for _ in range(n):
        s = socket.create_connection(addr, timeout=60)
        if payload:
            s.sendall(payload)
        socks.append(s)
    pipe.send(len(socks))
    while pipe.recv() != "quit":
        pipe.send(closed_by_server(socks))
    for s in socks:
        s.close()


class Holders:
    def __init__(self, addr: tuple[str, int], total: int, payload: bytes = b"", per_process: int = 5_000) -> None:
        self.pipes, self.procs = [], []
        for start in range(0, total, per_process):
            ours, theirs = mp.Pipe()
            proc = mp.Process(target=holder, args=(addr, min(per_process, total - start), payload, theirs))
            proc.start()
            self.pipes.append(ours)
            self.procs.append(proc)
        self.opened = sum(p.recv() for p in self.pipes)

    def closed(self) -> int:
        for p in self.pipes:
            p.send("count")
        return sum(p.recv() for p in self.pipes)

    def close(self) -> None:
        for p in self.pipes:
            p.send("quit")
        for proc in self.procs:
            proc.join(30)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=20_000)
    ap.add_argument("--slow-header", type=int, default=200, help="connections that send half a request line")
    ap.add_argument("--model", default="demo")
    args = ap.parse_args()
    print(f"# idle_connections {time.strftime('%Y-%m-%d %H:%M')}: {args.connections} idle + {args.slow_header} "
          "slow-header connections from client processes of 5,000 each")
    with ServerProcess("--model", args.model, "--threads", "1", "--max-model-len", "1024") as server:
        addr = ("127.0.0.1", server.port)
        fds0 = open_fds(server.proc.pid)
        t0 = time.perf_counter()
        idle = Holders(addr, args.connections)
        slow = Holders(addr, args.slow_header, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        t_open = time.perf_counter() - t0
        fds1 = open_fds(server.proc.pid)
        t1 = time.perf_counter()
        r = httpx.post(server.base_url + "/v1/completions", timeout=120,
                       json={"model": "demo", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
        latency = time.perf_counter() - t1
        print(f"opened {idle.opened} idle + {slow.opened} slow-header connections in {t_open:.1f} s "
              "(all still held open by the clients)")
        print(f"server closed {idle.closed()} of the idle ones; gateway descriptors: {fds0} before, {fds1} after")
        print(f"real request: HTTP {r.status_code} in {latency * 1000:.0f} ms: {r.json()['choices'][0]['text']!r}")
        time.sleep(16)  # past the header timeout
        print(f"after 16 s: server closed {slow.closed()} of {slow.opened} slow-header connections")
        idle.close()
        slow.close()
        ok = r.status_code == 200
    print("result: a real request was served" if ok else "result: the real request FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
