"""Model configuration: one flat dataclass with the released `config.json` field names.

`ModelConfig.from_json` reads a released (or transformers-written) `config.json`, `save_json`
writes one that both latentmoe and transformers load. Named presets are real models
(`deepseek-v2`, `deepseek-v2-lite`) or sizes for benchmarks (`small`) and CPU tests (`tiny`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any

TOPK_METHODS = ("greedy", "group_limited_greedy")
SCORING_FUNCS = ("softmax",)
ROPE_TYPES = ("default", "yarn")
# "mla" is DeepSeek-V2. The others are the baselines of the report's attention comparison:
# standard attention with num_key_value_heads key/value heads (MHA: all, GQA: a divisor, MQA: one).
ATTENTION_TYPES = ("mla", "mha", "gqa", "mqa")

# What a checkpoint's config.json must state (from_json): the sizes every tensor shape follows from.
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts")
# torch dtype names a config.json may give as torch_dtype / dtype.
DTYPE_NAMES = frozenset({"float32", "float16", "bfloat16", "float64", "float8_e4m3fn", "float8_e5m2", "auto"})

# Keys that transformers or the released remote code write but that carry nothing we use.
_IGNORED_KEYS = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "pretraining_tp", "qk_head_dim", "head_dim", "use_cache", "ep_size", "_name_or_path",
    "output_router_logits", "router_aux_loss_coef", "num_experts", "mlp_bias",
    "quantization_config",   # block-FP8 checkpoints: the weights carry their scales (checkpoint/hf.py)
}


def read_json_object(path: str) -> dict:
    """A JSON file that must hold an object (config.json, tokenizer_config.json ...); ValueError naming the
    file otherwise, so a damaged checkpoint file reads as one line rather than a traceback."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a JSON object, not a {type(data).__name__}")
    return data


