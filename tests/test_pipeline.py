"""End to end on a small config: materialize with a real Dagster instance, rerun (everything reused,
identical data versions), lineage back to a real file, export, report, MLflow runs."""
import json
import os
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from augment_dagster.config import parse_config
from augment_dagster.definitions import build_definitions
from augment_dagster.util import sha256_file

MINI = {
    "experiment": "mini",
    "dataset": {"source": "builtin", "builtin": {"classes": ["circle", "square", "star"], "train_per_class": 8,
                                                  "test_per_class": 6, "ood_per_class": 4}},
    "splits": {"shots": [2], "seeds": [0], "val_per_class": 2},
    "models": {"diffusion": {"source": "tiny-random"}},
    "generation": {"images_per_real": 2, "steps": 6, "guidance_scale": 3.0, "batch_size": 16},
    "concepts": {"steps": 4, "batch_size": 2},
    "training": {"epochs": 2, "steps_per_epoch": 5, "batch_size": 16},
    "methods": {"standard": {}, "real_guidance": {}, "txt2img": {}, "dafusion": {}},
    "mlflow": {"log_models": False},
}


FIRST: dict = {}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    old = {k: os.environ.get(k) for k in ("AUGMENT_DATA_DIR", "MLFLOW_TRACKING_URI")}
    os.environ["AUGMENT_DATA_DIR"] = str(root / "data")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    cfg = parse_config(MINI)
    defs = build_definitions([cfg])
    (root / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(root / "dagster")) as instance:
        FIRST.update(run_all(cfg, defs, instance))  # the cold run, shared by every test of this module
        yield cfg, defs, instance, root / "data"
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run_all(cfg, defs, instance, force=False):
    """The `augment run` plan; keys without the partition suffix (one split here), values (metadata, data version)."""
    from augment_dagster.running import materialize_experiment

    dvs: dict = {}
    meta = materialize_experiment(defs, cfg, instance, data_versions=dvs, force=force)
    return {k.split("[")[0]: (md, dvs[k]) for k, md in meta.items()}


def test_cold_run_then_rerun_reuses_everything(env):
    cfg, defs, instance, data = env
    first = FIRST
    syn = first["mini/synthetic/dafusion"][0]
    assert syn["computed"] == 3 * 2 * 2 and syn["reused"] == 0 and syn["unet_forward_passes"] > 0
    assert first["mini/concept_embeddings"][0]["computed"] == 3
    assert "sample_grid" in syn
    assert list(run_all(cfg, defs, instance)) == ["mini/raw_images"]  # nothing stale: only the ingest re-runs
    second = run_all(cfg, defs, instance, force=True)  # `augment run --force`
    for key, (md, dv) in second.items():
        if "computed" in md:
            assert md["computed"] == 0, key
        assert dv == first[key][1], f"data version changed for {key}"
    assert second["mini/synthetic/real_guidance"][0]["unet_forward_passes"] == 0
    # report on disk with every method
    rep = pd.read_csv(data / "report" / "mini" / "report.csv")
    assert set(rep["method"]) == {"real_only", "standard", "real_guidance", "txt2img", "dafusion"}
    assert (data / "report" / "mini" / "accuracy_vs_shots.png").stat().st_size > 1000
    # the same plots as asset metadata and as artifacts of the report's MLflow run
    rmd = first["mini/report"][0]
    assert {"accuracy_plot", "difference_to_real_only", "fidelity_diversity", "ci_note"} <= set(rmd)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{data / 'mlflow' / 'mlflow.db'}")
    arts = {a.path for a in client.list_artifacts(rmd["mlflow_run_id"])}
    assert {"accuracy_vs_shots.png", "difference_to_real_only.png", "fidelity_diversity.png", "report.md"} <= arts


def test_manifests_and_blobs_are_consistent(env):
    cfg, defs, instance, data = env
    from augment_dagster.store import BlobStore

    assert BlobStore(data).verify_all() == []
    df = pd.read_parquet(data / "manifests" / "mini" / "synthetic" / "dafusion" / "2shot-s0.parquet")
    for col in ("synthetic_id", "method", "label", "guide_ids", "prompt", "seed", "strength", "embedding_id",
                "model_fingerprint", "params_json", "blob", "created_by_run"):
        assert col in df.columns and df[col].notna().all(), col
    assert set(df["strength"]) <= {0.25, 0.5, 0.75, 1.0}


def test_lineage_reaches_real_file(env):
    cfg, defs, instance, data = env
    from augment_dagster.store.lineage import connect, lineage

    df = pd.read_parquet(data / "manifests" / "mini" / "synthetic" / "dafusion" / "2shot-s0.parquet")
    sid = df["synthetic_id"].iloc[0]
    ch = lineage(data, sid[:10])
    assert ch["synthetic_id"] == sid and ch["method"] == "dafusion"
    g = ch["guides"][0]
    assert sha256_file(g["file"]) == g["image_id"] and g["split_role"] == "train"
    assert ch["concept"]["token"] == f"<{ch['label']}>" and len(ch["concept"]["train_image_ids"]) == 2
    assert ch["model_fingerprint"] and ch["dagster_run_id"]
    con = connect(data)
    n = con.sql("SELECT count(*) FROM synthetic WHERE method = 'dafusion'").fetchall()[0][0]
    assert n == len(df)


