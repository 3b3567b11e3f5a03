"""Incremental recomputation with a real Dagster instance: data versions, automation conditions,
the new-data sensor, code versions per method config block."""

import dagster as dg
from PIL import Image

from augment_dagster.config import parse_config
from augment_dagster.definitions import build_definitions


def cfg_for(root, methods=None):
    return parse_config({
        "experiment": "auto",
        "dataset": {"source": str(root)},
        "splits": {"shots": [2], "seeds": [0], "val_per_class": 1},
        "models": {"diffusion": {"source": "tiny-random"}},
        "generation": {"images_per_real": 1, "steps": 4, "batch_size": 16},
        "training": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 8},
        "methods": methods or {"real_guidance": {}},
        "mlflow": {"enabled": False},
    })


def materialize_all(cfg, inst):
    """The `augment run` plan (raw_images, every partitioned asset of the split, report); returns the defs."""
    from augment_dagster.running import materialize_experiment

    defs = build_definitions([cfg])
    materialize_experiment(defs, cfg, inst)
    return defs


def requested(result, defs):
    out = {}
    for a in defs.assets:
        for k in a.keys:
            n = result.get_num_requested(k)
            if n:
                out[k.to_user_string()] = n
    return out


def test_noop_requests_nothing_new_image_requests_the_split(world):
    data, inst = world
    defs = materialize_all(cfg_for(data), inst)
    r1 = dg.evaluate_automation_conditions(defs=defs, instance=inst)
    r2 = dg.evaluate_automation_conditions(defs=defs, instance=inst, cursor=r1.cursor)
    assert r2.total_requested == 0, requested(r2, defs)
    # a new image in one class: the sensor requests raw_images; after it, eager automation asks for the split
    Image.new("RGB", (32, 32), (255, 0, 0)).save(data / "circle" / "new_red.png")
    assets = list(defs.assets)
    assert dg.materialize(assets, selection=[dg.AssetKey(["auto", "raw_images"])], instance=inst,
                          resources=dict(defs.resources)).success
    r3 = dg.evaluate_automation_conditions(defs=defs, instance=inst, cursor=r2.cursor)
    got = requested(r3, defs)
    assert got == {"auto/few_shot_split": 1}, got
    # no GPU asset fires before the split's content is known to have changed
    assert not any("synthetic" in k for k in got)


def test_new_data_sensor(world):
    data, inst = world
    defs = build_definitions([cfg_for(data)])
    sensor = defs.resolve_sensor_def("new_data_sensor_auto")
    ctx = dg.build_sensor_context(instance=inst, cursor=None, definitions=defs)
    first = sensor(ctx)
    assert isinstance(first, dg.RunRequest)
    ctx2 = dg.build_sensor_context(instance=inst, cursor=ctx.cursor, definitions=defs)
    assert isinstance(sensor(ctx2), dg.SkipReason)
    Image.new("RGB", (32, 32)).save(data / "star" / "another.png")
    ctx3 = dg.build_sensor_context(instance=inst, cursor=ctx.cursor, definitions=defs)
    again = sensor(ctx3)
    assert isinstance(again, dg.RunRequest) and again.run_key != first.run_key
    (data / "star" / "another.png").unlink()  # removal is a change too
    ctx4 = dg.build_sensor_context(instance=inst, cursor=ctx3.cursor, definitions=defs)
    assert isinstance(sensor(ctx4), dg.RunRequest)


def _code_versions(cfg):
    defs = build_definitions([cfg])
    out = {}
    for a in defs.assets:
        for k, v in a.code_versions_by_key.items():
            out[k.to_user_string()] = v
    return out


def test_method_params_change_only_that_methods_code_versions(tmp_path):
    a = _code_versions(cfg_for(tmp_path, {"real_guidance": {}, "txt2img": {}}))
    b = _code_versions(cfg_for(tmp_path, {"real_guidance": {"params": {"strength": 0.6}}, "txt2img": {}}))
    changed = sorted(k for k in a if a[k] != b[k])
    assert changed == ["auto/classifier/real_guidance", "auto/confidence_weights/real_guidance",
                       "auto/synthetic/real_guidance"], changed


