from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite tests the source: a `splitserve accel build` in the user's cache is ignored (set
# SPLITSERVE_PURE_PYTHON= to run everything against it). tests/test_accel.py tests the build.
os.environ.setdefault("SPLITSERVE_PURE_PYTHON", "1")


_OWN_WEIGHT_CACHE: list[str] = []


def pytest_configure(config):
    # One dequantized-weights cache per test session (servers the tests start inherit it),
    # removed when the session ends (~270 MB per model and dtype).
    if "SPLITSERVE_WEIGHT_CACHE" not in os.environ:
        import tempfile

        os.environ["SPLITSERVE_WEIGHT_CACHE"] = tempfile.mkdtemp(prefix="splitserve-weights-")
        _OWN_WEIGHT_CACHE.append(os.environ["SPLITSERVE_WEIGHT_CACHE"])


def pytest_unconfigure(config):
    import shutil

    for path in _OWN_WEIGHT_CACHE:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny-models"))
