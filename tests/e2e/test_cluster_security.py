"""Hostile peers and faults on the cluster side, against the real server (issue 17, items 4-8, 11).

A flood of raw traffic on the cluster port, fake workers with a wrong secret or posing as a live
worker, a SIGSTOPped decode worker, kill -9 of the gateway. Every scenario ends with the leak
check (no request, KV block, transfer or shared-memory segment left; no worker process left).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import zmq

from splitserve.cluster import messages as m
from splitserve.cluster import security
from splitserve.cluster.worker import SECRET_ENV
from splitserve.kv import shm
from tests.server_utils import ServerProcess, free_port, pid_alive, wait_for

pytestmark = pytest.mark.slow

COMMON = ("--model", "demo", "--dtype", "float32", "--max-model-len", "1024", "--threads", "1")
SECRET = "e3b0c44298fc1c149afbf4c8996fb924"
WRONG = "27ae41e4649b934ca495991b7852b855"


def _complete(base_url: str, prompt: str, max_tokens: int = 12) -> str:
    r = httpx.post(base_url + "/v1/completions", timeout=300,
                   json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def joinable():
    """1P1D with a cluster port open to workers from other hosts."""
    old = os.environ.get(SECRET_ENV)
    os.environ[SECRET_ENV] = SECRET
    port = free_port()
    try:
        with ServerProcess(*COMMON, "--disaggregated", "--cluster-listen", f"127.0.0.1:{port}") as s:
            s.join_addr = f"tcp://127.0.0.1:{port}"
            yield s
    finally:
        if old is None:
            os.environ.pop(SECRET_ENV, None)
        else:
            os.environ[SECRET_ENV] = old


def test_serve_refuses_a_one_character_secret():
    env = dict(os.environ, **{SECRET_ENV: "x"})
    r = subprocess.run([sys.executable, "-m", "splitserve", "serve", *COMMON, "--disaggregated", "--port",
                        str(free_port()), "--cluster-listen", "127.0.0.1:0"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1
    assert "cluster secret is too weak" in r.stderr and "at least 32 characters" in r.stderr


def test_a_flood_on_the_cluster_port_is_bounded(joinable):
    """Oversized frames, a frame flood and raw junk from peers without the secret: the gateway's
    memory and log stay flat and a concurrent request completes."""
    s = joinable
    expected = _complete(s.base_url, "The capital of France is")
    gateway = s.proc.pid
    peak_before = _peak_rss_mb(gateway)
    log_before = os.path.getsize(s.log_path)
    answer: list[str] = []
    concurrent = threading.Thread(target=lambda: answer.append(_complete(s.base_url, "The capital of France is")))
    concurrent.start()
    ctx = zmq.Context()
    plain = ctx.socket(zmq.PUSH)  # ZeroMQ without CURVE: what an outsider's client speaks
    plain.setsockopt(zmq.LINGER, 0)
    plain.setsockopt(zmq.SNDHWM, 0)
    plain.setsockopt(zmq.SNDTIMEO, 3000)  # a send waits for a connection the gateway never completes
    plain.connect(s.join_addr)
    big = b"\0" * (200 << 20)
    try:
        for _ in range(3):
            plain.send(big, copy=False)
        for i in range(50_000):
            plain.send(b"junk %d" % i)
    except zmq.Again:
        pass  # refused at the handshake: as it should be
    with socket.create_connection(("127.0.0.1", int(s.join_addr.rsplit(":", 1)[1])), timeout=5) as raw:
        try:
            raw.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + os.urandom(1 << 20))  # a greeting, then noise
            raw.sendall(b"\0" * (20 << 20))
        except OSError:
            pass  # cut off or no longer read: as it should be
    time.sleep(3)
    concurrent.join(timeout=120)
    plain.close(0)
    ctx.term()
    assert answer == [expected]
    assert _peak_rss_mb(gateway) - peak_before < 64, "the gateway took the flood into memory"
    assert os.path.getsize(s.log_path) - log_before < 64 << 10, "the flood grew the log"
    s.wait_idle()


def _fake_worker(ctx, secret: str):
    """A process posing as a worker: an inbox, and a Ready sent to the cluster port."""
    keys = security.derive_keys(secret.encode())
    inbox = security.secure_server(ctx.socket(zmq.PULL), keys, 1 << 20)
    inbox.setsockopt(zmq.LINGER, 0)
    inbox.bind("tcp://127.0.0.1:0")
    address = inbox.getsockopt(zmq.LAST_ENDPOINT).decode()
    return inbox, address, keys


def _announce(ctx, join_addr: str, keys, ready: m.Ready):
    out = security.secure_client(ctx.socket(zmq.PUSH), keys)
    out.setsockopt(zmq.LINGER, 0)
    out.connect(join_addr)
    for _ in range(5):
        out.send(m.encode(ready))
        time.sleep(0.2)
    return out


def test_fake_workers_get_nothing(joinable):
    """A peer with a wrong secret is not let in; a peer with the secret cannot take a live worker's
    id; users' prompts never reach either, and real traffic keeps flowing."""
    s = joinable
    ctx = zmq.Context()
    auth = security.start_authenticator(ctx, security.derive_keys(SECRET.encode()))
    real = [w for w in s.cluster()["workers"] if w["role"] == "decode"][0]
    outsider_inbox, outsider_addr, outsider_keys = _fake_worker(ctx, WRONG)
    insider_inbox, insider_addr, insider_keys = _fake_worker(ctx, SECRET)
    sockets = [outsider_inbox, insider_inbox]
    try:
        def ready(worker_id, address):
            return m.Ready(worker_id, os.getpid(), "decode", address, 64, 16, 1024, 49152, 0.0, "x")

        sockets.append(_announce(ctx, s.join_addr, outsider_keys, ready("decode-77", outsider_addr)))
        sockets.append(_announce(ctx, s.join_addr, insider_keys, ready(real["id"], insider_addr)))
        for i in range(4):
            _complete(s.base_url, f"Request number {i} says")
        workers = {w["id"]: w for w in s.cluster()["workers"]}
        assert "decode-77" not in workers
        assert workers[real["id"]]["pid"] == real["pid"] and workers[real["id"]]["address"] == real["address"]
        assert outsider_inbox.poll(500) == 0 and insider_inbox.poll(0) == 0
        assert "a live worker" in s.read_log() or "belongs to the worker process" in s.read_log()
        s.wait_idle()
    finally:
        for sock in sockets:
            sock.close(0)
        auth.stop()
        ctx.term()


