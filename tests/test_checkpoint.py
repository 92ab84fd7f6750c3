"""Checkpoint I/O: exact round trips, shards, clear errors, bounded load memory."""

import json
import os
import subprocess
import sys

import pytest
import torch

from latentmoe import CheckpointError, build_model, get_config, load_model, save_model


def _tiny(seed=0, **kw):
    return build_model(get_config("tiny", **kw), seed=seed, std=0.05)


def test_round_trip_is_bit_exact(tmp_path):
    model = _tiny(q_lora_rank=16)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert loaded.config == model.config


def test_sharded_save_and_load(tmp_path):
    model = _tiny()
    save_model(model, tmp_path / "s", max_shard_size="300KB")
    files = sorted(os.listdir(tmp_path / "s"))
    shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in index["weight_map"]
    loaded = load_model(tmp_path / "s")
    ids = torch.randint(0, 4096, (2, 11))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), loaded(ids))


def test_bf16_load_and_transformers_reads_our_checkpoint(tmp_path):
    from transformers import DeepseekV2ForCausalLM

    model = _tiny(seed=3).eval()
    save_model(model, tmp_path / "m")
    hf = DeepseekV2ForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 4096, (2, 13))
    with torch.no_grad():
        ref, out = hf(ids).logits, model(ids)
    assert ((out - ref).abs().max() / ref.abs().max()) < 1e-5
    half = load_model(tmp_path / "m", dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_missing_unexpected_and_misshaped_tensors_listed_together(tmp_path):
    from safetensors.torch import load_file, save_file

    save_model(_tiny(), tmp_path / "m")
    sd = load_file(tmp_path / "m" / "model.safetensors")
    del sd["model.layers.2.mlp.experts.5.down_proj.weight"]
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    sd["model.norm.weight"] = torch.zeros(7)
    save_file(sd, tmp_path / "m" / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "m")
    msg = str(err.value)
    assert "missing" in msg and "model.layers.2.mlp.experts.5.down_proj.weight" in msg
    assert "unexpected" in msg and "model.layers.0.self_attn.extra.weight" in msg
    assert "mis-shaped" in msg and "model.norm.weight" in msg and "(7,)" in msg


def test_missing_directory_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    get_config("tiny").save_json(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no safetensors"):
        load_model(tmp_path / "empty")


def test_tied_embeddings_round_trip(tmp_path):
    model = _tiny(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_model(model, tmp_path / "t")
    loaded = load_model(tmp_path / "t")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


_PEAK_SCRIPT = r"""
import gc, re, sys, torch, latentmoe

def hwm():  # peak resident set of this process (VmHWM; unlike ru_maxrss it is not inherited over exec)
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

torch.ones(1)  # load torch's own libraries before taking the baseline
gc.collect()
base = hwm()
model = latentmoe.load_model(sys.argv[1])
peak = hwm()
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(base, peak, size)
"""


def test_load_peak_memory_near_model_size(tmp_path):
    """Loading a ~1 GB checkpoint onto the CPU peaks near the model's own size (no second full copy)."""
    cfg = get_config("tiny", vocab_size=32000, hidden_size=1024, num_hidden_layers=7,
                     moe_intermediate_size=512, n_routed_experts=16, intermediate_size=4096,
                     kv_lora_rank=256, num_attention_heads=8, qk_nope_head_dim=64, v_head_dim=64, qk_rope_head_dim=32)
    model = build_model(cfg, seed=0, std=0.01)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    assert size > 0.9e9
    save_model(model, tmp_path / "big", max_shard_size="200MB")
    del model
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "big")],
                         capture_output=True, text=True, check=True)
    base, peak, loaded_size = map(int, out.stdout.split())
    assert loaded_size == size
    grew = peak - base
    print(f"model {size / 1e9:.2f} GB, load peak above baseline {grew / 1e9:.2f} GB")
    # the model itself + at most one mapped 200 MB shard and the libraries loading imports
    assert grew < size + 2 * 200e6, (grew, size)


def test_fill_from_checkpoint_skips_extras_and_lists_problems(tmp_path):
    from latentmoe.checkpoint import checkpoint_entries, fill_from_checkpoint

    model = _tiny(seed=1)
    save_model(model, tmp_path / "m")
    target = _tiny(seed=2)
    entries = dict(checkpoint_entries(target))
    part = {k: v for k, v in entries.items() if ".experts.0." in k}  # a subset, as one rank's slice would be
    fill_from_checkpoint(tmp_path / "m", part)
    src = dict(checkpoint_entries(model))
    assert all(torch.equal(part[k], src[k]) for k in part)
    with pytest.raises(CheckpointError, match="(?s)missing.*nonexistent"):
        fill_from_checkpoint(tmp_path / "m", {"nonexistent.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="(?s)mis-shaped.*model.norm.weight"):
        fill_from_checkpoint(tmp_path / "m", {"model.norm.weight": torch.zeros(3)})
