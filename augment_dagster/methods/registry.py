"""Registry of methods: name -> MethodSpec, and each config entry's resolved generation protocol. Importing it
loads no torch."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pydantic import ValidationError

from .protocol import ResolvedProtocol, check_alias_agrees, resolve

if TYPE_CHECKING:
    from .base import MethodSpec

# protocol keys an older config wrote under a method's params: now one level up, on the entry
_MOVED_PARAMS = ("steps", "guidance_scale", "images_per_real")

# module that defines each method's SPEC(s); adding a method = one module + one line here
_MODULES = ("baselines", "dafusion", "diagen", "diff_ii", "genie", "sgid", "standard_method")

_REGISTRY: dict[str, "MethodSpec"] = {}


def _load() -> dict[str, "MethodSpec"]:
    if not _REGISTRY:
        for mod in _MODULES:
            m = importlib.import_module(f"{__package__}.{mod}")
            for spec in getattr(m, "SPECS", ()):
                if spec.name in _REGISTRY:
                    raise RuntimeError(f"method {spec.name!r} registered twice")
                _REGISTRY[spec.name] = spec
    return _REGISTRY


def get_method(name: str) -> "MethodSpec":
    reg = _load()
    if name not in reg:
        raise KeyError(f"unknown method {name!r}; available: {sorted(reg)}")
    return reg[name]


def available_methods() -> list[str]:
    return sorted(_load())


def validate_method_entry(entry_name: str, entry) -> None:
    """Check that a config entry names a known method and that its params validate."""
    algo = entry.method or entry_name
    reg = _load()
    moved = [k for k in _MOVED_PARAMS if k in entry.params]
    if moved:
        raise ValueError("; ".join(f"methods.{entry_name}.params.{k} moved: set methods.{entry_name}.{k}" for k in moved))
    if algo not in reg:
        raise ValueError(f"methods.{entry_name}: unknown method {algo!r}; available: {sorted(reg)}")
    try:
        params = reg[algo].Params.model_validate(entry.params)
    except ValidationError as e:
        msgs = "; ".join(f"methods.{entry_name}.params.{'.'.join(map(str, x['loc']))}: "
                         f"{'unknown key' if x['type'] == 'extra_forbidden' else x['msg']}" for x in e.errors())
        raise ValueError(msgs) from None
    check_alias_agrees(entry_name, entry, params)


def method_params(entry_name: str, entry):
    algo = entry.method or entry_name
    return get_method(algo).Params.model_validate(entry.params)


def resolve_protocol(cfg, entry_name: str) -> ResolvedProtocol:
    """The resolved generation protocol of method entry ``entry_name`` of experiment config ``cfg``
    (methods/protocol.py: entry, then ``generation``, then the algorithm's paper default, then the project's)."""
    entry = cfg.methods[entry_name]
    return resolve(get_method(cfg.method_algorithm(entry_name)), method_params(entry_name, entry), cfg, entry_name)


def protocol_lines(cfg) -> list[str]:
    """One line per enabled diffusion method entry: its resolved protocol and where each key came from."""
    out = []
    for name in cfg.enabled_methods():
        if not get_method(cfg.method_algorithm(name)).uses_diffusion:
            continue
        p = resolve_protocol(cfg, name)
        src = ", ".join(f"{k}<-{v}" for k, v in p.sources.items() if v not in ("project", "model"))
        out.append(f"{name}: {p.summary()}" + (f"  [{src}]" if src else ""))
    return out
