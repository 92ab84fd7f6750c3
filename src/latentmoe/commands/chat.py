"""`latentmoe chat PATH`: interactive chat — template applied, tokens streamed, history kept;
Ctrl-C stops the current answer, Ctrl-D (or /exit) leaves."""

from __future__ import annotations

import sys

from ._engine_args import add_engine_args, build_llm, prepare, use_interactive_budget
from .generate import add_sampling_args, sampling_params

HELP = ("commands: /reset (forget the history), /exit; start a message with // to send one that begins with /. "
        "Ctrl-C stops an answer; Ctrl-D leaves.")


def register(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat with a checkpoint (streams tokens, keeps history)",
                       description="Chat with a model: the tokenizer's chat template is applied to the whole "
                                   "history each turn. " + HELP)
    p.add_argument("path", help="HF-format checkpoint directory or hub model id with tokenizer.json")
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(p, max_tokens=512)
    add_engine_args(p)
    p.set_defaults(func=run, temperature=0.7, max_num_seqs=4)


def chat_turn(llm, messages: list[dict], params, out=None) -> tuple[str, str | None]:
    """Stream one answer to `out` (stdout); returns (answer text, finish reason). Ctrl-C ends the answer early."""
    out = out or sys.stdout
    tok = llm.tokenizer
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # Keep the prompt inside the context window: drop the oldest turns (never the system prompt).
    while len(ids) + 1 >= llm.max_model_len and len(messages) > 2:
        drop = 1 if messages[0]["role"] == "system" else 0
        del messages[drop:drop + 2]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    max_tokens = min(params.max_tokens or llm.max_model_len, llm.max_model_len - len(ids))
    turn = type(params)(**{**params.__dict__, "max_tokens": max_tokens})
    stream = llm.generate_stream(ids, turn)
    text, reason = "", None
    try:
        for o in stream:
            c = o.outputs[0]
            out.write(c.text[len(text):])
            out.flush()
            text, reason = c.text, c.finish_reason
    except KeyboardInterrupt:
        stream.close()   # aborts the request: its cache blocks are freed
        reason = "abort"
        out.write(" [stopped]")
    out.write("\n")
    return text.strip(), reason


def run(args) -> int:
    params = sampling_params(args)   # bad values fail before loading
    from ..engine.llm_engine import load_tokenizer
    use_interactive_budget(args)
    path = prepare(args, args.path)
    # The tokenizer is checked before the weights load (minutes for a large checkpoint).
    tok = load_tokenizer(path)
    if tok is None:
        raise ValueError(f"{args.path} has no tokenizer.json: chat needs one")
    if tok.chat_template is None:
        raise ValueError(f"the tokenizer in {args.path} has no chat template")
    llm = build_llm(args, path, tokenizer=tok)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print(f"chatting with {args.path} (max_model_len {llm.max_model_len}). {HELP}", file=sys.stderr)
    while True:
        try:
            user = input("\nUser: ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        cmd = user.strip()
        if not cmd:
            continue
        if cmd == "/exit":
            return 0
        if cmd == "/reset":
            messages = list(system)
            print("(history cleared)", file=sys.stderr)
            continue
        if cmd.startswith("//"):
            user = user.replace("//", "/", 1)
        elif cmd.startswith("/"):   # a mistyped command is not a message to the model
            print(f"unknown command {cmd.split()[0]}; {HELP}", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": user})
        sys.stdout.write("Assistant: ")
        answer, _ = chat_turn(llm, messages, params)
        messages.append({"role": "assistant", "content": answer})