def test_unsynced_after_param_change(world):
    from dagster._core.definitions.data_version import StaleStatus

    from augment_dagster.commands import stale_resolver

    data, inst = world
    methods = {"real_guidance": {}, "txt2img": {}}
    defs = materialize_all(cfg_for(data, methods), inst)
    defs2 = build_definitions([cfg_for(data, {"real_guidance": {"params": {"strength": 0.6}}, "txt2img": {}})])
    res = stale_resolver(inst, defs2.resolve_asset_graph())
    stale = sorted(k.to_user_string() for a in defs2.assets for k in a.keys
                   if res.get_status(k, "2shot-s0" if k.path[1] not in ("raw_images", "report") else None) == StaleStatus.STALE)
    assert "auto/synthetic/real_guidance" in stale
    assert not any("txt2img" in k for k in stale), stale
    assert "auto/few_shot_split" not in stale and "auto/real_classifier" not in stale


def _image_ranking_first_for(seed_in: int, seed_out: int, cls_dir, k_plus_v: int):
    """A new image that enters the split of ``seed_in`` (ranks first) and stays out of ``seed_out``'s."""
    from augment_dagster.data.builtin import generate_pool
    from augment_dagster.data.splits import rank_key
    from augment_dagster.util import png_bytes, sha256_bytes

    existing = [sha256_bytes(p.read_bytes()) for p in cls_dir.glob("*.png")]
    cut_out = sorted(rank_key(seed_out, e) for e in existing)[k_plus_v - 1]
    for im, _ in generate_pool("pretrain", cls_dir.name, 400, 11, 32):
        data = png_bytes(im)
        i = sha256_bytes(data)
        if rank_key(seed_in, i) < min(rank_key(seed_in, e) for e in existing) and rank_key(seed_out, i) > cut_out:
            return data
    raise AssertionError("no suitable image found")


def test_new_image_requests_exactly_the_affected_partition(world):
    data, inst = world
    cfg = cfg_for(data)
    cfg.splits.seeds = [0, 1]
    defs = materialize_all(cfg, inst)  # both splits
    r1 = dg.evaluate_automation_conditions(defs=defs, instance=inst)
    r2 = dg.evaluate_automation_conditions(defs=defs, instance=inst, cursor=r1.cursor)
    assert r2.total_requested == 0
    (data / "circle" / "entering_s0.png").write_bytes(_image_ranking_first_for(0, 1, data / "circle", 2 + 1))
    assets, res = list(defs.assets), dict(defs.resources)
    assert dg.materialize(assets, selection=[dg.AssetKey(["auto", "raw_images"])], instance=inst, resources=res).success
    r3 = dg.evaluate_automation_conditions(defs=defs, instance=inst, cursor=r2.cursor)
    assert requested(r3, defs) == {"auto/few_shot_split": 2}  # both splits are re-derived (cheap) ...
    for pk in ("2shot-s0", "2shot-s1"):  # ... as the automation run would do
        assert dg.materialize(assets, selection=[dg.AssetKey(["auto", "few_shot_split"])], partition_key=pk,
                              instance=inst, resources=res).success
    r4 = dg.evaluate_automation_conditions(defs=defs, instance=inst, cursor=r3.cursor)
    got = requested(r4, defs)
    # ... but only the split whose content changed (seed 0) triggers its downstream stages
    assert got and set(got) >= {"auto/synthetic/real_guidance", "auto/real_classifier"}, got
    for k in got:
        parts = r4.get_requested_partitions(dg.AssetKey(k.split("/")))
        assert parts == ({None} if k == "auto/report" else {"2shot-s0"}), (k, parts)  # report: unpartitioned
