"""Per-method generation protocol, data only (no torch, no Dagster, no registry): which sampler, how many steps,
which CFG scale, resolution, M and start rule a method entry generates with.

Resolution order, key by key (``resolve``; the registry's ``resolve_protocol(cfg, entry)`` calls it with the
entry's ``MethodSpec``): the method entry (``methods.<entry>.<key>``; M also as the method's own name for it,
e.g. Diff-II's ``params.expansion_rate``) → the experiment's ``generation`` block → the algorithm's paper default
(``MethodSpec.protocol``, METHODS.md §6) → the project default (DDIM, 25 steps, g 7.5, M 4, the model's
resolution). ``start_rule`` and ``preprocess`` are the entry's or the algorithm's: ``genie`` (noise to ⌊1000r⌋,
skip steps with t−1 > 1000r) for GeNIe/GeNIe-Ada, else ``sdedit`` (diffusers img2img: ``int(N·strength)`` steps).

A plan gives every unit its protocol fields with ``inputs.protocol.unit_fields(mode)``; nothing overwrites them
after planning.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

PROTOCOL_KEYS = ("scheduler", "steps", "guidance_scale", "resolution", "images_per_real")
# set on a method entry or taken from the algorithm (e.g. GeNIe's baselines on GeNIe's own start and crop)
ENTRY_ONLY_KEYS = ("start_rule", "preprocess")

StartRule = Literal["sdedit", "genie"]
Preprocess = Literal["resize", "center_crop"]  # init image -> square: squash | Resize + CenterCrop
VaeEncode = Literal["mode", "sample"]


@dataclass(frozen=True)
class Protocol:
    """An algorithm's paper defaults (None = no paper value: fall through to the project default)."""

    scheduler: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    images_per_real: int | None = None
    resolution: int | None = None
    start_rule: StartRule = "sdedit"
    preprocess: Preprocess = "resize"  # init image -> square: "resize" (squash) | "center_crop" (Resize + CenterCrop)
    # img2img z0: "mode" (posterior mean; GeNIe's latent_dist.mode()) | "sample" (a posterior draw from the unit's
    # seed before the noise draw: diffusers' StableDiffusionImg2ImgPipeline, which DA-Fusion/DIAGen's code runs)
    vae_encode: VaeEncode = "mode"
    note: str = ""  # the rest of the paper protocol, for status / README (e.g. "inversion DDIM 200 at g 1")
    guidance: str | None = None  # set when the method computes g per image (SGID: "f(s*)"); the scale is then unused
    count: str | None = None  # set when M is not "per real image" (GeNIe: "(C−1)·K per class"); M is then unused


PROJECT_DEFAULT = Protocol(scheduler="ddim", steps=25, guidance_scale=7.5, images_per_real=4, resolution=None)

# The protocol fields of a unit that runs no diffusion (mode "transform"): the values every unit recorded before
# the protocol existed, which SynthUnit.identity() leaves out (so their memo keys never moved).
NO_DIFFUSION: dict[str, Any] = dict(guidance_scale=7.5, steps=25, scheduler="ddim", start_rule="sdedit",
                                    resolution=None, preprocess="resize", vae_encode="mode")


