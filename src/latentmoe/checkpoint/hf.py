"""The HF format: `config.json` + safetensors (one file or shards with an index) + tokenizer files.

Names on disk are the released ones (per-expert `mlp.experts.E.{gate,up,down}_proj.weight`);
in the model the routed experts of a layer are stacked. This table is the whole mapping:

| checkpoint name                               | model tensor                                   |
|-----------------------------------------------|------------------------------------------------|
| model.layers.L.mlp.experts.E.gate_proj.weight | model.layers.L.mlp.experts.gate_up_proj[E, :I] |
| model.layers.L.mlp.experts.E.up_proj.weight   | model.layers.L.mlp.experts.gate_up_proj[E, I:] |
| model.layers.L.mlp.experts.E.down_proj.weight | model.layers.L.mlp.experts.down_proj[E]        |
| anything else                                 | the parameter of the same name                 |

Block-FP8 checkpoints (DeepSeek's FP8 releases) store a weight as float8_e4m3fn `X.weight` beside
fp32 `X.weight_scale_inv`, one scale per 128 x 128 tile. `load_model` dequantises them into the model's
dtype; `read_fp8_weights` hands the stored pairs to the engine (quantization="fp8") as they are.

An `Experts` that holds only a slice of its layer's experts (expert parallelism) says so with
`expert_offset`: its row e is stored as expert `expert_offset + e`, so a slice is saved and loaded
under the global names and the files of all slices together are one ordinary checkpoint.

Loading builds the model on the meta device, allocates it once on the target device in the
target dtype, then copies tensor by tensor, shard by shard: no full fp32 copy ever exists.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator

import torch
from safetensors import safe_open

from .integrity import CheckpointError, check_safetensors
from safetensors.torch import save_file

from ..config import ModelConfig
from ..model import DeepseekV2ForCausalLM

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# What a tokenizer directory holds; copied beside the weights so that a checkpoint directory is complete.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")




def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, str):
        table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
        if dtype not in table:
            raise ValueError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
        return table[dtype]
    return dtype


def checkpoint_entries(model: DeepseekV2ForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, view into the model's tensor) for every tensor a checkpoint holds."""
    tied = model.config.tie_word_embeddings
    for name, param in model.state_dict(keep_vars=True).items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len(".gate_up_proj")]
            offset = getattr(model.get_submodule(prefix), "expert_offset", 0)
            inter = param.shape[1] // 2
            for e in range(param.shape[0]):
                yield f"{prefix}.{offset + e}.gate_proj.weight", param.data[e, :inter]
                yield f"{prefix}.{offset + e}.up_proj.weight", param.data[e, inter:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len(".down_proj")]
            offset = getattr(model.get_submodule(prefix), "expert_offset", 0)
            for e in range(param.shape[0]):
                yield f"{prefix}.{offset + e}.down_proj.weight", param.data[e]
        else:
            yield name, param.data


def _shard_files(path: str) -> list[str]:
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: corrupt index (no JSON 'weight_map' of tensor -> file)") from None
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"{INDEX_FILE} names shard files that do not exist: {missing}")
        return _checked([os.path.join(path, f) for f in files])
    single = os.path.join(path, SINGLE_FILE)
    if os.path.exists(single):
        return _checked([single])
    others = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if others:
        return _checked([os.path.join(path, f) for f in others])
    raise CheckpointError(f"no safetensors weights in {path} (expected {SINGLE_FILE} or {INDEX_FILE})")


def _checked(files: list[str]) -> list[str]:
    for file in files:   # header-only checks: a damaged file is named before anything is loaded
        check_safetensors(file)
    return files


@torch.no_grad()
def load_model(path: str | os.PathLike, device: torch.device | str | None = None,
               dtype: torch.dtype | str | None = None, progress: bool = False,
               revision: str | None = None) -> DeepseekV2ForCausalLM:
    """Load an HF-format DeepSeek-V2 directory, or a hub model id (at `revision`, through the hub cache), onto
    `device` (default CPU) in `dtype` (default: bf16 on CUDA, fp32 on CPU)."""
    from .hub import resolve_checkpoint
    path = resolve_checkpoint(path, revision)
    cfg = ModelConfig.from_json(path)
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = resolve_dtype(dtype, device)
    files = _shard_files(path)
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(cfg)
    model.to(dtype)
    model.to_empty(device=device)
    model.tie_weights()
    # A tied checkpoint may still carry lm_head.weight: it is the embedding, nothing to load.
    ignore = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    fill_from_checkpoint(path, dict(checkpoint_entries(model)), files=files, strict=True, ignore=ignore,
                         progress=progress, what="its config.json")
    model.eval()
    return model


