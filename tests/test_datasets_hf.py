"""Benchmark datasets as researchers have them: `dataset.source: hf:` (save_to_disk and parquet folders built with
`datasets`, WordNet-id ClassLabels + a words.txt names file), class words in prompts while manifests keep the id,
lineage naming the dataset row, exports that `datasets.load_dataset` reads back, class-split benchmarks, and bad
dataset configs as short errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

datasets = pytest.importorskip("datasets", reason="the `datasets` package is needed for hf: sources")

from augment_dagster.config import ConfigError, parse_config  # noqa: E402
from augment_dagster.data.builtin import generate_pool  # noqa: E402
from augment_dagster.data.classes import class_words, default_word, evaluation_labels  # noqa: E402
from augment_dagster.data.imagefolder import BadImageError, DatasetError  # noqa: E402
from augment_dagster.data.ingest import ingest  # noqa: E402
from augment_dagster.data.splits import few_shot_split  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# WordNet ids as mini-ImageNet names its classes, drawn with the built-in shapes
WNIDS = {"n01532829": "circle", "n01558993": "square", "n01704323": "star"}
WORDS = {"n01532829": "house finch", "n01558993": "robin", "n01704323": "triceratops"}
WORDS_TXT = "".join(f"{k}\t{v}, {v}s, Extra synonym\n" for k, v in WORDS.items()) + "n09999999\tunused class\n"


def build_hf(tmp: Path, n_train=4, n_test=2, size=32):
    """A DatasetDict (train/test) with an Image column and a ClassLabel of WordNet ids, saved both ways."""
    names = list(WNIDS)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    splits = {}
    for split, pool, n in (("train", "train", n_train), ("test", "test", n_test)):
        imgs, labels = [], []
        for k, wnid in enumerate(names):
            for im, _a in generate_pool(pool, WNIDS[wnid], n, seed=0, size=size):
                imgs.append(im)
                labels.append(k)
        splits[split] = datasets.Dataset.from_dict({"image": imgs, "label": labels}, features=feats)
    dd = datasets.DatasetDict(splits)
    disk = tmp / "ds_disk"
    dd.save_to_disk(str(disk))
    pq = tmp / "ds_parquet"
    pq.mkdir()
    for split, ds in dd.items():
        ds.to_parquet(str(pq / f"{split}-00000-of-00001.parquet"))
    words = tmp / "words.txt"
    words.write_text(WORDS_TXT)
    return disk, pq, words


@pytest.fixture(scope="module")
def hf_sets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    os.environ.setdefault("HF_DATASETS_CACHE", str(tmp / "hf_cache"))
    return build_hf(tmp)


def _ds(source, **kw):
    return parse_config({"experiment": "x", "dataset": {"source": source, **kw}}).dataset


@pytest.mark.parametrize("form", ["disk", "parquet"])
def test_hf_ingest_both_forms_words_and_ids(hf_sets, form):
    disk, pq, words = hf_sets
    src = disk if form == "disk" else pq
    res = ingest(_ds(f"hf:{src}", class_names=str(words)), None)
    df = res.images
    assert df.groupby("pool").size().to_dict() == {"train": 12, "test": 6}
    # manifests keep the id, label holds the words (first synonym of words.txt)
    assert dict(zip(df.class_id, df.label)) == WORDS
    assert set(df.hf_split) == {"train", "test"} and df.hf_dataset.iloc[0] == str(src.resolve())
    assert df.hf_fingerprint.str.len().min() > 0
    tr = df[df.pool == "train"]
    assert sorted(tr.hf_row) == list(range(12)) and all(p == f"train/{r}" for p, r in zip(tr.path, tr.hf_row))
    assert df.image_id.is_unique
    # without a names file the ClassLabel names are the words
    assert set(ingest(_ds(f"hf:{src}"), None).images.label) == set(WNIDS)


def test_hf_rows_are_read_one_at_a_time(hf_sets):
    from augment_dagster.data.images import ImageSource
    from augment_dagster.store import BlobStore
    from augment_dagster.util import sha256_bytes

    disk, _, _ = hf_sets
    df = ingest(_ds(f"hf:{disk}"), None).images
    df["dataset_root"] = f"hf:{disk.resolve()}"
    src = ImageSource(df["dataset_root"].iloc[0], df, BlobStore(disk.parent / "store"), cache_size=2)
    for r in df.head(5).itertuples():
        data, name = src.real_bytes(r.image_id)
        assert sha256_bytes(data) == r.image_id and f"row {r.hf_row}" in name
        assert src.real(r.image_id).size == (32, 32)
    assert len(src._cache) == 2  # bounded: never the whole dataset in memory


def test_class_words_mapping_cleanup_and_errors(tmp_path):
    assert default_word("001.Black_footed_Albatross") == "Black footed Albatross"
    assert default_word("golden_retriever") == "golden retriever" and default_word("circle") == "circle"
    assert default_word("2.5_mm") == "2.5 mm"  # an index is digits and a dot before a non-digit
    with pytest.raises(ConfigError, match="no words for class 'n02'"):
        class_words(["n01", "n02"], {"n01": "finch"}, clean=False)
    with pytest.raises(ConfigError, match="'a' and 'b' both have the words 'crane'"):
        class_words(["a", "b"], {"a": "crane", "b": "crane"}, clean=False)
    f = tmp_path / "w.txt"
    f.write_text("n01\thouse finch, linnet\n")
    with pytest.raises(ConfigError, match=rf"file {f} has no words for class 'n02'"):
        class_words(["n01", "n02"], str(f), clean=False)
    assert class_words(["n01"], str(f), clean=False) == {"n01": "house finch"}


def test_imagefolder_default_cleanup_and_builtin_unchanged(tmp_path):
    from PIL import Image

    for k, c in enumerate(["001.Black_footed_Albatross", "002.Laysan_Albatross"]):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (k * 100, i * 40, 7)).save(tmp_path / "d" / c / f"{i}.png")
    df = ingest(_ds(str(tmp_path / "d")), tmp_path / "d").images
    assert set(zip(df.class_id, df.label)) == {("001.Black_footed_Albatross", "Black footed Albatross"),
                                                ("002.Laysan_Albatross", "Laysan Albatross")}
    # the built-in shapes: words == ids, so prompts and memo keys stay exactly as they were
    from augment_dagster.data.builtin import write_builtin

    root = write_builtin(tmp_path / "b", classes=["circle", "star"], train_per_class=2, test_per_class=1, ood_per_class=0)
    b = ingest(_ds("builtin"), root).images
    assert (b.label == b.class_id).all() and set(b.label) == {"circle", "star"}


@pytest.mark.parametrize("hf, match", [
    ({"train_split": "trn"}, r"dataset.hf.train_split: split 'trn' is not in .* \(splits: train, test\)"),
    ({"test_split": "validation"}, r"dataset.hf.test_split: split 'validation'"),
    ({"image_column": "img"}, r"dataset.hf.image_column: column 'img' is not in split 'train' .*columns: image, label"),
    ({"label_column": "lbl"}, r"dataset.hf.label_column: column 'lbl'"),
])
def test_bad_hf_config_names_the_key(hf_sets, hf, match):
    disk, _, _ = hf_sets
    with pytest.raises(ConfigError, match=match):
        ingest(_ds(f"hf:{disk}", hf=hf), None)


def test_bad_label_column_and_unreadable_row(tmp_path):
    from PIL import Image

    ok = Image.new("RGB", (16, 16), (1, 2, 3))
    ds = datasets.Dataset.from_dict({"image": [ok, ok], "label": [0.5, 1.5]},
                                    features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("float32")}))
    ds.save_to_disk(str(tmp_path / "f"))
    with pytest.raises(ConfigError, match="dataset.hf.label_column: column 'label' .*not a ClassLabel, integer or string"):
        ingest(_ds(f"hf:{tmp_path / 'f'}"), None)
    # a row whose bytes are not an image: named by split and row (a single Dataset is the train split)
    import io

    b = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(b, format="PNG")
    rows = {"image": [{"bytes": b.getvalue(), "path": None}, {"bytes": b"garbage", "path": None}], "label": ["cat", "dog"]}
    bad = datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image(decode=False),
                                                                      "label": datasets.Value("string")}))
    bad.save_to_disk(str(tmp_path / "g"))
    with pytest.raises(BadImageError, match=r"split 'train' row 1: not a readable image"):
        ingest(_ds(f"hf:{tmp_path / 'g'}"), None)
    res = ingest(_ds(f"hf:{tmp_path / 'g'}", on_bad_file="skip"), None)
    assert list(res.images.hf_row) == [0] and res.skipped[0]["path"] == "train/1"
    assert any("has no split 'test'" in n for n in res.notes)  # the default test split is optional, and said so
    with pytest.raises(DatasetError, match="cannot load it|no such folder"):
        ingest(_ds(f"hf:{tmp_path / 'missing'}"), None)


def test_class_split_draws_from_evaluated_classes_only(hf_sets, tmp_path):
    disk, _, words = hf_sets
    (tmp_path / "test_classes.txt").write_text("n01704323  # triceratops\nn01558993\n")
    ds = _ds(f"hf:{disk}", class_names=str(words), hf={"test_split": None},
             class_split={"train": ["n01532829"], "test": str(tmp_path / "test_classes.txt")})
    assert ds.evaluation_classes() == ["n01704323", "n01558993"]
    raw = ingest(ds, None).images
    assert set(raw.class_split) == {"train", "test"}
    sp = few_shot_split(raw, 1, 0, 1)
    assert set(sp.class_id) == {"n01704323", "n01558993"}  # the train class never enters the split
    assert evaluation_labels(sp) == ["robin", "triceratops"]
    # no test pool: each class's images after its K + V are its test images
    assert sp[sp.role == "test"].groupby("class_id").size().to_dict() == {"n01558993": 2, "n01704323": 2}
    with pytest.raises(ConfigError, match="'n01532829' is in both train and test"):
        ingest(_ds(f"hf:{disk}", class_split={"train": ["n01532829"], "test": ["n01532829"]}), None)
    with pytest.raises(ConfigError, match=r"class_split.test lists class\(es\) not in the dataset: 'n09999999'"):
        ingest(_ds(f"hf:{disk}", class_split={"train": ["n01532829", "n01558993"], "test": ["n01704323", "n09999999"]}), None)
    # a train class that is not there is fine (only the test classes were downloaded)
    only = ingest(_ds(f"hf:{disk}", class_split={"train": ["n01532829", "n01558993", "n00000001"], "test": ["n01704323"]}), None)
    assert set(only.images[only.images.class_evaluated].class_id) == {"n01704323"}
    with pytest.raises(ConfigError, match="'n01558993'.* are in no list"):
        ingest(_ds(f"hf:{disk}", class_split={"train": ["n01532829"], "test": ["n01704323"]}), None)


def _env(tmp):
    env = {**os.environ, "AUGMENT_DATA_DIR": str(tmp / "store"), "DAGSTER_HOME": str(tmp / "dh"),
           "HF_DATASETS_CACHE": str(tmp / "hf_cache"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("AUGMENT_CONFIG_DIR", None)
    (tmp / "dh").mkdir(exist_ok=True)
    (tmp / "dh" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return env


def _augment_many(jobs):
    """`augment <args>` in each (folder, args) at once; their CompletedProcess results in order."""
    procs = [subprocess.Popen([sys.executable, "-m", "augment_dagster.cli", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env(tmp), cwd=tmp) for tmp, args in jobs]
    out = []
    for p in procs:
        so, se = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    return out


def _augment(tmp, *args):
    return _augment_many([(tmp, args)])[0]


def test_bad_hf_split_is_a_short_cli_error(hf_sets, tmp_path):
    disk, _, _ = hf_sets
    cfg = {"experiment": "hfbad", "dataset": {"source": f"hf:{disk}", "hf": {"train_split": "trn"}},
           "splits": {"shots": [1], "seeds": [0], "val_per_class": 1}, "methods": {"standard": {}}, "mlflow": {"enabled": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = _augment(tmp_path, "run", "--config", str(tmp_path / "c.yaml"))
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) <= 6 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert any("dataset.hf.train_split" in x and "'trn'" in x for x in lines), r.stderr


@pytest.mark.slow
def test_augment_run_on_hf_dataset_lineage_and_export(hf_sets, tmp_path, monkeypatch, capsys):
    """Both forms run end to end (real_guidance on tiny-random models); prompts carry the words, never the ids;
    `augment lineage` names the dataset row of the guide image; the export loads back with datasets."""
    disk, pq, words = hf_sets
    procs = {}
    for form, src in (("disk", disk), ("parquet", pq)):
        d = tmp_path / form
        d.mkdir()
        cfg = {"experiment": f"hf_{form}", "dataset": {"source": f"hf:{src}", "class_names": str(words), "metaclass": "animal"},
               "splits": {"shots": [1], "seeds": [0], "val_per_class": 1},
               "models": {"diffusion": {"source": "tiny-random"}}, "generation": {"images_per_real": 1, "steps": 2},
               "training": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 4},
               "methods": {"real_guidance": {}}, "mlflow": {"enabled": False}, "checks": {"enabled": False}}
        (d / "c.yaml").write_text(yaml.safe_dump(cfg))
        procs[form] = d
    # the two forms run at once (each is one small process)
    results = dict(zip(procs, _augment_many([(d, ("run", "--config", str(d / "c.yaml"))) for d in procs.values()])))
    for form, r in results.items():
        assert r.returncode == 0, (form, r.stderr[-3000:])
    import pandas as pd

    for form, d in procs.items():
        syn = pd.read_parquet(next((d / "store" / "manifests" / f"hf_{form}" / "synthetic").rglob("*.parquet")))
        assert len(syn) == 3
        for p, lab in zip(syn.prompt, syn.label):
            assert lab in WORDS.values() and lab in p and not any(w in p for w in WNIDS), p
    d = procs["disk"]
    sid = str(pd.read_parquet(next((d / "store" / "manifests" / "hf_disk" / "synthetic").rglob("*.parquet"))).synthetic_id.iloc[0])
    # lineage and export in this process (same environment as the run)
    from augment_dagster.cli import main

    for k, v in _env(d).items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    assert main(["lineage", sid[:16], "--config", str(d / "c.yaml")]) == 0
    text = capsys.readouterr().out
    guide = [x for x in text.splitlines() if "guide image" in x]
    assert len(guide) == 1 and f"hf:{disk.resolve()} split 'train' row " in guide[0] and "fingerprint" in guide[0], text
    assert "[id n0" in guide[0]
    assert main(["lineage", sid[:16], "--json", "--config", str(d / "c.yaml")]) == 0
    g = json.loads(capsys.readouterr().out)["guides"][0]
    raw = datasets.load_from_disk(str(disk))["train"]
    assert raw.features["label"].names[raw[g["hf_row"]]["label"]] == g["class_id"]
    out = d / "export"
    assert main(["export", "--config", str(d / "c.yaml"), "--method", "real_guidance", "--split", "1shot-s0",
                 "--out", str(out), "--with-real"]) == 0
    back = datasets.load_dataset(str(out), split="train")
    assert sorted(back.features["label"].names) == sorted(WORDS.values()) and len(back) == 6
