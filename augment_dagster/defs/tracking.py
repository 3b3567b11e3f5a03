"""The MLflow resource (one per experiment, ``mlflow_<experiment>``) and the dataset inputs of its runs.

Kept free of torch imports; MLflow is imported when first used.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from ..store.manifests import manifest_path

# MLflow 3's UI opens an experiment in its GenAI (traces) view unless this tag says what kind it is; the value
# its "Model training" view is chosen by (mlflow/server/js: ExperimentKind.CUSTOM_MODEL_DEVELOPMENT)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


class MlflowTracker(dg.ConfigurableResource):
    """A thin MLflow client wrapper. Failures (server down, bad URI) never fail the asset: they are
    returned as an error string that the asset reports in its metadata, and ``augment report --relog``
    can log the run later from the manifests."""

    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite under ``default_root``
    default_root: str = "augment_data/mlflow"
    enabled: bool = True
    http_retries: int = 2  # MLflow's own default (7 with backoff) blocks an asset for minutes when the server is down
    http_timeout_s: int = 10

    @classmethod
    def for_config(cls, cfg) -> "MlflowTracker":
        """The tracker of one experiment, from its own ``mlflow`` block (local store under its data dir)."""
        return cls(tracking_uri=cfg.mlflow.tracking_uri, default_root=str(cfg.resolved_data_dir() / "mlflow"),
                   enabled=cfg.mlflow.enabled)

    def resolved_uri(self) -> str:
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        if self.tracking_uri:
            return self.tracking_uri
        if os.environ.get("AUGMENT_POSTGRES_URL"):  # several hosts: beside the Dagster instance (scaleout.py)
            from .scaleout import mlflow_postgres_uri, postgres_url

            return mlflow_postgres_uri(postgres_url())
        Path(self.default_root).mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{Path(self.default_root).resolve() / 'mlflow.db'}"

    def client(self):
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(self.http_retries))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(self.http_timeout_s))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        uri = self.resolved_uri()
        if uri.startswith("postgresql") and os.environ.get("AUGMENT_POSTGRES_URL"):
            from .scaleout import ensure_mlflow_schema

            ensure_mlflow_schema(os.environ["AUGMENT_POSTGRES_URL"])
        if uri.startswith("sqlite:///"):
            # the first client of a process creates the store's tables; two slot workers doing that at once on a
            # fresh mlflow.db raced ("table ... already exists") and one asset's run went unlogged
            from filelock import FileLock

            with FileLock(uri[len("sqlite:///"):] + ".lock"):
                return MlflowClient(tracking_uri=uri)
        return MlflowClient(tracking_uri=uri)

    def experiment_id(self, client, name: str) -> str:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if (exp.tags or {}).get(EXPERIMENT_KIND_TAG) is None:  # made by an older version: set it once
                try:
                    client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
                except Exception:  # noqa: BLE001 - a read-only server: the view is only a default
                    pass
            return exp.experiment_id
        uri = self.resolved_uri()
        artifact_location = None
        if uri.startswith(("sqlite:", "file:", "postgresql")):  # artifacts in the (shared) data dir
            artifact_location = (Path(self.default_root).resolve() / "artifacts" / name).as_uri()
        try:
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:
            exp = client.get_experiment_by_name(name)  # created concurrently
            if exp is None:
                raise
            return exp.experiment_id

    def log_run(self, experiment: str, run_name: str, *, params: dict[str, Any], metrics: dict[str, float],
                tags: dict[str, str], artifacts: dict[str, bytes] | None = None, model=None,
                model_name: str = "classifier", find_existing: dict[str, str] | None = None,
                datasets: list[DatasetRef] | None = None) -> tuple[str | None, str | None]:
        """Log one run; returns (run_id, error). ``find_existing`` tags identify a run to update instead of
        creating a duplicate (reruns of the same asset partition + data version). ``datasets`` are logged as
        the run's MLflow dataset inputs (``mlflow.data`` datasets with name, digest and source)."""
        if not self.enabled:
            return None, "mlflow disabled in config"
        try:
            import mlflow
            from mlflow.entities import Metric, Param, RunTag

            client = self.client()
            exp_id = self.experiment_id(client, experiment)
            if find_existing:
                flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in find_existing.items())
                found = client.search_runs([exp_id], filter_string=flt, max_results=1)
                if found:
                    return found[0].info.run_id, None
            run = client.create_run(exp_id, run_name=run_name, tags=tags)
            rid = run.info.run_id
            import time as _t

            now = int(_t.time() * 1000)
            plist = [Param(k[:250], str(v)[:6000]) for k, v in sorted(params.items())]
            mlist = [Metric(k[:250], float(v), now, 0) for k, v in sorted(metrics.items()) if v is not None and v == v]
            for i in range(0, max(len(plist), 1), 100):
                client.log_batch(rid, metrics=mlist if i == 0 else [], params=plist[i:i + 100], tags=[])
            if datasets:
                try:
                    client.log_inputs(rid, datasets=[d.to_mlflow_input() for d in datasets])
                except Exception as e:  # noqa: BLE001 - the metrics are logged; say on the run why inputs are missing
                    client.set_tag(rid, "augment.dataset_inputs_error", f"{type(e).__name__}: {str(e)[:300]}")
            with tempfile.TemporaryDirectory() as td:
                for name, data in (artifacts or {}).items():
                    if not data:
                        continue
                    p = Path(td) / name
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_bytes(data)
                    client.log_artifact(rid, str(p), artifact_path=str(Path(name).parent) if "/" in name else None)
            if model is not None:
                import logging

                # pickle format is deliberate (the model class is importable from augment_dagster); silence its warning
                logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
                mlflow.set_tracking_uri(self.resolved_uri())
                import mlflow.pytorch

                with mlflow.start_run(run_id=rid):
                    mlflow.pytorch.log_model(model, name=model_name, serialization_format="pickle",
                                             pip_requirements=["torch", "augment-dagster"])
            client.set_terminated(rid, "FINISHED")
            return rid, None
        except Exception as e:  # noqa: BLE001 - tracking must never fail the asset
            return None, f"{type(e).__name__}: {str(e)[:300]}"