@torch.no_grad()
def fill_from_checkpoint(path: str | os.PathLike, targets: dict[str, torch.Tensor], *, files: list[str] | None = None,
                         strict: bool = False, ignore: set[str] = frozenset(), progress: bool = False,
                         what: str = "this model") -> None:
    """Copy every tensor named in `targets` from the checkpoint directory `path`, shard by shard.

    With `strict`, tensors the checkpoint holds beyond `targets` (and `ignore`) are errors; without it
    they are skipped (another rank's or device's experts). One CheckpointError lists every missing,
    unexpected and mis-shaped tensor.
    """
    path = os.fspath(path)
    files = _shard_files(path) if files is None else files
    seen: set[str] = set()
    unexpected: list[str] = []
    misshaped: list[str] = []
    scales = _fp8_scale_files(files)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(files), desc="loading shards", unit="shard")
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    target = targets.get(name)
                    if target is None:
                        if strict and name not in ignore and name not in scales:   # scales travel with their weight
                            unexpected.append(name)
                        continue
                    tensor = f.get_tensor(name)
                    if tuple(tensor.shape) != tuple(target.shape):
                        misshaped.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)}")
                        continue
                    if tensor.dtype == FP8 and target.dtype != FP8:
                        tensor = _dequantize_stored(name, tensor, scales)
                    target.copy_(tensor)
                    seen.add(name)
                    del tensor
        except CheckpointError:
            raise
        except Exception as e:   # the parser's own errors (SafetensorError, ...): name the file
            raise CheckpointError(f"{file}: cannot be read as safetensors ({e})") from None
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    missing = sorted(set(targets) - seen)
    if missing or unexpected or misshaped:
        lines = [f"checkpoint {path} does not match {what}:"]
        for title, items in (("missing", missing), ("unexpected", sorted(unexpected)), ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {len(items)} {title} tensor(s):")
                lines.extend(f"    {item}" for item in items[:50])
                if len(items) > 50:
                    lines.append(f"    ... and {len(items) - 50} more")
        raise CheckpointError("\n".join(lines))


FP8 = torch.float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"


def _fp8_scale_files(files: list[str]) -> dict[str, str]:
    """{name of a `*_scale_inv` tensor: its shard file} over the checkpoint (empty for an unquantised one)."""
    found = {}
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            found.update({n: file for n in f.keys() if n.endswith(SCALE_SUFFIX)})
    return found


def _load_scale(name: str, scales: dict[str, str]) -> torch.Tensor:
    if name + SCALE_SUFFIX not in scales:
        raise CheckpointError(f"checkpoint stores {name} in float8 without its scales {name}{SCALE_SUFFIX}")
    with safe_open(scales[name + SCALE_SUFFIX], framework="pt", device="cpu") as f:
        return f.get_tensor(name + SCALE_SUFFIX)


def _dequantize_stored(name: str, tensor: torch.Tensor, scales: dict[str, str]) -> torch.Tensor:
    from ..kernels.fp8 import BLOCK, dequantize_fp8_blocks

    scale = _load_scale(name, scales)
    want = (-(-tensor.shape[0] // BLOCK), -(-tensor.shape[1] // BLOCK))
    if tuple(scale.shape) != want:
        raise CheckpointError(f"{name}{SCALE_SUFFIX} has shape {tuple(scale.shape)}, expected {want} "
                              f"(one scale per {BLOCK}x{BLOCK} block of {tuple(tensor.shape)})")
    return dequantize_fp8_blocks(tensor, scale)


def is_fp8_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the directory's weights are block-FP8 (any `*_scale_inv` tensor)."""
    return bool(_fp8_scale_files(_shard_files(os.fspath(path))))


@torch.no_grad()
def read_fp8_weights(path: str | os.PathLike, cfg: ModelConfig | None = None) -> dict[str, tuple[torch.Tensor,
                                                                                                  torch.Tensor]]:
    """The block-FP8 pairs of a checkpoint under the model's tensor names: {name: (e4m3, scale_inv)} on CPU.

    Dense weights keep their names (`...q_proj.weight`); a layer's routed experts are stacked as the model
    stacks them (`...mlp.experts.gate_up_proj` [E, 2I, D] with scales [E, 2I/128, D/128]) when I is a
    multiple of 128, so that gate's and up's blocks never share a tile; otherwise they are left out (the
    engine quantises the dequantised experts again). Raises CheckpointError for a weight without scales.
    """
    from ..kernels.fp8 import BLOCK

    path = os.fspath(path)
    cfg = cfg or ModelConfig.from_json(path)
    files = _shard_files(path)
    scales = _fp8_scale_files(files)
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(SCALE_SUFFIX):
                    continue
                if f.get_slice(name).get_dtype() not in ("F8_E4M3", "float8_e4m3fn"):
                    continue
                pairs[name] = (f.get_tensor(name), _load_scale(name, scales).float())
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    experts: dict[str, dict[int, dict[str, tuple]]] = {}
    for name, pair in pairs.items():
        prefix, sep, rest = name.partition(".mlp.experts.")
        if sep and rest.split(".")[0].isdigit():
            e, proj = rest.split(".")[:2]
            experts.setdefault(prefix + ".mlp.experts", {}).setdefault(int(e), {})[proj] = pair
        else:
            out[name] = pair
    I = cfg.moe_intermediate_size
    if I % BLOCK == 0:
        for prefix, per_expert in experts.items():
            if sorted(per_expert) != list(range(len(per_expert))) or any(len(p) != 3 for p in per_expert.values()):
                continue   # a partial set (e.g. only some experts quantised): leave them to the engine
            rows = [per_expert[e] for e in range(len(per_expert))]
            out[prefix + ".gate_up_proj"] = (
                torch.stack([torch.cat([r["gate_proj"][0], r["up_proj"][0]]) for r in rows]),
                torch.stack([torch.cat([r["gate_proj"][1], r["up_proj"][1]]) for r in rows]))
            out[prefix + ".down_proj"] = (torch.stack([r["down_proj"][0] for r in rows]),
                                          torch.stack([r["down_proj"][1] for r in rows]))
    return out


@torch.no_grad()
def save_fp8_model(model: DeepseekV2ForCausalLM, path: str | os.PathLike, skip: tuple[str, ...] = ("lm_head",),
                   tokenizer_dir: str | os.PathLike | None = None) -> None:
    """Write `model` as a block-FP8 checkpoint (one file): every 2-D `.weight` of a Linear and every expert
    weight in e4m3 with its `_scale_inv`, the rest (embeddings, norms, router, `skip`) as they are."""
    from ..kernels.fp8 import quantize_fp8_blocks

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    linears = {n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and n.rsplit(".", 1)[-1] not in skip}
    tensors = {}
    for name, t in checkpoint_entries(model):
        if name in linears or ".mlp.experts." in name:
            q, s = quantize_fp8_blocks(t.detach().cpu())
            tensors[name], tensors[name + SCALE_SUFFIX] = q, s
        else:
            tensors[name] = t.detach().cpu().contiguous()
    save_file(tensors, os.path.join(path, SINGLE_FILE), metadata={"format": "pt"})
    write_config_and_tokenizer(path, model.config, next(model.parameters()).dtype, tokenizer_dir)
    with open(os.path.join(path, "config.json")) as f:
        cfg_dict = json.load(f)
    cfg_dict["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                       "weight_block_size": [128, 128]}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2, sort_keys=True)
        f.write("\n")


@torch.no_grad()
def save_model(model: DeepseekV2ForCausalLM, path: str | os.PathLike, max_shard_size: int | str = "5GB",
               tokenizer_dir: str | os.PathLike | None = None, config: ModelConfig | None = None) -> None:
    """Write config.json + safetensors (sharded with an index above `max_shard_size`), and the tokenizer
    files of `tokenizer_dir`. `config` is what config.json says (default: the model's own)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in checkpoint_entries(model)}
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size,
                                               filename_pattern="model{suffix}.safetensors")
    # Remove stale weights from an earlier save so the directory holds exactly one checkpoint.
    for old in os.listdir(path):
        if old.endswith(".safetensors") or old == INDEX_FILE:
            os.remove(os.path.join(path, old))
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, os.path.join(path, filename), metadata={"format": "pt"})
    if split.is_sharded:
        write_index(path, split.tensor_to_filename, split.metadata["total_size"])
    write_config_and_tokenizer(path, config or model.config, next(model.parameters()).dtype, tokenizer_dir)


def write_index(path: str, weight_map: dict[str, str], total_size: int) -> None:
    """The shard index: which file holds each tensor."""
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, f,
                  indent=2)


def write_config_and_tokenizer(path: str, config: ModelConfig, dtype: torch.dtype,
                               tokenizer_dir: str | os.PathLike | None = None) -> None:
    """config.json (with the dtype of the weights) and the tokenizer files, beside the weights."""
    cfg_dict = config.to_dict()
    cfg_dict["torch_dtype"] = str(dtype).removeprefix("torch.")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2, sort_keys=True)
        f.write("\n")
    if tokenizer_dir is None:
        return
    for name in TOKENIZER_FILES:
        src = os.path.join(os.fspath(tokenizer_dir), name)
        if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(os.path.join(path, name)):
            shutil.copyfile(src, os.path.join(path, name))


__all__ = ["load_model", "save_model", "save_fp8_model", "read_fp8_weights", "is_fp8_checkpoint",
           "fill_from_checkpoint", "CheckpointError", "checkpoint_entries", "resolve_dtype",
           "default_dtype", "write_index", "write_config_and_tokenizer", "INDEX_FILE", "TOKENIZER_FILES"]
