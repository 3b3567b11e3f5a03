"""Unit memo: ``key -> record`` where key = hash(function name + version, model fingerprint, params,
input content hashes, seed). A record is a small JSON file under ``<root>/memo/ab/<key>.json`` that
points at blobs; it is written atomically *after* its blobs, so a record always refers to complete
blobs and a killed run simply recomputes the units that have no record yet.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..util import atomic_write_text, canonical_json, hash_obj


COMPUTED_ON = "_computed_on"


def memo_key(fn: str, version: str, *, model: str = "", params: Any = None, inputs: Any = None, seed: Any = None) -> str:
    """The memo key of one unit of work. Every argument that changes the output must be in here."""
    return hash_obj({"fn": fn, "version": version, "model": model, "params": params, "inputs": inputs, "seed": seed})


class Memo:
    def __init__(self, root: str | os.PathLike):
        self.dir = Path(root) / "memo"
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        p = self._path(key)
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            self.misses += 1
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            # cannot happen with atomic writes, but never trust a bad record: recompute
            self.misses += 1
            return None
        self.hits += 1
        rec.pop(COMPUTED_ON, None)
        return rec

    def computed_on(self, key: str) -> dict[str, Any] | None:
        """Where the unit was computed (``{"slot", "device", "host"}``; slots.py), if recorded."""
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8")).get(COMPUTED_ON)
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def put(self, key: str, record: dict[str, Any]) -> dict[str, Any]:
        """Store ``record``; returns it as a later ``get`` will (JSON round trip), so a cold run and a cached
        rerun build byte-identical manifests."""
        from ..slots import computed_on

        text = canonical_json(record)
        on = computed_on()  # the device slot, kept in the file only: never in a key, never in a manifest row
        atomic_write_text(self._path(key), canonical_json({**record, COMPUTED_ON: on}) if on else text)
        return json.loads(text)

    def __contains__(self, key: str) -> bool:
        return self._path(key).exists()
