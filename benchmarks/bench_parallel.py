"""Multi-GPU runs on one host: expert-parallel training and serving against the 1-GPU runs.

Run on a machine with N >= 2 GPUs:
    python benchmarks/bench_parallel.py --gpus 2 --out results/parallel.md

Training: the `small` preset (or --train-config), the same global batch on 1 GPU and on N GPUs with
`--parallel.ep_size N` (torchrun, NCCL), device-limited routing to M=1 of N expert groups on both so
the two runs route alike; tokens/s per GPU, scaling efficiency and the first steps' losses side by side.
Serving: a V2-Lite-shaped model (depth reduced with --serve-layers to keep the checkpoint small),
the engine on one GPU and on N GPUs (`tensor_parallel_size=N`: one process per GPU, routed experts
split by width, or whole with --expert-parallel): greedy outputs compared, decode tok/s at batch 256
and context 1,024.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))


def train_run(world: int, run_dir: str, args) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
           "--master-addr", "127.0.0.1", "--master-port", str(29500 + world),
           "-m", "latentmoe", "train", "--config", args.train_config, "--run_dir", run_dir,
           "--train.max_steps", str(args.steps), "--train.batch_size", str(args.batch),
           "--train.batch_size_start", str(args.batch), "--train.micro_batch_size", str(args.micro),
           "--parallel.ep_size", str(world), "--routing.devices", str(args.gpus), "--routing.max_devices", "1",
           "--routing.drop_tokens", "false", "--precision.compile", "false", "--checkpoint.save_optimizer", "false",
           "--logging.progress", "false", "--logging.eval_interval", "0", "--data.max_chars", "3000000",
           *args.train_args.split()]
    env = dict(os.environ, OMP_NUM_THREADS="4", NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               NVSHMEM_DISABLE_NVLS="1")
    t = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.train_timeout)
    print(f"[train x{world}] rc={done.returncode} in {time.time() - t:.0f}s", flush=True)
    if done.returncode != 0:
        print(done.stdout[-4000:], done.stderr[-4000:], flush=True)
        return []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def serve_compare(args, tmp: str) -> list[str]:
    from bench_engine import engine_decode

    from latentmoe import build_model, get_config, save_model
    from latentmoe.engine import LLM, SamplingParams

    cfg = get_config("deepseek-v2-lite", num_hidden_layers=args.serve_layers)
    path = os.path.join(tmp, "lite")
    model = build_model(cfg, device="cuda", dtype=torch.bfloat16, seed=0, std=0.02)
    save_model(model, path)
    del model
    torch.cuda.empty_cache()
    prompts = [torch.randint(0, cfg.vocab_size, (int(n),), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (5, 17, 64, 300)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    rows, outs = [], {}
    for n in (1, args.gpus):
        options = dict(max_num_seqs=256, max_model_len=2048, cache_memory_gb=20)
        llm = LLM(path, device="cuda", dtype=torch.bfloat16, tensor_parallel_size=n,
                  enable_expert_parallel=args.expert_parallel and n > 1, **options)
        outs[n] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        step, host = engine_decode(llm, 256, 1024, 6)
        mode = ("expert-parallel" if args.expert_parallel else "tensor-parallel") if n > 1 else "one process"
        rows.append(f"| serve, {n} GPU{'s' if n > 1 else ''} ({mode}) | "
                    f"{256 / step:,.0f} tok/s decode (B=256, L=1,024) | step {step * 1e3:.1f} ms, host {host * 1e3:.1f} ms |")
        llm.close()
        del llm
        torch.cuda.empty_cache()
    same = sum(a == b for a, b in zip(outs[1], outs[args.gpus]))
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                  for a, b in zip(outs[1], outs[args.gpus])]
    rows.append(f"| greedy outputs, 1 GPU vs {args.gpus} GPUs (bf16) | {same}/{len(prompts)} identical over 16 tokens | "
                f"first differing position per prompt: {first_diff} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    ap.add_argument("--train-config", default="small")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16, help="sequences per optimizer step (global)")
    ap.add_argument("--micro", type=int, default=8, help="sequences per forward on one GPU")
    ap.add_argument("--train-timeout", type=int, default=240)
    ap.add_argument("--train-args", default="", help="more `latentmoe train` overrides, e.g. "
                    "'--model.preset deepseek-v2-lite --model.overrides.num_hidden_layers 4'")
    ap.add_argument("--serve-layers", type=int, default=4)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--expert-parallel", action="store_true", help="serve with whole experts spread over the GPUs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.gpus < 2 or torch.cuda.device_count() < args.gpus:
        sys.exit(f"needs {args.gpus} >= 2 CUDA devices, found {torch.cuda.device_count()}")
    lines = [f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; device: "
             f"{args.gpus} x {torch.cuda.get_device_name(0)}; torch {torch.__version__}; command: "
             f"python benchmarks/bench_parallel.py {' '.join(sys.argv[1:])}", "",
             "| run | result | detail |", "|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_train:
            res = {w: train_run(w, os.path.join(tmp, f"run{w}"), args) for w in (1, args.gpus)}
            if res[1] and res[args.gpus]:
                tok = {w: sum(m["tok_s"] for m in r[3:]) / len(r[3:]) for w, r in res.items()}
                mfu = {w: sum(m.get("mfu", 0) for m in r[3:]) / len(r[3:]) for w, r in res.items()}
                per_gpu = tok[args.gpus] / args.gpus
                label = f"{args.train_config} {args.train_args}".strip()
                lines.append(f"| train `{label}` ({args.batch} seqs/step, {args.micro} per forward), 1 GPU | {tok[1]:,.0f} tok/s | MFU {100 * mfu[1]:.1f}% |")
                lines.append(f"| train `{label}`, {args.gpus} GPUs, EP {args.gpus} | {tok[args.gpus]:,.0f} tok/s "
                             f"({per_gpu:,.0f} per GPU) | scaling efficiency {per_gpu / tok[1]:.0%}; "
                             f"MFU {100 * mfu[args.gpus] / args.gpus:.1f}% per GPU |")
                pairs = ", ".join(f"{a['loss']:.4f}/{b['loss']:.4f}" for a, b in zip(res[1][:5], res[args.gpus][:5]))
                lines.append(f"| losses, first 5 steps (1 GPU / {args.gpus} GPUs) | {pairs} | |")
            else:
                lines.append("| train | failed | see the log above |")
        if not args.skip_serve:
            lines += serve_compare(args, tmp)
    text = "\n".join(lines)
    print(text, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
