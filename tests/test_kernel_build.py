"""The CPU kernels' build directory is keyed by everything the build depends on."""

from __future__ import annotations

import dataclasses

import pytest

from splitserve.kernels import _cpu_ext, build

BASE = build.BuildInputs(source="int f();", cflags=("-O3",), ldflags=("-fopenmp",), torch_version="2.13.0+cpu",
                         torch_dir="/venv-a/site-packages/torch", cxx11_abi=True, python_abi="cpython-311",
                         compiler="c++=/usr/bin/g++-12@1")


def test_equal_inputs_share_one_build_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    twin = dataclasses.replace(BASE)
    assert build.build_dir(twin) == build.build_dir(BASE)
    assert build.build_dir(BASE).startswith(str(tmp_path))


@pytest.mark.parametrize("field,value", [
    ("source", "int g();"), ("cflags", ("-O2",)), ("ldflags", ()), ("torch_version", "2.14.1"),
    ("torch_dir", "/venv-b/site-packages/torch"), ("cxx11_abi", False), ("python_abi", "cpython-312"),
    ("compiler", "c++=/usr/bin/g++-13@2"),
])
def test_each_input_gets_its_own_build_dir(field, value):
    other = dataclasses.replace(BASE, **{field: value})
    assert build.build_dir(other) != build.build_dir(BASE)
    assert build.extension_name(other) != build.extension_name(BASE)


def test_this_environment_is_keyed_by_its_torch_and_python():
    import sys

    import torch

    inputs = _cpu_ext.build_inputs()
    assert inputs.torch_version == torch.__version__
    assert inputs.cxx11_abi == bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    assert inputs.python_abi == sys.implementation.cache_tag
    assert inputs.source == _cpu_ext.CPP_SOURCE and inputs.cflags == tuple(_cpu_ext.CFLAGS)
    assert _cpu_ext.build_inputs() == inputs  # stable: the same process asks twice, one key


def test_default_cache_is_splitserves_own(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert build.build_dir(BASE) == str(tmp_path / "splitserve" / "kernels" / build.extension_name(BASE))