@dataclass(frozen=True)
class ResolvedProtocol:
    """The protocol a method entry generates with (every key resolved) and where each key came from."""

    scheduler: str
    steps: int
    guidance_scale: float
    images_per_real: int
    resolution: int | None
    start_rule: StartRule
    preprocess: Preprocess = "resize"
    vae_encode: VaeEncode = "mode"
    sources: dict[str, str] = field(default_factory=dict)  # key -> where its value came from
    note: str = ""
    guidance: str | None = None
    count: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def unit_fields(self, mode: str) -> dict[str, Any]:
        """The protocol fields of a ``SynthUnit`` of ``mode``: sampler, steps, CFG scale and resolution for every
        diffusion unit; the start rule, init-image crop and z0 encoding only where there is an init image
        (img2img); a transform unit's are ``NO_DIFFUSION``."""
        if mode == "transform":
            return dict(NO_DIFFUSION)
        img2img = mode == "img2img"
        return dict(guidance_scale=self.guidance_scale, steps=self.steps, scheduler=self.scheduler,
                    resolution=self.resolution, start_rule=self.start_rule if img2img else "sdedit",
                    preprocess=self.preprocess if img2img else "resize", vae_encode=self.vae_encode if img2img else "mode")

    def summary(self) -> str:
        """One line, e.g. 'pndm 50 steps, g 7.5, M 10, start sdedit'."""
        res = f", {self.resolution}px" if self.resolution else ""
        g = self.guidance or f"{self.guidance_scale:g}"
        m = self.count or f"M {self.images_per_real}"
        vae = ", z0 posterior sample" if self.vae_encode == "sample" else ""
        return (f"{self.scheduler} {self.steps} steps, g {g}, {m}{res}, start {self.start_rule}{vae}"
                + (f"; paper: {self.note}" if self.note else ""))


def given(protocol: Protocol = PROJECT_DEFAULT, **keys) -> ResolvedProtocol:
    """``protocol`` with ``keys`` over it and the project default under its unset keys: the protocol of a plan run
    outside an experiment config (tests, notebooks). Sources say "given"."""
    p = {k: getattr(protocol, k) for k in PROTOCOL_KEYS + ENTRY_ONLY_KEYS + ("vae_encode", "note", "guidance", "count")}
    p = {k: v if v is not None else getattr(PROJECT_DEFAULT, k) for k, v in p.items()} | keys
    return ResolvedProtocol(**p, sources={k: "given" for k in PROTOCOL_KEYS + ENTRY_ONLY_KEYS})


def resolve(spec, params, cfg, entry_name: str) -> ResolvedProtocol:
    """The resolved protocol of method entry ``entry_name`` of experiment config ``cfg``, whose algorithm is
    ``spec`` (a ``MethodSpec``) and validated parameters ``params``."""
    entry = cfg.methods[entry_name]
    m_alias = getattr(type(params), "M_ALIAS", None)  # a method's own name for M (Diff-II: expansion_rate)
    paper = [(f"paper:{spec.name}", spec.protocol)] if spec.protocol is not PROJECT_DEFAULT else []
    levels: list[tuple[str, Any]] = [(f"methods.{entry_name}", entry), ("generation", cfg.generation)] + paper + [
        ("project", PROJECT_DEFAULT)]
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in PROTOCOL_KEYS + ENTRY_ONLY_KEYS:
        for where, obj in levels:
            if key in ENTRY_ONLY_KEYS and where == "generation":
                continue
            v = getattr(obj, key, None)
            if v is not None:
                values[key], sources[key] = v, where
                break
            if key == "images_per_real" and obj is entry and m_alias and getattr(params, m_alias, None) is not None:
                values[key], sources[key] = getattr(params, m_alias), f"methods.{entry_name}.params.{m_alias}"
                break
        else:
            values[key], sources[key] = None, "model"
    return ResolvedProtocol(
        scheduler=values["scheduler"], steps=int(values["steps"]), guidance_scale=float(values["guidance_scale"]),
        images_per_real=int(values["images_per_real"]), resolution=values["resolution"],
        start_rule=values["start_rule"], preprocess=values["preprocess"], vae_encode=spec.protocol.vae_encode,
        sources=sources, note=spec.protocol.note, guidance=spec.protocol.guidance, count=spec.protocol.count,
    )


def check_alias_agrees(entry_name: str, entry, params) -> None:
    """M set both on the entry and as the method's own name for it (``M_ALIAS``) must agree."""
    alias = getattr(type(params), "M_ALIAS", None)
    a, b = entry.images_per_real, getattr(params, alias, None) if alias else None
    if a is not None and b is not None and a != b:
        raise ValueError(f"methods.{entry_name}.images_per_real ({a}) and methods.{entry_name}.params.{alias} ({b}) "
                         "disagree; set one")
