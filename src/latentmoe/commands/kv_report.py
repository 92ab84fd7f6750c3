"""`latentmoe kv-report`: the KV cache of a model under MLA vs MHA / GQA-8 / MQA."""

from __future__ import annotations

import os


def register(sub) -> None:
    p = sub.add_parser("kv-report", help="KV-cache per token and per batch: MLA vs MHA / GQA / MQA",
                       description="Print the KV cache of a model (preset name or checkpoint directory) under "
                                   "MLA and under MHA, GQA-8 and MQA with the same heads and head dims.")
    p.add_argument("model", nargs="?", default="deepseek-v2-lite",
                   help="preset (deepseek-v2, deepseek-v2-lite, small, tiny), a checkpoint directory / config.json "
                        "or a hub model id (its config.json alone is fetched) (default: deepseek-v2-lite)")
    p.add_argument("--context", type=int, default=4096, help="context length in tokens (default 4096)")
    p.add_argument("--batch", type=int, default=1, help="number of sequences (default 1)")
    p.add_argument("--bytes-per-element", type=int, default=2, help="2 for bf16/fp16 (default), 1 for fp8")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoint.hub import is_hub_id, resolve_checkpoint
    from ..config import PRESETS, get_config
    from ..kv_report import format_report

    source = args.model
    # owner/name only: a bare word is a preset or a mistyped one, never looked up on the hub
    if source not in PRESETS and not os.path.exists(source) and "/" in source and is_hub_id(source):
        source = resolve_checkpoint(source, patterns=["config.json"])
    cfg = get_config(source)
    name = args.model if not os.path.exists(args.model) else os.path.basename(os.path.abspath(args.model))
    print(format_report(cfg, args.context, args.batch, args.bytes_per_element, name=name))
    return 0
