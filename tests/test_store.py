import os
import threading

import pandas as pd
import pytest

from augment_dagster.store import BlobStore, Memo, memo_key
from augment_dagster.store.blobs import BlobWriteError
from augment_dagster.store.manifests import manifest_path, manifest_version, read_manifest, write_manifest
from augment_dagster.util import sha256_bytes


def test_blob_roundtrip_and_name_is_content_hash(tmp_path):
    s = BlobStore(tmp_path)
    d = s.put(b"hello", "txt")
    assert d == sha256_bytes(b"hello")
    p = s.find(d)
    assert p.name == f"{d}.txt" and p.parent.name == d[:2]
    assert s.get(d, verify=True) == b"hello"
    assert s.put(b"hello", "txt") == d  # idempotent
    assert s.verify_all() == []


def test_concurrent_writers_same_blob(tmp_path):
    s = BlobStore(tmp_path)
    data = os.urandom(1 << 20)
    errs = []

    def w():
        try:
            s.put(data, "bin")
        except Exception as e:  # pragma: no cover
            errs.append(e)

    ts = [threading.Thread(target=w) for _ in range(8)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not errs
    assert s.verify_all() == []
    assert not list(tmp_path.rglob(".tmp-*"))


def test_failed_write_leaves_no_partial_blob(tmp_path, monkeypatch):
    s = BlobStore(tmp_path)
    import augment_dagster.util as util

    real_fdopen = os.fdopen

    class Boom:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(util.os, "fdopen", lambda fd, mode: Boom(real_fdopen(fd, mode)))
    with pytest.raises(BlobWriteError, match="could not write blob"):
        s.put(b"x" * 1000, "bin")
    monkeypatch.undo()
    assert not any(p.is_file() for p in (tmp_path / "blobs").rglob("*"))


def test_memo_key_covers_every_input():
    base = dict(model="m1", params={"a": 1}, inputs=["x", "y"], seed=3)
    k = memo_key("f", "1", **base)
    assert k == memo_key("f", "1", **base)
    assert k != memo_key("f", "2", **base)
    assert k != memo_key("g", "1", **base)
    for field, other in (("model", "m2"), ("params", {"a": 2}), ("inputs", ["x", "z"]), ("seed", 4)):
        assert k != memo_key("f", "1", **{**base, field: other}), field
    # dict order does not matter
    assert memo_key("f", "1", params={"a": 1, "b": 2}) == memo_key("f", "1", params={"b": 2, "a": 1})


def test_memo_put_get_and_counters(tmp_path):
    m = Memo(tmp_path)
    assert m.get("ab" * 32) is None
    m.put("ab" * 32, {"blob": "x"})
    assert m.get("ab" * 32) == {"blob": "x"}
    assert (m.hits, m.misses) == (1, 1)


def test_manifest_atomic_and_version(tmp_path):
    df = pd.DataFrame({"a": [1, 2], "b": ["x", "y"], "created_by_run": ["r1", "r2"]})
    p = manifest_path(tmp_path, ["demo", "synthetic", "dafusion"], "4shot-s0")
    assert p.as_posix().endswith("manifests/demo/synthetic/dafusion/4shot-s0.parquet")
    write_manifest(p, df)
    back = read_manifest(p)
    assert back.equals(df)
    # run ids do not change the data version; content does
    df2 = df.assign(created_by_run=["r3", "r4"])
    assert manifest_version(df) == manifest_version(df2)
    assert manifest_version(df) != manifest_version(df.assign(a=[1, 3]))
    with pytest.raises(FileNotFoundError, match="materialize"):
        read_manifest(tmp_path / "nope.parquet")
