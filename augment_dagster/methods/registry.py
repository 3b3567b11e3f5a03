"""Registry of methods: name -> MethodSpec. Importing it loads no torch."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pydantic import ValidationError

if TYPE_CHECKING:
    from .base import MethodSpec

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
    if algo not in reg:
        raise ValueError(f"methods.{entry_name}: unknown method {algo!r}; available: {sorted(reg)}")
    try:
        params = reg[algo].Params.model_validate(entry.params)
    except ValidationError as e:
        msgs = "; ".join(f"methods.{entry_name}.params.{'.'.join(map(str, x['loc']))}: "
                         f"{'unknown key' if x['type'] == 'extra_forbidden' else x['msg']}" for x in e.errors())
        raise ValueError(msgs) from None
    from .protocol import check_params_agree

    check_params_agree(entry_name, entry, params)


def method_params(entry_name: str, entry):
    algo = entry.method or entry_name
    return get_method(algo).Params.model_validate(entry.params)
