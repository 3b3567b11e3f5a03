"""LLM prompt sets per class (DIAGen §2b): meta-prompt → numbered lines → keep lines that contain the
class name → replace it with ``{name}`` → shuffle with the seed → keep P. Class names are asked and matched
with ``_`` → space (``cell_phone`` → "cell phone"). A class with fewer than P usable prompts is topped up from the
offline generator (``prompt_source = offline-topup``; counted by :func:`topup_counts`). No Dagster."""
from __future__ import annotations

import random

from ..llm import LLMClient, LLMError, diagen_meta_prompt, offline_class_prompts, parse_numbered_prompts, sanitize_prompt
from ..util import hash_obj


class NotEnoughPromptsError(LLMError):
    pass


def class_prompt_rows(class_names: list[str], client: LLMClient, per_class: int, seed: int, uncommon: bool = False,
                      top_up_offline: bool = True) -> list[dict]:
    rows = []
    for label in class_names:
        name = label.replace("_", " ")
        resp = client.complete(diagen_meta_prompt(label, per_class + 5, uncommon), seed=seed)
        templates = parse_numbered_prompts(resp.text, name)
        templates = list(dict.fromkeys(templates))  # drop duplicates, keep order
        random.Random(hash_obj("prompt-shuffle", seed, label)).shuffle(templates)
        source = resp.source
        items = [(t, source) for t in templates[:per_class]]
        if len(items) < per_class:
            if not top_up_offline:
                raise NotEnoughPromptsError(
                    f"the LLM ({client.provider}/{client.model}) gave {len(items)} usable prompts for class {label!r}, "
                    f"{per_class} needed (prompts.per_class); set prompts.top_up_offline: true or fix the model/base_url")
            extra = [p.replace(name, "{name}") for p in offline_class_prompts(name, per_class * 3, seed, uncommon,
                                                                             client.offline_vocabulary)]
            for t in extra:
                if len(items) >= per_class:
                    break
                if t not in {i[0] for i in items}:
                    items.append((t, "offline-topup"))
        for idx, (t, src) in enumerate(items):
            t = sanitize_prompt(t)
            rows.append({"label": label, "idx": idx, "template": t, "prompt": t.replace("{name}", name),
                         "prompt_source": src, "provider": client.provider, "model": resp.model,
                         "response_id": resp.response_id, "response_hash": resp.response_hash,
                         "variant": "uncommon" if uncommon else "common", "llm_error": resp.error})
    return rows


def topup_counts(rows: list[dict]) -> dict[str, int]:
    """label -> how many of its prompts are offline top-ups (templates, not the LLM's)."""
    out: dict[str, int] = {}
    for r in rows:
        if r["prompt_source"] == "offline-topup":
            out[r["label"]] = out.get(r["label"], 0) + 1
    return out
