"""The attention baselines (mha / gqa / mqa): their maths, cache sizes, parameter counts, checkpoints,
and the engine's clear refusal. MLA itself is covered by the transformers parity tests."""

import json

import pytest
import torch

from latentmoe import build_model, get_config, load_model, save_model
from latentmoe.engine.kv_cache import LatentCache, plan_cache
from latentmoe.kv_report import cache_rows, format_report

KV = {"mla": 4, "mha": 4, "gqa": 2, "mqa": 1}


def _cfg(kind, **kw):
    return get_config("tiny", attention_type=kind, num_key_value_heads=KV[kind], **kw)


def test_gqa_and_mqa_equal_mha_with_repeated_key_value_weights():
    """A GQA model is the MHA model whose key/value heads are copied for each group of query heads."""
    torch.manual_seed(0)
    ids = torch.randint(0, 4096, (2, 13))
    for kind in ("gqa", "mqa"):
        small = build_model(_cfg(kind), seed=1, std=0.05).eval()
        mha = build_model(_cfg("mha"), seed=2, std=0.05).eval()
        sd = small.state_dict()
        rep = 4 // KV[kind]
        for name, t in sd.items():
            if name.endswith(("k_proj.weight", "v_proj.weight")):
                sd[name] = t.view(KV[kind], -1, t.shape[-1]).repeat_interleave(rep, dim=0).flatten(0, 1)
        mha.load_state_dict(sd)
        with torch.no_grad():
            torch.testing.assert_close(small(ids), mha(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mha", "gqa", "mqa"])
def test_baselines_are_causal_and_relative_in_position(kind):
    model = build_model(_cfg(kind), seed=0, std=0.05).eval()
    ids = torch.randint(0, 4096, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 4096
    with torch.no_grad():
        a, b = model(ids), model(changed)
        torch.testing.assert_close(a[:, :8], b[:, :8])
        assert not torch.allclose(a[:, 8:], b[:, 8:])
        # RoPE on the whole head: shifting every position leaves attention (and the logits) unchanged.
        shifted = model(ids, positions=torch.arange(12)[None] + 37)
        torch.testing.assert_close(a, shifted, rtol=1e-4, atol=1e-4)
        # ...which a position-blind model would not give: order matters.
        swapped = model(ids, positions=torch.arange(12).flip(0)[None])
        assert not torch.allclose(a[:, -1], swapped[:, -1], atol=1e-3)


@pytest.mark.parametrize("kind", ["mla", "mha", "gqa", "mqa"])
def test_parameter_count_and_cache_size(kind):
    cfg = _cfg(kind)
    model = build_model(cfg, seed=0)
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())
    L, H, d = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.v_head_dim
    expected = {"mla": (32 + 16) * L, "mha": 2 * H * d * L, "gqa": 2 * 2 * d * L, "mqa": 2 * d * L}[kind]
    assert cfg.kv_cache_elements_per_token() == expected
    assert cache_rows(cfg)[0].elements_per_token == expected
    assert f"{expected:>15,}" in format_report(cfg)


@pytest.mark.parametrize("kind", ["mla", "mha", "gqa", "mqa"])
def test_checkpoint_round_trip(kind, tmp_path):
    model = build_model(_cfg(kind), seed=0, std=0.05).eval()
    save_model(model, tmp_path / kind)
    written = json.loads((tmp_path / kind / "config.json").read_text())
    # MLA's config.json stays DeepSeek-V2's own; the baselines say what they are.
    assert written.get("attention_type") == (None if kind == "mla" else kind)
    loaded = load_model(tmp_path / kind)
    assert loaded.config == model.config
    ids = torch.randint(0, 4096, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_config_validation():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        get_config("tiny", attention_type="mqa", num_key_value_heads=2)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        get_config("tiny", attention_type="gqa", num_key_value_heads=3)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        get_config("tiny", attention_type="mla", num_key_value_heads=2)
    with pytest.raises(ValueError, match="attention_type"):
        get_config("tiny", attention_type="linear")
    assert get_config("tiny", attention_type="mqa").num_key_value_heads == 1


def test_engine_refuses_baselines_clearly():
    cfg = _cfg("gqa")
    with pytest.raises(ValueError, match="attention_type 'gqa'.*1,024 cache bytes/token"):
        plan_cache(cfg, LatentCache(), torch.device("cpu"), torch.bfloat16, 16, None, None, 2, 64)
    num_blocks, _ = plan_cache(_cfg("mla"), LatentCache(), torch.device("cpu"), torch.bfloat16, 16, None, None, 2, 64)
    assert num_blocks > 1


def test_a_cache_budget_with_no_room_says_which_setting_to_change():
    cfg = _cfg("mla")
    per_block = LatentCache().bytes_per_token(cfg, torch.bfloat16) * 16
    with pytest.raises(ValueError, match=r"no room for the KV cache: cache_memory_gb=1e-09 leaves 0 blocks.*"
                                         r"raise gpu_memory_utilization, lower max_num_batched_tokens, or set cache_memory_gb / num_blocks"):
        plan_cache(cfg, LatentCache(), torch.device("cpu"), torch.bfloat16, 16, 1e-9, None, 2, 64)
    num_blocks, _ = plan_cache(cfg, LatentCache(), torch.device("cpu"), torch.bfloat16, 16,
                               3 * per_block / 2**30, None, 2, 32)
    assert num_blocks == 4   # three blocks of cache and the reserved one


def test_serving_commands_refuse_a_baseline_before_loading(tmp_path, capsys):
    from latentmoe.cli import main
    model = build_model(_cfg("mqa"), seed=0)
    save_model(model, tmp_path / "mqa")
    (tmp_path / "mqa" / "model.safetensors").write_bytes(b"not weights")  # never read
    assert main(["generate", str(tmp_path / "mqa"), "--token-ids", "--prompt", "1,2,3", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "engine serves MLA models" in err and "'mqa'" in err and "Traceback" not in err
