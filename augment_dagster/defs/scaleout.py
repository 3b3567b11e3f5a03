"""Scale-out wiring (ARCHITECTURE "Scale-out"): op tags for GPU assets, the run executor profile, and the Pipes
clients. Imports neither torch nor the optional ``dagster-k8s`` / ``dagster-celery`` packages at module level.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import dagster as dg

from ..config import ConfigError, ExecutionConfig, ExperimentConfig

K8S_CONFIG_TAG = "dagster-k8s/config"
CELERY_QUEUE_TAG = "dagster-celery/queue"


def _execution(cfg: ExperimentConfig | ExecutionConfig | None) -> ExecutionConfig:
    if cfg is None:
        return ExecutionConfig()
    return cfg.execution if isinstance(cfg, ExperimentConfig) else cfg


def k8s_tags(gpu: bool, cfg: ExperimentConfig | ExecutionConfig | None = None) -> dict[str, Any]:
    """``dagster-k8s/config`` op tags: a GPU asset's pod requests ``nvidia.com/gpu`` and lands on a GPU node
    (node selector and tolerations from ``execution.k8s``); CPU assets get no tags (the run launcher's defaults)."""
    if not gpu:
        return {}
    k = _execution(cfg).k8s
    pod_spec: dict[str, Any] = {}
    if k.node_selector:
        pod_spec["node_selector"] = dict(k.node_selector)
    if k.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in k.tolerations]
    conf: dict[str, Any] = {"container_config": {"resources": {"limits": {"nvidia.com/gpu": k.gpu_limit}}}}
    if pod_spec:
        conf["pod_spec_config"] = pod_spec
    return {K8S_CONFIG_TAG: conf}


def gpu_op_tags(gpu: bool, cfg: ExperimentConfig | ExecutionConfig | None = None) -> dict[str, Any] | None:
    """All op tags of an asset: the Kubernetes GPU request and, with the celery executor, the GPU queue.
    ``None`` for CPU assets (no tags at all)."""
    if not gpu:
        return None
    ex = _execution(cfg)
    tags = k8s_tags(True, ex)
    if ex.executor == "celery":
        tags[CELERY_QUEUE_TAG] = ex.celery_gpu_queue
    return tags


def _missing_extra(extra: str, package: str, what: str, err: Exception) -> ConfigError:
    setting = what.split(":")[0]
    return ConfigError(
        f"{what} needs the optional package {package!r} ({err}); install it with `pip install 'augment-dagster[{extra}]'` "
        f"(its version must match the installed dagster), or set {setting} to a local option")


def executor_for(configs: list[ExperimentConfig]) -> dg.ExecutorDefinition:
    """The code location's executor, from ``execution.executor`` (all configs must agree when set)."""
    chosen = {c.execution.executor for c in configs if c.execution.executor != "in_process"}
    if len(chosen) > 1:
        raise ConfigError(f"execution.executor differs between experiment configs: {sorted(chosen)} (one code location, one executor)")
    name = chosen.pop() if chosen else "in_process"
    if name == "in_process":
        return dg.in_process_executor
    if name == "multiprocess":
        n = min(c.execution.max_concurrent for c in configs if c.execution.executor == "multiprocess")
        return dg.multiprocess_executor.configured({"max_concurrent": n}, name="augment_multiprocess")
    if name == "k8s_job":
        try:
            from dagster_k8s import k8s_job_executor
        except ImportError as e:
            raise _missing_extra("k8s", "dagster-k8s", "execution.executor: k8s_job", e) from None
        return k8s_job_executor
    try:  # celery: CPU steps on queue "dagster", GPU steps on execution.celery_gpu_queue (tag dagster-celery/queue)
        from dagster_celery import celery_executor
    except ImportError as e:
        raise _missing_extra("celery", "dagster-celery", "execution.executor: celery", e) from None
    ex = next(c.execution for c in configs if c.execution.executor == "celery")
    return celery_executor.configured({"broker": ex.celery_broker, "backend": ex.celery_backend}, name="augment_celery")


