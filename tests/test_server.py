"""`latentmoe serve` as a real process with a tiny random model, through the official openai client."""

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from _server_helpers import make_checkpoint, server_process

KEY = "sk-test-key"
MAX_LEN = 256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), max_position_embeddings=MAX_LEN)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    with server_process(model_dir, "--api-key", KEY, "--served-model-name", "tiny-test", log_path=log) as base:
        yield base
    print(log.read_text()[-3000:])


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ref_tok(model_dir):
    # transformers as the reference tokenizer; the config's add_bos_token is passed explicitly (see test_tokenizer).
    return AutoTokenizer.from_pretrained(model_dir, add_bos_token=True)


def metric(server, name):
    text = httpx.get(server + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def error_of(exc):
    return exc.value.status_code, exc.value.body["type"] if isinstance(exc.value.body, dict) else None


# ---------------------------------------------------------------------- happy paths

def test_models_list(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-test"]
    assert models[0].max_model_len == MAX_LEN


def test_completion(client, ref_tok):
    prompt = "What is the capital of France?"
    r = client.completions.create(model="tiny-test", prompt=prompt, max_tokens=7, extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == "tiny-test" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length" and isinstance(r.choices[0].text, str)
    n_prompt = len(ref_tok.encode(prompt))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 7, n_prompt + 7)
    # token-id prompts, several at once: one choice per prompt, usage summed
    ids = ref_tok.encode("Hello!")
    r = client.completions.create(model="tiny-test", prompt=[ids, ids[:3]], max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.prompt_tokens == len(ids) + 3 and r.usage.completion_tokens == 8
    # and streamed with n=2: choice index = prompt index * n + sample index
    chunks = list(client.completions.create(model="tiny-test", prompt=["Hi", "Hello"], n=2, max_tokens=3,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    finished = sorted(ch.index for c in chunks for ch in c.choices if ch.finish_reason == "length")
    assert finished == [0, 1, 2, 3] and chunks[-1].usage.completion_tokens == 12


def test_completion_stream_equals_non_stream(client):
    kw = dict(model="tiny-test", prompt="Numbers: 0 1 2", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 2   # streamed piece by piece
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    text = "".join(ch.text for c in chunks for ch in c.choices)
    assert text == full.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert [c.choices[0].finish_reason for c in chunks[:-2]] == [None] * (len(chunks) - 2)


def test_echo(client):
    r = client.completions.create(model="tiny-test", prompt="Hello", max_tokens=3, echo=True)
    assert r.choices[0].text.startswith("Hello")


def test_chat_and_stream(client, ref_tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    kw = dict(model="tiny-test", messages=messages, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    n_prompt = len(ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=False))
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (n_prompt, 10)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-2].choices[0].finish_reason == "length"
    # without include_usage no chunk carries usage
    assert all(c.usage is None for c in client.chat.completions.create(**kw, stream=True))


def test_n_and_seed(client):
    kw = dict(model="tiny-test", prompt="Hello", max_tokens=8, temperature=1.0, n=3, seed=1234,
              extra_body={"ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2] and a.usage.completion_tokens == 24
    assert [c.text for c in a.choices] == [c.text for c in b.choices]     # same seed, same samples
    c = client.completions.create(**{**kw, "seed": 99})
    assert [x.text for x in c.choices] != [x.text for x in a.choices]
    assert len({x.text for x in a.choices}) > 1                          # the n samples differ


def test_stop_string(client):
    kw = dict(model="tiny-test", prompt="Hello, how", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**kw).choices[0].text
    stop = next(text[i:i + 2] for i in range(4, len(text) - 1) if text[i:i + 2].strip())
    r = client.completions.create(**kw, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[:text.index(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stop=stop, stream=True))
    assert streamed == r.choices[0].text


def test_logprobs(client):
    r = client.completions.create(model="tiny-test", prompt="Hi", max_tokens=5, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(x <= 0 for x in lp.token_logprobs)
    for sampled, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and max(top.values()) >= sampled - 1e-6
    c = client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    assert len(content) == 4 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in content)
    assert all(bytes(e.bytes).decode("utf-8") == e.token for e in content)


def test_tokenize_detokenize(server, ref_tok):
    text = "What is the capital of France? 数学"
    r = httpx.post(server + "/tokenize", json={"prompt": text}).json()
    assert r["tokens"] == ref_tok.encode(text) and r["count"] == len(r["tokens"]) and r["max_model_len"] == MAX_LEN
    msgs = [{"role": "user", "content": "Hi"}]
    r = httpx.post(server + "/tokenize", json={"messages": msgs}).json()
    assert r["tokens"] == list(ref_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                           return_dict=False))
    r = httpx.post(server + "/detokenize", json={"tokens": ref_tok.encode(text)}).json()
    assert r["prompt"] == ref_tok.decode(ref_tok.encode(text))


# ---------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(n=0), "n"),
    (dict(max_tokens=0), "max_tokens"), (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(logprobs=50), "logprobs"), (dict(extra_body={"top_k": -5}), "top_k"),
])
def test_invalid_sampling_params_400(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-test", prompt="Hi", **kwargs)
    assert error_of(e) == (400, "invalid_request_error") and e.value.body["param"] == param


def test_bad_prompts_400(client):
    cases = [dict(prompt=""), dict(prompt=[]), dict(prompt=[[1, 2], []]), dict(prompt=[1, 2, 320]),  # OOV id
             dict(prompt=[5] * MAX_LEN),                                  # at the context length
             dict(prompt=[5] * 200, max_tokens=100)]                      # prompt + max_tokens over it
    for kw in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny-test", **{"max_tokens": 4, **kw})
        assert error_of(e) == (400, "invalid_request_error"), kw
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-test", messages=[])
    assert error_of(e) == (400, "invalid_request_error")
    with pytest.raises(openai.BadRequestError) as e:   # the template's raise_exception: unknown role
        client.chat.completions.create(model="tiny-test", messages=[{"role": "robot", "content": "x"}])
    assert error_of(e) == (400, "invalid_request_error") and "unknown role" in e.value.body["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("body", [b"{not json", b'["a", "list"]', b'"text"', b"", b"\xff\xfe", b'{"prompt": 1}',
                                  b'{"messages": "x", "prompt": {"a": 1}}'])
def test_malformed_bodies_400(server, model_dir, path, body):
    r = httpx.post(server + path, content=body, headers={"Authorization": f"Bearer {KEY}",
                                                         "Content-Type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and set(err) == {"message", "type", "param", "code"}
    assert str(model_dir) not in err["message"] and ".py" not in err["message"] and "site-packages" not in r.text


def test_auth_401_only_on_v1(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": f"Bearer {KEY}x"}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
            r = httpx.request(method, server + path, headers=headers, json={"prompt": "x"})
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (headers, path)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="nope", max_retries=0).models.list()
    for path in ("/health", "/metrics", "/"):
        assert httpx.get(server + path).status_code == 200


def test_unknown_model_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="Hi")
    assert error_of(e) == (404, "not_found_error") and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])


def test_queue_full_503(model_dir):
    with server_process(model_dir, "--served-model-name", "q", "--max-num-seqs", "1", "--max-queued", "1") as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        running = client.completions.create(model="q", prompt="Hello", max_tokens=200, stream=True,
                                            extra_body={"ignore_eos": True})
        next(iter(running))                      # holds the only sequence slot
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.completions.create, model="q", prompt="Hi", max_tokens=2,
                                  extra_body={"ignore_eos": True})
            deadline = time.monotonic() + 20
            while metric(base, "latentmoe_num_requests_waiting") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            with pytest.raises(openai.APIStatusError) as e:   # the queue (1 waiting) is full
                client.completions.create(model="q", prompt="x", max_tokens=2)
            running.close()                      # frees the slot: the waiting request runs
            done = waiting.result(timeout=60)
        assert error_of(e) == (503, "service_unavailable_error")
        assert done.usage.completion_tokens == 2


# ---------------------------------------------------------------------- load and disconnects

def test_64_concurrent_streams(server):
    async def one(client, i):
        n_tokens = 8 + i % 9
        stream = await client.completions.create(
            model="tiny-test", prompt=f"Request {i}: hello", max_tokens=n_tokens, stream=True,
            stream_options={"include_usage": True}, logprobs=0 if i % 2 else None,
            extra_body={"ignore_eos": True})
        chunks = [c async for c in stream]
        tokens_seen = sum(len(ch.logprobs.tokens) for c in chunks for ch in c.choices if ch.logprobs)
        return n_tokens, chunks, tokens_seen, i % 2

    running = []

    async def run_all():
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120) as client:
            work = asyncio.gather(*(one(client, i) for i in range(64)))
            while not work.done():   # sample the batch size while they run
                running.append(await asyncio.to_thread(metric, server, "latentmoe_num_requests_running"))
            return await work

    results = asyncio.run(run_all())
    assert max(running) >= 16   # they were batched together, not served one after another
    assert len(results) == 64
    for n_tokens, chunks, tokens_seen, with_lp in results:
        assert chunks[-1].usage.completion_tokens == n_tokens
        assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["length"]
        if with_lp:   # every generated token arrived, each with its logprob
            assert tokens_seen == n_tokens
    assert len({c.id for _, chunks, _, _ in results for c in chunks}) == 64
    assert metric(server, "latentmoe_cache_blocks_used") == 0


def test_cancelled_burst_frees_cache(server):
    before = metric(server, "latentmoe_client_disconnects_total")
    tokens_before = metric(server, "latentmoe_generation_tokens_total")
    in_use = []

    async def burst():
        client = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=0.5)
        long = dict(model="tiny-test", prompt="Tell me a long story", max_tokens=220, extra_body={"ignore_eos": True})

        async def non_stream():   # the client's read timeout fires long before 220 tokens
            with pytest.raises(openai.APITimeoutError):
                await client.completions.create(**long)

        async def stream():       # a streaming client that gives up after a while
            with pytest.raises(asyncio.TimeoutError):
                async def consume():
                    s = await client.chat.completions.create(
                        model="tiny-test", messages=[{"role": "user", "content": "story"}], max_tokens=220,
                        stream=True, timeout=30, extra_body={"ignore_eos": True})
                    async for _ in s:
                        pass
                await asyncio.wait_for(consume(), 0.7)

        try:
            work = asyncio.gather(*[non_stream() for _ in range(12)], *[stream() for _ in range(12)])
            while not work.done():   # the requests really hold cache blocks before their clients go away
                in_use.append(await asyncio.to_thread(metric, server, "latentmoe_cache_blocks_used"))
            await work
        finally:
            await client.close()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            tokens = await asyncio.to_thread(metric, server, "latentmoe_generation_tokens_total")
            if await asyncio.to_thread(metric, server, "latentmoe_client_disconnects_total") - before == 24:
                at_last_disconnect.append(tokens)
                break
            await asyncio.sleep(0.01)

    at_last_disconnect = []
    asyncio.run(burst())
    deadline = time.monotonic() + 3
    while metric(server, "latentmoe_cache_blocks_used") != 0 or metric(server, "latentmoe_num_requests_running"):
        assert time.monotonic() < deadline, "cache blocks still in use after every client went away"
        time.sleep(0.05)
    assert metric(server, "latentmoe_num_requests_waiting") == 0
    assert max(in_use) >= 12
    assert metric(server, "latentmoe_client_disconnects_total") - before == 24
    # Aborted, not run to the end: generation stopped within a few steps of the last client leaving (run to the
    # end, the requests would still have had ~90 tokens each to go: how many they made before their clients
    # left depends on the machine's speed, so that count alone is no test).
    assert at_last_disconnect, "the disconnects were not all counted"
    after = metric(server, "latentmoe_generation_tokens_total")
    assert after - at_last_disconnect[0] <= 24 * 10
    assert after - tokens_before < 24 * 220
    t0 = time.monotonic()
    r = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=10).completions.create(
        model="tiny-test", prompt="Hi", max_tokens=4, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4 and time.monotonic() - t0 < 5


def test_health_and_metrics(server):
    assert httpx.get(server + "/health").status_code == 200
    text = httpx.get(server + "/metrics").text
    for name in ("latentmoe_num_requests_running", "latentmoe_num_requests_waiting", "latentmoe_cache_blocks_used",
                 "latentmoe_time_to_first_token_seconds_count", "latentmoe_e2e_request_latency_seconds_count",
                 "latentmoe_prompt_tokens_total", "latentmoe_generation_tokens_total",
                 "latentmoe_client_disconnects_total"):
        assert name in text, name
    assert metric(server, "latentmoe_generation_tokens_total") > 0
    assert metric(server, "latentmoe_time_to_first_token_seconds_count") > 0
    # Everything compiled and captured at start-up: the workload served so far added nothing.
    assert metric(server, "latentmoe_time_to_ready_seconds") > 0
    assert metric(server, "latentmoe_compilations_after_ready") == 0
    assert metric(server, "latentmoe_graph_captures_after_ready") == 0
    assert json.loads(httpx.get(server + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).text)["data"]
