"""Command line entry point: `splitserve <command> ...`.

Each command lives in its own module and is imported lazily, so `splitserve bench` never pays
for importing torch and `splitserve serve` starts as fast as the model allows.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("splitserve.api.serve_cli", "main", "run the OpenAI-compatible server"),
    "worker": ("splitserve.api.serve_cli", "worker_main", "start a worker that joins a running gateway"),
    "scale": ("splitserve.api.scale_cli", "main", "resize a running server's worker pools, or drain a worker"),
    "bench": ("splitserve.bench.cli", "main", "load-test any OpenAI-compatible endpoint"),
    "simulate": ("splitserve.sim.cli", "simulate_main", "simulate a deployment on a virtual clock"),
    "plan": ("splitserve.sim.cli", "plan_main", "size a disaggregated deployment for a workload and SLOs"),
    "hardware": ("splitserve.sim.catalog_cli", "hardware_main", "list the simulator's hardware catalog"),
    "models": ("splitserve.sim.catalog_cli", "models_main", "list the simulator's model catalog"),
    "accel": ("splitserve.accel", "main", "compile the scheduler with mypyc (build, status, clean)"),
    "cache": ("splitserve.cache_cli", "main", "list or clear the on-disk caches (weights, kernels, accel)"),
}


def _usage() -> str:
    lines = ["usage: splitserve <command> [options]", "", "commands:"]
    for name, (_, _, help_text) in COMMANDS.items():
        lines.append(f"  {name:<10} {help_text}")
    lines.append("")
    lines.append("Run `splitserve <command> --help` for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from splitserve import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"splitserve: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
