"""Croissant 1.1 (JSON-LD) description of an exported synthetic set, built with ``mlcroissant``.

The export folder (``augment export``) is a Hugging Face imagefolder: ``train/<label>/<id>.png`` plus
``train/metadata.jsonl``. ``croissant.json`` describes it:

* distribution: ``metadata.jsonl`` (FileObject, sha256) and the images (FileSet ``train/**/*.png``);
* RecordSet ``images``: image content joined by its path; RecordSet ``records``: one record per exported
  image with every lineage column of the jsonl, the image (joined on ``file_name``), record-level
  ``prov:wasDerivedFrom`` (the guide images by content id and path) and ``prov:wasGeneratedBy`` (the
  generation activity: method, model fingerprint, sampler/steps/guidance/strength, seed, Dagster run, code version);
* dataset-level PROV-O (``prov:wasDerivedFrom`` the real split, ``prov:wasGeneratedBy`` the generation activity)
  and the RAI fields for synthetic data (collection, use cases, limitations, biases).

``README.md`` (YAML card) declares the HF ``features`` with ``label`` as a ``ClassLabel`` (names in class order).
"""
from __future__ import annotations

import copy
import datetime
import hashlib
import json
from pathlib import Path
from typing import Any

PROV = "http://www.w3.org/ns/prov#"
METADATA_FILE = "train/metadata.jsonl"

# (name, Croissant data type, is array, description); the jsonl columns, in order
COLUMNS: list[tuple[str, str, bool, str]] = [
    ("file_name", "Text", False, "image path below train/: <label>/<id>.png"),
    ("label", "Text", False, "class name (a ClassLabel in the Hugging Face features)"),
    ("synthetic", "Boolean", False, "true for generated images, false for the real train images (--with-real)"),
    ("synthetic_id", "Text", False, "id of the synthetic image in the lineage store (`augment lineage <id>`)"),
    ("image_id", "Text", False, "content id (sha256 of the file bytes) of a real image"),
    ("method", "Text", False, "method entry of the experiment config that generated the image"),
    ("algorithm", "Text", False, "algorithm of that method (e.g. dafusion, diagen, diff_ii, genie, sgid)"),
    ("guide_ids", "Text", True, "content ids (sha256) of the real guide images the image was derived from"),
    ("guide_paths", "Text", True, "paths of those guide images relative to the dataset root"),
    ("prompt", "Text", False, "text prompt of the generation"),
    ("prompt_source", "Text", False, "where the prompt came from (template, offline LLM, cache, ...)"),
    ("seed", "Integer", False, "seed of the generation unit"),
    ("strength", "Float", False, "img2img strength (null for text-to-image)"),
    ("guidance_scale", "Float", False, "classifier-free guidance scale"),
    ("steps", "Integer", False, "denoising steps"),
    ("sampler", "Text", False, "diffusers scheduler of the generation core"),
    ("embedding_id", "Text", False, "textual-inversion embedding id (if the method learned concepts)"),
    ("model_fingerprint", "Text", False, "fingerprint of the diffusion model (weights + revision)"),
    ("params_json", "Text", False, "every other per-unit parameter, as JSON"),
    ("weight", "Float", False, "sampling weight of the image when training the classifier"),
    ("dagster_run_id", "Text", False, "Dagster run that generated the image"),
    ("code_version", "Text", False, "Dagster code version of the synthetic/<method> asset"),
]
GENERATION_FIELDS = ["method", "algorithm", "model_fingerprint", "sampler", "steps", "guidance_scale", "strength", "seed",
                     "dagster_run_id", "code_version"]
