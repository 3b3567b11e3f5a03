import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")


import shutil  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A 3-class imagefolder copy of the built-in data (4 train / 2 test per class), a store under tmp_path and a
    test Dagster instance: (dataset folder, instance)."""
    import dagster as dg

    from augment_dagster.data.builtin import write_builtin

    src = write_builtin(tmp_path / "gen", classes=["circle", "square", "star"], train_per_class=4, test_per_class=2,
                        ood_per_class=0, size=32, seed=0)
    data = tmp_path / "dataset"
    shutil.copytree(src, data)
    monkeypatch.setenv("AUGMENT_DATA_DIR", str(tmp_path / "store"))
    (tmp_path / "dh").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dh")) as inst:
        yield data, inst


# The longest modules first. The README's test command runs `pytest -n 2 --dist loadgroup --no-loadscope-reorder`:
# a test marked `xdist_group(name)` runs on the worker that runs that group, and the groups and ungrouped tests go
# to whichever worker is free, in collection order, so starting the long ones first lets both workers finish close
# together. Order inside a module is unchanged (a stable sort).
_LONG_FIRST = ["test_faults", "test_reliability", "test_methods_e2e", "test_refactor_compat", "test_export",
               "test_running", "test_ui", "test_bench_demo", "test_realsize", "test_reproducible", "test_tiny_models",
               "test_scaleout", "test_episodes_protocol", "test_devices", "test_postgres", "test_automation",
               "test_pipeline", "test_datasets_hf", "test_mlflow", "test_checks", "test_report_stats", "test_errors"]
# Modules whose tests are independent of each other (no module-scoped fixture, or one only some tests share): each
# test is its own unit of work, the ones sharing a module fixture one group. Every other module is one group (one
# worker builds its module fixtures once), as with `--dist loadfile`.
_SPLIT = {"test_faults", "test_reliability"}


def _group(item) -> str:
    mod = item.module.__name__.rsplit(".", 1)[-1] if item.module else item.nodeid
    if mod not in _SPLIT:
        return mod
    shared = sorted(f for f in item.fixturenames
                    if (d := item._fixtureinfo.name2fixturedefs.get(f)) and d[-1].scope == "module")
    return f"{mod}::{','.join(shared)}" if shared else item.nodeid


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups off the items
def pytest_collection_modifyitems(config, items):
    rank = {m: i for i, m in enumerate(_LONG_FIRST)}
    items.sort(key=lambda it: rank.get(it.module.__name__.rsplit(".", 1)[-1] if it.module else "", len(rank)))
    for it in items:
        it.add_marker(pytest.mark.xdist_group(_group(it)))
