"""`augment export` of one method per family (baselines, DA-Fusion/DIAGen, Diff-II, GeNIe, SGID) on a tiny
config: croissant.json validates with mlcroissant and yields the same records as metadata.jsonl, with PROV-O
record/dataset lineage; `datasets` reads integer ClassLabel labels; the classifier's MLflow run has the real
split and the synthetic set as dataset inputs (name, digest = Dagster data version, source = manifest)."""
import json
import math
import os
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

from augment_dagster.config import parse_config
from augment_dagster.definitions import build_definitions

CFG = {
    "experiment": "exp19",
    "dataset": {"source": "builtin", "builtin": {"classes": ["circle", "square", "star"], "train_per_class": 6,
                                                  "test_per_class": 2, "ood_per_class": 1}},
    "splits": {"shots": [2], "seeds": [0], "val_per_class": 1},
    "models": {"diffusion": {"source": "tiny-random"}},
    "generation": {"images_per_real": 1, "steps": 4, "batch_size": 32},
    "concepts": {"steps": 3, "batch_size": 2},
    "concept_lora": {"steps": 3, "rank": 2, "batch_size": 2},
    "inversion": {"steps": 4},
    "prompts": {"per_class": 2},
    "training": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 8},
    # one method per family
    "methods": {"standard": {}, "real_guidance": {}, "dafusion": {}, "diagen": {},
                "diff_ii": {"params": {"expansion_rate": 2}}, "genie": {}, "sgid": {}},
    "mlflow": {"log_models": False},
}
SPLIT = "2shot-s0"
PAPER_SAMPLER = {"dafusion": "pndm", "diagen": "pndm", "sgid": "pndm", "genie": "dpmsolver", "diff_ii": "ddim"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp19")
    old = {k: os.environ.get(k) for k in ("AUGMENT_DATA_DIR", "MLFLOW_TRACKING_URI", "DAGSTER_HOME")}
    os.environ["AUGMENT_DATA_DIR"] = str(root / "data")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    cfg = parse_config(CFG)
    defs = build_definitions([cfg])
    cfg_path = root / "exp19.yaml"
    cfg_path.write_text(yaml.safe_dump(CFG))
    # a persistent instance in DAGSTER_HOME, as `augment run` uses: `augment export` reads its data versions
    os.environ["DAGSTER_HOME"] = str(root / "home")
    (root / "home").mkdir()
    (root / "home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.get() as inst:
        from augment_dagster.running import materialize_experiment

        versions: dict = {}
        meta = materialize_experiment(defs, cfg, inst, data_versions=versions)
        yield cfg, cfg_path, root / "data", meta, versions
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def export(cfg_path, method, out, *extra):
    from augment_dagster.cli import main

    args = ["export", "--config", str(cfg_path), "--method", method, "--split", SPLIT, "--out", str(out), *extra]
    assert main(args) == 0
    return [json.loads(x) for x in (out / "train" / "metadata.jsonl").read_text().splitlines()]


def check_croissant(out: Path, lines: list[dict], method: str):
    import mlcroissant as mlc

    from augment_dagster.croissant import COLUMNS, read_records

    doc = json.loads((out / "croissant.json").read_text())
    assert doc["conformsTo"] == "http://mlcommons.org/croissant/1.1"
    assert doc["@context"]["prov"] == "http://www.w3.org/ns/prov#"
    ds = mlc.Dataset(jsonld=str(out / "croissant.json"))  # raises mlc.ValidationError on any error
    assert not ds.metadata.ctx.issues.errors
    # dataset-level PROV-O and RAI survive the JSON-LD round trip
    extra = ds.metadata.extra_properties
    act = extra["prov:wasGeneratedBy"]
    assert act["@type"] == "prov:Activity" and act["name"] == f"exp19/synthetic/{method}[{SPLIT}]"
    props = {p["name"]: p["value"] for p in act["additionalProperty"]}
    assert props["method"] == method and props["code_version"]
    src = extra["prov:wasDerivedFrom"]
    src = src if isinstance(src, list) else [src]
    assert src[0]["name"] == f"exp19/few_shot_split[{SPLIT}]"
    assert ds.metadata.data_collection.startswith("Synthetic") and ds.metadata.data_limitations and ds.metadata.data_use_cases
    # the records mlcroissant yields are the jsonl lines (plus the joined image and the prov groups)
    recs = sorted(read_records(out / "croissant.json"), key=lambda r: r["file_name"])
    assert len(recs) == len(lines) > 0
    for r, l in zip(recs, sorted(lines, key=lambda x: x["file_name"])):
        for c, *_ in COLUMNS:
            if isinstance(l[c], float):  # mlcroissant parses JSON lines with pandas' fast (not round-trip) float parser
                assert math.isclose(r[c], l[c], rel_tol=1e-12), (method, c, r[c], l[c])
            else:
                assert r[c] == l[c] or (r[c] in (None, []) and l[c] in (None, [])), (method, c, r[c], l[c])
        assert r["image"].size[0] > 0  # the PNG, joined on file_name
        assert r["was_derived_from"]["guide_ids"] == l["guide_ids"]
        assert r["was_generated_by"]["seed"] == l["seed"] and r["was_generated_by"]["method"] == l["method"]
    fields = {f["name"]: f for rs in doc["recordSet"] if rs["name"] == "records" for f in rs["field"]}
    assert fields["guide_ids"]["equivalentProperty"] == "prov:wasDerivedFrom"
    assert fields["was_generated_by"]["equivalentProperty"] == "prov:wasGeneratedBy"
    labels = next(rs for rs in doc["recordSet"] if rs["name"] == "labels")
    assert [d["labels/name"] for d in labels["data"]] == ["circle", "square", "star"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["standard", "real_guidance", "dafusion", "diagen", "diff_ii", "genie", "sgid"])
def test_export_validates_with_mlcroissant(run, tmp_path, method):
    _, cfg_path, data, _, versions = run
    out = tmp_path / method
    lines = export(cfg_path, method, out)
    syn = [l for l in lines if l["synthetic"]]
    assert syn and all(l["method"] == method for l in syn)
    man = pd.read_parquet(data / "manifests" / "exp19" / "synthetic" / method / f"{SPLIT}.parquet").set_index("synthetic_id")
    assert sorted(l["synthetic_id"] for l in syn) == sorted(man.index)
    for l in syn:  # guides by content id and path, generation activity per record
        assert l["code_version"] and l["dagster_run_id"] and l["algorithm"]
        assert len(l["guide_paths"]) == len(l["guide_ids"]) and all(p for p in l["guide_paths"])
        if method != "standard":
            m = man.loc[l["synthetic_id"]]
            # each method on its paper's sampler (METHODS §6), as recorded per unit in the lineage row
            assert l["sampler"] == m["scheduler"] == PAPER_SAMPLER.get(method, "ddim")
            assert l["steps"] == int(m["steps"]) and l["model_fingerprint"] == m["model_fingerprint"]
            assert l["dagster_run_id"] == m["created_by_run"] and l["guide_ids"] == list(m["guide_ids"])
    check_croissant(out, lines, method)
    # the croissant version is the Dagster data version of synthetic/<method>[split]
    doc = json.loads((out / "croissant.json").read_text())
    assert doc["version"] == f"1.0.0+{versions[f'exp19/synthetic/{method}[{SPLIT}]']}"


@pytest.mark.slow
def test_export_with_real_loads_with_datasets_classlabel(run, tmp_path):
    import datasets

    cfg_path = run[1]
    out = tmp_path / "dafusion"
    lines = export(cfg_path, "dafusion", out, "--with-real", "--license", "https://spdx.org/licenses/CC-BY-4.0.html")
    assert {l["synthetic"] for l in lines} == {True, False}
    check_croissant(out, lines, "dafusion")
    assert json.loads((out / "croissant.json").read_text())["license"] == "https://spdx.org/licenses/CC-BY-4.0.html"
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "&id" not in card  # plain YAML header, no anchors
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    feat = ds.features["label"]
    assert isinstance(feat, datasets.ClassLabel) and feat.names == ["circle", "square", "star"]
    assert len(ds) == len(lines)
    by_id = {(l["synthetic_id"] or l["image_id"]): l for l in lines}
    for row in ds:
        l = by_id[row["synthetic_id"] or row["image_id"]]
        assert feat.int2str(row["label"]) == l["label"] and isinstance(row["label"], int)
        assert row["guide_ids"] == l["guide_ids"] and row["image"].size[0] > 0


@pytest.mark.slow
def test_classifier_run_has_two_dataset_inputs(run):
    from mlflow.tracking import MlflowClient

    from augment_dagster.defs.tracking import MlflowTracker

    _, _, data, meta, versions = run
    client = MlflowTracker(default_root=str(data / "mlflow")).client()
    run_id = meta[f"exp19/metrics/dafusion[{SPLIT}]"]["mlflow_run_id"]
    assert isinstance(client, MlflowClient) and run_id
    inputs = client.get_run(run_id).inputs.dataset_inputs
    got = {i.dataset.name: i for i in inputs}
    real, syn = f"exp19/few_shot_split[{SPLIT}]", f"exp19/synthetic/dafusion[{SPLIT}]"
    assert set(got) == {real, syn}
    for name, i in got.items():
        assert i.dataset.digest == versions[name]  # the Dagster data version of that partition
        assert [t.value for t in i.tags if t.key == "mlflow.data.context"] == ["training"]
        src = json.loads(i.dataset.source)
        assert any(str(v).endswith(f"{SPLIT}.parquet") for v in src.values())
    base = client.get_run(meta[f"exp19/metrics/real_only[{SPLIT}]"]["mlflow_run_id"]).inputs.dataset_inputs
    assert [i.dataset.name for i in base] == [real]  # real_only trained on the real split only


@pytest.mark.slow
def test_relog_logs_the_same_dataset_inputs(run, capsys):
    """`augment report --relog` (a run that never reached MLflow) logs the same two inputs, rebuilt from manifests."""
    from augment_dagster.cli import main
    from augment_dagster.defs.tracking import MlflowTracker

    _, cfg_path, data, _, versions = run
    client = MlflowTracker(default_root=str(data / "mlflow")).client()
    p = data / "manifests" / "exp19" / "metrics" / "diagen" / f"{SPLIT}.parquet"
    df = pd.read_parquet(p)
    client.delete_run(df.loc[0, "mlflow_run_id"])  # as if logging had failed: no run, the row marked failed
    df.loc[0, "mlflow_run_id"], df.loc[0, "mlflow_error"] = "", "ConnectionError: down"
    df.to_parquet(p, index=False)
    assert main(["report", "--config", str(cfg_path), "--relog"]) == 0
    assert "relogged 1 run(s)" in capsys.readouterr().out
    rid = pd.read_parquet(p).loc[0, "mlflow_run_id"]
    got = {i.dataset.name: i.dataset.digest for i in client.get_run(rid).inputs.dataset_inputs}
    names = [f"exp19/few_shot_split[{SPLIT}]", f"exp19/synthetic/diagen[{SPLIT}]"]
    assert got == {n: versions[n] for n in names}


def test_dataset_inputs_failure_keeps_the_run(tmp_path, monkeypatch):
    """A data set that MLflow cannot take never costs the run its metrics: the run finishes, a tag says why."""
    from augment_dagster.defs.tracking import DatasetRef, MlflowTracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    t = MlflowTracker(default_root=str(tmp_path / "mlflow"))
    ok = DatasetRef(name="e/few_shot_split[1shot-s0]", digest="abc123", source=str(tmp_path / "s.parquet"),
                    df=pd.DataFrame({"image_id": ["a", "b"], "guide_ids": [["x"], ["y", "z"]]}))
    rid, err = t.log_run("e", "m/1shot-s0", params={"p": 1}, metrics={"acc_id": 0.5}, tags={}, datasets=[ok])
    assert err is None
    (inp,) = t.client().get_run(rid).inputs.dataset_inputs
    assert (inp.dataset.name, inp.dataset.digest) == ("e/few_shot_split[1shot-s0]", "abc123")
    assert json.loads(inp.dataset.schema)  # list columns logged as JSON text, the schema inferred

    def boom(self):
        raise ValueError("cannot infer schema")

    monkeypatch.setattr(DatasetRef, "to_mlflow_input", boom)
    rid, err = t.log_run("e", "m/1shot-s0", params={"p": 1}, metrics={"acc_id": 0.5}, tags={}, datasets=[ok])
    r = t.client().get_run(rid)
    assert err is None and r.data.metrics["acc_id"] == 0.5 and r.info.status == "FINISHED"
    assert "cannot infer schema" in r.data.tags["augment.dataset_inputs_error"] and not r.inputs.dataset_inputs
