"""KV-cache arithmetic: what one token costs under MLA versus MHA, GQA-8 and MQA of the same model.

Per token and layer: MHA caches 2 * n_h * d_h elements (keys at the qk head dim, values at the
v head dim), GQA-g caches 2 * g * d_h, MQA 2 * d_h, MLA (d_c + d_h^R) — one latent plus one
shared RoPE key, whatever the head count.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig


@dataclass
class CacheRow:
    name: str
    elements_per_token: int  # all layers

    def bytes_per_token(self, bytes_per_element: int) -> int:
        return self.elements_per_token * bytes_per_element


def cache_rows(cfg: ModelConfig, gqa_groups: int = 8) -> list[CacheRow]:
    """Elements per token (all layers) for MLA and for MHA / GQA / MQA with the same heads and head dims.

    Keys carry the full qk head dim (nope + rope) and values the v head dim, as an MHA cache of
    this model would hold them (the report's Table 9 convention: 2 n_h d_h l with d_h = 128).
    """
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    # The report counts 2 * n_h * d_h * l with d_h the per-head dimension (128 for V2):
    # use the value head dim for both halves so the table reproduces the report's numbers,
    # and list the exact K(192)+V(128) MHA cache (what the engine's per-head baseline stores) separately.
    d_h = cfg.v_head_dim
    groups = min(gqa_groups, heads)
    if cfg.attention_type != "mla":  # a baseline model: its own cache, then the comparisons
        kind = cfg.attention_type.upper()
        return [
            CacheRow(f"{kind} (this model: {cfg.num_key_value_heads} kv heads x {cfg.head_dim})",
                     cfg.kv_cache_elements_per_token()),
            CacheRow(f"MHA ({heads} heads, 2*n_h*d_h)", 2 * heads * d_h * layers),
            CacheRow(f"GQA-{groups}", 2 * groups * d_h * layers),
            CacheRow("MQA", 2 * d_h * layers),
            CacheRow("MLA of this shape (latent + rope key)",
                     cfg.kv_cache_width * layers),
        ]
    return [
        CacheRow("MLA (latent + rope key)", cfg.kv_cache_elements_per_token()),
        CacheRow(f"MHA ({heads} heads, 2*n_h*d_h)", 2 * heads * d_h * layers),
        CacheRow(f"MHA as stored (K {cfg.qk_head_dim} + V {cfg.v_head_dim} per head)",
                 cfg.mha_cache_elements_per_token()),
        CacheRow(f"GQA-{groups}", 2 * groups * d_h * layers),
        CacheRow("MQA", 2 * d_h * layers),
    ]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n):,} B"
        n /= 1024
    return f"{n:,.1f} TiB"


def format_report(cfg: ModelConfig, context_len: int = 4096, batch: int = 1,
                  bytes_per_element: int = 2, name: str | None = None) -> str:
    """A text table: per-token elements and bytes, and the cache for `batch` sequences of `context_len`."""
    if context_len <= 0 or batch <= 0 or bytes_per_element <= 0:
        raise ValueError("context_len, batch and bytes_per_element must be positive")
    rows = cache_rows(cfg)
    mla = rows[0].elements_per_token  # the model's own cache: the ratio column's unit
    title = name or "model"
    lines = [
        f"KV cache of {title}: {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, "
        + (f"kv_lora_rank {cfg.kv_lora_rank}, rope dim {cfg.qk_rope_head_dim}, head dims "
           f"{cfg.qk_head_dim}/{cfg.v_head_dim}; " if cfg.attention_type == "mla" else
           f"{cfg.attention_type} attention with {cfg.num_key_value_heads} key/value heads of {cfg.head_dim}; ")
        + f"{bytes_per_element} bytes/element, "
        f"context {context_len:,}, batch {batch}",
        "",
        f"{'cache':<40} {'elements/token':>15} {'bytes/token':>13} {'total':>12} "
        f"{'vs MLA' if cfg.attention_type == 'mla' else 'vs this':>8}",
    ]
    for row in rows:
        total = row.elements_per_token * bytes_per_element * context_len * batch
        lines.append(f"{row.name:<40} {row.elements_per_token:>15,} "
                     f"{_human(row.bytes_per_token(bytes_per_element)):>13} {_human(total):>12} "
                     f"{row.elements_per_token / mla:>7.2f}x")
    mha = rows[1].elements_per_token
    if cfg.attention_type != "mla":
        return "\n".join(lines)
    lines += ["", f"MLA caches {100 * (1 - mla / mha):.1f}% less than MHA "
              f"({mla / (2 * cfg.v_head_dim * cfg.num_hidden_layers):.2f} groups of GQA-equivalent)."]
    lines += ["", *engine_cache_lines(cfg, context_len, batch)]
    return "\n".join(lines)


def engine_cache_lines(cfg: ModelConfig, context_len: int, batch: int) -> list[str]:
    """The engine's latent cache in bf16 and with kv_cache_dtype='fp8' (e4m3 rows + two fp32 scales per
    token and layer): bytes per token, total, and how many times the sequences a budget holds."""
    bf16 = cfg.kv_cache_elements_per_token() * 2
    fp8 = fp8_latent_bytes_per_token(cfg)
    rows = [("latent, bf16 (kv_cache_dtype auto)", bf16), ("latent, fp8 (kv_cache_dtype fp8)", fp8)]
    out = [f"{'engine cache':<40} {'bytes/token':>13} {'total':>12} {'seqs vs bf16':>13}"]
    for name, b in rows:
        out.append(f"{name:<40} {_human(b):>13} {_human(b * context_len * batch):>12} {bf16 / b:>12.2f}x")
    return out


def fp8_latent_bytes_per_token(cfg: ModelConfig) -> int:
    """One e4m3 byte per latent/rope element plus a c_kv scale and a k_pe scale (fp32) per layer."""
    return cfg.kv_cache_elements_per_token() + cfg.num_hidden_layers * 2 * 4


__all__ = ["cache_rows", "format_report", "CacheRow", "engine_cache_lines", "fp8_latent_bytes_per_token"]
