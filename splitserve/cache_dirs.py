"""Where splitserve keeps what it builds once: under the user's cache directory, one folder each."""

from __future__ import annotations

import os


def user_cache_dir(name: str, env_override: str) -> str:
    """$`env_override` if set, else $XDG_CACHE_HOME/splitserve/NAME (default ~/.cache/splitserve/NAME)."""
    env = os.environ.get(env_override)
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "splitserve", name)
