"""`latentmoe ablate`: the comparisons run end to end at toy size and report what they promise."""

from __future__ import annotations

import json

import pytest

from latentmoe.cli import main
from latentmoe.config import get_config
from latentmoe.train.ablation import SCALES, attention_variants, match_ffn_width


def test_baselines_are_matched_to_mla_parameters():
    for scale in ("cpu", "gpu", "tiny"):
        variants, _ = attention_variants(SCALES[scale])
        cfgs = [get_config("tiny", **{**SCALES[scale].model, **v.model}) for v in variants]
        target = cfgs[0].num_parameters()
        assert [c.attention_type for c in cfgs] == ["mla", "mha", "gqa", "mqa"]
        step = (3 * cfgs[0].hidden_size * (cfgs[0].n_routed_experts + 1) * cfgs[0].num_hidden_layers
                * SCALES[scale].width_multiple)
        for c in cfgs[1:]:  # the nearest width: within one width step of MLA's total
            assert c.moe_intermediate_size % SCALES[scale].width_multiple == 0
            assert abs(c.num_parameters() - target) <= step / 2 + 1
    # A larger attention gets narrower experts, a smaller one wider.
    base = get_config("tiny", **SCALES["cpu"].model)
    mha = match_ffn_width(base.replace(attention_type="mha"), base.num_parameters())
    assert mha.moe_intermediate_size != base.moe_intermediate_size or \
        base.replace(attention_type="mha").num_parameters() == base.num_parameters()


def test_attention_ablation_end_to_end(tmp_path, capsys):
    out = tmp_path / "att"
    assert main(["ablate", "attention", "--tiny", "--steps", "2", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    runs = res["runs"]
    assert len(runs) == 8 and {r["seed"] for r in runs} == {0, 1}
    assert len({r["tokens"] for r in runs}) == 1 and all(r["steps"] == 2 for r in runs)
    by = {r["variant"]: r for r in runs if r["seed"] == 0}
    assert list(by) == ["mla", "mha", "gqa-2", "mqa"]
    cfg = get_config("tiny", **SCALES["tiny"].model)
    L, d = cfg.num_hidden_layers, cfg.v_head_dim
    assert by["mla"]["kv_elements_per_token"] == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * L
    assert by["mha"]["kv_elements_per_token"] == 2 * cfg.num_attention_heads * d * L
    assert by["gqa-2"]["kv_elements_per_token"] == 2 * 2 * d * L
    assert by["mqa"]["kv_elements_per_token"] == 2 * d * L
    assert all(0 < r["epochs"] < 1 and r["val_loss"] > 0 and r["tok_s"] > 0 for r in runs)
    mla_losses = [r["val_loss"] for r in runs if r["variant"] == "mla"]
    s = res["summary"]["mla"]
    assert s["val_loss"] == pytest.approx(sum(mla_losses) / 2)
    assert s["val_loss_std"] == pytest.approx(abs(mla_losses[0] - mla_losses[1]) / 2 ** 0.5)
    # The paired difference: each variant's loss minus MLA's at the same seed, mean and std over seeds.
    for name in ("mla", "mqa"):
        d = [r["val_loss"] - next(m["val_loss"] for m in runs if m["variant"] == "mla" and m["seed"] == r["seed"])
             for r in runs if r["variant"] == name]
        assert res["summary"][name]["val_loss_delta"] == pytest.approx(sum(d) / 2, abs=1e-12)
        assert res["summary"][name]["val_loss_delta_std"] == pytest.approx(abs(d[0] - d[1]) / 2 ** 0.5, abs=1e-12)
    assert res["summary"]["mla"]["val_loss_delta"] == 0
    md = (out / "results.md").read_text()
    assert "| mqa |" in md and "±" in md and "matched" in md and "Δ val loss vs mla, paired" in md
    for png in ("val_curves.png", "cache_vs_loss.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "results:" in capsys.readouterr().out


def test_balance_ablation_end_to_end(tmp_path):
    out = tmp_path / "bal"
    assert main(["ablate", "balance", "--tiny", "--seeds", "1", "--steps", "3", "--out", str(out)]) == 0
    by = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert list(by) == ["none", "expert loss", "all three losses", "+ device-limited", "+ token dropping"]
    assert by["+ token dropping"]["dropped_frac"] > 0
    assert all(by[k]["dropped_frac"] == 0 for k in list(by)[:4])
    assert all(r["expert_load_cv"] >= 0 and r["device_load_cv"] >= 0 for r in by.values())
    # The device limit binds (M < K): routing differs from the unlimited run on the same seed and data.
    assert by["+ device-limited"]["expert_load_cv"] != by["all three losses"]["expert_load_cv"]


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["ablate", "attention", "--tiny", "--seeds", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--seeds must be >= 1" in err and "Traceback" not in err
    (tmp_path / "file").write_text("x")
    assert main(["ablate", "balance", "--out", str(tmp_path / "file")]) == 2
    assert "not a directory" in capsys.readouterr().err
