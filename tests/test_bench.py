"""`latentmoe bench`: throughput and latency through the engine, serve against a live in-process server;
the numbers each reports are checked against what was asked (token counts) and against each other."""

from __future__ import annotations

import json

import pytest
from _server_helpers import free_port, make_checkpoint, server_thread

from latentmoe.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bench"))


def run_json(capsys, argv) -> dict:
    assert main(argv + ["--json", "-", "--no-progress"]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("\n{") + 1:])


def test_throughput_and_transformers(ckpt, capsys):
    r = run_json(capsys, ["bench", "throughput", ckpt, "--device", "cpu", "--num-prompts", "5", "--input-len", "12",
                          "--min-input-len", "4", "--output-len", "6", "--runs", "2", "--compare-transformers",
                          "--hf-batch-size", "2"])
    assert r["num_prompts"] == 5 and 5 * 4 <= r["input_tokens"] <= 5 * 12 and len(r["runs"]) == 2
    for run in r["runs"]:
        assert run["output_tokens"] == 5 * 6 and 5 * 4 <= run["input_tokens"] <= 5 * 12
        assert run["requests_per_s"] == pytest.approx(5 / run["seconds"])
        assert run["total_tokens_per_s"] == pytest.approx((run["input_tokens"] + 30) / run["seconds"])
    # New prompts each run: the second finds nothing of the first in the prefix cache.
    assert r["prefix_cache_hit_tokens"] == 0
    assert r["compilations_after_ready"] == 0 and r["graph_captures_after_ready"] == 0 and r["time_to_ready_s"] > 0
    hf = r["transformers"]
    assert hf["output_tokens"] == 30 and hf["requests_per_s"] == pytest.approx(5 / hf["seconds"])
    assert r["speedup_vs_transformers"] == pytest.approx(max(x["requests_per_s"] for x in r["runs"])
                                                         / hf["requests_per_s"])


def test_throughput_random_preset_and_latency(capsys):
    r = run_json(capsys, ["bench", "throughput", "random:tiny", "--device", "cpu", "--num-prompts", "3",
                          "--input-len", "5", "--output-len", "2", "--max-model-len", "64"])
    assert r["input_tokens"] == 15 and r["runs"][0]["output_tokens"] == 6
    lat = run_json(capsys, ["bench", "latency", "random:tiny", "--device", "cpu", "--batch-size", "2",
                            "--input-len", "8", "--output-len", "4", "--iters", "1", "--max-model-len", "64"])
    assert 0 < lat["prefill_s"] < lat["total_s"]
    assert lat["per_token_ms"] == pytest.approx((lat["total_s"] - lat["prefill_s"]) / 3 * 1e3)
    assert lat["prefix_cache_hit_tokens"] == 0   # every timed run prefills prompts of its own


