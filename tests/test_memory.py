"""Memory bounded by the batch: decoded real images are kept in a bounded LRU, not for the whole dataset."""
import pandas as pd
from PIL import Image

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
