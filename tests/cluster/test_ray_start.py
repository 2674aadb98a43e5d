"""`serve --ray` start and stop: with no Ray cluster running it starts a local one and stops it on
exit (no Ray process outlives the server); an unreachable address or bad resources JSON is a
clear start-up error with a non-zero exit and nothing left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from splitserve.testing import ServerProcess, descendants, free_port
from tests.cluster.conftest import TINY_ARGS, completion
from tests.cluster.ray_helpers import processes_mentioning, wait_gone

pytest.importorskip("ray")

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_tmpdir():
    # Its own Ray temp dir: `auto` finds no other test's cluster, and every process this server's
    # Ray starts names the directory on its command line.
    path = tempfile.mkdtemp(prefix="ss-ray-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_ray_auto_starts_a_local_ray_and_stops_it_with_the_server(tiny_served, ray_tmpdir):
    env = dict(os.environ, RAY_TMPDIR=ray_tmpdir)
    env.pop("RAY_ADDRESS", None)
    s = ServerProcess("--model", tiny_served, *TINY_ARGS, "--disaggregated", "--ray", env=env).start()
    try:
        ray_procs = processes_mentioning(ray_tmpdir)
        assert any("raylet" in open(f"/proc/{p}/cmdline").read() for p in ray_procs)
        assert set(ray_procs) <= set(descendants(s.proc.pid))  # started by this server
        info = s.cluster()
        assert info["launcher"] == "ray" and {w["state"] for w in info["workers"]} == {"ready"}
        assert completion(s.base_url, "Hello from Ray", 8)
        s.wait_idle()
    finally:
        s.stop()  # asserts that no descendant (Ray's processes included) outlived it
    assert wait_gone(lambda: processes_mentioning(ray_tmpdir)) == []


def _serve_fails(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitserve", "serve", "--port", str(free_port()), *args],
                          capture_output=True, text=True, timeout=120, env=env)


def test_an_unreachable_ray_address_is_a_clear_startup_error(tiny_served, ray_tmpdir):
    env = dict(os.environ, RAY_TMPDIR=ray_tmpdir)
    r = _serve_fails("--model", tiny_served, *TINY_ARGS, "--disaggregated", "--ray", f"127.0.0.1:{free_port()}",
                     env=env)
    assert r.returncode == 1
    assert "cannot reach the Ray cluster at 127.0.0.1:" in r.stderr
    assert processes_mentioning(ray_tmpdir) == []


@pytest.mark.parametrize("args,message", [
    (("--disaggregated", "--ray", "--prefill-resources", "{prefill: 1}"), "--prefill-resources is not valid JSON"),
    (("--disaggregated", "--ray", "--decode-resources", "[1]"), "must be a JSON object"),
    (("--disaggregated", "--ray", "--decode-resources", '{"decode": -1}'), "must be a number between 0"),
    (("--disaggregated", "--ray", "--decode-resources", '{"num_gpus": "one"}'), "must be a number between 0"),
    (("--disaggregated", "--decode-resources", '{"decode": 1}'), "place workers on Ray: add --ray"),
    (("--disaggregated", "--ray-placement", "spread"), "place workers on Ray: add --ray"),
    (("--ray", "--prefill-resources", '{"prefill": 1}'), "--prefill-resources needs --disaggregated"),
    (("--disaggregated", "--ray", "nohost"), "give auto or the head node's HOST:PORT"),
])
def test_bad_ray_flags_are_clear_errors(tiny_served, ray_tmpdir, args, message):
    r = _serve_fails("--model", tiny_served, *TINY_ARGS, *args, env=dict(os.environ, RAY_TMPDIR=ray_tmpdir))
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert processes_mentioning(ray_tmpdir) == []
