"""Errors for people: a user error (also one raised inside a Dagster step) is one short block naming the file,
key or URL and what to do, exit 2; -v shows the trace."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from augment_dagster.data.builtin import write_builtin
from augment_dagster.errors import UserError, find_user_error, format_user_error

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, source):
    cfg = {"experiment": "errs", "dataset": {"source": str(source)}, "splits": {"shots": [1], "seeds": [0], "val_per_class": 1},
           "models": {"diffusion": {"source": "tiny-random"}}, "methods": {"standard": {}}, "mlflow": {"enabled": False}}
    p = tmp_path / "errs.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _augment(tmp_path, *args):
    env = {**os.environ, "AUGMENT_DATA_DIR": str(tmp_path / "store"), "DAGSTER_HOME": str(tmp_path / "dh"),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("AUGMENT_CONFIG_DIR", None)
    return subprocess.run([sys.executable, "-m", "augment_dagster.cli", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)


@pytest.fixture
def corrupt_dataset(tmp_path):
    src = write_builtin(tmp_path / "gen", classes=["circle", "square"], train_per_class=3, test_per_class=1,
                        ood_per_class=0, size=16, seed=0)
    data = tmp_path / "dataset"
    shutil.copytree(src, data)
    bad = sorted((data / "square").iterdir())[0]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return data, bad


def test_corrupt_image_is_a_short_block_exit_2(tmp_path, corrupt_dataset):
    data, bad = corrupt_dataset
    r = _augment(tmp_path, "run", "--config", str(_cfg(tmp_path, data)))
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) <= 6, r.stderr
    assert any(bad.name in line and "BadImageError" in line for line in err), r.stderr
    assert any("what to do" in line and "on_bad_file" in line for line in err), r.stderr
    assert "Traceback" not in r.stderr
    # -v: the full trace, then the same block
    rv = _augment(tmp_path, "run", "-v", "--config", str(_cfg(tmp_path, data)))
    assert rv.returncode == 2 and "Traceback" in rv.stderr and bad.name in rv.stderr.splitlines()[-3]


def test_config_error_is_a_short_block(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"experiment": "x", "splits": {"shotz": [1]}}))
    r = _augment(tmp_path, "status", "--config", str(p))
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 6 and "shotz" in r.stderr and str(p) in r.stderr and "what to do" in r.stderr


def test_find_user_error_unwraps_chains_and_dagster_text():
    from augment_dagster.data.imagefolder import BadImageError
    from augment_dagster.llm import LLMError

    inner = BadImageError("/d/square/x.png: not a readable image")
    try:
        try:
            raise inner
        except BadImageError as e:
            raise RuntimeError("step failed") from e
    except RuntimeError as outer:
        assert find_user_error(outer) is inner
    # an out-of-process step: only the text of the original error survives
    text = RuntimeError("DagsterPipesExecutionError: worker failed\naugment_dagster.llm.LLMError: LLM request to "
                        "http://127.0.0.1:9/v1 (models.llm.base_url) failed")
    u = find_user_error(text)
    assert u is not None and "127.0.0.1:9" in str(u) and "models.llm.base_url" in format_user_error(u)
    assert find_user_error(ValueError("a bug, not a user error")) is None
    from dagster._core.errors import DagsterAssetCheckFailedError

    blocked = find_user_error(DagsterAssetCheckFailedError(
        "1 blocking asset check failed with ERROR severity:\nexp/synthetic/m: synthetic_integrity"))
    block = format_user_error(blocked)
    assert "exp/synthetic/m: synthetic_integrity" in block and "Checks tab" in block and len(block.splitlines()) <= 3
    assert isinstance(LLMError("x"), UserError) and isinstance(LLMError("x"), RuntimeError)


def test_llm_error_names_base_url_and_model():
    from augment_dagster.llm import LLMClient, LLMError

    os.environ["T18_LLM_KEY"] = "sk-secret-value"
    try:
        c = LLMClient(provider="openai", model="my-model", base_url="http://127.0.0.1:9/v1", api_key_env="T18_LLM_KEY",
                      timeout_s=1, max_retries=0, backoff_s=0, fallback_to_offline=False)
        with pytest.raises(LLMError) as ei:
            c.complete([{"role": "user", "content": "hi"}])
    finally:
        del os.environ["T18_LLM_KEY"]
    msg = str(ei.value)
    assert "http://127.0.0.1:9/v1" in msg and "my-model" in msg and "sk-secret-value" not in msg
