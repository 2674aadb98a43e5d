"""Workers as Ray actors on a three-node Ray cluster (`ray.cluster_utils.Cluster`, one host):
the head node carries a "prefill" resource, two nodes a "decode" resource each. KV moves over the
TCP data channel (`--kv-transport tcp`), never through Ray.

Greedy output equals the aggregated local server's; a node removed mid-stream takes its decode
worker with it, every stream completes identical, and Ray recreates the worker when a node with
the resource joins; pools scale on Ray (a shortage is reported, the worker starts when resources
appear). After every scenario: nothing in flight, no KV held; after the server: no worker
process, no actor process, no shared memory left.
"""

from __future__ import annotations

import asyncio
import json
import os

import httpx
import pytest

from splitserve.testing import ServerProcess, wait_for
from tests.cluster.conftest import PROMPTS, TINY_ARGS, async_wait_for, completion, stream_text
from tests.cluster.ray_helpers import actor_processes, alive, parent_of, wait_gone, worker_processes

ray_cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = pytest.mark.slow

LONG = 300
STREAMED = [PROMPTS[1], PROMPTS[2]]


@pytest.fixture(scope="module")
def nodes():
    c = ray_cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"prefill": 2}, "include_dashboard": False})
    decode = [c.add_node(num_cpus=2, resources={"decode": 1}) for _ in range(2)]
    c.wait_for_nodes()
    c.decode_nodes = decode
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_served):
    with ServerProcess("--model", tiny_served, *TINY_ARGS) as s:
        out = {p: completion(s.base_url, p, 32) for p in PROMPTS[:4]}
        out.update({("stream", p): asyncio.run(_stream(s.base_url, p)) for p in STREAMED})
        s.wait_idle()
        return out


async def _stream(base_url: str, prompt: str) -> str:
    async with httpx.AsyncClient(timeout=300) as http:
        return await stream_text(http, base_url, prompt, LONG)


@pytest.fixture(scope="module")
def server(nodes, tiny_served):
    s = ServerProcess("--model", tiny_served, *TINY_ARGS, "--disaggregated", "--decode-workers", "2",
                      "--kv-transport", "tcp", "--ray", nodes.address,
                      "--prefill-resources", json.dumps({"num_cpus": 1, "prefill": 1}),
                      "--decode-resources", json.dumps({"num_cpus": 1, "decode": 1}))
    s.start()
    cluster_id = s.cluster_id
    try:
        yield s
    finally:
        actors = actor_processes(cluster_id)
        s.stop()
        assert wait_gone(lambda: worker_processes(cluster_id)) == []
        assert wait_gone(lambda: alive(actors)) == []


def _workers(s, role=None):
    return [w for w in s.cluster()["workers"] if role is None or w["role"] == role]


def test_workers_are_placed_by_resources_and_output_equals_aggregated(nodes, server, reference):
    info = server.cluster()
    assert info["launcher"] == "ray" and all(w["launcher"] == "ray" for w in info["workers"])
    decode_nodes = {n.node_id for n in nodes.decode_nodes}
    [prefill] = _workers(server, "prefill")
    assert prefill["node"] == nodes.head_node.node_id
    assert {w["node"] for w in _workers(server, "decode")} == decode_nodes  # one per node
    assert all(w["address"].startswith("tcp://") for w in info["workers"])
    # Ray runs its workers at niceness 15; the engines get the gateway's back.
    assert {os.getpriority(os.PRIO_PROCESS, w["pid"]) for w in info["workers"]} == {
        os.getpriority(os.PRIO_PROCESS, server.proc.pid)}
    for prompt in PROMPTS[:4]:
        assert completion(server.base_url, prompt, 32) == reference[prompt]
    info = server.wait_idle()
    decode = [w for w in info["workers"] if w["role"] == "decode"]
    moved = sum(w["transfers"]["bytes_received"] for w in decode)
    assert moved > 0 and sum(w["transfers"]["bytes_direct"] for w in decode) > moved // 2  # the TCP data port


