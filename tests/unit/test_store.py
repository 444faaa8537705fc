from __future__ import annotations

from pathlib import Path

import pytest
import torch

from silotune.errors import StoreError
from silotune.store import FederationLayout, LocalStore, get_json, get_tensors, put_json, put_tensors, sha256


def test_put_get_list_delete(tmp_path: Path) -> None:
    s = LocalStore(tmp_path)
    s.put("a/b/c.bin", b"x")
    s.put("a/d.bin", b"yy")
    assert s.get("a/b/c.bin") == b"x" and s.exists("a/d.bin")
    assert s.list("a/") == ["a/b/c.bin", "a/d.bin"]
    s.put("a/d.bin", b"zz")  # overwrite is atomic
    assert s.get("a/d.bin") == b"zz"
    s.delete("a/d.bin")
    assert not s.exists("a/d.bin")
    assert not list(tmp_path.rglob(".tmp-*"))


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a"])
def test_invalid_keys(tmp_path: Path, key: str) -> None:
    with pytest.raises(StoreError, match="invalid object key"):
        LocalStore(tmp_path).put(key, b"x")


def test_missing_object(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="object not found: nope"):
        LocalStore(tmp_path).get("nope")


def test_tensors_round_trip_and_integrity(tmp_path: Path) -> None:
    s = LocalStore(tmp_path)
    t = {"w": torch.randn(3, 4), "b": torch.zeros(2)}
    digest = put_tensors(s, "t.safetensors", t, metadata={"round": "1"})
    assert digest == sha256(s.get("t.safetensors"))
    back = get_tensors(s, "t.safetensors", expected_sha256=digest)
    assert all(torch.equal(back[k], t[k]) for k in t)
    s.put("t.safetensors", s.get("t.safetensors")[:-3])  # truncated / tampered
    with pytest.raises(StoreError, match="sha256 mismatch"):
        get_tensors(s, "t.safetensors", expected_sha256=digest)
    with pytest.raises(StoreError, match="not a valid safetensors"):
        get_tensors(s, "t.safetensors")


def test_json_and_layout(tmp_path: Path) -> None:
    s = LocalStore(tmp_path)
    lay = FederationLayout("f")
    put_json(s, lay.state(), {"a": 1})
    assert get_json(s, lay.state()) == {"a": 1}
    assert lay.update(3, "bank") == "updates/bank/f/00003/update.safetensors"
    assert lay.result(3, "bank", "round") == "results/bank/f/00003/round.json"
    assert lay.message(3, "bank", "secagg/advert") == "messages/bank/f/00003/secagg/advert"
    assert lay.published("bank", "x") == "published/bank/f/final/x"
    s.put("bad.json", b"{nope")
    with pytest.raises(StoreError, match="invalid JSON"):
        get_json(s, "bad.json")


def test_saved_tensors_are_byte_deterministic_with_metadata(tmp_path) -> None:
    # safetensors writes its metadata map in a random order; the store must not (a retried round would
    # otherwise upload an object whose sha256 differs from the first attempt's).
    import hashlib

    import torch
    from safetensors.torch import load

    from silotune.store import LocalStore, put_tensors, save_tensors

    tensors = {"b": torch.arange(4.0), "a": torch.ones(2, 3, dtype=torch.bfloat16)}
    meta = {"federation_id": "f", "round": "3", "silo": "clinic", "extra": "x"}
    digests = {hashlib.sha256(save_tensors(tensors, meta)).hexdigest() for _ in range(30)}
    assert len(digests) == 1
    data = save_tensors(tensors, meta)
    assert (int.from_bytes(data[:8], "little") % 8) == 0
    back = load(data)
    assert torch.equal(back["b"], tensors["b"]) and torch.equal(back["a"], tensors["a"])
    store = LocalStore(tmp_path)
    assert put_tensors(store, "k1", tensors, meta) == put_tensors(
        store, "k2", dict(reversed(tensors.items())), meta
    )
