"""End-to-end on CPU: the loss falls, resume is exact bit for bit, saves are atomic, NaN stops cleanly."""

from __future__ import annotations

import json
import os

import pytest
import torch

from latentmoe import load_model
from latentmoe.train import TrainingDiverged, load_config, train
from latentmoe.checkpoint.commit import checkpoint_dirs
from latentmoe.train.trainer import _FIT_CALIBRATION_STEPS, save, setup, train_step


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("train_data"))


def _cfg(run_dir, data_dir, **over):
    base = {"run_dir": str(run_dir), "data.cache_dir": data_dir, "data.max_chars": 60000, "data.vocab_size": 384,
            "train.seq_len": 32, "train.micro_batch_size": 4, "train.batch_size": 8, "train.max_steps": 6,
            "train.tokens": 8 * 32 * 12, "logging.progress": False, "logging.eval_interval": 0,
            "precision.threads": 1, "optim.warmup_steps": 2, "optim.lr": 3e-3,
            "precision.device": "cpu"}
    base.update(over)
    return load_config("tiny", base)


def _quiet(*a):
    pass


def test_loss_decreases_and_checkpoint_is_servable(tmp_path, data_dir):
    cfg = _cfg(tmp_path / "run", data_dir, **{"train.max_steps": 30, "train.tokens": 0, "optim.lr": 1e-2,
                                              "logging.eval_interval": 30})
    run = train(cfg, log=_quiet)
    losses = [m["ce"] for m in run.history]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert "val_loss" in run.history[-1]
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(lines) == 30
    for key in ("loss", "ce", "l_exp", "l_dev", "l_comm", "grad_norm", "lr", "tok_s", "expert_load", "load_cv",
                "dropped_frac"):
        assert key in lines[-1]
    assert 0 < lines[-1]["dropped_frac"] < 0.5
    model_dir = tmp_path / "run" / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (model_dir / name).exists()
    cfg_json = json.load(open(model_dir / "config.json"))
    assert (cfg_json["topk_method"], cfg_json["n_group"], cfg_json["topk_group"]) == ("group_limited_greedy", 4, 2)
    loaded = load_model(model_dir)
    x = torch.randint(0, 384, (1, 8))
    run.model.eval()
    torch.testing.assert_close(loaded(x), run.model(x))


def test_resume_is_exact(tmp_path, data_dir):
    straight = train(_cfg(tmp_path / "a", data_dir, **{"train.max_steps": 6}), log=_quiet)
    train(_cfg(tmp_path / "b", data_dir, **{"train.max_steps": 3}), log=_quiet)
    resumed = train(_cfg(tmp_path / "b", data_dir, **{"train.max_steps": 6}), resume=True, log=_quiet)
    assert [m["loss"] for m in resumed.history] == [m["loss"] for m in straight.history[3:]]
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"]) for i in oa)
    steps = [json.loads(x)["step"] for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, data_dir, monkeypatch):
    cfg = _cfg(tmp_path / "c", data_dir)
    run = setup(cfg, log=_quiet)
    train_step(run)
    good = save(run)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    train_step(run)

    def crash(*args, **kwargs):  # the disk fails once the model is written: optimizer and trainer state are not
        raise RuntimeError("simulated crash")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            save(run)
    staged = tmp_path / "c" / "checkpoints" / ".tmp-step-000002"
    assert (staged / "model" / "model.safetensors").exists() and not (staged / "trainer_state.pt").exists()
    assert checkpoint_dirs(cfg.run_dir) == [good]
    assert os.path.realpath(tmp_path / "c" / "model") == os.path.realpath(os.path.join(good, "model"))
    reloaded = load_model(tmp_path / "c" / "model")
    assert all(torch.equal(reloaded.state_dict()[k], before[k]) for k in before)
    # The next good save replaces the debris and moves the pointer.
    newer = save(run)
    assert checkpoint_dirs(cfg.run_dir) == [good, newer]
    assert not any(n.startswith(".tmp") for n in os.listdir(tmp_path / "c" / "checkpoints"))


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tmp_path, data_dir):
    cfg = _cfg(tmp_path / "d", data_dir)
    run = setup(cfg, log=_quiet)
    train_step(run)
    good = save(run)
    with torch.no_grad():
        run.model.model.layers[0].self_attn.o_proj.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="not finite"):
        train_step(run)
    assert checkpoint_dirs(cfg.run_dir) == [good]
    assert torch.isfinite(load_model(os.path.join(good, "model")).lm_head.weight).all()


def test_fit_time_shortens_the_run_and_saves_the_plan(tmp_path, data_dir):
    from latentmoe.train.config import load_config as load
    cfg = _cfg(tmp_path / "e", data_dir, **{"train.max_steps": 100000, "train.tokens": 0, "train.fit_time_s": 1.0})
    run = train(cfg, log=_quiet)
    assert _FIT_CALIBRATION_STEPS <= run.step < 100000
    assert run.step == cfg.train.max_steps
    assert load(str(tmp_path / "e" / "config.toml")).train.max_steps == run.step



def test_activation_checkpointing_gives_the_same_step(tmp_path, data_dir):
    runs = []
    for ckpt in (False, True):
        run = setup(_cfg(tmp_path / f"ac{ckpt}", data_dir, **{"precision.activation_checkpointing": ckpt}),
                    log=_quiet)
        assert run.model.gradient_checkpointing is ckpt
        runs.append((train_step(run), run))
    (m0, r0), (m1, r1) = runs
    assert m0["loss"] == m1["loss"]
    s0, s1 = r0.model.state_dict(), r1.model.state_dict()
    for k in s0:
        torch.testing.assert_close(s0[k], s1[k], rtol=1e-5, atol=1e-7)


def test_fresh_run_refuses_an_old_run_dir_unless_overwrite(tmp_path, data_dir):
    train(_cfg(tmp_path / "f", data_dir, **{"train.max_steps": 2}), log=_quiet)
    with pytest.raises(ValueError, match="already holds a run"):
        train(_cfg(tmp_path / "f", data_dir, **{"train.max_steps": 1}), log=_quiet)
    train(_cfg(tmp_path / "f", data_dir, **{"train.max_steps": 1, "checkpoint.overwrite": True}), log=_quiet)
    assert [json.loads(x)["step"] for x in open(tmp_path / "f" / "metrics.jsonl")] == [1]
    assert [os.path.basename(p) for p in checkpoint_dirs(str(tmp_path / "f"))] == ["step-000001"]


def test_validation_batches_do_not_depend_on_the_seed(tmp_path, data_dir):
    """Runs that differ only in train.seed are measured on the same validation text (the ablations' seed
    spread is then the runs' own, not that of different validation samples)."""
    from latentmoe.train.trainer import evaluate

    seen = {}
    for seed in (0, 1):
        run = setup(_cfg(tmp_path / f"run{seed}", data_dir, **{"train.seed": seed, "logging.eval_batches": 2}),
                    log=_quiet)
        calls = []
        batch = run.val_data.batch
        run.val_data.batch = lambda *a: calls.append(batch(*a)) or calls[-1]
        evaluate(run)
        seen[seed] = calls
    assert len(seen[0]) == 2
    for (x0, y0), (x1, y1) in zip(seen[0], seen[1]):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(seen[0][0][0], seen[0][1][0])   # two different batches, not one repeated
