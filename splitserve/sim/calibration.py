"""`local-cpu`: step times of the real engine on this machine, measured and fitted.

`splitserve simulate calibrate` loads the real `LLMEngine` (the demo model by default), runs
steps of known shape (prefill chunks of several sizes, decode batches at several context
lengths, mixed steps) through the same schedule -> execute -> update path the worker runs,
times each, and fits

    step_s = c0 + c_tok * T + c_tok_mid * max(T - tok_knee, 0) + c_tok_big * max(T - 64, 0) + c_seq * B
             + c_pair * A + c_kv * K + c_kv_big * max(K - kv_knee, 0) + c_samp * S + c_chunk * P
             + c_mixed * [P and B > P]

(tok_knee: a step of a few tokens is bound by reading the weights once, whatever the batch; past
the knee each token adds matrix work. A straight line through both regimes predicted batch-1 and
batch-2 decode steps 10-25% too fast, and those are the steps of a lightly loaded decode worker.
P prefill chunks, i.e. chunks of more than one token. c_mixed is a step that mixes decodes and
prefill chunks: on the reference path it runs both attention paths; on the fused path it is
one call, and the fit gives the term 0-6 ms depending on the day, so it stays and the data decide.)

(T tokens computed, B sequences, A attention (query, key) pairs, K KV tokens read, S samples)
by non-negative least squares on relative error. The file keeps the coefficients, every raw
sample, the date, the machine and the engine settings; re-run the command whenever the engine
gets faster. A model other than the calibrated one is scaled: per-token terms by active
parameters, attention terms by KV size.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone

FEATURES = ("c0", "c_tok", "c_seq", "c_pair", "c_kv", "c_samp", "c_tok_big", "c_kv_big", "c_chunk", "c_mixed",
            "c_tok_mid")
BIG_STEP = 64  # tokens per step beyond which each token costs c_tok + c_tok_big (CPU caches)
KV_KNEES = (4096, 8192, 12288, 16384, 24576)  # candidate KV tokens per step beyond which the
# decode attention's gather no longer fits in the CPU's last-level cache (fitted: `kv_knee`)
TOK_KNEES = (2, 4, 8, 16)  # candidate tokens per step up to which a step is weight-bound (fitted: `tok_knee`)
DEFAULT_PATH = os.path.join(os.path.dirname(__file__), "data", "local_cpu.json")


@dataclass
class Calibration:
    model: str
    coef: dict[str, float]
    # The live server's own costs (gateway, ZeroMQ, HTTP, client, the other worker), measured by
    # benchmarks/sim_vs_live.py --fit-overhead: step_s, token_s, request_s (seconds) and
    # live_steps {role: {decode_extra_s, prefill_scale}}; nothing added when not measured.
    server: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    date: str = ""
    machine: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)
    fit: dict = field(default_factory=dict)
    # Step slowdown while another engine on this host computes ({"decode": f, "prefill": f}),
    # measured by `splitserve simulate calibrate --neighbor` (splitserve/sim/neighbor.py).
    neighbor: dict = field(default_factory=dict)
    scale_tok: float = 1.0
    # This role's live-server terms (for_role), not stored: seconds added to a decode-only step,
    # factor on a step with a prefill chunk.
    live_step: tuple[float, float] = (0.0, 1.0)
    scale_kv: float = 1.0
    # Another model's weight-bound floor beyond the calibrated model's (scaled_for), not stored.
    floor_extra: float = 0.0

    def __post_init__(self) -> None:
        c = self.coef
        self._c = tuple(float(c.get(k, 0.0)) for k in FEATURES)
        self._knee = float(c.get("kv_knee", 1e18))
        self._tok_knee = float(c.get("tok_knee", 1e18))
        self._step_extra = float(self.server.get("step_s", 0.0))
        self._token_extra = float(self.server.get("token_s", 0.0))

    def step_time(self, T: int, S: int, A: int, K: int, B: int, P: int = 0) -> float:
        c0, ct, cs, cp, ck, cm, cb, ckb, cc, cx, cmid = self._c
        big = T - BIG_STEP if T > BIG_STEP else 0
        mid = T - self._tok_knee if T > self._tok_knee else 0
        kbig = K - self._knee if K > self._knee else 0
        t = (c0 + self.floor_extra + self.scale_tok * (ct * T + cmid * mid + cb * big + cm * S)
             + cs * B + self.scale_kv * (cp * A + ck * K + ckb * kbig))
        if P:
            t += cc * P + (cx if B > P else 0.0)
        # The live-server terms scale or extend the engine's step; the worker loop's own terms
        # (outside the step) come after.
        t = t * self.live_step[1] if P else t + self.live_step[0]
        return t + self._step_extra + self._token_extra * S

    @property
    def request_overhead_s(self) -> float:
        """Added to each request's TTFT and end (HTTP + tokenization + queue hand-off)."""
        return float(self.server.get("request_s", 0.0))

    def scaled_for(self, model) -> "Calibration":
        """This calibration applied to another model (a ModelSpec)."""
        from splitserve.sim.models import get_model

        base = get_model(self.model)
        if base.name == model.name:
            return self
        scale_tok = model.active_params / base.active_params
        # Below tok_knee a step is bound by reading the weights, which the fit keeps in c0 (not a
        # per-token term): a bigger model reads more. Take the floor as the knee's worth of token
        # work at the marginal rate (the ridge point, where weight reading equals compute) and
        # scale it with the parameters.
        knee = float(self.coef.get("tok_knee", 0.0))
        floor = (scale_tok - 1.0) * float(self.coef.get("c_tok_mid", 0.0)) * knee if knee < 1e9 else 0.0
        return replace(self, scale_tok=scale_tok, floor_extra=floor,
                       scale_kv=model.kv_elements_per_token() / base.kv_elements_per_token())

    def for_role(self, role: str) -> "Calibration":
        """This calibration for a worker of `role` (prefill, decode, both) inside the live server,
        as benchmarks/sim_vs_live.py --fit-overhead measured it (`server.live_steps[role]`, from
        the worker's own busy time against the simulator's over the same workload):
        `decode_extra_s` added to each decode-only step (short steps, stalled about the same time
        each by the processes that wake for every streamed token: gateway, client, ZeroMQ),
        `prefill_scale` on each step with a prefill chunk (long steps, slowed in proportion: the
        other worker in the shared cache and memory bandwidth, the KV shipped layer by layer).
        Nothing added where not measured."""
        got = self.server.get("live_steps", {}).get(role, {})
        f = (float(got.get("decode_extra_s", 0.0)), float(got.get("prefill_scale", 1.0)))
        if f == self.live_step:
            return self
        c = replace(self)
        c.live_step = f
        return c

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("scale_tok")
        d.pop("scale_kv")
        d.pop("live_step")
        d.pop("floor_extra")
        return {"kind": "splitserve.sim.calibration", "version": 1, **d}


