"""Quick measurements of the machine: memory read bandwidth and bf16 matmul throughput.

Both run with a given number of torch threads (restored afterwards) and report the best
of several passes, i.e. what the machine can do right now. On a shared host the numbers
drift (2-core VM here: 33..80 GB/s read over minutes), so measure next to what you compare.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


@contextmanager
def _threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def measure_memory_read_bandwidth(threads: int | None = 2, seconds: float = 1.0,
                                  size_mb: int = 512, method: str = "torch_sum") -> float:
    """Memory read bandwidth in GB/s (1e9 bytes/s): best pass of reading a `size_mb` buffer.

    method:
      * "torch_sum": ``buf.sum()`` over an fp32 buffer (pure torch). On the reference 2-core
        Zen 5 VM it was within ~10% of a hand-written AVX-512 read loop (either way, varying
        with the bandwidth phase) and of the bf16 GEMV kernel at M=1, so it is the default.
      * "avx512": 512-bit load loop from the optional C++ extension over a 2 MiB-page
        buffer (falls back to torch_sum when the extension is unavailable).
    The buffer (default 512 MiB, 16x the 32 MiB L3) is written once before timing; the
    whole call takes about `seconds` plus the allocation (~0.2 s).
    """
    nbytes = size_mb << 20
    ext = None
    if method == "avx512":
        from . import _cpu_ext

        ext = _cpu_ext.load()
    elif method != "torch_sum":
        raise ValueError(f"unknown method {method!r}")
    with _threads(threads):
        if ext is not None:
            buf = ext.alloc_buffer(nbytes, True)
            buf.view(torch.float32).fill_(1.0)

            def run():
                ext.read_buffer(buf)
        else:
            buf = torch.ones(nbytes // 4, dtype=torch.float32)

            def run():
                buf.sum()

        run()  # warm: page faults, thread pool
        best = float("inf")
        t_end = time.perf_counter() + seconds
        n = 0
        while n < 2 or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t0)
            n += 1
        del buf
    return nbytes / best / 1e9


def measure_bf16_matmul_flops(threads: int | None = 2, n: int = 2048, seconds: float = 0.6,
                              backend: str | None = None) -> float:
    """bf16 GEMM throughput in GFLOP/s: best pass of an n x n x n product through
    ``prepare_linear`` (fastest available backend unless `backend` is given).

    About 37 ms per pass for n=2048 on the 2-core Zen 5 VM (~460 GFLOP/s); the first call
    may build the AVX512 extension (cached afterwards), which is not counted.
    """
    from .linear import prepare_linear

    with _threads(threads):
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g).to(torch.bfloat16)
        w = torch.randn(n, n, generator=g).to(torch.bfloat16)
        op = prepare_linear(w, None, backend=backend)
        op(a)  # warm: packing, primitive creation
        best = float("inf")
        t_end = time.perf_counter() + seconds
        k = 0
        while k < 2 or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            op(a)
            best = min(best, time.perf_counter() - t0)
            k += 1
    return 2.0 * n * n * n / best / 1e9


__all__ = ["measure_memory_read_bandwidth", "measure_bf16_matmul_flops"]
