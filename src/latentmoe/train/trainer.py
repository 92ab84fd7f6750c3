"""The training loop, as small functions: build_model, build_optimizer, train_step, evaluate,
save/load. Where the loop meets parallelism it calls its plan (`latentmoe.parallel.training`): one
plain process, or expert parallelism + ZeRO-1 under torchrun, applied to the built model from
outside; the loop reads the same either way. Only rank 0 logs and shows progress.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch

from ..checkpoint.commit import checkpoint_dirs, newest_valid, recover
from ..checkpoint.integrity import CheckpointError
from ..checkpoint.training import rng_state, set_rng_state
from ..model import DeepseekV2ForCausalLM, build_model as _build_model
from ..parallel.training import TrainPlan, training_plan
from ..tokenizer import Tokenizer
from .config import TrainConfig
from .data import PasskeyMix, TokenData, prepare_data
from .losses import balance_losses, cross_entropy
from .optim import batch_size_at, build_optimizer, lr_at, total_tokens
from .routing import DeviceDropper, configure_routing, inference_config, protected_tokens

_EVAL_SEED = 1_000_003  # val batches: the same at every evaluation, and for every training seed


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the last checkpoint on disk is untouched."""


@dataclass
class Run:
    cfg: TrainConfig
    model: DeepseekV2ForCausalLM          # with this rank's experts under expert parallelism
    optimizer: torch.optim.Optimizer      # wrapped by the plan (ZeRO-1) under torchrun
    train_data: TokenData | PasskeyMix
    val_data: TokenData
    data_dir: str
    device: torch.device
    dropper: DeviceDropper | None
    plan: TrainPlan
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0                 # training seconds before this process (resumed runs)
    history: list = field(default_factory=list)


