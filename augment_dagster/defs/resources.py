"""Dagster resources of one experiment (``experiment_resources``): the parquet manifest IO manager, the store
(blobs, memo, manifests), the models (the process model cache), the LLM client and the MLflow tracker
(``tracking.py``). Their keys end in ``_<experiment>``; assets name them as parameters (``assets/common.py``
``stage_asset(resources=...)``).

Kept free of torch imports: models, diffusers and MLflow are imported when first used.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from ..store import BlobStore, Memo
from ..store.manifests import manifest_path, read_manifest, write_manifest


class ManifestIOManager(dg.ConfigurableIOManager):
    """Stores every asset's manifest (a DataFrame) as ``<root>/manifests/<asset key>/<partition>.parquet``.

    Loading a partitioned upstream into an unpartitioned asset (the report) concatenates the
    partitions that exist and adds a ``partition`` column."""

    root: str

    def _path(self, key: dg.AssetKey, partition: str | None) -> Path:
        return manifest_path(self.root, key.path, partition)

    def handle_output(self, context: dg.OutputContext, obj: pd.DataFrame) -> None:
        if obj is None:
            return
        if not isinstance(obj, pd.DataFrame):
            raise TypeError(f"{context.asset_key.to_user_string()}: assets must return a manifest DataFrame, got {type(obj).__name__}")
        part = context.partition_key if context.has_partition_key else None
        write_manifest(self._path(context.asset_key, part), obj)

    def load_input(self, context: dg.InputContext) -> pd.DataFrame:
        key = context.asset_key
        if context.has_asset_partitions:
            keys = list(context.asset_partition_keys)
            if context.has_partition_key:  # partitioned downstream: same partition of the upstream
                return read_manifest(self._path(key, keys[0]))
            frames = []  # unpartitioned downstream (the report): every partition that exists
            for pk in keys:
                p = self._path(key, pk)
                if p.exists():
                    df = read_manifest(p)
                    df["partition"] = pk
                    frames.append(df)
            return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        return read_manifest(self._path(key, None))




class StoreResource(dg.ConfigurableResource):
    """The content-addressed store of one experiment under ``root`` (the config's data dir: ``$AUGMENT_DATA_DIR`` >
    config ``data_dir`` > ./augment_data, resolved when the definitions are built): blobs, the unit memo, the
    manifests and the image source of a split."""

    root: str

    @property
    def path(self) -> Path:
        return Path(self.root)

    @property
    def blobs(self) -> BlobStore:
        return BlobStore(self.root)

    def memo(self) -> Memo:
        return Memo(self.root)  # fresh hit/miss counters per asset execution

    def manifest_path(self, key_path, partition: str | None) -> Path:
        return manifest_path(self.root, list(key_path), partition)

    def read_manifest(self, key_path, partition: str | None) -> pd.DataFrame:
        return read_manifest(self.manifest_path(key_path, partition))

    def write_manifest(self, key_path, partition: str | None, df: pd.DataFrame) -> None:
        write_manifest(self.manifest_path(key_path, partition), df)

    def images(self, raw_or_split: pd.DataFrame, dataset):
        """The image source of a raw/split manifest (``dataset``: the config's ``dataset`` block)."""
        from ..data.images import ImageSource
        from ..store.manifests import resolve_root

        root = raw_or_split["dataset_root"].iloc[0] if "dataset_root" in raw_or_split and len(raw_or_split) else "."
        return ImageSource(resolve_root(root, self.path) if not str(root).startswith("hf:") else root, raw_or_split,
                           self.blobs, dataset.max_image_pixels, hf_image_column=dataset.hf.image_column)


class Models:
    """The models of one experiment, from the process model cache (``models/loading.py``): loaded on first use on the
    device of this process's slot, fingerprinted without loading (a no-op rerun never imports diffusers).

    The ``models_<experiment>`` resource yields one and closes it at teardown; ``close`` releases the models whose
    scope is one stage (``SCOPED``: the captioner) if still loaded. The diffusion pipeline and CLIP stay cached for
    the next run of the process (the CLI materializes one Dagster run per partition in one process)."""

    SCOPED = ("blip",)

    def __init__(self, cfg, store: StoreResource | None = None):
        self.cfg = cfg
        self.store = store or StoreResource(root=str(cfg.resolved_data_dir()))

    @property
    def data_dir(self) -> Path:
        return self.store.path

    @property
    def device(self) -> str:
        """The device of this process's slot (slots.py; a lease is taken on first use)."""
        from ..slots import device_for

        return device_for(self.cfg)

    def diffusion(self):
        from ..models.loading import load_diffusion

        d = self.cfg.models.diffusion
        return load_diffusion(d.source, self.data_dir, device=self.device, dtype=d.dtype, revision=d.revision,
                              channels_last=d.channels_last, compile=d.compile)

    def diffusion_fingerprint(self) -> str:
        from ..models.loading import diffusion_fingerprint

        d = self.cfg.models.diffusion
        return diffusion_fingerprint(d.source, self.data_dir, revision=d.revision)

    def generation_core(self, lora_blob: str | None = None):
        """The generation core on the experiment's model; with ``lora_blob``, that LoRA as a peft adapter on the same
        UNet, switched on only around this core's UNet calls (no copy of the UNet; models/adapters.py)."""
        from ..models.generation import GenerationCore

        g = self.cfg.generation
        bundle = self.diffusion()
        if lora_blob:
            from ..stages.concept_lora import bundle_with_lora
            from ..store.tensors import tensor_dict_from_bytes

            bundle = bundle_with_lora(bundle, tensor_dict_from_bytes(self.store.blobs.get(lora_blob)), key=lora_blob)
        # every unit names its own scheduler (methods/protocol.py); this default serves requests that do not
        # every unit names its own scheduler (its entry's resolved protocol, methods/registry.py resolve_protocol)
        return GenerationCore(bundle, batch_size=g.batch_size, max_batch_size=g.max_batch_size)

    def clip(self):
        from ..models.loading import load_clip

        c = self.cfg.models.clip
        return load_clip(c.source, self.data_dir, device=self.device)

    def clip_fingerprint(self) -> str:
        from ..models.loading import clip_fingerprint

        c = self.cfg.models.clip
        return clip_fingerprint(c.source, self.data_dir, c.revision)

    def captioner_fingerprint(self) -> str:
        from ..models.loading import captioner_fingerprint

        c = self.cfg.models.captioner
        return captioner_fingerprint(c.source, self.data_dir, c.revision)

    @contextlib.contextmanager
    def captioner(self):
        """A loader of the captioner for one ``with`` block (loads on the first call); only the captions stage uses
        it, so it is released when the block ends: one model less in memory for the rest of the run."""
        from ..models.loading import load_captioner, release

        c = self.cfg.models.captioner
        try:
            yield lambda: load_captioner(c.source, self.data_dir, device=self.device)
        finally:
            release("blip")

    def close(self) -> None:
        from ..models.loading import release

        release(*self.SCOPED)


class LLM:
    """The LLM client factory of one experiment (``llm.py``: openai or the offline fallback; responses cached under
    ``<data dir>/llm_cache`` so reruns never call the API). Each asset takes a fresh client (its own call count)."""

    def __init__(self, cfg, cache_dir: str | Path):
        self.cfg, self.cache_dir = cfg, Path(cache_dir)

    def client(self):
        from ..llm import LLMClient

        return LLMClient.from_config(self.cfg.models.llm, cache_dir=self.cache_dir, send_seed=self.cfg.prompts.llm_seed)


def models_resource(cfg, store: StoreResource) -> dg.ResourceDefinition:
    """``models_<experiment>``: a :class:`Models` for the run (or step process), closed at its teardown."""

    @dg.resource(description=f"Models of {cfg.experiment} (diffusion {cfg.models.diffusion.source}, CLIP, captioner) "
                             "from the process model cache; the captioner is released after the captions stage.")
    def _models(_init):
        m = Models(cfg, store)
        try:
            yield m
        finally:
            m.close()

    return _models


def llm_resource(cfg, store: StoreResource) -> dg.ResourceDefinition:
    return dg.ResourceDefinition.hardcoded_resource(
        LLM(cfg, store.path / "llm_cache"), description=f"LLM client of {cfg.experiment} ({cfg.models.llm.provider})")


RESOURCE_KINDS = ("store", "models", "llm", "mlflow")


def resource_key(kind: str, experiment: str) -> str:
    """The resource key of one kind for one experiment: ``store_<experiment>`` etc. (``manifests_<experiment>`` is the
    IO manager)."""
    return f"{kind}_{experiment}"


def experiment_resources(cfg) -> dict[str, Any]:
    """Every resource of one experiment, keyed ``<kind>_<experiment>``: the manifest IO manager, store, models, LLM and
    its own MLflow tracker (from its ``mlflow`` block)."""
    from .tracking import MlflowTracker

    root = str(cfg.resolved_data_dir())
    store = StoreResource(root=root)
    return {
        resource_key("manifests", cfg.experiment): ManifestIOManager(root=root),
        resource_key("store", cfg.experiment): store,
        resource_key("models", cfg.experiment): models_resource(cfg, store),
        resource_key("llm", cfg.experiment): llm_resource(cfg, store),
        resource_key("mlflow", cfg.experiment): MlflowTracker.for_config(cfg),
    }
