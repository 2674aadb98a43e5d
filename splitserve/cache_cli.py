"""`splitserve cache`: what splitserve keeps on disk between runs, and `splitserve cache clear`.

    weights  dequantized GGUF weights as safetensors (~270 MB per model and dtype for the demo)
    kernels  the compiled CPU kernels (one build per torch, Python and compiler)
    accel    the mypyc-compiled scheduler (`splitserve accel build`)

Everything is rebuilt on demand, so clearing only costs the next start its rebuild.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil


def _cache_home() -> str:
    return os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")


def weights_dir() -> str | None:
    from splitserve.models.loader import CACHE_ENV

    root = os.environ.get(CACHE_ENV, os.path.join(os.path.expanduser("~"), ".cache", "splitserve", "weights"))
    return None if root == "off" else root


def cache_dirs() -> dict[str, str | None]:
    from splitserve import accel
    from splitserve.kernels import build

    return {"weights": weights_dir(), "kernels": build.cache_root(), "accel": accel.cache_root()}


def legacy_kernel_dirs() -> list[str]:
    """Builds of earlier releases, which used torch's shared extension directory."""
    root = os.path.join(_cache_home(), "torch_extensions")
    return sorted(glob.glob(os.path.join(root, "splitserve_avx512_linear_*"))
                  + glob.glob(os.path.join(root, "py*", "splitserve_avx512_linear_*")))


def du(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="splitserve cache", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", nargs="?", default="list", choices=["list", "clear"])
    ap.add_argument("which", nargs="*", metavar="weights|kernels|accel", help="caches to clear (default: all)")
    args = ap.parse_args(argv)
    dirs = cache_dirs()
    unknown = sorted(set(args.which) - set(dirs))
    if unknown:
        ap.error(f"unknown cache {', '.join(unknown)} (choose from {', '.join(dirs)})")
    if args.action == "list":
        for name, path in dirs.items():
            size = du(path) if path and os.path.isdir(path) else 0
            print(f"{name:<8} {size / 1e6:>9.1f} MB  {path or 'disabled'}")
        for path in legacy_kernel_dirs():
            print(f"{'legacy':<8} {du(path) / 1e6:>9.1f} MB  {path}")
        return 0
    chosen = args.which or list(dirs)
    for name in chosen:
        path = dirs[name]
        if path and os.path.isdir(path):
            size = du(path)
            shutil.rmtree(path, ignore_errors=True)
            print(f"removed {name}: {path} ({size / 1e6:.1f} MB)")
        if name == "kernels":
            for old in legacy_kernel_dirs():
                shutil.rmtree(old, ignore_errors=True)
                print(f"removed an earlier release's kernels: {old}")
    return 0
