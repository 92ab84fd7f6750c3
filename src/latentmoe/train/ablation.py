"""Small-scale reruns of the report's comparisons: each variant trained with the same data, token
count and recipe, over several seeds, then one results.json / results.md / plots per experiment.

Seed s fixes both the initialisation and the order of the batches, and is shared by every variant,
so variants differ only in what is compared. The step count is fixed up front, or calibrated once
(`time_budget_s` over all runs: a few timed steps of the first variant set the step count that fits
each run's share of the time, and every run trains exactly that many).
The model's parameter matching and the metrics of each experiment live in `attention_experiment`
and `balance_experiment`; `run_experiment` is the loop they share.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from ..config import ModelConfig, get_config
from .config import load_config
from .plot import pyplot, save_figure

# One recipe per scale: `model.overrides` over the `tiny` preset, plus train/optim/data settings.
_MODEL_CPU = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, qk_nope_head_dim=32,
                  qk_rope_head_dim=16, v_head_dim=32, kv_lora_rank=64, n_routed_experts=8,
                  num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=96,
                  first_k_dense_replace=0, topk_method="greedy", n_group=1, topk_group=1)
_MODEL_GPU = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, qk_nope_head_dim=64,
                  qk_rope_head_dim=32, v_head_dim=64, kv_lora_rank=128, n_routed_experts=16,
                  num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=384,
                  first_k_dense_replace=0, topk_method="greedy", n_group=1, topk_group=1,
                  max_position_embeddings=4096)
_MODEL_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, qk_nope_head_dim=16,
                   qk_rope_head_dim=8, v_head_dim=16, kv_lora_rank=16, n_routed_experts=8,
                   num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                   first_k_dense_replace=0, topk_method="greedy", n_group=1, topk_group=1)


@dataclass
class Scale:
    """Everything but the compared setting: model, data, tokens, recipe, and how long a run may take."""
    model: dict
    settings: dict                       # dotted TrainConfig keys
    max_steps: int
    time_budget_s: float = 0.0           # > 0: training-loop seconds for all runs; calibrates max_steps
    seeds: int = 2
    width_multiple: int = 1              # matched expert widths are multiples of it (8: aligned grouped GEMMs)


SCALES = {
    # 8 runs (4 variants x 2 seeds) in about 12 minutes on 2 CPU cores.
    "cpu": Scale(_MODEL_CPU, {"data.corpus": "python-packages", "data.vocab_size": 2048, "data.max_chars": 16_000_000,
                              "train.seq_len": 128, "train.micro_batch_size": 16, "train.batch_size": 16,
                              "optim.lr": 2e-3, "optim.warmup_steps": 30, "logging.eval_interval": 40,
                              "logging.eval_batches": 8, "model.init_std": 0.02},
                 max_steps=600, time_budget_s=600.0),
    # 8 runs in about 7.5 minutes on one H200 (data preparation included; 7 min 17 s measured).
    "gpu": Scale(_MODEL_GPU, {"data.corpus": "python-packages", "data.vocab_size": 8192, "data.max_chars": 64_000_000,
                              "train.seq_len": 512, "train.micro_batch_size": 32, "train.batch_size": 32,
                              "optim.lr": 1.5e-3, "optim.warmup_steps": 100, "logging.eval_interval": 100,
                              "logging.eval_batches": 32, "model.init_std": 0.02},
                 max_steps=3000, time_budget_s=360.0, width_multiple=8),
    # Seconds: the command's own tests.
    "tiny": Scale(_MODEL_TINY, {"data.corpus": "python-docs", "data.vocab_size": 512, "data.max_chars": 80_000,
                                "train.seq_len": 32, "train.micro_batch_size": 4, "train.batch_size": 4,
                                "optim.lr": 3e-3, "optim.warmup_steps": 2, "logging.eval_interval": 3,
                                "logging.eval_batches": 2, "model.init_std": 0.02},
                  max_steps=6),
}


@dataclass
class Variant:
    name: str
    model: dict = field(default_factory=dict)      # model.overrides on top of the scale's model
    settings: dict = field(default_factory=dict)   # dotted TrainConfig keys on top of the scale's


# ----------------------------------------------------------------------------- the loop
def run_experiment(variants: list[Variant], scale: Scale, out_dir: str, seeds: int | None = None,
                   steps: int | None = None, device: str = "auto", log: Callable = print,
                   summarize: Callable | None = None, threads: int = 0) -> list[dict]:
    """Train every (variant, seed); returns one record per run (curves, final metrics, speed)."""
    seeds = seeds or scale.seeds
    data_dir = os.path.join(out_dir, "data")
    from .trainer import train

    def config(v: Variant, seed: int, max_steps: int, eval_interval: int, run_dir: str):
        return load_config(None, {
            **scale.settings, **v.settings, "run_dir": run_dir, "data.cache_dir": data_dir, "train.seed": seed,
            "train.max_steps": max_steps, "logging.eval_interval": eval_interval, "precision.device": device,
            "precision.threads": threads, "logging.progress": False, "logging.log_interval": 1,
            "checkpoint.overwrite": True, "checkpoint.save_optimizer": False, "checkpoint.keep": 1,
            "model.overrides": {**scale.model, **v.model}})

    eval_interval = scale.settings.get("logging.eval_interval", 50)
    max_steps = steps or scale.max_steps
    if not steps and scale.time_budget_s > 0:
        max_steps, eval_interval = _calibrate(config(variants[0], 0, _PROBE_STEPS, 0, os.path.join(out_dir, "probe")),
                                              scale, scale.time_budget_s / (seeds * len(variants)), train, log)
    records = []
    for seed in range(seeds):
        for v in variants:
            cfg = config(v, seed, max_steps, eval_interval, os.path.join(out_dir, "runs", f"{v.name}-seed{seed}"))
            log(f"[{len(records) + 1}/{seeds * len(variants)}] {v.name}, seed {seed}: {cfg.train.max_steps} steps")
            t0 = time.perf_counter()
            run = train(cfg, log=lambda *a: None)
            records.append(_record(v.name, seed, run, time.perf_counter() - t0, summarize))
            log(f"    val loss {records[-1]['val_loss']:.4f}, {records[-1]['tok_s']:,.0f} tok/s, "
                f"{records[-1]['epochs']:.2f} epochs")
    return records


_PROBE_STEPS = 8


def _calibrate(probe_cfg, scale: Scale, seconds: float, train, log) -> tuple[int, int]:
    """(steps, eval interval) for runs of `seconds`: a few steps of the first variant, timed, with about
    eight evaluations per run counted in (a forward pass costs about a third of a training step)."""
    run = train(probe_cfg, log=lambda *a: None)
    step_s = statistics.median(m["step_time"] for m in run.history[2:])
    tc, lc = probe_cfg.train, probe_cfg.logging
    eval_s = lc.eval_batches * tc.micro_batch_size / tc.batch_size * step_s / 3
    steps = max(_PROBE_STEPS, int((seconds - 8 * eval_s) / step_s))
    log(f"{step_s:.2f}s per step here: {steps} steps per run to fit {seconds:.0f}s")
    return steps, max(1, steps // 8)


def _record(name: str, seed: int, run, wall_s: float, summarize: Callable | None) -> dict:
    h = run.history
    evals = [(m["step"], m["tokens"], m["val_loss"]) for m in h if "val_loss" in m]
    speeds = sorted(m["tok_s"] for m in h[2:]) or [h[-1]["tok_s"]]
    cfg = run.model.config
    rec = {"variant": name, "seed": seed, "val_loss": evals[-1][2], "val_ppl": math.exp(min(evals[-1][2], 50)),
           "curve": evals, "steps": run.step, "tokens": run.tokens, "epochs": h[-1]["epochs"],
           "train_tokens_available": run.train_data.num_tokens, "tok_s": speeds[len(speeds) // 2],
           "wall_s": round(wall_s, 1), "params": cfg.num_parameters(),
           "active_params": cfg.num_parameters(active=True),
           "kv_elements_per_token": cfg.kv_cache_elements_per_token(),
           "attention_type": cfg.attention_type, "model_config": cfg.to_dict()}
    if summarize:
        rec.update(summarize(run))
    return rec


def summary(records: list[dict], keys: list[str]) -> dict[str, dict]:
    """Per variant: mean and sample std over seeds of each key (std 0 with one seed), in first-seen order;
    and `val_loss_delta`: its validation loss minus the first variant's at the same seed, mean and std
    over seeds. Every variant of a seed shares its initialisation stream, batches and validation
    batches, so the paired difference drops what the seeds change for all variants alike."""
    out: dict[str, dict] = {}
    names = list(dict.fromkeys(r["variant"] for r in records))
    base = {r["seed"]: r.get("val_loss") for r in records if r["variant"] == names[0]}
    for name in names:
        rows = [r for r in records if r["variant"] == name]
        s = {"seeds": len(rows)}
        for k in keys:
            vals = [r[k] for r in rows if r.get(k) is not None]
            if vals:
                s[k] = statistics.fmean(vals)
                s[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        deltas = [r["val_loss"] - base[r["seed"]] for r in rows
                  if r.get("val_loss") is not None and base.get(r["seed"]) is not None]
        if deltas:
            s["val_loss_delta"] = statistics.fmean(deltas)
            s["val_loss_delta_std"] = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
        out[name] = s
    return out


def write_results(out_dir: str, experiment: str, header: dict, records: list[dict],
                  columns: list[tuple[str, str, str]], notes: list[str]) -> dict:
    """results.json (everything) and results.md (columns: (key, title, format); `key±` shows mean ± std)."""
    keys = [k.rstrip("±") for k, _, _ in columns]
    summ = summary(records, keys)
    if "val_loss" in keys:   # the paired difference beside the validation loss
        i = keys.index("val_loss") + 1
        columns = columns[:i] + [("val_loss_delta±", f"Δ val loss vs {next(iter(summ))}, paired", "+.4f")] + columns[i:]
    result = {"experiment": experiment, **header, "summary": summ, "runs": records}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"# {experiment} ablation ({header['scale']} scale)", ""] + [f"- {n}" for n in notes] + [""]
    lines.append("| variant | " + " | ".join(t for _, t, _ in columns) + " |")
    lines.append("|---" * (len(columns) + 1) + "|")
    for name, s in summ.items():
        cells = []
        for key, _, fmt in columns:
            k = key.rstrip("±")
            if k not in s:
                cells.append("-")
            elif key.endswith("±") and s["seeds"] > 1:
                cells.append(f"{format(s[k], fmt)} ± {format(s[k + '_std'], fmt)}")
            else:
                cells.append(format(s[k], fmt))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    n = max(s["seeds"] for s in summ.values())
    lines += ["", f"± is the sample standard deviation over {n} seeds (seed s: the same initialisation stream "
                  f"and batches for every variant)." if n > 1 else "One seed: no spread measured."]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return result


def _can_plot(log) -> bool:
    """Plots need matplotlib (the `train` extra); without it the results files still stand."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("plots skipped: matplotlib is not installed (pip install 'latentmoe[train]')")
        return False
    return True


