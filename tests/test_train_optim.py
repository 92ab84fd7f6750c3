"""Schedule values at their boundaries, the batch-size ramp, weight-decay groups, config overrides."""

from __future__ import annotations

import pytest

from latentmoe.config import get_config
from latentmoe.model import build_model
from latentmoe.train.config import OptimSection, TrainSection, load_config
from latentmoe.train.optim import batch_size_at, lr_at, param_groups


def test_lr_warmup_and_step_decays_at_token_fractions():
    oc = OptimSection(lr=1.0, warmup_steps=10, decay_fractions=(0.6, 0.9), decay_factor=0.316)
    total = 1000
    assert lr_at(0, 0, oc, total) == pytest.approx(0.1)
    assert lr_at(4, 0, oc, total) == pytest.approx(0.5)
    assert lr_at(9, 0, oc, total) == pytest.approx(1.0)
    assert lr_at(50, 599, oc, total) == pytest.approx(1.0)
    assert lr_at(50, 600, oc, total) == pytest.approx(0.316)
    assert lr_at(80, 899, oc, total) == pytest.approx(0.316)
    assert lr_at(80, 900, oc, total) == pytest.approx(0.316 ** 2)
    oc2 = OptimSection(lr=1.0, warmup_steps=0, decay_fractions=(0.8,), decay_factor=0.5)
    assert lr_at(0, 799, oc2, total) == 1.0 and lr_at(0, 800, oc2, total) == 0.5


def test_batch_size_ramp():
    tc = TrainSection(micro_batch_size=4, batch_size=32, batch_size_start=8, ramp_tokens=1000)
    assert batch_size_at(0, tc) == 8
    assert batch_size_at(500, tc) == 20
    assert batch_size_at(510, tc) == 20   # rounded down to a multiple of micro_batch_size
    assert batch_size_at(999, tc) == 28
    assert batch_size_at(1000, tc) == 32
    assert batch_size_at(10, TrainSection(micro_batch_size=4, batch_size=32)) == 32


def test_no_weight_decay_on_norms_and_1d():
    model = build_model(get_config("tiny", hidden_size=32, vocab_size=64, num_hidden_layers=2), seed=0)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in no_decay["params"])
    assert all(p.ndim >= 2 for p in decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert any("gate.weight" in names[id(p)] for p in decay["params"])


def test_config_overrides_and_round_trip(tmp_path):
    cfg = load_config("tiny", ["--train.max_steps", "7", "--optim.decay_fractions", "[0.5, 0.8]",
                               "--data.corpus=shakespeare", "--model.overrides.hidden_size", "48"])
    assert cfg.train.max_steps == 7 and cfg.optim.decay_fractions == (0.5, 0.8)
    assert cfg.data.corpus == "shakespeare" and cfg.model.overrides["hidden_size"] == 48
    path = tmp_path / "c.toml"
    cfg.save(str(path))
    assert load_config(str(path)) == cfg
    with pytest.raises(ValueError, match="unknown config key"):
        load_config("tiny", {"train.bogus": 1})
    with pytest.raises(ValueError, match="max_devices"):
        load_config("tiny", {"routing.max_devices": 9})
