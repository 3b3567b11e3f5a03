"""bench/demo.py on a tiny config: a cold run, a no-op rerun and a one-worker cold run, all as processes; figures
printed and written."""
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_demo", ROOT / "bench" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stage_of_step_keys():
    b = load_bench()
    assert b.stage_of("demo__synthetic__dafusion", "demo") == "synthetic"
    assert b.stage_of("demo__concept_embeddings", "demo") == "concept_embeddings"


@pytest.mark.slow
def test_cold_then_noop_rerun_figures(tmp_path, capsys):
    cfg = {
        "experiment": "bd", "dataset": {"source": "builtin", "builtin": {"classes": ["circle", "square"], "train_per_class": 6,
                                                                          "test_per_class": 2, "ood_per_class": 0}},
        "splits": {"shots": [2], "seeds": [0, 1], "val_per_class": 1}, "models": {"diffusion": {"source": "tiny-random"}},
        "generation": {"images_per_real": 1, "steps": 2, "batch_size": 8},
        "training": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 8},
        "methods": {"real_guidance": {}}, "mlflow": {"enabled": False},
    }
    p = tmp_path / "bd.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "fig.json"
    assert load_bench().main(["--config", str(p), "--keep", str(tmp_path / "w"), "--json", str(out),
                              "--unet-seconds", "0.5"]) == 0
    res = json.loads(out.read_text())
    assert res["cold_s"] > res["rerun_s"] > 0 and res["ratio"] == pytest.approx(res["rerun_s"] / res["cold_s"], rel=0.05)
    assert res["max_rss_mb"] > 50
    assert "synthetic" in res["stage_seconds_cold"] and "classifier" in res["stage_seconds_cold"]
    # the same config cold with one worker (--devices 1): the same report
    assert res["cold_one_worker_s"] > 0 and res["slots_ratio"] == pytest.approx(res["cold_s"] / res["cold_one_worker_s"], rel=0.05)
    assert res["reports_identical"] is True
    # the floors: the one-worker steps over the slots; the UNet passes read from the event log are the ones the
    # one-worker run's own summary line counted
    assert res["slots"] >= 1 and res["work_floor_s"] == pytest.approx(res["one_worker_step_s"] / res["slots"], abs=0.11)
    assert 0 < res["work_floor_s"] < res["cold_one_worker_s"]
    one_log = (tmp_path / "w" / "cold_one_worker.log").read_text()
    summary = re.search(r"\((\d+) UNet forward passes\)", one_log)
    assert summary and res["unet_image_passes"] == int(summary.group(1)) > 0, one_log[-1500:]
    assert res["unet_passes_per_s_one_thread"] > 0
    printed = capsys.readouterr().out
    assert "rerun / cold" in printed and "default / one" in printed and "identical" in printed
    assert "work floor" in printed and "UNet floor" in printed
    assert "slot 0 (cpu)" in one_log and "slot 1" not in one_log
    rerun_log = (tmp_path / "w" / "rerun.log").read_text()
    assert "diffusion units: 0 computed" in rerun_log and "nothing missing or stale" in rerun_log


def test_report_comparison_ignores_only_timing_columns():
    b = load_bench()
    rep = "# r\n| method | acc | gpu_seconds |\n|---|---|---|\n| dafusion | 0.5 | 0.31 |\n\nafter | 0.31"
    assert b.without_timings(rep) == b.without_timings(rep.replace("| 0.31 |", "| 0.17 |"))
    assert b.without_timings(rep) != b.without_timings(rep.replace("| 0.5 |", "| 0.6 |"))
    assert b.without_timings(rep) != b.without_timings(rep.replace("after | 0.31", "after | 0.17"))
