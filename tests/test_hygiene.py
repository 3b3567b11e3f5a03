"""Data hygiene at ingestion: EXIF orientation applied and recorded; exact duplicates across classes and between
train and test/ named by both files (error, warn or drop); odd and non-UTF-8 file names read or refused by name;
images below dataset.min_image_size and animated images reported; every bad file listed (up to 20, then a count)."""
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from augment_dagster.config import parse_config
from augment_dagster.data.imagefolder import BadImageError, DatasetError, decode_image, scan_imagefolder
from augment_dagster.data.ingest import ingest

ROOT = Path(__file__).resolve().parents[1]


def _img(colour, size=(16, 16)):
    return Image.new("RGB", size, colour)


def tree(root: Path, spec: dict[str, int], offset=0) -> Path:
    """root/<class>/<i>.png with distinct pixels per (class, i); 'test/<class>' keys make the test pool."""
    for k, (c, n) in enumerate(spec.items()):
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _img((k * 60 + offset, i * 20 + 1, 99)).save(d / f"{i}.png")
    return root


def _ds(root, **kw):
    return parse_config({"experiment": "h", "dataset": {"source": str(root), **kw}}).dataset


def test_exif_orientation_applied_and_recorded(tmp_path):
    root = tree(tmp_path / "d", {"cat": 2, "dog": 2})
    im = Image.new("RGB", (16, 32), (200, 10, 10))
    im.paste((10, 10, 200), (0, 0, 16, 8))  # a blue band on top of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    b = io.BytesIO()
    im.save(b, format="JPEG", exif=exif.tobytes(), quality=95)
    (root / "cat" / "phone.jpg").write_bytes(b.getvalue())
    out = decode_image(b.getvalue(), "phone.jpg")
    assert out.size == (32, 16)  # turned upright
    assert out.getpixel((28, 8))[2] > 150  # the top band is now on the right
    res = ingest(_ds(root), root)
    row = res.images[res.images.path == "cat/phone.jpg"].iloc[0]
    assert bool(row.exif_transposed) and (row.width, row.height) == (32, 16)
    # the id covers the orientation: no memo entry made from the unrotated pixels of these bytes is reused
    from augment_dagster.util import sha256_bytes

    assert row.image_id != sha256_bytes(b.getvalue()) and len(row.image_id) == 64
    assert not res.images[res.images.path != "cat/phone.jpg"].exif_transposed.any()
    assert any("EXIF orientation applied to 1 image" in n for n in res.notes)


def test_duplicate_across_classes_names_both_files(tmp_path):
    root = tree(tmp_path / "d", {"cat": 3, "dog": 3})
    (root / "dog" / "copy.png").write_bytes((root / "cat" / "1.png").read_bytes())
    with pytest.raises(DatasetError, match=r"1 duplicate image\(s\).*cat/1.png = dog/copy.png \(classes 'cat' and 'dog'\)"
                                           r".*on_duplicate"):
        ingest(_ds(root), root)
    warn = ingest(_ds(root, on_duplicate="warn"), root)
    assert len(warn.images) == 7 and warn.duplicates[0]["files"] == ["cat/1.png", "dog/copy.png"]
    drop = ingest(_ds(root, on_duplicate="drop"), root)
    assert len(drop.images) == 5 and not {"cat/1.png", "dog/copy.png"} & set(drop.images.path)


def test_train_image_in_test_names_both_files(tmp_path):
    root = tree(tmp_path / "d", {"cat": 3, "dog": 3})
    tree(root / "test", {"cat": 2, "dog": 2}, offset=30)
    (root / "test" / "dog" / "leak.png").write_bytes((root / "dog" / "2.png").read_bytes())
    with pytest.raises(DatasetError, match=r"dog/2.png = test/dog/leak.png \(train image also in test\)"):
        ingest(_ds(root), root)
    drop = ingest(_ds(root, on_duplicate="drop"), root).images
    # the train copy goes, the test set stays as it is
    assert "dog/2.png" not in set(drop.path) and "test/dog/leak.png" in set(drop.path)


