"""The result store: atomic units, resume, refusal of foreign or corrupt directories, no pickle."""

import json
import os

import numpy as np
import pytest

from qmis_jax.store import ResultStore, StoreError, config_hash


def test_config_hash_ignores_key_order_and_sees_values():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_units_are_computed_once_and_reloaded_on_resume(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"x": np.arange(5.0), "flag": np.array([True, False])}

    store = ResultStore(str(tmp_path), {"n": 3})
    first = store.get_or_compute("chunk-0", compute)
    again = ResultStore(str(tmp_path), {"n": 3}, resume=True).get_or_compute("chunk-0", compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(first["x"], again["x"])
    np.testing.assert_array_equal(again["flag"], [True, False])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["done"] == {"chunk-0": "chunk-0.npz"} and manifest["config_hash"] == config_hash({"n": 3})
    assert not [f for f in os.listdir(tmp_path / "units") if f.startswith(".tmp-")]


def test_existing_directory_needs_resume_and_the_same_config(tmp_path):
    ResultStore(str(tmp_path), {"n": 3}).save("u", {"x": np.zeros(2)})
    with pytest.raises(StoreError, match="--resume"):
        ResultStore(str(tmp_path), {"n": 3})
    with pytest.raises(StoreError, match="another configuration"):
        ResultStore(str(tmp_path), {"n": 4}, resume=True)


def test_foreign_and_corrupt_files_are_refused_with_their_name(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="manifest"):
        ResultStore(str(tmp_path), {"n": 1}, resume=True)
    (tmp_path / "manifest.json").write_text(json.dumps({"some": "other tool"}))
    with pytest.raises(StoreError, match="not a qmis_jax result manifest"):
        ResultStore(str(tmp_path), {"n": 1}, resume=True)

    other = tmp_path / "other"
    store = ResultStore(str(other), {"n": 1})
    store.save("u", {"x": np.arange(1000.0)})
    path = other / "units" / "u.npz"
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(StoreError, match="corrupt"):
        ResultStore(str(other), {"n": 1}, resume=True).load("u")


def test_object_arrays_are_refused(tmp_path):
    store = ResultStore(str(tmp_path), {"n": 1})
    with pytest.raises(TypeError, match="pickle"):
        store.save("u", {"x": np.array([{"a": 1}], dtype=object)})


def test_unwritable_directory_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot be created"):
        ResultStore(str(blocker / "sub"), {"n": 1})
