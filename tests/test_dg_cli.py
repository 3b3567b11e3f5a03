"""`dg check defs` loads the code location (only where the optional dagster-dg-cli is installed)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("dg") is None, reason="dagster-dg-cli not installed (pip install dagster-dg-cli==1.13.27)")
def test_dg_check_defs(tmp_path):
    home = tmp_path / "dh"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "DAGSTER_HOME": str(home), "AUGMENT_DATA_DIR": str(tmp_path / "data"),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(["dg", "check", "defs"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "All definitions loaded successfully" in r.stdout + r.stderr, r.stdout + r.stderr
