"""Per-method generation protocol (no torch, no Dagster): which sampler, how many steps, which CFG scale,
resolution, M and start rule a method entry generates with.

Resolution order, key by key: the method entry (``methods.<entry>.<key>``, or the older
``methods.<entry>.params.<key>``) → the experiment's ``generation`` block (``generation.scheduler``, then the
legacy ``models.diffusion.scheduler``) → the algorithm's paper default (``MethodSpec.protocol``, METHODS.md §6)
→ the project default (DDIM, 25 steps, g 7.5, M 4, the model's resolution). ``start_rule`` is the algorithm's:
``genie`` (noise to ⌊1000r⌋, skip steps with t−1 > 1000r) for GeNIe/GeNIe-Ada, else ``sdedit`` (diffusers
img2img: ``int(N·strength)`` steps).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PROTOCOL_KEYS = ("scheduler", "steps", "guidance_scale", "resolution", "images_per_real")
# set on a method entry or taken from the algorithm (e.g. GeNIe's baselines on GeNIe's own start and crop)
ENTRY_ONLY_KEYS = ("start_rule", "preprocess")


@dataclass(frozen=True)
class Protocol:
    """An algorithm's paper defaults (None = no paper value: fall through to the project default)."""

    scheduler: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    images_per_real: int | None = None
    resolution: int | None = None
    start_rule: str = "sdedit"
    preprocess: str = "resize"  # init image -> square: "resize" (squash) | "center_crop" (Resize + CenterCrop)
    # img2img z0: "mode" (posterior mean; GeNIe's latent_dist.mode()) | "sample" (a posterior draw from the unit's
    # seed before the noise draw: diffusers' StableDiffusionImg2ImgPipeline, which DA-Fusion/DIAGen's code runs)
    vae_encode: str = "mode"
    note: str = ""  # the rest of the paper protocol, for status / README (e.g. "inversion DDIM 200 at g 1")
    guidance: str | None = None  # set when the method computes g per image (SGID: "f(s*)"); the scale is then unused
    count: str | None = None  # set when M is not "per real image" (GeNIe: "(C−1)·K per class"); M is then unused


PROJECT_DEFAULT = Protocol(scheduler="ddim", steps=25, guidance_scale=7.5, images_per_real=4, resolution=None)


@dataclass
class ResolvedProtocol:
    scheduler: str
    steps: int
    guidance_scale: float
    images_per_real: int
    resolution: int | None
    start_rule: str
    preprocess: str = "resize"
    vae_encode: str = "mode"
    sources: dict[str, str] = field(default_factory=dict)  # key -> where its value came from
    note: str = ""
    guidance: str | None = None
    count: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line, e.g. 'pndm 50 steps, g 7.5, M 10, start sdedit'."""
        res = f", {self.resolution}px" if self.resolution else ""
        g = self.guidance or f"{self.guidance_scale:g}"
        m = self.count or f"M {self.images_per_real}"
        vae = ", z0 posterior sample" if self.vae_encode == "sample" else ""
        return (f"{self.scheduler} {self.steps} steps, g {g}, {m}{res}, start {self.start_rule}{vae}"
                + (f"; paper: {self.note}" if self.note else ""))


def resolve_protocol(cfg, entry_name: str) -> ResolvedProtocol:
    """The resolved protocol of method entry ``entry_name`` of experiment config ``cfg``."""
    from .registry import get_method, method_params

    entry = cfg.methods[entry_name]
    spec = get_method(cfg.method_algorithm(entry_name))
    params = method_params(entry_name, entry)
    g = cfg.generation
    levels: list[tuple[str, Any]] = [
        (f"methods.{entry_name}", entry),
        (f"methods.{entry_name}.params", params),
        ("generation", g),
        ("models.diffusion", cfg.models.diffusion),
    ] + ([(f"paper:{spec.name}", spec.protocol)] if spec.protocol is not PROJECT_DEFAULT else []) + [
        ("project", PROJECT_DEFAULT),
    ]
    m_alias = getattr(type(params), "M_ALIAS", None)  # a method's own name for M (Diff-II: expansion_rate)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in PROTOCOL_KEYS + ENTRY_ONLY_KEYS:
        for where, obj in levels:
            if where == "models.diffusion" and key != "scheduler":
                continue
            if key in ENTRY_ONLY_KEYS and where not in (f"methods.{entry_name}", f"paper:{spec.name}", "project"):
                continue
            v = getattr(obj, key, None)
            if v is None and key == "images_per_real" and obj is params and m_alias:
                v, where = getattr(params, m_alias, None), f"{where}.{m_alias}"
            if v is not None:
                values[key], sources[key] = v, where
                break
        else:
            values[key], sources[key] = None, "model"
    return ResolvedProtocol(
        scheduler=values["scheduler"], steps=int(values["steps"]), guidance_scale=float(values["guidance_scale"]),
        images_per_real=int(values["images_per_real"]), resolution=values["resolution"],
        start_rule=values["start_rule"], preprocess=values["preprocess"], vae_encode=spec.protocol.vae_encode,
        sources=sources, note=spec.protocol.note,
        guidance=spec.protocol.guidance, count=spec.protocol.count,
    )


def check_params_agree(entry_name: str, entry, params) -> None:
    """A key set both on the entry and in its params must agree (else a ValueError naming both)."""
    alias = getattr(type(params), "M_ALIAS", None)
    pairs = [(k, k) for k in ("steps", "guidance_scale", "images_per_real")] + ([("images_per_real", alias)] if alias else [])
    for key, pkey in pairs:
        a, b = getattr(entry, key, None), getattr(params, pkey, None)
        if a is not None and b is not None and a != b:
            raise ValueError(f"methods.{entry_name}.{key} ({a}) and methods.{entry_name}.params.{pkey} ({b}) disagree; "
                             "set one")


def apply_protocol(units, proto: ResolvedProtocol) -> None:
    """Stamp the resolved sampler / resolution / start rule on every planned diffusion unit."""
    for u in units:
        if u.mode == "transform":
            continue
        u.scheduler = proto.scheduler
        u.resolution = proto.resolution
        u.start_rule = proto.start_rule if u.mode == "img2img" else "sdedit"
        u.preprocess = proto.preprocess if u.mode == "img2img" else "resize"
        u.vae_encode = proto.vae_encode if u.mode == "img2img" else "mode"


def protocol_lines(cfg) -> list[str]:
    """One line per enabled diffusion method entry: its resolved protocol and where each key came from."""
    from .registry import get_method

    out = []
    for name in cfg.enabled_methods():
        if not get_method(cfg.method_algorithm(name)).uses_diffusion:
            continue
        p = resolve_protocol(cfg, name)
        src = ", ".join(f"{k}<-{v}" for k, v in p.sources.items() if v not in ("project", "model"))
        out.append(f"{name}: {p.summary()}" + (f"  [{src}]" if src else ""))
    return out
