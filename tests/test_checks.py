"""Asset checks: the pure checks on hand-made manifests, and the Dagster checks on a real materialization —
green on a healthy run, red after one synthetic blob is corrupted."""
import io
import os

import dagster as dg
import numpy as np
import pandas as pd
from PIL import Image

from augment_dagster.metrics import checks as q


def _png(arr) -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(b, format="PNG")
    return b.getvalue()


def test_split_checks():
    rows = [{"image_id": f"{c}{i}", "label": c, "role": r} for c in "ab" for i, r in enumerate(["train", "train", "val"])]
    rows += [{"image_id": "t1", "label": "a", "role": "test"}]
    ok = q.check_split(pd.DataFrame(rows), shots=2, val_per_class=1)
    assert [o.passed for o in ok] == [True, True]
    bad = pd.DataFrame(rows + [{"image_id": "a0", "label": "a", "role": "test"}])  # a train image also in test
    integ, _ = q.check_split(bad, 2, 1)
    assert not integ.passed and integ.severity == q.ERROR and "train&test" in integ.description or "test&train" in integ.description
    empty_val = pd.DataFrame([r for r in rows if r["role"] != "val"])
    integ, kshots = q.check_split(empty_val, 2, 1)
    assert not integ.passed and "val" in integ.description and not kshots.passed and kshots.severity == q.WARN


def test_synthetic_integrity_finds_constant_nan_and_corrupt_images():
    rng = np.random.default_rng(0)
    good = _png(rng.integers(0, 255, (8, 8, 3)))
    blobs = {"g1": good, "g2": good, "blank": _png(np.zeros((8, 8, 3))), "junk": b"not an image"}
    df = pd.DataFrame({"synthetic_id": list(blobs), "blob": list(blobs), "label": ["a", "b", "a", "b"]})
    o = q.check_synthetic_integrity(df, 4, blobs.__getitem__, ["a", "b"])
    assert not o.passed and o.metadata["bad_images"] == 2 and o.severity == q.ERROR
    assert {b["reason"].split(" ")[0] for b in o.metadata["bad"]} == {"constant", "unreadable"}
    ok = q.check_synthetic_integrity(df.iloc[:2], 2, blobs.__getitem__, ["a", "b"])
    assert ok.passed
    assert not q.check_synthetic_integrity(df.iloc[:2], 3, blobs.__getitem__, ["a", "b"]).passed  # rows != planned


def test_balance_label_consistency_weights_classifier_report():
    df = pd.DataFrame({"label": ["a"] * 4 + ["b"] * 4})
    assert q.check_class_balance(df, {"a": 2, "b": 2}, 0.5).passed
    assert not q.check_class_balance(df.iloc[:5], {"a": 2, "b": 2}, 0.5).passed  # 4 vs 1
    # a filter's uneven kept counts are the method, not a failure: balance is judged on what was generated
    kept = pd.DataFrame({"label": ["a"] * 4 + ["b"]})
    f = q.check_class_balance(kept, {"a": 2, "b": 2}, 0.5, dropped_per_class={"b": 3})
    assert f.passed and f.metadata["kept_max_over_min"] == 4.0 and "not judged" in f.description
    assert not q.check_class_balance(kept[kept.label == "a"], {"a": 2, "b": 2}, 0.5, dropped_per_class={"b": 4}).passed
    w = q.check_weights(pd.DataFrame({"weight": [0.2, 0.8, 1.0, 0.5], "label": list("aabb")}))
    assert w.passed and w.metadata["min"] == 0.2 and 0 < w.metadata["ess_fraction"] <= 1
    assert not q.check_weights(pd.DataFrame({"weight": [np.nan, 1.0], "label": list("ab")})).passed
    hist = [{"epoch": 0, "val_acc": 0.5}, {"epoch": 1, "val_acc": 0.9}, {"epoch": 2, "val_acc": 0.7}]
    rec = {"classes": ["a", "b"], "best_val_acc": 0.9, "best_epoch": 1, "history": hist}
    assert [o.passed for o in q.check_classifier(rec)] == [True, True]
    assert [o.passed for o in q.check_classifier({**rec, "best_epoch": 2, "best_val_acc": 0.7})] == [True, False]
    assert not q.check_classifier({**rec, "best_val_acc": 0.5, "best_epoch": 0})[0].passed  # at chance
    summary = pd.DataFrame({"method": ["real_only", "m"], "shots": [2, 2], "seeds": [1, 1]})
    assert q.check_report(summary, ["real_only", "m"], [2], 1).passed
    r = q.check_report(summary, ["real_only", "m", "other"], [2], 1)
    assert not r.passed and "other@2shot" in r.description


