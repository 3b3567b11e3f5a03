"""One LLM interface, two providers.

* ``openai``: the official ``openai`` client against any OpenAI-compatible server (``base_url``), model by
  name; the API key is read from the environment variable named by ``api_key_env`` *at call time* and is
  never stored, logged or hashed into keys. Timeouts, retries with exponential backoff on 429/5xx/timeouts/
  connection errors, and a response cache in the store keyed by (provider, model, base_url, messages,
  params), so reruns never call the API again.
* ``offline``: a deterministic generator (word lists, seeded by the request) that answers the project's
  meta-prompts in the same numbered-list format an LLM would; recorded as ``prompt_source=offline``.

When the API keeps failing, ``complete`` falls back to offline only if ``fallback_to_offline`` is set, and
the result says which source produced the text.
"""
from __future__ import annotations

import os
import random
import re
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .util import atomic_write_text, canonical_json, hash_obj

MAX_PROMPT_CHARS = 300


class LLMError(UserError, RuntimeError):
    pass


class MissingAPIKeyError(LLMError):
    pass


@dataclass
class LLMResponse:
    text: str
    source: str  # "openai" | "offline" | "offline-fallback" | "cache:<source>"
    model: str
    response_id: str
    response_hash: str
    error: str = ""


def sanitize_prompt(text: str, max_chars: int = MAX_PROMPT_CHARS) -> str:
    """LLM output is data: strip control/format characters, collapse whitespace, cap the length."""
    text = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in str(text))
    text = re.sub(r"\s+", " ", text).strip()
    return text[:max_chars].rstrip()


# ------------------------------------------------------------------ offline generator
# Word lists of the offline generator, by ``models.llm.offline_vocabulary``. "scenes" answers like a chat LLM
# asked DIAGen's meta-prompt about real-world objects; "builtin-shapes" uses only the built-in dataset's own
# attribute words (colours, "on a <texture> background", "at night"), the words the embedded tiny models were
# trained on: the tiny text encoder has never seen "mountain" or "fog" (they are split into characters), and SD
# prompts it cannot read turn into off-class noise (README "Demo settings").
from .data.builtin import COLOURS, COMMON_TEXTURES, UNCOMMON_TEXTURES  # noqa: E402

VOCABULARIES: dict[str, dict[str, list[str]]] = {
    "scenes": {
        "adjectives": ["red", "small", "large", "shiny", "striped", "bright", "dark", "pale", "tiny", "glossy", "dusty",
                       "colorful"],
        "prepositions": ["in", "on", "near", "under", "beside", "behind"],
        "locations": ["a forest", "a beach", "a city street", "a desert", "a kitchen", "a meadow", "a parking lot",
                      "a mountain"],
        "weather": [f"in {w}" for w in ["rain", "snow", "fog", "sunshine", "a storm", "mist"]],
        "times": ["at night", "at dawn", "at dusk", "in the morning", "at noon", "in the evening"],
        "uncommon": ["on the moon", "under water", "inside a snow globe", "in a volcano", "on a chessboard",
                     "in outer space"],
    },
    "builtin-shapes": {
        "adjectives": list(COLOURS),
        "prepositions": [],
        "locations": [f"on a {t} background" for t in COMMON_TEXTURES],
        "weather": [],
        "times": ["at night"],
        "uncommon": [f"on a {t} background" for t in UNCOMMON_TEXTURES],
    },
}
OFFLINE_MODELS = {"scenes": "offline-template-v1", "builtin-shapes": "offline-shapes-v1"}


def offline_words(vocabulary: str) -> dict[str, list[str]]:
    """The word lists of one offline vocabulary; an unknown name is an LLMError naming the config key."""
    if vocabulary not in VOCABULARIES:
        raise LLMError(f"unknown offline vocabulary {vocabulary!r} (models.llm.offline_vocabulary): "
                       f"use one of {sorted(VOCABULARIES)}")
    return VOCABULARIES[vocabulary]


