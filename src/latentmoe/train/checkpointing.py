"""Checkpoints of a run: an HF-format model directory (what `generate`/`serve` load) with the
tokenizer beside it, plus the trainer state (optimizer, step, tokens seen, all RNG states).

    RUN/checkpoints/step-000100/model/            config.json, *.safetensors, tokenizer.json, ...
    RUN/checkpoints/step-000100/trainer_state.pt
    RUN/model -> checkpoints/step-000100/model    (the latest; a symlink swapped atomically)

A save is written into a temporary directory and renamed into place, so a crash mid-save
leaves the previous checkpoint whole; only complete `step-*` directories are ever resumed.
"""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch

from ..checkpoint import load_model, save_model

TRAINER_STATE = "trainer_state.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(run_dir: str) -> list[str]:
    """Complete checkpoints, oldest first."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step-")
                   and os.path.exists(os.path.join(root, n, TRAINER_STATE)))
    return [os.path.join(root, n) for n in names]


def save_checkpoint(run_dir: str, model, save_config, tokenizer_dir: str | None, trainer_state: dict,
                    keep: int = 2, _fail_after_model: bool = False) -> str:
    """Write checkpoint `step-{step}` atomically, point RUN/model at it, prune old ones."""
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = f"step-{trainer_state['step']:06d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model_dir = os.path.join(tmp, "model")
    # The model is saved with the inference config (routing as trained) without touching model.config.
    train_config, model.config = model.config, save_config
    try:
        save_model(model, model_dir, tokenizer_dir=tokenizer_dir)
    finally:
        model.config = train_config
    if _fail_after_model:  # tests: a crash in the middle of a save
        raise RuntimeError("simulated crash during save")
    torch.save(trainer_state, os.path.join(tmp, TRAINER_STATE))
    if os.path.exists(final):  # the same step saved again (e.g. the final save after an interval save)
        old = os.path.join(root, f".old-{name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _point_latest(run_dir, os.path.join("checkpoints", name, "model"))
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _point_latest(run_dir: str, target: str) -> None:
    link, tmp = os.path.join(run_dir, "model"), os.path.join(run_dir, ".model.tmp")
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.symlink(target, tmp)
    except OSError:  # no symlinks on this filesystem: a copy (not atomic, the checkpoint itself still is)
        shutil.rmtree(link, ignore_errors=True)
        shutil.copytree(os.path.join(run_dir, target), link)
        return
    if os.path.isdir(link) and not os.path.islink(link):
        shutil.rmtree(link)
    os.replace(tmp, link)


def load_checkpoint(path: str, model, optimizer=None, device=None) -> dict:
    """Load weights (exactly, in the model's dtype) and optimizer state; returns the trainer state."""
    loaded = load_model(os.path.join(path, "model"), device="cpu", dtype=next(model.parameters()).dtype)
    model.load_state_dict(loaded.state_dict())
    state = torch.load(os.path.join(path, TRAINER_STATE), map_location="cpu", weights_only=False)
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    return state


__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_dirs", "rng_state", "set_rng_state"]
