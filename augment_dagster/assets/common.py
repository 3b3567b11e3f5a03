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
from ..progress import register_scope_provider as _register_progress_scope
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



def _progress_scope() -> tuple[str | None, str | None]:
    """(asset key, partition) of the running step, for the progress lines of the long loops."""
    try:
        ctx = dg.AssetExecutionContext.get()
    except dg.DagsterInvariantViolationError:
        return None, None
    from ..slots import current

    part, slot = (ctx.partition_key if ctx.has_partition_key else None), current()
    if slot is not None:  # progress lines name the slot: "[4shot-s0, slot 1 (cpu)]"
        part = f"{part}, {slot.label()}" if part else slot.label()
    return ctx.asset_key.to_user_string(), part


_register_progress_scope(_progress_scope)


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
        """The device of this process's slot (slots.py; a lease is taken on first use)."""
        from ..slots import device_for

        return device_for(self.cfg)


def output(df: pd.DataFrame, metadata: dict[str, Any] | None = None, version_extra: Any = None) -> dg.Output:
    """A manifest output with a deterministic data version (content hash of the manifest)."""
    v = manifest_version(df)
    if version_extra is not None:
        from ..util import hash_obj

        v = hash_obj(v, version_extra)[:24]
    md = {"rows": dg.MetadataValue.int(len(df))}
    md.update(slot_metadata())
    md.update(metadata or {})
    return dg.Output(df, data_version=dg.DataVersion(v), metadata=md)


def slot_metadata() -> dict[str, dg.MetadataValue]:
    """The device slot the step ran on (slots.py), if it holds one: ``slot`` and ``slot_device``."""
    from ..slots import computed_on

    on = computed_on()
    return {} if on is None else {"slot": dg.MetadataValue.int(on["slot"]), "slot_device": dg.MetadataValue.text(on["device"])}


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
        from ..stages.concept_lora import bundle_with_lora
        from ..store.tensors import tensor_dict_from_bytes

        bundle = bundle_with_lora(bundle, tensor_dict_from_bytes(exp.blobs.get(lora_blob)), key=lora_blob)
    # every unit names its own scheduler (its entry's resolved protocol, methods/registry.py resolve_protocol)
    return GenerationCore(bundle, batch_size=g.batch_size, max_batch_size=g.max_batch_size)


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

    from ..store.manifests import resolve_root

    root = raw_or_split["dataset_root"].iloc[0] if "dataset_root" in raw_or_split and len(raw_or_split) else "."
    return ImageSource(resolve_root(root, exp.data_dir) if not str(root).startswith("hf:") else root, raw_or_split,
                       exp.blobs, exp.cfg.dataset.max_image_pixels, hf_image_column=exp.cfg.dataset.hf.image_column)


# ---------------------------------------------------------------- lineage and MLflow links in the UI
LINEAGE_COLUMNS = {
    "synthetic_id": "content id of the synthetic image (prefix; `augment lineage <id>` prints the full chain)",
    "label": "class", "guide": "real guide image id(s) (prefix)", "prompt": "text prompt", "seed": "generation seed",
    "strength": "img2img strength (noise level of the guide)", "concept": "learned concept / embedding id (prefix)",
    "blob_path": "the image file in the blob store",
}


def lineage_metadata(exp: Experiment, df: pd.DataFrame, planned_units: int | None = None, rows: int = 10) -> dict:
    """Metadata of a synthetic set for the UI: its first rows as a table (guide, prompt, seed, strength, concept,
    blob path), the manifest's column schema, the command that prints an image's full lineage, and the number
    of planned units (what the ``synthetic_integrity`` check compares the rows with)."""
    def short(v, n=12):
        if v is None or (isinstance(v, float) and v != v):
            return ""
        if isinstance(v, (list, tuple)) or hasattr(v, "tolist"):
            return ",".join(str(x)[:n] for x in list(v))
        return str(v)[:n]

    recs = []
    for r in df.head(rows).to_dict("records"):
        try:
            path = str(exp.blobs.find(r["blob"]))
        except (FileNotFoundError, KeyError, TypeError):
            path = ""
        concept = r.get("embedding_id") or r.get("concepts")
        strength = r.get("strength")
        recs.append(dg.TableRecord({
            "synthetic_id": short(r.get("synthetic_id")), "label": str(r.get("label", "")), "guide": short(r.get("guide_ids")),
            "prompt": str(r.get("prompt") or "")[:200], "seed": int(r["seed"]) if r.get("seed") is not None else -1,
            "strength": float(strength) if isinstance(strength, (int, float)) and strength == strength else -1.0,
            "concept": short(concept, 16), "blob_path": path}))
    types = {"seed": "int", "strength": "float"}
    schema = dg.TableSchema(columns=[dg.TableColumn(c, types.get(c, "string"), description=d) for c, d in LINEAGE_COLUMNS.items()])
    manifest_schema = dg.TableSchema(columns=[
        dg.TableColumn(str(c), "int" if str(t).startswith("int") else "float" if str(t).startswith("float") else "string")
        for c, t in df.dtypes.items()])
    first = str(df["synthetic_id"].iloc[0])[:16] if len(df) else "<synthetic id>"
    cfg = f" --config {exp.cfg.source_path}" if exp.cfg.source_path else ""
    md = {"lineage": dg.MetadataValue.table(recs, schema=schema),
          "dagster/column_schema": manifest_schema,
          "lineage_command": dg.MetadataValue.text(f"augment lineage {first}{cfg}")}
    if planned_units is not None:
        md["planned_units"] = dg.MetadataValue.int(int(planned_units))
    return md


def mlflow_links(mlflow, metrics: pd.DataFrame) -> dg.MetadataValue:
    """A markdown table linking each method × split row to its MLflow run (UI URL for an http tracking server,
    else the run id and the `mlflow ui` command for the local store)."""
    if metrics is None or not len(metrics) or "mlflow_run_id" not in metrics:
        return dg.MetadataValue.md("_no MLflow runs_")
    uri = mlflow.resolved_uri() if mlflow is not None else ""
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    eids: dict[str, str] = {}
    try:
        client = mlflow.client() if mlflow is not None and mlflow.enabled else None
    except Exception:  # noqa: BLE001 - links are best effort
        client = None
    lines = ["| method | split | acc_id | MLflow run |", "|---|---|---|---|"]
    for r in metrics.sort_values(["method", "split"]).itertuples():
        rid = str(getattr(r, "mlflow_run_id", "") or "")
        if not rid:
            cell = f"(not logged: {str(getattr(r, 'mlflow_error', '') or '')[:60]})"
        else:
            if client is not None and rid not in eids:
                try:
                    eids[rid] = client.get_run(rid).info.experiment_id
                except Exception:  # noqa: BLE001
                    eids[rid] = ""
            eid = eids.get(rid, "")
            cell = f"[{rid[:12]}]({base}/#/experiments/{eid}/runs/{rid})" if eid else f"`{rid}`"
        lines.append(f"| {r.method} | {r.split} | {float(r.acc_id):.3f} | {cell} |")
    if not uri.startswith("http"):
        lines.append(f"\nlocal store: `mlflow ui --backend-store-uri {uri}` serves these links on {base}")
    return dg.MetadataValue.md("\n".join(lines))
