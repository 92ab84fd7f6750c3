"""Server behaviour when the real engine fails: mid-stream error chunk then [DONE], 500, /health 503, then 503s.

The engine is the real AsyncLLM with a tiny random model; its step is made to raise after a few calls, which is how
a device error or a bug in the engine loop shows up to the server. Served by uvicorn in a thread of this process.
"""

import json

import httpx
import openai
import pytest

from _server_helpers import make_checkpoint, server_thread
from latentmoe.engine import LLM, AsyncLLM
from latentmoe.server import create_app

SECRET = "/opt/secret/engine_internals.py"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


def failing_engine(model_dir, fail_after: int) -> AsyncLLM:
    llm = LLM(model_dir, max_num_seqs=4)
    step, calls = llm.step, [0]

    def flaky_step(**kwargs):
        calls[0] += 1
        if calls[0] > fail_after:
            raise RuntimeError(f"device lost in {SECRET}")
        return step(**kwargs)

    llm.step = flaky_step
    return AsyncLLM(llm)


def test_stream_fails_midway_error_chunk_then_done(model_dir):
    with server_thread(create_app(failing_engine(model_dir, fail_after=5), "m")) as base:
        assert httpx.get(base + "/health").status_code == 200
        body = {"model": "m", "prompt": "Hello", "max_tokens": 50, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "internal_server_error" and SECRET not in error["message"]
        assert all("choices" in json.loads(e) for e in events[:-2]) and len(events) > 3   # tokens came first

        # the engine loop is dead now: /health says so and new requests get 503
        r = httpx.get(base + "/health")
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error"
        assert "latentmoe_engine_healthy 0.0" in httpx.get(base + "/metrics").text
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
        assert e.value.status_code == 503 and e.value.body["type"] == "service_unavailable_error"


def test_openai_client_sees_midway_failure(model_dir):
    with server_thread(create_app(failing_engine(model_dir, fail_after=4), "m")) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=50, stream=True, extra_body={"ignore_eos": True})
        with pytest.raises(openai.APIError) as e:
            for _ in stream:
                pass
        assert SECRET not in str(e.value)


def test_non_stream_failure_500(model_dir):
    with server_thread(create_app(failing_engine(model_dir, fail_after=3), "m")) as base:
        r = httpx.post(base + "/v1/completions", json={"prompt": "Hello", "max_tokens": 30, "ignore_eos": True},
                       timeout=30)
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["type"] == "internal_server_error" and SECRET not in r.text
        assert httpx.get(base + "/health").status_code == 503