# ---- liveness ---------------------------------------------------------------------------------
PROMPTS = [f"Story {i}: once upon a time" for i in range(4)]


async def _streams(base_url: str, prompts: list[str], max_tokens: int, on_tokens=None) -> list[str]:
    async with httpx.AsyncClient(timeout=300) as http:
        counts = [0] * len(prompts)

        async def one(i: int) -> str:
            body = {"prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            parts = []
            async with http.stream("POST", base_url + "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        parts.append(json.loads(line[6:])["choices"][0]["text"])
                        counts[i] += 1
            return "".join(parts)

        tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
        if on_tokens is not None:
            while min(counts) < 4 and not all(t.done() for t in tasks):
                await asyncio.sleep(0.05)
            await asyncio.to_thread(on_tokens)
        return list(await asyncio.gather(*tasks))


def test_a_sigstopped_decode_worker_is_routed_around_and_comes_back():
    with ServerProcess(*COMMON, "--disaggregated", "--decode-workers", "2") as s:
        expected = asyncio.run(_streams(s.base_url, PROMPTS, 40))
        stopped: list[dict] = []

        def stop_the_busiest_decoder():
            decoders = [w for w in s.cluster()["workers"] if w["role"] == "decode"]
            victim = max(decoders, key=lambda w: w["load"]["num_running"] + w["load"]["num_waiting_for_kv"])
            os.kill(victim["pid"], signal.SIGSTOP)
            stopped.append(victim)

        try:
            got = asyncio.run(_streams(s.base_url, PROMPTS, 40, on_tokens=stop_the_busiest_decoder))
            assert got == expected  # re-placed with no gap and no duplicate
            victim = stopped[0]
            state = lambda: {w["id"]: w for w in s.cluster()["workers"]}[victim["id"]]["state"]  # noqa: E731
            assert state() == "silent"
            assert s.cluster()["requests_replaced"] >= 1
            assert httpx.get(s.base_url + "/health").status_code == 200  # the other decoder serves
            assert _complete(s.base_url, PROMPTS[0], 40) == expected[0]
        finally:
            for w in stopped:
                os.kill(w["pid"], signal.SIGCONT)
        wait_for(lambda: state() == "ready")
        s.wait_idle(timeout=60)  # the woken worker read its aborts and freed everything
        # No decode worker beating: /health says so, and recovers with them.
        decoders = [w for w in s.cluster()["workers"] if w["role"] == "decode"]
        for w in decoders:
            os.kill(w["pid"], signal.SIGSTOP)
        try:
            wait_for(lambda: httpx.get(s.base_url + "/health").status_code == 503)
        finally:
            for w in decoders:
                os.kill(w["pid"], signal.SIGCONT)
        wait_for(lambda: httpx.get(s.base_url + "/health").status_code == 200)
        assert _complete(s.base_url, PROMPTS[1], 40) == expected[1]
        assert all(w["restarts"] == 0 for w in s.cluster()["workers"])
        s.wait_idle(timeout=60)


def test_kill_9_of_the_gateway_leaves_no_worker_and_no_shared_memory():
    s = ServerProcess(*COMMON, "--disaggregated").start()
    info = s.cluster()
    pids = [w["pid"] for w in info["workers"]]
    ours = lambda: [n for n in shm.list_segments(info["cluster_id"])]  # noqa: E731
    assert ours(), "the decode worker's KV cache and the prefill arena live in /dev/shm"
    body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=300) as http:
        with http.stream("POST", s.base_url + "/v1/completions", json=body) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 10:  # mid-stream: both workers busy
                    os.kill(s.proc.pid, signal.SIGKILL)
                    break
    s.proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and (ours() or any(pid_alive(p) for p in pids)):
        time.sleep(0.1)
    assert not [p for p in pids if pid_alive(p)], "workers outlived their gateway"
    assert not ours(), "shared memory outlived the gateway"
    s.stop()  # its own checks: no orphan, nothing new in /dev/shm
