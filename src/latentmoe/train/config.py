"""Training configuration: one dataclass per TOML section, `--section.key value` overrides, and
the fully resolved config written beside the run (`config.toml`) so a run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..config import ModelConfig, get_config

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


@dataclass
class ModelSection:
    preset: str = "tiny"                                     # a preset name or a config.json path
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields over the preset
    init_std: float = 0.006                                  # the report's init std
    init_from: str = ""                                      # a model directory: start from its weights and
                                                             # config (preset ignored), e.g. a YaRN extension


@dataclass
class DataSection:
    corpus: str = "python-docs"     # "python-docs" | "python-packages" | "shakespeare" | a file/directory path
    tokenizer: str = "train"        # "train" (byte-level BPE on the corpus) | a dir (or file) with tokenizer.json
    vocab_size: int = 4096          # BPE vocabulary (model vocab_size follows it)
    val_fraction: float = 0.05      # every (1/val_fraction)-th document is held out for validation
    cache_dir: str = ""             # token shards + tokenizer; default: RUN_DIR/data
    max_chars: int = 0              # cap the corpus (0 = all of it; python-packages: 64M characters)
    passkey_fraction: float = 0.0   # training rows ending in a synthetic passkey-retrieval document (PasskeyMix)
    passkey_max_len: int = 0        # those documents' longest length (0 = the window)


@dataclass
class TrainSection:
    seq_len: int = 256
    micro_batch_size: int = 8       # sequences per forward/backward
    batch_size: int = 8             # sequences per optimizer step (a multiple of micro_batch_size)
    batch_size_start: int = 0       # batch-size ramp start (0 = no ramp)
    ramp_tokens: int = 0            # tokens over which batch size ramps linearly to batch_size
    max_steps: int = 100
    tokens: int = 0                 # token budget for the schedule (0 = max_steps x batch x seq_len)
    max_time_s: float = 0.0         # stop early after this much wall time (0 = no limit); saves first
    fit_time_s: float = 0.0         # shorten max_steps (and the schedule with it) to fit this loop time
    seed: int = 0


@dataclass
class OptimSection:
    lr: float = 2.4e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    fused: bool = True              # fused AdamW on CUDA
    warmup_steps: int = 2000
    decay_fractions: tuple[float, ...] = (0.6, 0.9)  # of the token budget
    decay_factor: float = 0.316


@dataclass
class LossSection:
    alpha1: float = 0.003           # expert-level balance (per sequence)
    alpha2: float = 0.05            # device-level balance
    alpha3: float = 0.02            # communication balance


@dataclass
class RoutingSection:
    devices: int = 1                # D: expert groups (= devices under expert parallelism)
    max_devices: int = 1            # M: devices a token may be sent to
    device_limited: bool = False    # restrict each token to its top-M device groups
    drop_tokens: bool = False       # device-level token dropping in training
    capacity_factor: float = 1.0
    protect_fraction: float = 0.1   # sequences never dropped


@dataclass
class PrecisionSection:
    device: str = "auto"            # "auto" | "cpu" | "cuda" | "cuda:N"
    autocast: str = "auto"          # "auto" (bf16 on CUDA, none on CPU) | "bf16" | "none"
    compile: bool = False
    activation_checkpointing: bool = False
    fused_moe: bool = False         # routed experts by the Triton training kernels (kernels.moe_autograd)
    threads: int = 0                # CPU threads (0 = torch default)


@dataclass
class CheckpointSection:
    interval: int = 0               # steps between saves (0 = only at the end)
    keep: int = 2                   # checkpoints kept
    save_optimizer: bool = True
    overwrite: bool = False         # a fresh run may replace the checkpoints/metrics already in run_dir


@dataclass
class LoggingSection:
    log_interval: int = 1
    eval_interval: int = 50
    eval_batches: int = 8
    progress: bool = True
    peak_tflops: float = 0.0        # for MFU; 0 = from the GPU name (unknown -> no MFU)


@dataclass
class ParallelSection:
    # Under torchrun; applied to the built model from outside (latentmoe.parallel.training).
    ep_size: int = 1                # expert parallelism: processes that split the routed experts
    dp_shard: int = 1               # 1: ZeRO-1 (optimizer state sharded over data-parallel replicas); 0: replicated


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossSection = field(default_factory=LossSection)
    routing: RoutingSection = field(default_factory=RoutingSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        t, r, o = self.train, self.routing, self.optim
        if t.micro_batch_size <= 0 or t.batch_size % t.micro_batch_size:
            raise ValueError(f"train.batch_size ({t.batch_size}) must be a positive multiple of "
                             f"train.micro_batch_size ({t.micro_batch_size})")
        if t.batch_size_start and not 0 < t.batch_size_start <= t.batch_size:
            raise ValueError("train.batch_size_start must be in 1..train.batch_size (or 0 = no ramp)")
        if t.seq_len <= 0 or t.max_steps <= 0:
            raise ValueError("train.seq_len and train.max_steps must be positive")
        if r.devices <= 0 or not 0 < r.max_devices <= r.devices:
            raise ValueError(f"routing.max_devices ({r.max_devices}) must be in 1..routing.devices ({r.devices})")
        if r.capacity_factor <= 0 or not 0 <= r.protect_fraction <= 1:
            raise ValueError("routing.capacity_factor must be > 0 and routing.protect_fraction in [0, 1]")
        if any(not 0 < f <= 1 for f in o.decay_fractions) or list(o.decay_fractions) != sorted(o.decay_fractions):
            raise ValueError(f"optim.decay_fractions must be increasing fractions in (0, 1], got {o.decay_fractions}")
        if self.precision.autocast not in ("auto", "bf16", "none"):
            raise ValueError("precision.autocast must be 'auto', 'bf16' or 'none'")
        if not 0 <= self.data.passkey_fraction <= 1 or self.data.passkey_max_len < 0:
            raise ValueError("data.passkey_fraction must be in [0, 1] and data.passkey_max_len >= 0")

    # ------------------------------------------------------------------ model
    def model_config(self, vocab_size: int | None = None, special: dict[str, int] | None = None) -> ModelConfig:
        """The ModelConfig trained: preset + overrides, vocab and special ids from the tokenizer."""
        # TOML has no null: "null" stands for None (e.g. q_lora_rank = "null", a plain q_proj).
        over = {k: None if v == "null" else v for k, v in self.model.overrides.items()}
        if vocab_size is not None:
            over["vocab_size"] = vocab_size
        if special:
            over.update(special)
        cfg = get_config(self.model.init_from or self.model.preset, **over)
        n_experts = cfg.n_routed_experts or 0
        if n_experts and n_experts % self.routing.devices:
            raise ValueError(f"routing.devices ({self.routing.devices}) must divide n_routed_experts ({n_experts})")
        return cfg

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        d = self.to_dict()
        lines = [f"run_dir = {_toml_value(d.pop('run_dir'))}"]
        for section, values in d.items():
            lines.append(f"\n[{section}]")
            nested = {k: v for k, v in values.items() if isinstance(v, dict)}
            for k, v in values.items():
                if k not in nested:
                    lines.append(f"{k} = {_toml_value(v)}")
            for k, v in nested.items():
                lines.append(f"\n[{section}.{k}]")
                lines.extend(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
        return "\n".join(lines) + "\n"

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(self.to_toml())


def _toml_value(v: Any) -> str:
    if v is None:
        return '"null"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(v)  # bools, numbers and strings are spelled alike in TOML and JSON


def _parse_value(text: str) -> Any:
    """A CLI value as TOML (numbers, booleans, arrays, quoted strings), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _build(cls, data: dict[str, Any], where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown config key(s) in [{where}]: {unknown}; allowed: {sorted(names)}")
    kwargs = {}
    for k, v in data.items():
        default = getattr(cls(), k) if cls is not TrainConfig else None
        if isinstance(v, dict) and k != "overrides":
            kwargs[k] = _build(SECTIONS[k], v, k)
        elif isinstance(default, tuple):
            kwargs[k] = tuple(v)
        elif isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
            kwargs[k] = float(v)
        elif default is not None and not isinstance(v, type(default)) and not (
                isinstance(default, dict) and isinstance(v, dict)):
            raise ValueError(f"config key {where}.{k} must be {type(default).__name__}, got {v!r}")
        else:
            kwargs[k] = v
    return cls(**kwargs)


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig) if f.name != "run_dir"}


