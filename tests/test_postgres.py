"""Several hosts: with $AUGMENT_POSTGRES_URL the Dagster instance (runs, events) and MLflow's tracking store live
in PostgreSQL. A real PostgreSQL (Debian's `postgresql`: initdb in a temp dir as the unprivileged `postgres`
user, pg_ctl on a free port) serves two concurrent `augment run` workers on one shared data dir; one is killed
mid-run and a third run resumes with nothing lost. The URL's password never appears in any output."""
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from augment_dagster.defs.scaleout import MLFLOW_SCHEMA, mlflow_postgres_uri, postgres_url, redact, write_instance_yaml

PASSWORD = "s3cret-pw-91"


def test_url_redaction_and_instance_yaml(tmp_path, monkeypatch):
    url = f"postgresql://aug:{PASSWORD}@db.example:5433/augment"
    assert redact(url) == "postgresql://aug:***@db.example:5433/augment" and redact("sqlite:///x.db") == "sqlite:///x.db"
    assert "search_path" in mlflow_postgres_uri(url) and mlflow_postgres_uri(url).startswith("postgresql+psycopg2://aug:")
    tmpl = tmp_path / "template.yaml"
    tmpl.write_text("telemetry:\n  enabled: false\n")
    monkeypatch.delenv("AUGMENT_POSTGRES_URL", raising=False)
    assert "storage" not in write_instance_yaml(tmp_path, tmpl).read_text()  # sqlite by default
    monkeypatch.setenv("AUGMENT_POSTGRES_URL", url)
    assert postgres_url() == "postgresql+psycopg2://" + url.split("://")[1] == os.environ["AUGMENT_POSTGRES_URL"]
    conf = yaml.safe_load(write_instance_yaml(tmp_path, tmpl).read_text())
    assert conf["storage"] == {"postgres": {"postgres_url": {"env": "AUGMENT_POSTGRES_URL"}}}
    assert PASSWORD not in (tmp_path / "dagster.yaml").read_text()  # the URL stays in the environment
    (tmp_path / "dagster.yaml").write_text("storage:\n  sqlite:\n    base_dir: /x\n")  # a user's own file is kept
    assert yaml.safe_load(write_instance_yaml(tmp_path, tmpl).read_text())["storage"] == {"sqlite": {"base_dir": "/x"}}


def _pg_bin() -> Path | None:
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d)
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres(tmp_path):
    """A throwaway PostgreSQL server: its URL (with a password)."""
    try:
        import dagster_postgres  # noqa: F401
        import psycopg2  # noqa: F401
    except ImportError as e:
        pytest.skip(f"dagster-postgres / psycopg2 not installed ({e}); pip install 'augment-dagster[postgres]'")
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install -y postgresql)")
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the unprivileged `postgres` user
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no unprivileged `postgres` user to run PostgreSQL")
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser to start PostgreSQL as `postgres`")
        as_user = ["runuser", "-u", "postgres", "--"]
    pgdir = Path(f"/tmp/augment-pg-{os.getpid()}-{time.time_ns()}")
    pgdir.mkdir(mode=0o700)
    if as_user:
        shutil.chown(pgdir, "postgres", "postgres")
    (pgdir / "pw").write_text(PASSWORD + "\n")
    if as_user:
        shutil.chown(pgdir / "pw", "postgres", "postgres")
    port = _free_port()
    run = lambda *a, **kw: subprocess.run([*as_user, *a], capture_output=True, text=True, timeout=120, **kw)  # noqa: E731
    r = run(str(bindir / "initdb"), "-D", str(pgdir / "data"), "-U", "aug", f"--pwfile={pgdir / 'pw'}", "--auth=md5",
            "-E", "UTF8")
    if r.returncode:
        shutil.rmtree(pgdir, ignore_errors=True)
        pytest.skip(f"initdb failed: {r.stderr[-500:]}")
    r = run(str(bindir / "pg_ctl"), "-D", str(pgdir / "data"), "-l", str(pgdir / "log"), "-w", "-o",
            f"-p {port} -k {pgdir} -c listen_addresses=127.0.0.1 -c max_connections=200", "start")
    if r.returncode:
        log = (pgdir / "log").read_text()[-800:] if (pgdir / "log").exists() else r.stderr
        shutil.rmtree(pgdir, ignore_errors=True)
        pytest.skip(f"pg_ctl start failed: {log}")
    url = f"postgresql://aug:{PASSWORD}@127.0.0.1:{port}/postgres"
    try:
        yield url
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(pgdir / "data"), "-m", "immediate", "stop")
        shutil.rmtree(pgdir, ignore_errors=True)


