"""A data dir made by the code before the `defs/` consolidation reruns with today's code with nothing stale and
0 units computed: asset keys, data versions, memo keys and manifests survived the move.

The old code is taken from this repository's history (``git archive``), so the test needs a clone with history;
it skips, saying why, in a shallow clone."""
import os
import re
import shutil
import subprocess
import sys
import tarfile
import io
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# the last commit before the consolidation (issue 27): asset modules under augment_dagster/assets/
PRE_REFACTOR = "6fb605e252fa5c29a06148cc83ae4d526af11596"
CFG = {
    "experiment": "compat",
    "dataset": {"source": "builtin", "builtin": {"classes": ["circle", "square", "star"], "train_per_class": 5,
                                                  "test_per_class": 2, "ood_per_class": 1}},
    "splits": {"shots": [2], "seeds": [0], "val_per_class": 1},
    "models": {"diffusion": {"source": "tiny-random"}},
    "generation": {"images_per_real": 1, "steps": 3, "batch_size": 32},
    "concepts": {"steps": 2, "batch_size": 2},
    "concept_lora": {"steps": 2, "rank": 2, "batch_size": 2},
    "inversion": {"steps": 3},
    "prompts": {"per_class": 2},
    "training": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 8, "evaluation": ["classifier", "few_shot_episodes"],
                 "episodes": {"episodes": 2}},
    # every method family, so every kind of memo key is written by the old code
    "methods": {"real_guidance": {}, "txt2img": {}, "dafusion": {}, "diagen": {"params": {"use_llm": False}},
                "diff_ii": {"params": {"expansion_rate": 2}}, "genie": {}, "genie_ada": {}, "sgid": {},
                "real_filter": {}, "img2img_low": {}, "standard": {}},
    "mlflow": {"enabled": False},
}


def _old_tree(dest: Path) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git not installed: cannot take the pre-refactor code from history")
    ok = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{PRE_REFACTOR}^{{commit}}"], capture_output=True)
    if ok.returncode != 0:
        pytest.skip(f"commit {PRE_REFACTOR} (pre-refactor main) is not in this clone's history (shallow clone?)")
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", PRE_REFACTOR, "augment_dagster"],
                         capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(dest, filter="data")
    return dest


def _cli(code_root: Path, data: Path, *args) -> str:
    env = {**os.environ, "AUGMENT_DATA_DIR": str(data), "PYTHONPATH": str(code_root)}
    env.pop("DAGSTER_HOME", None)
    # cwd = the code root, so `-m augment_dagster.cli` imports that tree before any installed copy
    r = subprocess.run([sys.executable, "-m", "augment_dagster.cli", *args, "--data-dir", str(data)], cwd=code_root,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r.stdout + r.stderr


@pytest.mark.slow
def test_pre_refactor_data_dir_reruns_with_nothing_stale_and_no_unit_computed(tmp_path):
    old = _old_tree(tmp_path / "old")
    cfg = tmp_path / "compat.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    data = tmp_path / "data"
    where = subprocess.run([sys.executable, "-c", "import augment_dagster; print(augment_dagster.__file__)"], cwd=old,
                           env={**os.environ, "PYTHONPATH": str(old)}, capture_output=True, text=True).stdout
    assert where.startswith(str(old)), where
    cold = _cli(old, data, "run", "--config", str(cfg))
    assert re.search(r"diffusion units: [1-9]\d* computed", cold), cold[-2000:]
    # today's code: every asset of every partition is fresh (same asset keys, code versions, data versions)
    status = _cli(ROOT, data, "status", "--config", str(cfg))
    counts = re.search(r"^\{.*\}$", status, re.M)
    assert counts and set(yaml.safe_load(counts.group(0).replace("'", '"'))) == {"fresh"}, status[-3000:]
    # ... and re-executing every asset finds every unit in the memo (same memo keys)
    forced = _cli(ROOT, data, "run", "--config", str(cfg), "--force")
    assert "diffusion units: 0 computed" in forced, forced[-2000:]
    assert re.search(r"concept units \(textual inversion\): 0 computed", forced), forced[-2000:]
    assert "classifiers: 0 trained" in forced, forced[-2000:]
