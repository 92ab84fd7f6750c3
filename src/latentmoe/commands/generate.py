"""`latentmoe generate PATH --prompt ...`: offline batch generation with the engine."""

from __future__ import annotations

import json
import sys

from ._engine_args import add_engine_args, build_llm, prepare


def add_sampling_args(p, max_tokens: int = 128) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--stop-token-id", type=int, action="append", default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)


def sampling_params(args, **extra):
    from ..engine import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop,
                          stop_token_ids=args.stop_token_id, ignore_eos=args.ignore_eos,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          repetition_penalty=args.repetition_penalty, **extra)


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate completions for prompts (offline batch)",
                       description="Load a checkpoint directory and complete prompts with the paged-latent-cache "
                                   "engine. Prompts are text (needs tokenizer.json in the directory) or, with "
                                   "--token-ids, comma-separated token ids.")
    p.add_argument("path", help="HF-format checkpoint directory or hub model id")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None,
                   help="one prompt per line; lines of JSON objects use their 'prompt' field")
    p.add_argument("--token-ids", action="store_true", help="prompts are comma-separated token ids")
    p.add_argument("--n", type=int, default=1, help="completions per prompt")
    p.add_argument("--logprobs", type=int, default=None, help="top alternatives per generated token")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout")
    p.add_argument("--stream", action="store_true", help="print tokens as they come (single prompt)")
    add_sampling_args(p)
    add_engine_args(p)
    p.set_defaults(func=run)


def _read_prompts(args) -> list:
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if line.lstrip().startswith("{"):
                    line = json.loads(line)["prompt"]
                prompts.append(line)
    if not prompts:
        raise ValueError("no prompts: give --prompt and/or --prompts-file")
    if args.token_ids:
        try:
            prompts = [[int(t) for t in str(p).replace(",", " ").split()] for p in prompts]
        except ValueError:
            raise ValueError("--token-ids expects comma-separated integers") from None
    return prompts


def run(args) -> int:
    prompts = _read_prompts(args)
    if args.stream and len(prompts) != 1:
        raise ValueError("--stream takes exactly one prompt")
    params = sampling_params(args, n=args.n, logprobs=args.logprobs)   # bad values fail before loading
    from ..engine.llm_engine import load_tokenizer
    path = prepare(args, args.path)
    tok = load_tokenizer(path)   # checked before the weights load; the engine then uses it
    if tok is None and not args.token_ids:
        raise ValueError(f"text prompts need a tokenizer and {args.path} has no tokenizer.json; pass token ids "
                         "with --token-ids")
    llm = build_llm(args, path, tokenizer=tok)
    if args.stream:
        shown = 0
        for out in llm.generate_stream(prompts[0], params):
            c = out.outputs[0]
            text = c.text if llm.tokenizer is not None else " ".join(map(str, c.token_ids))
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
        print()
        return 0
    outs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1 and not args.json)
    for out in outs:
        if args.json:
            print(json.dumps({"request_id": out.request_id, "prompt": out.prompt,
                              "prompt_token_ids": out.prompt_token_ids,
                              "outputs": [{"index": c.index, "text": c.text, "token_ids": c.token_ids,
                                           "finish_reason": c.finish_reason,
                                           "logprobs": [{str(k): v for k, v in d.items()} for d in c.logprobs]
                                           if c.logprobs is not None else None} for c in out.outputs]}))
            continue
        head = out.prompt if out.prompt is not None else " ".join(map(str, out.prompt_token_ids))
        print(f"=== prompt: {head!r}")
        for c in out.outputs:
            body = c.text if llm.tokenizer is not None else " ".join(map(str, c.token_ids))
            tag = f"[{c.index}] " if len(out.outputs) > 1 else ""
            print(f"{tag}{body}\n--- ({len(c.token_ids)} tokens, finish: {c.finish_reason})")
            if c.logprobs is not None:
                _print_logprobs(llm.tokenizer, c.token_ids, c.logprobs)
    return 0


def _print_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float]]) -> None:
    """One line per generated token: the token, its logprob, then the top alternatives."""
    def show(t: int) -> str:
        return repr(tokenizer.decode([t], skip_special_tokens=False)) if tokenizer is not None else str(t)

    for tid, lp in zip(token_ids, logprobs):
        top = sorted(lp.items(), key=lambda kv: -kv[1])
        alts = "  ".join(f"{show(t)} {v:.3f}" for t, v in top if t != tid)
        print(f"  {show(tid):>16} {lp[tid]:8.3f}" + (f"   | {alts}" if alts else ""))