@dataclass
class ModelConfig:
    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    n_shared_experts: int | None = 2
    n_routed_experts: int | None = 64
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    n_group: int | None = 1
    topk_group: int | None = 1
    num_experts_per_tok: int | None = 6
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = None
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    attention_type: str = "mla"

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = 1 if self.attention_type == "mqa" else self.num_attention_heads
        self.rope_scaling = _normalize_rope_scaling(self.rope_scaling)
        self.validate()

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"invalid config field `{name}` = {getattr(self, name)!r}: {why}")

        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"]
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(name, "must be a positive integer")
        nonneg = ["qk_nope_head_dim", "first_k_dense_replace"]
        for name in nonneg:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(name, "must be a non-negative integer")
        if self.hidden_size % self.num_attention_heads:
            # MLA's head dims are explicit, but the released code and transformers both require it.
            raise bad("num_attention_heads", f"must divide hidden_size ({self.hidden_size})")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        if self.attention_type not in ATTENTION_TYPES:
            raise bad("attention_type", f"must be one of {ATTENTION_TYPES}")
        if self.attention_type != "mla":
            self._validate_baseline_heads(bad)
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise bad("q_lora_rank", "must be a positive integer or null (plain q_proj)")
        if self.attention_type == "mla" and self.num_key_value_heads != self.num_attention_heads:
            raise bad("num_key_value_heads", f"MLA has one key/value per head: must equal "
                      f"num_attention_heads ({self.num_attention_heads})")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "only 'silu' (SwiGLU experts) is supported")
        if self.rms_norm_eps <= 0:
            raise bad("rms_norm_eps", "must be > 0")
        if self.has_dense_layers and (not isinstance(self.intermediate_size, int) or self.intermediate_size <= 0):
            raise bad("intermediate_size", "must be a positive integer (dense layers exist)")
        if self.num_moe_layers > 0:
            for name in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"):
                v = getattr(self, name)
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    raise bad(name, "must be a positive integer when the model has MoE layers")
            if self.n_shared_experts is not None and self.n_shared_experts < 0:
                raise bad("n_shared_experts", "must be >= 0 or null")
            if self.num_experts_per_tok > self.n_routed_experts:
                raise bad("num_experts_per_tok",
                          f"cannot exceed n_routed_experts ({self.n_routed_experts})")
            if self.topk_method not in TOPK_METHODS:
                raise bad("topk_method", f"must be one of {TOPK_METHODS}")
            if self.scoring_func not in SCORING_FUNCS:
                raise bad("scoring_func", f"must be one of {SCORING_FUNCS}")
            if self.moe_layer_freq <= 0:
                raise bad("moe_layer_freq", "must be a positive integer")
            if self.topk_method == "group_limited_greedy":
                if not self.n_group or self.n_group <= 0:
                    raise bad("n_group", "group_limited_greedy needs a positive n_group")
                if self.n_routed_experts % self.n_group:
                    raise bad("n_group", f"must divide n_routed_experts ({self.n_routed_experts})")
                if not self.topk_group or not 0 < self.topk_group <= self.n_group:
                    raise bad("topk_group", f"must be in 1..n_group ({self.n_group})")
                per_group = self.n_routed_experts // self.n_group
                if self.topk_group * per_group < self.num_experts_per_tok:
                    raise bad("topk_group", "the kept groups hold fewer experts than num_experts_per_tok")
            if self.routed_scaling_factor <= 0:
                raise bad("routed_scaling_factor", "must be > 0")
        rs = self.rope_scaling
        if rs is not None:
            if rs["type"] not in ROPE_TYPES:
                raise ValueError(f"invalid config field `rope_scaling`: type {rs['type']!r} is not one of {ROPE_TYPES}")
            if rs["type"] == "yarn":
                for key in ("factor", "original_max_position_embeddings"):
                    if key not in rs:
                        raise ValueError(f"invalid config field `rope_scaling`: yarn needs `{key}`")
                if rs["factor"] < 1:
                    raise ValueError("invalid config field `rope_scaling`: factor must be >= 1")

    def _validate_baseline_heads(self, bad) -> None:
        h, g = self.num_attention_heads, self.num_key_value_heads
        if self.v_head_dim % 2:
            raise bad("v_head_dim", "must be even: the baselines rotate the whole head (v_head_dim) with RoPE")
        if self.attention_type == "mha" and g != h:
            raise bad("num_key_value_heads", f"mha has one key/value head per head: must equal "
                      f"num_attention_heads ({h}) or be null")
        if self.attention_type == "mqa" and g != 1:
            raise bad("num_key_value_heads", "mqa shares one key/value head: must be 1 or null")
        if self.attention_type == "gqa" and (not isinstance(g, int) or g <= 0 or h % g):
            raise bad("num_key_value_heads", f"gqa needs a positive divisor of num_attention_heads ({h})")

    # ---------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        """The baselines' per-head dimension (queries, keys and values alike): v_head_dim."""
        return self.v_head_dim

    @property
    def rope_dim(self) -> int:
        """Dimensions RoPE rotates: MLA's decoupled key (qk_rope_head_dim), a baseline's whole head."""
        return self.qk_rope_head_dim if self.attention_type == "mla" else self.head_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_dense_layers(self) -> bool:
        return any(not self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def is_moe_layer(self, layer_idx: int) -> bool:
        # The released remote code's rule; transformers ignores moe_layer_freq (all layers past
        # first_k_dense_replace are MoE), which agrees for the released moe_layer_freq = 1.
        return (self.n_routed_experts is not None and self.n_routed_experts > 0
                and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    @property
    def yarn_factor(self) -> float:
        return float(self.rope_scaling["factor"]) if self.rope_scaling and self.rope_scaling["type"] == "yarn" else 1.0

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs is not None and rs["type"] == "yarn" and rs.get("mscale_all_dim"):
            m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
            scale = scale * m * m
        return scale

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    @property
    def kv_cache_width(self) -> int:
        """Elements MLA caches per token and layer: the latent c_KV (kv_lora_rank) and the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def kv_cache_elements_per_token(self) -> int:
        """This model's cache per token over all layers: MLA (kv_lora_rank + rope dim) x layers,
        the baselines a key and a value per key/value head: 2 x num_key_value_heads x head_dim x layers."""
        if self.attention_type != "mla":
            return 2 * self.num_key_value_heads * self.head_dim * self.num_hidden_layers
        return self.kv_cache_width * self.num_hidden_layers

    def mha_cache_elements_per_token(self) -> int:
        """What an MHA model of this shape caches per token over all layers: every head's key (qk head
        dim, nope + rope) and value (v head dim)."""
        return self.num_attention_heads * (self.qk_head_dim + self.v_head_dim) * self.num_hidden_layers

    def attention_parameters(self) -> int:
        """Parameters of one attention layer (without biases)."""
        d, h = self.hidden_size, self.num_attention_heads
        if self.attention_type != "mla":  # q, k, v, o projections
            return d * self.head_dim * (2 * h + 2 * self.num_key_value_heads)
        if self.q_lora_rank is None:
            attn = d * h * self.qk_head_dim
        else:
            attn = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim
        attn += d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        attn += self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
        attn += h * self.v_head_dim * d
        return attn

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count from the config alone (active: per token, with K routed experts)."""
        d = self.hidden_size
        attn = self.attention_parameters()
        total = 0
        for i in range(self.num_hidden_layers):
            total += attn + 2 * d
            if self.is_moe_layer(i):
                expert = 3 * d * self.moe_intermediate_size
                n_exp = self.num_experts_per_tok if active else self.n_routed_experts
                total += (n_exp + (self.n_shared_experts or 0)) * expert + self.n_routed_experts * d
            else:
                total += 3 * d * self.intermediate_size
        total += d  # final norm
        total += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return total

    # ---------------------------------------------------------------- I/O
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        data = dict(data)
        names = {f.name for f in dataclasses.fields(cls)}
        # transformers >= 5 writes `rope_parameters` (with rope_theta inside); the released
        # checkpoints write `rope_scaling` with `type`. Accept both.
        rope_params = data.pop("rope_parameters", None)
        if rope_params:
            rope_params = dict(rope_params)
            if "rope_theta" in rope_params:
                data.setdefault("rope_theta", rope_params.pop("rope_theta"))
            if data.get("rope_scaling") is None:
                data["rope_scaling"] = rope_params
        unknown = [k for k in data if k not in names and k not in _IGNORED_KEYS]
        if data.get("mlp_bias"):
            raise ValueError("invalid config field `mlp_bias` = True: DeepSeek-V2 MLPs have no bias")
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no config.json at {path}")
        data = read_json_object(path)
        # A checkpoint's config must say what its tensors are: the defaults are one released model's sizes, and
        # taking them for a missing field would only show up as dozens of mis-shaped tensors.
        missing = [k for k in REQUIRED_FIELDS if k not in data]
        if data.get("n_routed_experts") is not None:
            missing += [k for k in ("moe_intermediate_size", "num_experts_per_tok") if k not in data]
        if missing:
            raise ValueError(f"{path}: missing required field(s) {', '.join(missing)}")
        for key in ("torch_dtype", "dtype"):
            if key in data and data[key] is not None and data[key] not in DTYPE_NAMES:
                raise ValueError(f"{path}: unknown {key} {data[key]!r} (one of {', '.join(sorted(DTYPE_NAMES))})")
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["rope_scaling"] is not None and out["rope_scaling"]["type"] == "default":
            out["rope_scaling"] = None
        if out["attention_type"] == "mla":  # DeepSeek-V2's own config.json, unchanged
            del out["attention_type"]
        out["architectures"] = ["DeepseekV2ForCausalLM"]
        out["model_type"] = "deepseek_v2"
        return out

    def save_json(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(scale) + 1 (1 when not extending)."""
    return 0.1 * mscale * math.log(scale) + 1.0 if scale > 1 else 1.0


def _normalize_rope_scaling(rs: dict[str, Any] | None) -> dict[str, Any] | None:
    """Accept `{"type": ...}` (released) and `{"rope_type": ...}` (newer); store `type`."""
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ValueError(f"invalid config field `rope_scaling` = {rs!r}: must be an object or null")
    rs = dict(rs)
    kind = rs.pop("rope_type", None) or rs.pop("type", None) or "default"
    rs.pop("type", None)
    if kind == "default":
        return None
    return {"type": kind, **rs}


# ---------------------------------------------------------------- presets
_YARN_V2 = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}

PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeek-V2 (236B total / 21B active): the released config.json.
    "deepseek-v2": dict(
        vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=60, num_attention_heads=128, num_key_value_heads=128,
        n_shared_experts=2, n_routed_experts=160, routed_scaling_factor=16.0,
        topk_method="group_limited_greedy", n_group=8, topk_group=3, num_experts_per_tok=6,
        moe_layer_freq=1, first_k_dense_replace=1, norm_topk_prob=False, scoring_func="softmax",
        aux_loss_alpha=0.001, seq_aux=True, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840,
        rope_theta=10000.0, rope_scaling=_YARN_V2, rms_norm_eps=1e-6, bos_token_id=100000,
        eos_token_id=100001, tie_word_embeddings=False, initializer_range=0.02),
    # DeepSeek-V2-Lite (15.7B total / 2.4B active): the released config.json.
    "deepseek-v2-lite": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_shared_experts=2, n_routed_experts=64, routed_scaling_factor=1.0,
        topk_method="greedy", n_group=1, topk_group=1, num_experts_per_tok=6,
        moe_layer_freq=1, first_k_dense_replace=1, norm_topk_prob=False, scoring_func="softmax",
        aux_loss_alpha=0.001, seq_aux=True, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840,
        rope_theta=10000.0, rope_scaling=_YARN_V2, rms_norm_eps=1e-6, bos_token_id=100000,
        eos_token_id=100001, tie_word_embeddings=False, initializer_range=0.02),
    # ~0.7B total / ~0.19B active: the GPU training benchmark size.
    "small": dict(
        vocab_size=32000, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=512,
        num_hidden_layers=12, num_attention_heads=16, n_shared_experts=2, n_routed_experts=32,
        num_experts_per_tok=4, topk_method="greedy", n_group=1, topk_group=1,
        first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=256, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=4096, rope_scaling=None,
        bos_token_id=1, eos_token_id=2, initializer_range=0.006),
    # A few MB: CPU tests and the laptop demo.
    "tiny": dict(
        vocab_size=4096, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8,
        num_experts_per_tok=2, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=2048, rope_scaling=None,
        bos_token_id=1, eos_token_id=2, initializer_range=0.02),
}


def get_config(name_or_path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """A preset name, a checkpoint directory, or a config.json path."""
    key = os.fspath(name_or_path)
    if key in PRESETS:
        data = dict(PRESETS[key])
        if data.get("rope_scaling"):
            data["rope_scaling"] = dict(data["rope_scaling"])
        data.update(overrides)
        return ModelConfig(**data)
    if os.path.exists(key):
        cfg = ModelConfig.from_json(key)
        return cfg.replace(**overrides) if overrides else cfg
    raise ValueError(f"unknown model {key!r}: not a preset ({', '.join(PRESETS)}) and no such path")


__all__ = ["ModelConfig", "PRESETS", "ATTENTION_TYPES", "get_config", "yarn_mscale"]
