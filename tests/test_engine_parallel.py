"""The multi-process engine on CPU (gloo): 2 and 4 ranks give one process's greedy tokens in fp32, with the
routed experts split by width or spread whole over the ranks (expert parallelism), on configs with
group-limited routing and a dense first layer; a failing rank ends the others and names itself; the
server with -tp 2 answers like one process and exits non-zero when a rank dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from latentmoe.checkpoint import save_model
from latentmoe.config import get_config
from latentmoe.engine import LLM, SamplingParams
from latentmoe.engine.distributed import ParallelError
from latentmoe.engine.model_runner import ModelRunner
from latentmoe.model import build_model

PROMPTS = [[5, 17, 3, 99, 42, 7, 120, 64, 8, 33, 21], [1, 2, 3], [200, 4, 150, 9, 77, 31, 6]]
# Small token budget per step: prompts are prefilled in chunks, next to other sequences' decodes.
ENGINE = dict(device="cpu", block_size=4, num_blocks=64, max_num_seqs=4, max_num_batched_tokens=8)


def checkpoint(path, **over) -> str:
    # tiny: 4 heads, group-limited routing (4 groups, top 2), first layer dense, 8 experts + 1 shared.
    cfg = get_config("tiny", vocab_size=256, num_hidden_layers=3, hidden_size=64, max_position_embeddings=128,
                     **over)
    save_model(build_model(cfg, seed=1, std=0.15), path, max_shard_size="64KB")   # several files
    return os.fspath(path)


def greedy(llm, max_tokens=10):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def v2_style(tmp_path_factory):
    """q through a low-rank q_a/q_b projection (DeepSeek-V2), a two-expert-wide shared expert."""
    path = checkpoint(tmp_path_factory.mktemp("tp_v2"), q_lora_rank=24, n_shared_experts=2)
    return path, greedy(LLM(path, **ENGINE))


@pytest.fixture(scope="module")
def lite_style(tmp_path_factory):
    """q_proj (V2-Lite), four experts per token."""
    path = checkpoint(tmp_path_factory.mktemp("tp_lite"), num_experts_per_tok=4)
    return path, greedy(LLM(path, **ENGINE))


@pytest.mark.parametrize("ranks,expert_parallel,style", [(2, False, "v2_style"), (2, True, "lite_style"),
                                                         (4, True, "v2_style")])
def test_ranks_give_one_process_tokens(ranks, expert_parallel, style, request):
    path, want = request.getfixturevalue(style)
    with LLM(path, tensor_parallel_size=ranks, enable_expert_parallel=expert_parallel, **ENGINE) as llm:
        # Rank 0 holds its share only: H/N heads, and 8/N whole experts or 1/N of each expert's width.
        moe = llm.model.model.layers[1]
        assert moe.self_attn.n_heads == 4 // ranks
        assert moe.self_attn.o_proj.weight.shape[1] == (4 // ranks) * llm.config.v_head_dim
        experts = moe.mlp.experts.gate_up_proj.shape
        assert experts[:2] == ((8 // ranks, 2 * 64) if expert_parallel else (8, 2 * 64 // ranks))
        assert llm.model.model.layers[0].mlp.down_proj.weight.shape[1] == llm.config.intermediate_size // ranks
        assert greedy(llm) == want
        # The engine goes on serving: a second batch after the first one finished.
        assert greedy(llm, max_tokens=3) == [t[:3] for t in want]
    assert not dist.is_initialized()


def test_per_head_cache_preemption_and_prefix_hits(lite_style):
    # The per-head layout holds H/N heads per rank. The cache is too small for all three sequences: they
    # are preempted and recomputed (their block tables start again), and a repeated prompt reuses cached
    # blocks; the workers follow rank 0's tables.
    path, want = lite_style
    with LLM(path, tensor_parallel_size=2, kv_cache="mha", **dict(ENGINE, num_blocks=12)) as llm:
        assert llm.runner.kv_caches[0][0].shape[2] == 2   # [blocks, block_size, H/N, N+R]
        assert greedy(llm) == want
        assert llm.stats()["num_preemptions"] > 0
        assert greedy(llm, max_tokens=4) == [t[:4] for t in want]
        assert llm.stats()["prefix_cache_hit_tokens"] > 0
        # The server's hand-out signal (LLM.step's on_launch) reaches rank 0's runner: once per sampling step.
        llm.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        calls = []
        while llm.has_unfinished():
            llm.step(on_launch=lambda: calls.append(1))
        assert calls == [1, 1, 1] and llm.runner.local.on_launch is None


def test_sizes_that_do_not_divide(lite_style):
    path, _ = lite_style
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 must divide num_attention_heads \(4\)"):
        LLM(path, tensor_parallel_size=3, **ENGINE)
    with pytest.raises(ValueError, match=r"n_routed_experts \(8\)"):
        LLM(path, tensor_parallel_size=3, enable_expert_parallel=True, **ENGINE)
    with pytest.raises(ValueError, match="checkpoint directory"):
        LLM(build_model(get_config("tiny")), tensor_parallel_size=2)
    assert not dist.is_initialized()


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_each_rank_loads_its_slices(v2_style, expert_parallel):
    from latentmoe.checkpoint import load_model
    from latentmoe.engine.tensor_parallel import ShardPlan, load_shard
    path, _ = v2_style
    full = load_model(path).state_dict()
    H, D, I = 4, 64, 64   # heads, hidden, expert width of the tiny config
    for rank in range(2):
        shard = load_shard(path, ShardPlan(rank, 2, expert_parallel), "cpu", None).state_dict()
        a = "model.layers.1.self_attn."
        qk, nv = 32 + 16, 32 + 32
        assert shard[a + "q_b_proj.weight"].equal(full[a + "q_b_proj.weight"].view(H, qk, -1)[2 * rank:2 * rank + 2]
                                                  .reshape(2 * qk, -1))
        assert shard[a + "kv_b_proj.weight"].equal(full[a + "kv_b_proj.weight"].view(H, nv, -1)[2 * rank:2 * rank + 2]
                                                   .reshape(2 * nv, -1))
        assert shard[a + "o_proj.weight"].equal(full[a + "o_proj.weight"][:, 64 * rank:64 * (rank + 1)])
        assert shard[a + "kv_a_proj_with_mqa.weight"].equal(full[a + "kv_a_proj_with_mqa.weight"])   # replicated
        m = "model.layers.1.mlp."
        gu, down = full[m + "experts.gate_up_proj"], full[m + "experts.down_proj"]
        if expert_parallel:
            assert shard[m + "experts.gate_up_proj"].equal(gu[4 * rank:4 * (rank + 1)])
            assert shard[m + "experts.down_proj"].equal(down[4 * rank:4 * (rank + 1)])
        else:
            half = slice(32 * rank, 32 * (rank + 1))
            assert shard[m + "experts.gate_up_proj"].equal(torch.cat([gu[:, :I][:, half], gu[:, I:][:, half]], 1))
            assert shard[m + "experts.down_proj"].equal(down[:, :, half])
        width = 2 * I // 2   # two shared experts, half each
        assert shard[m + "shared_experts.down_proj.weight"].equal(
            full[m + "shared_experts.down_proj.weight"][:, width * rank:width * (rank + 1)])
        assert shard["model.layers.0.mlp.up_proj.weight"].equal(
            full["model.layers.0.mlp.up_proj.weight"][192 * rank:192 * (rank + 1)])
        assert shard["lm_head.weight"].equal(full["lm_head.weight"])
        assert D == shard["model.norm.weight"].numel()


class FailOnRank1(ModelRunner):
    """Raises on rank 1 in its third step (rank 0 is then waiting in that step's first collective)."""
    steps = 0

    def execute(self, batch):
        FailOnRank1.steps += 1
        if dist.get_rank() == 1 and FailOnRank1.steps == 3:
            raise RuntimeError("injected fault")
        return super().execute(batch)


class FailingLLM(LLM):
    runner_class = FailOnRank1


def test_a_failing_rank_ends_all_with_its_error(lite_style):
    path, _ = lite_style
    llm = FailingLLM(path, tensor_parallel_size=2, **ENGINE)
    start = time.monotonic()
    with pytest.raises(ParallelError, match="rank 1 failed: RuntimeError: injected fault"):
        greedy(llm)
    assert time.monotonic() - start < 30
    assert not any(p.is_alive() for p in llm.runner.procs) and not dist.is_initialized()
    with pytest.raises(ParallelError, match="stopped"):
        greedy(llm)


def test_a_checkpoint_that_does_not_match_fails_plainly(tmp_path, lite_style):
    from safetensors.torch import load_file, save_file

    from latentmoe.checkpoint import CheckpointError
    path, _ = lite_style
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in os.listdir(path):
        data = open(os.path.join(path, f), "rb").read()
        (broken / f).write_bytes(data)
    shard = next(f for f in sorted(os.listdir(broken)) if f.endswith(".safetensors"))
    tensors = load_file(broken / shard)
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, broken / shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing"):
        LLM(str(broken), tensor_parallel_size=2, **ENGINE)
    assert not dist.is_initialized()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_server_with_two_ranks_answers_then_exits_when_a_rank_dies(tmp_path):
    import httpx
    from _server_helpers import free_port, make_checkpoint, wait_healthy

    model_dir = make_checkpoint(tmp_path)
    prompt = "Hello! How are you"
    want = LLM(model_dir, device="cpu").generate(prompt, SamplingParams(temperature=0, max_tokens=6))[0].outputs[0].text
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "latentmoe", "serve", model_dir, "--port", str(port),
                             "--log-level", "warning", "--device", "cpu", "-tp", "2", "--max-num-seqs", "4"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        r = httpx.post(base + "/v1/completions", json={"model": os.path.basename(model_dir), "prompt": prompt,
                                                       "max_tokens": 6, "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        # Rank 1 forks from the server's fork server: a grandchild of the server process.
        workers = [w for c in _children(proc.pid) for w in _children(c)]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        r = httpx.post(base + "/v1/completions", json={"prompt": prompt, "max_tokens": 6}, timeout=60)
        assert r.status_code >= 500
        assert httpx.get(base + "/health", timeout=5).status_code == 503
        assert proc.wait(timeout=30) == 1
        assert "rank 1 exited with code -9" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
