"""Distributed checkpoints: every rank writes its own shard, committed only when all have finished.

    step-000100/model/   HF format (what load_model, generate and serve read): one safetensors file
                         per EP rank with that rank's experts under their GLOBAL names (rank 0's
                         file also holds everything replicated), an index, config.json, tokenizer
    step-000100/optim/rank-00003.pt   the ZeRO-1 optimizer state this rank owned, by tensor name
                                      (expert tensors with the global expert rows they cover)
    step-000100/trainer_state.pt      step, tokens, RNG, config ... ("optimizer": None, "sharded": ...)

All ranks write into `.tmp-step-N`; after a barrier rank 0 renames it to `step-N` (the commit).
Because tensors are stored by name and expert rows by global index, a checkpoint resumes on any
number of ranks and any EP size, and a single-process run's checkpoint resumes here too.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ..checkpoint import INDEX_FILE, checkpoint_entries, fill_from_checkpoint
from .data_parallel import ZeroOptimizer, place_state
from .mesh import ParallelDims, barrier

TRAINER_STATE = "trainer_state.pt"
OPTIM_DIR = "optim"
_EXPERT_NAME = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(.+)$")


# ----------------------------------------------------------------------------- names
def _expert_slice(model, name: str) -> tuple[int, int] | None:
    """Global expert rows [lo, hi) of a stacked expert tensor on this rank; None if not sliced."""
    if not (name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj")):
        return None
    module = model.get_submodule(name.rsplit(".", 1)[0])
    if not getattr(module, "is_expert_parallel", False):
        return None
    return module.expert_offset, module.expert_offset + module.n_experts


def global_checkpoint_entries(model):
    """(checkpoint name with GLOBAL expert index, tensor view) for what this rank holds."""
    offsets: dict[str, int] = {}
    for name, module in model.named_modules():
        if getattr(module, "is_expert_parallel", False):
            offsets[name] = module.expert_offset
    for name, t in checkpoint_entries(model):
        m = _EXPERT_NAME.match(name)
        if m and m.group(1) in offsets:
            name = f"{m.group(1)}.{int(m.group(2)) + offsets[m.group(1)]}.{m.group(3)}"
        yield name, t


def _writes_model(dims: ParallelDims) -> bool:
    return dims.dp_rank == 0  # one replica of each expert slice writes it


def _gather_objects(obj, dims: ParallelDims) -> list:
    if not dims.distributed:
        return [obj]
    out = [None] * dims.world_size
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- save
@torch.no_grad()
def save_model_sharded(model, path: str, dims: ParallelDims, save_config=None, tokenizer_dir: str | None = None) -> None:
    """Write the HF-format directory collectively (every rank calls this; no rank gathers all experts)."""
    os.makedirs(path, exist_ok=True)
    n_files = dims.ep_size
    names: list[str] = []
    if _writes_model(dims):
        tensors = {}
        for name, t in global_checkpoint_entries(model):
            is_expert = _EXPERT_NAME.match(name) is not None
            if is_expert or dims.ep_rank == 0:  # replicated tensors: rank 0's file
                tensors[name] = t.detach().to("cpu").contiguous()
        filename = f"model-{dims.ep_rank + 1:05d}-of-{n_files:05d}.safetensors"
        save_file(tensors, os.path.join(path, filename), metadata={"format": "pt"})
        names = [(n, filename, t.numel() * t.element_size()) for n, t in tensors.items()]
    everything = [e for part in _gather_objects(names, dims) for e in part]
    if dims.is_main:
        index = {"metadata": {"total_size": sum(size for _, _, size in everything)},
                 "weight_map": {n: f for n, f, _ in sorted(everything)}}
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
        cfg_dict = (save_config or model.config).to_dict()
        cfg_dict["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg_dict, f, indent=2, sort_keys=True)
            f.write("\n")
        if tokenizer_dir is not None:
            for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
                src = os.path.join(tokenizer_dir, name)
                if os.path.exists(src):
                    shutil.copyfile(src, os.path.join(path, name))


def named_optimizer_state(optimizer, model) -> dict[str, dict]:
    """{tensor name: {"rows": (lo, hi) | None, "state": {...}}} for the state this rank holds."""
    inner = optimizer.optimizer if isinstance(optimizer, ZeroOptimizer) else optimizer
    names = {p: n for n, p in model.named_parameters()}
    out = {}
    for p, s in inner.state.items():
        if s:
            name = names[p]
            out[name] = {"rows": _expert_slice(model, name),
                         "state": {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in s.items()}}
    return out


def save_checkpoint_distributed(run_dir: str, model, optimizer, trainer_state: dict, dims: ParallelDims,
                                save_config=None, tokenizer_dir: str | None = None, keep: int = 2,
                                point_latest=None) -> str:
    """Collective save of checkpoint `step-{step}`; returns its path (on every rank)."""
    root = os.path.join(run_dir, "checkpoints")
    name = f"step-{trainer_state['step']:06d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp-{name}")
    if dims.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, OPTIM_DIR))
    barrier(dims)
    save_model_sharded(model, os.path.join(tmp, "model"), dims, save_config, tokenizer_dir)
    if optimizer is not None:
        torch.save(named_optimizer_state(optimizer, model), os.path.join(tmp, OPTIM_DIR, f"rank-{dims.rank:05d}.pt"))
    if dims.is_main:
        state = dict(trainer_state, optimizer=None,
                     sharded={"world_size": dims.world_size, "ep_size": dims.ep_size,
                              "optimizer": optimizer is not None})
        torch.save(state, os.path.join(tmp, TRAINER_STATE))
    barrier(dims)  # every shard is on disk
    if dims.is_main:
        if os.path.exists(final):  # the same step again (final save after an interval save)
            old = os.path.join(root, f".old-{name}")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)  # the commit
        if point_latest is not None:
            point_latest(run_dir, os.path.join("checkpoints", name, "model"))
        complete = sorted(d for d in glob.glob(os.path.join(root, "step-*"))
                          if os.path.exists(os.path.join(d, TRAINER_STATE)))
        for old in complete[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(dims)
    return final


# ----------------------------------------------------------------------------- load
@torch.no_grad()
def load_weights(model, model_dir: str) -> None:
    """Fill this rank's tensors (its expert slice by global name) from an HF-format directory."""
    fill_from_checkpoint(model_dir, dict(global_checkpoint_entries(model)))


