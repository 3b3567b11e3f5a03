"""Examples that do not run by themselves: automation.enabled: false or a missing dataset folder gives STOPPED
sensors/schedules, a SkipReason naming the folder, and no automation-condition sensor that would launch runs."""
import dagster as dg
import pytest

from augment_dagster.config import DEFAULT_CONFIG_DIR, load_config, parse_config
from augment_dagster.definitions import build_definitions


def _cfg(name, source, enabled=True):
    return parse_config({
        "experiment": name, "dataset": {"source": str(source)}, "splits": {"shots": [1], "seeds": [0], "val_per_class": 1},
        "models": {"diffusion": {"source": "tiny-random"}}, "methods": {"standard": {}}, "mlflow": {"enabled": False},
        "automation": {"enabled": enabled},
    })


@pytest.fixture
def defs(tmp_path, monkeypatch):
    monkeypatch.setenv("AUGMENT_DATA_DIR", str(tmp_path / "store"))
    live = _cfg("live", "builtin")
    gone = _cfg("gone", tmp_path / "no_such_dataset")
    off = _cfg("off", "builtin", enabled=False)
    return build_definitions([live, gone, off]), tmp_path


def test_default_statuses(defs):
    d, _ = defs
    assert d.resolve_sensor_def("new_data_sensor_live").default_status == dg.DefaultSensorStatus.RUNNING
    assert d.resolve_schedule_def("live_nightly").default_status == dg.DefaultScheduleStatus.RUNNING
    for exp in ("gone", "off"):
        assert d.resolve_sensor_def(f"new_data_sensor_{exp}").default_status == dg.DefaultSensorStatus.STOPPED
        assert d.resolve_schedule_def(f"{exp}_nightly").default_status == dg.DefaultScheduleStatus.STOPPED


def test_missing_dataset_sensor_and_schedule_skip_naming_the_folder(defs):
    d, tmp_path = defs
    with dg.instance_for_test() as inst:
        sensor = d.resolve_sensor_def("new_data_sensor_gone")
        res = sensor(dg.build_sensor_context(instance=inst, definitions=d))
        assert isinstance(res, dg.SkipReason) and str(tmp_path / "no_such_dataset") in res.skip_message
        assert "dataset.source" in res.skip_message
        sched = d.resolve_schedule_def("gone_nightly")
        data = sched.evaluate_tick(dg.build_schedule_context(instance=inst))
        assert not data.run_requests and str(tmp_path / "no_such_dataset") in data.skip_message


def test_automation_condition_sensor_skips_inactive_groups(defs):
    d, _ = defs
    running = d.resolve_sensor_def("automation_condition_sensor")
    stopped = d.resolve_sensor_def("automation_condition_sensor_inactive")
    assert running.default_status == dg.DefaultSensorStatus.RUNNING
    assert stopped.default_status == dg.DefaultSensorStatus.STOPPED
    graph = d.resolve_asset_graph()
    covered = running.asset_selection.resolve(graph)
    assert covered and {k.path[0] for k in covered} == {"live"}
    assert {k.path[0] for k in stopped.asset_selection.resolve(graph)} == {"gone", "off"}
    # raw_images of an active and an inactive group change: over all assets, eager automation would follow
    # both; the RUNNING sensor evaluates (and so launches) only the active group's split
    with dg.instance_for_test() as inst:
        first = dg.evaluate_automation_conditions(defs=d, instance=inst)
        for exp in ("live", "off"):
            assert dg.materialize(list(d.assets), selection=[dg.AssetKey([exp, "raw_images"])], instance=inst,
                                  resources=dict(d.resources)).success
        every = dg.evaluate_automation_conditions(defs=d, instance=inst, cursor=first.cursor)
        assert {k.path[0] for a in d.assets for k in a.keys if every.get_num_requested(k)} == {"live", "off"}
        sensed = dg.evaluate_automation_conditions(defs=d, instance=inst, cursor=first.cursor,
                                                   asset_selection=running.asset_selection)
        got = {k.to_user_string() for a in d.assets for k in a.keys if sensed.get_num_requested(k)}
        assert got == {"live/few_shot_split"}, got


def test_shipped_example_is_quiet():
    cfg = load_config(DEFAULT_CONFIG_DIR / "example_sd15.yaml")
    assert cfg.automation.enabled is False
    assert load_config(DEFAULT_CONFIG_DIR / "demo.yaml").automation.enabled is True
