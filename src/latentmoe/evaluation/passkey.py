"""Passkey retrieval (needle in a haystack): a number hidden at depth d of L tokens of filler text,
asked for at the end. Accuracy per (L, d), and a heatmap like the report's NIAH figure.

A trial is correct when greedy decoding would produce every token of the key: one forward pass over
prompt + key, checking that each key token is the argmax given the tokens before it (the same
verdict as generating the key token by token, at the cost of one pass).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import torch

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


@dataclass
class Trial:
    length: int
    depth: float
    key: str
    correct: bool


def build_prompt(tokenizer, length: int, depth: float, key: str) -> tuple[list[int], list[int]]:
    """(prompt ids, key ids): about `length` tokens in all, the needle after a `depth` fraction of the
    filler sentences (0: at the start, 1: just before the question)."""
    def enc(text):
        return tokenizer.encode(text, add_special_tokens=False)

    per_filler = len(enc(FILLER))
    fixed = len(enc(NEEDLE.format(key=key) + QUESTION)) + 1 + len(enc(" " + key))
    n = max(1, (length - fixed) // per_filler)
    before = round(depth * n)
    text = FILLER * before + NEEDLE.format(key=key) + FILLER * (n - before) + QUESTION
    prompt = tokenizer.encode(text)  # with BOS, as in training documents
    full = tokenizer.encode(text + " " + key)
    if full[:len(prompt)] != prompt:
        raise ValueError("the tokenizer merges the question with the key: cannot split prompt and answer")
    return prompt, full[len(prompt):]


@torch.no_grad()
def key_is_retrieved(model, prompt: list[int], answer: list[int], device) -> bool:
    ids = torch.tensor([prompt + answer], device=device)
    logits = model(ids[:, :-1])  # [1, T-1, V]
    predicted = logits[0, len(prompt) - 1:].argmax(-1).tolist()
    return predicted == answer


def evaluate_passkey(model, tokenizer, lengths: list[int], depths: list[float], trials: int = 5,
                     digits: int = 5, seed: int = 0, log=None) -> list[Trial]:
    """Every (length, depth) with `trials` random keys of `digits` digits (the same keys everywhere)."""
    device = next(model.parameters()).device
    rng = random.Random(seed)
    keys = [str(rng.randrange(10 ** (digits - 1), 10 ** digits)) for _ in range(trials)]
    model.eval()
    out = []
    for length in lengths:
        for depth in depths:
            for key in keys:
                prompt, answer = build_prompt(tokenizer, length, depth, key)
                out.append(Trial(length, depth, key, key_is_retrieved(model, prompt, answer, device)))
            if log:
                acc = sum(t.correct for t in out[-trials:]) / trials
                log(f"L={length:>6} depth={depth:.2f}: {acc:.0%}")
    return out


def accuracy_grid(trials: list[Trial]) -> tuple[list[int], list[float], list[list[float]]]:
    """(lengths, depths, acc[depth][length])."""
    lengths = sorted({t.length for t in trials})
    depths = sorted({t.depth for t in trials})
    grid = []
    for d in depths:
        row = []
        for L in lengths:
            cell = [t.correct for t in trials if t.length == L and t.depth == d]
            row.append(sum(cell) / len(cell))
        grid.append(row)
    return lengths, depths, grid


def format_table(trials: list[Trial]) -> str:
    lengths, depths, grid = accuracy_grid(trials)
    lines = ["depth \\ L | " + " | ".join(f"{L:,}" for L in lengths), "---|" + "---|" * len(lengths)]
    for d, row in zip(depths, grid):
        lines.append(f"{d:.2f} | " + " | ".join(f"{a:.0%}" for a in row))
    overall = sum(t.correct for t in trials) / len(trials)
    return "\n".join(lines) + f"\n\noverall: {overall:.1%} of {len(trials)} trials"


def write_results(out_dir: str, trials: list[Trial], meta: dict, title: str = "passkey retrieval") -> dict:
    """passkey.json, passkey.md and passkey.png (accuracy heatmap: depth against context length;
    skipped without matplotlib)."""
    os.makedirs(out_dir, exist_ok=True)
    lengths, depths, grid = accuracy_grid(trials)
    result = {**meta, "lengths": lengths, "depths": depths, "accuracy": grid,
              "overall": sum(t.correct for t in trials) / len(trials), "trials": [t.__dict__ for t in trials]}
    with open(os.path.join(out_dir, "passkey.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out_dir, "passkey.md"), "w") as f:
        f.write(f"# {title}\n\n{format_table(trials)}\n")
    from ..train.plot import pyplot, save_figure
    try:
        plt = pyplot()
    except ImportError:
        return result

    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{L // 1024}K" if L >= 1024 else str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set(xlabel="context length (tokens)", ylabel="passkey depth", title=title)
    for i, row in enumerate(grid):
        for j, a in enumerate(row):
            ax.text(j, i, f"{a:.0%}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    save_figure(fig, os.path.join(out_dir, "passkey.png"))
    return result


__all__ = ["build_prompt", "key_is_retrieved", "evaluate_passkey", "accuracy_grid", "format_table",
           "write_results", "Trial"]
