"""MLflow round trip against a real `mlflow server` on 127.0.0.1 (sqlite backend), read back with MlflowClient;
and the unreachable-server path (asset-level failure is reported, never raised)."""
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from augment_dagster.defs.tracking import MlflowTracker


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{d}/m.db",
                             "--default-artifact-root", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except Exception:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start")
    yield url
    os.killpg(proc.pid, 15)
    proc.wait(timeout=20)


@pytest.mark.slow
def test_roundtrip_against_real_server(server, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from augment_dagster.training.backbones import TinyCNN

    t = MlflowTracker(tracking_uri=server)
    model = TinyCNN(3)
    rid, err = t.log_run("exp_rt", "dafusion/4shot-s0", params={"method": "dafusion", "config.generation.steps": 25},
                         metrics={"acc_id": 0.5, "acc_ood": 0.25}, tags={"dagster.run_id": "abc", "augment.method": "dafusion"},
                         artifacts={"confusion_matrix_id.png": b"\x89PNG fake", "sample_grid.png": b"\x89PNG grid"}, model=model)
    assert err is None and rid
    c = MlflowClient(server)
    run = c.get_run(rid)
    assert run.data.params["method"] == "dafusion" and run.data.metrics["acc_id"] == 0.5
    assert run.data.tags["dagster.run_id"] == "abc"
    names = {a.path for a in c.list_artifacts(rid)}
    assert {"confusion_matrix_id.png", "sample_grid.png"} <= names
    assert any(a.path == "classifier" for a in c.list_artifacts(rid)) or c.search_logged_models(experiment_ids=[run.info.experiment_id])
    found = c.search_runs([run.info.experiment_id], filter_string="params.method = 'dafusion'")
    assert [r.info.run_id for r in found] == [rid]
    # the same (classifier blob, method, partition) is not logged twice
    rid2, _ = t.log_run("exp_rt", "again", params={}, metrics={}, tags={"augment.method": "dafusion"},
                        find_existing={"augment.method": "dafusion"})
    assert rid2 == rid


def test_unreachable_server_returns_error_quickly(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    t0 = time.time()
    rid, err = MlflowTracker(tracking_uri=f"http://127.0.0.1:{free_port()}").log_run(
        "x", "y", params={}, metrics={"a": 1.0}, tags={})
    assert rid is None and err and time.time() - t0 < 30


def test_two_processes_logging_first_to_a_fresh_sqlite_store_both_succeed(tmp_path):
    """Two device-slot workers log their first runs to a new ``mlflow.db`` at the same moment: the first client of
    each process creates the store's tables, and without the tracker's file lock one of them failed with "table
    ... already exists" and its run went unlogged."""
    go = tmp_path / "go"
    script = (
        "import os, sys, time\n"
        "from augment_dagster.defs.tracking import MlflowTracker\n"
        "t = MlflowTracker(tracking_uri=None, default_root=sys.argv[1])\n"
        "while not os.path.exists(sys.argv[2]): time.sleep(0.005)\n"
        "rid, err = t.log_run('race', 'w' + sys.argv[3], params={'p': 1}, metrics={'m': 1.0}, tags={})\n"
        "print(rid, err, flush=True)\n")
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("AUGMENT_POSTGRES_URL", None)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "mlflow"), str(go), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for i in range(2)]
    time.sleep(8)  # both have imported and wait at the start line
    go.touch()
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(len(o) == 2 and o[1] == "None" for o in outs), outs
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["w0", "w1"]
