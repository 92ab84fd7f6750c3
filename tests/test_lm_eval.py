"""lm-evaluation-harness against `latentmoe serve`: prompt log-probabilities through `echo` + `logprobs` (batches of
text or token-id prompts, `max_tokens` 0 or 1, `top_logprobs`) checked against transformers on the same weights, the
tokenizer endpoints, and the real `lm_eval` package (`local-completions`, remote tokenizer) on one small local task
of each kind."""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch

from _server_helpers import make_checkpoint, server_process

MAX_LEN = 128


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), max_position_embeddings=MAX_LEN)


@pytest.fixture(scope="module")
def server(model_dir):
    with server_process(model_dir, "--device", "cpu", "--max-model-len", str(MAX_LEN), "--served-model-name",
                        "tiny") as base:
        yield base


@pytest.fixture(scope="module")
def reference(model_dir):
    """log p(token_i | tokens_<i) for i >= 1 from transformers' DeepseekV2ForCausalLM, and its full rows."""
    from transformers import DeepseekV2ForCausalLM
    hf = DeepseekV2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def score(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)   # [T, V]

    return score


@pytest.fixture(scope="module")
def tok(model_dir):
    from latentmoe.tokenizer import Tokenizer
    return Tokenizer.from_dir(model_dir)


def _post(server, **body):
    r = httpx.post(server + "/v1/completions", json={"model": "tiny", "temperature": 0, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_match_transformers(server, reference, tok, max_tokens):
    texts = ["The mixture of experts routes each token", "Hello! How are you today?"]
    ids = [tok.encode(t) for t in texts]
    # One batch of token-id lists, one batch of strings: the same numbers.
    for prompt in (ids, texts):
        out = _post(server, prompt=prompt, max_tokens=max_tokens, echo=True, logprobs=3)
        choices = sorted(out["choices"], key=lambda c: c["index"])
        assert len(choices) == 2
        for c, p, text in zip(choices, ids, texts):
            lp = c["logprobs"]
            assert text in c["text"]
            assert len(lp["token_logprobs"]) == len(p) + max_tokens
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            ref = reference(p)
            want = [ref[i - 1, p[i]].item() for i in range(1, len(p))]
            assert lp["token_logprobs"][1:len(p)] == pytest.approx(want, abs=1e-4)
            for i in range(1, len(p)):
                top = lp["top_logprobs"][i]
                best = ref[i - 1].topk(3)
                # the three most likely tokens, plus the prompt's own token (as vLLM reports it)
                # (keyed by token text: tokens that decode alike share an entry)
                assert max(top.values()) == pytest.approx(best.values[0].item(), abs=1e-4)
                assert 1 <= len(top) <= 4
                assert all(v >= best.values[2].item() - 1e-4 or v == pytest.approx(want[i - 1], abs=1e-4)
                           for v in top.values())
            if max_tokens:   # the generated token is the greedy one after the whole prompt
                after = reference(p + [0])[len(p) - 1]   # (row len(p)-1 sees exactly the prompt)
                assert lp["token_logprobs"][-1] == pytest.approx(after.max().item(), abs=1e-4)


def test_echo_logprobs_streamed(server, tok):
    """Streamed, the first chunk carries the echoed prompt and its logprobs; joined, the chunks are the response."""
    body = {"model": "tiny", "prompt": "Hello! How are", "max_tokens": 3, "echo": True, "logprobs": 2,
            "temperature": 0, "ignore_eos": True}
    whole = _post(server, **body)["choices"][0]
    text, lps = "", {"tokens": [], "token_logprobs": [], "top_logprobs": []}
    with httpx.stream("POST", server + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:])["choices"]:
                    text += c["text"]
                    for key in lps:
                        lps[key] += c["logprobs"][key]
    assert text == whole["text"]
    assert lps == {key: whole["logprobs"][key] for key in lps}
    assert len(lps["tokens"]) == len(tok.encode("Hello! How are")) + 3


def test_echo_rules(server):
    r = httpx.post(server + "/v1/completions", json={"prompt": "Hello", "max_tokens": 0})
    assert r.status_code == 400 and "needs echo" in r.json()["error"]["message"]
    long = list(range(3, 3 + MAX_LEN + 1))
    r = httpx.post(server + "/v1/completions", json={"prompt": long, "max_tokens": 0, "echo": True, "logprobs": 1})
    assert r.status_code == 400 and "max_model_len" in r.json()["error"]["message"]


def test_tokenizer_endpoints(server, tok):
    info = httpx.get(server + "/tokenizer_info").json()
    assert info["eos_token"] == tok.special_tokens["eos_token"]
    assert info["chat_template"] == tok.chat_template
    ids = httpx.post(server + "/tokenize", json={"prompt": "Hello there", "add_special_tokens": False}).json()
    assert ids["tokens"] == tok.encode("Hello there", add_special_tokens=False)
    assert httpx.post(server + "/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == "Hello there"


def _write_tasks(root) -> str:
    tasks = root / "tasks"
    tasks.mkdir()
    with open(tasks / "mc.jsonl", "w") as f:
        for q, ch, a in [("What is the capital of France?", ["Paris", "Hello", "experts"], 0),
                         ("Numbers: 0 1 2", ["3", "café", "latent vector"], 0)]:
            f.write(json.dumps({"question": q, "choices": ch, "answer": a}) + "\n")
    with open(tasks / "gen.jsonl", "w") as f:
        for q, a in [("Hello! How are", " you"), ("The mixture of", " experts")]:
            f.write(json.dumps({"question": q, "answer": a}) + "\n")
    common = f"dataset_path: json\ntest_split: test\ndataset_kwargs:\n  cache_dir: {root / 'datasets'}\n  data_files:\n"
    (tasks / "mc.yaml").write_text(
        f"task: tiny_mc\n{common}    test: {tasks / 'mc.jsonl'}\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (tasks / "gen.yaml").write_text(
        f"task: tiny_gen\n{common}    test: {tasks / 'gen.jsonl'}\noutput_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return str(tasks)


def test_lm_eval_harness_local_completions(server, reference, tok, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=["tiny_mc", "tiny_gen"],
        model_args=f"model=tiny,base_url={server}/v1/completions,tokenizer_backend=remote,num_concurrent=1,"
                   "max_retries=1",
        task_manager=TaskManager(include_path=_write_tasks(tmp_path)), log_samples=True)
    # Log-likelihood: every choice's score is transformers' sum over the continuation tokens.
    samples = out["samples"]["tiny_mc"]
    assert len(samples) == 2
    for s in samples:
        for (context, continuation), ((loglik, greedy),) in zip(s["arguments"], s["resps"]):
            ctx = tok.encode(context, add_special_tokens=False)
            whole = tok.encode(context + continuation, add_special_tokens=False)
            ref = reference(whole)
            rows = range(len(ctx), len(whole))
            assert loglik == pytest.approx(sum(ref[i - 1, whole[i]].item() for i in rows), abs=1e-3)
            assert greedy == all(ref[i - 1].argmax().item() == whole[i] for i in rows)
    assert not math.isnan(out["results"]["tiny_mc"]["acc,none"])
    # Generate-until: the harness's text is the server's greedy continuation, cut at the stop string.
    for s in out["samples"]["tiny_gen"]:
        context = s["arguments"][0][0]
        ids = tok.encode(context, add_special_tokens=False)   # the harness sends ids, without BOS
        want = _post(server, prompt=ids, max_tokens=6, stop=["\n", tok.special_tokens["eos_token"]])
        want = want["choices"][0]["text"]
        assert s["resps"] == [[want]]