@dataclasses.dataclass
class DatasetRef:
    """One data set a run consumed, as MLflow logs it: ``name``, ``digest`` (the Dagster data version of the
    asset partition), ``source`` (its manifest path) and the manifest itself (MLflow derives schema/profile)."""

    name: str
    digest: str
    source: str
    df: pd.DataFrame
    context: str = "training"

    def to_mlflow_input(self):
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        # list-valued lineage columns (guide ids, concepts) have no MLflow column type: log them as JSON text
        df = self.df.map(lambda v: v if isinstance(v, (str, int, float, bool, type(None))) else _json(v))
        import warnings

        with warnings.catch_warnings():  # mlflow's source-type ambiguity and integer-schema hints: noise for a user
            warnings.simplefilter("ignore", UserWarning)
            ds = mlflow.data.from_pandas(df, source=self.source, name=self.name, digest=self.digest)
            entity = ds._to_mlflow_entity()
        return DatasetInput(dataset=entity, tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=self.context)])


def _json(v) -> str:
    import json

    return json.dumps(v.tolist() if hasattr(v, "tolist") else v, default=str)


def asset_datasets(context: dg.AssetExecutionContext, root: str | os.PathLike,
                   inputs: Mapping[dg.AssetKey, pd.DataFrame], purpose: str = "training") -> list[DatasetRef]:
    """The upstream manifests of a partitioned asset as MLflow dataset refs, each with the data version Dagster
    recorded for that upstream partition (falls back to the manifest's content hash, which ``output`` uses)."""
    from ..store.manifests import manifest_version

    pk = context.partition_key if context.has_partition_key else None
    refs = []
    for key, df in inputs.items():
        version = None
        try:
            flt = dg.AssetRecordsFilter(asset_key=key, asset_partitions=[pk] if pk else None)
            recs = context.instance.fetch_materializations(flt, limit=1).records
            if recs:
                version = (recs[0].asset_materialization.tags or {}).get("dagster/data_version")
        except Exception:  # noqa: BLE001 - an instance without event records still gets the content hash
            version = None
        refs.append(DatasetRef(name=key.to_user_string() + (f"[{pk}]" if pk else ""), digest=version or manifest_version(df),
                               source=str(manifest_path(root, key.path, pk).resolve()), df=df, context=purpose))
    return refs
