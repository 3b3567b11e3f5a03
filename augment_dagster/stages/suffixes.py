"""Diff-II prompt suffixes (METHODS.md §3.4): at most 200 captions (sampled with the seed) are summarised by
an LLM (ALIA-style meta-prompt) into ≤10 suffixes of the form "a photo of a <metaclass> <suffix>".
The offline provider derives them from the captions themselves (their most frequent context phrases)."""
from __future__ import annotations

import random
import re
from collections import Counter

from ..llm import LLMClient, sanitize_prompt
from ..util import hash_obj

MAX_CAPTIONS = 200
MAX_SUFFIXES = 10
CONTEXT_WORDS = ("on", "in", "with", "at", "near", "under", "over", "behind", "against", "beside", "inside")


def suffix_meta_prompt(captions: list[str], prefix: str) -> list[dict[str, str]]:
    body = ("I have a set of image captions. Summarize them into objective descriptions of the scenes, actions, camera pose, "
            f"zoom and backgrounds. Output at most {MAX_SUFFIXES} captions of the form '{prefix} ...', one per line, e.g. "
            f"'{prefix} standing on a branch.' Do not mention the object's class.\nCaptions:\n" + "\n".join(f"- {c}" for c in captions))
    return [{"role": "system", "content": "You summarize image captions into short scene descriptions."},
            {"role": "user", "content": body}]


def frequent_context_phrases(captions: list[str], k: int = MAX_SUFFIXES) -> list[str]:
    """The most frequent phrases that start with a context word ('on a striped background', 'at night')."""
    counts: Counter[str] = Counter()
    for c in captions:
        words = re.findall(r"[a-z]+", c.lower())
        seen = set()
        for i, w in enumerate(words):
            if w not in CONTEXT_WORDS:
                continue
            for n in (2, 3, 4):
                if i + n <= len(words):
                    ph = " ".join(words[i:i + n])
                    if ph not in seen and words[i + n - 1] not in CONTEXT_WORDS + ("a", "an", "the"):
                        seen.add(ph)
                        counts[ph] += 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], -len(kv[0]), kv[0]))
    out: list[str] = []
    for ph, _ in ranked:
        if not any(ph in o or o in ph for o in out):
            out.append(ph)
        if len(out) >= k:
            break
    return out


def offline_suffix_answer(messages: list[dict[str, str]]) -> str:
    text = messages[-1]["content"]
    m = re.search(r"of the form '(.+?) \.\.\.'", text)
    prefix = m.group(1) if m else "a photo of a"
    caps = [l[2:] for l in text.split("Captions:\n", 1)[-1].splitlines() if l.startswith("- ")]
    return "\n".join(f"{prefix} {p}." for p in frequent_context_phrases(caps))


def parse_suffixes(text: str, prefix: str) -> list[str]:
    """Lines of the form '<prefix> <suffix>' (numbering/bullets/quotes tolerated) → suffix texts (≤10)."""
    out = []
    pat = re.compile(re.escape(prefix.lower()) + r"\s+(.+)$")
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:\d+\s*[.):-]|[-*•])\s*", "", line).strip().strip('"').strip("'").strip()
        m = pat.search(line.lower())
        if not m:
            continue
        start = m.start(1)
        suffix = sanitize_prompt(line[start:].rstrip(". "), 120)
        if suffix and suffix.lower() not in {s.lower() for s in out}:
            out.append(suffix)
    return out[:MAX_SUFFIXES]


def greedy_captions(captions) -> list[str]:
    """Diff-II's caption set: ONE greedy BLIP caption per train image (``get_suffix.py``), in image order, from the
    captions manifest (the beam / nucleus candidates there are SGID's)."""
    g = captions[captions["strategy"] == "greedy"].sort_values(["image_id", "idx"])
    if g.empty:
        raise ValueError("the captions manifest has no greedy captions: rematerialize captions")
    return list(g.groupby("image_id", sort=True)["caption"].first())


def suffix_rows(captions: list[str], metaclass: str, client: LLMClient, seed: int) -> list[dict]:
    """``captions``: one per image (:func:`greedy_captions`); at most 200 are sampled with the seed."""
    caps = list(captions)
    random.Random(hash_obj("suffix-captions", seed)).shuffle(caps)
    caps = caps[:MAX_CAPTIONS]
    prefix = f"a photo of a{'n' if metaclass[:1].lower() in 'aeiou' else ''} {metaclass}"
    msgs = suffix_meta_prompt(caps, prefix)
    if client.provider == "offline":
        text, source, rid, rh, model = offline_suffix_answer(msgs), "offline", "", hash_obj(caps)[:16], "offline-frequent-phrases"
        error = ""
    else:
        r = client.complete(msgs, seed=seed)
        text, source, rid, rh, model, error = r.text, r.source, r.response_id, r.response_hash, r.model, r.error
        if r.source == "offline-fallback":
            text, model = offline_suffix_answer(msgs), "offline-frequent-phrases"
    suffixes = parse_suffixes(text, prefix)
    return [{"idx": i, "suffix": s, "prompt": f"{prefix} {s}", "prompt_source": source, "provider": client.provider,
             "model": model, "response_id": rid, "response_hash": rh, "n_captions": len(caps), "llm_error": error}
            for i, s in enumerate(suffixes)]
