"""Scale-out: GPU assets out of process through Dagster Pipes (same manifest as in-process), Kubernetes op tags /
pod specs of GPU vs CPU assets, executor profiles, strict ``execution`` config."""
import json
import os

import dagster as dg
import pandas as pd
import pytest

from augment_dagster.config import ConfigError, parse_config
from augment_dagster.definitions import build_definitions
from augment_dagster.scaleout import K8S_CONFIG_TAG, executor_for, gpu_op_tags, k8s_tags, pipes_pod_spec

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


@pytest.mark.slow
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

    try:
        from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config
    except ImportError:
        return  # without the k8s extra, the tag dicts above are the contract
    job_cfg = DagsterK8sJobConfig(job_image="augment:test", dagster_home="/opt/dagster/dagster_home",
                                  instance_config_map="dagster-instance")

    def container(key):
        user = get_user_defined_k8s_config(_op_tags(defs, key))
        job = construct_dagster_k8s_job(job_cfg, ["dagster", "api", "execute_step"], "job-x",
                                        user_defined_k8s_config=user, pod_name="pod-x")
        return job.spec.template.spec

    spec = container(SYN)
    assert spec.containers[0].resources.limits == {"nvidia.com/gpu": 1} and spec.node_selector == {"gpu-node": "a100"}
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
    spec = pipes_pod_spec(k8s)
    assert spec["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 1} and spec["node_selector"]
    try:
        import dagster_k8s  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"augment-dagster\[k8s\]"):
            executor_for([k8s])
        with pytest.raises(ConfigError, match=r"augment-dagster\[k8s\]"):
            build_definitions([parse_config({**MINI, "execution": {"mode": "pipes_k8s"}})])
    else:
        assert executor_for([k8s]).name == "k8s"


def test_celery_queue_tag_only_with_celery_executor():
    cel = parse_config({**MINI, "execution": {"executor": "celery", "celery_gpu_queue": "gpu"}})
    assert gpu_op_tags(True, cel)["dagster-celery/queue"] == "gpu"
    assert "dagster-celery/queue" not in gpu_op_tags(True, parse_config(MINI))