def load_calibration(path: str | None = None) -> Calibration | None:
    path = path or os.environ.get("SPLITSERVE_CPU_CALIBRATION") or DEFAULT_PATH
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("kind") != "splitserve.sim.calibration":
        raise ValueError(f"{path} is not a splitserve calibration file")
    names = {"model", "coef", "server", "samples", "date", "machine", "engine", "fit", "neighbor"}
    return Calibration(**{k: v for k, v in data.items() if k in names})


# ---- fitting -------------------------------------------------------------------------------------
def _row(s: dict, knee: float, tok_knee: float) -> list[float]:
    P = s.get("P", 0)
    return [1.0, s["T"], s["B"], s["A"], s["K"], s["S"], max(s["T"] - BIG_STEP, 0), max(s["K"] - knee, 0),
            P, 1.0 if P and s["B"] > P else 0.0, max(s["T"] - tok_knee, 0)]


def _nnls(X, y):
    import numpy as np

    w = 1.0 / y
    active = list(range(X.shape[1]))
    coef = np.zeros(X.shape[1])
    for _ in range(X.shape[1]):
        sol, *_ = np.linalg.lstsq(X[:, active] * w[:, None], y * w, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))  # drop the most negative feature and refit
    return coef


def fit(samples: list[dict], reject: float = 0.35, max_rejected: float = 0.15) -> tuple[dict[str, float], dict]:
    """Non-negative least squares on relative error (each row divided by its measured time),
    over one row per measured shape (`by_tag`), for each pair of candidate knees (KV, tokens); the
    best pair wins.
    Shapes the fit misses by more than `reject` (a burst of other processes on a shared machine)
    are set aside and the fit repeated, at most `max_rejected` of them; they stay in the file."""
    import numpy as np

    rows = by_tag(samples)
    y = np.array([s["seconds"] for s in rows], dtype=float)
    best = None
    for knee, tok_knee in ((k, t) for k in KV_KNEES for t in TOK_KNEES):
        X = np.array([_row(s, knee, tok_knee) for s in rows], dtype=float)
        keep = np.ones(len(y), dtype=bool)
        coef = _nnls(X, y)
        for _ in range(4):
            rel = np.abs(X @ coef - y) / y
            worst = np.argsort(-rel)
            new = np.ones(len(y), dtype=bool)
            for i in worst[: int(max_rejected * len(y))]:
                if rel[i] > reject:
                    new[i] = False
            if (new == keep).all():
                break
            keep = new
            coef = _nnls(X[keep], y[keep])
        rel = np.abs(X @ coef - y) / y
        score = rel[keep].mean()
        if best is None or score < best[0]:
            best = (score, knee, tok_knee, coef, rel, keep)
    _, knee, tok_knee, coef, rel, keep = best
    out = {k: float(v) for k, v in zip(FEATURES, coef)}
    out["kv_knee"] = float(knee)
    out["tok_knee"] = float(tok_knee)
    return out, {"samples": len(samples), "shapes": len(rows), "shapes_used": int(keep.sum()),
                 "set_aside": [r["tag"] for r, k in zip(rows, keep) if not k],
                 "mean_abs_rel_error": float(rel[keep].mean()), "max_abs_rel_error": float(rel[keep].max())}


