"""The stage table: the one list of upstream stages a method may need (no Dagster, no torch).

A method's ``MethodSpec.needs`` names entries of ``STAGES``. The same table gives the registry its valid names,
``MethodInputs`` its fields, the asset factory which stage assets to build (with the stages they read), and the
checks which stages get a ``<asset>_present`` check. Adding a stage = one row here + its body module in this
package + its asset module under ``defs/assets/`` (see CONTRIBUTING.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Stage:
    name: str  # the name a MethodSpec lists in ``needs``; also the ``MethodInputs`` field
    asset: str  # its asset name under ``<experiment>/``
    requires: tuple[str, ...] = ()  # stages it reads (built whenever it is)
    present_check: bool = True  # an ERROR check "<asset>_present": a non-empty manifest
    description: str = ""


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("concepts", "concept_embeddings", description="textual-inversion embedding of each class (DA-Fusion, DIAGen)"),
    Stage("captions", "captions", description="one BLIP caption per real train image (SGID, Diff-II suffixes)"),
    Stage("class_prompts", "class_prompts", description="LLM / offline prompts per class (DIAGen)"),
    Stage("prompt_suffixes", "prompt_suffixes", requires=("captions",),
          description="prompt suffixes summarised from the captions (Diff-II)"),
    Stage("concept_lora", "concept_lora", description="per-class concept tokens + UNet LoRA (Diff-II)"),
    Stage("inversion_pool", "inversion_pool", requires=("concept_lora",),
          description="DDIM inversions of the real train images under the concept LoRA (Diff-II)"),
    Stage("real_classifier", "real_classifier", present_check=False,
          description="the split's real-only classifier (GeNIe-Ada's noise search, filters)"),
)}


def unknown(needs) -> list[str]:
    """Names in ``needs`` that are not stages."""
    return [n for n in needs if n not in STAGES]


def with_requirements(needs) -> list[str]:
    """``needs`` plus every stage they require, in table order."""
    todo, seen = list(needs), set()
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(STAGES[n].requires)
    return [n for n in STAGES if n in seen]


@dataclass
class StageStats:
    """computed/reused counts and seconds of one memoized stage."""

    computed: int = 0
    reused: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
