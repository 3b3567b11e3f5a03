"""Faults and mistakes through the CLI (`python -m augment_dagster.cli` in a subprocess): every bad input or
machine fault exits 2 with one short block (at most 6 lines of output in all) naming the culprit, no traceback;
finished work survives (a rerun of the good config reuses every unit); Ctrl-C keeps every finished unit."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from augment_dagster.data.builtin import write_builtin

ROOT = Path(__file__).resolve().parents[1]
INJECT = Path(__file__).resolve().parent / "faultinject"
GOOD = {
    "experiment": "flt",
    "dataset": {"source": "builtin", "builtin": {"classes": ["circle", "square"], "train_per_class": 4, "test_per_class": 1,
                                                  "ood_per_class": 0}},
    "splits": {"shots": [2], "seeds": [0], "val_per_class": 1},
    "models": {"diffusion": {"source": "tiny-random"}},
    "generation": {"images_per_real": 1, "steps": 2, "batch_size": 8},
    "training": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 8},
    "methods": {"real_guidance": {}},
    "mlflow": {"enabled": False},
}


def cli(args, data: Path, env_extra=None, cwd=None, timeout=300):
    env = {**os.environ, "AUGMENT_DATA_DIR": str(data), "DAGSTER_HOME": str(data / "dagster_home"), "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", "AUGMENT_PROGRESS_EVERY_S": "3600",  # no heartbeat line on a busy machine
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("AUGMENT_CONFIG_DIR", None)
    for k, v in (env_extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return subprocess.run([sys.executable, "-m", "augment_dagster.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=timeout)


def write(path: Path, cfg: dict | str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(cfg, bytes):
        path.write_bytes(cfg)
    else:
        path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return path


def variant(**over) -> dict:
    cfg = json.loads(json.dumps(GOOD))
    for dotted, v in over.items():
        node = cfg
        *head, last = dotted.split("__")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    return cfg


def units_line(out: str) -> tuple[int, int, int]:
    """(diffusion units computed, reused, classifiers trained) from `augment run`'s summary."""
    comp = reused = trained = None
    for line in out.splitlines():
        if line.startswith("diffusion units:"):
            comp, reused = int(line.split()[2]), int(line.split()[4])
        if line.startswith("classifiers:"):
            trained = int(line.split()[1])
    assert None not in (comp, reused, trained), out[-3000:]
    return comp, reused, trained


