"""Optional speed-up: the scheduler and the simulator's event loop compiled to C with mypyc.

`splitserve accel build` compiles `splitserve.engine.{request, block_hash, block_manager,
scheduler}`, the KV handoff and the gateway's orchestrator (`splitserve.kv.handoff`,
`splitserve.cluster.orchestrator`) and the simulator (`splitserve.sim.{state, records, disagg,
simulator}`) - the same source files, unchanged - into a cache
directory outside the source tree (`$SPLITSERVE_ACCEL_DIR`, default
`~/.cache/splitserve/accel/<tag>`). The tag hashes those sources and the modules whose types they
use, so a build serves exactly the code it was compiled from: edit one and the build is ignored
(pure Python again) until the next `build`. When a matching build exists, importing
`splitserve` puts a finder in front of the normal import path that loads the compiled modules
instead; the simulator and the live engine then run the compiled scheduler. Set
`SPLITSERVE_PURE_PYTHON=1` to ignore it.

Why: the simulator spends most of its time in `Scheduler.schedule()`, `advance()`, the block
manager and its own step loop, once per simulated step and sequence; compiled, they run about
1.5-2x faster (benchmarks/sim_speed.py, BENCHMARKS.md). The pure-Python modules stay the reference: tests run
them, and tests/test_accel.py checks the compiled ones give identical simulations.

    splitserve accel build      # needs mypy (pip install -e '.[accel]') and a C compiler
    splitserve accel status
    splitserve accel clean
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

MODULES = ("splitserve.engine.request", "splitserve.engine.block_hash", "splitserve.engine.block_manager",
           "splitserve.engine.scheduler", "splitserve.kv.handoff", "splitserve.cluster.orchestrator",
           "splitserve.sim.state", "splitserve.sim.records", "splitserve.sim.disagg", "splitserve.sim.simulator")
# Whose types the compiled modules use (not compiled): part of the tag.
TYPE_ONLY = ("splitserve.config", "splitserve.engine.sampling_params", "splitserve.bench.schema",
             "splitserve.bench.metrics", "splitserve.bench.workloads", "splitserve.cluster.router",
             "splitserve.cluster.admission",
             "splitserve.cluster.messages", "splitserve.sim.cost", "splitserve.sim.families", "splitserve.sim.hardware")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_active: dict[str, str] = {}  # module name -> compiled file, once activate() installed the finder


def _source_path(module: str) -> str:
    return os.path.join(os.path.dirname(_PACKAGE_DIR), *module.split(".")) + ".py"


def cache_root() -> str:
    from splitserve.cache_dirs import user_cache_dir

    return user_cache_dir("accel", "SPLITSERVE_ACCEL_DIR")


def source_tag() -> str:
    """Hash of the compiled sources and the interpreter's ABI and platform (a home directory
    shared by two machines keeps one build each): a build is used only on a match."""
    from importlib.machinery import EXTENSION_SUFFIXES

    h = hashlib.sha256(f"{sys.implementation.cache_tag} {EXTENSION_SUFFIXES[0]}".encode())
    for module in MODULES + TYPE_ONLY:
        h.update(module.encode())
        with open(_source_path(module), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:20]


def _manifest(tag: str) -> dict | None:
    path = os.path.join(cache_root(), tag, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if doc.get("tag") == tag else None


class _CompiledFinder:
    """A meta path finder that serves the compiled modules (and mypyc's shared library)."""

    def __init__(self, files: dict[str, str]):
        self.files = files

    def find_spec(self, fullname, path=None, target=None):
        file = self.files.get(fullname)
        if file is None:
            return None
        import importlib.util

        return importlib.util.spec_from_file_location(fullname, file)


def activate() -> bool:
    """Use the compiled modules when a build matching the sources exists (splitserve/__init__)."""
    if _active:
        return True
    if os.environ.get("SPLITSERVE_PURE_PYTHON") or not os.path.isdir(cache_root()):
        return False
    try:
        tag = source_tag()
    except OSError:
        return False
    doc = _manifest(tag)
    if doc is None:
        return False
    base = os.path.join(cache_root(), tag)
    if any(os.path.basename(file) != file for file in doc["files"].values()):
        return False  # a manifest names files of its own directory only
    files = {name: os.path.join(base, file) for name, file in doc["files"].items()}
    if not all(os.path.isfile(f) for f in files.values()) or any(m in sys.modules for m in MODULES):
        return False
    sys.meta_path.insert(0, _CompiledFinder(files))
    _active.update(files)
    return True


def is_compiled(module) -> bool:
    """True when `module` (an imported module object) is a compiled one."""
    return not (getattr(module, "__file__", "") or "").endswith(".py")


def describe() -> str:
    from splitserve.engine import scheduler
    from splitserve.sim import simulator

    if is_compiled(scheduler) and is_compiled(simulator):
        return "mypyc-compiled scheduler"
    return "pure-Python scheduler"


def build(log=print) -> str:
    """Compile MODULES with mypyc into the cache; returns the build directory."""
    import shutil
    import subprocess
    import tempfile
    from importlib.machinery import EXTENSION_SUFFIXES

    try:
        import mypy.version
    except ImportError as exc:
        raise RuntimeError("mypyc is part of mypy: pip install -e '.[accel]'") from exc
    tag = source_tag()
    root = cache_root()
    os.makedirs(root, exist_ok=True)
    work = tempfile.mkdtemp(prefix="build-", dir=root)
    try:
        # A copy of the package's Python files (the type checker reads the modules imported).
        src = os.path.join(work, "src")
        shutil.copytree(_PACKAGE_DIR, os.path.join(src, "splitserve"),
                        ignore=lambda d, names: [n for n in names if not n.endswith(".py")
                                                 and not os.path.isdir(os.path.join(d, n))])
        files = [os.path.join(*m.split(".")) + ".py" for m in MODULES]
        log(f"mypyc {mypy.version.__version__}: compiling {', '.join(MODULES)} ...")
        env = {**os.environ, "SPLITSERVE_PURE_PYTHON": "1"}
        proc = subprocess.run([sys.executable, "-m", "mypyc", "--follow-imports=silent", *files], cwd=src,
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"mypyc failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        out = os.path.join(work, "out")
        os.makedirs(out)
        found: dict[str, str] = {}
        for dirpath, _, names in os.walk(src):
            for name in names:
                suffix = next((s for s in EXTENSION_SUFFIXES if name.endswith(s)), None)
                if suffix is None or "build" in os.path.relpath(dirpath, src).split(os.sep):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name[: -len(suffix)]), src)
                module = rel.replace(os.sep, ".")
                shutil.copyfile(os.path.join(dirpath, name), os.path.join(out, name))
                found[module] = name
        missing = [m for m in MODULES if m not in found]
        if missing:
            raise RuntimeError(f"mypyc produced no module for {missing}")
        with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump({"tag": tag, "files": found, "mypy": mypy.version.__version__,
                       "python": sys.version.split()[0]}, f, indent=1)
        final = os.path.join(root, tag)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(out, final)
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def clean() -> int:
    import shutil

    root = cache_root()
    n = 0
    if os.path.isdir(root):
        for name in os.listdir(root):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="splitserve accel", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("build", "status", "clean"))
    args = ap.parse_args(argv)
    if args.action == "build":
        try:
            path = build()
        except RuntimeError as exc:
            print(f"splitserve accel: {exc}", file=sys.stderr)
            return 1
        print(f"built {path}; new processes import the compiled scheduler "
              "(SPLITSERVE_PURE_PYTHON=1 ignores it)")
        return 0
    if args.action == "clean":
        print(f"removed {clean()} build(s) from {cache_root()}")
        return 0
    tag = source_tag()
    doc = _manifest(tag)
    if os.environ.get("SPLITSERVE_PURE_PYTHON"):
        state = "off (SPLITSERVE_PURE_PYTHON is set)"
    elif doc is None:
        state = "no build for these sources (run `splitserve accel build`)"
    else:
        state = f"built with mypy {doc.get('mypy')} for Python {doc.get('python')}"
    print(f"cache: {os.path.join(cache_root(), tag)}\nstate: {state}\nthis process: {describe()}")
    return 0
