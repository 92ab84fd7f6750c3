"""Trainer checkpoints on one process: the commit (atomic, latest link, pruning), the format of an
earlier version still resuming, and the single-process plan mirroring the parallel one."""

from __future__ import annotations

import inspect
import json
import os

import torch

from latentmoe import build_model, get_config, load_model
from latentmoe.checkpoint.commit import begin, checkpoint_dirs, checkpoint_path, commit
from latentmoe.checkpoint.hf import save_model
from latentmoe.checkpoint.training import load_checkpoint, save_checkpoint
from latentmoe.parallel.mesh import ParallelDims
from latentmoe.parallel.training import SingleProcess, TrainParallel

ONE = ParallelDims()


def _model(seed=0):
    cfg = get_config("tiny", vocab_size=64, hidden_size=32, num_hidden_layers=2, topk_method="greedy")
    return build_model(cfg, seed=seed, std=0.05)


def _stepped(model):
    """An AdamW with state: one step on a real loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 64, (2, 5))).square().mean().backward()
    opt.step()
    return opt


def _stage(run_dir, step, marker):
    final = checkpoint_path(run_dir, step)
    tmp = begin(final)
    os.makedirs(os.path.join(tmp, "model"))
    with open(os.path.join(tmp, "model", "marker"), "w") as f:
        f.write(marker)
    torch.save({"step": step}, os.path.join(tmp, "trainer_state.pt"))
    return final


def test_commit_moves_the_latest_link_replaces_a_step_and_prunes(tmp_path):
    run = str(tmp_path)
    latest = tmp_path / "model" / "marker"
    first = commit(run, _stage(run, 1, "one"), keep=2)
    assert latest.read_text() == "one" and os.path.islink(tmp_path / "model")
    assert os.readlink(tmp_path / "model") == os.path.join("checkpoints", "step-000001", "model")  # relative
    commit(run, _stage(run, 2, "two"), keep=2)
    commit(run, _stage(run, 2, "two again"), keep=2)  # the same step saved twice: replaced whole
    assert latest.read_text() == "two again"
    assert checkpoint_dirs(run) == [first, checkpoint_path(run, 2)]
    # A crashed save leaves only its staging directory; the next commit removes it with the pruned ones.
    _stage(run, 9, "crashed")
    assert checkpoint_dirs(run) == [first, checkpoint_path(run, 2)] and latest.read_text() == "two again"
    commit(run, _stage(run, 3, "three"), keep=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-000002", "step-000003"]
    assert latest.read_text() == "three"


def test_save_and_resume_on_one_process_is_exact(tmp_path):
    model = _model()
    opt = _stepped(model)
    routed = model.config.replace(topk_method="group_limited_greedy", n_group=2, topk_group=1)
    path = save_checkpoint(str(tmp_path), model, opt, {"step": 7, "tokens": 70}, ONE, save_config=routed)
    assert model.config.topk_method == "greedy"  # the model's own config untouched
    assert json.load(open(os.path.join(path, "model", "config.json")))["topk_method"] == "group_limited_greedy"
    assert os.path.exists(os.path.join(path, "model", "model.safetensors"))  # the plain HF layout
    fresh = _model(seed=1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    state = load_checkpoint(path, fresh, fresh_opt, ONE)
    assert (state["step"], state["tokens"]) == (7, 70)
    _assert_same(model, opt, fresh, fresh_opt)


def test_a_checkpoint_of_the_earlier_single_process_format_resumes(tmp_path):
    """Optimizer state_dict inside trainer_state.pt, no optim/ directory."""
    model = _model()
    opt = _stepped(model)
    path = tmp_path / "checkpoints" / "step-000003"
    save_model(model, path / "model")
    torch.save({"step": 3, "tokens": 30, "optimizer": opt.state_dict()}, path / "trainer_state.pt")
    assert checkpoint_dirs(str(tmp_path)) == [str(path)]
    fresh = _model(seed=1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    assert load_checkpoint(str(path), fresh, fresh_opt, ONE)["step"] == 3
    _assert_same(model, opt, fresh, fresh_opt)
    assert torch.equal(load_model(path / "model").lm_head.weight, model.lm_head.weight)


def _assert_same(model, opt, other, other_opt):
    a, b = model.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for i in sa:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)


def test_single_process_plan_has_the_hooks_of_the_parallel_one():
    def hooks(cls):
        return {name: list(inspect.signature(fn).parameters) for name, fn in inspect.getmembers(cls, inspect.isfunction)
                if not name.startswith("_")}
    assert hooks(SingleProcess) == hooks(TrainParallel)
    plan = SingleProcess(torch.device("cpu"))
    assert plan.is_main and list(plan.micro_batches(3)) == [0, 1, 2] and plan.agree([1.5]) == [1.5]
