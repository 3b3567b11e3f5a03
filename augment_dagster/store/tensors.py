"""Tensors as safetensors bytes for the content-addressed store (one tensor, or a dict of tensors)."""
from __future__ import annotations


def tensor_bytes(t) -> bytes:
    from safetensors.torch import save

    return save({"tensor": t.detach().cpu().contiguous()})


def tensor_from_bytes(b: bytes):
    from safetensors.torch import load

    return load(b)["tensor"]


def tensor_dict_bytes(d: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in d.items()})


def tensor_dict_from_bytes(b: bytes) -> dict:
    from safetensors.torch import load

    return load(b)