def test_export_imagefolder(env, tmp_path):
    cfg, defs, instance, data = env
    from augment_dagster.cli import main

    out = tmp_path / "export"
    assert main(["export", "--config", str(_write_cfg(tmp_path)), "--method", "dafusion", "--split", "2shot-s0",
                 "--out", str(out), "--with-real"]) == 0
    lines = [json.loads(l) for l in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    assert len([l for l in lines if l["synthetic"]]) == 12 and len([l for l in lines if not l["synthetic"]]) == 6
    for l in lines:
        assert (out / "train" / l["file_name"]).exists()
        assert Path(l["file_name"]).parts[0] == l["label"]  # ImageFolder: class = folder


def _write_cfg(tmp_path):
    import yaml

    p = tmp_path / "mini.yaml"
    p.write_text(yaml.safe_dump(MINI))
    return p


def test_lineage_and_status_cli(env, tmp_path, capsys):
    cfg, defs, instance, data = env
    from augment_dagster.cli import main
    from augment_dagster.store.lineage import connect

    df = pd.read_parquet(data / "manifests" / "mini" / "synthetic" / "dafusion" / "2shot-s0.parquet")
    path = data / "blobs" / df["blob"].iloc[0][:2] / f"{df['blob'].iloc[0]}.png"
    cfgp = _write_cfg(tmp_path)
    assert main(["lineage", "--config", str(cfgp), str(path), "--json"]) == 0  # by file path
    ch = json.loads(capsys.readouterr().out)
    assert ch["synthetic_id"] == df["synthetic_id"].iloc[0] and ch["guides"][0]["file"].endswith(".png")
    g = ch["generation"]  # DA-Fusion's paper sampler with the experiment's steps; the schedule it ran
    assert g["scheduler"] == "pndm" and g["steps"] == 6 and g["start_rule"] == "sdedit"
    assert g["vae_encode"] == "sample" and g["preprocess"] == "resize"  # diffusers' img2img pipeline convention
    assert g["denoise_steps"] == int(6 * g["strength"]) + 1  # PLMS runs one step more than int(N·t0)
    assert main(["lineage", "--config", str(cfgp), "0000"]) == 2  # no such prefix: a user error, exit 2
    assert "no synthetic image" in capsys.readouterr().err
    con = connect(data)
    views = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert {"real", "splits", "captions", "prompts", "embeddings", "inversions", "synthetic", "weights", "classifiers",
            "metrics"} <= views
    n = con.sql("SELECT count(DISTINCT method) FROM classifiers").fetchall()[0][0]
    assert n == 5  # the four methods + real_only


def test_readme_lineage_queries_run(env):
    """The three example queries of the README's Lineage section run and return rows."""
    import re

    cfg, defs, instance, data = env
    from augment_dagster.store.lineage import connect

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Lineage", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    queries = re.findall(r'con\.sql\("""(.*?)"""\)|con\.sql\("(.*?)"\)', block, re.S)
    queries = [a or b for a, b in queries]
    assert len(queries) == 3
    con = connect(data)
    out = [con.sql(q).df() for q in queries]
    assert len(out[0]) > 0 and len(out[1]) > 0


def test_mlflow_runs_logged_and_relog(env, tmp_path, capsys):
    """Every metrics row has an MLflow run; a row whose logging failed is re-logged by `augment report --relog`."""
    cfg, defs, instance, data = env
    from mlflow.tracking import MlflowClient

    from augment_dagster.cli import main

    p = data / "manifests" / "mini" / "metrics" / "dafusion" / "2shot-s0.parquet"
    df = pd.read_parquet(p)
    rid = df["mlflow_run_id"].iloc[0]
    assert rid
    client = MlflowClient(f"sqlite:///{data / 'mlflow' / 'mlflow.db'}")
    run = client.get_run(rid)
    assert run.data.metrics["acc_id"] == pytest.approx(df["acc_id"].iloc[0])
    assert run.data.tags["dagster.partition"] == "2shot-s0" and run.data.params["method"] == "dafusion"
    arts = {a.path for a in client.list_artifacts(rid)}
    assert {"confusion_matrix_id.png", "sample_grid.png", "synthetic_manifest.parquet"} <= arts
    # simulate a failed logging, then relog
    df.loc[:, "mlflow_run_id"] = ""
    df.loc[:, "mlflow_error"] = "ConnectionError: server down"
    df.to_parquet(p, index=False)
    assert main(["report", "--config", str(_write_cfg(tmp_path)), "--relog"]) == 0
    assert "relogged 1 run(s)" in capsys.readouterr().out
    assert pd.read_parquet(p)["mlflow_run_id"].iloc[0] == rid  # the existing run was found, not duplicated


def test_status_cli_reports_every_asset(env, tmp_path, capsys, monkeypatch):
    """`augment status` against a fresh instance: every asset/partition listed, all missing."""
    from augment_dagster.cli import main

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    assert main(["status", "--config", str(_write_cfg(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "mini/synthetic/dafusion" in out and "2shot-s0" in out and "missing" in out
    assert "dafusion: pndm 6 steps, g 3, M 2, start sdedit" in out  # the resolved protocol per method
    assert "real_guidance: ddim 6 steps" in out
