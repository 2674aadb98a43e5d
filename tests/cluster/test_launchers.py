"""The launcher seam, the worker state enum, elastic pool bookkeeping (a fake launcher, no worker
processes) and the Ray resource flags (parsed without importing ray)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from splitserve.cluster.elastic import ScaleError, UnknownWorker
from splitserve.cluster.gateway import Cluster, PoolSpec
from splitserve.cluster.launchers import LocalLauncher, WorkerSpec, WorkerState
from splitserve.cluster.resources import actor_options, bundle, parse_resources
from splitserve.cluster.supervision import WorkerHandle
from splitserve.config import EngineConfig

SECRET = "0123456789abcdef" * 3


class FakeLauncher:
    """Records what the cluster asks; its workers never start (no Ready ever arrives)."""

    kind = "fake"
    collector_host = None
    tcp_inbox = False

    def __init__(self, short: set[str] = frozenset()) -> None:
        self.started, self.stopped, self.killed, self.asked = [], [], [], []
        self.gone: dict[str, str] = {}
        self.short = short

    def start(self, spec, secret):
        self.started.append(spec)
        return spec.worker_id

    def pid(self, launch):
        return None

    def where(self, launch):
        return "node-" + launch

    def exited(self, launch):
        return self.gone.get(launch)

    def stop(self, launch):
        self.stopped.append(launch)
        self.gone[launch] = "stopped"

    def kill(self, launch):
        self.killed.append(launch)
        self.gone[launch] = "killed"

    def close(self):
        pass

    def request_capacity(self, role, count):
        self.asked.append((role, count))
        return f"no room for {count} {role}" if role in self.short else None


def _cluster(launcher, pools=None) -> Cluster:
    pools = pools or [PoolSpec("prefill", 1, EngineConfig(model="m", threads=3)),
                      PoolSpec("decode", 1, EngineConfig(model="m", threads=5))]
    return Cluster(pools, frozenset({2}), secret=SECRET, launcher=launcher)


async def _close(cluster: Cluster) -> None:
    await cluster.shutdown()


def test_worker_state_is_an_explicit_enum():
    w = WorkerHandle("d-0", "decode", None, "")
    assert w.state is WorkerState.STARTING
    w.state = "ready"  # a state's name is accepted and stored as the enum
    assert w.state is WorkerState.READY and w.state == "ready" and str(w.state) == "ready"
    with pytest.raises(ValueError):
        w.state = "sleepy"
    assert [s.value for s in WorkerState] == ["starting", "ready", "silent", "draining", "dead"]


def test_worker_spec_command_line():
    spec = WorkerSpec("decode-3", "decode", EngineConfig(model="m"), "ipc:///x", "ipc:///g", "c-decode-3", (2, 1), "INFO")
    argv = spec.argv("tcp://10.0.0.2:0", "tcp://10.0.0.1:7000", 42)
    assert argv[:3] == [sys.executable, "-m", "splitserve.cluster.worker"]
    got = dict(zip(argv[3::2], argv[4::2]))
    assert got["--inbox"] == "tcp://10.0.0.2:0" and got["--gateway"] == "tcp://10.0.0.1:7000"
    assert got["--parent-pid"] == "42" and got["--cluster-id"] == "c-decode-3" and got["--eos"] == "[1, 2]"


def test_local_launcher_reports_exits_and_stops():
    launcher = LocalLauncher()
    p = subprocess.Popen(["sleep", "60"])
    assert launcher.pid(p) == p.pid and launcher.exited(p) is None and launcher.where(p) is None
    launcher.stop(p)
    p.wait(timeout=10)
    assert launcher.exited(p) == "exit code -15"
    q = subprocess.Popen(["sleep", "60"])
    launcher.kill(q)
    assert launcher.exited(q) == "exit code -9"
    assert launcher.request_capacity("decode", 100) is None


def test_scale_launches_and_drains_through_the_launcher():
    async def scenario():
        launcher = FakeLauncher(short={"decode"})
        c = _cluster(launcher)
        for w in c.workers.values():
            c._spawn(w)
        assert [s.worker_id for s in launcher.started] == ["prefill-0", "decode-1"]
        result = c.scale(prefill=3, decode=2)
        assert result.started == ["prefill-2", "prefill-3", "decode-4"] and result.draining == []
        assert result.targets == {"prefill": 3, "decode": 2} and c.targets == result.targets
        assert launcher.asked == [("prefill", 2), ("decode", 1)] and result.capacity == {"decode": "no room for 1 decode"}
        new = {s.worker_id: s for s in launcher.started}
        assert new["prefill-3"].engine.threads == 3 and new["decode-4"].engine.threads == 5  # each pool's config
        assert c.pools_info()["prefill"] == {"target": 3, "starting": 3, "ready": 0, "silent": 0, "draining": 0,
                                             "dead": 0}
        down = c.scale(prefill=1)
        assert len(down.draining) == 2 and c.targets["prefill"] == 1
        assert all(c.workers[w].state is WorkerState.DRAINING for w in down.draining)
        await asyncio.sleep(0.3)  # not ready: stopped at once; the supervision loop removes them
        assert sorted(launcher.stopped) == sorted(down.draining)
        for wid in down.draining:
            c._on_worker_death(c.workers[wid], "stopped")
        assert down.draining == ["prefill-0", "prefill-2"]  # none is serving yet: by id
        assert sorted(c.workers) == ["decode-1", "decode-4", "prefill-3"]
        assert c.num_restarts == 0  # drained workers are not restarted
        await _close(c)

    asyncio.run(scenario())


def test_scale_and_drain_refuse_bad_input_and_change_nothing():
    async def scenario():
        launcher = FakeLauncher()
        c = _cluster(launcher)
        for kwargs, match in [({}, "prefill and/or decode"), ({"decode": 0}, "at least one decode"),
                              ({"prefill": -1}, "between 0 and"), ({"decode": 65}, "between 0 and"),
                              ({"decode": 1.0}, "integer"), ({"decode": True}, "integer")]:
            with pytest.raises(ScaleError, match=match):
                c.scale(**kwargs)
        with pytest.raises(ScaleError, match="deadline_s"):
            c.scale(decode=2, drain_deadline_s=-1)
        with pytest.raises(UnknownWorker):
            c.drain("decode-9")
        with pytest.raises(ScaleError, match="last decode worker"):
            c.drain("decode-1")
        assert launcher.started == [] and c.targets == {"prefill": 1, "decode": 1}
        assert {w.state for w in c.workers.values()} == {WorkerState.STARTING}
        await _close(c)

        agg = _cluster(FakeLauncher(), [PoolSpec("both", 1, EngineConfig(model="m"))])
        with pytest.raises(ScaleError, match="no prefill pool"):
            agg.scale(prefill=1)
        assert agg.scale(decode=2).targets == {"both": 2}
        await _close(agg)

    asyncio.run(scenario())


def test_a_worker_drained_while_starting_is_never_routed_to():
    async def scenario():
        from splitserve.cluster import messages as m

        c = _cluster(FakeLauncher())
        c.scale(decode=2)
        c.drain("decode-2")
        c._on_ready(m.Ready("decode-2", 0, "decode", "ipc:///nowhere", 10, 16, 128, 100, 0.1, "h"))
        assert c.workers["decode-2"].state is WorkerState.DRAINING and "decode-2" not in c.router.workers
        await _close(c)

    asyncio.run(scenario())


def test_ray_resource_flags():
    assert parse_resources(None, "--x") == {}
    r = parse_resources('{"num_cpus": 2, "num_gpus": 1, "memory": 1e9, "prefill": 1}', "--x")
    assert actor_options(r, threads=4) == {"num_cpus": 2.0, "num_gpus": 1.0, "memory": 1000000000,
                                           "resources": {"prefill": 1.0}}
    assert actor_options({}, threads=3) == {"num_cpus": 3.0}  # default: its threads in CPUs
    assert bundle(r, threads=4) == {"CPU": 2.0, "GPU": 1.0, "memory": 1e9, "prefill": 1.0}
    for bad in ("{", "[]", '{"a": "1"}', '{"a": -1}', '{"a": true}', '{"": 1}'):
        with pytest.raises(ValueError, match="--x"):
            parse_resources(bad, "--x")
