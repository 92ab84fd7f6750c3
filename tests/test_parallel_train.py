"""`torchrun --nproc-per-node 2 -m latentmoe train --parallel.ep_size 2` on CPU/gloo: trains with the
losses of a single process, saves sharded checkpoints, and resumes from them on 1 rank, on 2 ranks
(same EP layout) and on 2 ranks with pure data parallelism, continuing with the same losses as the
uninterrupted run; a single-process checkpoint resumes on 2 ranks too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from latentmoe.parallel.launch import free_port, run_local

STEPS = 4


def common_args(run_dir, data_dir):
    return ["train", "--config", "tiny", "--run_dir", str(run_dir), "--data.cache_dir", str(data_dir),
            "--data.max_chars", "60000", "--train.max_steps", str(STEPS), "--checkpoint.interval", "2",
            "--logging.progress", "false", "--logging.eval_interval", "2", "--precision.threads", "1",
            "--model.overrides.topk_method", "greedy", "--routing.devices", "2", "--routing.max_devices", "1",
            "--routing.device_limited", "true", "--routing.drop_tokens", "false",
            "--train.max_time_s", "3600",  # never reached; the ranks agree on the clock every step
            "--precision.device", "cpu"]  # gloo on CPU, also where a GPU is visible


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {m["step"]: m for m in map(json.loads, f)}


def resume_worker(rank, world, argv):
    import latentmoe.cli
    torch.set_num_threads(1)
    assert latentmoe.cli.main(argv) == 0


def copy_at_step(src, dst, step):
    """A run directory as it was when checkpoint `step` was the latest."""
    shutil.copytree(src, dst, symlinks=True)
    for name in os.listdir(os.path.join(dst, "checkpoints")):
        if name != f"step-{step:06d}":
            shutil.rmtree(os.path.join(dst, "checkpoints", name))


@pytest.mark.slow
def test_two_rank_run_trains_checkpoints_and_resumes_anywhere(tmp_path):
    data = tmp_path / "data"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")  # gloo, CPU
    run = tmp_path / "ep2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "latentmoe", *common_args(run, data), "--parallel.ep_size", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("saved ") == 1, "rank 0 alone logs"
    full = metrics(run)
    assert sorted(full) == list(range(1, STEPS + 1))
    assert full[STEPS]["loss"] < full[1]["loss"]
    ckpt = run / "checkpoints" / "step-000002"
    assert sorted(os.listdir(ckpt / "optim")) == ["rank-00000.pt", "rank-00001.pt"]
    assert (ckpt / "model" / "model-00002-of-00002.safetensors").exists()
    assert not any(n.startswith(".tmp") for n in os.listdir(run / "checkpoints"))

    # Resume from step 2: one plain process; 2 ranks with the same layout; 2 ranks without EP.
    one = tmp_path / "one"
    copy_at_step(run, one, 2)
    done = subprocess.run([sys.executable, "-m", "latentmoe", *common_args(one, data), "--resume"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name, ep in (("two_ep", "2"), ("two_dp", "1")):
        copy_at_step(run, tmp_path / name, 2)
        run_local(resume_worker, 2, [*common_args(tmp_path / name, data), "--parallel.ep_size", ep, "--resume"])

    # A plain single-process run: the same losses as the 2-rank one, and its checkpoint resumes on 2 ranks.
    single = tmp_path / "single"
    done = subprocess.run([sys.executable, "-m", "latentmoe", *common_args(single, data)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    copy_at_step(single, tmp_path / "single_to_two", 2)
    run_local(resume_worker, 2, [*common_args(tmp_path / "single_to_two", data), "--parallel.ep_size", "2", "--resume"])

    for name in ("one", "two_ep", "two_dp", "single", "single_to_two"):
        resumed = metrics(tmp_path / name)
        assert sorted(resumed) == list(range(1, STEPS + 1)), name
        for step in range(1 if name == "single" else 3, STEPS + 1):
            for key in ("loss", "ce", "l_exp", "l_dev", "l_comm", "grad_norm"):
                assert resumed[step][key] == pytest.approx(full[step][key], rel=2e-5, abs=1e-7), (name, step, key)
        assert resumed[STEPS]["val_loss"] == pytest.approx(full[STEPS]["val_loss"], rel=2e-5), name

    # The run's exported model is an ordinary checkpoint: the engine loads and serves it.
    from latentmoe.engine import LLM, SamplingParams
    llm = LLM(str(run / "model"), enforce_eager=True)
    out = llm.generate("def ", SamplingParams(temperature=0.0, max_tokens=5))
    assert len(out[0].outputs[0].token_ids) == 5


class _CrashingOptimizer:
    """Stands in for a rank whose optimizer shard cannot be written."""

    @property
    def state(self):
        raise RuntimeError("simulated crash while saving")


def crash_worker(rank, world, run_dir):
    from latentmoe.config import get_config
    from latentmoe.model import build_model
    from latentmoe.checkpoint.training import save_checkpoint
    from latentmoe.parallel.expert_parallel import apply_expert_parallel
    from latentmoe.parallel.mesh import build_dims

    torch.set_num_threads(1)
    dims = build_dims(world, torch.device("cpu"))
    model = build_model(get_config("tiny", vocab_size=64, hidden_size=32, num_hidden_layers=2), seed=0)
    apply_expert_parallel(model, dims.ep_group, rank, world)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(run_dir, model, optimizer, {"step": 1}, dims)
    # Step 2: rank 1 fails after rank 0 wrote everything it had to write.
    save_checkpoint(run_dir, model, _CrashingOptimizer() if rank == 1 else optimizer, {"step": 2}, dims)


def test_interrupted_distributed_save_never_commits(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash while saving"):
        run_local(crash_worker, 2, str(tmp_path))
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == [".tmp-step-000002", "step-000001"]
    assert (root / "step-000001" / "trainer_state.pt").exists()
    assert os.path.realpath(tmp_path / "model") == os.path.realpath(root / "step-000001" / "model")
    from latentmoe.checkpoint import load_model
    load_model(root / "step-000001" / "model")  # the last good checkpoint is whole
