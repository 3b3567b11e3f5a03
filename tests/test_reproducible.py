"""Same config + same seeds on the same machine give identical numbers: two cold `augment run`s (separate
processes, separate data dirs, different PYTHONHASHSEED so set/dict order of strings cannot leak in) of a mini
experiment with the trained tiny models agree on every metric, classifier, concept embedding and image."""
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from augment_dagster.store.blobs import BlobStore

CFG = {
    "experiment": "repro",
    "dataset": {"source": "builtin", "builtin": {"classes": ["circle", "square", "triangle"], "train_per_class": 8,
                                                  "test_per_class": 10, "ood_per_class": 4}, "metaclass": "shape"},
    "splits": {"shots": [2], "seeds": [0, 1], "val_per_class": 2},
    "models": {"diffusion": {"source": "tiny"}, "classifier": {"source": "tiny-cnn"}},
    "generation": {"images_per_real": 2, "steps": 6, "guidance_scale": 4.0, "batch_size": 32, "scheduler": "ddim"},
    "concepts": {"steps": 4, "batch_size": 4, "init_word": "shape"},
    "training": {"epochs": 2, "steps_per_epoch": 8, "batch_size": 16, "lr": 0.002},
    "methods": {"real_guidance": {}, "dafusion": {}},
    "mlflow": {"enabled": False},
}
# what may differ between two runs: timings and run ids
VOLATILE = {"created_by_run", "mlflow_run_id", "mlflow_error", "dataset_root", "created_at"}


def cold_run(cfg_path, data, hashseed) -> subprocess.Popen:
    env = {**os.environ, "AUGMENT_DATA_DIR": str(data), "PYTHONHASHSEED": str(hashseed), "PYTHONUNBUFFERED": "1"}
    env.pop("DAGSTER_HOME", None)
    return subprocess.Popen([sys.executable, "-m", "augment_dagster.cli", "run", "--config", str(cfg_path), "--data-dir",
                             str(data)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def manifests(data):
    out = {}
    for p in sorted((data / "manifests").rglob("*.parquet")):
        df = pd.read_parquet(p)
        keep = [c for c in df.columns if c not in VOLATILE and not c.endswith("seconds")]
        out[p.relative_to(data).as_posix()] = df[keep].astype(str).to_dict(orient="list")
    return out


@pytest.mark.slow
def test_two_cold_runs_give_identical_metrics(tmp_path):
    cfg = tmp_path / "repro.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    # both at once: the two runs also compete for the cores, which must not change a number
    procs = [cold_run(cfg, tmp_path / f"data{i}", seed) for i, seed in enumerate((1, 2))]
    for p in procs:
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out[-3000:]
    a, b = manifests(tmp_path / "data0"), manifests(tmp_path / "data1")
    assert a.keys() == b.keys() and any("metrics" in k for k in a)
    for k in a:
        for col in a[k]:
            assert a[k][col] == b[k][col], f"{k}: column {col} differs between two cold runs"
    m = pd.read_parquet(tmp_path / "data0" / "manifests" / "repro" / "metrics" / "dafusion" / "2shot-s0.parquet")
    assert 0.0 < float(m["acc_id"].iloc[0]) <= 1.0
    # equal blob columns are equal bytes: every synthetic image of each run is stored under its content's hash
    syn = [k for k in a if "/synthetic/" in k]
    assert syn
    for i in (0, 1):
        blobs = BlobStore(tmp_path / f"data{i}")
        for k in syn:
            for digest in a[k]["blob"]:
                blobs.get(digest, verify=True)