def pipes_resources(configs: list[ExperimentConfig]) -> dict[str, Any]:
    """Pipes clients the configs need: ``pipes_subprocess_client`` always (cheap, unused in in_process mode) and
    ``pipes_k8s_client`` when a config selects ``pipes_k8s``."""
    res: dict[str, Any] = {"pipes_subprocess_client": dg.PipesSubprocessClient()}
    if any(c.execution.mode == "pipes_k8s" for c in configs):
        res["pipes_k8s_client"] = pipes_k8s_client()
    return res


def pipes_k8s_client():
    try:
        from dagster_k8s import PipesK8sClient
    except ImportError as e:
        raise _missing_extra("k8s", "dagster-k8s", "execution.mode: pipes_k8s", e) from None
    return PipesK8sClient()


def pipes_pod_spec(cfg: ExperimentConfig | ExecutionConfig) -> dict[str, Any]:
    """``base_pod_spec`` of the ``pipes_k8s`` worker pod: the same GPU limit / node selector / tolerations as the
    ``dagster-k8s/config`` tags of a GPU step."""
    k = _execution(cfg).k8s
    spec: dict[str, Any] = {"containers": [{"resources": {"limits": {"nvidia.com/gpu": k.gpu_limit}}}]}
    if k.node_selector:
        spec["node_selector"] = dict(k.node_selector)
    if k.tolerations:
        spec["tolerations"] = [dict(t) for t in k.tolerations]
    if k.store_pvc and isinstance(cfg, ExperimentConfig):  # the worker sees the store at the same path
        spec["volumes"] = [{"name": "augment-store", "persistent_volume_claim": {"claim_name": k.store_pvc}}]
        spec["containers"][0]["volume_mounts"] = [{"name": "augment-store", "mount_path": str(cfg.resolved_data_dir())}]
    return spec


_PIPES_TYPES = {"IntMetadataValue": "int", "FloatMetadataValue": "float", "JsonMetadataValue": "json",
                "MarkdownMetadataValue": "md", "PathMetadataValue": "path", "TextMetadataValue": "text",
                "UrlMetadataValue": "url", "BoolMetadataValue": "bool", "NotebookMetadataValue": "notebook"}


def to_pipes_metadata(md: dict[str, Any]) -> dict[str, Any]:
    """Dagster ``MetadataValue``s → the Pipes wire format (``{"raw_value": ..., "type": ...}``), so a
    materialization reported from a worker shows the same typed metadata as one from the run process."""
    out: dict[str, Any] = {}
    for k, v in md.items():
        t = _PIPES_TYPES.get(type(v).__name__)
        if t is None:
            out[k] = v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)
            continue
        raw = v.value
        out[k] = {"raw_value": str(raw) if t in ("path", "notebook") else raw, "type": t}
    return out


# ---------------------------------------------------------------- several hosts: PostgreSQL (README "Many hosts")
POSTGRES_ENV = "AUGMENT_POSTGRES_URL"
MLFLOW_SCHEMA = "mlflow"  # MLflow's tables beside Dagster's in the same database (each has its own alembic_version)
_STORAGE_BLOCK = f"""
# {POSTGRES_ENV} is set: runs, events and schedules live in PostgreSQL (dagster-postgres), so steps on other
# hosts share this instance. The URL (it may hold a password) is read from the environment, never written here.
storage:
  postgres:
    postgres_url:
      env: {POSTGRES_ENV}
"""


# the project template's event log (dagster.yaml; defs/event_storage.py), replaced by _STORAGE_BLOCK with PostgreSQL
POOLED_EVENT_LOG_BLOCK = """# The event log: Dagster's run-sharded sqlite storage (DAGSTER_HOME/history/runs) with its connections kept per
# process instead of one per event (augment_dagster/defs/event_storage.py). With $AUGMENT_POSTGRES_URL set,
# `augment run` replaces this block with PostgreSQL storage.
event_log_storage:
  module: augment_dagster.defs.event_storage
  class: PooledSqliteEventLogStorage
"""