def plot_curves(out_dir: str, records: list[dict], title: str) -> str:
    """val_curves.png: validation loss against tokens, mean over seeds with the min-max band."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in dict.fromkeys(r["variant"] for r in records):
        curves = [r["curve"] for r in records if r["variant"] == name]
        n = min(len(c) for c in curves)
        tokens = [curves[0][i][1] for i in range(n)]
        vals = [[c[i][2] for c in curves] for i in range(n)]
        ax.plot(tokens, [statistics.fmean(v) for v in vals], label=name)
        ax.fill_between(tokens, [min(v) for v in vals], [max(v) for v in vals], alpha=0.2)
    ax.set(xlabel="training tokens", ylabel="validation loss", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, os.path.join(out_dir, "val_curves.png"))


# ----------------------------------------------------------------------------- attention
def match_ffn_width(cfg: ModelConfig, target: int, multiple: int = 1) -> ModelConfig:
    """`cfg` with the expert width (moe_intermediate_size, shared experts included; dense layers'
    intermediate_size scaled alike), a multiple of `multiple`, whose total parameter count is nearest `target`."""
    base_m, base_i = cfg.moe_intermediate_size, cfg.intermediate_size

    def at(m: int) -> ModelConfig:
        return cfg.replace(moe_intermediate_size=m, intermediate_size=max(1, round(base_i * m / base_m)))

    lo = max(multiple, base_m // 2 // multiple * multiple)
    return min((at(m) for m in range(lo, 2 * base_m + 1, multiple)),
               key=lambda c: abs(c.num_parameters() - target))


def attention_variants(scale: Scale) -> tuple[list[Variant], str]:
    """MLA and MHA / GQA (H/4 key-value heads, at least 2) / MQA, each at MLA's total parameter count."""
    base = get_config("tiny", **scale.model)
    heads = base.num_attention_heads
    target = base.num_parameters()
    kinds = [("mla", heads), ("mha", heads), ("gqa", max(2, heads // 4)), ("mqa", 1)]
    out = []
    for kind, kv in kinds:
        cfg = base if kind == "mla" else match_ffn_width(
            base.replace(attention_type=kind, num_key_value_heads=kv), target, scale.width_multiple)
        name = f"gqa-{kv}" if kind == "gqa" else kind
        out.append(Variant(name, {"attention_type": kind, "num_key_value_heads": kv,
                                  "moe_intermediate_size": cfg.moe_intermediate_size,
                                  "intermediate_size": cfg.intermediate_size}))
    how = (f"total parameters matched to MLA's by the expert width (moe_intermediate_size, shared experts "
           f"included): the baselines' attention differs in size, so each gets the width whose total "
           f"is nearest MLA's (MLA width {base.moe_intermediate_size}"
           + (f"; widths in multiples of {scale.width_multiple}" if scale.width_multiple > 1 else "") + ")")
    return out, how


def attention_experiment(out_dir: str, scale: str = "cpu", seeds: int | None = None, steps: int | None = None,
                         device: str = "auto", log: Callable = print, threads: int = 0) -> dict:
    sc = copy.deepcopy(SCALES[scale])
    os.makedirs(out_dir, exist_ok=True)
    variants, how = attention_variants(sc)
    records = run_experiment(variants, sc, out_dir, seeds, steps, device, log, threads=threads)
    r0 = records[0]
    notes = [how + ".", f"same data, tokens and recipe for every run: {r0['tokens']:,} tokens "
             f"({r0['steps']} steps of {r0['tokens'] // max(r0['steps'], 1):,}), "
             f"{r0['epochs']:.2f} epochs of {r0['train_tokens_available']:,} training tokens.",
             "KV elements/token: cache per token over all layers (MLA: kv_lora_rank + rope dim per layer; "
             "the baselines: 2 x kv heads x head dim per layer)."]
    columns = [("val_loss±", "val loss", ".4f"), ("val_ppl±", "val ppl", ".2f"),
               ("kv_elements_per_token", "KV elements/token", ",.0f"), ("params", "params", ",.0f"),
               ("active_params", "active params", ",.0f"), ("tokens", "tokens", ",.0f"),
               ("epochs", "epochs", ".2f"), ("tok_s±", "tok/s", ",.0f")]
    result = write_results(out_dir, "attention", {"scale": scale, "matched": how}, records, columns, notes)
    if _can_plot(log):
        plot_curves(out_dir, records, f"attention variants ({scale} scale)")
        _plot_cache_vs_loss(out_dir, result["summary"])
    return result


def _plot_cache_vs_loss(out_dir: str, summ: dict) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    for name, s in summ.items():
        ax.errorbar(s["kv_elements_per_token"], s["val_loss"], yerr=s["val_loss_std"], fmt="o", capsize=4)
        ax.annotate(name, (s["kv_elements_per_token"], s["val_loss"]), textcoords="offset points", xytext=(6, 4))
    ax.set(xscale="log", xlabel="KV cache elements per token (all layers)", ylabel="validation loss",
           title="cache size against loss (± seed std)")
    ax.grid(alpha=0.3)
    return save_figure(fig, os.path.join(out_dir, "cache_vs_loss.png"))


# ----------------------------------------------------------------------------- balance
BALANCE_DEVICES = 4


def balance_variants(scale: Scale) -> list[Variant]:
    """The report's balance mechanisms added one at a time: D = 4 expert groups, M = K/2 groups per
    token (the report's ratio: M = 3 for K = 6), so that the device limit binds."""
    none = {"loss.alpha1": 0.0, "loss.alpha2": 0.0, "loss.alpha3": 0.0}
    exp = {**none, "loss.alpha1": 0.003}
    three = {"loss.alpha1": 0.003, "loss.alpha2": 0.05, "loss.alpha3": 0.02}
    common = {"routing.devices": BALANCE_DEVICES, "routing.max_devices": max(1, scale.model["num_experts_per_tok"] // 2)}
    return [Variant("none", settings={**common, **none}),
            Variant("expert loss", settings={**common, **exp}),
            Variant("all three losses", settings={**common, **three}),
            Variant("+ device-limited", settings={**common, **three, "routing.device_limited": True}),
            Variant("+ token dropping", settings={**common, **three, "routing.device_limited": True,
                                                  "routing.drop_tokens": True})]


def _balance_stats(run) -> dict:
    """Expert- and device-load CV (mean over MoE layers, over the last quarter of the steps) and the
    fraction of (token, expert) assignments dropped."""
    rows = [m for m in run.history if "expert_load" in m]
    tail = rows[-max(1, len(rows) // 4):]
    D = run.cfg.routing.devices

    def cv(xs):
        mean = statistics.fmean(xs)
        return statistics.pstdev(xs) / mean if mean else 0.0

    exp_cv, dev_cv = [], []
    for m in tail:
        for layer in m["expert_load"]:
            g = len(layer) // D
            exp_cv.append(cv(layer))
            dev_cv.append(cv([sum(layer[d * g:(d + 1) * g]) for d in range(D)]))
    return {"expert_load_cv": statistics.fmean(exp_cv), "device_load_cv": statistics.fmean(dev_cv),
            "dropped_frac": statistics.fmean(m.get("dropped_frac", 0.0) for m in rows)}


def balance_experiment(out_dir: str, scale: str = "cpu", seeds: int | None = None, steps: int | None = None,
                       device: str = "auto", log: Callable = print, threads: int = 0) -> dict:
    sc = copy.deepcopy(SCALES[scale])
    os.makedirs(out_dir, exist_ok=True)
    records = run_experiment(balance_variants(sc), sc, out_dir, seeds, steps, device, log, _balance_stats, threads)
    r0 = records[0]
    m = max(1, sc.model["num_experts_per_tok"] // 2)
    notes = [f"the same MLA model for every run ({sc.model['n_routed_experts']} routed experts, top "
             f"{sc.model['num_experts_per_tok']}); routing over D = {BALANCE_DEVICES} groups of experts (devices), "
             f"M = {m} per token where device-limited; the report's alphas (0.003, 0.05, 0.02).",
             f"{r0['tokens']:,} tokens per run ({r0['epochs']:.2f} epochs); load CV = std/mean of the "
             f"routed assignments per expert (per device group), over the last quarter of the steps."]
    columns = [("val_loss±", "val loss", ".4f"), ("val_ppl±", "val ppl", ".2f"),
               ("expert_load_cv±", "expert-load CV", ".3f"), ("device_load_cv±", "device-load CV", ".3f"),
               ("dropped_frac±", "dropped", ".4f"), ("tok_s±", "tok/s", ",.0f")]
    result = write_results(out_dir, "balance", {"scale": scale}, records, columns, notes)
    if _can_plot(log):
        plot_curves(out_dir, records, f"balance mechanisms ({scale} scale)")
    return result


EXPERIMENTS = {"attention": attention_experiment, "balance": balance_experiment}

__all__ = ["SCALES", "Scale", "Variant", "run_experiment", "attention_experiment", "balance_experiment",
           "match_ffn_width", "attention_variants", "balance_variants", "EXPERIMENTS"]
