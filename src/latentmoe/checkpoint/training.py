"""Trainer checkpoints, the same on one process and on many: every rank writes its part, and after a
barrier rank 0 commits the whole (`commit.commit`).

    step-000100/model/              HF format (what load_model, generate and serve read), config.json
                                    and tokenizer beside the weights. Experts not split: as `save_model`
                                    writes it; split over P expert-parallel ranks: one safetensors file
                                    per rank with its experts under their GLOBAL names (rank 0's file
                                    also holds everything replicated) and an index.
    step-000100/optim/rank-00003.pt the optimizer state this rank steps, by tensor name (expert tensors
                                    with the global expert rows they cover)
    step-000100/trainer_state.pt    step, tokens, RNG, config ... and the layout it was saved with

Because tensors are stored by name and expert rows by global index, a checkpoint resumes on any
number of ranks and any EP size. Checkpoints of earlier versions, whose single-process trainer
state held the torch optimizer state_dict, load too.

`dims` says where this process sits (`latentmoe.parallel.ParallelDims`; its default is one plain
process). The optimizer is a torch optimizer, or a wrapper that holds one as `.optimizer` and
says with `.owns(p)` which tensors this rank steps (ZeRO-1).
"""

from __future__ import annotations

import glob
import os
import random
import re

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from .commit import TRAINER_STATE, begin, checkpoint_path, commit, staging_path
from .hf import checkpoint_entries, fill_from_checkpoint, save_model, write_config_and_tokenizer, write_index

OPTIM_DIR = "optim"
_EXPERT_NAME = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.")


# ----------------------------------------------------------------------------- RNG
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


# ----------------------------------------------------------------------------- save
def save_checkpoint(run_dir: str, model, optimizer, trainer_state: dict, dims, save_config=None,
                    tokenizer_dir: str | None = None, keep: int = 2) -> str:
    """Save checkpoint `step-{trainer_state['step']}` (collective: every rank calls it); returns its path.

    `optimizer` None saves no optimizer state; `save_config` is what the model's config.json says
    (default: the model's own config)."""
    final = checkpoint_path(run_dir, trainer_state["step"])
    tmp = staging_path(final)
    if dims.is_main:
        begin(final)
        os.makedirs(os.path.join(tmp, OPTIM_DIR))
    dims.barrier()
    save_model_parts(model, os.path.join(tmp, "model"), dims, save_config, tokenizer_dir)
    if optimizer is not None:
        torch.save(named_optimizer_state(optimizer, model), os.path.join(tmp, OPTIM_DIR, f"rank-{dims.rank:05d}.pt"))
    if dims.is_main:
        state = dict(trainer_state, optimizer=None, sharded={"world_size": dims.world_size, "ep_size": dims.ep_size,
                                                             "optimizer": optimizer is not None})
        torch.save(state, os.path.join(tmp, TRAINER_STATE))
    dims.barrier()  # every part is on disk
    if dims.is_main:
        commit(run_dir, final, keep)
    dims.barrier()
    return final


@torch.no_grad()
def save_model_parts(model, path: str, dims, config=None, tokenizer_dir: str | None = None) -> None:
    """Write the HF-format directory collectively: no rank ever gathers the experts of another."""
    config = config or model.config
    if dims.ep_size == 1:  # every rank holds the whole model: rank 0 writes it
        if dims.is_main:
            save_model(model, path, tokenizer_dir=tokenizer_dir, config=config)
        return
    entries: list[tuple[str, str, int]] = []
    if dims.dp_rank == 0:  # one replica of each expert slice writes it
        os.makedirs(path, exist_ok=True)
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in checkpoint_entries(model)
                   if dims.ep_rank == 0 or _EXPERT_NAME.match(name)}  # replicated tensors: rank 0's file
        filename = f"model-{dims.ep_rank + 1:05d}-of-{dims.ep_size:05d}.safetensors"
        save_file(tensors, os.path.join(path, filename), metadata={"format": "pt"})
        entries = [(name, filename, t.numel() * t.element_size()) for name, t in tensors.items()]
    everything = [e for part in _gather_objects(entries, dims) for e in part]
    if dims.is_main:
        write_index(path, {name: file for name, file, _ in everything}, sum(size for *_, size in everything))
        write_config_and_tokenizer(path, config, next(model.parameters()).dtype, tokenizer_dir)


def named_optimizer_state(optimizer, model) -> dict[str, dict]:
    """{tensor name: {"rows": (lo, hi) | None, "state": {...}}} for the state this rank holds."""
    names = {p: n for n, p in model.named_parameters()}
    out = {}
    for p, s in _inner(optimizer).state.items():
        if s:
            name = names[p]
            out[name] = {"rows": _expert_rows(model, name),
                         "state": {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in s.items()}}
    return out


