"""Config: released fields round trip, presets are the released values, bad fields are named."""

import json

import pytest

from latentmoe import ModelConfig, get_config
from latentmoe.config import PRESETS


def test_presets_hold_released_values():
    v2 = get_config("deepseek-v2")
    assert (v2.hidden_size, v2.num_hidden_layers, v2.num_attention_heads, v2.q_lora_rank) == (5120, 60, 128, 1536)
    assert (v2.n_routed_experts, v2.n_shared_experts, v2.num_experts_per_tok) == (160, 2, 6)
    assert (v2.topk_method, v2.n_group, v2.topk_group, v2.routed_scaling_factor) == ("group_limited_greedy", 8, 3, 16.0)
    lite = get_config("deepseek-v2-lite")
    assert (lite.hidden_size, lite.num_hidden_layers, lite.q_lora_rank, lite.intermediate_size) == (2048, 27, None, 10944)
    assert (lite.n_routed_experts, lite.moe_intermediate_size, lite.topk_method) == (64, 1408, "greedy")
    for cfg in (v2, lite):
        assert cfg.rope_scaling == {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                    "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
        assert abs(cfg.softmax_scale - 0.1147) < 1e-4  # 192^-0.5 * mscale(40, 0.707)^2
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.vocab_size) == (100000, 100001, 102400)


def test_parameter_counts_match_the_report():
    v2, lite = get_config("deepseek-v2"), get_config("deepseek-v2-lite")
    assert abs(v2.num_parameters() / 1e9 - 236) < 1.5
    assert abs(v2.num_parameters(active=True) / 1e9 - 21) < 1.5
    assert abs(lite.num_parameters() / 1e9 - 15.7) < 0.3
    assert abs(lite.num_parameters(active=True) / 1e9 - 2.4) < 0.3
    assert 0.6e9 < get_config("small").num_parameters() < 0.8e9


@pytest.mark.parametrize("name", list(PRESETS))
def test_json_round_trip(tmp_path, name):
    cfg = get_config(name)
    cfg.save_json(tmp_path)
    assert ModelConfig.from_json(tmp_path / "config.json") == cfg


def test_reads_transformers_rope_parameters_and_released_forms():
    base = ModelConfig().to_dict()
    for key in ("architectures", "model_type"):
        base.pop(key)
    yarn = {"factor": 40, "original_max_position_embeddings": 4096, "mscale": 0.707, "mscale_all_dim": 0.707}
    released = ModelConfig.from_dict(dict(base, rope_scaling=dict(yarn, type="yarn"), rope_theta=5000.0))
    newer = ModelConfig.from_dict(dict(base, rope_scaling=dict(yarn, rope_type="yarn"), rope_theta=5000.0))
    base.pop("rope_theta"), base.pop("rope_scaling")
    v5 = ModelConfig.from_dict(dict(base, rope_parameters=dict(yarn, rope_type="yarn", rope_theta=5000.0)))
    assert released == newer == v5
    assert v5.rope_theta == 5000.0 and v5.rope_scaling["type"] == "yarn"
    default = ModelConfig.from_dict(dict(base, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    assert default.rope_scaling is None


@pytest.mark.parametrize("changes,field", [
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(hidden_size=-4), "hidden_size"),
    (dict(num_key_value_heads=4), "num_key_value_heads"),
    (dict(num_experts_per_tok=65), "num_experts_per_tok"),
    (dict(topk_method="group_limited_greedy", n_group=5, topk_group=2), "n_group"),
    (dict(topk_method="group_limited_greedy", n_group=8, topk_group=9), "topk_group"),
    (dict(topk_method="noaux_tc"), "topk_method"),
    (dict(scoring_func="sigmoid"), "scoring_func"),
    (dict(qk_rope_head_dim=63), "qk_rope_head_dim"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(kv_lora_rank=-1), "kv_lora_rank"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"type": "linear", "factor": 2}), "rope_scaling"),
    (dict(rope_scaling={"type": "yarn"}), "rope_scaling"),
])
def test_invalid_fields_are_named(changes, field):
    with pytest.raises(ValueError, match=field):
        get_config("deepseek-v2-lite", **changes)


def test_unknown_fields_and_presets_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown config fields.*frobnicate"):
        ModelConfig.from_dict({"frobnicate": 1})
    with pytest.raises(ValueError, match="unknown model"):
        get_config("deepseek-v9")
    full = {**get_config("tiny").to_dict(), "hidden_size": 64, "num_attention_heads": 3}
    (tmp_path / "config.json").write_text(json.dumps(full))
    with pytest.raises(ValueError, match="num_attention_heads.*must divide hidden_size"):
        ModelConfig.from_json(tmp_path)
