"""Reliability: a SIGKILLed run resumes without redoing finished units, two concurrent runs do not corrupt the
store, a missing API key fails before any GPU work, secrets never reach disk. (Byte-determinism:
tests/test_reproducible.py, two concurrent cold runs, every manifest and blob.)"""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from augment_dagster.store import BlobStore

BASE = {
    "experiment": "rel",
    "dataset": {"source": "builtin", "builtin": {"classes": ["circle", "square"], "train_per_class": 8, "test_per_class": 2,
                                                  "ood_per_class": 0}},
    "splits": {"shots": [4], "seeds": [0], "val_per_class": 1},
    "models": {"diffusion": {"source": "tiny-random"}},
    "generation": {"images_per_real": 12, "steps": 30, "batch_size": 1},
    "training": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 8},
    "methods": {"real_guidance": {}},
    "mlflow": {"enabled": False},
}


def write_cfg(tmp_path, over=None, name="rel.yaml"):
    cfg = json.loads(json.dumps(BASE))
    for k, v in (over or {}).items():
        cfg[k] = v
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def augment(args, data, **kw):
    env = {**os.environ, "AUGMENT_DATA_DIR": str(data), "DAGSTER_HOME": str(data / "dagster_home"), "PYTHONUNBUFFERED": "1"}
    (data / "dagster_home").mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "augment_dagster.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def memo_count(data, fn="synthetic/real_guidance"):
    """Memo records of finished synthetic units (a record is written right after its blob)."""
    n = 0
    for p in (data / "memo").glob("*/*.json") if (data / "memo").exists() else []:
        try:
            n += json.loads(p.read_text()).get("fn") == fn
        except (json.JSONDecodeError, FileNotFoundError):  # pragma: no cover - records are written atomically
            pass
    return n


def computed_line(out: str) -> tuple[int, int]:
    for line in out.splitlines():
        if line.startswith("diffusion units:"):
            parts = line.split()
            return int(parts[2]), int(parts[4])
    raise AssertionError(out[-3000:])


@pytest.mark.slow
def test_sigkill_mid_generation_then_resume(tmp_path):
    data = tmp_path / "data"
    n = 8 * 6  # 8 real train images × 6 units, one at a time: ~0.1 s each, so the kill lands mid-generation
    cfg = write_cfg(tmp_path, {"generation": {"images_per_real": 6, "steps": 20, "batch_size": 1}})
    p = augment(["run", "--config", str(cfg)], data)
    # wait until some (not all) of the synthetic units are in the memo, then SIGKILL
    t0 = time.time()
    while time.time() - t0 < 240:
        if memo_count(data) >= 10:
            break
        if p.poll() is not None:
            pytest.fail("run ended before the kill:\n" + p.stdout.read()[-3000:])
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done_before = memo_count(data)
    assert 10 <= done_before < n
    # no blob is truncated, no temp file is mistaken for a blob
    assert BlobStore(data).verify_all() == []
    q = augment(["run", "--config", str(cfg)], data)
    out, _ = q.communicate(timeout=600)
    assert q.returncode == 0, out[-3000:]
    computed, reused = computed_line(out)
    assert reused == done_before and computed == n - done_before
    assert BlobStore(data).verify_all() == []
    for m in (data / "manifests").rglob("*.parquet"):
        pd.read_parquet(m)


@pytest.mark.slow
def test_two_concurrent_runs_share_the_store(tmp_path):
    data = tmp_path / "data"
    cfg = write_cfg(tmp_path, {"generation": {"images_per_real": 3, "steps": 10, "batch_size": 4}})
    a = augment(["run", "--config", str(cfg)], data)
    time.sleep(1.0)
    b = augment(["run", "--config", str(cfg)], data)
    oa, _ = a.communicate(timeout=600)
    ob, _ = b.communicate(timeout=600)
    assert a.returncode == 0, oa[-3000:]
    assert b.returncode == 0, ob[-3000:]
    assert BlobStore(data).verify_all() == []
    df = pd.read_parquet(data / "manifests" / "rel" / "synthetic" / "real_guidance" / "4shot-s0.parquet")
    assert len(df) == 8 * 3 and df["synthetic_id"].is_unique
    for blob in df["blob"]:
        assert BlobStore(data).exists(blob)


def test_missing_api_key_fails_before_any_gpu_work(tmp_path):
    cfg = write_cfg(tmp_path, {"methods": {"diagen": {}}, "models": {"diffusion": {"source": "tiny-random"},
                    "llm": {"provider": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1",
                            "api_key_env": "AUGMENT_TEST_ABSENT_KEY", "fallback_to_offline": False}}})
    data = tmp_path / "data"
    env_key = os.environ.pop("AUGMENT_TEST_ABSENT_KEY", None)
    p = augment(["run", "--config", str(cfg)], data)
    out, _ = p.communicate(timeout=120)
    if env_key:
        os.environ["AUGMENT_TEST_ABSENT_KEY"] = env_key
    assert p.returncode == 2
    assert "AUGMENT_TEST_ABSENT_KEY" in out
    assert not (data / "blobs").exists() and not (data / "manifests").exists()


@pytest.mark.slow
def test_api_key_never_stored(tmp_path):
    """class_prompts through the real openai client against a local stub: the key appears nowhere on disk."""
    from test_llm import SECRET, Stub

    numbered = "\n".join(f"{i + 1}. a photo of a {{c}} variant {i}" for i in range(12))
    stub = Stub([(200, numbered.replace("{c}", "circle"), 0), (200, numbered.replace("{c}", "square"), 0)])
    try:
        cfg = write_cfg(tmp_path, {
            "methods": {"diagen": {}},
            "generation": {"images_per_real": 1, "steps": 4, "batch_size": 8},
            "concepts": {"steps": 2, "batch_size": 2},
            "prompts": {"per_class": 4},
            "models": {"diffusion": {"source": "tiny-random"},
                       "llm": {"provider": "openai", "model": "m", "base_url": stub.url, "api_key_env": "AUGMENT_TEST_KEY",
                               "fallback_to_offline": False}},
            "mlflow": {"enabled": True}})
        data = tmp_path / "data"
        os.environ["AUGMENT_TEST_KEY"] = SECRET
        try:
            p = augment(["run", "--config", str(cfg)], data)
            out, _ = p.communicate(timeout=600)
        finally:
            os.environ.pop("AUGMENT_TEST_KEY", None)
        assert p.returncode == 0, out[-3000:]
        assert SECRET not in out
        assert len(stub.requests) == 2 and stub.requests[0]["auth"] == f"Bearer {SECRET}"
        prompts = pd.read_parquet(data / "manifests" / "rel" / "class_prompts" / "4shot-s0.parquet")
        assert set(prompts["prompt_source"]) == {"openai"}
        hits = [str(f) for f in data.rglob("*") if f.is_file() and SECRET.encode() in f.read_bytes()]
        assert hits == []  # store, manifests, memo, LLM cache, Dagster event log (sqlite), MLflow db + artifacts
    finally:
        stub.close()