def test_a_node_removed_mid_stream_loses_no_stream_and_ray_recreates_its_worker(nodes, server, reference):
    victim = {}

    async def scenario():
        async with httpx.AsyncClient(timeout=300) as http:
            started = asyncio.Event()

            async def first():
                def tick(n):
                    if n == 10:
                        started.set()
                return await stream_text(http, server.base_url, STREAMED[0], LONG, on_token=tick)

            async def second():
                await started.wait()

                def tick(n):
                    if n == 10 and not victim:
                        victim["go"] = True
                return await stream_text(http, server.base_url, STREAMED[1], LONG, on_token=tick)

            async def remove_node():
                await async_wait_for(lambda: victim.get("go"), step=0.02)
                busy = await async_wait_for(lambda: [w for w in _workers(server, "decode")
                                                     if w["load"] and w["load"]["num_running"] > 0], step=0.02)
                node = [n for n in nodes.decode_nodes if n.node_id == busy[0]["node"]][0]
                victim.update(worker=busy[0]["id"], node=node.node_id)
                await asyncio.to_thread(nodes.remove_node, node)
                nodes.decode_nodes.remove(node)

            return await asyncio.gather(first(), second(), remove_node())

    replaced = server.cluster()["requests_replaced"]
    a, b, _ = asyncio.run(scenario())
    assert a == reference[("stream", STREAMED[0])] and b == reference[("stream", STREAMED[1])]
    assert server.cluster()["requests_replaced"] > replaced
    # Its worker waits for a node with a free "decode" resource, then Ray places it there.
    wait_for(lambda: [w for w in _workers(server) if w["id"] == victim["worker"]][0]["state"] == "starting")
    nodes.decode_nodes.append(nodes.add_node(num_cpus=2, resources={"decode": 1}))
    wait_for(lambda: [w for w in _workers(server) if w["id"] == victim["worker"]][0]["state"] == "ready")
    w = [w for w in _workers(server) if w["id"] == victim["worker"]][0]
    assert w["restarts"] >= 1 and w["node"] == nodes.decode_nodes[-1].node_id != victim["node"]
    server.wait_idle()


def test_pools_scale_on_ray_and_a_shortage_is_reported(nodes, server, reference):
    async def scenario():
        async with httpx.AsyncClient(timeout=300) as http:
            async def load():
                out = []
                for _ in range(3):
                    out += await asyncio.gather(*(http.post(server.base_url + "/v1/completions", json={
                        "prompt": p, "max_tokens": 32, "temperature": 0, "ignore_eos": True}) for p in PROMPTS[:4]))
                return out

            up = await http.post(server.base_url + "/cluster/scale", json={"decode": 3})
            assert up.status_code == 200, up.text
            [new] = up.json()["started"]
            assert "decode" in up.json()["capacity"]  # both decode nodes are taken
            answers = await load()  # served meanwhile by the two ready decode workers
            assert [w for w in await asyncio.to_thread(_workers, server) if w["id"] == new][0]["state"] == "starting"
            nodes.decode_nodes.append(nodes.add_node(num_cpus=2, resources={"decode": 1}))  # main thread: Ray's signals
            await async_wait_for(lambda: [w for w in _workers(server) if w["id"] == new][0]["state"] == "ready")
            answers += await load()
            pids = {w["id"]: w["pid"] for w in await asyncio.to_thread(_workers, server)}
            down = await http.post(server.base_url + "/cluster/scale", json={"decode": 2})
            assert down.status_code == 200 and len(down.json()["draining"]) == 1
            [drained] = down.json()["draining"]
            gone = [pids[drained], parent_of(pids[drained])]
            loading = asyncio.create_task(load())
            await async_wait_for(lambda: len(_workers(server, "decode")) == 2)
            return answers + await loading, new, gone

    answers, new, gone = asyncio.run(scenario())
    assert len(answers) == 36
    for r in answers:
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == reference[json.loads(r.request.content)["prompt"]]
    info = server.wait_idle()
    assert info["pools"]["decode"]["target"] == 2 and len(_workers(server, "decode")) == 2
    # The drained worker's process and its actor are gone; the others are up.
    assert wait_gone(lambda: alive(gone)) == []
    assert len(worker_processes(server.cluster_id)) == 3 and len(actor_processes(server.cluster_id)) == 3


def test_a_spread_pool_has_one_worker_per_node(nodes, tiny_served, reference):
    # Only CPUs asked: without the placement group Ray may put both on one node.
    with ServerProcess("--model", tiny_served, *TINY_ARGS, "--disaggregated", "--prefill-workers", "0",
                       "--decode-workers", "2", "--ray", nodes.address, "--ray-placement", "spread",
                       "--decode-resources", json.dumps({"num_cpus": 1})) as s:
        decode = _workers(s, "decode")
        assert len({w["node"] for w in decode}) == 2 and all(w["node"] for w in decode)
        assert completion(s.base_url, PROMPTS[0], 32) == reference[PROMPTS[0]]
        s.wait_idle()
        cluster_id = s.cluster_id
    assert wait_gone(lambda: worker_processes(cluster_id)) == []
