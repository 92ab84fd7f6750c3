"""`latentmoe demo`: train a tiny DeepSeek-V2 on the text that ships with Python in about three
minutes on a laptop CPU, then sample from it with the inference engine and show what it learnt.

The command composes the parts: the trainer writes an ordinary checkpoint, the engine loads it.
"""

from __future__ import annotations

import os
import time

from ._overrides import accept_overrides

PROMPTS = ["Return the", "The default", "This module provides", "If the"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="train a tiny DeepSeek-V2 on built-in text (~3 min on CPU), then sample from it",
        description="Trains the built-in `demo` config into runs/demo, generates samples with the inference "
                    "engine, prints the KV-cache report and the expert-load balance, writes plots. Config keys "
                    "can be overridden as --section.key value (e.g. --data.corpus shakespeare). Running it again "
                    "starts runs/demo over.")
    accept_overrides(p)
    p.set_defaults(func=run)


def run(args) -> int:
    # The demo's run directory is its own: running the demo again starts it over (`train` never does unasked).
    return run_demo(["--checkpoint.overwrite", "true", *args.overrides])


def generate_samples(model_dir: str, prompts: list[str], max_tokens: int = 48, seed: int = 0) -> list[str]:
    """Continuations from the inference engine (paged latent cache, absorbed MLA decode)."""
    from ..engine import LLM, SamplingParams

    llm = LLM(model_dir, device="cpu", max_num_seqs=len(prompts), max_model_len=512)
    # One seed per prompt: with a shared seed every request would draw the same random numbers.
    params = [SamplingParams(temperature=0.7, top_p=0.95, max_tokens=max_tokens, seed=seed + i)
              for i in range(len(prompts))]
    outs = llm.generate(prompts, params)
    return [o.outputs[0].text for o in outs]


def _rule(title: str) -> str:
    return f"\n== {title} " + "=" * max(0, 68 - len(title))


def run_demo(overrides: list[str] | None = None, config: str = "demo", log=print) -> int:
    from ..kv_report import format_report
    from ..train import load_config, train
    from ..train.plot import balance_report, plot_run

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
    for prompt, text in zip(PROMPTS, generate_samples(model_dir, PROMPTS)):
        log(f"> {prompt}{text}\n")

    log(_rule("KV cache of this model"))
    log(format_report(run.model.config, context_len=cfg.train.seq_len, batch=1, name="the demo model"))

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
        "train longer:   latentmoe train --config demo --run_dir runs/demo-long --train.max_steps 3000 \\\n"
        "                  --train.fit_time_s 0 --train.max_time_s 0")
    return 0


__all__ = ["run_demo", "generate_samples"]
