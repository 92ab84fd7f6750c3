"""The NCCL path on GPUs (run on a machine with 2+ GPUs; skipped elsewhere): the same expert-parallel
checks as on gloo, and a 2-GPU `torchrun ... train` in bf16 autocast."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from latentmoe.parallel.launch import free_port, run_local

from test_parallel_ep import ep_worker

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]


def test_expert_parallel_nccl_matches_one_process():
    run_local(ep_worker, 2, [(2, 1, True, None)], "cuda", backend="nccl")


def test_torchrun_train_on_two_gpus(tmp_path):
    args = ["--config", "tiny", "--run_dir", str(tmp_path / "run"), "--train.max_steps", "6",
            "--logging.progress", "false", "--logging.eval_interval", "0", "--model.overrides.topk_method", "greedy",
            "--data.max_chars", "60000", "--parallel.ep_size", "2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "latentmoe", "train", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 6 and losses[-1] < losses[0]


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_engine_on_two_gpus_gives_one_gpu_tokens(tmp_path, monkeypatch, expert_parallel):
    """The multi-process engine over NCCL, fp32, decode steps replayed as CUDA graphs with their all-reduces inside."""
    from test_engine_parallel import ENGINE, checkpoint, greedy

    from latentmoe.engine import LLM

    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")   # no NVLink multicast (not lent on these machines)
    path = checkpoint(tmp_path, q_lora_rank=24, n_shared_experts=2)
    options = dict(ENGINE, device="cuda", dtype="float32")
    want = greedy(LLM(path, **options))
    with LLM(path, tensor_parallel_size=2, enable_expert_parallel=expert_parallel, **options) as llm:
        assert greedy(llm) == want
        assert llm.runner.use_cuda_graphs and llm.runner.graphs
