"""Memory bounded by the batch: decoded real images are kept in a bounded LRU, not for the whole dataset."""
import pandas as pd
import torch
from PIL import Image

from _fixtures_models import core, model_cache_root, tiny_bundle  # noqa: F401 - pytest fixtures

from augment_dagster.data.images import ImageSource
from augment_dagster.store import BlobStore


def test_image_source_keeps_only_the_last_images_decoded(tmp_path):
    rows = []
    for i in range(10):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append({"image_id": f"id{i}", "path": f"{i}.png"})
    src = ImageSource(tmp_path, pd.DataFrame(rows), BlobStore(tmp_path / "store"), cache_size=3)
    first = src.real("id0")
    assert src.real("id0") is first  # a hit: decoded once
    for i in range(1, 10):
        assert src.real(f"id{i}").getpixel((0, 0)) == (i * 20, 0, 0)
    assert list(src._cache) == ["id7", "id8", "id9"]  # bounded by cache_size, the least recently used dropped
    assert src.real("id0").getpixel((0, 0)) == (0, 0, 0) and len(src._cache) == 3  # decoded again on demand


def test_loaded_classifiers_are_kept_up_to_a_byte_bound(tmp_path):
    """Each metrics step loads its method's classifier; the process keeps them only up to CLASSIFIER_CACHE_BYTES
    (a count bound of 16 held 16 ResNet-50s, 1.6 GB, to the end of a real-size run)."""
    from augment_dagster.training import stage
    from augment_dagster.training.backbones import build_classifier, save_classifier

    blobs = BlobStore(tmp_path)
    digests = [blobs.put(save_classifier(build_classifier("tiny-cnn:300", 3), {"classes": list("abc")})) for _ in range(3)]
    size = stage._classifier_bytes(stage.load_classifier_blob(blobs, digests[0]))
    assert 90e6 < size < stage.CLASSIFIER_CACHE_BYTES < 3 * size  # three of them do not fit
    models = [stage.load_classifier_blob(blobs, d)[0] for d in digests]
    assert stage._CLASSIFIERS.currsize <= stage.CLASSIFIER_CACHE_BYTES
    assert stage.load_classifier_blob(blobs, digests[2])[0] is models[2]  # the latest is a hit
    assert stage.load_classifier_blob(blobs, digests[0])[0] is not models[0]  # the oldest was dropped, loaded again
    assert stage._CLASSIFIERS.currsize <= stage.CLASSIFIER_CACHE_BYTES


def test_cpu_vae_runs_one_image_at_a_time(tiny_bundle, core):
    """On the CPU the VAE encodes/decodes one image at a time (diffusers' slicing): a batch's decoder activations
    were ~1 GB of the run's RSS at 256 px; test_generation checks a batch still gives the single images."""
    assert tiny_bundle.device == "cpu" and tiny_bundle.pipe.vae.use_slicing
    lat = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    assert [im.tobytes() for im in core.decode(lat)] == [core.decode(lat[i:i + 1])[0].tobytes() for i in range(3)]


def test_exit_freezes_the_live_heap_once_registered():
    """`augment run` and every slot worker register ``gc.freeze`` to run at exit, once per process however often
    it is asked: what is alive then is frozen, so the final collections skip it (the OS frees it)."""
    import subprocess
    import sys

    script = (
        "import atexit, gc\n"
        "from augment_dagster.util import quick_exit_gc\n"
        "n = atexit._ncallbacks(); quick_exit_gc(); quick_exit_gc()\n"
        "print('registered', atexit._ncallbacks() - n, flush=True)\n"
        "atexit.register(lambda: print('frozen before', gc.get_freeze_count(), flush=True))\n"
        "keep = [[] for _ in range(1000)]\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[0] == "registered 1" and lines[1] == "frozen before 0", out.stdout
    # after the process's own handlers, gc.freeze has run: checked from a handler registered before it
    script2 = ("import atexit, gc\n"
               "atexit.register(lambda: print('frozen after', gc.get_freeze_count() > 1000, flush=True))\n"
               "from augment_dagster.util import quick_exit_gc\n"
               "quick_exit_gc()\n"
               "keep = [[] for _ in range(1000)]\n")
    out2 = subprocess.run([sys.executable, "-c", script2], capture_output=True, text=True, timeout=60)
    assert out2.returncode == 0 and out2.stdout.strip() == "frozen after True", (out2.stdout, out2.stderr)
