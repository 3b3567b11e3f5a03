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
