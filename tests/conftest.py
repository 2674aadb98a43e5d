from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite tests the source: a `splitserve accel build` in the user's cache is ignored (set
# SPLITSERVE_PURE_PYTHON= to run everything against it). tests/test_accel.py tests the build.
os.environ.setdefault("SPLITSERVE_PURE_PYTHON", "1")


_OWN_WEIGHT_CACHE: list[str] = []


def pytest_configure(config):
    # One dequantized-weights cache per test session (servers the tests start inherit it),
    # removed when the session ends (~270 MB per model and dtype).
    if "SPLITSERVE_WEIGHT_CACHE" not in os.environ:
        import tempfile

        os.environ["SPLITSERVE_WEIGHT_CACHE"] = tempfile.mkdtemp(prefix="splitserve-weights-")
        _OWN_WEIGHT_CACHE.append(os.environ["SPLITSERVE_WEIGHT_CACHE"])


def pytest_unconfigure(config):
    import shutil

    from splitserve.testing import remove_own_logs

    for path in _OWN_WEIGHT_CACHE:
        shutil.rmtree(path, ignore_errors=True)
    remove_own_logs()  # servers' logs a failed test left behind


# The demo model served aggregated on one thread: the server most end-to-end modules need.
DEMO_AGGREGATED = ("--model", "demo", "--max-model-len", "2048", "--threads", "1")


class SharedServers:
    """Servers started once per session, shared by every module that asks for the same arguments
    (a start costs 5-30 s on 2 busy cores). Each is stopped, with its leak checks, at session end."""

    def __init__(self) -> None:
        self.servers: dict[tuple[str, ...], object] = {}

    def get(self, *args: str):
        from splitserve.testing import ServerProcess

        if args not in self.servers:
            self.servers[args] = ServerProcess(*args).start()
        return self.servers[args]

    def stop_all(self) -> None:
        failures = []
        for server in self.servers.values():
            try:
                server.stop()
            except AssertionError as exc:
                failures.append(exc)
        if failures:
            raise failures[0]


@pytest.fixture(scope="session")
def shared_servers():
    pool = SharedServers()
    yield pool
    pool.stop_all()


@pytest.fixture(scope="session")
def tiny_model_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny-models"))
