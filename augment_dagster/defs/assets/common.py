"""Shared wiring for the asset factories: per-experiment paths, store, keys, metadata helpers."""
from __future__ import annotations

import base64
import functools
import inspect
import io
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from ...config import ExperimentConfig, parse_split_key
from ...progress import register_scope_provider as _register_progress_scope
from ...seeds import split_seed
from ...store.manifests import manifest_version
from ..resources import StoreResource, resource_key

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
    from ...slots import current

    part, slot = (ctx.partition_key if ctx.has_partition_key else None), current()
    if slot is not None:  # progress lines name the slot: "[4shot-s0, slot 1 (cpu)]"
        part = f"{part}, {slot.label()}" if part else slot.label()
    return ctx.asset_key.to_user_string(), part


_register_progress_scope(_progress_scope)


OWNERS = ["team:augment-dagster"]


@dataclass
class Experiment:
    """One experiment's naming for its assets: keys, group, partitions, code versions and resource keys. It holds no
    services: assets receive the store, models, LLM and MLflow resources as parameters (``stage_asset``)."""

    cfg: ExperimentConfig

    @property
    def name(self) -> str:
        return self.cfg.experiment

    @cached_property
    def data_dir(self) -> Path:
        return self.cfg.resolved_data_dir()

    @property
    def io_manager_key(self) -> str:
        return resource_key("manifests", self.name)

    def resource_key(self, kind: str) -> str:
        return resource_key(kind, self.name)

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

    def seed(self, partition_key: str) -> int:
        """The seed of this split partition's stages (``seeds.split_seed``)."""
        return split_seed(self.cfg.seed, parse_split_key(partition_key)[1])

    @property
    def device(self) -> str:
        """The device of this process's slot (slots.py; a lease is taken on first use)."""
        from ...slots import device_for

        return device_for(self.cfg)


def stage_asset(exp: Experiment, *path: str, ins: dict[str, str | tuple[str, ...]] | None = None,
                partitioned: bool = True, automation: dg.AutomationCondition = CONTENT_AUTOMATION,
                resources: tuple[str, ...] = (), **asset_kwargs):
    """``dg.asset`` for a stage of ``exp`` with what every stage shares: key ``<experiment>/<path>``, the experiment's
    group, owners, manifest IO manager, split partitions (unless ``partitioned=False``), content automation and the
    stage's checks evaluated in its step (``checks.asset_with_checks``). ``ins``: input name -> upstream asset path
    under the experiment. ``resources``: kinds (``store``, ``models``, ``llm``, ``mlflow``) the body takes as keyword
    parameters of those names, bound to this experiment's ``<kind>_<experiment>`` resources."""
    from ..checks import asset_with_checks

    kwargs = dict(group_name=exp.name, owners=OWNERS, io_manager_key=exp.io_manager_key,
                  partitions_def=exp.partitions if partitioned else None, automation_condition=automation,
                  ins={name: dg.AssetIn(key=exp.key(*((up,) if isinstance(up, str) else up))) for name, up in (ins or {}).items()},
                  required_resource_keys={exp.resource_key(r) for r in resources} | set(asset_kwargs.pop("required_resource_keys", ())),
                  **asset_kwargs)

    def decorate(body):
        return asset_with_checks(exp, key=exp.key(*path), **kwargs)(_release_heap_after(_with_resources(body, exp, resources)))

    return decorate


def _release_heap_after(body):
    """``body``, then the C heap's free pages back to the OS (``util.release_free_heap``), so that a step's freed
    tensors do not raise the next step's peak RSS in a worker that runs many steps."""
    from ...util import release_free_heap

    @functools.wraps(body)
    def step(*args, **kwargs):
        try:
            return body(*args, **kwargs)
        finally:
            release_free_heap()

    return step


def _with_resources(body, exp: Experiment, kinds: tuple[str, ...]):
    """``body`` with its resource parameters (``kinds``) filled from ``context.resources`` and hidden from Dagster's
    view of its signature (which then lists the context and the inputs only)."""
    if not kinds:
        return body
    sig = inspect.signature(body)

    @functools.wraps(body)
    def step(context, *args, **kwargs):
        return body(context, *args, **kwargs, **{k: getattr(context.resources, exp.resource_key(k)) for k in kinds})

    step.__signature__ = sig.replace(parameters=[p for n, p in sig.parameters.items() if n not in kinds])
    return step


def output(df: pd.DataFrame, metadata: dict[str, Any] | None = None, version_extra: Any = None) -> dg.Output:
    """A manifest output with a deterministic data version (content hash of the manifest)."""
    v = manifest_version(df)
    if version_extra is not None:
        from ...util import hash_obj

        v = hash_obj(v, version_extra)[:24]
    md = {"rows": dg.MetadataValue.int(len(df))}
    md.update(slot_metadata())
    md.update(metadata or {})
    return dg.Output(df, data_version=dg.DataVersion(v), metadata=md)


def slot_metadata() -> dict[str, dg.MetadataValue]:
    """The device slot the step ran on (slots.py), if it holds one: ``slot`` and ``slot_device``."""
    from ...slots import computed_on

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


def sample_grid_metadata(store: StoreResource, images: list, title: str) -> dict[str, dg.MetadataValue]:
    """Store a sample grid as a blob and show it inline in the Dagster UI."""
    from ...util import png_bytes

    grid = image_grid(images)
    blobs = store.blobs
    digest = blobs.put(png_bytes(grid), "png")
    return {"sample_grid": png_markdown(grid, title), "sample_grid_path": dg.MetadataValue.path(str(blobs.find(digest)))}


def md_table(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    if df.empty:
        return "_empty_"
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for r in df.itertuples(index=False):
        cells = [format(v, floatfmt) if isinstance(v, float) else str(v) for v in r]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- lineage and MLflow links in the UI
LINEAGE_COLUMNS = {
    "synthetic_id": "content id of the synthetic image (prefix; `augment lineage <id>` prints the full chain)",
    "label": "class", "guide": "real guide image id(s) (prefix)", "prompt": "text prompt", "seed": "generation seed",
    "strength": "img2img strength (noise level of the guide)", "concept": "learned concept / embedding id (prefix)",
    "blob_path": "the image file in the blob store",
}


def lineage_metadata(exp: Experiment, store: StoreResource, df: pd.DataFrame, planned_units: int | None = None,
                     rows: int = 10) -> dict:
    """Metadata of a synthetic set for the UI: its first rows as a table (guide, prompt, seed, strength, concept,
    blob path), the manifest's column schema, the command that prints an image's full lineage, and the number
    of planned units (what the ``synthetic_integrity`` check compares the rows with)."""
    def short(v, n=12):
        if v is None or (isinstance(v, float) and v != v):
            return ""
        if isinstance(v, (list, tuple)) or hasattr(v, "tolist"):
            return ",".join(str(x)[:n] for x in list(v))
        return str(v)[:n]

    recs, blobs = [], store.blobs
    for r in df.head(rows).to_dict("records"):
        try:
            path = str(blobs.find(r["blob"]))
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
