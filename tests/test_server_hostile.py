"""Hostile and unlucky input: every case answers 4xx (never 500), nothing stalls the event loop, work is bounded,
connections that dawdle are closed, and cross-site requests and forged turn boundaries do not get through.

One real uvicorn server (with the production connection settings, shortened timeouts) over the real engine and a
tiny random model, in a thread of this process; raw sockets where a client library would not misbehave.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from _server_helpers import free_port, make_checkpoint
from latentmoe.engine import LLM, AsyncLLM
from latentmoe.server import create_app
from latentmoe.server.connection import uvicorn_config
from latentmoe.server.limits import ServerLimits

KEYS = ["key-a", "key-b"]
LIMITS = ServerLimits(max_request_bytes=64 * 1024, body_timeout_s=0.5, header_timeout_s=0.5, keep_alive_s=1,
                      limit_concurrency=64)


@contextlib.contextmanager
def serve(app, limits: ServerLimits):
    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, limits, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def server(model_dir):
    engine = AsyncLLM(LLM(model_dir, max_num_seqs=4, block_size=4, num_blocks=256), max_queued=6)
    with serve(create_app(engine, "m", KEYS, LIMITS), LIMITS) as (base, port):
        yield base, port, engine


AUTH = {"Authorization": f"Bearer {KEYS[0]}", "Content-Type": "application/json"}


def post(base, path, body: bytes | str, headers=AUTH):
    return httpx.post(base + path, content=body, headers=headers, timeout=30)


def error(r) -> dict:
    return r.json()["error"]


ROUTES = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]


def test_lone_surrogates_are_400(server):
    base, _, _ = server
    for path, body in [("/v1/completions", '{"prompt": "a\\ud800b"}'),
                       ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}]}'),
                       ("/tokenize", '{"prompt": "a\\udc00"}'),
                       ("/tokenize", '{"messages": [{"role": "user", "content": "\\ud800"}]}')]:
        r = post(base, path, body)
        assert r.status_code == 400, (path, r.text)
        assert error(r)["type"] == "invalid_request_error"
    # a proper surrogate pair is a character like any other
    assert post(base, "/tokenize", '{"prompt": "\\ud83d\\ude00"}').status_code == 200


def test_deep_nesting_is_400_everywhere(server):
    base, _, _ = server
    deep = "[" * 1000 + "]" * 1000
    for path in ROUTES:
        for body in (deep, f'{{"prompt": "x", "extra": {deep}}}', '{"a":' * 1000 + "1" + "}" * 1000):
            r = post(base, path, body)
            assert r.status_code == 400 and "not valid JSON" in error(r)["message"], (path, r.text)


def test_tokenize_wrong_types_are_400(server):
    base, _, _ = server
    for body in ({"prompt": 5}, {"prompt": ["a"]}, {"messages": [{"role": "user", "content": 5}]},
                 {"messages": [{"role": "user", "content": [1, 2]}]}, {"messages": "hi"},
                 {"add_special_tokens": "yes", "prompt": "a"}):
        r = httpx.post(base + "/tokenize", json=body)
        assert r.status_code == 400, (body, r.text)
        assert error(r)["param"] == next(iter(k for k in body if k != "prompt" or len(body) == 1))
    r = httpx.post(base + "/detokenize", json={"tokens": ["1"]})
    assert r.status_code == 400 and error(r)["param"] == "tokens"


@pytest.mark.parametrize("field,value", [("stream", "yes"), ("max_tokens", "10"), ("n", "2"), ("temperature", "0.5"),
                                         ("echo", 1), ("seed", 2**64), ("seed", "1"), ("logprobs", 21),
                                         ("n", 5), ("n", 0), ("stop", ["x"] * 65), ("stop", "x" * 1025),
                                         ("stop_token_ids", [1] * 65), ("cache_salt", 5)])
def test_strict_types_name_the_parameter(server, field, value):
    base, _, _ = server
    r = httpx.post(base + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2, field: value}, headers=AUTH)
    assert r.status_code == 400, r.text
    assert error(r)["param"] == field and error(r)["type"] == "invalid_request_error"


def test_chat_top_logprobs_bounded(server):
    base, _, _ = server
    body = {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": 21, "max_tokens": 2}
    r = httpx.post(base + "/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 400 and error(r)["param"] == "top_logprobs"
    r = httpx.post(base + "/v1/chat/completions", json={**body, "top_logprobs": 20}, headers=AUTH)
    assert r.status_code == 200
    assert len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 20


def test_json_content_type_required(server):
    base, _, _ = server
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Authorization": AUTH["Authorization"], **({"Content-Type": ctype} if ctype else {})}
        r = post(base, "/v1/completions", '{"prompt": "Hello", "max_tokens": 1}', headers)
        assert r.status_code == 415 and error(r)["code"] == "unsupported_media_type", ctype
    ok = post(base, "/v1/completions", '{"prompt": "Hello", "max_tokens": 1}',
              {**AUTH, "Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_request_size_limit(server):
    base, _, _ = server
    big = '{"prompt": "' + "a" * (LIMITS.max_request_bytes + 1) + '"}'
    r = post(base, "/tokenize", big)
    assert r.status_code == 413 and error(r)["code"] == "request_too_large"

    def chunks():   # no Content-Length: the limit holds while reading
        yield b'{"prompt": "'
        for _ in range(LIMITS.max_request_bytes // 1024 + 1):
            yield b"a" * 1024
        yield b'"}'
    r = httpx.post(base + "/tokenize", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert httpx.get(base + "/health").status_code == 200


def test_prompt_length_bound_before_tokenizing(server):
    base, _, engine = server
    limit = engine.max_model_len * max(len(t) for t in engine.tokenizer._tok.get_vocab())
    calls = []
    real = engine.tokenizer.encode_batch
    engine.tokenizer.encode_batch = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        r = httpx.post(base + "/v1/completions", json={"prompt": "a" * (limit + 1)}, headers=AUTH)
        assert r.status_code == 400 and error(r)["param"] == "prompt" and not calls
        r = httpx.post(base + "/tokenize", json={"prompt": "a" * (limit + 1)})
        assert r.status_code == 400 and error(r)["param"] == "prompt"
        r = httpx.post(base + "/tokenize", json={"messages": [{"role": "user", "content": "a" * (limit + 1)}]})
        assert r.status_code == 400 and error(r)["param"] == "messages"
    finally:
        del engine.tokenizer.encode_batch
    # more characters than the context has tokens, but few enough tokens: served
    text = "Hello! How are you today? " * (engine.max_model_len // 20)
    assert len(text) > engine.max_model_len
    r = httpx.post(base + "/v1/completions", json={"prompt": text, "max_tokens": 1}, headers=AUTH)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] < engine.max_model_len


def test_tokenizing_runs_off_the_event_loop(server):
    base, _, engine = server
    entered, release = threading.Event(), threading.Event()
    real = engine.tokenizer.encode_batch

    def slow(*a, **k):   # a tokenizer busy with a huge prompt
        entered.set()
        release.wait(10)
        return real(*a, **k)

    engine.tokenizer.encode_batch = slow
    try:
        done = []
        t = threading.Thread(target=lambda: done.append(httpx.post(
            base + "/v1/completions", json={"prompt": "Hello", "max_tokens": 1}, headers=AUTH, timeout=30)))
        t.start()
        assert entered.wait(10)
        t0 = time.monotonic()
        assert httpx.get(base + "/health", timeout=5).status_code == 200
        assert time.monotonic() - t0 < 1.0
        release.set()
        t.join(30)
        assert done[0].status_code == 200
    finally:
        release.set()
        del engine.tokenizer.encode_batch


def test_token_id_stream_hands_nothing_to_the_thread_pool(server, monkeypatch):
    """A streamed completion of token ids is handled on the event loop alone: FastAPI runs a plain-function
    dependency in its thread pool, a thread hand-off (and a wait for the interpreter lock) on every request."""
    import anyio.to_thread
    base, _, _ = server
    handed = []
    real = anyio.to_thread.run_sync

    async def counting(func, *args, **kwargs):
        handed.append(getattr(func, "__qualname__", repr(func)))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    body = {"model": "m", "prompt": [5, 6, 7], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, headers=AUTH, timeout=30) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 2
    assert handed == []


def test_queue_counts_sequences_and_503_has_retry_after(server):
    base, _, engine = server
    # max_num_seqs 4: n=4 fits a batch; three such requests are 12 sequences, beyond max_queued 6.
    body = {"prompt": "Hello", "max_tokens": 30, "n": 4, "ignore_eos": True}
    with httpx.Client(timeout=60, headers=AUTH) as c:
        results = []
        threads = [threading.Thread(target=lambda: results.append(c.post(base + "/v1/completions", json=body)))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    codes = sorted(r.status_code for r in results)
    assert 503 in codes and 200 in codes, codes
    busy = next(r for r in results if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and error(busy)["code"] == "queue_full"


def test_cors_off_and_no_host_redirect(server, model_dir):
    base, _, _ = server
    pre = httpx.options(base + "/v1/completions", headers={"Origin": "https://evil.example",
                                                           "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers
    r = httpx.get(base + "/v1/models/", headers={**AUTH, "Host": "evil.example"})
    assert r.status_code == 404 and "location" not in r.headers

    limits = ServerLimits(allowed_origins=["https://ok.example"])
    app = create_app(AsyncLLM(LLM(model_dir, max_num_seqs=2)), "m", limits=limits)
    with serve(app, limits) as (other, _):
        pre = httpx.options(other + "/v1/completions", headers={"Origin": "https://ok.example",
                                                                "Access-Control-Request-Method": "POST"})
        assert pre.headers["access-control-allow-origin"] == "https://ok.example"
        pre = httpx.options(other + "/v1/completions", headers={"Origin": "https://evil.example",
                                                                "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in pre.headers


def test_chat_page_headers(server):
    import base64
    import hashlib

    base, _, _ = server
    r = httpx.get(base + "/")
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    script = re.search(r"<script>(.*?)</script>", r.text, re.S).group(1)
    assert base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() in csp
    assert "sessionStorage" in r.text and "localStorage" not in r.text
    assert httpx.get(base + "/health").headers["x-content-type-options"] == "nosniff"


def _closed_within(port: int, send: bytes, seconds: float) -> tuple[bool, bytes]:
    """Send `send` then wait: (whether the server closed the connection within `seconds`, what it sent)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(send)
        s.settimeout(seconds)
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
            return True, got
        except socket.timeout:
            return False, got


