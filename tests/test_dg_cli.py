"""`dg check defs` loads the code location (dagster-dg-cli is in the ``test`` extra; CI installs it)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the venv's own `dg` first (the tests may run with the venv's python without its bin/ on PATH)
DG = next((str(p) for p in [Path(sys.executable).parent / "dg"] if p.exists()), None) or shutil.which("dg")


@pytest.mark.skipif(DG is None, reason="dagster-dg-cli not installed: pip install -e '.[test]' (-c requirements-cpu.txt)")
def test_dg_check_defs(tmp_path):
    home = tmp_path / "dh"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "DAGSTER_HOME": str(home), "AUGMENT_DATA_DIR": str(tmp_path / "data"),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([DG, "check", "defs"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "All definitions loaded successfully" in r.stdout + r.stderr, r.stdout + r.stderr
    # the location dg loaded is this checkout's: its per-experiment resources (defs/resources.py) are listed
    r = subprocess.run([DG, "list", "defs", "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "store_demo" in r.stdout and "models_demo" in r.stdout, r.stdout[-2000:] + r.stderr
