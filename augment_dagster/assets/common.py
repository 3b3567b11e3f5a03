"""Shared wiring for the asset factories: per-experiment paths, store, keys, metadata helpers."""
from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from ..config import ExperimentConfig
from ..store import BlobStore, Memo
from ..store.manifests import manifest_version

IMPL_VERSION = "1"

# Automation (ARCHITECTURE "Dagster specifics"). The ingest head (raw_images → few_shot_split) follows its
# upstream eagerly. Every stage after the split fires only when an upstream *data version* changed (not on a
# mere rematerialization, and not merely because an upstream "will be requested" in the same tick), or when its
# own code version changed. So a new image that does not change a split triggers nothing beyond the split,
# and one that does triggers exactly the partitions whose split changed, tick by tick.
EAGER_AUTOMATION = dg.AutomationCondition.eager()
CONTENT_AUTOMATION = (
    dg.AutomationCondition.eager().replace(
        "any_deps_updated", dg.AutomationCondition.any_deps_match(dg.AutomationCondition.data_version_changed()))
    | dg.AutomationCondition.code_version_changed()
)


@dataclass
class Experiment:
    cfg: ExperimentConfig

    @property
    def name(self) -> str:
        return self.cfg.experiment

    @cached_property
    def data_dir(self) -> Path:
        return self.cfg.resolved_data_dir()

    @cached_property
    def blobs(self) -> BlobStore:
        return BlobStore(self.data_dir)

    def memo(self) -> Memo:
        return Memo(self.data_dir)  # fresh counters per asset execution

    @property
    def io_manager_key(self) -> str:
        return f"manifests_{self.name}"

    @property
    def mlflow_key(self) -> str:
        return "mlflow"

    def key(self, *path: str) -> dg.AssetKey:
        return dg.AssetKey([self.name, *path])

    @cached_property
    def partitions(self) -> dg.StaticPartitionsDefinition:
        return dg.StaticPartitionsDefinition(self.cfg.splits.keys())

    def code_version(self, *sections: tuple[str, ...] | str) -> str:
        parts = []
        for s in sections:
            path = (s,) if isinstance(s, str) else s
            parts.append(self.cfg.section_hash(*path))
        return f"{IMPL_VERSION}-" + "-".join(p[:8] for p in parts)

    @property
    def device(self) -> str:
        return self.cfg.models.device


def output(df: pd.DataFrame, metadata: dict[str, Any] | None = None, version_extra: Any = None) -> dg.Output:
    """A manifest output with a deterministic data version (content hash of the manifest)."""
    v = manifest_version(df)
    if version_extra is not None:
        from ..util import hash_obj

        v = hash_obj(v, version_extra)[:24]
    md = {"rows": dg.MetadataValue.int(len(df))}
    md.update(metadata or {})
    return dg.Output(df, data_version=dg.DataVersion(v), metadata=md)


def image_grid(images: list, labels: list[str] | None = None, per_row: int = 8, cell: int = 64):
    """A PIL grid of images (rows of ``per_row``), upscaled to ``cell`` px for visibility."""
    from PIL import Image

    if not images:
        return Image.new("RGB", (cell, cell), (255, 255, 255))
    rows = math.ceil(len(images) / per_row)
    grid = Image.new("RGB", (min(len(images), per_row) * cell, rows * cell), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), ((i % per_row) * cell, (i // per_row) * cell))
    return grid


def png_markdown(image, title: str = "") -> dg.MetadataValue:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    return dg.MetadataValue.md(f"{title}\n\n![{title}](data:image/png;base64,{b64})")


def sample_grid_metadata(exp: Experiment, images: list, title: str) -> dict[str, dg.MetadataValue]:
    """Store a sample grid as a blob and show it inline in the Dagster UI."""
    from ..util import png_bytes

    grid = image_grid(images)
    digest = exp.blobs.put(png_bytes(grid), "png")
    return {"sample_grid": png_markdown(grid, title), "sample_grid_path": dg.MetadataValue.path(str(exp.blobs.find(digest)))}


def md_table(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    if df.empty:
        return "_empty_"
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for r in df.itertuples(index=False):
        cells = [format(v, floatfmt) if isinstance(v, float) else str(v) for v in r]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- models (loaded lazily, process-cached)
def diffusion_bundle(exp: Experiment):
    from ..models.loading import load_diffusion

    d = exp.cfg.models.diffusion
    return load_diffusion(d.source, exp.data_dir, device=exp.device, dtype=d.dtype, revision=d.revision,
                          channels_last=d.channels_last, compile=d.compile)


def diffusion_fingerprint(exp: Experiment) -> str:
    """Model fingerprint without loading the pipeline (a no-op rerun never imports diffusers)."""
    from ..models.loading import diffusion_fingerprint as fp

    d = exp.cfg.models.diffusion
    return fp(d.source, exp.data_dir, revision=d.revision)


def generation_core(exp: Experiment, lora_blob: str | None = None):
    """The generation core on the experiment's model; with ``lora_blob``, that LoRA as a peft adapter on the same
    UNet, switched on only around this core's UNet calls (no copy of the UNet; models/adapters.py)."""
    from ..models.generation import GenerationCore

    g = exp.cfg.generation
    bundle = diffusion_bundle(exp)
    if lora_blob:
        from ..methods.concept_lora import bundle_with_lora
        from ..store.tensors import tensor_dict_from_bytes

        bundle = bundle_with_lora(bundle, tensor_dict_from_bytes(exp.blobs.get(lora_blob)), key=lora_blob)
    # every unit names its own scheduler (methods/protocol.py); this default serves requests that do not
    return GenerationCore(bundle, batch_size=g.batch_size, max_batch_size=g.max_batch_size,
                          scheduler=g.scheduler or exp.cfg.models.diffusion.scheduler or "ddim")


def release_models(*kinds: str) -> None:
    """Drop the process-cached models of these kinds ('sd', 'blip', 'clip') once the stage that alone needs
    them has ended (models/loading.py ``release``); the next stage that asks loads them again."""
    from ..models.loading import release

    release(*kinds)


def clip_bundle(exp: Experiment):
    from ..models.loading import load_clip

    c = exp.cfg.models.clip
    return load_clip(c.source, exp.data_dir, device=exp.device)


def captioner_bundle(exp: Experiment):
    from ..models.loading import load_captioner

    c = exp.cfg.models.captioner
    return load_captioner(c.source, exp.data_dir, device=exp.device)


def image_source(exp: Experiment, raw_or_split: pd.DataFrame):
    from ..data.images import ImageSource

    root = raw_or_split["dataset_root"].iloc[0] if "dataset_root" in raw_or_split and len(raw_or_split) else "."
    return ImageSource(root, raw_or_split, exp.blobs, exp.cfg.dataset.max_image_pixels)
