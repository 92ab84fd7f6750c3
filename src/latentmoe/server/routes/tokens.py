"""`/tokenize`, `/detokenize` and `/tokenizer_info` (vLLM's extension): the server's own tokenizer and chat template,
for clients that count tokens or build prompts from ids (lm-evaluation-harness's `tokenizer_backend=remote` uses all
three). Open like /health (no API key): they run the tokenizer, never the model, in a worker thread and on bounded
input (the request-size limit, and text no longer than the context can hold)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from ..prompts import render_chat
from ..protocol import DetokenizeRequest, TokenizeRequest, bad_request
from ..state import ServerState, body_of, server_state

router = APIRouter()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest = Depends(body_of(TokenizeRequest)),
                   state: ServerState = Depends(server_state)):
    state.check_model(body.model)
    tok = state.tokenizer()
    if body.messages is not None:
        if tok.chat_template is None:
            raise bad_request("this model has no chat template: send 'prompt'", "messages")
        ids = await render_chat(tok, [m.for_template() for m in body.messages], body.add_generation_prompt,
                                state.max_prompt_chars)
    elif body.prompt is not None:
        state.check_prompt_chars(len(body.prompt), "prompt")
        ids = await run_in_threadpool(tok.encode, body.prompt, body.add_special_tokens)
    else:
        raise bad_request("send 'prompt' or 'messages'", "prompt")
    return {"tokens": ids, "count": len(ids), "max_model_len": state.engine.max_model_len}


@router.get("/tokenizer_info")
async def tokenizer_info(state: ServerState = Depends(server_state)):
    tok = state.tokenizer()
    special = tok.special_tokens
    return {"tokenizer_class": "latentmoe.Tokenizer", "vocab_size": tok.vocab_size,
            "bos_token": special.get("bos_token"), "eos_token": special.get("eos_token"),
            "pad_token": special.get("pad_token"), "unk_token": special.get("unk_token"),
            "add_bos_token": tok.add_bos_token, "chat_template": tok.chat_template,
            "model_max_length": state.engine.max_model_len}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest = Depends(body_of(DetokenizeRequest)),
                     state: ServerState = Depends(server_state)):
    state.check_model(body.model)
    tok = state.tokenizer()
    bad = [t for t in body.tokens if not 0 <= t < tok.vocab_size]
    if bad:
        raise bad_request(f"token ids out of the vocabulary [0, {tok.vocab_size}): {bad[:5]}", "tokens")
    return {"prompt": await run_in_threadpool(tok.decode, body.tokens, False)}
