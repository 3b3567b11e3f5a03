"""DuckDB views over the parquet manifests, and the lineage chain of one synthetic image.

Views (each has ``experiment`` and ``partition`` columns taken from the manifest's path):
``real``, ``splits``, ``embeddings``, ``captions``, ``prompts``, ``inversions``, ``synthetic``,
``weights``, ``classifiers``, ``metrics``, ``reports``. A view whose manifests do not exist yet is an
empty table with the two path columns, so queries never fail on a fresh store.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..util import sha256_file

# view name -> glob (relative to <root>/manifests), first path component = experiment
VIEWS = {
    "real": ["*/raw_images/*.parquet"],
    "splits": ["*/few_shot_split/*.parquet"],
    "embeddings": ["*/concept_embeddings/*.parquet"],
    "concept_lora": ["*/concept_lora/*.parquet"],
    "captions": ["*/captions/*.parquet"],
    "prompts": ["*/class_prompts/*.parquet"],
    "suffixes": ["*/prompt_suffixes/*.parquet"],
    "inversions": ["*/inversion_pool/*.parquet"],
    "synthetic": ["*/synthetic/*/*.parquet"],
    "weights": ["*/confidence_weights/*/*.parquet"],
    "classifiers": ["*/classifier/*/*.parquet", "*/real_classifier/*.parquet"],
    "metrics": ["*/metrics/*/*.parquet"],
    "set_metrics": ["*/set_metrics/*/*.parquet"],
    "reports": ["*/report/*.parquet"],
}


class LineageError(LookupError):
    pass


def connect(root: str | os.PathLike):
    """An in-memory DuckDB connection with one view per manifest family (read-only over parquet)."""
    import duckdb

    root = Path(root)
    con = duckdb.connect(":memory:")
    mdir = root / "manifests"
    for name, patterns in VIEWS.items():
        globs = [(mdir / p).as_posix() for p in patterns if mdir.exists() and any(mdir.glob(p))]
        if globs:
            src = "[" + ", ".join(f"'{g}'" for g in globs) + "]"
            con.execute(
                f"CREATE VIEW {name} AS SELECT * EXCLUDE (filename), "
                f"split_part(replace(filename, '{mdir.as_posix()}/', ''), '/', 1) AS experiment, "
                f"regexp_replace(regexp_extract(filename, '[^/]+$'), '\\.parquet$', '') AS \"partition\" "
                f"FROM read_parquet({src}, union_by_name=true, filename=true)"
            )
        else:
            con.execute(f"CREATE VIEW {name} AS SELECT NULL::VARCHAR AS experiment, NULL::VARCHAR AS \"partition\" WHERE false")
    return con


def _rows(con, sql: str, params: list | None = None) -> list[dict[str, Any]]:
    df = con.execute(sql, params or []).df()
    return json.loads(df.to_json(orient="records", default_handler=str))


def resolve_id(con, ident: str) -> str:
    """A synthetic id, a unique prefix of one, or a file path (hashed) -> the full synthetic id."""
    p = Path(ident)
    if p.exists() and p.is_file():
        ident = sha256_file(p)
    ident = ident.lower()
    hits = [r["synthetic_id"] for r in _rows(con, "SELECT DISTINCT synthetic_id FROM synthetic WHERE synthetic_id LIKE ?", [ident + "%"])] \
        if "synthetic_id" in _columns(con, "synthetic") else []
    if not hits:
        raise LineageError(f"no synthetic image with id or prefix {ident[:16]!r} in the store (run `augment run` first?)")
    if len(hits) > 1:
        raise LineageError(f"prefix {ident!r} is ambiguous: {len(hits)} synthetic images match; give more characters")
    return hits[0]


def _columns(con, view: str) -> set[str]:
    return {r[0] for r in con.execute(f"DESCRIBE {view}").fetchall()}


def lineage(root: str | os.PathLike, ident: str) -> dict[str, Any]:
    """The full chain from a synthetic image back to its guide images, split, concept, prompt and models."""
    con = connect(root)
    sid = resolve_id(con, ident)
    syn = _rows(con, "SELECT * FROM synthetic WHERE synthetic_id = ? ORDER BY experiment, \"partition\", method", [sid])
    first = syn[0]
    exp, part, method = first["experiment"], first["partition"], first["method"]
    guides = first.get("guide_ids") or []
    real = []
    have = _columns(con, "real")
    cols = ", ".join(c for c in ("image_id", "label", "class_id", "pool", "path", "dataset_root", "bytes", "exif_transposed",
                                 "hf_dataset", "hf_revision", "hf_fingerprint", "hf_split", "hf_row") if c in have)
    for g in guides:
        r = _rows(con, f"SELECT {cols} FROM real WHERE image_id = ? AND experiment = ? LIMIT 1", [g, exp])
        if r:
            if r[0].get("hf_split") is not None and r[0].get("hf_row") is not None:
                from ..data.hf import describe_row

                r[0]["hf_row"] = int(r[0]["hf_row"])
                r[0]["file"] = describe_row(r[0])
            else:
                from .manifests import resolve_root

                r[0]["file"] = str(resolve_root(r[0]["dataset_root"], root) / r[0]["path"])
            sp = _rows(con, "SELECT role, rank FROM splits WHERE image_id = ? AND experiment = ? AND \"partition\" = ?", [g, exp, part])
            r[0]["split_role"] = sp[0]["role"] if sp else None
            real.append(r[0])
    concept = None
    if first.get("embedding_id") and "embedding_id" in _columns(con, "embeddings"):
        c = _rows(con, "SELECT label, token, variant, embedding_id, first_loss, last_loss, steps, train_image_ids, model_fingerprint, "
                       "created_by_run FROM embeddings WHERE embedding_id = ? LIMIT 1", [first["embedding_id"]])
        concept = c[0] if c else None
    mlflow = []
    if "mlflow_run_id" in _columns(con, "metrics"):
        mlflow = _rows(con, "SELECT mlflow_run_id, acc_id, acc_ood FROM metrics WHERE experiment = ? AND \"partition\" = ? AND method = ?",
                       [exp, part, method])
    prompt = {k: first.get(k) for k in ("prompt", "prompt_segments", "negative_prompt", "prompt_source", "switch_prompt", "switch_t")}
    for k in ("prompt_model", "prompt_response_hash", "prompt_provider"):
        if k in first:
            prompt[k] = first[k]
    return {
        "synthetic_id": sid, "experiment": exp, "split": part, "method": method, "algorithm": first.get("algorithm"),
        "label": first.get("label"), "blob": first.get("blob"),
        "generation": {k: first.get(k) for k in ("mode", "seed", "strength", "guidance_scale", "steps", "scheduler",
                                                 "start_rule", "start_timestep", "denoise_steps", "resolution",
                                                 "preprocess", "vae_encode")}
        | {"params": json.loads(first.get("params_json") or "{}")},
        "guides": real, "concept": concept, "prompt": prompt, "model_fingerprint": first.get("model_fingerprint"),
        "dagster_run_id": first.get("created_by_run"), "mlflow_runs": mlflow,
        "appears_in": [{"experiment": r["experiment"], "split": r["partition"], "method": r["method"],
                        **({"episode": int(r["episode"])} if r.get("episode") is not None else {})} for r in syn],
        # support: episode — the episodes whose support this image was generated from (-1: the split's shots)
        "episodes": sorted({int(r["episode"]) for r in syn if r.get("episode") is not None}),
    }


def format_lineage(ch: dict[str, Any]) -> str:
    L = [f"synthetic image {ch['synthetic_id']}",
         f"  experiment {ch['experiment']}  split {ch['split']}  method {ch['method']} ({ch['algorithm']})  label {ch['label']!r}",
         f"  file: blobs/{ch['blob'][:2]}/{ch['blob']}.png"]
    g = ch["generation"]
    L.append(f"  generation: mode={g['mode']} seed={g['seed']} strength={g['strength']} guidance={g['guidance_scale']} "
             f"steps={g['steps']} scheduler={g.get('scheduler')} start={g.get('start_rule')}@t{g.get('start_timestep')} "
             f"denoised={g.get('denoise_steps')} params={g['params']}")
    p = ch["prompt"]
    L.append(f"  prompt: {p['prompt']!r} (source: {p['prompt_source']})" + (f"  switch→ {p['switch_prompt']!r} at t<{p['switch_t']}" if p.get("switch_prompt") else ""))
    eps = [e for e in ch.get("episodes", []) if e >= 0]
    if eps:
        L.append(f"  episodes: made from the support of episode(s) {eps}" + (" and the split's shots" if -1 in ch["episodes"] else ""))
    for r in ch["guides"]:
        cid = f" [id {r['class_id']}]" if r.get("class_id") and r.get("class_id") != r["label"] else ""
        L.append(f"  ← guide image {r['image_id'][:16]}… class {r['label']!r}{cid} ({r['split_role'] or r['pool']}): {r['file']}")
    if ch["concept"]:
        c = ch["concept"]
        L.append(f"  ← concept {c['token']} ({c['variant']}) embedding {c['embedding_id'][:16]}… learned from "
                 f"{len(c['train_image_ids'] or [])} images, loss {c['first_loss']:.4f}→{c['last_loss']:.4f}, run {str(c['created_by_run'])[:8]}")
    L.append(f"  ← model fingerprint {ch['model_fingerprint']}")
    L.append(f"  ← Dagster run {ch['dagster_run_id']}")
    for m in ch["mlflow_runs"]:
        acc = ", ".join(f"{k}={m[k]:.3f}" if isinstance(m.get(k), (int, float)) else f"{k}=-" for k in ("acc_id", "acc_ood"))
        L.append(f"  → MLflow run {m['mlflow_run_id']} (classifier {acc})")
    return "\n".join(L)
