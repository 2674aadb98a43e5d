"""Where the CPU kernels are built and cached, and the build itself.

The extension's build directory is keyed by everything that makes one build differ from another:
the C++ source and flags, the torch release, its C++ ABI and install location (two virtual
environments never share, so never rebuild each other's), the Python ABI and the compiler. The
compiler runs in its own process group, in a child that dies with its parent and takes the
compiler with it, so stopping a server mid-build leaves no gcc behind.

    python -m splitserve.kernels.build            # build now (what a first `splitserve serve` does)
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

log = logging.getLogger("splitserve.kernels")

# A first build on 2 busy cores took 25-130 s; on an idle 2-core machine ~20 s.
TYPICAL_BUILD_S = 30


@dataclass(frozen=True)
class BuildInputs:
    """Everything a compiled extension depends on; equal inputs share one build directory."""

    source: str
    cflags: tuple[str, ...]
    ldflags: tuple[str, ...]
    torch_version: str
    torch_dir: str
    cxx11_abi: bool
    python_abi: str
    compiler: str

    def key(self) -> str:
        h = hashlib.sha256()
        for part in (self.source, " ".join(self.cflags), " ".join(self.ldflags), self.torch_version, self.torch_dir,
                     str(self.cxx11_abi), self.python_abi, self.compiler):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()[:16]


def _compiler_identity() -> str:
    """The C++ compiler torch will call ($CXX or c++), by path and modification time: an upgraded
    compiler is a different build. No subprocess, so checking costs nothing at start-up."""
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx) or cxx
    try:
        real = os.path.realpath(path)
        return f"{cxx}={real}@{os.stat(real).st_mtime_ns}"
    except OSError:
        return f"{cxx}=missing"


def current_inputs(source: str, cflags: list[str], ldflags: list[str]) -> BuildInputs:
    import torch

    return BuildInputs(source=source, cflags=tuple(cflags), ldflags=tuple(ldflags), torch_version=torch.__version__,
                       torch_dir=os.path.dirname(os.path.realpath(torch.__file__)),
                       cxx11_abi=bool(torch._C._GLIBCXX_USE_CXX11_ABI), python_abi=sys.implementation.cache_tag,
                       compiler=_compiler_identity())


def cache_root() -> str:
    """$TORCH_EXTENSIONS_DIR, or ~/.cache/splitserve/kernels."""
    from splitserve.cache_dirs import user_cache_dir

    return user_cache_dir("kernels", "TORCH_EXTENSIONS_DIR")


def extension_name(inputs: BuildInputs) -> str:
    return f"splitserve_cpu_kernels_{inputs.key()}"


def build_dir(inputs: BuildInputs) -> str:
    return os.path.join(cache_root(), extension_name(inputs))


def is_built(inputs: BuildInputs) -> bool:
    return os.path.isfile(os.path.join(build_dir(inputs), extension_name(inputs) + ".so"))


def compile_and_load(inputs: BuildInputs, verbose: bool = False):
    """torch's JIT build into this key's directory, then import (a no-op rebuild when built)."""
    from torch.utils import cpp_extension

    name, directory = extension_name(inputs), build_dir(inputs)
    os.makedirs(directory, exist_ok=True)
    src = os.path.join(directory, name + ".cpp")
    if not os.path.exists(src):
        tmp = f"{src}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(inputs.source)
        os.replace(tmp, src)  # atomic: concurrent first users see a whole file
    # Not load_inline: it prepends <torch/extension.h>, which triples the build time.
    return cpp_extension.load(name=name, sources=[src], extra_cflags=list(inputs.cflags),
                              extra_ldflags=list(inputs.ldflags), build_directory=directory, verbose=verbose)


def announce_build(inputs: BuildInputs) -> None:
    log.warning("compiling CPU kernels, once, ~%d s (cached in %s for later starts)", TYPICAL_BUILD_S,
                build_dir(inputs))


def build_in_child(inputs: BuildInputs, timeout_s: float = 1800.0) -> None:
    """Compile in a child process group that dies with this process (see module doc).

    Blocking. If this process is told to stop (an exception such as KeyboardInterrupt or
    SystemExit lands here), the child's whole group, compiler included, is killed first."""
    announce_build(inputs)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "splitserve.kernels.build", "--parent-pid", str(os.getpid())],
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout_s)
    except BaseException:
        kill_group(proc)
        raise
    if rc != 0:
        raise RuntimeError(f"kernel build exited with {rc}")
    log.info("CPU kernels compiled in %.0f s", time.perf_counter() - t0)


def kill_group(proc, grace_s: float = 3.0) -> None:
    """Stop the build child's process group: SIGTERM first, because ninja runs each compiler in a
    process group of its own and only stops those when it is told to stop (SIGKILL would orphan
    them); SIGKILL whatever is left after `grace_s`."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()  # reap the child itself: a zombie would keep the group "alive"
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _die_with_parent(parent_pid: int) -> None:
    """SIGTERM when the parent dies; on SIGTERM, pass it to this whole group (ninja then stops the
    compilers it started) and exit."""
    def on_term(*_):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.killpg(0, signal.SIGTERM)
        os._exit(143)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the parent's to handle
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        on_term()


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m splitserve.kernels.build", description="build the CPU kernels now")
    ap.add_argument("--parent-pid", type=int, default=None)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.parent_pid is not None:
        _die_with_parent(args.parent_pid)
    from splitserve.kernels import _cpu_ext

    # The compiler's temporary files go inside the cache entry: a build killed midway leaves
    # nothing in the system's temp directory, and the next build clears them.
    scratch = os.path.join(build_dir(_cpu_ext.build_inputs()), "tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch, exist_ok=True)
    os.environ["TMPDIR"] = scratch

    mod = _cpu_ext.load(verbose=args.verbose, in_process=True)
    if mod is None:
        print(f"CPU kernels unavailable: {_cpu_ext.unavailable_reason()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
