"""Frozen, validated configuration objects shared by the engine, the server and the simulator."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # running requests per step
    max_num_batched_tokens: int = 512  # token budget per step (chunked prefill size)
    max_model_len: int = 2048
    block_size: int = 16
    num_blocks: int = 1024
    enable_prefix_caching: bool = True
    max_waiting: int = 1024  # queue bound: at most max_num_seqs + max_waiting requests held; then 503

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size", "num_blocks", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.num_blocks * self.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache ({self.num_blocks} blocks x {self.block_size} tokens) cannot hold one "
                f"request of max_model_len={self.max_model_len}; add blocks or lower max_model_len"
            )


@dataclass(frozen=True)
class EngineConfig:
    model: str = "demo"
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "cpu"  # cpu | cuda | cuda:N
    threads: int | None = None  # torch intra-op threads (CPU); None keeps torch's default
    kv_cache_memory_gb: float | None = None  # None: 2 GB on CPU, 80% of free memory on CUDA
    num_kv_blocks: int | None = None  # overrides kv_cache_memory_gb (tests, forcing preemption)
    max_model_len: int | None = None  # None: the model's context length, capped at 8192
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    max_waiting: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be positive")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ValueError("kv_cache_memory_gb must be positive")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError("block_size must be a power of two up to 128")
