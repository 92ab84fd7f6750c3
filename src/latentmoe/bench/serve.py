"""HTTP load against any OpenAI-compatible server (`/v1/completions`, streamed).

Requests arrive at `request_rate` per second (Poisson, seeded; inf = all at once) with at most
`max_concurrency` in flight. Per request: time to first token (TTFT), time per output token after
the first (TPOT) and the gaps between streamed chunks (ITL); a request that fails (HTTP error,
error event, broken stream) is counted and reported, never timed.
"""
from __future__ import annotations

import asyncio
import json
import random
import time

from .stats import percentiles

# Common short English words: most tokenizers spend about one token on each (with its space).
WORDS = ("the of and to in is that it for on with as was at by be this from or have an are not but "
         "one all were when we there can more if out so up said what its about into than them only other "
         "time new some could these two may first then do any like my now over such our man me even most "
         "made after also did many before must through back years where much your way well down should "
         "because each just those people how too little state good very make world still own see men work "
         "long get here between both life being under never day same another know while last might us great "
         "old year off come since against go came right used take three").split()


def text_prompts(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


async def _one(client, url: str, headers: dict, body: dict, result: dict) -> None:
    t0 = time.perf_counter()
    last = None
    itl, chunks, usage = [], 0, None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {r.status_code}: {text[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(str(event["error"])[:200])
                if event.get("usage"):
                    usage = event["usage"]
                choices = event.get("choices")
                # Output arrived: new text, a chunk that does not finish (servers that stream no text), or the
                # first output at all (a server that holds everything back until the end: TTFT = e2e then).
                if not choices or not (choices[0].get("text") or choices[0].get("finish_reason") is None
                                       or last is None):
                    continue
                now = time.perf_counter()
                if last is None:
                    result["ttft"] = now - t0
                else:
                    itl.append(now - last)
                last = now
                chunks += 1
        if last is None:
            raise RuntimeError("the stream ended without a token")
        result["e2e"] = time.perf_counter() - t0
        result["itl"] = itl
        result["output_tokens"] = usage["completion_tokens"] if usage else chunks
        result["prompt_tokens"] = usage["prompt_tokens"] if usage else None
        n = result["output_tokens"]
        result["tpot"] = (result["e2e"] - result["ttft"]) / (n - 1) if n > 1 else None
    except Exception as e:   # every failure is a result: counted, its message kept
        result["error"] = f"{type(e).__name__}: {e}"


async def _served_model(client, base_url: str, headers: dict) -> str:
    """The first model /v1/models lists; a ValueError (one line for the user) when the server cannot be
    reached or does not answer as an OpenAI-compatible one."""
    import httpx

    url = base_url + "/v1/models"
    try:
        r = await client.get(url, headers=headers)
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except httpx.HTTPStatusError as e:
        raise ValueError(f"{url} answered HTTP {e.response.status_code}; give the model's name with --model to "
                         "skip this request") from None
    except httpx.HTTPError as e:
        raise ValueError(f"cannot reach {url} ({type(e).__name__}: {e}); is the server running?") from None
    except (ValueError, KeyError, IndexError, TypeError):
        raise ValueError(f"{url} did not list a model as an OpenAI-compatible server does; give the model's "
                         "name with --model") from None


async def _run(base_url, model, prompts, output_len, max_concurrency, request_rate, api_key, timeout, seed,
               progress, extra_body):
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_concurrency or None, max_keepalive_connections=max_concurrency or None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        if model is None:
            model = await _served_model(client, base_url, headers)
        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        rng = random.Random(seed)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(prompts), desc="requests", unit="req")
        results = [dict() for _ in prompts]

        async def send(i, prompt):
            body = dict(model=model, prompt=prompt, max_tokens=output_len, stream=True, temperature=0.0,
                        stream_options={"include_usage": True}, ignore_eos=True, **extra_body)
            if sem is None:
                await _one(client, base_url + "/v1/completions", headers, body, results[i])
            else:
                async with sem:
                    await _one(client, base_url + "/v1/completions", headers, body, results[i])
            if bar is not None:
                bar.update(1)

        t0, cpu0 = time.perf_counter(), time.thread_time()
        tasks = []
        for i, p in enumerate(prompts):
            tasks.append(asyncio.create_task(send(i, p)))
            if request_rate != float("inf") and i + 1 < len(prompts):
                await asyncio.sleep(rng.expovariate(request_rate))
        await asyncio.gather(*tasks)
        elapsed, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
        if bar is not None:
            bar.close()
    return model, results, elapsed, cpu


def serve_load(base_url: str, prompts: list, output_len: int, *, model: str | None = None,
               max_concurrency: int | None = None, request_rate: float = float("inf"), api_key: str | None = None,
               timeout: float = 600.0, seed: int = 0, progress: bool = True, extra_body: dict | None = None) -> dict:
    """Send every prompt (text or token ids) to base_url's /v1/completions; the summary as a dict
    (latencies in milliseconds, percentiles over successful requests). `client_cpu_share`: the CPU time of this
    load's own thread over the run's wall time; near 1 the client, not the server, may be what the figures
    measure (every chunk of every stream is parsed here, in one Python thread)."""
    model, results, elapsed, cpu = asyncio.run(_run(base_url.rstrip("/"), model, prompts, output_len, max_concurrency,
                                               request_rate, api_key, timeout, seed, progress, extra_body or {}))
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    out_tokens = sum(r["output_tokens"] for r in ok)
    in_tokens = sum(r["prompt_tokens"] or 0 for r in ok)
    ms = lambda xs: {k: None if v is None else v * 1e3 for k, v in percentiles(xs).items()}   # noqa: E731
    return dict(base_url=base_url, model=model, num_prompts=len(prompts), completed=len(ok), errors=len(errors),
                error_examples=sorted(set(errors))[:5], max_concurrency=max_concurrency,
                request_rate=None if request_rate == float("inf") else request_rate, duration_s=elapsed,
                requests_per_s=len(ok) / elapsed, output_tokens=out_tokens, prompt_tokens=in_tokens,
                output_tokens_per_s=out_tokens / elapsed, total_tokens_per_s=(in_tokens + out_tokens) / elapsed,
                ttft_ms=ms([r["ttft"] for r in ok]), tpot_ms=ms([r["tpot"] for r in ok if r["tpot"] is not None]),
                itl_ms=ms([x for r in ok for x in r["itl"]]), e2e_ms=ms([r["e2e"] for r in ok]),
                client_cpu_share=cpu / elapsed)
