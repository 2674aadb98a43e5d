"""A real `splitserve serve` process for the tests and the benchmark scripts: start it, wait until
it answers, stop it, and check that it left no worker process or shared memory behind.

    with ServerProcess("--model", "demo", "--disaggregated") as server:
        httpx.get(server.base_url + "/v1/models")
"""

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
from splitserve.process_tree import descendants, pid_alive


# Logs this process created and has not removed yet (a test suite removes the rest at its end).
OWN_LOGS: set[str] = set()


def remove_own_logs() -> None:
    for path in list(OWN_LOGS):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        OWN_LOGS.discard(path)


def shm_files() -> set[str]:
    """splitserve's shared-memory segments and arenas now on this host, of any cluster."""
    return set(shm.list_segments(""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, timeout: float = 30.0, step: float = 0.2):
    """Poll `what()` until it returns something truthy (returned); AssertionError after `timeout`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = what()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


class ServerProcess:
    """`python -m splitserve serve --port P ARGS...`; `start()` returns once /health answers 200.

    The log goes to a temporary file (removed by `stop()` unless `keep_log`), or to `log_path`.
    `check_leaks=False` skips the end-of-run leak assertions (benchmarks that only want the numbers)."""

    def __init__(self, *args: str, api_key: str | None = None, startup_timeout: float = 180.0,
                 env: dict | None = None, log_path: str | None = None, check_leaks: bool = True,
                 new_session: bool = False) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.args = list(args)
        self.startup_timeout = startup_timeout
        self.env = env
        self.check_leaks = check_leaks
        self.new_session = new_session
        self.log_path = log_path
        self._own_log = log_path is None
        if log_path is None:
            with tempfile.NamedTemporaryFile(prefix="splitserve-test-", suffix=".log", delete=False) as f:
                self.log_path = f.name
            OWN_LOGS.add(self.log_path)
        self.proc: subprocess.Popen | None = None
        self.cluster_id: str | None = None  # known once ready: its shared memory is named after it

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "splitserve", "serve", "--port", str(self.port), *self.args]
        return cmd + ["--api-key", self.api_key] if self.api_key else cmd

    def launch(self) -> "ServerProcess":
        """Start the process without waiting for it (see `wait_ready`)."""
        self.shm_before = shm_files()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=self.new_session)
        return self

    def wait_ready(self) -> "ServerProcess":
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                code, log, self.proc = self.proc.returncode, self.read_log(), None
                if self._own_log:
                    self.remove_log()
                raise RuntimeError(f"server exited with {code}:\n{log}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    self.cluster_id = self.cluster().get("cluster_id")
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        log = self.read_log()
        self.stop()
        raise RuntimeError(f"server not ready after {self.startup_timeout}s:\n{log}")

    def start(self) -> "ServerProcess":
        return self.launch().wait_ready()

    def read_log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-5000:]

    def cluster(self) -> dict:
        return httpx.get(self.base_url + "/cluster", headers=self.headers, timeout=5).json()

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.cluster()["workers"] if w["pid"]]

    def wait_idle(self, timeout: float = 15.0) -> dict:
        """The leak check: nothing in flight or queued at the gateway, no request or KV block held by any worker."""
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            last = self.cluster()
            loads = [w["load"] for w in last["workers"]]
            transfers = [w["transfers"] for w in last["workers"]]
            if (last["gateway_inflight"] == 0 and last.get("shm_segments", 0) == 0
                    and last.get("gateway_queue", {}).get("length", 0) == 0
                    and all(ld and ld["num_running"] == 0 and ld["num_waiting"] == 0 and ld["kv_blocks_used"] == 0
                            and ld.get("num_waiting_for_kv", 0) == 0 for ld in loads)
                    and all(t is None or t["active"] == 0 for t in transfers)):
                return last
            time.sleep(0.1)
        raise AssertionError(f"server did not return to idle: {last}")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop with `sig` (SIGKILL after 30 s), then assert no worker and no shared memory outlived it.
        Returns the server's exit code."""
        if self.proc is None:
            return None
        pids = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code, self.proc = self.proc.returncode, None
        deadline = time.time() + 10
        while time.time() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.1)
        orphans = [p for p in pids if pid_alive(p)]
        for p in orphans:
            os.kill(p, signal.SIGKILL)
        # Other test runs on this host have segments of their own: only this server's are its leaks.
        # Before it was ready its cluster id is unknown: its workers' segments end with their pids.
        if self.cluster_id:
            def mine(n: str) -> bool:
                return n.startswith(f"splitserve-{self.cluster_id}-")
        else:
            own_pids = {str(p) for p in pids}

            def mine(n: str) -> bool:
                return n.startswith("splitserve-") and n.rsplit("-", 1)[-1] in own_pids
        leaked = sorted(n for n in shm_files() - self.shm_before if mine(n))
        for name in leaked:
            shm.unlink(name)
        log = self.read_log() if orphans or leaked else ""
        if self._own_log:
            self.remove_log()
        if self.check_leaks:
            assert not orphans, f"processes outlived the server: {orphans}\n{log}"
            assert not leaked, f"shared memory outlived the server: {leaked}\n{log}"
        return code

    def remove_log(self) -> None:
        try:
            os.unlink(self.log_path)
        except FileNotFoundError:
            pass
        OWN_LOGS.discard(self.log_path)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
