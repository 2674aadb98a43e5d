"""Start a real `splitserve serve` process for end-to-end tests, and check it leaks nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

from splitserve.kv import shm


def shm_files() -> set[str]:
    """splitserve's shared-memory segments and arenas now on this host, of any cluster."""
    return set(shm.list_segments(""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


class ServerProcess:
    def __init__(self, *args: str, api_key: str | None = None, startup_timeout: float = 180.0) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.args = list(args)
        self.startup_timeout = startup_timeout
        self.log = tempfile.NamedTemporaryFile(prefix="splitserve-test-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self) -> "ServerProcess":
        self.shm_before = shm_files()
        cmd = [sys.executable, "-m", "splitserve", "serve", "--port", str(self.port), *self.args]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.read_log()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready after {self.startup_timeout}s:\n{self.read_log()}")

    def read_log(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()[-5000:]

    def cluster(self) -> dict:
        return httpx.get(self.base_url + "/cluster", headers=self.headers, timeout=5).json()

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.cluster()["workers"] if w["pid"]]

    def wait_idle(self, timeout: float = 15.0) -> dict:
        """The leak check: nothing in flight at the gateway, no request or KV block held by any worker."""
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            last = self.cluster()
            loads = [w["load"] for w in last["workers"]]
            transfers = [w["transfers"] for w in last["workers"]]
            if (last["gateway_inflight"] == 0 and last.get("shm_segments", 0) == 0
                    and all(ld and ld["num_running"] == 0 and ld["num_waiting"] == 0 and ld["kv_blocks_used"] == 0
                            and ld.get("num_waiting_for_kv", 0) == 0 for ld in loads)
                    and all(t is None or t["active"] == 0 for t in transfers)):
                return last
            time.sleep(0.1)
        raise AssertionError(f"server did not return to idle: {last}")

    def stop(self) -> None:
        if self.proc is None:
            return
        pids = []
        try:
            pids = self.worker_pids()
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.1)
        orphans = [p for p in pids if pid_alive(p)]
        for p in orphans:
            os.kill(p, signal.SIGKILL)
        self.proc = None
        assert not orphans, f"worker processes outlived the server: {orphans}"
        leaked = sorted(shm_files() - self.shm_before)
        for name in leaked:
            shm.unlink(name)
        assert not leaked, f"shared memory outlived the server: {leaked}"

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
