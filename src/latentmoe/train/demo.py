"""`latentmoe demo`: train a tiny DeepSeek-V2 on the text that ships with Python in about three
minutes on a laptop CPU, then sample from it with the inference engine and show what it learnt."""

from __future__ import annotations

import os
import time

from .config import load_config
from .plot import plot_run
from .trainer import train

PROMPTS = ["Return the", "The default", "This module provides", "If the"]


def _rule(title: str) -> str:
    return f"\n== {title} " + "=" * max(0, 68 - len(title))


def generate_samples(model_dir: str, prompts: list[str], max_tokens: int = 48, seed: int = 0) -> list[str]:
    """Continuations from the inference engine (paged latent cache, absorbed MLA decode)."""
    from ..engine import LLM, SamplingParams

    llm = LLM(model_dir, device="cpu", max_num_seqs=len(prompts), max_model_len=512)
    # One seed per prompt: with a shared seed every request would draw the same random numbers.
    params = [SamplingParams(temperature=0.7, top_p=0.95, max_tokens=max_tokens, seed=seed + i)
              for i in range(len(prompts))]
    outs = llm.generate(prompts, params)
    return [o.outputs[0].text for o in outs]


def balance_report(history: list[dict]) -> str:
    """Per MoE layer: coefficient of variation of the expert load and the busiest/idlest shares,
    at the first and last step (0 = perfectly even)."""
    first = next((m for m in history if "load_cv" in m), None)
    last = next((m for m in reversed(history) if "load_cv" in m), None)
    if first is None:
        return "no MoE layers"
    lines = [f"{'MoE layer':<10} {'load CV first':>14} {'load CV last':>13} {'max share':>10} {'min share':>10}"]
    for i, (cv0, cv1, load) in enumerate(zip(first["load_cv"], last["load_cv"], last["expert_load"])):
        lines.append(f"{i:<10} {cv0:>14.3f} {cv1:>13.3f} {max(load):>10.3f} {min(load):>10.3f}")
    lines.append(f"uniform share {1 / len(last['expert_load'][0]):.3f}; "
                 f"tokens dropped at the last step: {100 * last.get('dropped_frac', 0.0):.1f}% of assignments")
    return "\n".join(lines)


def run_demo(overrides: list[str] | None = None, config: str = "demo", log=print) -> int:
    t0 = time.perf_counter()
    cfg = load_config(config, overrides)
    rc = cfg.routing
    log("latentmoe demo: a tiny DeepSeek-V2 (Multi-head Latent Attention, shared + routed experts) trained\n"
        f"on {cfg.data.corpus!r} with the expert/device/communication balance losses "
        f"(a = {cfg.loss.alpha1}, {cfg.loss.alpha2}, {cfg.loss.alpha3}),\n"
        f"device-limited routing ({rc.devices} expert groups, at most {rc.max_devices} per token) and "
        f"token dropping (capacity {rc.capacity_factor}).")
    log(_rule("training"))
    run = train(cfg, log=log)
    model_dir = os.path.join(cfg.run_dir, "model")
    last = run.history[-1] if run.history else {}
    if "val_loss" in last:
        log(f"validation loss {last['val_loss']:.3f} (perplexity {last['val_ppl']:.1f}) after "
            f"{run.tokens:,} tokens")

    log(_rule("samples (inference engine, temperature 0.7)"))
    try:
        for prompt, text in zip(PROMPTS, generate_samples(model_dir, PROMPTS)):
            log(f"> {prompt}{text}\n")
    except ImportError as e:  # the engine is an optional part of a partial install
        log(f"(no samples: the inference engine is not available: {e})")

    log(_rule("KV cache of this model"))
    try:
        from ..kv_report import format_report
        log(format_report(run.model.config, context_len=cfg.train.seq_len, batch=1, name="the demo model"))
    except ImportError:
        log(f"MLA caches {run.model.config.kv_cache_elements_per_token()} elements per token")

    log(_rule("expert load balance"))
    log(balance_report(run.history))

    log(_rule("plots"))
    try:
        for path in plot_run(cfg.run_dir):
            log(path)
    except ImportError:
        log("(no plots: matplotlib is not installed; pip install matplotlib, then latentmoe plot "
            f"{cfg.run_dir})")

    log(_rule(f"done in {time.perf_counter() - t0:.0f}s"))
    log(f"chat with it:   latentmoe chat {model_dir}\n"
        f"serve it:       latentmoe serve {model_dir}\n"
        f"train longer:   latentmoe train --config demo --run_dir runs/demo-long --train.max_steps 3000 \\\n                  --train.fit_time_s 0 --train.max_time_s 0")
    return 0


__all__ = ["run_demo", "generate_samples", "balance_report"]