def offline_class_prompts(class_name: str, n: int, seed: int, uncommon: bool = False,
                          vocabulary: str = "scenes") -> list[str]:
    """DIAGen template 'a photo of a [adjective] <cls> [location] [weather] [time of day]', varying which optional
    slots are filled (the edge-case variant: 'a photo of a <cls> [uncommon location] [time]'); deterministic in
    (class_name, n, seed, uncommon, vocabulary). Fewer than ``n`` when the vocabulary has fewer distinct prompts."""
    words = offline_words(vocabulary)
    salt = () if vocabulary == "scenes" else (vocabulary,)  # the scenes generator keeps its earlier seeds
    rng = random.Random(hash_obj("offline-prompts", class_name, seed, uncommon, *salt))
    slots_of = [s for s, key in (("adj", "adjectives"), ("weather", "weather"), ("location", "locations"),
                                 ("time", "times")) if words[key]]
    out, seen = [], set()
    tries = 0
    while len(out) < n and tries < n * 50:
        tries += 1
        if uncommon:
            p = f"a photo of a {class_name} {rng.choice(words['uncommon'])}"
            if rng.random() < 0.5:
                p += f" {rng.choice(words['times'])}"
        else:
            k = rng.randint(1, len(slots_of))  # number of optional slots filled
            slots = rng.sample(slots_of, k)
            p = "a photo of a " + (f"{rng.choice(words['adjectives'])} " if "adj" in slots else "") + class_name
            if "location" in slots:
                prep = f"{rng.choice(words['prepositions'])} " if words["prepositions"] else ""
                p += f" {prep}{rng.choice(words['locations'])}"
            if "weather" in slots:
                p += f" {rng.choice(words['weather'])}"
            if "time" in slots:
                p += f" {rng.choice(words['times'])}"
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def offline_answer(messages: list[dict[str, str]], seed: int = 0, vocabulary: str = "scenes") -> str:
    """Answer a project meta-prompt offline. Understands the DIAGen class-prompt request
    (``for class {name}`` / ``give me N prompts``); anything else gets an echo-free empty list."""
    text = "\n".join(m.get("content", "") for m in messages)
    m = re.search(r"give me (\d+) prompts (?:of this structure )?for class ([^,\n]+?)(?:, as a numbered list|[.\n]|$)",
                  text, re.I)
    if m:
        name, n = m.group(2).strip(), int(m.group(1))
        prompts = offline_class_prompts(name, n, seed, uncommon="[uncommon location]" in text.lower(), vocabulary=vocabulary)
        return "\n".join(f"{i + 1}. {p}" for i, p in enumerate(prompts))
    return ""


