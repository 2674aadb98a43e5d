"""Start-up, shutdown and hostile connections of a real `splitserve serve` process.

The port is bound before the model loads (busy port: immediate error; /health: 503, then 200);
Ctrl-C and SIGTERM, during start-up or after, end with exit code 0, no traceback, no temporary
socket directory, no process left (a kernel build's compiler included); idle, slow-header and
slow-body connections neither exhaust the server nor stay open past their timeouts.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from openai import OpenAI

from splitserve.kernels._cpu_ext import cpu_has_avx512_bf16
from splitserve.testing import OWN_LOGS, ServerProcess, descendants, free_port, pid_alive

pytestmark = pytest.mark.slow

NOISE = ("Traceback", "Exception ignored", "KeyboardInterrupt", "SystemExit")


def quiet_server(tmp_path, *args: str, **env: str) -> tuple[ServerProcess, str]:
    """A server in its own session (so a signal can go to its whole group, as a terminal's Ctrl-C
    does) with its own temporary directory, to see what it leaves there."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    server = ServerProcess("--model", "demo", "--threads", "1", "--max-model-len", "512", *args,
                           env={**os.environ, "TMPDIR": str(tmp), **env}, new_session=True,
                           log_path=str(tmp_path / "server.log"))
    return server, str(tmp)


def stop_and_check(server: ServerProcess, tmp: str, sig: int, to_group: bool) -> str:
    pids = descendants(server.proc.pid)
    assert pids, "the server should have started its workers"
    if to_group:
        os.killpg(server.proc.pid, sig)
    code = server.stop(sig)  # asserts that no worker process and no shared memory is left
    log = server.read_log()
    assert code == 0, log
    for word in NOISE:
        assert word not in log, log
    assert os.listdir(tmp) == [], "the gateway's socket directory (or other temporary files) left behind"
    assert not [p for p in pids if pid_alive(p)]
    return log


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def health(server: ServerProcess) -> int | None:
    try:
        return httpx.get(server.base_url + "/health", timeout=2).status_code
    except httpx.HTTPError:
        return None


def test_busy_port_fails_before_loading_the_model():
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        proc = subprocess.run([sys.executable, "-m", "splitserve", "serve", "--model", "demo", "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "already in use" in proc.stderr and f"127.0.0.1:{port}" in proc.stderr
    assert "spawned" not in proc.stderr  # no worker was started, no model loaded
    assert "Traceback" not in proc.stderr


def test_a_failed_start_leaves_no_log_behind():
    server = ServerProcess("--no-such-option")
    with pytest.raises(RuntimeError, match="exited with 2"):
        server.start()
    assert not os.path.exists(server.log_path) and server.log_path not in OWN_LOGS


def test_sigterm_during_start_up_is_quiet(tmp_path):
    server, tmp = quiet_server(tmp_path, "--disaggregated")
    server.launch()
    wait_for(lambda: health(server) == 503 and "spawned decode" in server.read_log(), 120, "workers starting")
    stop_and_check(server, tmp, signal.SIGTERM, to_group=False)


def _compiler_running(marker: str) -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        return True
            except OSError:
                pass
    return False


@pytest.mark.skipif(not cpu_has_avx512_bf16() or os.environ.get("SPLITSERVE_DISABLE_CPU_EXT", "") not in ("", "0"),
                    reason="the CPU kernels are not built on this machine")
def test_sigterm_during_a_kernel_build_leaves_no_compiler(tmp_path):
    ext = tmp_path / "kernels-cache"  # empty: the workers must compile
    server, tmp = quiet_server(tmp_path, TORCH_EXTENSIONS_DIR=str(ext))
    server.launch()
    wait_for(lambda: _compiler_running(str(ext)), 120, "the kernel build to start")
    assert "compiling CPU kernels, once" in server.read_log()
    stop_and_check(server, tmp, signal.SIGTERM, to_group=False)
    wait_for(lambda: not _compiler_running(str(ext)), 10, "the compiler to go away")


def _read_until_closed(sock: socket.socket, timeout: float) -> bool:
    """True if the server closes the connection within `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.time()))
        if not ready:
            return False
        try:
            if not sock.recv(65536):
                return True
        except ConnectionError:
            return True
    return False


@pytest.fixture(scope="module")
def watched_start(tmp_path_factory):
    """One disaggregated server with low connection limits, for the tests below (the last one
    stops it with Ctrl-C): launched here, with /health polled from the first moment."""
    server, tmp = quiet_server(tmp_path_factory.mktemp("watched"), "--disaggregated", "--max-connections", "64",
                               "--header-timeout", "2", "--body-timeout", "3")
    server.launch()
    seen: list[int | None] = []
    try:
        wait_for(lambda: seen.append(health(server)) or seen[-1] == 200 or server.proc.poll() is not None, 180,
                 "the server to become ready")
        assert seen[-1] == 200, server.read_log()
        server.cluster_id = server.cluster()["cluster_id"]
        yield server, tmp, seen
    finally:
        if server.proc is not None:
            server.stop()


def test_health_is_503_while_loading_then_200(watched_start):
    server, _, seen = watched_start
    assert 503 in seen, f"/health should answer 503 while the model loads, saw {sorted(set(map(str, seen)))}"
    assert seen.index(503) < seen.index(200)
    assert None not in seen[seen.index(503):], "connections refused after the port was bound"
    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    out = client.completions.create(model="demo", prompt="Hello", max_tokens=4, temperature=0)
    assert out.choices[0].text
    server.wait_idle()


def test_idle_and_slow_connections_do_not_block_a_request(watched_start):
    server, _, _ = watched_start
    addr = ("127.0.0.1", server.port)
    idle = [socket.create_connection(addr) for _ in range(300)]  # far more than the cap
    slow_header = []
    for _ in range(20):
        s = socket.create_connection(addr)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        slow_header.append(s)
    slow_body = socket.create_connection(addr)
    slow_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"model\"")
    try:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
        out = client.completions.create(model="demo", prompt="Hello", max_tokens=4, temperature=0)
        assert out.choices[0].text and out.usage.completion_tokens == 4
        # The newest slow ones may still be open: each is closed at its timeout.
        assert _read_until_closed(slow_header[-1], 15), "a connection sending its headers forever stays open"
        assert _read_until_closed(slow_body, 15), "a connection sending its body forever stays open"
        assert _read_until_closed(idle[-1], 15), "an idle connection stays open"
        assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
        server.wait_idle()
        assert "Traceback" not in server.read_log(), "a connection cut mid-body logged a traceback"
    finally:
        for s in idle + slow_header + [slow_body]:
            s.close()


def test_ctrl_c_is_quiet(watched_start):
    server, tmp, _ = watched_start
    server.wait_idle()
    stop_and_check(server, tmp, signal.SIGINT, to_group=True)  # as a terminal's Ctrl-C: every process of the group