def by_tag(samples: list[dict]) -> list[dict]:
    """One row per measured shape (tag): the median repeat, the mean plan statistics (repeats of a
    shape differ by a few KV tokens). The median, not the fastest: a live step is a typical step,
    and the fastest of five consecutive decode steps runs 1-14% under their median here; a burst
    of other processes that slows most repeats is what `fit` sets aside."""
    groups: dict[str, list[dict]] = {}
    for s in samples:
        groups.setdefault(s.get("tag", repr((s["T"], s["B"], s["K"]))), []).append(s)
    out = []
    for tag, g in groups.items():
        row = {k: statistics.fmean(x.get(k, 0) for x in g) for k in ("T", "S", "A", "K", "B", "P")}
        row["seconds"] = statistics.median(x["seconds"] for x in g)
        row["tag"] = tag
        out.append(row)
    return out


# ---- measuring -----------------------------------------------------------------------------------
def _plan_stats(plan) -> dict:
    T = S = A = K = P = 0
    for c in plan.chunks:
        n, s = c.num_tokens, c.start
        T += n
        A += n * s + n * (n + 1) // 2
        K += s + n
        S += 1 if c.sample else 0
        P += 1 if n > 1 else 0
    return {"T": T, "S": S, "A": A, "K": K, "B": len(plan.chunks), "P": P}


def _timed_step(engine) -> dict | None:
    sched = engine.scheduler
    t0 = time.perf_counter()
    plan = sched.schedule()
    if plan.is_empty:
        return None
    result = engine.runner.execute(plan, sched.block_manager.req_blocks)
    sched.update(plan, result.sampled)
    dt = time.perf_counter() - t0
    return {**_plan_stats(plan), "seconds": dt}


def measure(engine, *, repeats: int = 3, quick: bool = False, log=print) -> list[dict]:
    """Samples of (plan shape, seconds) over prefill, decode and mixed steps."""
    from splitserve.engine.sampling_params import SamplingParams

    vocab = engine.arch.vocab_size
    counter = [0]

    def prompt(n: int) -> list[int]:
        counter[0] += 1
        base = counter[0] * 7919
        return [(base + i * 31) % (vocab - 10) + 5 for i in range(n)]

    def add(n_prompt: int, n_out: int) -> None:
        counter[0] += 1
        # temperature 1, the API's default: live requests that set nothing are sampled, not greedy
        engine.add_request(f"cal-{counter[0]}", prompt(n_prompt),
                           SamplingParams(max_tokens=n_out, ignore_eos=True, temperature=1.0, seed=counter[0]))

    def drain() -> None:
        while engine.has_unfinished():
            engine.step()

    def abort_all() -> None:
        for rid in list(engine.scheduler.requests):
            engine.abort_request(rid)

    samples: list[dict] = []

    def keep(tag: str, s: dict | None) -> None:
        if s is not None:
            s["tag"] = tag
            samples.append(s)

    budget = engine.config.max_num_batched_tokens
    prefill_lens = [16, 64, 256, budget] if quick else [8, 16, 32, 64, 128, 256, 384, budget]
    # warm-up: every prefill shape once (oneDNN builds kernels on first sight of a shape)
    for n in prefill_lens:
        add(n, 4)
        drain()
    for n in prefill_lens:
        for _ in range(repeats):
            add(n, 1)
            keep(f"prefill {n}", _timed_step(engine))
            drain()
    # chunked: a prompt longer than the budget, second chunk with context
    for total in ([2 * budget] if quick else [2 * budget, 3 * budget]):
        for _ in range(max(1, repeats - 1)):
            add(total, 1)
            k = 0
            while engine.has_unfinished():
                keep(f"chunked {total} #{k}", _timed_step(engine))
                k += 1
    batches = [1, 4, 16, 64] if quick else [1, 2, 4, 8, 16, 32, 64]
    contexts = [32, 512] if quick else [32, 128, 384, 1024]
    max_seqs = engine.config.max_num_seqs
    for ctx in contexts:
        for b in batches:
            b = min(b, max_seqs)
            if b * ctx > 40_000:
                continue
            steps = 2 + repeats
            for _ in range(b):
                add(ctx, 10_000)
            # prefill them (not decode samples)
            k = 0
            while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) \
                    or engine.scheduler.waiting:
                s = _timed_step(engine)
                if k < 3:
                    keep(f"prefill batch {b}x{ctx}", s)
                k += 1
            for _ in range(steps):
                keep(f"decode {b}x{ctx}", _timed_step(engine))
            abort_all()
        log(f"  decode at context {ctx}: done")
    # mixed: a decode batch with a prefill chunk riding along
    for b in ([8] if quick else [4, 16, 32]):
        for chunk in ([128] if quick else [64, 256]):
            for _ in range(b):
                add(128, 10_000)
            while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                                  for r in engine.scheduler.running):
                _timed_step(engine)
            for _ in range(repeats):
                add(chunk, 1)
                keep(f"mixed {b}+{chunk}", _timed_step(engine))
            abort_all()
    return samples


