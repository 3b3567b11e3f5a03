"""Experiment configuration: a pydantic schema for one YAML file in ``assets_config/``, its loading and discovery.

Every section forbids unknown keys, so a typo is an error that names the key and the file.
Nothing here imports torch: Dagster's code server loads every config at start-up. The plain sections are in
``config_sections.py``, the ``training:`` section in ``config_training.py`` (recipes: ``training/recipes.py``);
import every class from here.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .config_sections import (  # noqa: F401 - the schema's sections, importable from here
    AutomationConfig, BuiltinDatasetConfig, ChecksConfig, ClassSplitConfig, ConceptLoraConfig, ConceptsConfig,
    DatasetConfig, ExecutionConfig, HFDatasetConfig, InversionConfig, K8sExecutionConfig, MlflowConfig,
    PromptsConfig, SplitsConfig, _Strict, parse_split_key, split_key)
from .config_training import (  # noqa: F401
    RECIPE_NAMES, TRAIN_AUG_NAMES, DiagenFilterConfig, EpisodesConfig, TrainingConfig)
from .errors import UserError
from .util import hash_obj

PACKAGE_ROOT = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_ROOT.parent
DEFAULT_CONFIG_DIR = PROJECT_ROOT / "assets_config"

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class ConfigError(UserError, ValueError):
    """A config file is invalid. The message names the file and the offending key."""


class ModelSource(_Strict):
    source: str = "tiny-random"
    revision: str | None = None


SchedulerName = Literal["ddim", "pndm", "dpmsolver", "euler"]


class DiffusionModelConfig(ModelSource):
    # the sampler is generation.scheduler (or methods.<entry>.scheduler); the field stays, always None, only so
    # config hashes (code versions) of older configs do not move
    scheduler: None = Field(None, exclude=False, description="removed: set generation.scheduler")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    channels_last: bool = Field(True, description="CUDA: UNet/VAE in channels_last memory format (SDPA attention is always on)")
    compile: bool = Field(False, description="torch.compile the UNet in place (CUDA; the first batch of each shape compiles)")

    @model_validator(mode="before")
    @classmethod
    def _moved_scheduler(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("scheduler") is not None:  # a dump of a parsed config carries None
            raise ValueError("scheduler moved: set generation.scheduler (every method) or "
                             "methods.<entry>.scheduler")
        return data


class ClassifierModelConfig(_Strict):
    source: str = Field("tiny-cnn", description="'tiny-cnn' (width 16, random init), 'tiny-cnn:<width>', 'tiny-pretrained' "
                        "(shipped TinyCNN backbone pretrained on the built-in pretrain pool), or a transformers vision "
                        "backbone (hub id or folder)")
    freeze_backbone: bool = False
    pretrained: bool = Field(True, description="false: a transformers backbone's architecture with random weights "
                                               "(trained from scratch, SGID's ResNet-50 rows); needs a full fine-tune")


class LLMConfig(_Strict):
    provider: Literal["offline", "openai"] = "offline"
    model: str = "offline-template-v1"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = Field(30.0, gt=0)
    max_retries: int = Field(4, ge=0)
    fallback_to_offline: bool = True
    temperature: float = Field(0.7, ge=0, le=2)
    offline_vocabulary: Literal["scenes", "builtin-shapes"] = Field(
        "scenes", description="words of the offline prompt generator (provider offline, the fallback and top-ups): "
                              "'scenes' (real-world adjectives, places, weather, times of day) or 'builtin-shapes' (the "
                              "built-in dataset's colours, backgrounds and 'at night': the words the tiny models know)")


class ModelsConfig(_Strict):
    diffusion: DiffusionModelConfig = Field(default_factory=DiffusionModelConfig)
    captioner: ModelSource = Field(default_factory=ModelSource)
    clip: ModelSource = Field(default_factory=ModelSource)
    classifier: ClassifierModelConfig = Field(default_factory=ClassifierModelConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    device: str = Field("auto", description="'auto' picks CUDA when present")


class GenerationConfig(_Strict):
    """Experiment-wide generation settings. The protocol keys (scheduler, steps, guidance_scale, resolution,
    images_per_real) are None = unset: a method entry's own value wins, then this block, then the algorithm's
    paper default (methods/protocol.py; METHODS.md §6)."""

    images_per_real: int | None = Field(None, ge=1, description="M: synthetic images per real train image")
    resolution: int | None = Field(None, ge=8, description="None = the model's native size")
    scheduler: SchedulerName | None = Field(None, description="sampler for every method (None: each method's paper sampler)")
    steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0)
    batch_size: int | Literal["auto"] = Field(
        32, description="requests per UNet call; 'auto': start at max_batch_size on CUDA (8 on CPU) and halve on "
                        "out-of-memory (the size used is recorded in the synthetic asset's metadata)")
    max_batch_size: int = Field(64, ge=1, description="starting size of batch_size: auto")
    negative_prompt: str = ""

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("batch_size must be a positive integer or 'auto'")
        return v


class MethodConfig(_Strict):
    """One entry under ``methods:``. ``method`` names the algorithm (defaults to the entry name), so
    variants/ablations are several entries pointing at one method with other ``params``.

    The protocol keys override the experiment's ``generation`` block and the algorithm's paper default
    (None = unset)."""

    method: str | None = None
    enabled: bool = True
    scheduler: SchedulerName | None = None
    steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0)
    resolution: int | None = Field(None, ge=8)
    images_per_real: int | None = Field(None, ge=1)
    start_rule: Literal["sdedit", "genie"] | None = Field(
        None, description="img2img start: sdedit (diffusers img2img) or genie (noise to ⌊1000r⌋, skip t−1 > 1000r); "
                          "None: the algorithm's (GeNIe's baselines: set genie to share GeNIe's generation setup)")
    preprocess: Literal["resize", "center_crop"] | None = Field(
        None, description="init image -> square: resize (squash) or center_crop (Resize + CenterCrop, GeNIe); None: the algorithm's")
    params: dict[str, Any] = Field(default_factory=dict)
    synthetic_probability: float | None = Field(None, ge=0, le=1, description="overrides training.synthetic_probability")
    training: dict[str, Any] = Field(default_factory=dict, description="overrides of training.* for this entry "
                                                                        "(key by key; 'recipe' picks another table)")


class ExperimentConfig(_Strict):
    experiment: str
    description: str = ""
    data_dir: str | None = Field(None, description="None: ./augment_data; $AUGMENT_DATA_DIR overrides")
    seed: int = 0
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    splits: SplitsConfig = Field(default_factory=SplitsConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    concepts: ConceptsConfig = Field(default_factory=ConceptsConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    concept_lora: ConceptLoraConfig = Field(default_factory=ConceptLoraConfig)
    inversion: InversionConfig = Field(default_factory=InversionConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    methods: dict[str, MethodConfig] = Field(default_factory=dict)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    automation: AutomationConfig = Field(default_factory=AutomationConfig)
    checks: ChecksConfig = Field(default_factory=ChecksConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)

    # filled by load_config, not part of the YAML
    source_path: str | None = Field(None, exclude=True)

    @field_validator("experiment")
    @classmethod
    def _exp_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("experiment must start with a letter and use only letters, digits and '_'")
        return v

    @field_validator("methods")
    @classmethod
    def _method_names(cls, v: dict[str, MethodConfig]) -> dict[str, MethodConfig]:
        for name in v:
            if not _NAME_RE.match(name):
                raise ValueError(f"method entry {name!r}: use letters, digits and '_' only")
        return v

    @model_validator(mode="after")
    def _check_methods(self) -> "ExperimentConfig":
        from .methods.registry import validate_method_entry  # no torch at import

        for name, entry in self.methods.items():
            validate_method_entry(name, entry)
            if entry.training:
                try:
                    self.training.resolved(entry.training)
                except ValidationError as e:
                    err = e.errors()[0]
                    loc = ".".join(str(x) for x in err.get("loc", ()))
                    msg = "unknown key" if err.get("type") == "extra_forbidden" else err.get("msg", "")
                    raise ValueError(f"methods.{name}.training.{loc}: {msg}") from None
        from .training.episode_rules import check_episode_comparison  # numpy/pandas only

        check_episode_comparison(self)
        return self

    # ---- derived -------------------------------------------------------------------------
    def enabled_methods(self) -> dict[str, MethodConfig]:
        return {k: v for k, v in self.methods.items() if v.enabled}

    def method_algorithm(self, name: str) -> str:
        entry = self.methods[name]
        return entry.method or name

    def training_for(self, name: str | None = None) -> TrainingConfig:
        """The resolved training settings of a method entry (None / 'real_only': the experiment's)."""
        if name is None or name not in self.methods:
            return self.training.resolved()
        return self.training.resolved(self.methods[name].training, self.method_algorithm(name))

    def resolved_data_dir(self) -> Path:
        """$AUGMENT_DATA_DIR (set by ``augment --data-dir``) > config ``data_dir`` > ./augment_data."""
        d = os.environ.get("AUGMENT_DATA_DIR") or self.data_dir or "augment_data"
        return Path(d).expanduser().resolve()

    def section_hash(self, *path: str) -> str:
        """Hash of one config block (for code_version): e.g. section_hash('methods', 'dafusion'). Keys added later
        (``_HASH_NEUTRAL``) count only when they differ from their default, so older configs keep their versions."""
        node: Any = _drop_neutral(self.model_dump(mode="json"))
        for p in path:
            node = node[p]
        return hash_obj(node)[:12]

    def config_hash(self) -> str:
        return hash_obj(_drop_neutral(self.model_dump(mode="json")))[:16]


# keys added after configs were first hashed, with their defaults (methods.<entry>.start_rule / preprocess,
# training.epoch_unit / synthetic_aug, models.classifier.pretrained): left out of the hashes while at the default
_HASH_NEUTRAL = {"start_rule": None, "preprocess": None, "epoch_unit": "steps", "synthetic_aug": "none", "pretrained": True}


def _drop_neutral(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _drop_neutral(v) for k, v in node.items() if not (k in _HASH_NEUTRAL and v == _HASH_NEUTRAL[k])}
    if isinstance(node, list):
        return [_drop_neutral(v) for v in node]
    return node


def _format_errors(err: ValidationError, path: str) -> str:
    lines = [f"invalid experiment config {path}:"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e.get("loc", ())) or "<root>"
        msg = e.get("msg", "")
        if e.get("type") == "extra_forbidden":
            msg = "unknown key (check spelling; see augment_dagster/config.py for the schema)"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: let the base loader report it
                continue
            if first is not None:
                raise ConfigError(f"key {key!r} is written twice (lines {first} and {key_node.start_mark.line + 1}); "
                                  "the second block would silently replace the first — merge them into one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | os.PathLike) -> ExperimentConfig:
    """Load and validate a YAML experiment config; errors name the file and the key."""
    from .errors import ConfigFileError

    path = Path(path)
    if not path.exists():
        raise ConfigFileError(f"config file {path} does not exist", hint="the file is missing: check the --config path "
                              "(the shipped examples are in assets_config/, e.g. assets_config/demo.yaml)")
    if path.is_dir():
        yamls = sorted(p.name for p in path.glob("*.yaml"))[:5]
        raise ConfigFileError(f"--config {path} is a folder, not a YAML file"
                              + (f" (it holds {', '.join(yamls)})" if yamls else ""),
                              hint="pass one experiment YAML file, e.g. --config " + str(path / (yamls[0] if yamls else "demo.yaml")))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigFileError(f"config file {path} is not UTF-8 text (byte {e.start}): not a YAML file?") from None
    except OSError as e:
        raise ConfigFileError(f"config file {path} cannot be read: {e.strerror}") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping with at least 'experiment:'")
    return parse_config(raw, str(path))


def parse_config(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
    except ValueError as e:  # raised by method validation
        raise ConfigError(f"invalid experiment config {source}:\n  - {e}") from None
    cfg.source_path = source if source != "<dict>" else None
    return cfg


def discover_configs(config_dir: str | os.PathLike | None = None) -> list[ExperimentConfig]:
    """Every *.yaml in the config folder (default: $AUGMENT_CONFIG_DIR or ./assets_config)."""
    d = Path(config_dir or os.environ.get("AUGMENT_CONFIG_DIR") or DEFAULT_CONFIG_DIR)
    cfgs = [load_config(p) for p in sorted(d.glob("*.yaml"))]
    names = [c.experiment for c in cfgs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"{d}: experiment names must be unique, repeated: {sorted(dup)}")
    return cfgs