CFG = {
    "experiment": "pg",
    "dataset": {"source": "builtin", "builtin": {"classes": ["circle", "square", "star"], "train_per_class": 6,
                                                  "test_per_class": 2, "ood_per_class": 0}},
    "splits": {"shots": [2], "seeds": [0, 1], "val_per_class": 1},
    "models": {"diffusion": {"source": "tiny-random"}},
    "generation": {"images_per_real": 4, "steps": 8, "batch_size": 4},
    "training": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 8},
    "methods": {"real_guidance": {}},
}


def _augment(cfg, data, url, *extra) -> subprocess.Popen:
    env = {**os.environ, "AUGMENT_DATA_DIR": str(data), "AUGMENT_POSTGRES_URL": url, "PYTHONUNBUFFERED": "1",
           "AUGMENT_PROGRESS_EVERY_S": "1"}
    env.pop("DAGSTER_HOME", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "augment_dagster.cli", "run", "--config", str(cfg), "--data-dir",
                             str(data), "--devices", "cpu,cpu", *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
def test_two_workers_on_postgres_kill_one_and_resume(postgres, tmp_path):
    import psycopg2

    cfg = tmp_path / "pg.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    data = tmp_path / "shared"  # the shared data dir (NFS / ReadWriteMany volume on several hosts)
    # two workers at once (two device slots on this host), one partition each, both on the one PostgreSQL instance
    a = _augment(cfg, data, postgres, "--partition", "2shot-s0")
    b = _augment(cfg, data, postgres, "--partition", "2shot-s1")
    # kill worker b while its partition's run is under way (STARTED in PostgreSQL) and diffusion units exist
    deadline = time.time() + 600
    memo = data / "memo"

    def b_started() -> bool:
        try:
            with psycopg2.connect(postgres) as conn, conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM runs WHERE status = 'STARTED' AND partition = '2shot-s1'")
                return cur.fetchone()[0] > 0
        except psycopg2.Error:  # tables not created yet
            return False

    while time.time() < deadline and b.poll() is None:
        recs = [json.loads(p.read_text()) for p in memo.rglob("*.json")] if memo.exists() else []
        if any(str(r.get("fn", "")).startswith("synthetic/") for r in recs) and b_started():
            break
        time.sleep(0.3)
    assert b.poll() is None, "worker b ended before it could be killed:\n" + b.stdout.read()[-2000:]
    os.killpg(b.pid, signal.SIGKILL)
    b.wait()
    out_a, _ = a.communicate(timeout=900)
    assert a.returncode == 0, out_a[-3000:]
    # resume: the whole config; the killed partition completes, what b finished is reused, nothing lost
    c = _augment(cfg, data, postgres)
    out_c, _ = c.communicate(timeout=900)
    assert c.returncode == 0, out_c[-3000:]
    assert "marked failed" in out_c, out_c[:3000]  # the killed run, released
    assert "partition 2shot-s0: nothing missing or stale" in out_c
    for out in (out_a, out_c, b.stdout.read() if b.stdout else ""):
        assert PASSWORD not in out
    for pk in ("2shot-s0", "2shot-s1"):
        assert (data / "manifests" / "pg" / "synthetic" / "real_guidance" / f"{pk}.parquet").exists()
    assert (data / "report" / "pg" / "report.md").exists()
    home = data / "dagster_home"
    assert not list(home.rglob("*.db")), "the instance must not fall back to sqlite"
    assert PASSWORD not in (home / "dagster.yaml").read_text()
    with psycopg2.connect(postgres) as conn, conn.cursor() as cur:
        cur.execute("SELECT status, count(*) FROM runs GROUP BY status")
        status = dict(cur.fetchall())
        assert status.get("FAILURE", 0) >= 1 and status.get("SUCCESS", 0) >= 3, status
        cur.execute("SELECT count(DISTINCT partition) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION' "
                    "AND asset_key LIKE %s", ('%synthetic%real_guidance%',))
        assert cur.fetchone()[0] == 2
        cur.execute(f"SELECT count(*) FROM {MLFLOW_SCHEMA}.runs")  # MLflow's tracking store is there too
        assert cur.fetchone()[0] >= 4
    assert not list(data.rglob("mlflow.db"))
