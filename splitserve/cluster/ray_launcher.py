"""Workers as Ray actors (`splitserve serve --ray`). Imported only then: nothing else imports ray.

Ray owns placement (each worker's actor asks for its pool's resources: CPUs, GPUs, custom
resources naming a kind of machine), starting the process on the chosen node, and noticing when a
node dies. splitserve keeps the rest: the gateway, the router, the scheduler, admission,
heartbeats and failover, and every byte of KV (shared memory on one host, the TCP data channel
across hosts, never Ray's object store).

Each actor starts the ordinary worker process (`python -m splitserve.cluster.worker`) as its
child on its node and waits on it, so a Ray-placed worker runs exactly the code a local one runs,
and its data path does not pass through Ray at all. The child dies with the actor (PDEATHSIG and
its parent check), and the actor's `wait` call resolves (with an error) the moment the actor or
its node is gone: the gateway's supervision loop polls it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
import subprocess
import threading
from dataclasses import dataclass, field

# Before ray is imported (it reads this then): Ray's C++ failure handler would print a stack trace
# for the SIGTERM that stops the server.
os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")

import ray  # noqa: E402

from splitserve.cluster.launchers import WorkerSpec
from splitserve.cluster.resources import actor_options, bundle
from splitserve.cluster.worker import SECRET_ENV
from splitserve.process_tree import descendants, end_all

log = logging.getLogger("splitserve.ray")

CONNECT_TIMEOUT_S = 5.0
STOP_GRACE_S = 5.0


class WorkerActor:
    """Runs one splitserve worker process on the node Ray placed this actor on."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.started = threading.Event()

    def start(self, spec: WorkerSpec, secret: bytes, niceness: int) -> tuple[int, str]:
        """Start the worker process; returns its pid and this node's Ray id."""
        node_ip = ray.util.get_node_ip_address()
        inbox = f"tcp://{node_ip}:0"  # peers on other nodes reach it here
        env = dict(os.environ, **{SECRET_ENV: secret.decode()})
        env.pop("OMP_NUM_THREADS", None)  # Ray sets it from num_cpus; the worker sets its own threads
        self.proc = subprocess.Popen(spec.argv(inbox, spec.gateway_addr, os.getpid()), env=env)
        self.started.set()
        _renice(self.proc.pid, niceness)
        return self.proc.pid, ray.get_runtime_context().get_node_id()

    def wait(self) -> int:
        self.started.wait()
        return self.proc.wait()

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()


