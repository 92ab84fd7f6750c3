"""`POST /v1/chat/completions`: messages rendered with the checkpoint's chat template, `n` samples, chat logprobs.

A stream opens with one chunk per sample carrying the assistant role, as OpenAI's does.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..generation import Generation
from ..prompts import render_chat
from ..protocol import ChatCompletionRequest, bad_request
from ..responses import Envelope, chat_logprobs, delta_chunks
from ..state import ServerState, body_of, server_state
from ..streaming import sse_response, unless_disconnected

router = APIRouter()


@router.post("/chat/completions")
async def chat_completions(request: Request, req: ChatCompletionRequest = Depends(body_of(ChatCompletionRequest)),
                           state: ServerState = Depends(server_state)):
    state.check_model(req.model)
    if req.tools or req.tool_choice not in (None, "none"):
        raise bad_request("tools are not supported by this server", "tools")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    tok = state.tokenizer()
    if tok.chat_template is None:
        raise bad_request("this model has no chat template: use /v1/completions", "messages")
    k = (req.top_logprobs or 0) if req.logprobs else None
    params = req.sampling_params(req.max_completion_tokens if req.max_completion_tokens is not None
                                 else req.max_tokens, k, state.cache_salt(request, req.cache_salt), state.max_n)
    ids = await render_chat(tok, [m.for_template() for m in req.messages], req.add_generation_prompt,
                            state.max_prompt_chars)
    make_chunk = Envelope("chatcmpl", "chat.completion.chunk" if req.stream else "chat.completion",
                          state.model_name, req)

    def choice(i, c, start_tok, start_text):
        lps = (chat_logprobs(c.token_ids[start_tok:], c.logprobs[start_tok:], k, state.detokenizer)
               if k is not None else None)
        if not req.stream:
            return {"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": lps,
                    "finish_reason": c.finish_reason}
        text = c.text[start_text:]
        return {"index": c.index, "delta": {"content": text} if text else {}, "logprobs": lps,
                "finish_reason": c.finish_reason}

    gen = Generation(state.engine, state.metrics, [ids], params)
    await unless_disconnected(request, gen, gen.start())
    if req.stream:
        role = [{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for j in range(params.n)]
        return sse_response(gen, delta_chunks(choice, make_chunk, make_chunk(role), k is not None), make_chunk)
    await unless_disconnected(request, gen, gen.collect())
    # Built and serialized in a worker thread: n samples with logprobs can be megabytes of JSON.
    return await run_in_threadpool(lambda: JSONResponse(
        {**make_chunk([choice(0, c, 0, 0) for c in gen.final[0].outputs]), "usage": gen.usage()}))
