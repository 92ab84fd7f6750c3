"""Prompts as the engine takes them (token ids): the completions `prompt` field, and chat messages rendered.

Tokenizing and rendering run in a worker thread, so a large prompt never holds up the event loop (other requests,
/health); and text too long to fit in max_model_len tokens is refused before it is tokenized at all.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from .protocol import bad_request


async def completion_prompts(prompt, tokenizer, max_chars: int | None = None
                             ) -> tuple[list[str | None], list[list[int]]]:
    """The prompt field (text, token ids, or a list of either) -> texts (None for ids) and token ids per prompt."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise bad_request("the prompt is empty", "prompt")
    texts = []
    for p in prompt:
        if len(p) == 0:
            raise bad_request("the prompt is empty", "prompt")
        if isinstance(p, str):
            if tokenizer is None:
                raise bad_request("this model has no tokenizer: send token ids", "prompt")
            if max_chars is not None and len(p) > max_chars:
                raise bad_request(f"the prompt has {len(p)} characters: more than fit in the model's context",
                                  "prompt")
            texts.append(p)
        else:
            texts.append(None)
    to_encode = [t for t in texts if t is not None]
    encoded = iter(await run_in_threadpool(tokenizer.encode_batch, to_encode) if to_encode else [])
    return texts, [next(encoded) if t is not None else list(p) for t, p in zip(texts, prompt)]


def _render(tok, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    import jinja2

    try:
        return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    except jinja2.TemplateError as e:   # raise_exception() in the template, or a sandbox violation
        raise bad_request(f"the chat template rejected the messages: {e}", "messages") from None
    except ValueError as e:   # special-token text the template would not let us keep as text
        raise bad_request(str(e), "messages") from None


async def render_chat(tok, messages: list[dict], add_generation_prompt: bool, max_chars: int | None = None
                      ) -> list[int]:
    """The messages through the chat template, as token ids; special-token text typed in a message stays text."""
    if max_chars is not None:
        chars = sum(len(v) for m in messages for v in m.values() if isinstance(v, str))
        if chars > max_chars:
            raise bad_request(f"the messages have {chars} characters: more than fit in the model's context",
                              "messages")
    return await run_in_threadpool(_render, tok, messages, add_generation_prompt)
