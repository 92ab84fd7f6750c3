"""Property: whatever JSON body, string or headers a client sends to any route, the answer is a 2xx or a 4xx (never a
500 or a dropped connection), and the server is healthy afterwards with no cache block leaked.

Bodies are drawn both as arbitrary JSON and as requests with the right field names and arbitrary values, which is
where lenient parsing and unchecked engine arguments used to hide. One real server (tiny model, short context, so a
generation is a few milliseconds) serves every example.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _server_helpers import make_checkpoint, server_thread
from latentmoe.engine import LLM, AsyncLLM
from latentmoe.server import create_app

ROUTES = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/tokenize"),
          ("POST", "/detokenize"), ("GET", "/v1/models"), ("GET", "/health"), ("GET", "/metrics"), ("GET", "/"),
          ("POST", "/health"), ("GET", "/v1/completions"), ("POST", "/v1/models/"), ("POST", "/nope")]
FIELDS = ["model", "prompt", "messages", "max_tokens", "n", "stream", "stream_options", "temperature", "top_p",
          "top_k", "min_p", "stop", "seed", "logprobs", "top_logprobs", "echo", "best_of", "suffix", "tokens",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "stop_token_ids",
          "ignore_eos", "skip_special_tokens", "add_special_tokens", "add_generation_prompt", "cache_salt",
          "max_completion_tokens", "tools", "tool_choice", "content", "role"]

text = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["", "Hello", "<｜end▁of▁sentence｜>", "\u0000", "m", "\ud800", "a" * 3000])
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-3, 70)
           | st.floats(allow_nan=True, allow_infinity=True) | text)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(FIELDS) | text, inner, max_size=4), max_leaves=12)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]) | text},
                                optional={"content": json_values, "name": json_values})
field_value = (json_values | st.lists(st.integers(-5, 400), max_size=8) | st.lists(message, max_size=3)
               | st.sampled_from([[], [[]], [[1, 2], [3]], {"include_usage": True}]))
requests_ = st.dictionaries(st.sampled_from(FIELDS), field_value, max_size=7)


def encode(body) -> bytes:
    return json.dumps(body, ensure_ascii=True, allow_nan=True).encode()


# a valid request with a few fields changed, sent to its route: reaches the engine far more often than a random one
VALID = [("/v1/completions", {"prompt": "Hello", "max_tokens": 3}),
         ("/v1/completions", {"prompt": [[1, 2], [3]], "max_tokens": 2, "n": 2}),
         ("/v1/completions", {"prompt": "Hi", "logprobs": 2, "echo": False, "stream": True}),
         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}),
         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True,
                                   "top_logprobs": 2, "max_tokens": 2, "stream": True}),
         ("/tokenize", {"prompt": "Hello"}), ("/detokenize", {"tokens": [1, 2]})]
plausible = (st.none() | st.booleans() | st.integers(-2, 70) | st.floats(-3, 3) | text
             | st.lists(st.integers(-1, 400), max_size=3) | st.sampled_from([{"include_usage": True}, "\n", ["x"]]))
near_valid = st.builds(lambda case, extra: ("POST", case[0], encode({**case[1], **extra})), st.sampled_from(VALID),
                       st.dictionaries(st.sampled_from(FIELDS), plausible, max_size=2))
raw_bodies = (st.builds(encode, requests_) | st.builds(encode, json_values) | st.binary(max_size=60)
              | st.sampled_from([b"", b"{", b"[" * 5000, b'{"prompt": "\\ud800"}', b"\xff\xfe", b"null"]))
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30).map(str.strip)
headers = st.dictionaries(
    st.sampled_from(["content-type", "authorization", "accept", "origin", "x-request-id", "content-encoding",
                     "accept-encoding", "expect"]) | st.from_regex(r"\Ax-[a-z]{1,8}\Z"),
    st.sampled_from(["application/json", "application/json; charset=latin-1", "text/plain", "Bearer k",
                     "gzip", "100-continue", "*/*"]) | header_text, max_size=4)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = make_checkpoint(tmp_path_factory.mktemp("ckpt"), max_position_embeddings=64)
    engine = AsyncLLM(LLM(model_dir, max_num_seqs=4, block_size=4, num_blocks=128), max_queued=16)
    with server_thread(create_app(engine, "m")) as base:
        with httpx.Client(base_url=base, timeout=30) as client:
            yield client, engine


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          database=None)
@given(case=near_valid | st.tuples(st.sampled_from(ROUTES), raw_bodies).map(lambda rb: (*rb[0], rb[1])),
       hdrs=headers, json_type=st.integers(0, 3).map(bool))
def test_any_input_gets_2xx_or_4xx(server, case, hdrs, json_type):
    client, _ = server
    method, path, body = case
    if json_type:
        hdrs = {**hdrs, "content-type": "application/json"}
    r = client.request(method, path, content=body if method == "POST" else None, headers=hdrs)
    assert 200 <= r.status_code < 300 or 400 <= r.status_code < 500, (method, path, body[:200], r.text[:300])
    if r.status_code >= 400 and path != "/":
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert client.get("/health").status_code == 200


def test_server_healthy_after_fuzzing(server):
    """Runs after the property test (same module, same server): nothing is left running or holding blocks."""
    client, engine = server
    deadline = time.monotonic() + 10
    while engine.llm.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.05)
    bm = engine.llm.block_manager
    assert not engine.llm.has_unfinished() and bm.num_used_blocks == 0
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