def postgres_url() -> str | None:
    """``$AUGMENT_POSTGRES_URL`` with the psycopg2 driver named (``postgresql+psycopg2://``): SQLAlchemy 2.1 maps
    a bare ``postgresql://`` to psycopg 3, which the ``postgres`` extra does not install. The variable is rewritten
    in this process's environment so the Dagster instance (and every step process) reads the same URL."""
    url = os.environ.get(POSTGRES_ENV) or None
    if url and re.match(r"postgres(ql)?://", url):
        url = "postgresql+psycopg2://" + url.split("://", 1)[1]
        os.environ[POSTGRES_ENV] = url
    return url


def redact(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``: safe to print or log."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        p = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if p.password is None:
        return url
    host = p.hostname or ""
    netloc = f"{p.username}:***@{host}" + (f":{p.port}" if p.port else "")
    return urlunsplit((p.scheme, netloc, p.path, p.query, p.fragment))


def write_instance_yaml(home: Path, template: Path) -> Path:
    """``<DAGSTER_HOME>/dagster.yaml``: the project's template the first time; with ``$AUGMENT_POSTGRES_URL`` set,
    a PostgreSQL ``storage`` block is added unless the file already configures storage other than the template's
    pooled sqlite event log, which the PostgreSQL block replaces (a user-supplied storage block is left as it
    is). Written atomically."""
    from ..util import atomic_write_text

    target = home / "dagster.yaml"
    tmpl = template.read_text() if template.exists() else ""
    text = target.read_text() if target.exists() else tmpl
    new = text
    if POOLED_EVENT_LOG_BLOCK in tmpl and text == tmpl.replace(POOLED_EVENT_LOG_BLOCK, ""):
        new = tmpl  # a home made from the template before it had the pooled event log: the same file plus the block
    if postgres_url():
        bare = new.replace(POOLED_EVENT_LOG_BLOCK, "")  # the template's sqlite event log gives way to PostgreSQL
        if not re.search(r"^(storage|run_storage|event_log_storage):", bare, re.M):
            _require_postgres_extra()
            new = bare.rstrip("\n") + "\n" + _STORAGE_BLOCK
    if new != text or not target.exists():
        atomic_write_text(target, new)
    return target


def _require_postgres_extra() -> None:
    try:
        import dagster_postgres  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"{POSTGRES_ENV} is set, but the optional package 'dagster-postgres' is missing ({e}); install "
                          "it with `pip install 'augment-dagster[postgres]'`, or unset the variable for the local sqlite "
                          "instance") from None


def mlflow_postgres_uri(url: str) -> str:
    """MLflow's tracking URI in the same PostgreSQL database, in its own schema (``search_path=mlflow``)."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    p = urlsplit(url)
    scheme = "postgresql+psycopg2" if p.scheme in ("postgres", "postgresql") else p.scheme
    q = dict(parse_qsl(p.query))
    q.setdefault("options", f"-csearch_path={MLFLOW_SCHEMA}")
    return urlunsplit((scheme, p.netloc, p.path, urlencode(q), p.fragment))


_SCHEMA_DONE: set[str] = set()


def ensure_mlflow_schema(url: str) -> None:
    """Create MLflow's schema in the PostgreSQL database once (MLflow creates its tables in it)."""
    if url in _SCHEMA_DONE:
        return
    import psycopg2

    _SCHEMA_DONE.add(url)
    base = url.replace("postgresql+psycopg2://", "postgresql://", 1)
    with psycopg2.connect(base.split("?")[0]) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE SCHEMA IF NOT EXISTS {MLFLOW_SCHEMA}")