DERIVATION_FIELDS = ["guide_ids", "guide_paths"]
_HF_DTYPES = {"Text": "string", "Boolean": "bool", "Integer": "int64", "Float": "float64"}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_metadata(out: Path, *, name: str, description: str, classes: list[str], activity: dict[str, Any],
                   derived_from: list[dict[str, Any]], rai: dict[str, Any], version: str, cite_as: str,
                   url: str | None = None, license: str | None = None):
    """The ``mlcroissant.Metadata`` of the export folder ``out`` (its metadata.jsonl must exist: it is hashed)."""
    import mlcroissant as mlc
    from mlcroissant._src.core.context import CroissantVersion
    from rdflib.namespace import SDO

    ctx = mlc.Context(conforms_to=CroissantVersion.V_1_1)
    ctx.rdf.context["prov"] = PROV
    dt = {"Text": mlc.DataType.TEXT, "Boolean": mlc.DataType.BOOL, "Integer": mlc.DataType.INTEGER,
          "Float": mlc.DataType.FLOAT}

    def col(rs: str, n: str, **kw) -> Any:
        typ, arr, desc = next((t, a, d) for c, t, a, d in COLUMNS if c == n)
        return mlc.Field(ctx=ctx, id=f"{rs}/{n}", name=n, description=desc, data_types=[dt[typ]],
                         is_array=True if arr else None,
                         source=mlc.Source(ctx=ctx, file_object="metadata-jsonl", extract=mlc.Extract(ctx=ctx, column=n)), **kw)

    distribution = [
        mlc.FileObject(ctx=ctx, id="metadata-jsonl", name="metadata-jsonl", content_url=METADATA_FILE,
                       encoding_formats=[mlc.EncodingFormat.JSON_LINES], sha256=sha256_of(out / METADATA_FILE),
                       description="one JSON line per image with its lineage (Hugging Face imagefolder metadata)"),
        mlc.FileSet(ctx=ctx, id="image-files", name="image-files", includes=["train/**/*.png"],
                    encoding_formats=["image/png"], description="the images, train/<label>/<id>.png"),
    ]
    images = mlc.RecordSet(ctx=ctx, id="images", name="images", key=["images/file_name"], fields=[
        mlc.Field(ctx=ctx, id="images/file_name", name="file_name", data_types=[mlc.DataType.TEXT],
                  source=mlc.Source(ctx=ctx, file_set="image-files", extract=mlc.Extract(ctx=ctx, file_property="fullpath"),
                                    transforms=[mlc.Transform(ctx=ctx, regex=r"^(?:.*/)?train/(.*)$")])),
        mlc.Field(ctx=ctx, id="images/image", name="image", data_types=[mlc.DataType.IMAGE_OBJECT],
                  source=mlc.Source(ctx=ctx, file_set="image-files", extract=mlc.Extract(ctx=ctx, file_property="content"))),
    ], description="image content by path")
    fields = []
    for c, *_ in COLUMNS:
        kw = {}
        if c == "file_name":
            kw["references"] = mlc.Source(ctx=ctx, field="images/file_name")
        if c in DERIVATION_FIELDS:
            kw["equivalentProperty"] = ["prov:wasDerivedFrom"]
        fields.append(col("records", c, **kw))
    fields.append(mlc.Field(ctx=ctx, id="records/image", name="image", data_types=[mlc.DataType.IMAGE_OBJECT],
                            source=mlc.Source(ctx=ctx, field="images/image"), description="the image"))
    fields.append(mlc.Field(ctx=ctx, id="records/was_derived_from", name="was_derived_from", equivalentProperty=["prov:wasDerivedFrom"],
                            description="record-level provenance: the real guide images (content id, path)",
                            sub_fields=[col("records/was_derived_from", c) for c in DERIVATION_FIELDS]))
    fields.append(mlc.Field(ctx=ctx, id="records/was_generated_by", name="was_generated_by", equivalentProperty=["prov:wasGeneratedBy"],
                            description="record-level provenance: the generation activity of this image",
                            sub_fields=[col("records/was_generated_by", c) for c in GENERATION_FIELDS]))
    records = mlc.RecordSet(ctx=ctx, id="records", name="records", key=["records/file_name"], fields=fields,
                            description="one record per exported image, with its lineage")
    label_enum = mlc.RecordSet(ctx=ctx, id="labels", name="labels", data_types=[SDO.Enumeration],
                               key=["labels/index"], description="class names in class order (the ClassLabel ids)",
                               fields=[mlc.Field(ctx=ctx, id="labels/index", name="index", data_types=[mlc.DataType.INTEGER]),
                                       mlc.Field(ctx=ctx, id="labels/name", name="name", data_types=[mlc.DataType.TEXT])],
                               data=[{"labels/index": i, "labels/name": c} for i, c in enumerate(classes)])
    extra = {"prov:wasGeneratedBy": activity, "prov:wasDerivedFrom": derived_from}
    return mlc.Metadata(
        ctx=ctx, name=name, description=description, version=version, cite_as=cite_as, url=url,
        date_published=datetime.datetime.now(datetime.UTC).replace(microsecond=0),
        license=[license] if license else None, keywords=["synthetic data", "data augmentation", "few-shot", "diffusion"],
        distribution=distribution, record_sets=[label_enum, images, records], extra_properties=extra, **rai)


def write(out: Path, **kw) -> Path:
    """Build, validate (mlcroissant raises on errors) and write ``out/croissant.json`` atomically."""
    from .util import atomic_path

    md = build_metadata(out, **kw)
    doc = md.to_json()
    path = out / "croissant.json"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


def hf_card(classes: list[str], title: str, body: str) -> str:
    """README.md with the Hugging Face YAML header: the ``features`` (``label`` a ClassLabel in class order), so
    ``datasets.load_dataset(<export dir>)`` yields integer labels."""
    import yaml

    feats: list[dict[str, Any]] = [{"name": "image", "dtype": "image"}]
    for c, typ, arr, _ in COLUMNS:
        if c == "file_name":
            continue  # imagefolder turns file_name into the image column
        if c == "label":
            feats.append({"name": "label", "dtype": {"class_label": {"names": {str(i): n for i, n in enumerate(classes)}}}})
        elif arr:
            feats.append({"name": c, "list": _HF_DTYPES[typ]})
        else:
            feats.append({"name": c, "dtype": _HF_DTYPES[typ]})
    # features in the config entry: the local folder builder casts with them (dataset_info alone is what the Hub shows)
    header = {"configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "train/**"}],
                           "features": copy.deepcopy(feats)}],  # a copy: no YAML anchors in the card
              "dataset_info": {"features": feats}, "tags": ["synthetic", "croissant"]}
    return f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n\n# {title}\n\n{body}\n"


def read_records(path: str | Path, record_set: str = "records") -> list[dict[str, Any]]:
    """The records of ``croissant.json`` as plain dicts keyed by column name (bytes decoded), via mlcroissant."""
    import mlcroissant as mlc

    ds = mlc.Dataset(jsonld=str(path))
    out = []
    for r in ds.records(record_set):
        out.append({k.split("/")[-1]: _plain(v) for k, v in r.items()})
    return out


def _plain(v):
    import numpy as np

    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, dict):
        return {k.split("/")[-1]: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v
