"""`latentmoe eval perplexity MODEL`: perplexity and bits per byte on text files or a built-in corpus split
(evaluation.perplexity does the computation), with a progress bar; the result as one JSON object. Registered by the
`eval` command as one of its subcommands."""

from __future__ import annotations

import json
import os
import sys


def add_parser(evals) -> None:
    p = evals.add_parser("perplexity", help="perplexity and bits per byte on text files or a corpus split",
                         description="Perplexity and bits per byte of a checkpoint on text files (each a document) "
                                     "or on a built-in corpus split (the documents training held out with the "
                                     "same --val-fraction and --max-chars). Prints one JSON object.")
    p.add_argument("model", help="checkpoint directory or hub model id")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--text", action="append", default=[], metavar="FILE",
                      help="a text file or directory of text files (repeatable); each file is one document")
    data.add_argument("--corpus", default=None,
                      help="a built-in corpus (python-docs, shakespeare) or a path, split like training data "
                           "(default: python-docs)")
    p.add_argument("--split", choices=["val", "train", "all"], default="val", help="corpus split (default: val)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="the training run's data.val_fraction")
    p.add_argument("--max-chars", type=int, default=0, help="the training run's data.max_chars (0: all)")
    p.add_argument("--max-documents", type=int, default=0, help="score at most this many documents (0: all)")
    p.add_argument("--max-len", type=int, default=None,
                   help="tokens per window (default: the model's max_position_embeddings, at most 2048)")
    p.add_argument("--stride", type=int, default=None,
                   help="new tokens scored per window, each with at least max-len - stride tokens of context "
                        "(default: max-len - 1)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="bfloat16 / float16 / float32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a hub model id")
    p.add_argument("--output", default=None, metavar="FILE", help="also write the JSON result to FILE")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _documents(args) -> tuple[str, list[str]]:
    if args.text:
        from ..train.data import local_texts
        for path in args.text:
            if not os.path.exists(path):
                raise FileNotFoundError(f"--text {path}: no such file or directory")
        return ", ".join(args.text), [d for path in args.text for d in local_texts(path)]
    from ..train.data import corpus_documents, document_split
    corpus = args.corpus or "python-docs"
    docs = corpus_documents(corpus, args.max_chars)
    if args.split != "all":
        docs = [d for i, d in enumerate(docs) if document_split(i, args.val_fraction) == args.split]
    return f"{corpus}:{args.split}", docs


def run(args) -> int:
    import torch

    from ..checkpoint import load_model, resolve_checkpoint, resolve_dtype
    from ..evaluation.perplexity import text_perplexity
    from ..tokenizer import Tokenizer
    from ._engine_args import check_device

    for name in ("max_len", "stride", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < (2 if name == "max_len" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be at least {2 if name == 'max_len' else 1}, got {v}")
    if args.max_len is not None and args.stride is not None and args.stride >= args.max_len:
        raise ValueError(f"--stride ({args.stride}) must be smaller than --max-len ({args.max_len})")
    if not 0 <= args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    # --device and --dtype are checked before anything is read or loaded.
    check_device(args.device)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device {args.device}: not a device such as 'cuda', 'cuda:1' or 'cpu'") from None
    dtype = resolve_dtype(args.dtype, device)
    path = resolve_checkpoint(args.model, args.revision)
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"{args.model} has no tokenizer.json: perplexity of text needs the model's tokenizer")
    source, texts = _documents(args)
    if args.max_documents:
        texts = texts[:args.max_documents]
    if not any(texts):
        raise ValueError(f"no text to score in {source}")
    model = load_model(path, device=device, dtype=dtype)
    max_len = args.max_len or min(model.config.max_position_embeddings, 2048)
    result = text_perplexity(model, Tokenizer.from_dir(path), texts, max_len, args.stride, args.batch_size,
                             progress=not args.no_progress)
    out = {"model": args.model, "data": source, **result.to_dict(), "max_len": max_len,
           "stride": args.stride or max_len - 1, "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    line = json.dumps(out)
    print(line)
    if args.output:
        with open(args.output, "w") as f:
            f.write(line + "\n")
    sys.stdout.flush()
    return 0