# ------------------------------------------------------------------ client
class LLMClient:
    def __init__(self, provider: str = "offline", model: str = "offline-template-v1", base_url: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 30.0, max_retries: int = 4,
                 fallback_to_offline: bool = True, temperature: float | None = None,
                 cache_dir: str | os.PathLike | None = None, backoff_s: float = 0.5, send_seed: bool = False,
                 offline_vocabulary: str = "scenes"):
        self.provider, self.model, self.base_url = provider, model, base_url
        self.api_key_env, self.timeout_s, self.max_retries = api_key_env, timeout_s, max_retries
        self.fallback_to_offline, self.temperature, self.backoff_s = fallback_to_offline, temperature, backoff_s
        self.send_seed = send_seed  # the API gets `temperature` / `seed` only when configured (else its defaults)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        offline_words(offline_vocabulary)  # fail at construction, not at the first offline answer
        self.offline_vocabulary = offline_vocabulary  # word lists of the offline provider, fallback and top-ups
        self.calls = 0  # real API calls made (for tests and metadata)

    @classmethod
    def from_config(cls, llm_cfg, cache_dir=None, send_seed: bool = False) -> "LLMClient":
        """``temperature`` is sent only when the config file sets ``models.llm.temperature`` (DIAGen's and Diff-II's
        scripts use the API default); ``send_seed``: pass the request seed to the API."""
        temperature = llm_cfg.temperature if "temperature" in llm_cfg.model_fields_set else None
        return cls(provider=llm_cfg.provider, model=llm_cfg.model, base_url=llm_cfg.base_url, api_key_env=llm_cfg.api_key_env,
                   timeout_s=llm_cfg.timeout_s, max_retries=llm_cfg.max_retries,
                   fallback_to_offline=llm_cfg.fallback_to_offline, temperature=temperature, cache_dir=cache_dir,
                   send_seed=send_seed, offline_vocabulary=llm_cfg.offline_vocabulary)

    def check_ready(self) -> None:
        """Fail fast (before any GPU work) when the openai provider has no key and no fallback."""
        if self.provider == "openai" and not os.environ.get(self.api_key_env) and not self.fallback_to_offline:
            raise MissingAPIKeyError(
                f"models.llm.provider is 'openai' but the environment variable {self.api_key_env} is not set; "
                f"export it, or set models.llm.provider: offline (or fallback_to_offline: true)")

    def _where(self) -> str:
        """Where a request went, for error messages: the base URL and the model (never the key)."""
        return f"{self.base_url or 'the OpenAI default URL'} (models.llm.base_url), model {self.model!r} (models.llm.model)"

    def _cache_key(self, messages, seed) -> str:
        # the key never contains the API key; the default vocabulary keeps the keys of earlier caches
        vocab = () if self.offline_vocabulary == "scenes" else (self.offline_vocabulary,)
        return hash_obj("llm", self.provider, self.model, self.base_url, messages,
                        {"temperature": self.temperature, "seed": seed, "send_seed": self.send_seed}, *vocab)

    def complete(self, messages: list[dict[str, str]], seed: int = 0) -> LLMResponse:
        key = self._cache_key(messages, seed)
        cached = self._cache_get(key)
        if cached is not None:
            return LLMResponse(**{**cached, "source": f"cache:{cached['source']}"})
        if self.provider == "offline":
            resp = self._offline(messages, seed, "offline")
        elif self.provider == "openai":
            try:
                resp = self._openai(messages, seed)
            except LLMError as e:
                if not self.fallback_to_offline:
                    raise
                resp = self._offline(messages, seed, "offline-fallback")
                resp.error = str(e)[:300]
        else:
            raise LLMError(f"unknown llm provider {self.provider!r}: use 'offline' or 'openai'")
        self._cache_put(key, resp)
        return resp

    def _offline(self, messages, seed, source) -> LLMResponse:
        text = offline_answer(messages, seed, self.offline_vocabulary)
        h = hash_obj(text)[:16]
        return LLMResponse(text=text, source=source, model=OFFLINE_MODELS[self.offline_vocabulary],
                           response_id=f"offline-{h}", response_hash=h)

    def _openai(self, messages, seed) -> LLMResponse:
        import openai

        key = os.environ.get(self.api_key_env)
        if not key:
            raise MissingAPIKeyError(f"environment variable {self.api_key_env} is not set (models.llm.api_key_env)")
        client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=self.timeout_s, max_retries=0)
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            try:
                self.calls += 1
                opt: dict = {}
                if self.temperature is not None:
                    opt["temperature"] = self.temperature
                if self.send_seed:
                    opt["seed"] = int(seed)
                r = client.chat.completions.create(model=self.model, messages=messages, **opt)
                text = r.choices[0].message.content if r.choices else None
                if not isinstance(text, str):
                    raise LLMError(f"response from {self._where()} had no message content")
                return LLMResponse(text=text, source="openai", model=self.model, response_id=str(getattr(r, "id", "")),
                                   response_hash=hash_obj(text)[:16])
            except (openai.RateLimitError, openai.APITimeoutError, openai.APIConnectionError, openai.InternalServerError) as e:
                last = e
            except openai.APIStatusError as e:
                if e.status_code >= 500 or e.status_code == 429:
                    last = e
                else:
                    raise LLMError(f"LLM request to {self._where()} failed with HTTP {e.status_code}: "
                                   f"{_redact(str(e), key)[:200]}") from None
            except LLMError as e:
                last = e
            if attempt < self.max_retries:
                time.sleep(self.backoff_s * (2 ** attempt))
        raise LLMError(f"LLM request to {self._where()} failed after {self.max_retries + 1} attempts: {type(last).__name__}: "
                       f"{_redact(str(last), key)[:200]}")

    def _cache_get(self, key: str) -> dict | None:
        if self.cache_dir is None:
            return None
        p = self.cache_dir / key[:2] / f"{key}.json"
        if not p.exists():
            return None
        import json

        return json.loads(p.read_text())

    def _cache_put(self, key: str, resp: LLMResponse) -> None:
        if self.cache_dir is None or resp.source == "offline-fallback":
            return  # never cache a fallback: the next run should try the API again
        atomic_write_text(self.cache_dir / key[:2] / f"{key}.json", canonical_json(resp.__dict__))


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def parse_numbered_prompts(text: str, class_name: str, placeholder: str = "{name}") -> list[str]:
    """DIAGen parser: numbered lines, keep those containing the class name (case-insensitive, word
    boundary), replace it with ``placeholder``; sanitize each (control chars, length)."""
    out = []
    pat = re.compile(r"(?<!\w)" + re.escape(class_name) + r"(?!\w)", re.I)
    for line in text.splitlines():
        m = re.match(r"^\s*(?:\d+\s*[.):-]|[-*•])\s*(.+)$", line)
        if not m:
            continue
        body = sanitize_prompt(m.group(1).strip().strip('"').strip("'").strip())
        if pat.search(body):
            out.append(pat.sub(placeholder, body))
    return out


