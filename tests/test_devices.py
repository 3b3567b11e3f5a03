"""Device slots (slots.py, parallel.py): partitions run concurrently, one worker per slot, each step pinned to
its slot's device and recording it (step metadata, memo records); the bytes do not depend on the number of slots."""
import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from augment_dagster import slots
from augment_dagster.config import ConfigError, parse_config
from augment_dagster.definitions import build_definitions
from augment_dagster.running import materialize_experiment
from augment_dagster.store.memo import COMPUTED_ON


def cfg_for(root, devices="auto", seeds=(0, 1)):
    return parse_config({
        "experiment": "slots",
        "dataset": {"source": str(root)},
        "splits": {"shots": [2], "seeds": list(seeds), "val_per_class": 1},
        "models": {"diffusion": {"source": "tiny-random"}},
        "generation": {"images_per_real": 1, "steps": 4, "batch_size": 16},
        "training": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 8},
        "methods": {"real_guidance": {}},
        "mlflow": {"enabled": False},
        "execution": {"devices": devices},
    })


def test_devices_config_resolves_and_rejects(tmp_path, monkeypatch):
    monkeypatch.setenv("AUGMENT_DATA_DIR", str(tmp_path))
    monkeypatch.delenv(slots.ENV, raising=False)
    cfg = cfg_for(tmp_path, ["cuda:0", "cuda:2"])
    assert [(s.index, s.device) for s in slots.resolve(cfg)] == [(0, "cuda:0"), (1, "cuda:2")]
    monkeypatch.setenv(slots.ENV, "1")  # `augment run --devices 1`: the first slot only
    assert [s.device for s in slots.resolve(cfg)] == ["cuda:0"]
    monkeypatch.setenv(slots.ENV, "cpu,cpu,cpu")
    assert [s.device for s in slots.resolve(cfg)] == ["cpu"] * 3
    monkeypatch.delenv(slots.ENV)
    auto = cfg_for(tmp_path, "auto")
    auto.models.device = "cpu"  # a CPU-only machine: one slot per cpu_threads cores, every worker the same threads
    got = slots.resolve(auto)
    assert len(got) == max(1, slots.cpu_count() // auto.execution.cpu_threads)
    assert {(s.device, s.threads) for s in got} == {("cpu", 1)}
    with pytest.raises(ConfigError, match="execution.devices"):
        cfg_for(tmp_path, ["gpu0"])


def test_a_slot_is_leased_by_one_process_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setenv("AUGMENT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv(slots.ENV, "cpu,cpu")
    cfg = cfg_for(tmp_path)
    lock = slots.lock_dir(tmp_path) / "0.lock"
    # another process holds slot 0 ...
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl,sys,time; f=open(sys.argv[1],'a+'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); "
        "time.sleep(30)"), str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        slots.release()
        got = slots.lease(cfg, prefer=0)  # ... so this one gets slot 1 even though it prefers 0
        assert (got.index, got.device) == (1, "cpu") and slots.computed_on()["slot"] == 1
    finally:
        slots.release()
        holder.kill()
        holder.wait()
    assert slots.current() is None


def _run(world_data, store, home, devices, monkeypatch):
    monkeypatch.setenv("AUGMENT_DATA_DIR", str(store))
    monkeypatch.setenv(slots.ENV, devices)
    home.mkdir()
    cfg = cfg_for(world_data)
    with dg.instance_for_test(temp_dir=str(home)) as inst:
        meta = materialize_experiment(build_definitions([cfg]), cfg, inst)
        runs = {r.dagster_run.tags.get("augment/plan", "").split("-")[0] + "-" +
                r.dagster_run.tags.get("augment/plan", "-").split("-")[1]: (r.start_time, r.end_time)
                for r in inst.get_run_records() if "augment/plan" in r.dagster_run.tags}
    return meta, runs


VOLATILE = {"created_by_run", "mlflow_run_id", "mlflow_error", "dataset_root", "created_at"}  # as test_reproducible


def _contents(store: Path) -> tuple[dict[str, bytes], dict[str, dict]]:
    """Every blob's bytes, and every manifest without its run ids, paths and timings."""
    import pandas as pd

    blobs = {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted((store / "blobs").rglob("*")) if p.is_file()}
    mans = {}
    for p in sorted((store / "manifests").rglob("*.parquet")):
        df = pd.read_parquet(p)
        keep = [c for c in df.columns if c not in VOLATILE and not c.endswith("seconds")]
        mans[p.relative_to(store).as_posix()] = df[keep].astype(str).to_dict(orient="list")
    return blobs, mans


@pytest.mark.slow
def test_two_partitions_run_concurrently_on_two_slots_and_match_one_slot(world, tmp_path, monkeypatch):
    data, _ = world
    meta2, runs2 = _run(data, tmp_path / "s2", tmp_path / "h2", "cpu,cpu", monkeypatch)
    parts = ["2shot-s0", "2shot-s1"]
    # each partition's steps ran on one slot, the two partitions on different slots, and say which device
    by_part = {pk: {(m["slot"], m["slot_device"]) for k, m in meta2.items() if k.endswith(f"[{pk}]")} for pk in parts}
    assert all(len(v) == 1 for v in by_part.values()), by_part
    assert {next(iter(v)) for v in by_part.values()} == {(0, "cpu"), (1, "cpu")}
    syn = {pk: meta2[f"slots/synthetic/real_guidance[{pk}]"] for pk in parts}
    assert all(m["computed"] > 0 for m in syn.values())
    # the two partition runs overlapped in time (concurrent, not one after the other)
    (a0, a1), (b0, b1) = runs2["2shot-s0"], runs2["2shot-s1"]
    assert a0 < b1 and b0 < a1, runs2
    # every memo record written says where it was computed; no manifest row does
    recs = [json.loads(p.read_text()) for p in (tmp_path / "s2" / "memo").rglob("*.json")]
    assert recs and {r[COMPUTED_ON]["slot"] for r in recs if COMPUTED_ON in r} == {0, 1}
    assert all(r[COMPUTED_ON]["device"] == "cpu" for r in recs if COMPUTED_ON in r)
    # one slot: the same bytes (manifests and blobs), the partitions one after the other on slot 0
    meta1, runs1 = _run(data, tmp_path / "s1", tmp_path / "h1", "1", monkeypatch)
    assert {m.get("slot") for k, m in meta1.items() if "[" in k} == {0}
    (b1, m1), (b2, m2) = _contents(tmp_path / "s1"), _contents(tmp_path / "s2")
    assert b1.keys() == b2.keys() and len(b1) > 10 and m1.keys() == m2.keys()
    assert [k for k in b1 if b1[k] != b2[k]] == []
    assert [(k, c) for k in m1 for c in m1[k] if m1[k][c] != m2[k].get(c)] == []


def test_a_slot_pins_every_blas_and_openmp_runtime_also_those_loaded_later(tmp_path):
    """A worker's slot fixes the thread count of torch and of every BLAS/OpenMP runtime, including scipy's own
    OpenBLAS, which loads only when a scikit-learn solver first runs (after the lease): left at the machine's core
    count, its spinning thread server halved the speed of the episodic fits on two slots."""
    script = (
        "import json, sys\n"
        "from augment_dagster import slots\n"
        "from augment_dagster.config import parse_config\n"
        "cfg = parse_config({'experiment': 'pin', 'dataset': {'source': sys.argv[1]}, 'methods': {},\n"
        "                    'mlflow': {'enabled': False}, 'execution': {'devices': ['cpu', 'cpu']}})\n"
        "slot = slots.lease(cfg)\n"
        "import scipy.linalg, sklearn.linear_model, threadpoolctl, torch\n"
        "print(json.dumps({'slot': slot.threads, 'torch': torch.get_num_threads(),\n"
        "                  'pools': [(i['user_api'], i['filepath'].rsplit('/', 1)[-1], i['num_threads'])\n"
        "                            for i in threadpoolctl.threadpool_info()]}))\n")
    env = {**os.environ, "AUGMENT_DATA_DIR": str(tmp_path)}
    for var in (*slots.THREAD_ENV, slots.ENV):
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["torch"] == got["slot"] == 1
    assert len(got["pools"]) >= 2, got  # numpy's BLAS and those loaded after the lease (scipy's, OpenMP)
    assert all(n == 1 for _, _, n in got["pools"]), got