# ----------------------------------------------------------------------------- setup
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_ctx(cfg: TrainConfig, device: torch.device):
    mode = cfg.precision.autocast
    if mode == "bf16" or (mode == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model(cfg: TrainConfig, model_cfg, device: torch.device) -> DeepseekV2ForCausalLM:
    """fp32 master weights (autocast computes in bf16), the report's init std, routing rules set."""
    model = _build_model(model_cfg, device=device, dtype=torch.float32, seed=cfg.train.seed,
                         std=cfg.model.init_std)
    if cfg.model.init_from:  # continue from trained weights (e.g. the YaRN context extension)
        from ..checkpoint.hf import checkpoint_entries, fill_from_checkpoint
        ignore = {"lm_head.weight"} if model_cfg.tie_word_embeddings else set()
        with torch.no_grad():
            fill_from_checkpoint(cfg.model.init_from, dict(checkpoint_entries(model)), strict=True, ignore=ignore,
                                 what="model.init_from's config")
    model.gradient_checkpointing = cfg.precision.activation_checkpointing
    if cfg.precision.fused_moe:  # off by default: faster alone, but a graph break inside compiled blocks
        model.set_experts_impl("triton")
    model.train()
    return model


def setup(cfg: TrainConfig, resume: bool = False, log=print) -> Run:
    if cfg.precision.threads:
        torch.set_num_threads(cfg.precision.threads)
    plan = training_plan(cfg, resolve_device(cfg.precision.device))
    device = plan.device
    if resume and not checkpoint_dirs(cfg.run_dir):   # said before the corpus is tokenized
        raise FileNotFoundError(f"--resume: no checkpoint in {cfg.run_dir}/checkpoints (start the run without "
                                f"--resume)")
    os.makedirs(cfg.run_dir, exist_ok=True)
    if plan.is_main:
        recover(cfg.run_dir)   # what an interrupted save left behind
    plan.barrier()
    if not resume and plan.is_main:
        _start_fresh(cfg)
    if cfg.model.init_from and cfg.data.tokenizer == "train":  # the starting model's own tokenizer
        cfg.data.tokenizer = cfg.model.init_from
    data_dir = cfg.data.cache_dir or os.path.join(cfg.run_dir, "data")
    if plan.is_main:  # rank 0 tokenizes; after the barrier the others find the shards ready
        prepare_data(cfg.data, data_dir, log=log)
    plan.barrier()
    prepare_data(cfg.data, data_dir, log=lambda *a: None)
    train_data, val_data = TokenData(data_dir, "train"), TokenData(data_dir, "val")
    if cfg.data.passkey_fraction > 0:
        train_data = PasskeyMix(train_data, Tokenizer.from_dir(data_dir), cfg.data.passkey_fraction,
                                cfg.data.passkey_max_len)
    special = {k: v for k, v in train_data.meta["special"].items() if v is not None}
    model_cfg = cfg.model_config(vocab_size=train_data.meta["vocab_size"], special=special)
    inference_config(model_cfg, cfg.routing)  # fail early on conflicting routing settings
    model = plan.apply(build_model(cfg, model_cfg, device), cfg)
    dropper = configure_routing(model, cfg.routing)
    optimizer = plan.wrap_optimizer(build_optimizer(model, cfg.optim), model)
    if cfg.precision.compile:
        # Block by block: the blocks share one compiled graph (compile time of one layer), the
        # state-dict names stay unchanged, and the loop over layers stays in Python.
        for layer in model.model.layers:
            layer.compile()
    run = Run(cfg, model, optimizer, train_data, val_data, data_dir, device, dropper, plan)
    if resume:
        ckpts = checkpoint_dirs(cfg.run_dir)
        newest = newest_valid(cfg.run_dir, warn=lambda m: log(f"warning: {m}") if plan.is_main else None)
        if newest is None:
            raise CheckpointError(f"--resume: every checkpoint in {cfg.run_dir}/checkpoints is damaged")
        ckpts = [c for c in ckpts if c <= newest]   # the newest whole one last
        state = plan.load(ckpts[-1], model, optimizer)  # written on any number of ranks
        run.step, run.tokens, run.elapsed = state["step"], state["tokens"], state.get("elapsed", 0.0)
        set_rng_state(state["rng"])
        if plan.is_main:  # rank 0 alone owns metrics.jsonl (other ranks rewriting it would race its appends)
            _truncate_metrics(cfg.run_dir, run.step)
            log(f"resumed from {ckpts[-1]} at step {run.step} ({run.tokens:,} tokens)")
    elif plan.is_main:
        cfg.save(os.path.join(cfg.run_dir, "config.toml"))
    return run


# ----------------------------------------------------------------------------- steps
def loss_fn(run: Run, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict, list]:
    logits, routers = run.model(x, return_router=True)
    ce = cross_entropy(logits, y)
    lc, rc = run.cfg.loss, run.cfg.routing
    bal = balance_losses(routers, x.shape[0], x.shape[1], rc.devices, rc.max_devices, lc.alpha1, lc.alpha2, lc.alpha3)
    total = ce + bal["exp"] + bal["dev"] + bal["comm"]
    return total, {"ce": ce, **bal}, routers


def train_step(run: Run) -> dict:
    """One optimizer step (gradient accumulation over micro-batches); returns the step's metrics."""
    cfg, tc = run.cfg, run.cfg.train
    t0 = time.perf_counter()
    batch = batch_size_at(run.tokens, tc)
    accum = batch // tc.micro_batch_size
    lr = lr_at(run.step, run.tokens, cfg.optim, total_tokens(tc))
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    parts = {k: torch.zeros((), device=run.device) for k in ("loss", "ce", "exp", "dev", "comm")}
    loads, kept, n_assign = None, torch.zeros((), device=run.device), 0
    for micro in run.plan.micro_batches(accum):
        x, y = run.train_data.batch(tc.micro_batch_size, tc.seq_len, [tc.seed, run.step, micro])
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        if run.dropper is not None:
            gen = torch.Generator().manual_seed(hash((tc.seed, run.step, micro)) & 0x7FFFFFFF)
            run.dropper.protected = protected_tokens(x.shape[0], x.shape[1], cfg.routing.protect_fraction,
                                                     gen, run.device)
        with autocast_ctx(cfg, run.device):
            total, terms, routers = loss_fn(run, x, y)
        (total / accum).backward()
        with torch.no_grad():
            parts["loss"] += total.detach() / accum
            for k, v in terms.items():
                parts[k] += v.detach() / accum
            counts = [_counts(r.topk_idx, r.scores.shape[-1]) for r in routers]
            if counts:
                loads = torch.stack(counts) if loads is None else loads + torch.stack(counts)
            for r in routers:
                if r.kept is not None:
                    kept += r.kept.sum()
                n_assign += r.topk_idx.numel()
    # Under torchrun: metrics and gradients summed over the ranks, clipped by the global norm.
    parts, loads, kept, n_assign = run.plan.reduce_metrics(parts, loads, kept, n_assign)
    grad_norm = run.plan.clip_gradients(run.model, cfg.optim.grad_clip)
    # One host sync per step: the finiteness check must precede the update.
    scalars = torch.stack([parts[k].float() for k in ("loss", "ce", "exp", "dev", "comm")] + [grad_norm.float()]).tolist()
    loss, ce, l_exp, l_dev, l_comm, gn = scalars
    if not all(math.isfinite(v) for v in (loss, gn)):
        run.optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(
            f"step {run.step}: loss {loss} (cross-entropy {ce}), grad norm {gn} is not finite; stopping "
            f"before the update. The last checkpoint in {run.cfg.run_dir}/checkpoints is intact: resume with "
            f"--resume and a lower optim.lr, or check the data.")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    step_tokens = batch * tc.seq_len
    run.step += 1
    run.tokens += step_tokens
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    metrics = {"step": run.step, "tokens": run.tokens, "epochs": run.tokens / max(run.train_data.num_tokens, 1),
               "loss": loss, "ce": ce, "l_exp": l_exp, "l_dev": l_dev,
               "l_comm": l_comm, "grad_norm": gn, "lr": lr, "batch_size": batch, "step_time": dt,
               "tok_s": step_tokens / dt}
    if loads is not None:
        load = loads.float()
        frac = (load / load.sum(-1, keepdim=True)).tolist()
        metrics["expert_load"] = [[round(v, 5) for v in row] for row in frac]
        metrics["load_cv"] = [round(v, 5) for v in (load.std(-1, unbiased=False) / load.mean(-1)).tolist()]
        metrics["dropped_frac"] = (1.0 - kept.item() / n_assign) if run.dropper is not None and n_assign else 0.0
    mfu = model_flops_utilization(run, metrics["tok_s"])
    if mfu is not None:
        metrics["mfu"] = mfu
    return metrics


def _counts(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Occurrences of 0..n-1 in idx; unlike torch.bincount on CUDA, no host sync."""
    flat = idx.flatten()
    return torch.zeros(n, dtype=torch.int64, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """Validation loss/perplexity on fixed batches; eval mode, so nothing is dropped. The batches do not depend
    on train.seed: runs that differ only in their seed are measured on the same text."""
    tc, lc = run.cfg.train, run.cfg.logging
    run.model.eval()
    losses = []
    for i in range(lc.eval_batches):
        x, y = run.val_data.batch(tc.micro_batch_size, tc.seq_len, [_EVAL_SEED, i])
        with autocast_ctx(run.cfg, run.device):
            logits = run.model(x.to(run.device))
        losses.append(cross_entropy(logits, y.to(run.device)))
    run.model.train()
    val = torch.stack(losses).mean().item()
    return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}


# ----------------------------------------------------------------------------- flops
def flops_per_token(model_cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active matmul parameters + causal attention (3 x forward)."""
    c = model_cfg
    embed = c.vocab_size * c.hidden_size if not c.tie_word_embeddings else 0
    dense = 6 * (c.num_parameters(active=True) - embed)
    attn = 3 * c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * seq_len
    return float(dense + attn)


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "B200": 2250e12, "A100": 312e12,
             "A800": 312e12, "L40S": 362e12, "4090": 165e12}


def peak_flops(run: Run) -> float | None:
    if run.cfg.logging.peak_tflops:
        return run.cfg.logging.peak_tflops * 1e12
    if run.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(run.device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def model_flops_utilization(run: Run, tok_s: float) -> float | None:
    peak = peak_flops(run)
    return None if peak is None else tok_s * flops_per_token(run.model.config, run.cfg.train.seq_len) / peak


# ----------------------------------------------------------------------------- save
def save(run: Run) -> str:
    """Checkpoint `step-N` (collective: every rank writes its part). The model is saved with the
    inference config (routing as trained) and the tokenizer beside it."""
    oc = run.cfg.checkpoint
    state = {"step": run.step, "tokens": run.tokens, "elapsed": run.elapsed, "rng": rng_state(),
             "config": run.cfg.to_dict()}
    return run.plan.save(run.cfg.run_dir, run.model, run.optimizer if oc.save_optimizer else None, state,
                         inference_config(run.model.config, run.cfg.routing), run.data_dir, oc.keep)


_FIT_CALIBRATION_STEPS = 6


def _fit_to_time(run: Run, step_s: float, remaining_s: float, progress) -> int:
    """Cut max_steps so the loop ends in time; the schedule's token budget follows (decays
    stay at their fractions). The shortened config is saved, so a resume keeps it."""
    tc, lc = run.cfg.train, run.cfg.logging
    evals = (tc.max_steps - run.step) / lc.eval_interval if lc.eval_interval else 0
    eval_s = evals * lc.eval_batches * step_s / (3 * tc.batch_size // tc.micro_batch_size)  # forward ~ 1/3 step
    steps = run.step + max(0, int((remaining_s - eval_s) / step_s))
    if steps < tc.max_steps:
        if run.plan.is_main and steps < 0.95 * tc.max_steps:
            progress.write(f"{step_s:.2f}s/step here: training {steps} steps to finish in about {tc.fit_time_s:.0f}s")
        tc.max_steps, tc.tokens = steps, 0
        if run.plan.is_main:
            run.cfg.save(os.path.join(run.cfg.run_dir, "config.toml"))
        progress.set_total(steps)
    return total_tokens(tc)


def _start_fresh(cfg: TrainConfig) -> None:
    """A new run in a directory that holds an old one: refuse, or clear it with checkpoint.overwrite."""
    if not checkpoint_dirs(cfg.run_dir) and not os.path.exists(os.path.join(cfg.run_dir, "metrics.jsonl")):
        return
    if not cfg.checkpoint.overwrite:
        raise ValueError(f"{cfg.run_dir} already holds a run: continue it with --resume, start over with "
                         f"--overwrite (checkpoint.overwrite = true), or pick another --run_dir")
    import shutil
    for name in ("checkpoints", "plots"):
        shutil.rmtree(os.path.join(cfg.run_dir, name), ignore_errors=True)
    for name in ("metrics.jsonl", "model"):
        path = os.path.join(cfg.run_dir, name)
        if os.path.islink(path) or os.path.isfile(path):
            os.remove(path)


def _truncate_metrics(run_dir: str, step: int) -> None:
    """Drop metric lines past the resumed step (written by the run that was interrupted)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)  # atomic: an interrupted resume never loses the metrics already written


# ----------------------------------------------------------------------------- loop
def train(cfg: TrainConfig, resume: bool = False, log=print) -> Run:
    """Train to train.max_steps (or the token budget / time limit), logging, evaluating, saving."""
    from .progress import Progress

    run = setup(cfg, resume=resume, log=log)
    tc, lc = cfg.train, cfg.logging
    budget = total_tokens(tc)
    main = run.plan.is_main
    if main:
        log(f"model: {run.model.config.num_parameters() / 1e6:.2f}M parameters "
            f"({run.model.config.num_parameters(active=True) / 1e6:.2f}M active), device {run.device}")
    metrics_file = open(os.path.join(cfg.run_dir, "metrics.jsonl"), "a") if main else None
    progress = Progress(tc.max_steps, run.step, enabled=main and lc.progress)
    start = time.perf_counter()
    first_step, t_first = run.step, start
    try:
        while run.step < tc.max_steps and run.tokens < budget:
            m = train_step(run)
            m["time"] = run.elapsed + time.perf_counter() - start
            if run.step == first_step + 1:
                t_first = time.perf_counter()  # the first step pays one-time costs: time from here
            done = run.step - first_step
            # Decisions from the clock use rank 0's clock on every rank (plan.agree), so that all
            # ranks stop at the same step. Re-fitted every 10 steps after calibration: a machine
            # that slows down still finishes in time.
            if (tc.fit_time_s and not resume and done >= _FIT_CALIBRATION_STEPS
                    and (done == _FIT_CALIBRATION_STEPS or done % 10 == 0)):
                step_s, remaining_s = run.plan.agree([(time.perf_counter() - t_first) / (done - 1),
                                                      tc.fit_time_s - (time.perf_counter() - start)])
                budget = _fit_to_time(run, step_s, remaining_s, progress)
            last = run.step >= tc.max_steps or run.tokens >= budget
            out_of_time = bool(tc.max_time_s) and run.plan.agree([time.perf_counter() - start])[0] >= tc.max_time_s
            if lc.eval_interval and (run.step % lc.eval_interval == 0 or last or out_of_time):
                m.update(evaluate(run))
            if main and (run.step % lc.log_interval == 0 or last or "val_loss" in m):
                metrics_file.write(json.dumps(m) + "\n")
                metrics_file.flush()
            run.history.append(m)
            progress.update(m)
            if out_of_time:
                if main:
                    progress.write(f"time limit of {tc.max_time_s:.0f}s reached at step {run.step}")
                break
            if cfg.checkpoint.interval and run.step % cfg.checkpoint.interval == 0 and not last:
                run.elapsed += time.perf_counter() - start
                start = time.perf_counter()
                save(run)
        run.elapsed += time.perf_counter() - start
        path = save(run)
        if main:
            progress.close()
            log(f"saved {path} ({run.tokens:,} tokens: {run.tokens / max(run.train_data.num_tokens, 1):.2f} "
                f"epochs of {run.train_data.num_tokens:,} training tokens)")
    finally:
        progress.close()
        if metrics_file is not None:
            metrics_file.close()
    return run


__all__ = ["Run", "TrainingDiverged", "setup", "build_model", "train_step", "evaluate", "save", "train",
           "flops_per_token", "loss_fn"]