def _renice(pid: int, niceness: int) -> None:
    """Ray runs its worker processes at niceness 15 (`RAY_worker_niceness`): an engine under it
    loses the CPU to everything else on a busy host (measured: TTFT +34% on a shared 2-core VM).
    Give the worker the gateway's niceness back, where this user may."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, niceness)
    except OSError as exc:
        log.warning(
            "worker pid %d keeps Ray's niceness %d (%s): start the Ray nodes with RAY_worker_niceness=%d "
            "or give this user CAP_SYS_NICE", pid, os.getpriority(os.PRIO_PROCESS, pid), exc, niceness)


@dataclass
class RayLaunch:
    actor: object
    start_ref: object
    run_ref: object
    role: str
    pid: int | None = None
    node_id: str | None = None
    gone: str | None = None
    killed: bool = field(default=False)
    slot: int | None = None  # its bundle in the pool's placement group


class PoolGroup:
    """One pool's placement group: a bundle per worker, STRICT_SPREAD (one per node) or PACK.
    A restarted worker takes its bundle again; workers beyond it (the pool grew) go unplaced."""

    STRATEGIES = {"spread": "STRICT_SPREAD", "pack": "PACK"}

    def __init__(self, group, size: int) -> None:
        self.group, self.free = group, list(range(size))

    @classmethod
    def create(cls, bundle: dict[str, float], count: int, placement: str) -> "PoolGroup":
        from ray.util.placement_group import placement_group

        return cls(placement_group([dict(bundle)] * count, strategy=cls.STRATEGIES[placement]), count)

    def take(self) -> int | None:
        return self.free.pop(0) if self.free else None

    def give_back(self, slot: int) -> None:
        self.free.append(slot)
        self.free.sort()

    def strategy(self, slot: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=slot)

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self.group)


def _check_reachable(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RuntimeError(f"--ray {address!r}: give auto or the head node's HOST:PORT (e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise RuntimeError(f"cannot reach the Ray cluster at {address}: {exc}") from None


class RayLauncher:
    kind = "ray"
    tcp_inbox = True

    def __init__(self, address: str, resources: dict[str, dict[str, float]], threads: dict[str, int | None],
                 placement: str | None = None, counts: dict[str, int] | None = None) -> None:
        """`resources`/`threads`/`counts`: per role. `placement` "spread" or "pack": each pool's
        first `counts[role]` workers go into a placement group (STRICT_SPREAD: one per node; PACK).
        Connects (or starts a local Ray) on its own thread, which lives until `close`: Ray ties
        the processes a local start creates to that thread."""
        self.address = address
        self.resources, self.threads = resources, threads
        self.started_ray = False
        self.launches: list[RayLaunch] = []
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="splitserve-ray")
        try:
            self._thread.submit(self._connect).result()
        except BaseException:
            self._thread.shutdown(wait=False)
            raise
        self.collector_host = ray.util.get_node_ip_address()
        self._actor_cls = ray.remote(WorkerActor)
        self.groups = {role: PoolGroup.create(bundle(resources.get(role, {}), threads.get(role)), n, placement)
                       for role, n in (counts or {}).items() if placement and n > 0}

    def _connect(self) -> None:
        kwargs = dict(namespace="splitserve", logging_level=logging.WARNING, include_dashboard=False,
                      configure_logging=False)
        if self.address != "auto":
            _check_reachable(self.address)
            ray.init(address=self.address, **kwargs)
            return
        try:
            ray.init(address="auto", **kwargs)
        except ConnectionError:  # no cluster running: start one here, and stop it in close()
            ray.init(**kwargs)
            self.started_ray = True
        log.info("connected to Ray (%s)", "a local instance this server started" if self.started_ray else "running")

    # ---- WorkerLauncher ----------------------------------------------------------------------
    def start(self, spec: WorkerSpec, secret: bytes) -> RayLaunch:
        opts = actor_options(self.resources.get(spec.role, {}), self.threads.get(spec.role))
        group = self.groups.get(spec.role)
        slot = group.take() if group else None
        if slot is not None:
            opts["scheduling_strategy"] = group.strategy(slot)
        actor = self._actor_cls.options(max_concurrency=4, name=None, **opts).remote()
        start_ref = actor.start.remote(spec, secret, os.getpriority(os.PRIO_PROCESS, 0))
        launch = RayLaunch(actor, start_ref, actor.wait.remote(), spec.role, slot=slot)
        self.launches.append(launch)
        return launch

    def pid(self, launch: RayLaunch) -> int | None:
        if launch.pid is None and launch.gone is None:
            done, _ = ray.wait([launch.start_ref], timeout=0)
            if done:
                try:
                    launch.pid, launch.node_id = ray.get(done[0])
                except ray.exceptions.RayError:
                    pass
        return launch.pid

    def where(self, launch: RayLaunch) -> str | None:
        self.pid(launch)
        return launch.node_id

    def exited(self, launch: RayLaunch) -> str | None:
        if launch.gone is None:
            done, _ = ray.wait([launch.run_ref], timeout=0)
            if done:
                try:
                    launch.gone = f"exit code {ray.get(done[0])}"
                except ray.exceptions.RayError as exc:  # the actor or its node died
                    launch.gone = f"its Ray actor died ({type(exc).__name__})"
                self._forget(launch)
        return launch.gone

    def stop(self, launch: RayLaunch) -> None:
        if launch.gone is None:
            launch.actor.terminate.remote()

    def kill(self, launch: RayLaunch) -> None:
        if not launch.killed:
            launch.killed = True
            ray.kill(launch.actor, no_restart=True)

    def close(self) -> None:
        for launch in list(self.launches):
            self.kill(launch)
        self.launches.clear()
        for group in self.groups.values():
            group.remove()
        ours = descendants(os.getpid()) if self.started_ray else []  # the local Ray this server started
        try:
            self._thread.submit(ray.shutdown).result(timeout=60)
        finally:
            self._thread.shutdown(wait=True)
        killed = end_all(ours, STOP_GRACE_S)  # no Ray process outlives the server that started it
        if killed:
            log.warning("killed %d Ray process(es) still running %.0fs after ray.shutdown()", len(killed), STOP_GRACE_S)

    def request_capacity(self, role: str, count: int) -> str | None:
        want = bundle(self.resources.get(role, {}), self.threads.get(role))
        free = ray.available_resources()
        short = {k: v * count for k, v in want.items() if free.get(k, 0.0) < v * count}
        if not short:
            return None
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[want] * count)
            asked = "asked Ray's autoscaler for them"
        except Exception as exc:  # no autoscaler on this cluster
            asked = f"Ray's autoscaler could not be asked ({exc})"
        return (f"Ray has not the free resources for {count} more {role} worker(s) (need {short}, free "
                f"{ {k: free.get(k, 0.0) for k in short} }); they start when resources appear; {asked}")

    def _forget(self, launch: RayLaunch) -> None:
        if not launch.killed:
            launch.killed = True
            ray.kill(launch.actor, no_restart=True)  # the actor outlived its worker: end it too
        if launch in self.launches:
            self.launches.remove(launch)
        if launch.slot is not None:
            self.groups[launch.role].give_back(launch.slot)
            launch.slot = None
