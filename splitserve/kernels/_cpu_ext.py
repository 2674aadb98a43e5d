"""AVX512-BF16 small-M GEMM for bf16 linear layers, and fused decode ops, on x86 CPUs, built on first use.

The fused ops (namespace ``fz``: RMSNorm with/without the residual add, rotary in place, SiLU*up,
KV-cache write, paged decode attention; bf16 and fp32) are called through
``splitserve.kernels.fused``, which documents them and holds their torch fallbacks.

The C++ source, ``cpu_ext.cpp`` beside this module, is compiled with
``torch.utils.cpp_extension.load`` (gcc, ninja) the first time :func:`load` is called in an
environment, and cached under
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/splitserve/kernels``) in a directory keyed by
source, flags, torch, Python and compiler (``build.py``); later processes only ``dlopen`` it
(~0.1 s). The first build takes ~20-130 s on 2 cores and is logged. Any failure (no
compiler, no ninja, CPU without avx512_bf16, ...) makes :func:`load` return ``None`` and
the caller falls back to oneDNN or plain torch.

Packed weight layout (bf16 as int16), for a weight W[N, K] (nn.Linear layout), K even:

    packed[g, p, j, t] = W[g*NB*16 + j, 2*p + t]      shape [G, K/2, NB*16, 2]

with G = ceil(N / (NB*16)) groups of NB blocks of 16 output rows (rows past N are zero).
One group is a single linear stream of NB*64 bytes per pair of k; a thread owns a
contiguous range of groups, so each thread reads one contiguous region of memory.
The microkernel keeps MR x NB fp32 zmm accumulators and issues, per k-pair, NB weight
loads and MR*NB ``vdpbf16ps`` with x[m, 2p:2p+2] broadcast (fp32 accumulation, a single
rounding to bf16 at the end, like oneDNN/F.linear).
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

# The kernels' C++ (package data beside this module). The build is keyed by its text, so an edit to
# it rebuilds and an unchanged file reuses the cached build.
with open(os.path.join(os.path.dirname(__file__), "cpu_ext.cpp"), encoding="utf-8") as _f:
    CPP_SOURCE = _f.read()

CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-fopenmp"]
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_state: dict = {}


def cpu_has_avx512_bf16() -> bool:
    """True when the CPU advertises avx512_bf16 (Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= flags
    except OSError:
        pass
    return False


def load(verbose: bool = False, in_process: bool = False):
    """The compiled module, or None when it can't be built/loaded here (reason in unavailable_reason()).

    A first use compiles in a child process (see ``build``): logged, keyed by everything the build
    depends on, and stopped with its parent. ``in_process`` compiles here instead (that child)."""
    with _lock:
        if "mod" in _state:
            return _state["mod"]
        mod, reason = None, None
        if os.environ.get("SPLITSERVE_DISABLE_CPU_EXT", "") not in ("", "0"):
            reason = "disabled by SPLITSERVE_DISABLE_CPU_EXT"
        elif not cpu_has_avx512_bf16():
            reason = "CPU lacks avx512_bf16"
        else:
            try:
                from . import build

                inputs = build.current_inputs(CPP_SOURCE, CFLAGS, LDFLAGS)
                if not in_process and not build.is_built(inputs):
                    build.build_in_child(inputs)
                mod = build.compile_and_load(inputs, verbose)
            except Exception as e:  # no compiler/ninja, read-only cache dir, ...
                reason = f"build failed: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                log.warning("splitserve: AVX512-BF16 kernels unavailable (%s); using oneDNN/torch", reason)
        _state["mod"] = mod
        _state["reason"] = reason
        return mod


def build_inputs():
    """What this environment's build is keyed by (``build.BuildInputs``)."""
    from . import build

    return build.current_inputs(CPP_SOURCE, CFLAGS, LDFLAGS)


def unavailable_reason() -> str | None:
    load()
    return _state.get("reason")
