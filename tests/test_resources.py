"""The per-experiment resources (defs/resources.py): each experiment's MLflow block, store root and models."""
import dagster as dg
import pytest

from augment_dagster.config import parse_config
from augment_dagster.defs.experiments import build_definitions


def _cfg(name: str, **extra):
    return parse_config({"experiment": name, "dataset": {"source": "builtin"}, "splits": {"shots": [1], "seeds": [0]},
                         "methods": {"txt2img": {}}, **extra})


def _asset(defs, key: str) -> dg.AssetsDefinition:
    return next(a for a in defs.assets if dg.AssetKey.from_user_string(key) in a.keys)


def test_each_experiment_gets_its_own_mlflow_block(tmp_path, monkeypatch):
    """Two experiments with different ``mlflow`` blocks: each metrics/report asset requires its own tracker, which
    logs where its config says (the second experiment's block used to be ignored)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("AUGMENT_DATA_DIR", str(tmp_path / "data"))
    uri_a = f"sqlite:///{tmp_path / 'a.db'}"
    defs = build_definitions([_cfg("exp_a", mlflow={"tracking_uri": uri_a}),
                              _cfg("exp_b", mlflow={"enabled": False})])
    a, b = defs.resources["mlflow_exp_a"], defs.resources["mlflow_exp_b"]
    assert (a.tracking_uri, a.enabled) == (uri_a, True) and (b.tracking_uri, b.enabled) == (None, False)
    for exp in ("exp_a", "exp_b"):
        for key in (f"{exp}/metrics/txt2img", f"{exp}/metrics/real_only", f"{exp}/report"):
            req = _asset(defs, key).required_resource_keys
            assert f"mlflow_{exp}" in req and "mlflow" not in req and not any(
                k.endswith("_exp_a" if exp == "exp_b" else "_exp_b") for k in req), (key, req)
    run_id, err = a.log_run("exp_a", "r", params={"p": 1}, metrics={"acc": 0.5}, tags={})
    assert err is None and MlflowClient(uri_a).get_run(run_id).data.metrics == {"acc": 0.5}
    assert b.log_run("exp_b", "r", params={}, metrics={"acc": 0.5}, tags={}) == (None, "mlflow disabled in config")


def test_store_root_comes_from_each_config(tmp_path, monkeypatch):
    """Without $AUGMENT_DATA_DIR each experiment's store, manifests and MLflow default root are its ``data_dir``."""
    monkeypatch.delenv("AUGMENT_DATA_DIR", raising=False)
    defs = build_definitions([_cfg("exp_a", data_dir=str(tmp_path / "a")), _cfg("exp_b", data_dir=str(tmp_path / "b"))])
    for exp in ("a", "b"):
        root = str((tmp_path / exp).resolve())
        assert defs.resources[f"store_exp_{exp}"].root == root
        assert defs.resources[f"manifests_exp_{exp}"].root == root
        assert defs.resources[f"mlflow_exp_{exp}"].default_root == str((tmp_path / exp / "mlflow").resolve())
    store = defs.resources["store_exp_a"]
    digest = store.blobs.put(b"abc", "bin")
    assert store.blobs.get(digest) == b"abc" and (tmp_path / "a").is_dir() and not (tmp_path / "b" / "blobs").exists()


@pytest.mark.slow
def test_models_resource_releases_the_captioner_at_teardown(tmp_path):
    """The captioner loaded through the models resource is out of the process cache once the resource is torn down
    (no ``release`` call in any asset), and a ``captioner()`` block releases it when it ends."""
    from augment_dagster.defs.resources import StoreResource, models_resource
    from augment_dagster.models.loading import cached_kinds, release

    release()
    cfg = _cfg("exp_m", data_dir=str(tmp_path), models={"captioner": {"source": "tiny-random"}, "device": "cpu"})
    store = StoreResource(root=str(tmp_path))
    with dg.build_resources({"models": models_resource(cfg, store)}) as res:
        from augment_dagster.models.loading import load_captioner

        load_captioner("tiny-random", tmp_path, device="cpu")  # e.g. a stage that left it loaded
        assert "blip" in cached_kinds()
        assert res.models.captioner_fingerprint().startswith("tiny-")
    assert "blip" not in cached_kinds()
    m = res.models
    with m.captioner() as load:
        assert load() is load() and "blip" in cached_kinds()  # loaded once, from the cache
    assert "blip" not in cached_kinds()


@pytest.mark.parametrize("methods,stages", [
    ({"standard": {}}, {"real_classifier"}),
    ({"diff_ii": {}}, {"captions", "prompt_suffixes", "concept_lora", "inversion_pool", "real_classifier"}),
    ({"diagen": {}, "sgid": {}}, {"concept_embeddings", "captions", "class_prompts", "real_classifier"}),
])
def test_stage_table_decides_the_stage_assets_and_their_checks(methods, stages, tmp_path, monkeypatch):
    """The stage assets are the methods' needs plus what those require (Diff-II's suffixes read the captions), from
    ``stages.STAGES``; each with its ``<asset>_present`` check where the table says so."""
    from augment_dagster.stages import STAGES

    monkeypatch.setenv("AUGMENT_DATA_DIR", str(tmp_path))
    cfg = _cfg("exp_s", methods=methods)
    defs = build_definitions([cfg])
    names = {k.path[1] for a in defs.assets for k in a.keys}
    assert names & {s.asset for s in STAGES.values()} == stages
    for s in STAGES.values():
        if s.asset in stages:
            checks = {c.name for c in _asset(defs, f"exp_s/{s.asset}").check_keys}
            assert (f"{s.asset}_present" in checks) == s.present_check, (s.asset, checks)
