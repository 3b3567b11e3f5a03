"""LoRA adapters on the ONE UNet of a process (peft through diffusers' ``PeftAdapterMixin``).

A LoRA variant of a pipeline is an adapter on the bundle's own UNet, never a copy of the UNet (SD-1.5's UNet is
3.4 GB in fp32). The UNet's resting state is "all adapters disabled" — exactly the base model — and a caller
that wants a LoRA switches it on only around its own UNet calls with :func:`active`. When the last adapter is
deleted the peft wrappers are unloaded too, so the UNet's modules and state-dict keys are the base model's again.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def adapter_names(unet) -> list[str]:
    """Names of the adapters attached to ``unet`` ([] for a plain model)."""
    return list((getattr(unet, "peft_config", None) or {}).keys())


def add_lora(unet, name: str, rank: int, state: dict[str, Any] | None = None) -> None:
    """Attach a rank-``rank`` LoRA named ``name`` on the attention projections (gaussian init, or ``state``);
    the adapter is left disabled unless the caller activates it."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    if name in adapter_names(unet):
        remove(unet, name)
    import warnings

    with warnings.catch_warnings():  # peft: "Already found a `peft_config` ... multiple adapters" — the design here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`", category=UserWarning)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS),
                         adapter_name=name)
    if state is not None:
        p = next(unet.parameters())
        res = set_peft_model_state_dict(unet, {k: v.to(p.device, p.dtype) for k, v in state.items()}, adapter_name=name)
        bad = [k for k in (getattr(res, "unexpected_keys", None) or []) if "lora" in k]
        if bad:
            remove(unet, name)
            raise ValueError(f"LoRA state does not fit this UNet (unexpected keys, e.g. {bad[0]})")
    unet.disable_adapters()


def remove(unet, name: str) -> None:
    """Delete adapter ``name``; with no adapter left, unload the peft wrappers (the plain base UNet again)."""
    if name in adapter_names(unet):
        import warnings

        with warnings.catch_warnings():  # peft: "Adapter ... was active which is now deleted" — expected here
            warnings.simplefilter("ignore", UserWarning)
            unet.delete_adapters(name)
    if adapter_names(unet):
        unet.disable_adapters()
        return
    from diffusers.utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(unet)  # the peft wrappers of deleted adapters stay otherwise
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(unet, attr):
            delattr(unet, attr) if attr == "peft_config" else setattr(unet, attr, None)


@contextmanager
def active(unet, name: str | None) -> Iterator[None]:
    """Within the block, ``unet`` runs with adapter ``name`` only (``None``: the base model, all adapters off);
    afterwards every adapter is disabled again."""
    names = adapter_names(unet)
    if name is not None and name not in names:
        raise KeyError(f"no adapter {name!r} on this UNet (has {names})")
    if not names:
        yield
        return
    try:
        if name is None:
            unet.disable_adapters()
        else:
            unet.enable_adapters()
            unet.set_adapters(name)
        yield
    finally:
        unet.disable_adapters()
