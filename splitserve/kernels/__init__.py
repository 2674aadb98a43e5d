"""CPU/GPU compute kernels: prepacked linear layers and machine measurements."""

from .linear import BACKENDS, ENV_BACKEND, LinearOp, available_backends, prepare_linear

__all__ = ["BACKENDS", "ENV_BACKEND", "LinearOp", "available_backends", "prepare_linear"]