def _reading(syn_pred, syn_labels, real_pred, real_labels, classes=("a", "b", "c")):
    eye = np.eye(len(classes))
    return q.JudgeReading(eye[[classes.index(p) for p in syn_pred]], list(syn_labels),
                          eye[[classes.index(p) for p in real_pred]], list(real_labels))


def test_label_consistency_picks_the_better_judge_and_warns_only_on_a_significant_shortfall():
    classes = ["a", "b", "c"]
    real = list("aaaabbbbcccc")
    # 24 synthetic images: the classifier judge gets 10 right (0.42), CLIP 3 (0.12)
    syn = list("abc" * 8)
    clf = _reading([s if i < 10 else {"a": "b", "b": "c", "c": "a"}[s] for i, s in enumerate(syn)], syn, real, real)
    clip_wrong = [s if i < 3 else {"a": "b", "b": "c", "c": "a"}[s] for i, s in enumerate(syn)]
    clip = _reading(clip_wrong, syn, real[:8] + ["a"] * 4, real)  # CLIP: 8 of 12 real right
    o = q.check_label_consistency({"classifier": clf, "clip": clip}, classes, 0.5)
    md = o.metadata
    assert md["judge"] == "classifier" and md["real_acc"] == 1.0 and abs(md["synthetic_acc"] - 10 / 24) < 1e-9
    assert md["judges"]["clip"]["real_acc"] == 8 / 12 and abs(md["judges"]["clip"]["synthetic_acc"] - 3 / 24) < 1e-9
    # 10/24 < 0.5 × 1.0 but not significantly (exact binomial p ≈ 0.27): passes, and says so
    assert o.passed and 0.2 < md["p_value"] < 0.4 and "not significant" in o.description
    # alpha 1: any shortfall warns (the plain rule)
    assert not q.check_label_consistency({"classifier": clf, "clip": clip}, classes, 0.5, alpha=1.0).passed
    # CLIP as the judge: 3/24 against 0.5 × 8/12 = 0.33 is significant (p < 0.05): WARN naming the judge
    c = q.check_label_consistency({"classifier": clf, "clip": clip}, classes, 0.5, judge="clip")
    assert not c.passed and c.severity == q.WARN and c.metadata["p_value"] < 0.05 and "CLIP zero-shot" in c.description
    # a judge at chance on real images is not informative
    blind = _reading(syn, syn, ["a"] * 12, real)
    assert q.check_label_consistency({"clip": blind}, classes, 0.5).description.startswith("not informative")
    # the same-size set with every image right passes with no test at all
    assert q.check_label_consistency({"classifier": _reading(syn, syn, real, real)}, classes, 0.5).metadata["p_value"] == 1.0


MINI = {
    "experiment": "chk",
    "dataset": {"source": "builtin", "builtin": {"classes": ["circle", "square"], "train_per_class": 6, "test_per_class": 3,
                                                  "ood_per_class": 2}},
    "splits": {"shots": [2], "seeds": [0], "val_per_class": 1},
    "models": {"diffusion": {"source": "tiny"}},
    "generation": {"images_per_real": 2, "steps": 4, "batch_size": 8},
    "training": {"epochs": 2, "steps_per_epoch": 3, "batch_size": 8},
    "methods": {"real_guidance": {}},
    "mlflow": {"enabled": False},
}


