"""Scale-out: GPU assets out of process through Dagster Pipes (same manifest as in-process), Kubernetes op tags /
pod specs of GPU vs CPU assets, executor profiles, strict ``execution`` config."""
import json
import os

import dagster as dg
import pandas as pd
import pytest

from augment_dagster.config import ConfigError, parse_config
from augment_dagster.definitions import build_definitions
from augment_dagster.defs.scaleout import K8S_CONFIG_TAG, executor_for, gpu_op_tags, k8s_tags, pipes_pod_spec

MINI = {
    "experiment": "mini",
    "dataset": {"source": "builtin", "builtin": {"classes": ["circle", "square", "star"], "train_per_class": 8,
                                                  "test_per_class": 6, "ood_per_class": 4}},
    "splits": {"shots": [2], "seeds": [0], "val_per_class": 2},
    "models": {"diffusion": {"source": "tiny-random"}},
    "generation": {"images_per_real": 2, "steps": 6, "guidance_scale": 3.0, "batch_size": 16},
    "training": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 16},
    "methods": {"real_guidance": {}},
    "mlflow": {"enabled": False},
}
PK = "2shot-s0"
SYN = dg.AssetKey(["mini", "synthetic", "real_guidance"])


def _materialize_synthetic(raw_cfg, store, dagster_home, monkeypatch):
    """raw_images, then few_shot_split + synthetic/real_guidance for one partition; returns the synthetic
    materialization's metadata and data version."""
    monkeypatch.setenv("AUGMENT_DATA_DIR", str(store))
    defs = build_definitions([parse_config(raw_cfg)])
    assets, res = list(defs.assets), dict(defs.resources)
    dagster_home.mkdir()
    with dg.instance_for_test(temp_dir=str(dagster_home)) as inst:
        assert dg.materialize(assets, selection=[dg.AssetKey(["mini", "raw_images"])], instance=inst, resources=res).success
        r = dg.materialize(assets, selection=[dg.AssetKey(["mini", "few_shot_split"]), SYN], partition_key=PK,
                           instance=inst, resources=res)
        assert r.success
        mats = [ev.event_specific_data.materialization for ev in r.get_asset_materialization_events()
                if ev.event_specific_data.materialization.asset_key == SYN]
        assert len(mats) == 1
        m = mats[0]
        md = {k: getattr(v, "value", v) for k, v in m.metadata.items()}
        latest = inst.get_latest_materialization_event(SYN)
        assert latest is not None and latest.asset_materialization.partition == PK
        return md, m.tags.get("dagster/data_version")


def test_pipes_subprocess_matches_in_process(tmp_path, monkeypatch):
    pipes_cfg = {**MINI, "execution": {"mode": "pipes_subprocess"}}
    md_p, dv_p = _materialize_synthetic(pipes_cfg, tmp_path / "store_pipes", tmp_path / "dh_pipes", monkeypatch)
    # reported by the worker process through Pipes
    assert md_p["execution"] == "pipes" and md_p["worker_pid"] != os.getpid()
    assert md_p["computed"] == 3 * 2 * 2 and md_p["reused"] == 0 and md_p["unet_forward_passes"] > 0
    assert md_p["rows"] == 12 and "sample_grid" in md_p and dv_p
    man_p = tmp_path / "store_pipes" / "manifests" / "mini" / "synthetic" / "real_guidance" / f"{PK}.parquet"
    assert man_p.exists()

    md_i, dv_i = _materialize_synthetic(MINI, tmp_path / "store_inproc", tmp_path / "dh_inproc", monkeypatch)
    assert "execution" not in md_i and md_i["computed"] == 12
    man_i = tmp_path / "store_inproc" / "manifests" / "mini" / "synthetic" / "real_guidance" / f"{PK}.parquet"
    a, b = pd.read_parquet(man_p), pd.read_parquet(man_i)
    assert list(a.columns) == list(b.columns)
    assert list(a["synthetic_id"]) == list(b["synthetic_id"]) and list(a["blob"]) == list(b["blob"])
    run_cols = ["created_by_run", "compute_seconds"]
    pd.testing.assert_frame_equal(a.drop(columns=run_cols, errors="ignore"), b.drop(columns=run_cols, errors="ignore"))
    assert dv_p == dv_i  # same content version whichever process generated it


def _op_tags(defs, key):
    ad = next(a for a in defs.assets if key in a.keys)
    return ad.op.tags