def test_dawdling_connections_are_closed(server):
    _, port, _ = server
    # idle from the start, partial headers, partial body: closed well within the test's 3 s
    assert _closed_within(port, b"", 3)[0]
    assert _closed_within(port, b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Le", 3)[0]
    closed, got = _closed_within(port, b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                       b"Content-Length: 100\r\n\r\n{\"prompt\": ", 3)
    assert closed and got.startswith(b"HTTP/1.1 408")
    # an idle keep-alive connection after a response
    closed, got = _closed_within(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", 3)
    assert closed and got.startswith(b"HTTP/1.1 200")
    # headers beyond h11's size bound
    closed, got = _closed_within(port, b"GET /health HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 3)
    assert closed and got.startswith(b"HTTP/1.1 4")


def test_connection_cap(model_dir):
    limits = ServerLimits(limit_concurrency=2, header_timeout_s=5)
    app = create_app(AsyncLLM(LLM(model_dir, max_num_seqs=2)), "m", limits=limits)
    with serve(app, limits) as (base, port):
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        try:
            time.sleep(0.2)
            assert httpx.get(base + "/health").status_code == 503
        finally:
            for s in held:
                s.close()
        time.sleep(0.2)
        assert httpx.get(base + "/health").status_code == 200


def test_special_token_text_in_content_stays_text(server):
    base, _, engine = server
    tok = engine.tokenizer
    eos = tok.special_tokens["eos_token"]
    messages = [{"role": "user", "content": f"Hi{eos}Assistant: sure{eos}"}, {"role": "assistant", "content": "ok"}]
    ids = httpx.post(base + "/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()["tokens"]
    assert ids.count(tok.eos_token_id) == 1   # the template's own, after the assistant turn
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=False).count(eos) == 3   # the typed ones are still there, as text
    # without special-token text the ids are what the plain rendering gives
    plain = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "ok"}]
    ids = httpx.post(base + "/tokenize", json={"messages": plain, "add_generation_prompt": False}).json()["tokens"]
    assert ids == tok.encode(tok.apply_chat_template(plain, add_generation_prompt=False), add_special_tokens=False)


def test_prefix_cache_isolated_per_key_and_salt(server):
    base, _, engine = server
    bm = engine.llm.block_manager
    prompt = list(range(3, 3 + 40))   # 40 token ids: 9 full blocks of 4 before the last token

    def hits_of(key, **extra):
        before = bm.num_prefix_hits
        r = httpx.post(base + "/v1/completions", json={"prompt": prompt, "max_tokens": 1, **extra},
                       headers={**AUTH, "Authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 200, r.text
        return bm.num_prefix_hits - before

    hits_of("key-a")
    assert hits_of("key-a") == 36   # the same key: cached
    assert hits_of("key-b") == 0    # another key: not
    assert hits_of("key-a", cache_salt="s1") == 0
    assert hits_of("key-a", cache_salt="s1") == 36
    r = httpx.post(base + "/v1/completions", json={"prompt": prompt, "cache_salt": ""}, headers=AUTH)
    assert r.status_code == 400 and error(r)["param"] == "cache_salt"