def _median_by_shape(samples: list[dict]) -> list[dict]:
    """Collapse repeats of the same shape to their median (robust to a busy machine)."""
    groups: dict[tuple, list[dict]] = {}
    for s in samples:
        groups.setdefault((s["T"], s["S"], s["A"], s["K"], s["B"], s.get("P", 0)), []).append(s)
    out = []
    for g in groups.values():
        m = dict(g[0])
        m["seconds"] = statistics.median(x["seconds"] for x in g)
        m["repeats"] = len(g)
        out.append(m)
    return out


def calibrate(*, model: str = "demo", threads: int | None = None, dtype: str = "auto", quick: bool = False,
              repeats: int = 3, output: str | None = None, log=print) -> Calibration:
    from splitserve.config import EngineConfig
    from splitserve.engine.engine import LLMEngine
    from splitserve.sim.models import get_model

    cfg = EngineConfig(model=model, dtype=dtype, threads=threads, max_model_len=2048, num_kv_blocks=5000)
    log(f"loading {model} ...")
    engine = LLMEngine(cfg)
    import torch

    log(f"engine: {engine.arch.family} {engine.dtype}, torch threads {torch.get_num_threads()}; measuring ...")
    t0 = time.perf_counter()
    raw = measure(engine, repeats=repeats, quick=quick, log=log)
    samples = _median_by_shape(raw)
    coef, quality = fit(samples)
    spec_name = "smollm2-135m" if model in ("demo", "smollm2-135m-instruct", "SmolLM2-135M-Instruct") else model
    try:
        spec_name = get_model(spec_name).name
    except ValueError:
        pass
    # A new engine calibration invalidates the server-overhead fit: benchmarks/sim_vs_live.py
    # --fit-overhead measures it again.
    cal = Calibration(
        model=spec_name, coef=coef, server={}, samples=samples,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine={"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                 "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        engine={"model": model, "dtype": str(engine.dtype).replace("torch.", ""), "threads": threads,
                "max_num_batched_tokens": cfg.max_num_batched_tokens, "max_num_seqs": cfg.max_num_seqs,
                "block_size": cfg.block_size},
        fit={**quality, "seconds_measuring": round(time.perf_counter() - t0, 1)},
    )
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        tmp = output + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(cal.to_json(), f, indent=1)
            f.write("\n")
        os.replace(tmp, output)
    return cal


def refit(path: str = DEFAULT_PATH) -> Calibration:
    """Fit again from the raw samples stored in a calibration file (no measuring)."""
    cal = load_calibration(path)
    if cal is None:
        raise ValueError(f"no calibration file at {path}")
    coef, quality = fit(cal.samples)
    # live_steps were measured against the old coefficients: stale now (sim_vs_live.py --fit-overhead)
    server = {k: v for k, v in cal.server.items() if k != "live_steps"}
    cal = Calibration(model=cal.model, coef=coef, server=server, samples=cal.samples, date=cal.date,
                      machine=cal.machine, engine=cal.engine, fit={**cal.fit, **quality}, neighbor=cal.neighbor)
    save(cal, path)
    return cal


def save(cal: Calibration, path: str) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(cal.to_json(), f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