def test_odd_file_names_are_read(tmp_path):
    root = tree(tmp_path / "d", {"cat": 1, "dog": 2})
    odd = ["with space.png", "quote'\"s.png", "new\nline.png", "émoji 🐱.png", "cafe\u0301-nfd.png", "a" * 200 + ".png"]
    for i, name in enumerate(odd):
        _img((5, 5 + i * 9, 5)).save(root / "cat" / name)
    df = scan_imagefolder(root).images
    assert {f"cat/{n}" for n in odd} <= set(df.path)
    df.to_parquet(tmp_path / "m.parquet")  # every name can be stored in a manifest


def test_non_utf8_name_refused_by_name_or_skipped(tmp_path):
    root = tree(tmp_path / "d", {"cat": 2, "dog": 2})
    bad = os.path.join(os.fsencode(root / "cat"), b"caf\xe9.png")
    try:
        with open(bad, "wb") as f:
            f.write(_png())
    except OSError as e:  # a file system that only stores UTF-8 names
        pytest.skip(f"this file system refuses non-UTF-8 names: {e}")
    with pytest.raises(BadImageError, match=r"caf\\xe9.png: file name is not valid UTF-8; rename"):
        scan_imagefolder(root)
    res = scan_imagefolder(root, on_bad_file="skip")
    assert len(res.images) == 4 and res.skipped[0]["path"] == "cat/caf\\xe9.png"
    # a class folder with such a name is refused by name too
    os.mkdir(os.path.join(os.fsencode(root), b"d\xf6g"))
    with pytest.raises(DatasetError, match=r"class folder .*d\\xf6g: its name is not valid UTF-8"):
        scan_imagefolder(root)


def _png():
    b = io.BytesIO()
    _img((1, 2, 3)).save(b, format="PNG")
    return b.getvalue()


def test_tiny_and_animated_images_reported(tmp_path):
    root = tree(tmp_path / "d", {"cat": 2, "dog": 2})
    _img((3, 3, 3), (1, 1)).save(root / "cat" / "dot.png")
    frames = [_img((i * 80, 0, 0)) for i in range(3)]
    frames[0].save(root / "dog" / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    with pytest.raises(BadImageError) as e:
        scan_imagefolder(root)
    msg = str(e.value)
    assert msg.startswith("2 bad image files in ")
    assert "dot.png: image is 1x1 px, below dataset.min_image_size=8" in msg
    assert "anim.gif: image has 3 frames (animated)" in msg
    res = ingest(_ds(root, on_bad_file="skip"), root)
    assert sorted(s["path"] for s in res.skipped) == ["cat/dot.png", "dog/anim.gif"] and len(res.images) == 4
    # the limit is a config key: at min_image_size 1 the 1x1 image is accepted
    ok = scan_imagefolder(root, on_bad_file="skip", min_size=1)
    assert "cat/dot.png" in set(ok.images.path)


def test_every_bad_file_listed_up_to_20_then_a_count(tmp_path):
    root = tree(tmp_path / "d", {"cat": 2, "dog": 2})
    for i in range(23):
        (root / "cat" / f"bad{i:02d}.png").write_bytes(b"")
    with pytest.raises(BadImageError) as e:
        scan_imagefolder(root)
    msg = str(e.value)
    assert msg.startswith("23 bad image files in ") and msg.endswith("; and 3 more")
    assert sum(f"bad{i:02d}.png: zero-byte file" in msg for i in range(23)) == 20


def test_non_utf8_name_through_the_cli_is_short(tmp_path):
    root = tree(tmp_path / "d", {"cat": 3, "dog": 3})
    try:
        with open(os.path.join(os.fsencode(root / "cat"), b"\xff\xfe.png"), "wb") as f:
            f.write(_png())
    except OSError as e:
        pytest.skip(f"this file system refuses non-UTF-8 names: {e}")
    cfg = {"experiment": "hyg", "dataset": {"source": str(root)}, "splits": {"shots": [1], "seeds": [0], "val_per_class": 1},
           "methods": {"standard": {}}, "mlflow": {"enabled": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "dh").mkdir()
    env = {**os.environ, "AUGMENT_DATA_DIR": str(tmp_path / "store"), "DAGSTER_HOME": str(tmp_path / "dh"),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("AUGMENT_CONFIG_DIR", None)
    r = subprocess.run([sys.executable, "-m", "augment_dagster.cli", "run", "--config", str(tmp_path / "c.yaml")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) <= 6 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert any("\\xff\\xfe.png" in x and "not valid UTF-8" in x for x in lines), r.stderr
