"""What a run's metrics.jsonl shows: PNG plots (loss curves, the expert load per layer over time)
and the expert-balance table."""

from __future__ import annotations

import json
import os


def load_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def pyplot():
    """matplotlib's pyplot drawing to files only (no display needed); ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str, dpi: int = 120) -> str:
    """Lay `fig` out, write it to `path` and close it; returns `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Write loss.png and expert_load.png (into out_dir, default RUN/plots); returns their paths."""
    import numpy as np
    plt = pyplot()

    rows = load_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl is empty")
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    steps = [r["step"] for r in rows]
    written = []

    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    ax[0, 0].plot(steps, [r["ce"] for r in rows], label="train cross-entropy", lw=1)
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        ax[0, 0].plot(*zip(*val), "o-", label="validation", ms=4)
    ax[0, 0].set(title="next-token loss", xlabel="step", ylabel="nats/token")
    ax[0, 0].legend()
    for key, label in (("l_exp", "expert (a1)"), ("l_dev", "device (a2)"), ("l_comm", "communication (a3)")):
        ax[0, 1].plot(steps, [r[key] for r in rows], label=label, lw=1)
    ax[0, 1].set(title="balance losses (weighted)", xlabel="step")
    ax[0, 1].legend()
    ax[1, 0].plot(steps, [r["lr"] for r in rows], lw=1)
    ax[1, 0].set(title="learning rate", xlabel="step")
    ax[1, 1].plot(steps, [r["grad_norm"] for r in rows], label="grad norm", lw=1)
    if "load_cv" in rows[-1]:
        ax[1, 1].plot(steps, [float(np.mean(r["load_cv"])) for r in rows], label="expert load CV (mean)", lw=1)
        ax[1, 1].plot(steps, [r.get("dropped_frac", 0.0) for r in rows], label="dropped fraction", lw=1)
    ax[1, 1].set(title="gradient norm and balance", xlabel="step")
    ax[1, 1].legend()
    written.append(save_figure(fig, os.path.join(out_dir, "loss.png"), dpi=110))

    loaded = [r for r in rows if "expert_load" in r]
    if loaded:
        load_SLE = np.array([r["expert_load"] for r in loaded])   # steps, MoE layers, experts
        n_layers = load_SLE.shape[1]
        fig, axes = plt.subplots(n_layers, 1, figsize=(11, 1.6 + 1.4 * n_layers), squeeze=False)
        uniform = 1.0 / load_SLE.shape[2]
        for layer in range(n_layers):
            a = axes[layer, 0]
            im = a.imshow(load_SLE[:, layer, :].T, aspect="auto", cmap="viridis", interpolation="nearest",
                          vmin=0, vmax=max(3 * uniform, float(load_SLE.max())),
                          extent=(loaded[0]["step"] - 0.5, loaded[-1]["step"] + 0.5, load_SLE.shape[2] - 0.5, -0.5))
            a.set(ylabel=f"MoE layer {layer}\nexpert", xlabel="step" if layer == n_layers - 1 else None)
            fig.colorbar(im, ax=a, label="share of assignments")
        fig.suptitle(f"expert load per layer (uniform = {uniform:.3f})")
        written.append(save_figure(fig, os.path.join(out_dir, "expert_load.png"), dpi=110))
    return written


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


__all__ = ["load_metrics", "plot_run", "balance_report"]