def _evaluations(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {f"{e.asset_key.to_user_string()}:{e.check_name}": e for e in result.get_asset_check_evaluations()}


def test_checks_green_on_a_run_then_a_corrupt_blob_fails(tmp_path, monkeypatch):
    from augment_dagster.config import parse_config
    from augment_dagster.definitions import build_definitions
    from augment_dagster.running import materialize_experiment
    from augment_dagster.store import BlobStore

    monkeypatch.setenv("AUGMENT_DATA_DIR", str(tmp_path / "store"))
    cfg = parse_config(MINI)
    defs = build_definitions([cfg])
    (tmp_path / "dh").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dh")) as inst:
        materialize_experiment(defs, cfg, inst)
        evs = {}
        graph = defs.resolve_asset_graph()
        check_keys = list(graph.asset_check_keys)
        stages = {k.asset_key.path[1] for k in check_keys}
        assert stages >= {"raw_images", "few_shot_split", "synthetic", "real_classifier", "confidence_weights",
                          "classifier", "set_metrics", "metrics", "report"}
        # every stage but synthetic/<m> checks its output in the asset's own step (check_specs on the asset)
        in_step = {k.path[1] for a in defs.assets for k in a.keys if any(s.asset_key == k for s in a.check_specs)}
        assert "synthetic" not in in_step and in_step >= stages - {"synthetic"}
        for ck in check_keys:
            rec = inst.event_log_storage.get_latest_asset_check_execution_by_key([ck]).get(ck)
            assert rec is not None, f"{ck} never ran"
            ev = rec.event.dagster_event.event_specific_data
            evs[f"{ck.asset_key.to_user_string()}:{ck.name}"] = ev
        failed = {k: (e.severity.value, e.description) for k, e in evs.items() if not e.passed}
        # label_consistency / above_chance may warn on tiny models; every ERROR check passes
        assert not {k: v for k, v in failed.items() if v[0] == "ERROR"}, failed
        integ = evs["chk/synthetic/real_guidance:synthetic_integrity"]
        assert integ.metadata["rows"].value == integ.metadata["planned_units"].value > 0

        # the UI's lineage table: first rows with guide, prompt, seed, strength, blob path; and the command
        key = dg.AssetKey(["chk", "synthetic", "real_guidance"])
        mat = inst.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, asset_partitions=["2shot-s0"]),
                                          limit=1).records[0].asset_materialization
        table = mat.metadata["lineage"]
        assert {c.name for c in table.schema.columns} >= {"guide", "prompt", "seed", "strength", "concept", "blob_path"}
        first = table.records[0].data
        assert os.path.exists(first["blob_path"]) and first["guide"] and first["prompt"] and 0 <= first["strength"] <= 1
        assert mat.metadata["lineage_command"].value.startswith("augment lineage " + first["synthetic_id"])
        assert "dagster/column_schema" in mat.metadata

        # corrupt one synthetic blob on disk: the check of that asset fails (ERROR), naming the blob
        syn = pd.read_parquet(tmp_path / "store" / "manifests" / "chk" / "synthetic" / "real_guidance" / "2shot-s0.parquet")
        victim = syn["blob"].iloc[0]
        path = BlobStore(tmp_path / "store").find(victim)
        os.chmod(path, 0o644)
        path.write_bytes(_png(np.full((32, 32, 3), 255)))  # a blank white image under the old name
        key = dg.AssetKey(["chk", "synthetic", "real_guidance"])
        # rematerialize the asset (its units are reused from the memo, so the corrupt blob stays): its check fails
        r = dg.materialize(list(defs.assets) + list(defs.asset_checks), selection=[key], partition_key="2shot-s0",
                           instance=inst, resources=dict(defs.resources), raise_on_error=False)
        got = _evaluations(r)["chk/synthetic/real_guidance:synthetic_integrity"]
        assert not got.passed and got.severity == dg.AssetCheckSeverity.ERROR
        assert victim[:16] in got.description and "BlobIntegrityError" in got.description


def test_mlflow_links_point_at_each_run():
    from augment_dagster.defs.assets.common import mlflow_links

    class Tracker:
        enabled = True

        def resolved_uri(self):
            return "http://127.0.0.1:5999"

        def client(self):
            class C:
                def get_run(self, rid):
                    return type("R", (), {"info": type("I", (), {"experiment_id": "7"})()})()
            return C()

    m = pd.DataFrame({"method": ["real_only", "m"], "split": ["2shot-s0"] * 2, "acc_id": [0.5, 0.6],
                      "mlflow_run_id": ["abc123", ""], "mlflow_error": ["", "ConnectionError: down"]})
    md = mlflow_links(Tracker(), m).value
    assert "(http://127.0.0.1:5999/#/experiments/7/runs/abc123)" in md and "not logged: ConnectionError" in md


def test_filter_temperature_check():
    """DIAGen's filter: a fitted T passes; a degenerate one (recorded with its fallback) warns."""
    from augment_dagster.metrics import checks as q

    ok = q.check_filter({"temperature": 0.32, "temperature_fitted": 0.32, "degenerate": "", "n_t": 12, "t_val_acc": 0.58})
    assert ok.passed and ok.severity == q.WARN and ok.metadata["temperature"] == 0.32
    bad = q.check_filter({"temperature": 1.0, "temperature_fitted": 0.01, "degenerate": "T < 0.05",
                          "fallback": "T = 1", "n_t": 12, "t_val_acc": 1.0})
    assert not bad.passed and "T < 0.05" in bad.description and "T = 1" in bad.description