@contextlib.contextmanager
def tmpfs(where: Path, size="32m"):
    """A small tmpfs mounted at ``where`` (None when this machine cannot mount: the caller simulates)."""
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        yield None
        return
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(fs: Path) -> None:
    """Fill a tmpfs to the last byte (1 MiB writes, then 1 KiB ones)."""
    with contextlib.suppress(OSError):
        with open(fs / "filler", "wb") as f:
            for chunk in (1 << 20, 1 << 10):
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * chunk)
                        f.flush()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished small run of GOOD (tiny-random, 2 classes): its config and data dir."""
    d = tmp_path_factory.mktemp("faults")
    cfg = write(d / "good.yaml", GOOD)
    data = d / "data"
    r = cli(["run", "--config", str(cfg)], data, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return d, cfg, data


def _dataset(tmp: Path, name: str) -> Path:
    src = write_builtin(tmp / f"gen-{name}", classes=["circle", "square"], train_per_class=3, test_per_class=1,
                        ood_per_class=0, size=16, seed=0)
    dst = tmp / name
    shutil.copytree(src, dst)
    return dst


def cheap_cases(d: Path, cfg: Path, data: Path) -> list[tuple]:
    """(name, argv, data dir, extra env, culprit substrings): bad inputs that fail before any model work."""
    fresh = lambda n: d / "fresh" / n  # noqa: E731 - a data dir of its own per case
    w = lambda n, c: str(write(d / "cfgs" / f"{n}.yaml", c))  # noqa: E731
    (d / "afile").write_text("x")
    (d / "cfgdir").mkdir(exist_ok=True)
    write(d / "cfgdir" / "a.yaml", GOOD)
    (d / "emptyds").mkdir(exist_ok=True)
    corrupt = _dataset(d, "ds-corrupt")
    bad = sorted((corrupt / "square").iterdir())[0]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    empty = _dataset(d, "ds-empty")
    bad0 = sorted((empty / "circle").iterdir())[0]
    bad0.write_bytes(b"")
    trunc = _dataset(d, "ds-trunc")
    badt = sorted((trunc / "circle").iterdir())[1]
    badt.write_bytes(badt.read_bytes()[:40])
    good_ds = _dataset(d, "ds-good")
    # ingestion rows (data hygiene): a 1x1 image, an animated GIF, a train image also in test/, two bad files,
    # a file name that is not UTF-8, the same image in two classes
    from PIL import Image

    tiny = _dataset(d, "ds-tiny")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tiny / "circle" / "one_pixel.png")
    gif = _dataset(d, "ds-gif")
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(gif / "square" / "moving.gif", save_all=True, append_images=frames[1:], duration=50)
    leak = _dataset(d, "ds-leak")
    leaked = sorted((leak / "circle").iterdir())[0]
    shutil.copyfile(leaked, leak / "test" / "circle" / "leaked_copy.png")
    two = _dataset(d, "ds-two")
    two_a, two_b = sorted((two / "circle").iterdir())[0], sorted((two / "square").iterdir())[1]
    two_a.write_bytes(b"garbage")
    two_b.write_bytes(b"")
    nonutf = _dataset(d, "ds-nonutf8")
    os.rename(sorted((nonutf / "circle").iterdir())[0], os.path.join(os.fsencode(nonutf / "circle"), b"caf\xe9.png"))
    dup = _dataset(d, "ds-dup")
    dup_src = sorted((dup / "circle").iterdir())[1]
    shutil.copyfile(dup_src, dup / "square" / "copied_from_circle.png")
    g = str(cfg)
    llm = {"provider": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "AUGMENT_FAULT_KEY",
           "fallback_to_offline": False, "max_retries": 0, "timeout_s": 2}
    return [
        ("config file missing", ["run", "--config", str(d / "nope.yaml")], data, {}, ["nope.yaml", "missing"]),
        ("--config is a folder", ["run", "--config", str(d / "cfgdir")], data, {}, ["cfgdir", "folder"]),
        ("--data-dir is a file", ["run", "--config", g, "--data-dir", str(d / "afile")], data, {}, ["afile"]),
        ("--data-dir under a file", ["status", "--config", g, "--data-dir", str(d / "afile" / "sub")], data, {}, ["afile"]),
        ("generation: written twice", ["run", "--config", w("dup", "experiment: flt\ngeneration: {steps: 2}\n"
                                                           "splits: {shots: [2]}\ngeneration: {steps: 3}\n")],
         data, {}, ["generation", "twice", "dup.yaml"]),
        ("nested key written twice", ["status", "--config", w("dup2", "experiment: flt\nsplits:\n  shots: [2]\n"
                                                              "  shots: [4]\n")], data, {}, ["shots", "twice"]),
        ("YAML syntax error", ["run", "--config", w("syntax", "experiment: flt\nsplits: [1, 2\n")], data, {},
         ["syntax.yaml", "YAML"]),
        ("empty config file", ["run", "--config", w("empty", "")], data, {}, ["empty.yaml"]),
        ("config is a list", ["run", "--config", w("list", "- a\n- b\n")], data, {}, ["list.yaml"]),
        ("config not UTF-8", ["run", "--config", str(write(d / "cfgs" / "bin.yaml", b"\xff\xfe\x00bad"))], data, {},
         ["bin.yaml", "UTF-8"]),
        ("unknown key (typo)", ["run", "--config", w("typo", variant(splits__shotz=[2]))], data, {}, ["shotz"]),
        ("wrong type", ["run", "--config", w("type", variant(splits__shots="four"))], data, {}, ["shots"]),
        ("bad experiment name", ["run", "--config", w("name", variant(experiment="my exp!"))], data, {}, ["experiment"]),
        ("unknown algorithm", ["run", "--config", w("algo", variant(methods={"x": {"method": "nosuchmethod"}}))],
         data, {}, ["nosuchmethod"]),
        ("--methods typo", ["run", "--config", g, "--methods", "real_guidanse"], data, {}, ["real_guidanse", "real_guidance"]),
        ("--methods not in config", ["run", "--config", g, "--methods", "dafusion"], data, {}, ["dafusion", "valid"]),
        ("--partition unknown", ["run", "--config", g, "--partition", "9shot-s0"], data, {}, ["9shot-s0", "2shot-s0"]),
        ("--partition malformed", ["run", "--config", g, "--partition", "2shot"], data, {}, ["2shot", "2shot-s0"]),
        ("export: unknown method", ["export", "--config", g, "--method", "nope", "--split", "2shot-s0", "--out",
                                    str(d / "exp")], data, {}, ["nope"]),
        ("export: unknown split", ["export", "--config", g, "--method", "real_guidance", "--split", "3shot-s0",
                                   "--out", str(d / "exp")], data, {}, ["3shot-s0"]),
        ("lineage: unknown id", ["lineage", "--config", g, "ffffffffffff"], data, {}, ["ffffffffffff"]),
        ("dataset folder missing", ["run", "--config", w("nods", variant(dataset={"source": str(d / "nowhere")}))],
         fresh("nods"), {}, ["nowhere"]),
        ("dataset folder empty", ["run", "--config", w("emptyds", variant(dataset={"source": str(d / "emptyds")}))],
         fresh("emptyds"), {}, ["emptyds"]),
        ("corrupt image", ["run", "--config", w("corrupt", variant(dataset={"source": str(corrupt)}))],
         fresh("corrupt"), {}, [bad.name]),
        ("empty (0-byte) image", ["run", "--config", w("zero", variant(dataset={"source": str(empty)}))],
         fresh("zero"), {}, [bad0.name]),
        ("truncated image", ["run", "--config", w("trunc", variant(dataset={"source": str(trunc)}))],
         fresh("trunc"), {}, [badt.name]),
        ("a 1x1 image", ["run", "--config", w("tiny", variant(dataset={"source": str(tiny)}))], fresh("tiny"), {},
         ["one_pixel.png"]),
        ("an animated GIF", ["run", "--config", w("gif", variant(dataset={"source": str(gif)}))], fresh("gif"), {},
         ["moving.gif"]),
        ("a train image also in test/", ["run", "--config", w("leak", variant(dataset={"source": str(leak)}))],
         fresh("leak"), {}, [leaked.name, "leaked_copy.png"]),
        ("two bad files: both named", ["run", "--config", w("two", variant(dataset={"source": str(two)}))],
         fresh("two"), {}, [two_a.name, two_b.name]),
        ("a file name that is not UTF-8", ["run", "--config", w("nonutf", variant(dataset={"source": str(nonutf)}))],
         fresh("nonutf"), {}, ["caf\\xe9.png"]),
        ("the same image in two classes", ["run", "--config", w("dupimg", variant(dataset={"source": str(dup)}))],
         fresh("dup"), {}, [dup_src.name, "copied_from_circle.png"]),
        ("more shots than images", ["run", "--config", w("shots", variant(dataset={"source": str(good_ds)},
                                                                           splits__shots=[50]))],
         fresh("shots"), {}, ["shots"]),
        ("LLM API key missing", ["run", "--config", w("key", variant(methods={"diagen": {}}, models__llm=llm))],
         fresh("key"), {"AUGMENT_FAULT_KEY": None}, ["AUGMENT_FAULT_KEY"]),
        ("LLM server not listening", ["run", "--config", w("port", variant(dataset={"source": str(good_ds)},
                                                                           methods={"diagen": {}}, models__llm=llm))],
         fresh("port"), {"AUGMENT_FAULT_KEY": "sk-test-not-a-secret"}, ["127.0.0.1:9", "models.llm.base_url"]),
        ("diffusion model folder missing", ["run", "--config", w("model", variant(
            dataset={"source": str(good_ds)}, models__diffusion={"source": str(d / "no_model")}))],
         fresh("model"), {}, ["no_model"]),
    ]


def check(name, r, culprits):
    out = (r.stdout + r.stderr).strip()
    lines = [x for x in out.splitlines() if x.strip()]
    assert r.returncode == 2, f"{name}: exit {r.returncode}\n{out[-3000:]}"
    assert len(lines) <= 6, f"{name}: {len(lines)} lines\n{out[-3000:]}"
    assert "Traceback" not in out, f"{name}\n{out[-3000:]}"
    for c in culprits:
        assert c in out, f"{name}: {c!r} not named\n{out}"
    assert any("what to do" in x for x in lines), f"{name}\n{out}"
    return len(lines)


@pytest.mark.slow
def test_bad_inputs_and_faults_are_short_blocks_and_lose_nothing(finished, tmp_path):
    d, cfg, data = finished
    counts: dict[str, int] = {}
    cases = cheap_cases(tmp_path, cfg, data)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda c: (c, cli(c[1], c[2], c[3])), cases))
    for (name, _, _, _, culprits), r in results:
        counts[name] = check(name, r, culprits)

    # faults inside a step of a real run on the finished data dir: new synthetic units must be written
    more = str(write(tmp_path / "more.yaml", variant(generation__images_per_real=2)))
    for name, fault, culprits in [
        ("permission denied in a step (simulated EACCES)", "EACCES:/blobs/", ["PermissionDeniedError", "/blobs/"]),
        ("out of memory in a step (simulated MemoryError)", "MemoryError:/blobs/", ["OutOfMemoryError", "batch_size"]),
        ("disk full in a step (simulated ENOSPC)", "ENOSPC:/blobs/", ["DiskFullError", "/blobs/"]),
        ("read-only storage in a step (simulated EROFS)", "EROFS:/manifests/", ["ReadOnlyStorageError", "/manifests/"]),
    ]:
        r = cli(["run", "--config", more], data, {"AUGMENT_TEST_FAULT": fault,
                                                  "PYTHONPATH": f"{INJECT}{os.pathsep}{ROOT}"})
        counts[name] = check(name, r, culprits)

    print("\nfault case -> lines of output")
    for name, n in counts.items():
        print(f"  {n}  {name}")
    assert len(counts) >= 30, len(counts)
    # afterwards the good config finds nothing to do, and executing every asset (--force) reuses every unit
    r = cli(["run", "--config", str(cfg)], data)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("nothing missing or stale") == 2, r.stdout  # the partition and the report
    assert units_line(r.stdout) == (0, 0, 0), r.stdout
    r = cli(["run", "--config", str(cfg), "--force"], data)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    computed, reused, trained = units_line(r.stdout)
    assert computed == 0 and reused == 4 and trained == 0, r.stdout  # 4 = 2 classes × 2 shots × 1 image per real


@pytest.mark.slow
def test_disk_full_and_read_only_on_a_real_tmpfs(finished, tmp_path):
    """The real faults on a small tmpfs holding a copy of the finished data dir; once the space is back, the copy
    reruns reusing every unit."""
    d, cfg, data = finished
    counts: dict[str, int] = {}
    more = str(write(tmp_path / "more.yaml", variant(generation__images_per_real=2)))
    with tmpfs(tmp_path / "fs") as fs:
        if fs is None:  # pragma: no cover - a machine that cannot mount: the simulated ENOSPC/EROFS cases stand in
            pytest.skip("`mount -t tmpfs` is not permitted here: the simulated ENOSPC / EROFS cases of "
                        "test_bad_inputs_and_faults_are_short_blocks_and_lose_nothing stand in")
        else:
            shutil.copytree(data, fs / "data")
            home2 = tmp_path / "home2"
            shutil.copytree(data / "dagster_home", home2)
            fill(fs)
            r = cli(["run", "--config", more], fs / "data")  # Dagster's sqlite on the full disk too
            counts["disk full (tmpfs; data dir and DAGSTER_HOME)"] = check("disk full", r, ["DiskFullError", str(fs / "data")])
            r = cli(["run", "--config", more], fs / "data", {"DAGSTER_HOME": str(home2)})  # only the data dir is full
            counts["disk full (tmpfs; data dir only)"] = check("disk full, data dir", r, ["DiskFullError", str(fs / "data")])
            (fs / "filler").unlink()
            assert subprocess.run(["mount", "-o", "remount,ro", str(fs)]).returncode == 0
            r = cli(["run", "--config", str(cfg)], fs / "data")
            counts["read-only data dir (tmpfs remounted ro)"] = check("read-only", r, ["ReadOnlyStorageError", str(fs / "data")])
            r = cli(["status", "--config", str(cfg)], fs / "data")
            counts["read-only data dir: status"] = check("read-only status", r, ["ReadOnlyStorageError"])
            subprocess.run(["mount", "-o", "remount,rw", str(fs)], check=True)
            # the space is back: the copy resumes and reuses every unit
            r = cli(["run", "--config", str(cfg)], fs / "data")
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
            assert units_line(r.stdout)[0] == 0 and units_line(r.stdout)[2] == 0, r.stdout
    for name, n in counts.items():
        print(f"  {n}  {name}")


@pytest.mark.slow
def test_sigint_mid_synthetic_keeps_every_finished_unit(tmp_path):
    """Ctrl-C while synthetic units are written: at most 3 lines say what was kept; the run is canceled in the
    instance; the rerun reuses every unit recorded before the signal (and computes only the rest)."""
    from test_reliability import augment, computed_line, memo_count, write_cfg

    import dagster as dg

    data = tmp_path / "data"
    n = 8 * 6
    cfg = write_cfg(tmp_path, {"generation": {"images_per_real": 6, "steps": 20, "batch_size": 1}})
    p = augment(["run", "--config", str(cfg)], data)
    t0 = time.time()
    lines_before = []
    while time.time() - t0 < 240:
        if memo_count(data) >= 10:
            break
        if p.poll() is not None:
            pytest.fail("run ended before the interrupt:\n" + p.stdout.read()[-3000:])
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 130, out[-3000:]
    kept = memo_count(data)
    assert 10 <= kept < n
    tail = out[out.index("augment run: interrupted"):] if "augment run: interrupted" in out else out
    assert "Traceback" not in out and len([x for x in tail.splitlines() if x.strip()]) <= 3, out[-3000:]
    assert "kept in the memo" in tail and "resumes" in tail and "canceled" in tail, out
    lines_before = [x for x in out.splitlines() if x.strip()]
    assert len(lines_before) <= 6, out  # header, plan line, the 2-line note (a progress line at most)
    os.environ["DAGSTER_HOME"] = str(data / "dagster_home")
    try:
        inst = dg.DagsterInstance.get()
        runs = inst.get_runs(filters=dg.RunsFilter(tags={"augment/cli": "run"}))
        assert dg.DagsterRunStatus.CANCELED in {r.status for r in runs}
        inst.dispose()
    finally:
        os.environ.pop("DAGSTER_HOME", None)
    q = augment(["run", "--config", str(cfg)], data)
    out2, _ = q.communicate(timeout=600)
    assert q.returncode == 0, out2[-3000:]
    computed, reused = computed_line(out2)
    assert reused == kept and computed == n - kept


def test_seed_level_statistics_are_honest():
    """Fewer than 3 seeds: no interval, no test (and the note says why); accuracy intervals inside [0, 1]; a
    difference that is the same in every seed is reported as having no variance, not as "± 0.000 *, p < 0.001"."""
    import pandas as pd

    from augment_dagster.defs.assets.report import ci_note, pretty, summarize
    from augment_dagster.metrics.stats import bootstrap_mean_interval, paired_t, wilson_interval

    def rows(method, accs):
        return [{"method": method, "shots": 4, "seed": s, "split": f"4shot-s{s}", "acc_id": a, "acc_ood": a,
                 "n_synthetic": 0} for s, a in enumerate(accs)]

    two = pd.DataFrame(rows("real_only", [0.2, 1.0]) + rows("m", [0.4, 1.0]))  # t-interval: 0.6 ± 5.1
    s2 = summarize(two)
    assert s2["acc_id_lo"].isna().all() and s2["acc_id_diff_ci95"].isna().all() and s2["acc_id_p"].isna().all()
    assert "fewer than 3 seeds" in ci_note(s2) and "no interval" in pretty(s2)["acc_id (95% CI)"].iloc[0]
    three = pd.DataFrame(rows("real_only", [0.9, 1.0, 0.95]) + rows("m", [1.0, 1.0, 0.6]))
    s3 = summarize(three)
    assert ((s3["acc_id_lo"] >= 0) & (s3["acc_id_hi"] <= 1) & (s3["acc_id_lo"] <= s3["acc_id_mean"])
            & (s3["acc_id_mean"] <= s3["acc_id_hi"])).all()
    same = pd.DataFrame(rows("real_only", [0.5, 0.6, 0.7]) + rows("m", [0.55, 0.65, 0.75]))  # +0.05 in every seed
    ss = summarize(same)
    r = ss[ss["method"] == "m"].iloc[0]
    assert bool(r["acc_id_zero_var"]) and r["acc_id_p"] != r["acc_id_p"] and r["acc_id_sig"] == ""
    cell = pretty(ss).set_index("method").loc["m", "Δ_id vs real_only"]
    assert "no variance" in cell and "*" not in cell and "± 0.000" not in cell
    assert paired_t({0: 1.0, 1: 2.0}, {0: 0.0, 1: 1.0})["zero_var"]
    mean, lo, hi, n = bootstrap_mean_interval([1.0, 1.0, 0.0])
    assert n == 3 and 0.0 <= lo <= mean <= hi <= 1.0
    for k, n in ((0, 5), (5, 5), (3, 10)):
        a, b = wilson_interval(k, n)
        assert 0.0 <= a <= k / n <= b <= 1.0


def test_mlflow_experiment_opens_in_the_model_training_view(tmp_path, monkeypatch):
    """MLflow 3 opens an experiment without ``mlflow.experimentKind`` in its GenAI (traces) view; ours carry the
    model-training kind, also an experiment created before this tag existed (set on its next run)."""
    from augment_dagster.defs.tracking import MlflowTracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    t = MlflowTracker(default_root=str(tmp_path / "mlflow"))
    rid, err = t.log_run("kind", "m/1shot-s0", params={"p": 1}, metrics={"acc_id": 0.5}, tags={})
    assert err is None
    c = t.client()
    assert c.get_experiment_by_name("kind").tags["mlflow.experimentKind"] == "custom_model_development"
    old = c.create_experiment("old")  # as the previous code made it
    assert "mlflow.experimentKind" not in c.get_experiment(old).tags
    t.log_run("old", "m/1shot-s0", params={"p": 1}, metrics={"acc_id": 0.5}, tags={})
    assert c.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


DUMP = """
import json, os, sys
import dagster as dg
inst = dg.DagsterInstance.get()
out = {}
for key in inst.get_asset_keys():
    recs = inst.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=1000).records
    for r in sorted(recs, key=lambda r: r.storage_id):
        m = r.asset_materialization
        out[key.to_user_string() + "[" + (m.partition or "-") + "]"] = (m.tags or {}).get("dagster/data_version")
