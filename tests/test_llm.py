import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from augment_dagster.llm import (LLMClient, LLMError, MissingAPIKeyError, diagen_meta_prompt, offline_class_prompts,
                                 parse_numbered_prompts, sanitize_prompt)

SECRET = "sk-test-NEVER-LOG-THIS-1234567890"


class Stub:
    """A local OpenAI-compatible server: replies follow a script of (status, body|None, delay)."""

    def __init__(self, script):
        self.script = list(script)
        self.requests = []
        stub = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"body": body, "auth": self.headers.get("Authorization")})
                status, content, delay = stub.script.pop(0) if stub.script else (200, "1. a photo of a cat", 0)
                time.sleep(delay)
                payload = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
                           "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]}
                data = json.dumps(payload if status == 200 else {"error": {"message": "boom"}}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("TEST_LLM_KEY", SECRET)


def client(url, tmp_path, **kw):
    return LLMClient(provider="openai", model="m", base_url=url, api_key_env="TEST_LLM_KEY", timeout_s=kw.pop("timeout_s", 2),
                     max_retries=kw.pop("max_retries", 2), backoff_s=0.01, cache_dir=tmp_path / "cache", **kw)


def test_success_and_cache_never_calls_again(tmp_path, key):
    s = Stub([(200, "1. a photo of a red cat\n2. a photo of a cat at night", 0)])
    try:
        c = client(s.url, tmp_path)
        r = c.complete([{"role": "user", "content": "hi"}])
        assert r.source == "openai" and "red cat" in r.text and r.response_id == "chatcmpl-1"
        assert s.requests[0]["auth"] == f"Bearer {SECRET}"
        r2 = c.complete([{"role": "user", "content": "hi"}])
        assert r2.source == "cache:openai" and r2.text == r.text and len(s.requests) == 1
        # the key is nowhere in the cache
        for p in (tmp_path / "cache").rglob("*"):
            if p.is_file():
                assert SECRET not in p.read_text()
    finally:
        s.close()


def test_429_then_success_retries(tmp_path, key):
    s = Stub([(429, None, 0), (500, None, 0), (200, "1. a photo of a dog", 0)])
    try:
        r = client(s.url, tmp_path).complete([{"role": "user", "content": "x"}])
        assert r.source == "openai" and len(s.requests) == 3
    finally:
        s.close()


def test_timeout_falls_back_to_offline_and_records_it(tmp_path, key):
    s = Stub([(200, "late", 1.5)] * 3)
    try:
        c = client(s.url, tmp_path, timeout_s=0.3, max_retries=1, fallback_to_offline=True)
        msgs = diagen_meta_prompt("cat", 6)
        r = c.complete(msgs)
        assert r.source == "offline-fallback" and "Timeout" in r.error
        assert len(parse_numbered_prompts(r.text, "cat")) == 6
        assert SECRET not in r.error
    finally:
        s.close()


def test_failure_without_fallback_raises_clear_error(tmp_path, key):
    s = Stub([(503, None, 0)] * 3)
    try:
        with pytest.raises(LLMError, match="after 3 attempts"):
            client(s.url, tmp_path, fallback_to_offline=False).complete([{"role": "user", "content": "x"}])
    finally:
        s.close()


def test_server_down_connection_error(tmp_path, key):
    s = Stub([])
    url = s.url
    s.close()
    c = client(url, tmp_path, max_retries=1, fallback_to_offline=True)
    r = c.complete([{"role": "user", "content": "x"}])
    assert r.source == "offline-fallback" and "Connection" in r.error


def test_malformed_output_parses_to_nothing(tmp_path, key):
    s = Stub([(200, "Sure! Here are some ideas: cats are great.\n\x00\x1b[31m", 0)])
    try:
        r = client(s.url, tmp_path).complete([{"role": "user", "content": "x"}])
        assert parse_numbered_prompts(r.text, "cat") == []
    finally:
        s.close()


def test_missing_key_fails_fast(monkeypatch, tmp_path):
    monkeypatch.delenv("TEST_LLM_KEY", raising=False)
    c = client("http://127.0.0.1:9/v1", tmp_path, fallback_to_offline=False)
    with pytest.raises(MissingAPIKeyError, match="TEST_LLM_KEY"):
        c.check_ready()


def test_parser_on_messy_text():
    text = """Here you go:
1. A photo of a shiny CAT in the rain
2) a photo of a catalog on a desk
3 - "a photo of a cat at night"
- a photo of a small cat\x07 on a beach
4. a photo of a dog
not numbered cat line
"""
    got = parse_numbered_prompts(text, "cat")
    assert got == ["A photo of a shiny {name} in the rain", "a photo of a {name} at night", "a photo of a small {name} on a beach"]


def test_sanitize_caps_and_strips():
    s = sanitize_prompt("a\x00b\u202ec  " + "x" * 500)
    assert "\x00" not in s and "\u202e" not in s and len(s) <= 300


def test_offline_prompts_deterministic_and_varied():
    a = offline_class_prompts("star", 10, seed=1)
    assert a == offline_class_prompts("star", 10, seed=1)
    assert a != offline_class_prompts("star", 10, seed=2)
    assert len(set(a)) == 10 and all("star" in p for p in a)
    assert len({len(p.split()) for p in a}) > 2  # optional slots vary


def test_diagen_meta_prompt_structure_examples_and_edge_cases():
    from augment_dagster.llm import DIAGEN_CAR_EXAMPLES

    (msg,) = diagen_meta_prompt("cell_phone", 15)
    text = msg["content"]
    assert msg["role"] == "user" and len(DIAGEN_CAR_EXAMPLES) == 7
    assert ("a photo of a [adjective] <classname> [location and/or weather preposition] [weather] [location] "
            "[time of day with preposition]") in text
    assert all(f"'{e}'" in text for e, _ in DIAGEN_CAR_EXAMPLES) and "optional" in text and "visual" in text
    assert "15 prompts" in text and "class cell phone" in text and "cell_phone" not in text  # '_' -> space
    (edge,) = diagen_meta_prompt("cell_phone", 8, uncommon=True)
    assert "a photo of a <classname> [uncommon location]" in edge["content"] and "8 prompts" in edge["content"]


def test_temperature_and_seed_sent_only_when_configured(tmp_path, key):
    from augment_dagster.config import LLMConfig

    s = Stub([(200, "1. a photo of a cat", 0)] * 3)
    try:
        base = dict(provider="openai", model="m", base_url=s.url, api_key_env="TEST_LLM_KEY", max_retries=0)
        LLMClient.from_config(LLMConfig(**base), tmp_path / "a").complete([{"role": "user", "content": "x"}], seed=7)
        LLMClient.from_config(LLMConfig(**base, temperature=0.3), tmp_path / "b", send_seed=True).complete(
            [{"role": "user", "content": "x"}], seed=7)
        first, second = s.requests[0]["body"], s.requests[1]["body"]
        assert "temperature" not in first and "seed" not in first  # the API's defaults, as DIAGen's script
        assert second["temperature"] == 0.3 and second["seed"] == 7
    finally:
        s.close()


def test_class_prompts_underscore_names_and_counted_topups(tmp_path, key):
    from augment_dagster.stages.prompts import class_prompt_rows, topup_counts

    s = Stub([(200, "1. a photo of a red cell phone\n2. a photo of a Cell Phone at night\n3. a photo of a dog", 0)])
    try:
        rows = class_prompt_rows(["cell_phone"], client(s.url, tmp_path), per_class=4, seed=0)
    finally:
        s.close()
    assert "class cell phone" in s.requests[0]["body"]["messages"][0]["content"]
    llm = [r for r in rows if r["prompt_source"] == "openai"]
    assert sorted(r["template"] for r in llm) == ["a photo of a red {name}", "a photo of a {name} at night"]
    assert all(r["prompt"].count("cell phone") == 1 for r in rows)
    assert len(rows) == 4 and topup_counts(rows) == {"cell_phone": 2}


def test_offline_builtin_shapes_vocabulary_uses_only_words_the_tiny_models_know():
    from augment_dagster.data.builtin import COLOURS, COMMON_TEXTURES, UNCOMMON_TEXTURES
    from augment_dagster.models.tiny import build_tokenizer

    tok = build_tokenizer()
    known = {"a", "photo", "of", "on", "background", "at", "night", "circle", *COLOURS, *COMMON_TEXTURES}
    common = offline_class_prompts("circle", 11, seed=0, vocabulary="builtin-shapes")
    assert len(set(common)) == 11 and all(p.startswith("a photo of a ") and "circle" in p for p in common)
    words = {w for p in common for w in p.split()}
    assert words <= known, words - known
    assert all(len(tok(w, add_special_tokens=False)["input_ids"]) == 1 for w in words)  # no word split into pieces
    edge = offline_class_prompts("circle", 11, seed=0, uncommon=True, vocabulary="builtin-shapes")
    assert edge and all(any(f"on a {t} background" in p for t in UNCOMMON_TEXTURES) for p in edge)
    # the scenes lists are unchanged (old caches and seeds stay valid) and differ from the shapes lists
    assert offline_class_prompts("circle", 5, seed=0) != common[:5]
    with pytest.raises(LLMError, match="offline_vocabulary"):
        offline_class_prompts("circle", 3, seed=0, vocabulary="klingon")


def test_offline_vocabulary_reaches_the_client_its_cache_key_and_the_response(tmp_path):
    msgs = diagen_meta_prompt("circle", 6)
    scenes = LLMClient(cache_dir=tmp_path).complete(msgs, seed=0)
    shapes = LLMClient(cache_dir=tmp_path, offline_vocabulary="builtin-shapes").complete(msgs, seed=0)
    assert scenes.model == "offline-template-v1" and shapes.model == "offline-shapes-v1"
    assert shapes.source == "offline" and shapes.text != scenes.text and "background" in shapes.text
    again = LLMClient(cache_dir=tmp_path, offline_vocabulary="builtin-shapes").complete(msgs, seed=0)
    assert again.source == "cache:offline" and again.text == shapes.text