# DIAGen's meta-prompt (METHODS.md §2b): the structure, seven examples for the class "car" (one per way of using the
# optional attributes), the visual-adjective and vary-the-optionals rules, and the P+5 request; one user message.
DIAGEN_STRUCTURE = ("a photo of a [adjective] <classname> [location and/or weather preposition] [weather] [location] "
                    "[time of day with preposition]")
DIAGEN_CAR_EXAMPLES = (
    ("a photo of a blue car", "adjective only"),
    ("a photo of a car in a parking lot", "location only"),
    ("a photo of a car in heavy rain", "weather only"),
    ("a photo of a car at dawn", "time of day only"),
    ("a photo of a dusty car on a dirt road", "adjective and location"),
    ("a photo of a silver car on a snowy mountain pass at sunset", "all optionals"),
    ("a photo of a car", "no optional"),
)
DIAGEN_EDGE_CASE_EXAMPLES = ("a photo of a car underwater", "a photo of a car on a rooftop", "a photo of a car in a desert")


def diagen_meta_prompt(class_name: str, n: int, uncommon: bool = False) -> list[dict[str, str]]:
    """DIAGen's meta-prompt (METHODS.md §2b) asking for n (= P+5) prompts for ``class_name`` (``_`` → space):
    the structured variant with its seven car examples, or the edge-case variant (``uncommon``)."""
    name = class_name.replace("_", " ")
    if uncommon:
        ex = "\n".join(f"'{e}'" for e in DIAGEN_EDGE_CASE_EXAMPLES)
        body = ("Create prompts for me that have the following structure:\n"
                "a photo of a <classname> [uncommon location]\n\n"
                "The <classname> is replaced with the actual class name, e.g. 'car'. Replace the [] with a location "
                f"where the object is rarely seen. Example prompts for car:\n{ex}\n\n"
                "My application needs prompts that cover such edge cases.\n"
                f"Give me {n} prompts of this structure for class {name}, as a numbered list.")
    else:
        ex = "\n".join(f"'{e}' ({why})" for e, why in DIAGEN_CAR_EXAMPLES)
        body = ("Create prompts for me that have the following structure:\n"
                f"{DIAGEN_STRUCTURE}\n\n"
                "The <classname> is replaced with the actual class name, e.g. 'car'. All attributes in [] are optional. "
                f"Example prompts for car:\n{ex}\n\n"
                "Adjectives, if used, must be visual (not e.g. 'interesting'). Vary the number of optional attributes.\n\n"
                f"Give me {n} prompts of this structure for class {name}, as a numbered list.")
    return [{"role": "user", "content": body}]