print(json.dumps({"versions": out, "materializations": inst.get_event_records(
    dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_MATERIALIZATION), limit=100000).__len__()}))
"""


def data_versions(data: Path) -> tuple[dict, int]:
    env = {**os.environ, "DAGSTER_HOME": str(data / "dagster_home")}
    r = subprocess.run([sys.executable, "-c", DUMP], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout.strip().splitlines()[-1])
    return d["versions"], d["materializations"]


@pytest.mark.slow
def test_a_copied_data_dir_keeps_every_data_version(finished, tmp_path):
    """Copy a finished data dir elsewhere, re-execute one split there with --force: every data version stays as
    it was (nothing depends on where the data dir lies); a plain rerun afterwards materializes only raw_images."""
    _, cfg, data = finished
    before, _ = data_versions(data)
    copy = tmp_path / "elsewhere" / "moved"
    shutil.copytree(data, copy, symlinks=True)
    r = cli(["run", "--config", str(cfg), "--force", "--partition", "2shot-s0"], copy)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert units_line(r.stdout)[0] == 0 and units_line(r.stdout)[2] == 0, r.stdout  # every unit reused
    after, n_after = data_versions(copy)
    changed = {k: (before[k], after.get(k)) for k in before if after.get(k) != before[k]}
    assert not changed, changed
    split = __import__("pandas").read_parquet(copy / "manifests" / "flt" / "few_shot_split" / "2shot-s0.parquet")
    assert not Path(split["dataset_root"].iloc[0]).is_absolute()  # the builtin dataset lies in the data dir
    r = cli(["run", "--config", str(cfg)], copy)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    _, n_final = data_versions(copy)
    assert n_final == n_after + 1, r.stdout  # raw_images only (re-ingested by design; same data version)
    assert "nothing missing or stale" in r.stdout, r.stdout


@pytest.mark.slow
def test_opening_the_ui_on_a_finished_data_dir_launches_no_run(tmp_path):
    """`dagster dev` on a finished data dir with automation on: the new-data sensor starts from the stored state
    (the last raw_images record) and the automation conditions find nothing to do: once both sensors have ticked,
    no run was launched."""
    from test_ui import _port, gql

    cfg = variant(experiment="quiet", automation={"enabled": True, "sensor_interval_s": 5})
    configs = tmp_path / "configs"
    write(configs / "quiet.yaml", cfg)
    data = tmp_path / "data"
    r = cli(["run", "--config", str(configs / "quiet.yaml")], data, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    port = _port()
    env = {**os.environ, "DAGSTER_HOME": str(data / "dagster_home"), "AUGMENT_CONFIG_DIR": str(configs),
           "AUGMENT_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(tmp_path / "dagster_dev.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "dagster", "dev", "-w", str(ROOT / "workspace.yaml"), "-h", "127.0.0.1",
                             "-p", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            try:
                health = gql(url, "{ instance { daemonHealth { allDaemonStatuses { daemonType healthy } } } }")
                st = {d["daemonType"]: d["healthy"] for d in health["instance"]["daemonHealth"]["allDaemonStatuses"]}
                if st.get("SENSOR"):
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(1)
        else:
            pytest.fail("dagster dev did not come up:\n" + (tmp_path / "dagster_dev.log").read_text()[-3000:])
        loc = gql(url, "{ workspaceOrError { ... on Workspace { locationEntries { name } } } }")[
            "workspaceOrError"]["locationEntries"][0]["name"]

        def ticks(name):
            sel = {"repositoryLocationName": loc, "repositoryName": "__repository__", "sensorName": name}
            return gql(url, """query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { ... on Sensor {
                sensorState { status ticks(limit: 20) { status skipReason runIds } } } } }""", {"s": sel})["sensorOrError"]

        # until the automation conditions were evaluated (a finished tick of their sensor) and the new-data sensor
        # ticked twice: whatever either would launch is launched by then (at most 150 s)
        for _ in range(150):
            auto = ticks("automation_condition_sensor")
            done = [t for t in auto["sensorState"]["ticks"] if t["status"] in ("SKIPPED", "SUCCESS", "FAILURE")]
            if done and len(ticks("new_data_sensor_quiet")["sensorState"]["ticks"]) >= 2:
                break
            time.sleep(1)
        else:
            pytest.fail(f"no finished automation tick in 150 s: {auto}")
        assert "FAILURE" not in {t["status"] for t in done} and not any(t["runIds"] for t in done), done
        time.sleep(2)  # a run the sensors requested is in the run storage by now
        runs = gql(url, "{ runsOrError { ... on Runs { results { runId status tags { key value } } } } }")
        launched = [x for x in runs["runsOrError"]["results"]
                    if not any(t["key"] == "augment/cli" for t in x["tags"])]  # every run not made by `augment run`
        assert launched == [], launched
        sensor = ticks("new_data_sensor_quiet")
        state = sensor["sensorState"]
        assert state["status"] == "RUNNING" and state["ticks"], sensor  # it ticked, and skipped
        assert {t["status"] for t in state["ticks"]} == {"SKIPPED"}, state["ticks"]
        assert any("no change" in (t["skipReason"] or "") for t in state["ticks"]), state["ticks"]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def test_no_test_folder_says_why_accuracies_are_dashes():
    import pandas as pd

    from augment_dagster.defs.assets.report import missing_eval_note

    m = pd.DataFrame({"method": ["real_only"], "n_test": [0], "n_ood": [5]})
    note = missing_eval_note(m, "/data/birds")
    assert "acc_id" in note and "/data/birds has no test/ images" in note and "acc_ood" not in note
    assert missing_eval_note(pd.DataFrame({"n_test": [3], "n_ood": [2]}), "builtin") == ""


def test_resolve_root_relative_absolute_and_moved_old_layout(tmp_path):
    from augment_dagster.store.manifests import resolve_root, stored_root

    data = tmp_path / "data"
    (data / "datasets" / "builtin-x").mkdir(parents=True)
    assert stored_root(data / "datasets" / "builtin-x", data) == "datasets/builtin-x"
    assert stored_root(tmp_path / "mine", data) == str((tmp_path / "mine").resolve())
    assert resolve_root("datasets/builtin-x", data) == data / "datasets" / "builtin-x"
    # what the previous code stored (absolute), for a data dir that was moved since
    assert resolve_root("/gone/old/data/datasets/builtin-x", data) == data / "datasets" / "builtin-x"
    assert resolve_root(str(tmp_path / "mine"), data) == tmp_path / "mine"
