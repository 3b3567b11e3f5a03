"""The experiment config's plain sections: dataset and splits, concept learning and prompts, MLflow, asset
checks, automation and execution. ``augment_dagster.config`` assembles them into :class:`ExperimentConfig`
(import them from there). Nothing here imports torch."""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_SPLIT_RE = re.compile(r"^(\d+)shot-s(\d+)$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BuiltinDatasetConfig(_Strict):
    """The generated shapes dataset (see augment_dagster/data/builtin.py)."""

    classes: list[str] = Field(default_factory=lambda: ["circle", "square", "triangle", "star", "cross", "ring"])
    train_per_class: int = Field(24, ge=1)
    test_per_class: int = Field(20, ge=1)
    ood_per_class: int = Field(20, ge=0)
    image_size: int = Field(32, ge=8, le=1024)
    seed: int = 0


class HFDatasetConfig(_Strict):
    """A Hugging Face dataset (``dataset.source: hf:<hub id or local path>``): which splits and columns to read."""

    train_split: str = Field("train", description="split whose images are the train pool (the few-shot splits draw from it)")
    test_split: str | None = Field("test", description="in-distribution test split (None: no test pool; a missing "
                                                       "'test' split is then noted, a missing named one is an error)")
    ood_split: str | None = Field(None, description="out-of-distribution test split (None: none)")
    image_column: str = Field("image", description="an Image feature (or bytes / {'bytes','path'} values)")
    label_column: str = Field("label", description="a ClassLabel (class ids = its names), integer or string column")
    revision: str | None = Field(None, description="hub ids: a branch, tag or commit (recorded in lineage)")


class ClassSplitConfig(_Strict):
    """Class-split benchmarks (mini-/tiered-ImageNet): disjoint lists of class ids (as the source names them, e.g.
    WordNet ids), each a list or a file with one id per line (extra text after the id is ignored). Only the
    ``evaluate`` classes enter the few-shot splits, generation and evaluation; see
    :meth:`DatasetConfig.evaluation_classes`."""

    train: list[str] | str = Field(default_factory=list)
    val: list[str] | str = Field(default_factory=list)
    test: list[str] | str = Field(default_factory=list)
    evaluate: Literal["test", "val"] = Field("test", description="which class list the experiment evaluates on")


class DatasetConfig(_Strict):
    source: str = Field("builtin", description="'builtin', a path to an imagefolder tree root/<class>/*, optional "
                                               "root/test, root/ood, or 'hf:<hub id or local path>' (a Hugging Face "
                                               "dataset: save_to_disk folder, parquet folder or hub id)")
    builtin: BuiltinDatasetConfig = Field(default_factory=BuiltinDatasetConfig)
    hf: HFDatasetConfig = Field(default_factory=HFDatasetConfig)
    class_names: dict[str, str] | str | None = Field(
        None, description="class id -> words used in prompts, captions, LLM requests, reports and exports: a mapping, "
                          "or a file of 'id<TAB>words' lines (ImageNet's words.txt; of comma-separated synonyms the "
                          "first is used). None: the id, for imagefolder names cleaned (a leading 'NNN.' index "
                          "stripped, '_' -> space). Manifests keep the id in the column class_id.")
    class_split: ClassSplitConfig | None = Field(None, description="train/val/test class lists (class-split benchmarks)")
    on_bad_file: Literal["error", "skip"] = "error"
    on_duplicate: Literal["error", "warn", "drop"] = Field(
        "error", description="an image whose bytes occur in two classes, or in the train pool and test/ood: error, "
                             "warn (keep all), or drop (the train copy of a leak; every copy of a cross-class duplicate)")
    min_image_size: int = Field(8, ge=1, description="images narrower or lower than this (px) are bad files")
    max_image_pixels: int = Field(40_000_000, ge=1, description="larger images are refused (never decoded)")
    metaclass: str = Field("shape", description="super-class word used by Diff-II/GeNIe prompts")

    @property
    def is_hf(self) -> bool:
        return self.source.startswith("hf:")

    def evaluation_classes(self) -> list[str] | None:
        """The class ids the experiment evaluates on (``class_split.<evaluate>``, files read), or None when the
        dataset has no class split (every class). The few-shot split manifest holds only these classes; its
        ``class_id`` column has the ids, ``label`` the words (``data.classes.evaluation_labels``)."""
        if self.class_split is None:
            return None
        from .data.classes import read_class_list

        return read_class_list(getattr(self.class_split, self.class_split.evaluate),
                               f"dataset.class_split.{self.class_split.evaluate}")


class SplitsConfig(_Strict):
    shots: list[int] = Field(default_factory=lambda: [4])
    seeds: list[int] = Field(default_factory=lambda: [0])
    val_per_class: int = Field(4, ge=1)
    fewer_than_k: Literal["error", "use_all"] = Field(
        "error", description="a class with fewer than K+val images: error, or use what there is (recorded in the split manifest)"
    )

    @field_validator("shots")
    @classmethod
    def _pos_shots(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError("shots must be a non-empty list of positive integers")
        return sorted(set(v))

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v or any(s < 0 for s in v):
            raise ValueError("seeds must be a non-empty list of non-negative integers")
        return sorted(set(v))

    def keys(self) -> list[str]:
        return [split_key(k, s) for k in self.shots for s in self.seeds]


def split_key(shots: int, seed: int) -> str:
    return f"{shots}shot-s{seed}"


def parse_split_key(key: str) -> tuple[int, int]:
    m = _SPLIT_RE.match(key)
    if not m:
        raise ValueError(f"bad split key {key!r}: expected '<K>shot-s<seed>', e.g. '4shot-s0'")
    return int(m.group(1)), int(m.group(2))


class ConceptsConfig(_Strict):
    """Textual inversion (DA-Fusion §1.2), one token per class."""

    steps: int = Field(100, ge=1)
    lr: float = Field(5e-3, gt=0)
    batch_size: int = Field(4, ge=1)
    init_word: str = Field("the", description="the word the tokens start from (DA-Fusion: 'the'); '{label}': each class's "
                                              "own name (a name the tokenizer splits into pieces starts from init_fallback)")
    init_fallback: str = Field("the", description="start word of a class whose name is not one token (init_word '{label}')")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay on the token vector (DA-Fusion: 1e-2)")
    latents: Literal["sample", "mean"] = Field(
        "sample", description="z0 per step: a draw from the VAE posterior (diffusers TI script) or its mean")
    checkpoint_every: int = Field(50, ge=1)
    noise_sigmas: list[float] = Field(default_factory=lambda: [0.005, 0.01, 0.025],
                                      description="DIAGen embedding noise: one fixed draw per sigma per class (std devs)")

    @field_validator("noise_sigmas")
    @classmethod
    def _sigmas(cls, v: list[float]) -> list[float]:
        if any(s <= 0 for s in v):
            raise ValueError("noise_sigmas must be positive standard deviations")
        return v


class ConceptLoraConfig(_Strict):
    """Diff-II concepts: per-class tokens + one shared UNet LoRA (paper: rank 10, 35k steps at lr 5e-5 on SD;
    scaled down for the tiny model)."""

    steps: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0)
    rank: int = Field(10, ge=1)
    batch_size: int = Field(8, ge=1)
    init_word: str = "the"


class InversionConfig(_Strict):
    steps: int = Field(50, ge=1, le=1000, description="DDIM inversion steps (paper: 200 on SD)")
    check_reconstruction: bool = True
    reconstruction_per_class: int | None = Field(None, ge=1, description="check the reconstruction (invert -> regenerate, "
                                                 "as many UNet passes again) on the first N train images of each class "
                                                 "only; None: every image")


class PromptsConfig(_Strict):
    """LLM prompt sets per class (DIAGen §2b): ask for per_class + 5, keep per_class."""

    per_class: int = Field(10, ge=1)
    uncommon_settings: bool = Field(False, description="use the 'uncommon settings' meta-prompt variant")
    top_up_offline: bool = Field(True, description="top up from the offline generator when the LLM yields fewer usable prompts "
                                                   "(counted in the class_prompts metadata and logged as a warning)")
    llm_seed: bool = Field(False, description="send the experiment seed as the API's `seed` (DIAGen sends none); "
                                              "models.llm.temperature likewise is sent only when set")


class MlflowConfig(_Strict):
    enabled: bool = True
    tracking_uri: str | None = Field(None, description="None: sqlite under the data dir; MLFLOW_TRACKING_URI overrides")
    experiment_name: str | None = None
    log_models: bool = True


class ChecksConfig(_Strict):
    """Asset checks (augment_dagster/assets/checks.py; severities in README "Asset checks")."""

    enabled: bool = Field(True, description="false: define no asset checks (each check is one more Dagster step per "
                                            "asset and partition, ~0.2 s each on a no-op rerun)")

    label_consistency_floor: float = Field(
        0.5, ge=0.0, le=1.0, description="synthetic/<m> label_consistency warns when the judge's accuracy on the "
                                         "synthetic images is below this fraction of its accuracy on the split's val images")
    label_consistency_alpha: float = Field(
        0.05, gt=0.0, le=1.0, description="label_consistency warns only when the shortfall is significant: one-sided exact "
                                          "binomial test p < alpha (1: any shortfall warns)")
    label_judge: Literal["auto", "classifier", "clip"] = Field(
        "auto", description="label_consistency judge: the split's real-only classifier, CLIP zero-shot (models.clip), "
                            "or auto: whichever is more accurate on the split's val images")
    balance_tolerance: float = Field(0.5, ge=0.0, description="synthetic/<m> class_balance warns when the largest per-class "
                                                              "count (per real train image) exceeds the smallest by more than this fraction")
    max_images: int = Field(256, ge=1, description="label_consistency scores at most this many synthetic images per partition")


class AutomationConfig(_Strict):
    enabled: bool = Field(True, description="false: the new-data sensor, the nightly schedule and the automation-condition "
                                            "sensor of this experiment start STOPPED (an example config that must not run "
                                            "by itself); they can still be turned on in the UI")
    schedule_cron: str = "0 2 * * *"
    sensor_interval_s: int = Field(60, ge=5)


class K8sExecutionConfig(_Strict):
    """Kubernetes settings for GPU assets (``dagster-k8s/config`` op tags; image for ``pipes_k8s``)."""

    gpu_limit: int = Field(1, ge=1, description="nvidia.com/gpu limit of a GPU asset's container")
    node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    tolerations: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    namespace: str | None = Field(None, description="pipes_k8s: namespace of the worker pod (None: the client's default)")
    image: str | None = Field(None, description="pipes_k8s: image of the worker pod (must contain augment_dagster)")
    store_pvc: str | None = Field(None, description="pipes_k8s: ReadWriteMany PVC mounted at the store root in the worker pod")


class ExecutionConfig(_Strict):
    """Where GPU work runs (ARCHITECTURE "Scale-out"). ``mode`` picks how diffusion ``synthetic/<method>`` assets
    execute: in the run process, in a Dagster Pipes subprocess, or in a Kubernetes pod via Pipes. ``executor``
    picks the code location's run executor (k8s_job / celery need the ``k8s`` / ``celery`` extras)."""

    mode: Literal["in_process", "pipes_subprocess", "pipes_k8s"] = "in_process"
    executor: Literal["in_process", "multiprocess", "k8s_job", "celery"] = "in_process"
    max_concurrent: int = Field(2, ge=1, description="multiprocess executor: processes (each imports torch)")
    devices: Literal["auto"] | list[str] = Field(
        "auto", description="device slots (augment_dagster/slots.py): 'auto' = every visible CUDA device, or on a "
        "CPU-only machine one slot per cpu_threads cores; or a list such as [cuda:0, cuda:2]. $AUGMENT_DEVICES / "
        "`augment run --devices` override it (e.g. 1 = one slot)")
    cpu_threads: int = Field(1, ge=1, description="torch threads of every worker, fixed so that results do not "
                             "depend on the number of slots")
    python: str | None = Field(None, description="pipes_subprocess: interpreter for the worker (None: this one)")
    k8s: K8sExecutionConfig = Field(default_factory=K8sExecutionConfig)
    celery_gpu_queue: str = Field("gpu", description="celery queue that GPU assets are routed to (run one worker with concurrency 1 on it)")
    celery_broker: str = Field("redis://127.0.0.1:6379/0", description="celery executor: broker URL")
    celery_backend: str = Field("redis://127.0.0.1:6379/1", description="celery executor: result backend URL")

    @field_validator("devices")
    @classmethod
    def _devices(cls, v):
        if isinstance(v, list):
            bad = [d for d in v if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", str(d))]
            if bad or not v:
                raise ValueError(f"execution.devices: {bad or v} are not devices; use auto or a list such as [cuda:0, cuda:1]")
        return v

    @model_validator(mode="after")
    def _k8s_image(self) -> "ExecutionConfig":
        if self.mode == "pipes_k8s" and not self.k8s.image:
            raise ValueError("execution.mode pipes_k8s needs execution.k8s.image (an image with augment_dagster installed)")
        return self
