"""Prompts as the engine takes them (token ids): the completions `prompt` field, and chat messages rendered."""

from __future__ import annotations

from .protocol import bad_request


def completion_prompts(prompt, tokenizer) -> tuple[list[str | None], list[list[int]]]:
    """The prompt field (text, token ids, or a list of either) -> texts (None for ids) and token ids per prompt."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise bad_request("the prompt is empty", "prompt")
    texts, ids = [], []
    for p in prompt:
        if len(p) == 0:
            raise bad_request("the prompt is empty", "prompt")
        if isinstance(p, str):
            if tokenizer is None:
                raise bad_request("this model has no tokenizer: send token ids", "prompt")
            texts.append(p)
            ids.append(tokenizer.encode(p))
        else:
            texts.append(None)
            ids.append(list(p))
    return texts, ids


def render_chat(tok, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    import jinja2

    try:
        return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    except jinja2.TemplateError as e:   # raise_exception() in the template, or a sandbox violation
        raise bad_request(f"the chat template rejected the messages: {e}", "messages") from None
