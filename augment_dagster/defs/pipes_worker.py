"""Out-of-process worker for GPU assets (``execution.mode: pipes_subprocess | pipes_k8s``).

``python -m augment_dagster.defs.pipes_worker`` is started by the ``synthetic/<method>`` asset through a Dagster Pipes
client. It receives the config, method, partition and store root as Pipes extras, loads its inputs from the
manifests in the (shared) store, runs the SAME ``compute_synthetic`` as the in-process asset, writes the manifest
parquet to the path the IO manager uses and reports the materialization (metadata + content data version).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        ex = pipes.extras
        os.environ["AUGMENT_DATA_DIR"] = ex["data_dir"]  # the config's store root, as the orchestrator resolved it

        from ..config import load_config, parse_config
        from .assets.common import Experiment, output
        from .assets.synthetic import compute_synthetic
        from .resources import Models, StoreResource
        from .scaleout import to_pipes_metadata

        cfg = parse_config(ex["config"], ex.get("config_path") or "<pipes extras>") if ex.get("config") else load_config(ex["config_path"])
        exp = Experiment(cfg)
        store = StoreResource(root=ex["data_dir"])
        models = Models(cfg, store)
        part = ex["partition"]
        loaded = {name: store.read_manifest(key, part) for name, key in ex["inputs"].items()}
        split = loaded.pop("split")
        pipes.log.info(f"pipes worker pid {os.getpid()}: synthetic/{ex['method']} {part}")
        try:
            df, md = compute_synthetic(exp, ex["method"], part, split, loaded, ex["run_id"], log=pipes.log.debug,
                                       store=store, models=models)
        finally:
            models.close()
        out = output(df, md)  # same metadata + data version as the in-process path
        store.write_manifest(ex["asset_key"], part, df)
        md_out = to_pipes_metadata(dict(out.metadata))
        md_out["execution"] = {"raw_value": "pipes", "type": "text"}
        md_out["worker_pid"] = {"raw_value": os.getpid(), "type": "int"}
        pipes.report_asset_materialization(metadata=md_out, data_version=out.data_version.value)


if __name__ == "__main__":
    main()