def _collect_optimizer_pieces(path: str, trainer_state: dict, model, optimizer) -> dict[str, list]:
    """name -> [(rows or None, state), ...] from a sharded or a single-process checkpoint."""
    pieces: dict[str, list] = {}
    files = sorted(glob.glob(os.path.join(path, OPTIM_DIR, "rank-*.pt")))
    if files:
        for file in files:
            for name, entry in torch.load(file, map_location="cpu", weights_only=False, mmap=True).items():
                pieces.setdefault(name, []).append((entry["rows"], entry["state"]))
    elif trainer_state.get("optimizer") is not None:
        # A single-process checkpoint: torch's state_dict numbers tensors in param-group order,
        # the same order the trainer builds the groups in on every rank.
        inner = optimizer.optimizer if isinstance(optimizer, ZeroOptimizer) else optimizer
        names = {p: n for n, p in model.named_parameters()}
        order = [names[p] for g in inner.param_groups for p in g["params"]]
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


def load_checkpoint_distributed(path: str, model, optimizer=None, dims: ParallelDims | None = None) -> dict:
    """Load weights and (this rank's share of) optimizer state; returns the trainer state."""
    trainer_state = torch.load(os.path.join(path, TRAINER_STATE), map_location="cpu", weights_only=False)
    load_weights(model, os.path.join(path, "model"))
    if optimizer is not None:
        pieces = _collect_optimizer_pieces(path, trainer_state, model, optimizer)
        inner = optimizer.optimizer if isinstance(optimizer, ZeroOptimizer) else optimizer
        owns = optimizer.owns if isinstance(optimizer, ZeroOptimizer) else (lambda p: True)
        names = {p: n for n, p in model.named_parameters()}
        for group in inner.param_groups:
            for p in group["params"]:
                name = names[p]
                if name in pieces and owns(p):
                    inner.state[p] = place_state(_assemble(_expert_slice(model, name), pieces[name]), p, group)
    if dims is not None:
        barrier(dims)
    return trainer_state


def is_sharded_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, OPTIM_DIR))


__all__ = ["save_model_sharded", "save_checkpoint_distributed", "load_checkpoint_distributed", "load_weights",
           "global_checkpoint_entries", "named_optimizer_state", "is_sharded_checkpoint"]
