"""`POST /v1/completions`: text or token-id prompts (several at once), `n` samples each, `echo`, legacy logprobs.

Choice `i * n + j` is sample j of prompt i, as OpenAI numbers them; all prompts go to the engine together so they
batch. `echo` with `logprobs` also reports the prompt tokens' log-probabilities (and `max_tokens: 0` only those):
what lm-evaluation-harness's log-likelihood tasks send. They come from one plain forward of the model per prompt
(evaluation.scoring), run in a worker thread beside the engine's steps.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ...evaluation.scoring import token_logprobs
from ..generation import Generation
from ..prompts import completion_prompts
from ..protocol import CompletionRequest, bad_request
from ..responses import Envelope, completion_logprobs, delta_chunks, join_logprobs, prompt_logprobs
from ..state import ServerState, body_of, server_state
from ..streaming import sse_response, unless_disconnected

router = APIRouter()


@router.post("/completions")
async def completions(request: Request, req: CompletionRequest = Depends(body_of(CompletionRequest)),
                      state: ServerState = Depends(server_state)):
    state.check_model(req.model)
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if req.best_of not in (None, req.n):
        raise bad_request("best_of must equal n (no server-side ranking)", "best_of")
    echo_only = req.max_tokens == 0
    if echo_only and not req.echo:
        raise bad_request("max_tokens 0 needs echo (it returns the prompt only)", "max_tokens")
    if echo_only and req.stream:
        raise bad_request("max_tokens 0 (the prompt only) cannot be streamed", "stream")
    params = req.sampling_params(1 if echo_only else req.max_tokens, req.logprobs,
                                 state.cache_salt(request, req.cache_salt), state.max_n)
    texts, prompts = await completion_prompts(req.prompt, state.engine.tokenizer, state.max_prompt_chars)
    if req.echo and any(t is None for t in texts):
        tok = state.tokenizer()
        texts = await run_in_threadpool(lambda: [t if t is not None else tok.decode(p, skip_special_tokens=False)
                                                 for t, p in zip(texts, prompts)])
    scores = await _prompt_scores(state, prompts, req.logprobs) if req.echo and req.logprobs is not None else None
    n, make_chunk = params.n, Envelope("cmpl", "text_completion", state.model_name, req)

    def choice(i, c, start_tok, start_text):
        text = c.text[start_text:]
        if req.echo and start_tok == 0:
            text = texts[i] + text
        lps = None
        if req.logprobs is not None:
            lps = completion_logprobs(c.token_ids[start_tok:], c.logprobs[start_tok:], req.logprobs,
                                      state.detokenizer, offset=start_text)
            if scores is not None and start_tok == 0:
                lps = join_logprobs(scores[i], lps)
        return {"index": i * n + c.index, "text": text, "logprobs": lps, "finish_reason": c.finish_reason}

    if echo_only:
        choices = [{"index": i * n + j, "text": texts[i], "logprobs": scores[i] if scores is not None else None,
                    "finish_reason": "length"} for i in range(len(prompts)) for j in range(n)]
        usage = sum(map(len, prompts))
        return {**make_chunk(choices), "usage": {"prompt_tokens": usage, "completion_tokens": 0,
                                                 "total_tokens": usage}}
    gen = Generation(state.engine, state.metrics, prompts, params)
    await unless_disconnected(request, gen, gen.start())
    if req.stream:
        return sse_response(gen, delta_chunks(choice, make_chunk, every_token=req.logprobs is not None), make_chunk)
    await unless_disconnected(request, gen, gen.collect())
    # Built and serialized in a worker thread: n samples with logprobs can be megabytes of JSON.
    return await run_in_threadpool(lambda: JSONResponse(
        {**make_chunk([choice(i, c, 0, 0) for i in sorted(gen.final) for c in gen.final[i].outputs]),
         "usage": gen.usage()}))


async def _prompt_scores(state: ServerState, prompts: list[list[int]], k: int) -> list[dict]:
    """The legacy logprobs block of each prompt's own tokens (checked against the context length first)."""
    limit = state.engine.max_model_len
    for p in prompts:
        if len(p) > limit:
            raise bad_request(f"the prompt has {len(p)} tokens, more than max_model_len {limit}", "prompt")
    model = state.engine.llm.model

    def score():
        return [prompt_logprobs(p, *token_logprobs(model, p, k), k, state.detokenizer) for p in prompts]

    return await asyncio.get_running_loop().run_in_executor(None, score)
