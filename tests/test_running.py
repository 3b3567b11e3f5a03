"""The `augment run` plan materializes only what is missing or stale (Dagster's staleness: code version, upstream
data version) plus its dependents; ``force`` executes everything (units reused)."""

import dagster as dg

from augment_dagster.config import parse_config
from augment_dagster.definitions import build_definitions
from augment_dagster.running import materialize_experiment


def cfg_for(root, methods):
    return parse_config({
        "experiment": "plan",
        "dataset": {"source": str(root)},
        "splits": {"shots": [2], "seeds": [0], "val_per_class": 1},
        "models": {"diffusion": {"source": "tiny-random"}},
        "generation": {"images_per_real": 1, "steps": 4, "batch_size": 16},
        "training": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 8},
        "methods": methods,
        "mlflow": {"enabled": False},
    })


def names(meta):
    return sorted(k.split("[")[0].removeprefix("plan/") for k in meta)


def test_unchanged_graph_materializes_nothing_and_force_everything(world):
    data, inst = world
    cfg = cfg_for(data, {"real_guidance": {}})
    defs = build_definitions([cfg])
    plans = []
    cold = materialize_experiment(defs, cfg, inst, on_plan=lambda pk, n, total: plans.append((pk, n, total)))
    n_assets = sum(len(a.keys) for a in defs.assets)
    assert len(cold) == n_assets  # every asset, one partition
    assert plans[0][1] == plans[0][2] and plans[-1] == ("-", 1, 1)
    plans.clear()
    again = materialize_experiment(defs, cfg, inst, on_plan=lambda pk, n, total: plans.append((pk, n, total)))
    assert names(again) == ["raw_images"]  # re-ingested (that is how new files are seen), nothing else
    assert [n for _, n, _ in plans] == [0, 0]
    forced = materialize_experiment(defs, cfg, inst, force=True)
    assert len(forced) == n_assets
    assert all(md["computed"] == 0 for md in forced.values() if "computed" in md)  # units reused


def test_changed_config_block_rematerializes_its_assets_and_dependents(world):
    data, inst = world
    cfg = cfg_for(data, {"real_guidance": {}, "txt2img": {}})
    materialize_experiment(build_definitions([cfg]), cfg, inst)
    cfg2 = cfg_for(data, {"real_guidance": {"params": {"strength": 0.6}}, "txt2img": {}})
    meta = materialize_experiment(build_definitions([cfg2]), cfg2, inst)
    assert names(meta) == ["classifier/real_guidance", "confidence_weights/real_guidance", "metrics/real_guidance",
                           "raw_images", "report", "set_metrics/real_guidance", "synthetic/real_guidance"]
    assert meta["plan/synthetic/real_guidance[2shot-s0]"]["computed"] > 0
    assert names(materialize_experiment(build_definitions([cfg2]), cfg2, inst)) == ["raw_images"]


def test_a_new_file_that_changes_no_split_reruns_only_the_split(world):
    data, inst = world
    cfg = cfg_for(data, {"real_guidance": {}})
    defs = build_definitions([cfg])
    materialize_experiment(defs, cfg, inst)
    # a test image: raw_images' data version changes, every split is re-derived, but no split's content changes
    from augment_dagster.data.builtin import generate_pool
    from augment_dagster.util import png_bytes

    im, _ = next(iter(generate_pool("pretrain", "circle", 1, 99, 32)))
    (data / "test" / "circle").mkdir(parents=True, exist_ok=True)
    (data / "test" / "circle" / "extra.png").write_bytes(png_bytes(im))
    meta = materialize_experiment(defs, cfg, inst)
    assert "plan/few_shot_split[2shot-s0]" in meta
    syn = meta.get("plan/synthetic/real_guidance[2shot-s0]")
    assert syn is not None and syn["computed"] == 0  # dependents run, their units are reused


def _dagster_view(defs, inst, keys, pk):
    from dagster._core.definitions.data_version import StaleStatus

    from augment_dagster.commands import stale_resolver

    res = stale_resolver(inst, defs.resolve_asset_graph())
    m = {StaleStatus.MISSING: "missing", StaleStatus.STALE: "stale", StaleStatus.FRESH: "fresh"}
    return {k.to_user_string(): m[res.get_status(k, pk)] for k in keys}


def test_staleness_index_agrees_with_dagsters_resolver(world):
    from augment_dagster.running import StalenessIndex

    data, inst = world
    cfg = cfg_for(data, {"real_guidance": {}, "txt2img": {}})
    defs = build_definitions([cfg])

    def compare(defs):
        keys = [k for a in defs.assets for k in a.keys]
        part = [k for k in keys if defs.resolve_asset_graph().get(k).partitions_def is not None]
        unpart = [k for k in keys if k not in part]
        idx = StalenessIndex(defs, inst, keys)
        ours = {k.to_user_string(): idx.status(k, "2shot-s0") for k in part}
        ours |= {k.to_user_string(): idx.status(k, None) for k in unpart}
        theirs = _dagster_view(defs, inst, part, "2shot-s0") | _dagster_view(defs, inst, unpart, None)
        assert ours == theirs
        return ours

    assert set(compare(defs).values()) == {"missing"}
    materialize_experiment(defs, cfg, inst)
    assert set(compare(defs).values()) == {"fresh"}
    defs2 = build_definitions([cfg_for(data, {"real_guidance": {"params": {"strength": 0.6}}, "txt2img": {}})])
    st = compare(defs2)  # code version changed
    assert st["plan/synthetic/real_guidance"] == "stale" and st["plan/synthetic/txt2img"] == "fresh"
    # a new training image: raw_images changes, so the split (unpartitioned dependency) is stale
    from augment_dagster.data.builtin import generate_pool
    from augment_dagster.util import png_bytes

    im, _ = next(iter(generate_pool("pretrain", "square", 1, 5, 32)))
    (data / "square" / "new.png").write_bytes(png_bytes(im))
    assert dg.materialize(list(defs.assets), selection=[dg.AssetKey(["plan", "raw_images"])], instance=inst,
                          resources=dict(defs.resources)).success
    st = compare(defs)
    assert st["plan/few_shot_split"] == "stale"
    # the split re-derived: children see a newer record of a partitioned dependency (version-compared)
    assert dg.materialize(list(defs.assets), selection=[dg.AssetKey(["plan", "few_shot_split"])], partition_key="2shot-s0",
                          instance=inst, resources=dict(defs.resources)).success
    compare(defs)


def test_progress_lines_name_asset_and_partition_inside_dagster(world, monkeypatch, capfd):
    from augment_dagster import progress

    monkeypatch.setattr(progress, "EVERY_S", 0.0)  # a line on every update (stderr is not a tty under pytest)
    data, inst = world
    cfg = cfg_for(data, {"real_guidance": {}})
    materialize_experiment(build_definitions([cfg]), cfg, inst)
    err = capfd.readouterr().err
    assert "[progress] plan/synthetic/real_guidance [2shot-s0, slot 0 (cpu)]: 6/6 img (100%)" in err
    assert "[progress] plan/real_classifier [2shot-s0, slot 0 (cpu)] classifier training: 2/2 steps (100%)" in err
    assert "ETA 0s" in err
