"""The persistent compilation cache switch of the qmis command."""

import jax
import pytest

from qmis_jax import _cache


@pytest.fixture
def restore_cache_dir():
    before = jax.config.jax_compilation_cache_dir
    yield
    jax.config.update("jax_compilation_cache_dir", before)


def test_cache_directory_resolution(tmp_path, monkeypatch, restore_cache_dir):
    target = tmp_path / "xla"
    assert _cache.enable_compilation_cache(str(target)) == str(target)
    assert target.is_dir() and jax.config.jax_compilation_cache_dir == str(target)
    # a directory JAX already uses wins over the package's setting
    monkeypatch.setenv(_cache.ENV, str(tmp_path / "other"))
    assert _cache.enable_compilation_cache() == str(target)
    monkeypatch.setenv(_cache.ENV, "off")
    assert _cache.enable_compilation_cache() is None
    # an impossible directory leaves the cache as it was: the run is only slower
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert _cache.enable_compilation_cache(str(blocker / "sub")) is None
    assert jax.config.jax_compilation_cache_dir == str(target)


def test_default_directory_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _cache.default_directory() == str(tmp_path / "qmis_jax" / "xla")