def test_gpu_assets_carry_k8s_tags_cpu_assets_none(tmp_path, monkeypatch):
    monkeypatch.setenv("AUGMENT_DATA_DIR", str(tmp_path / "store"))
    raw = {**MINI, "methods": {"standard": {}, "real_guidance": {}, "dafusion": {}},
           "execution": {"k8s": {"node_selector": {"gpu-node": "a100"}, "gpu_limit": 1}}}
    defs = build_definitions([parse_config(raw)])
    gpu = [SYN, dg.AssetKey(["mini", "synthetic", "dafusion"]), dg.AssetKey(["mini", "concept_embeddings"])]
    cpu = [dg.AssetKey(["mini", "synthetic", "standard"]), dg.AssetKey(["mini", "few_shot_split"]),
           dg.AssetKey(["mini", "raw_images"])]
    for key in gpu:
        conf = json.loads(_op_tags(defs, key)[K8S_CONFIG_TAG])
        assert conf["container_config"]["resources"]["limits"] == {"nvidia.com/gpu": 1}, key
        assert conf["pod_spec_config"]["node_selector"] == {"gpu-node": "a100"}
    for key in cpu:
        assert K8S_CONFIG_TAG not in _op_tags(defs, key), key
    assert k8s_tags(False, parse_config(raw)) == {} and gpu_op_tags(False, parse_config(raw)) is None

    # the pod dagster-k8s would build from those tags (CI installs the k8s extra; skipped, visibly, without it)
    job_mod = pytest.importorskip("dagster_k8s.job", reason="the k8s extra is not installed")
    DagsterK8sJobConfig, construct_dagster_k8s_job = job_mod.DagsterK8sJobConfig, job_mod.construct_dagster_k8s_job
    get_user_defined_k8s_config = job_mod.get_user_defined_k8s_config
    job_cfg = DagsterK8sJobConfig(job_image="augment:test", dagster_home="/opt/dagster/dagster_home",
                                  instance_config_map="dagster-instance")

    def container(key):
        user = get_user_defined_k8s_config(_op_tags(defs, key))
        job = construct_dagster_k8s_job(job_cfg, ["dagster", "api", "execute_step"], "job-x",
                                        user_defined_k8s_config=user, pod_name="pod-x")
        return job.spec.template.spec

    spec = container(SYN)
    limits = {k: str(v) for k, v in spec.containers[0].resources.limits.items()}  # k8s quantities are strings
    assert limits == {"nvidia.com/gpu": "1"} and spec.node_selector == {"gpu-node": "a100"}
    assert any(t.key == "nvidia.com/gpu" for t in spec.tolerations)
    spec = container(dg.AssetKey(["mini", "synthetic", "standard"]))
    assert not (spec.containers[0].resources and spec.containers[0].resources.limits)
    assert not spec.node_selector


def test_execution_config_is_strict_and_selects_executor():
    with pytest.raises(ConfigError, match="execution"):
        parse_config({**MINI, "execution": {"mode": "pipes_cloud"}})
    with pytest.raises(ConfigError, match="execution.k8s.gpus"):
        parse_config({**MINI, "execution": {"k8s": {"gpus": 1}}})
    assert parse_config(MINI).execution.mode == "in_process"
    assert executor_for([parse_config(MINI)]) is dg.in_process_executor
    multi = parse_config({**MINI, "execution": {"executor": "multiprocess", "max_concurrent": 2}})
    assert executor_for([multi]).name == "augment_multiprocess"
    k8s = parse_config({**MINI, "execution": {"executor": "k8s_job"}})
    with pytest.raises(ConfigError, match="differs"):
        executor_for([multi, k8s])
    with pytest.raises(ConfigError, match="k8s.image"):
        parse_config({**MINI, "execution": {"mode": "pipes_k8s"}})
    pipes_k8s = {**MINI, "execution": {"mode": "pipes_k8s", "k8s": {"image": "augment:test", "store_pvc": "store"}}}
    ps = pipes_pod_spec(parse_config(pipes_k8s))
    assert ps["volumes"][0]["persistent_volume_claim"]["claim_name"] == "store"
    assert ps["containers"][0]["volume_mounts"][0]["mount_path"] == str(parse_config(pipes_k8s).resolved_data_dir())
    spec = pipes_pod_spec(k8s)
    assert spec["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 1} and spec["node_selector"]
    try:
        import dagster_k8s  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"augment-dagster\[k8s\]"):
            executor_for([k8s])
        with pytest.raises(ConfigError, match=r"augment-dagster\[k8s\]"):
            build_definitions([parse_config(pipes_k8s)])
    else:
        from dagster_k8s.pipes import build_pod_body

        assert executor_for([k8s]).name == "k8s"
        defs = build_definitions([parse_config(pipes_k8s)])
        assert "pipes_k8s_client" in defs.resources
        syn = next(a for a in defs.assets if SYN in a.keys)
        assert "pipes_k8s_client" in syn.required_resource_keys
        body = build_pod_body("p", "augment:test", ["python", "-m", "augment_dagster.defs.pipes_worker"], {}, None,
                              pipes_pod_spec(parse_config(pipes_k8s)))
        assert str(body.spec.containers[0].resources.limits["nvidia.com/gpu"]) == "1" and body.spec.node_selector
        assert body.spec.volumes[0].persistent_volume_claim.claim_name == "store"


