"""`splitserve cache`: lists and clears what splitserve keeps on disk."""

from __future__ import annotations

import pytest

from splitserve.cache_cli import main


@pytest.fixture
def caches(tmp_path, monkeypatch):
    dirs = {name: tmp_path / name for name in ("weights", "kernels", "accel")}
    monkeypatch.setenv("SPLITSERVE_WEIGHT_CACHE", str(dirs["weights"]))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(dirs["kernels"]))
    monkeypatch.setenv("SPLITSERVE_ACCEL_DIR", str(dirs["accel"]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    for path in dirs.values():
        path.mkdir()
        (path / "blob").write_bytes(b"x" * 2_000_000)
    return dirs


def test_list_shows_each_cache_with_its_size(caches, capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name, path in caches.items():
        line = next(ln for ln in out.splitlines() if ln.startswith(name))
        assert "2.0 MB" in line and str(path) in line


def test_clear_one_cache_keeps_the_others(caches, capsys):
    assert main(["clear", "weights"]) == 0
    assert not caches["weights"].exists() and caches["kernels"].exists() and caches["accel"].exists()
    assert main(["clear"]) == 0
    assert not any(path.exists() for path in caches.values())


def test_unknown_cache_is_refused(caches, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["clear", "everything"])
    assert exc.value.code == 2 and "unknown cache everything" in capsys.readouterr().err
    assert all(path.exists() for path in caches.values())
