"""20,000 idle connections against a real server, then a real request: is it still served?

    python benchmarks/idle_connections.py [--connections 20000] [--slow-header 200] [--model demo]

Starts `splitserve serve` (default connection limits: 2,048 connections, 15 s to send the
headers), opens N TCP connections that never send a byte plus some that send half a request
line and stop, then times a real completion request while they are all still held open on the
client side. Prints how many of the idle connections the server had closed, the gateway's open
descriptors, and the request's status and latency. This script raises its own descriptor limit
(N + 1,000; raising the hard limit needs root).
"""

from __future__ import annotations

import argparse
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
    if soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, PermissionError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def open_connections(addr: tuple[str, int], n: int, payload: bytes = b"") -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.create_connection(addr, timeout=30)
        if payload:
            s.sendall(payload)
        out.append(s)
    return out


def closed_by_server(socks: list[socket.socket]) -> int:
    """How many of `socks` the server has closed (readable with EOF or reset)."""
    closed = 0
    for i in range(0, len(socks), 500):  # select() takes at most FD_SETSIZE: poll in slices
        chunk = socks[i:i + 500]
        poller = select.poll()
        for s in chunk:
            poller.register(s, select.POLLIN)
        for fd, ev in poller.poll(0):
            closed += 1 if ev & (select.POLLIN | select.POLLHUP | select.POLLERR) else 0
    return closed


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=20_000)
    ap.add_argument("--slow-header", type=int, default=200, help="connections that send half a request line")
    ap.add_argument("--model", default="demo")
    args = ap.parse_args()
    limit = raise_nofile(args.connections + args.slow_header + 1_000)
    print(f"# idle_connections {time.strftime('%Y-%m-%d %H:%M')}: client descriptor limit {limit}")
    with ServerProcess("--model", args.model, "--threads", "1", "--max-model-len", "1024") as server:
        addr = ("127.0.0.1", server.port)
        fds0 = open_fds(server.proc.pid)
        t0 = time.perf_counter()
        idle = open_connections(addr, args.connections)
        slow = open_connections(addr, args.slow_header, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        t_open = time.perf_counter() - t0
        fds1 = open_fds(server.proc.pid)
        t1 = time.perf_counter()
        r = httpx.post(server.base_url + "/v1/completions", timeout=120,
                       json={"model": "demo", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
        latency = time.perf_counter() - t1
        closed = closed_by_server(idle)
        print(f"opened {len(idle)} idle + {len(slow)} slow-header connections in {t_open:.1f} s "
              f"(all still open on the client side)")
        print(f"server closed {closed} of the idle ones; gateway descriptors {fds0} before, {fds1} after opening")
        print(f"real request: HTTP {r.status_code} in {latency * 1000:.0f} ms: {r.json()['choices'][0]['text']!r}")
        time.sleep(16)  # past the header timeout: the slow ones are closed by now
        print(f"after 16 s: server closed {closed_by_server(slow)} of {len(slow)} slow-header connections")
        for s in idle + slow:
            s.close()
        ok = r.status_code == 200
    print("result: a real request was served" if ok else "result: the real request FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