# ----------------------------------------------------------------------------- load
def load_checkpoint(path: str, model, optimizer, dims) -> dict:
    """Load weights (this rank's expert slice by global name, exactly, in the model's dtype) and this
    rank's share of the optimizer state (optimizer None: none); returns the trainer state."""
    trainer_state = torch.load(os.path.join(path, TRAINER_STATE), map_location="cpu", weights_only=False)
    fill_from_checkpoint(os.path.join(path, "model"), dict(checkpoint_entries(model)))
    if optimizer is not None:
        pieces = _optimizer_pieces(path, trainer_state, model, optimizer)
        owns = getattr(optimizer, "owns", lambda p: True)
        names = {p: n for n, p in model.named_parameters()}
        inner = _inner(optimizer)
        for group in inner.param_groups:
            for p in group["params"]:
                name = names[p]
                if name in pieces and owns(p):
                    inner.state[p] = place_state(_assemble(_expert_rows(model, name), pieces[name]), p, group)
    dims.barrier()
    return trainer_state


def place_state(state: dict, p: torch.nn.Parameter, group: dict) -> dict:
    """Optimizer state onto the parameter's device; a scalar `step` stays on the CPU unless the
    optimizer is fused/capturable (torch's own load_state_dict rule)."""
    on_device = group.get("fused") or group.get("capturable")
    out = {}
    for k, v in state.items():
        if torch.is_tensor(v):
            v = v.to(p.device) if (k != "step" or on_device) else v.cpu()
            v = v.to(p.dtype) if k != "step" and v.is_floating_point() else v
        out[k] = v
    return out


def _optimizer_pieces(path: str, trainer_state: dict, model, optimizer) -> dict[str, list]:
    """name -> [(rows or None, state), ...] from the per-rank files, or from an earlier version's
    single-process trainer state."""
    pieces: dict[str, list] = {}
    for file in sorted(glob.glob(os.path.join(path, OPTIM_DIR, "rank-*.pt"))):
        for name, entry in torch.load(file, map_location="cpu", weights_only=False, mmap=True).items():
            pieces.setdefault(name, []).append((entry["rows"], entry["state"]))
    if not pieces and trainer_state.get("optimizer") is not None:
        # torch's state_dict numbers tensors in param-group order, the order the trainer builds
        # the groups in on every rank.
        names = {p: n for n, p in model.named_parameters()}
        order = [names[p] for g in _inner(optimizer).param_groups for p in g["params"]]
        for idx, s in trainer_state["optimizer"]["state"].items():
            pieces.setdefault(order[idx], []).append((None, s))
    return pieces


def _assemble(rows: tuple[int, int] | None, pieces: list) -> dict:
    """The state for global expert rows [lo, hi) (None: a replicated tensor) from pieces saved
    with any slicing (rows None in a piece: the whole tensor)."""
    if rows is None:
        if all(r is None for r, _ in pieces):
            return pieces[0][1]
        rows = (0, max(r[1] for r, _ in pieces))  # the whole stacked tensor from expert-parallel slices
    lo, hi = rows
    out: dict = {}
    unique = {tuple(r) if r is not None else None: s for r, s in pieces}  # data-parallel replicas wrote the same rows
    for prows, state in sorted(unique.items(), key=lambda e: e[0][0] if e[0] is not None else 0):
        plo, phi = prows if prows is not None else (0, hi)
        a, b = max(lo, plo), min(hi, phi)
        if a >= b:
            continue
        for k, v in state.items():
            if torch.is_tensor(v) and v.ndim:
                out.setdefault(k, []).append(v[a - plo:b - plo])
            else:
                out[k] = v  # the step count: the same in every piece
    return {k: (torch.cat(v) if isinstance(v, list) else v) for k, v in out.items()}


# ----------------------------------------------------------------------------- helpers
def _inner(optimizer):
    """The torch optimizer itself (a ZeRO-1 or replicated wrapper holds it as `.optimizer`)."""
    return getattr(optimizer, "optimizer", optimizer)


def _expert_rows(model, name: str) -> tuple[int, int] | None:
    """Global expert rows [lo, hi) of a stacked expert tensor held in slices; None otherwise."""
    if not name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
        return None
    experts = model.get_submodule(name.rsplit(".", 1)[0])
    if not hasattr(experts, "expert_offset"):
        return None
    return experts.expert_offset, experts.expert_offset + experts.n_experts


def _gather_objects(obj, dims) -> list:
    if not dims.distributed:
        return [obj]
    out = [None] * dims.world_size
    dist.all_gather_object(out, obj)
    return out


__all__ = ["save_checkpoint", "load_checkpoint", "save_model_parts", "named_optimizer_state", "place_state",
           "rng_state", "set_rng_state", "OPTIM_DIR"]
