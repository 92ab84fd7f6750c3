"""Training throughput: latentmoe's trainer step vs transformers' DeepseekV2 on the same config, same run.

Both: fp32 master weights, bf16 autocast, fused AdamW, gradient clipping 1.0, random tokens,
B sequences of T tokens. latentmoe's step also computes the three balance losses (the recipe);
transformers' computes its plain loss. Prints a markdown table with tokens/s, MFU (against the
GPU's dense bf16 peak), peak memory, and the physical ceiling (100% of the peak).

    python benchmarks/bench_train.py [--preset small] [--batch 8] [--seq 2048] [--steps 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from latentmoe.config import get_config  # noqa: E402
from latentmoe.model import build_model  # noqa: E402
from latentmoe.train.losses import balance_losses, cross_entropy  # noqa: E402
from latentmoe.train.trainer import PEAK_BF16, flops_per_token  # noqa: E402


def hf_model(cfg, device, std):
    """transformers' DeepseekV2ForCausalLM with the same shapes (grouped_mm experts, sdpa attention)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    hc = DeepseekV2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        n_shared_experts=cfg.n_shared_experts, n_routed_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, routed_scaling_factor=cfg.routed_scaling_factor,
        topk_method=cfg.topk_method, n_group=cfg.n_group, topk_group=cfg.topk_group,
        first_k_dense_replace=cfg.first_k_dense_replace, q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        max_position_embeddings=cfg.max_position_embeddings, initializer_range=std,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
    hc._attn_implementation = "sdpa"
    hc._experts_implementation = "grouped_mm" if device.type == "cuda" else "eager"
    model = DeepseekV2ForCausalLM(hc).to(device)
    with torch.no_grad():  # explicit init: a model built on a device may hold uninitialised memory
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, std)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()
    return model.train()


def time_steps(step, steps: int, warmup: int, device) -> float:
    for i in range(warmup):
        loss = step()
        if i == 0:
            print(f"  first-step loss {loss.item():.4f}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def make_step(model, optimizer, forward_loss, x, y, device):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = forward_loss(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def ours_loss(cfg):
    def fn(model, x, y):
        logits, routers = model(x, return_router=True)
        bal = balance_losses(routers, x.shape[0], x.shape[1], 1, 1, 0.003, 0.05, 0.02)
        return cross_entropy(logits, y) + bal["exp"] + bal["dev"] + bal["comm"]
    return fn


def hf_loss(model, x, y):
    return model(input_ids=x, labels=y).loss


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", default="ours,transformers,ours-compiled,ours-compiled-fused-moe",
                    help="comma-separated: ours, transformers, ours-compiled, ours-fused-moe, ours-compiled-fused-moe")
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    ap.add_argument("--overrides", default="", help="model config overrides k=v,k=v (CPU smoke runs)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    over = {k: int(v) for k, v in (kv.split("=") for kv in args.overrides.split(",") if kv)}
    cfg = get_config(args.preset, **over)
    B, T = args.batch, args.seq
    fpt = flops_per_token(cfg, T)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    g = torch.Generator().manual_seed(0)
    xy = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g).to(device)
    x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
    rows, errors = [], []
    for variant in args.variants.split(","):
        model = None
        try:
            torch.manual_seed(0)
            if variant.startswith("ours"):
                model = build_model(cfg, device=device, dtype=torch.float32, seed=0, std=0.006).train()
                if variant.startswith("ours-compiled"):
                    for layer in model.model.layers:
                        layer.compile()
                if variant.endswith("fused-moe"):  # the Triton experts with their own backward
                    model.set_experts_impl("triton")
                loss_fn, target = ours_loss(cfg), y
            else:
                model = hf_model(cfg, device, 0.006)
                loss_fn, target = hf_loss, x  # transformers shifts labels itself
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                    fused=device.type == "cuda" or None)
            t0 = time.perf_counter()
            step = make_step(model, opt, loss_fn, x, target, device)
            step_s = time_steps(step, args.steps, args.warmup, device)
            tok_s = B * T / step_s
            mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            rows.append((variant, tok_s, step_s, mem, time.perf_counter() - t0))
            print(f"{variant}: {tok_s:,.0f} tok/s, {1e3 * step_s:.1f} ms/step, {mem:.1f} GiB", flush=True)
        except Exception as e:  # one failing variant must not lose the others' numbers
            traceback.print_exc()
            errors.append(f"{variant}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ref = next((r[1] for r in rows if r[0] == "transformers"), None)
    lines = [f"Training step, `{args.preset}` preset ({cfg.num_parameters() / 1e9:.2f}B total, "
             f"{cfg.num_parameters(active=True) / 1e9:.2f}B active), B={B}, T={T}, bf16 autocast, fused AdamW, "
             f"on {name}; {fpt / 1e9:.2f} GFLOP/token.", "",
             "| implementation | tokens/s | ms/step | MFU | peak GiB | vs transformers |",
             "|---|---|---|---|---|---|"]
    for variant, tok_s, step_s, mem, _ in rows:
        mfu = f"{100 * tok_s * fpt / peak:.1f}%" if peak else "n/a"
        vs = f"{tok_s / ref:.2f}x" if ref else "n/a"
        lines.append(f"| {variant} | {tok_s:,.0f} | {1e3 * step_s:.1f} | {mfu} | {mem:.1f} | {vs} |")
    if peak:
        lines.append(f"| ceiling: 100% of {peak / 1e12:.0f} TFLOP/s | {peak / fpt:,.0f} | "
                     f"{1e3 * B * T * fpt / peak:.1f} | 100% | | |")
    for e in errors:
        lines.append(f"\nfailed: {e}")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"{datetime.date.today().isoformat()}, {name}, torch {torch.__version__}\n\n{table}\n")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
