"""CPU/GPU compute kernels: prepacked linear layers, fused decode ops, machine measurements.

    from splitserve.kernels import prepare_linear
    op = prepare_linear(weight, bias)   # weight [N, K] (nn.Linear layout); once per layer
    y = op(x)                           # x [..., K] -> [..., N]

    from splitserve.kernels import fused  # rms_norm, add_rms_norm, apply_rotary, silu_mul,
                                          # write_kv, paged_decode_attention (torch fallbacks)

Call ``prebuild()`` at startup (or install time) so the AVX512 extension's one-time build
(20-130 s on 2 cores, logged, then cached per torch/Python/compiler in ~/.cache/splitserve/kernels)
does not land in the first request.
"""

from . import fused
from .linear import BACKENDS, ENV_BACKEND, LinearOp, available_backends, prepare_linear


def prebuild(verbose: bool = False) -> str | None:
    """Build/load the optional AVX512-BF16 extension (linear + fused ops) now; returns None or why
    it is unavailable."""
    from . import _cpu_ext

    _cpu_ext.load(verbose=verbose)
    return _cpu_ext.unavailable_reason()


__all__ = ["BACKENDS", "ENV_BACKEND", "LinearOp", "available_backends", "fused", "prebuild", "prepare_linear"]
