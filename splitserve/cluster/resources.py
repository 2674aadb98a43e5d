"""Ray resource requests per worker, parsed and translated without importing ray (the flags are
checked before anything starts)."""

from __future__ import annotations

import json

_OPTION_KEYS = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}


def parse_resources(text: str | None, flag: str) -> dict[str, float]:
    """`--prefill-resources '{"num_cpus": 2, "prefill": 1}'` -> a dict, or a clear ValueError."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{flag} is not valid JSON ({exc}): give an object like '{{\"num_cpus\": 2, \"prefill\": 1}}'") \
            from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object of resource name -> amount")
    for name, amount in value.items():
        limit = 1e15 if name == "memory" else 1e6  # memory in bytes; the rest in units
        if not name or isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= amount <= limit:
            raise ValueError(f"{flag}: {name!r} must be a number between 0 and {limit:g}, not {amount!r}")
    return {k: float(v) for k, v in value.items()}


def actor_options(resources: dict[str, float], threads: int | None) -> dict:
    opts = {k: v for k, v in resources.items() if k in _OPTION_KEYS}
    opts.setdefault("num_cpus", float(threads or 1))
    if "memory" in opts:
        opts["memory"] = int(opts["memory"])
    custom = {k: v for k, v in resources.items() if k not in _OPTION_KEYS}
    return dict(opts, resources=custom) if custom else opts


def bundle(resources: dict[str, float], threads: int | None) -> dict[str, float]:
    """The same request in the autoscaler's vocabulary ({"CPU": 2, "prefill": 1})."""
    opts = actor_options(resources, threads)
    out = {_OPTION_KEYS[k]: float(v) for k, v in opts.items() if k in _OPTION_KEYS and v}
    out.update(opts.get("resources", {}))
    return out