def test_celery_queue_tag_only_with_celery_executor():
    cel = parse_config({**MINI, "execution": {"executor": "celery", "celery_gpu_queue": "gpu"}})
    assert gpu_op_tags(True, cel)["dagster-celery/queue"] == "gpu"
    assert "dagster-celery/queue" not in gpu_op_tags(True, parse_config(MINI))


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_celery_gpu_queue_end_to_end(tmp_path):
    """Celery + local Redis: CPU steps on queue ``dagster``, GPU steps (tag ``dagster-celery/queue: gpu``) on a
    ``gpu`` worker with concurrency 1. Needs the ``celery`` extra and Debian ``redis-server``; skipped otherwise."""
    import shutil
    import subprocess
    import sys
    import time

    import yaml

    pytest.importorskip("dagster_celery")
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        pytest.skip("redis-server not installed (apt-get install redis-server)")
    port = _free_port()
    broker, backend = f"redis://127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/1"
    for d in ("configs", "conf", "home", "store"):
        (tmp_path / d).mkdir()
    raw = {**MINI, "methods": {"standard": {}, "real_guidance": {}},
           "execution": {"executor": "celery", "celery_broker": broker, "celery_backend": backend}}
    (tmp_path / "configs" / "mini.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "conf" / "dagster_celery_config.py").write_text(f"broker_url = {broker!r}\nresult_backend = {backend!r}\n")
    (tmp_path / "home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "AUGMENT_CONFIG_DIR": str(tmp_path / "configs"), "AUGMENT_DATA_DIR": str(tmp_path / "store"),
           "DAGSTER_HOME": str(tmp_path / "home"), "OMP_WAIT_POLICY": "PASSIVE", "DAGSTER_DISABLE_TELEMETRY": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(tmp_path / "conf"), os.environ.get("PYTHONPATH")) if p)}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for queue in ("dagster", "gpu"):
            log = open(tmp_path / f"worker_{queue}.log", "w")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "dagster_celery.app", "worker", "-Q", queue, "-c", "1", "--pool",
                 "solo", "-n", f"{queue}@augment", "--prefetch-multiplier=1", "--loglevel", "INFO"],
                env=env, cwd=repo, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.time() + 120
        while not all("ready." in (tmp_path / f"worker_{q}.log").read_text() for q in ("dagster", "gpu")):
            assert time.time() < deadline, "celery workers did not start"
            time.sleep(1)

        def materialize(select, *extra):
            r = subprocess.run([sys.executable, "-m", "dagster", "asset", "materialize", "-m", "augment_dagster.definitions",
                                "--select", select, *extra], env=env, cwd=repo, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

        materialize("mini/raw_images")
        materialize("mini/few_shot_split,mini/synthetic/standard,mini/synthetic/real_guidance", "--partition", PK)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()

    assert (tmp_path / "store" / "manifests" / "mini" / "synthetic" / "real_guidance" / f"{PK}.parquet").exists()
    workers = {}
    with dg.DagsterInstance.from_config(str(tmp_path / "home")) as inst:
        for run in inst.get_runs():
            for entry in inst.all_logs(run.run_id):
                ev = entry.dagster_event
                if ev is not None and ev.event_type_value == "ENGINE_EVENT" and ev.step_key:
                    md = ev.engine_event_data.metadata or {}
                    if "Celery worker" in md:
                        workers[ev.step_key] = md["Celery worker"].value
    assert workers["mini__synthetic__real_guidance"] == "gpu@augment"  # GPU asset → gpu queue
    assert workers["mini__synthetic__standard"] == "dagster@augment"   # CPU assets → default queue
    assert workers["mini__few_shot_split"] == "dagster@augment"