def test_bench_bad_input_is_one_line(capsys, tmp_path):
    for argv, what in ((["bench", "throughput", str(tmp_path / "nope")], "checkpoint directory not found"),
                       (["bench", "throughput", "random:huge"], "unknown preset"),
                       (["bench", "latency", "random:tiny", "--batch-size", "0"], "--batch-size"),
                       (["bench", "serve", "--base-url", "localhost:1"], "--base-url")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert what in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_serve_against_a_live_server(ckpt, capsys):
    from latentmoe.engine import LLM, AsyncLLM
    from latentmoe.server import create_app

    app = create_app(AsyncLLM(LLM(ckpt, device="cpu", block_size=8)), "tiny-bench")
    with server_thread(app) as base:
        r = run_json(capsys, ["bench", "serve", "--base-url", base, "--num-prompts", "8", "--input-len", "10",
                              "--output-len", "5", "--max-concurrency", "3", "--request-rate", "50"])
        assert (r["model"], r["completed"], r["errors"]) == ("tiny-bench", 8, 0)
        assert r["output_tokens"] == 8 * 5 and r["prompt_tokens"] >= 8 * 10
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            q = r[key]
            assert 0 < q["p50"] <= q["p90"] <= q["p99"], (key, q)
        assert r["ttft_ms"]["p99"] <= r["e2e_ms"]["p99"]
        assert r["requests_per_s"] == pytest.approx(8 / r["duration_s"])
        assert 0 < r["client_cpu_share"] <= 1.05   # the load's own thread: CPU time within the run's wall time
        # A model the server does not have: every request fails, and is counted as such.
        assert main(["bench", "serve", "--base-url", base, "--model", "missing", "--num-prompts", "3",
                     "--input-len", "4", "--output-len", "2", "--no-progress", "--json", "-"]) == 1
        out = capsys.readouterr().out
        bad = json.loads(out[out.index("\n{") + 1:])
        assert (bad["completed"], bad["errors"]) == (0, 3) and "404" in bad["error_examples"][0]


def test_serve_token_ids_against_a_server_without_tokenizer(capsys):
    # No tokenizer: this server streams no text, only the final chunk and the usage; the request still counts,
    # its tokens from the usage, its first output at the end.
    from latentmoe import build_model, get_config
    from latentmoe.engine import LLM, AsyncLLM
    from latentmoe.server import create_app

    model = build_model(get_config("tiny", num_hidden_layers=2), seed=0).eval()
    app = create_app(AsyncLLM(LLM(model, block_size=8, num_blocks=64)), "no-tokenizer")
    with server_thread(app) as base:
        r = run_json(capsys, ["bench", "serve", "--base-url", base, "--num-prompts", "4", "--input-len", "6",
                              "--output-len", "3", "--token-ids"])
    assert (r["completed"], r["errors"], r["output_tokens"], r["prompt_tokens"]) == (4, 0, 12, 24)
    assert 0 < r["ttft_ms"]["p50"] <= r["e2e_ms"]["p50"]


def test_serve_without_a_usable_server_is_one_line(capsys):
    """No server at the address, a server that is not OpenAI-compatible, one that refuses: each a one-line
    error naming the URL (exit 2), not a traceback."""
    from fastapi import FastAPI

    argv = ["--num-prompts", "2", "--input-len", "4", "--output-len", "2", "--no-progress"]
    assert main(["bench", "serve", "--base-url", f"http://127.0.0.1:{free_port()}", *argv]) == 2
    err = capsys.readouterr().err
    assert "cannot reach" in err and "/v1/models" in err and "Traceback" not in err
    app = FastAPI()
    app.get("/v1/models")(lambda: {"models": ["x"]})
    with server_thread(app) as base:
        assert main(["bench", "serve", "--base-url", base, *argv]) == 2
        err = capsys.readouterr().err
        assert "did not list a model" in err and "--model" in err and "Traceback" not in err
        assert main(["bench", "serve", "--base-url", base + "/nothing-here", *argv]) == 2
        err = capsys.readouterr().err
        assert "HTTP 404" in err and "--model" in err and "Traceback" not in err


def test_serve_warns_when_the_client_was_the_limit(monkeypatch, capsys):
    """A load generator busy nearly all the run says so: its figures may be its own limit, not the server's."""
    import latentmoe.bench as bench

    def fake_load(base_url, prompts, output_len, **kwargs):
        q = {"mean": 1.0, "p50": 1.0, "p90": 1.0, "p99": 1.0}
        return dict(base_url=base_url, model="m", num_prompts=len(prompts), completed=len(prompts), errors=0,
                    error_examples=[], max_concurrency=None, request_rate=None, duration_s=1.0,
                    requests_per_s=float(len(prompts)), output_tokens=0, prompt_tokens=0, output_tokens_per_s=0.0,
                    total_tokens_per_s=0.0, ttft_ms=q, tpot_ms=q, itl_ms=q, e2e_ms=q, client_cpu_share=share)

    monkeypatch.setattr(bench, "serve_load", fake_load)
    for share, warned in ((0.97, True), (0.4, False)):
        assert main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--num-prompts", "2", "--input-len", "4",
                     "--output-len", "2", "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert f"{share:.0%}" in out and ("load generator was busy" in out) == warned