def find_config(name: str) -> str:
    """A path, or the name of a built-in config (`demo`, `small`, `tiny`)."""
    if os.path.exists(name):
        return name
    builtin = os.path.join(CONFIG_DIR, name if name.endswith(".toml") else f"{name}.toml")
    if os.path.exists(builtin):
        return builtin
    choices = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".toml"))
    raise FileNotFoundError(f"no config {name!r}: not a file and not a built-in one ({', '.join(choices)})")


def load_config(path: str | None = None, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """Read a TOML file (or start from defaults), then apply overrides.

    overrides: `["--train.max_steps", "10", "--model.overrides.hidden_size", "64"]` or a dict
    `{"train.max_steps": 10}`; a dotted key walks into sections.
    """
    data: dict[str, Any] = {}
    if path is not None:
        with open(find_config(path), "rb") as f:
            data = tomllib.load(f)
    for key, value in _pairs(overrides):
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key}: {p} is not a section")
        node[parts[-1]] = value
    return _build(TrainConfig, data, "top level")


def _pairs(overrides) -> list[tuple[str, Any]]:
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return list(overrides.items())
    out, items = [], list(overrides)
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--"):
            raise ValueError(f"expected --section.key value, got {item!r}")
        key = item[2:]
        if "=" in key:
            key, text = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(items):
                raise ValueError(f"override {item} has no value")
            text = items[i + 1]
            i += 2
        out.append((key.replace("-", "_"), _parse_value(text)))
    return out


__all__ = ["TrainConfig", "load_config", "find_config", "CONFIG_DIR"]
