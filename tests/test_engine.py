"""Engine greedy output == plain full-recompute generation, whatever the batch composition;
the block manager never leaks; bad requests raise clear errors."""

from __future__ import annotations

import types

import pytest
import torch

from latentmoe import build_model, get_config
from latentmoe.engine import LLM, EngineConfig, SamplingParams
from latentmoe.engine.block_manager import BlockManager
from latentmoe.engine.config import CUDA_BUDGETS, default_budget
from latentmoe.engine.kv_cache import LatentCache, activation_bytes_per_token, plan_cache
from latentmoe.engine.model_runner import ModelRunner, warmup_layers
from latentmoe.engine.sequence import Sequence
from latentmoe.kernels import mla_decode_ref

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def tiny_model(seed=0, std=0.08, **over):
    cfg = get_config("tiny", **{"vocab_size": 512, "num_hidden_layers": 3, **over})
    return build_model(cfg, seed=seed, std=std).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@torch.no_grad()
def reference_greedy(model, prompt, n):
    """Plain generation: the whole sequence through the model each step, argmax of the last logits."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def random_prompts(lengths, seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


class EagerGraphRunner(ModelRunner):
    """Decode-only steps through the CUDA-graph path (static buffers, batch padded to a bucket, block
    tables max_model_len wide) with the captured body run eagerly instead: that path without CUDA."""

    @staticmethod
    def supports_graphs(device):
        return True

    def _capture(self, b):
        self.graph_buckets.append(b)
        return types.SimpleNamespace(replay=lambda: self.decode_body(b))

    def launch(self, batch, after=None):
        if batch.num_decodes == len(batch.seqs):
            self.decode_batch_sizes.append(len(batch.seqs))
        return super().launch(batch, after)

    def __init__(self, *args, **kwargs):
        self.graph_buckets, self.decode_batch_sizes = [], []
        super().__init__(*args, **kwargs)


class EagerGraphLLM(LLM):
    runner_class = EagerGraphRunner


def assert_no_leak(llm):
    assert llm.block_manager.num_used_blocks == 0
    assert all(c == 0 for c in llm.block_manager.ref_count)
    assert not llm.has_unfinished()


@pytest.fixture(scope="module")
def expected(model):
    prompts = random_prompts([5, 17, 1, 30, 9, 12])
    return prompts, [reference_greedy(model, p, GREEDY.max_tokens) for p in prompts]


def test_reference_is_not_degenerate(expected):
    # Guards the other tests: outputs that differ between prompts and within a sequence.
    _, outs = expected
    assert len({tuple(o) for o in outs}) == len(outs)
    assert all(len(set(o)) > 2 for o in outs)


@pytest.mark.parametrize("kwargs", [
    dict(),                                                   # one big batch
    dict(max_num_batched_tokens=8, max_num_seqs=4),           # chunked prefill mixed with decodes
    dict(max_num_seqs=1),                                     # strictly one at a time
    dict(num_blocks=12, block_size=4, max_model_len=40),      # tiny cache: forced preemption
    dict(block_size=1, max_num_batched_tokens=5, max_num_seqs=5),
], ids=["batch", "chunked", "serial", "preempt", "bs1"])
def test_greedy_matches_full_recompute(model, expected, kwargs):
    prompts, want = expected
    kwargs = {"block_size": 4, "num_blocks": 200, **kwargs}
    llm = LLM(model, **kwargs)
    batches = []
    schedule = llm.scheduler.schedule

    def recording_schedule():
        b = schedule()
        batches.append([(len(s) - s.num_computed_tokens, n) for s, n in zip(b.seqs, b.num_new_tokens)]
                        + [("decodes", b.num_decodes)])
        return b

    llm.scheduler.schedule = recording_schedule
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    assert [o.prompt_token_ids for o in outs] == prompts
    if kwargs.get("num_blocks") == 12:
        assert llm.scheduler.num_preemptions > 0
    if kwargs.get("max_num_batched_tokens") == 8:
        # Some step ran a prompt chunk shorter than what remained, beside decodes.
        mixed = [b for b in batches if b[-1][1] > 0 and any(rem > n for rem, n in b[:-1])]
        assert mixed and all(sum(n for _, n in b[:-1]) <= 8 for b in batches)
    assert_no_leak(llm)


def test_graph_path_padding_and_buckets(model, expected):
    # Decode-only steps through the CUDA-graph path's static buffers (run eagerly here): batches
    # padded to a bucket with rows on the reserved null block, block tables padded to a context
    # bucket. Same tokens as full recompute.
    prompts, want = expected
    llm = EagerGraphLLM(model, block_size=4, num_blocks=200, max_num_seqs=24, max_model_len=120)
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == want
    runner = llm.runner
    assert runner.graph_buckets and set(runner.graph_buckets) <= set(runner.buckets)
    assert set(runner.decode_batch_sizes) - set(runner.buckets)   # batches of 6, 5, ... padded up to 8
    assert_no_leak(llm)


def test_startup_captures_every_bucket_and_serving_captures_none(model, expected):
    # Start-up captures one decode graph per batch bucket (none per context length); a workload with
    # every batch size and contexts from 2 to 40 tokens then replays them without capturing again.
    prompts, want = expected
    llm = EagerGraphLLM(model, block_size=4, num_blocks=200, max_num_seqs=24, max_model_len=120)
    runner = llm.runner
    assert runner.ready and sorted(runner.graph_buckets) == runner.buckets == [1, 2, 4, 8, 16, 24]
    outs = llm.generate(prompts, GREEDY)
    outs += llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs[:-1]] == want
    stats = llm.stats()
    assert stats["graph_captures"] == len(runner.buckets) and stats["graph_captures_after_ready"] == 0
    assert stats["compilations_after_ready"] == 0 and stats["time_to_ready_seconds"] > 0
    assert sorted(runner.graph_buckets) == runner.buckets          # nothing captured while serving
    # A missing graph is captured on demand and counted.
    del runner.graphs[2]
    llm.generate(prompts[:2], GREEDY)
    assert llm.stats()["graph_captures_after_ready"] == 1


def test_warmup_steps_run_and_leave_generation_unchanged(model, expected):
    # The start-up steps (prefill of several sizes over a one-token cached prefix, a full chunk over a long
    # prefix, a step of two chunks, eager decodes of several batch sizes) run on placeholder tokens against the
    # reserved null block: every step of the plan runs
    # (on CUDA the plan holds these kinds of steps), and generation afterwards is unchanged.
    prompts, want = expected
    ran = []

    class PlannedRunner(EagerGraphRunner):
        def warmup_plan(self, budget):
            return ([("prefill", n) for n in (1, 5, 17)] + [("prefix", 40)] + [("chunks", 2)]
                    + [("decode", b) for b in (1, 3)] + super().warmup_plan(budget))

        def _dummy_step(self, nd, n, prefix=1, chunks=1):
            ran.append((nd, n, prefix, chunks))
            super()._dummy_step(nd, n, prefix, chunks)

    class PlannedLLM(LLM):
        runner_class = PlannedRunner

    llm = PlannedLLM(model, block_size=4, num_blocks=200, max_num_seqs=8, max_model_len=120, max_num_batched_tokens=32)
    assert ran == [(0, 1, 1, 1), (0, 5, 1, 1), (0, 17, 1, 1), (0, 32, 40, 1), (0, 32, 1, 2), (1, 0, 1, 1),
                   (3, 0, 1, 1)]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == want
    assert_no_leak(llm)


def test_warmup_runs_one_layer_of_each_kind():
    # Start-up's eager steps run the first layer of each kind (the dense first layer, one MoE layer), not all:
    # layers alike launch the same kernels. A layer that differs in a tensor's dtype is a kind of its own.
    model = tiny_model(num_hidden_layers=5, first_k_dense_replace=1)
    llm = LLM(model, block_size=4, num_blocks=50, max_num_seqs=2, max_model_len=32, max_num_batched_tokens=16)
    assert llm.runner.warmup_layers == [0, 1]
    model = llm.runner.model   # the engine runs its own view of the caller's model (engine_model)
    model.model.layers[3].mlp.gate.weight.data = model.model.layers[3].mlp.gate.weight.data.double()
    llm.runner.warmup_layers = warmup_layers(model)
    assert llm.runner.warmup_layers == [0, 1, 3]
    seen = []
    real = model.forward_hidden

    def spy(*a, layers=None, **kw):
        seen.append(layers)
        return real(*a, layers=layers, **kw)

    model.forward_hidden = spy
    llm.runner._dummy_step(1, 3)
    assert seen == [[0, 1, 3]]


def test_forward_hidden_runs_the_layers_named():
    model = tiny_model(num_hidden_layers=3)
    ids = torch.randint(0, 512, (1, 7))
    with torch.no_grad():
        full, _ = model.forward_hidden(ids)
        assert torch.equal(model.forward_hidden(ids, layers=[0, 1, 2])[0], full)
        h = model.model.embed_tokens(ids)
        cos, sin = model.model.rotary(torch.arange(7)[None])
        for i in (0, 2):
            h, _ = model.model.layers[i](h, cos, sin, None, None)
        assert torch.equal(model.forward_hidden(ids, layers=[0, 2])[0], model.model.norm(h))


def test_warmup_out_of_memory_names_the_step_and_the_settings(model):
    # A step of the start-up plan that runs out of device memory fails the start with the step, the budget and
    # the settings that make room, as the same exception type (callers catching it still do).
    class TightRunner(EagerGraphRunner):
        def warmup_plan(self, budget):
            return [("prefill", n) for n in (1, 5, 17)]

        def _dummy_step(self, nd, n, prefix=1, chunks=1):
            if n == 17:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.67 GiB")
            super()._dummy_step(nd, n, prefix, chunks)

    class TightLLM(LLM):
        runner_class = TightRunner

    with pytest.raises(torch.OutOfMemoryError, match=r"start-up's prefill step \(17\) with a token budget of 32 "
                                                     r"and a cache of 200 blocks: lower max_num_batched_tokens.*"
                                                     r"Tried to allocate 2.67 GiB"):
        TightLLM(model, block_size=4, num_blocks=200, max_num_seqs=8, max_model_len=120, max_num_batched_tokens=32)


def test_prefill_warmup_sizes_cover_every_class():
    # Token counts 1..budget fall in classes (==1, divisible by 16 or not, expert-tile config, sort kernels,
    # dense FP8 GEMM tile, cuDNN's path); each class a count can reach has a warm-up count in it.
    from latentmoe.kernels.fp8 import choose_gemm_config
    from latentmoe.kernels.fp8_moe import choose_w8a8_config, uses_fp8_activations
    from latentmoe.kernels.moe import ALIGN_SERIAL_COUNT_MAX_ASSIGNMENTS, FEW_TOKENS, choose_moe_config
    from latentmoe.kernels.prefill import CUDNN_MIN_CHUNK
    from latentmoe.kernels.skinny import SKINNY_MAX_ROWS
    sizes = ModelRunner.prefill_warmup_sizes(16384)
    assert sizes[0] == 1 and sizes[-1] == 16384 and len(sizes) < 150

    def cls(m, top_k, experts):
        a = m * top_k
        return (m == 1, m <= SKINNY_MAX_ROWS, m <= FEW_TOKENS, a % 16 == 0, m % 16 == 0,
                str(choose_moe_config(a, experts)), a <= ALIGN_SERIAL_COUNT_MAX_ASSIGNMENTS,
                uses_fp8_activations(a, (experts, 2048, 1408)), str(choose_w8a8_config(a, experts)),
                str(choose_gemm_config(m, 2048)), m >= CUDNN_MIN_CHUNK)

    for top_k, experts, budget in ((6, 64, 16384), (2, 8, 2048), (8, 160, 8192), (6, 64, 65536), (2, 256, 65536),
                                    (6, 64, 131072)):
        sizes = ModelRunner.prefill_warmup_sizes(budget)
        assert {cls(m, top_k, experts) for m in sizes} == {cls(m, top_k, experts) for m in range(1, budget + 1)}


def test_requests_arriving_mid_run(model, expected):
    prompts, want = expected
    llm = LLM(model, block_size=4, num_blocks=200, max_num_batched_tokens=16)
    reqs, results = [], {}
    pending = list(enumerate(prompts))
    steps = 0
    while pending or llm.has_unfinished():
        if pending and steps % 3 == 0:   # a new request every third step, joining running ones
            i, p = pending.pop(0)
            reqs.append((i, llm.add_request(p, GREEDY)))
        for out in llm.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        steps += 1
    assert [results[r.request_id] for _, r in reqs] == want
    assert_no_leak(llm)


def test_scheduler_holds_arrivals_so_prefills_batch():
    """While sequences decode, a small arrival waits prefill_hold_steps steps (steps of decodes only), unless a
    prefill runs anyway, nothing decodes, or the waiting prompts fill the step's budget."""
    from latentmoe.engine.scheduler import Scheduler

    def seq(name, n, computed=0):
        s = Sequence(name, 0, list(range(1, n + 1)), SamplingParams(), None, 4, 0.0)
        s.num_computed_tokens = computed
        return s

    def kinds(batch):   # per scheduled sequence: 'd' decode, 'p' prefill
        return "".join("d" if i < batch.num_decodes else "p" for i in range(len(batch)))

    sch = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=8, max_num_batched_tokens=16,
                    prefill_hold_steps=3)
    a = seq("a", 5)
    sch.add(a)
    assert kinds(sch.schedule()) == "p"            # nothing decodes: admitted at once
    a.num_computed_tokens = 5
    a.token_ids.append(9)
    sch.add(seq("b", 4))
    held = []
    for _ in range(5):
        batch = sch.schedule()
        held.append(kinds(batch))
        for s, n in zip(batch.seqs, batch.num_new_tokens):
            s.num_computed_tokens += n
            if s.num_computed_tokens == len(s):
                s.token_ids.append(9)
    assert held == ["d", "d", "d", "dp", "dd"]      # three held steps, then admitted; then both decode
    assert sch.num_held_steps == 3 and sch.held_steps == 0
    # Waiting prompts that fill the rest of the budget (16 - 2 decodes) join at once.
    sch.add(seq("c", 14))
    assert kinds(sch.schedule()) == "ddp"
    # A prefill chunk in the step anyway (c's rest): a new arrival joins it.
    sch.max_num_batched_tokens = 8
    c = sch.running[-1]
    c.num_computed_tokens = 10   # 4 prompt tokens left: 2 decodes + 4 + d's 2 fill the budget of 8
    sch.add(seq("d", 2))
    batch = sch.schedule()
    assert [s.request_id for s in batch.seqs] == ["a", "b", "c", "d"] and kinds(batch) == "ddpp"
    # 0 admits at once.
    sch2 = Scheduler(BlockManager(num_blocks=64, block_size=4), 8, 16, prefill_hold_steps=0)
    x = seq("x", 3)
    sch2.add(x)
    sch2.schedule()
    x.num_computed_tokens = 3
    x.token_ids.append(9)
    sch2.add(seq("y", 2))
    assert kinds(sch2.schedule()) == "dp" and sch2.num_held_steps == 0
    with pytest.raises(ValueError, match="prefill_hold_steps"):
        Scheduler(BlockManager(num_blocks=8, block_size=4), 8, 16, prefill_hold_steps=-1)


def test_prefix_cache_hits_give_same_output(model):
    shared = random_prompts([21], seed=3)[0]
    prompts = [shared + tail for tail in random_prompts([3, 6, 1], seed=4)] + [shared]
    want = [reference_greedy(model, p, 8) for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(model, block_size=4, num_blocks=200)
    first = llm.generate(prompts[:1], params)
    assert llm.block_manager.num_prefix_hits == 0
    rest = llm.generate(prompts[1:], params)
    # 21 shared tokens = 5 full blocks of 4, served from the cache for each later prompt.
    assert llm.block_manager.num_prefix_hits >= 5 * 4 * 3
    assert [o.outputs[0].token_ids for o in first + rest] == want
    # The same prompt again (after its request finished): hits, same output.
    again = llm.generate(prompts[:1], params)
    assert again[0].outputs[0].token_ids == want[0]
    assert_no_leak(llm)


def test_generate_stream_is_cumulative(model, expected):
    prompts, want = expected
    llm = LLM(model, block_size=4, num_blocks=200)
    seen = [out.outputs[0].token_ids for out in llm.generate_stream(prompts[1], GREEDY)]
    assert seen[-1] == want[1]
    assert [len(s) for s in seen] == list(range(1, len(want[1]) + 1))
    assert_no_leak(llm)


def test_n_samples_share_prompt_and_greedy_agree(model, expected):
    prompts, want = expected
    llm = LLM(model, block_size=4, num_blocks=200)
    out = llm.generate(prompts[3], SamplingParams(n=3, temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(c.token_ids == want[3] for c in out.outputs)
    # The prompt (30 tokens: 7 full blocks before its last token) is computed once, not three times.
    assert llm.block_manager.num_prefix_hits == 2 * 7 * 4
    assert_no_leak(llm)


def test_abort_frees_every_block(model):
    llm = LLM(model, block_size=4, num_blocks=200)
    reqs = [llm.add_request(p, SamplingParams(max_tokens=50, ignore_eos=True)) for p in random_prompts([9, 20, 3])]
    for _ in range(4):
        llm.step()
    assert llm.block_manager.num_used_blocks > 0
    out = llm.abort_request(reqs[1].request_id)
    assert out.finished and out.outputs[0].finish_reason == "abort"
    llm.abort_request(reqs[0].request_id)
    llm.abort_request(reqs[2].request_id)
    assert_no_leak(llm)
    assert llm.abort_request("no-such-request") is None


def test_errors_are_clear(model):
    llm = LLM(model, block_size=4, num_blocks=50, max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([list(range(3, 40))])
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate([list(range(3, 20))], SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[5, 512]])
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[5, -1]])
    for bad in ([True, 5], [5, 6.0], [5, "6"]):
        with pytest.raises(ValueError, match="integer token ids"):
            llm.generate([bad])
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]])
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("text without a tokenizer")
    with pytest.raises(ValueError, match="does not fit"):
        LLM(model, block_size=4, num_blocks=5, max_model_len=64)
    # A failing request in a batch queues nothing.
    with pytest.raises(ValueError):
        llm.generate([[5, 6], list(range(3, 40))])
    assert_no_leak(llm)


def test_block_hash_is_blake2b_of_the_chain_and_little_endian_words():
    import hashlib

    from latentmoe.engine.block_manager import block_hash
    ids = [0, 1, 255, 256, 70000, 2**32 - 1]
    words = b"".join(t.to_bytes(4, "little") for t in ids)
    first = hashlib.blake2b(words, digest_size=16).digest()
    assert block_hash(None, ids) == first
    assert block_hash(first, ids[:2]) == hashlib.blake2b(first + words[:8], digest_size=16).digest()
    with pytest.raises(OverflowError):
        block_hash(None, [-1])


def test_max_tokens_none_runs_to_max_model_len(model):
    llm = LLM(model, block_size=4, num_blocks=50, max_model_len=24)
    out = llm.generate([[7, 8, 9, 10]], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 20 and out.outputs[0].finish_reason == "length"


def test_block_manager_refcounts_and_prefix_reuse():
    bm = BlockManager(num_blocks=9, block_size=2)
    a = Sequence("a", 0, [1, 2, 3, 4, 5], SamplingParams(), None, 4, 0.0)
    assert bm.match_prefix(a) == 0 and bm.allocate(a, 5)
    assert len(a.block_table) == 3 and bm.num_used_blocks == 3
    a.num_computed_tokens = 5
    bm.register_full_blocks(a)                   # blocks [1,2], [3,4] are now shared-able
    b = Sequence("b", 0, [1, 2, 3, 4, 9], SamplingParams(), None, 4, 0.0)
    assert bm.match_prefix(b) == 4 and b.block_table == a.block_table[:2]
    assert bm.allocate(b, 5) and bm.num_used_blocks == 4
    c = Sequence("c", 0, [1, 2, 3, 4], SamplingParams(), None, 4, 0.0)
    assert bm.match_prefix(c) == 2               # the last prompt token is always computed
    bm.free_seq(a)
    assert bm.num_used_blocks == 3               # shared blocks survive while b and c hold them
    bm.free_seq(b)
    bm.free_seq(c)
    assert bm.num_used_blocks == 0 and all(r == 0 for r in bm.ref_count)
    big = Sequence("d", 0, list(range(20)), SamplingParams(), None, 4, 0.0)
    assert not bm.allocate(big, 20) and not big.block_table   # 10 blocks > 8 usable: no change
    d = Sequence("d", 0, [1, 2, 3, 4, 7], SamplingParams(), None, 4, 0.0)
    assert bm.match_prefix(d) == 4               # freed blocks keep their hashes until reused
    bm.free_seq(d)


def test_paged_decode_matches_dense_absorbed_attention():
    torch.manual_seed(0)
    B, H, C, R, BS, NB = 3, 4, 16, 8, 4, 20
    kv_cache = torch.randn(NB, BS, C + R)
    lens = [5, 12, 1]
    tables = [[3, 7], [1, 9, 2], [4]]
    q_lat, q_pe = torch.randn(B, H, C), torch.randn(B, H, R)
    bt = torch.tensor([t + [0] * (3 - len(t)) for t in tables], dtype=torch.int32)
    out = mla_decode_ref(q_lat, q_pe, kv_cache, bt, torch.tensor(lens, dtype=torch.int32), 0.3)
    for b in range(B):
        rows = torch.cat([kv_cache[blk] for blk in tables[b]])[: lens[b]]
        s = (q_lat[b] @ rows[:, :C].T + q_pe[b] @ rows[:, C:].T) * 0.3
        torch.testing.assert_close(out[b], s.softmax(-1) @ rows[:, :C])


def test_startup_log_reports_cache_and_mha_comparison(model, caplog):
    caplog.set_level("INFO", logger="latentmoe.engine")
    llm = LLM(model, block_size=4, num_blocks=101, max_model_len=100)
    msg = caplog.text
    cfg = model.config
    latent = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4   # written out, not derived
    mha = cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) \
        * cfg.num_hidden_layers * 4
    assert "100 blocks x 4 tokens = 400 tokens" in msg and f"{latent} bytes/token" in msg
    assert "max concurrent sequences at max_model_len 100: 4" in msg
    assert f"per-head MHA cache of the same bytes: {400 * latent // mha // 100}" in msg
    assert llm.stats()["num_blocks_total"] == 100


def test_engine_leaves_the_callers_model_alone(model):
    """The engine runs its own module tree: same Parameter objects, same state_dict keys, engine classes
    where fused paths were chosen; the caller's modules keep their classes, attributes and outputs."""
    ids = torch.tensor([[5, 17, 3, 99, 42, 7]])
    with torch.no_grad():
        before = model(ids)
    classes = [type(m) for m in model.modules()]
    attrs = [sorted(m.__dict__) for m in model.modules()]
    llm = LLM(model, block_size=4, num_blocks=50, fused_ops=True, experts_impl="fused")
    llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    ours = llm.runner.model
    assert llm.model is model and ours is not model
    assert list(ours.state_dict()) == list(model.state_dict())
    assert all(a is b for a, b in zip(ours.parameters(), model.parameters()))   # shared, not copied
    kinds = {type(m).__name__ for m in ours.modules()}
    assert {"EngineRMSNorm", "EngineMLA", "EngineExperts"} <= kinds
    # The tiny preset routes group-limited: its routers keep the model's forward.
    assert "EngineRouter" not in kinds and "Router" in kinds
    assert [type(m) for m in model.modules()] == classes
    assert [sorted(m.__dict__) for m in model.modules()] == attrs
    assert model.training is False and all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(ids), before)


def test_engine_converts_a_copy_for_another_dtype(model):
    # dtype (or device) other than the model's: the engine converts its own copy; the model stays fp32.
    llm = LLM(model, dtype=torch.float64, block_size=4, num_blocks=50)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.dtype == torch.float64 for p in llm.runner.model.parameters())
    assert llm.runner.kv_caches[0].dtype == torch.float64 and llm.dtype == torch.float64
    ours = llm.runner.model
    assert ours.lm_head.weight is ours.model.embed_tokens.weight or not model.config.tie_word_embeddings
    prompts = random_prompts([7, 3])
    want = [reference_greedy(model, p, 6) for p in prompts]
    got = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in got] == want


@pytest.mark.parametrize("options,field", [
    (dict(block_size=0), "block_size"), (dict(max_num_seqs=2.5), "max_num_seqs"),
    (dict(max_model_len=-1), "max_model_len"), (dict(num_blocks=1), "num_blocks"),
    (dict(cache_memory_gb=0), "cache_memory_gb"), (dict(experts_impl="triton"), "experts_impl"),
    (dict(fused_ops="yes"), "fused_ops"), (dict(kv_cache="gqa"), "kv_cache"), (dict(dtype="int8"), "dtype"),
    (dict(device="tpu9"), "device"), (dict(enforce_eager=1), "enforce_eager"),
    (dict(gpu_memory_utilization=0), "gpu_memory_utilization"), (dict(gpu_memory_utilization=1.5), "gpu_memory"),
    (dict(num_blocks=10, cache_memory_gb=1.0), "num_blocks or cache_memory_gb"),
    (dict(prefill_hold_steps=-1), "prefill_hold_steps"), (dict(async_scheduling="no"), "async_scheduling"),
])
def test_engine_config_names_the_bad_field(model, options, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**options)
    with pytest.raises(ValueError, match=field):
        LLM(model, **options)


def test_default_budget_follows_the_model_and_the_gpu_memory(monkeypatch):
    """On CUDA the default token budget is the largest whose step activations fit in 8% of the device's memory."""
    class Props:
        total_memory = 0
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    lite, tiny = get_config("deepseek-v2-lite"), get_config("tiny")
    per_token = activation_bytes_per_token(lite, torch.bfloat16)
    # V2-Lite: its dense first layer's gate, up and product (3 x 10,944) and 4 hidden-size buffers, in bf16.
    assert per_token == (3 * 10944 + 4 * 2048) * 2
    cuda = torch.device("cuda")
    for gib, want in ((140, 131072), (80, 65536), (40, 32768), (16, 16384), (1, 16384)):
        Props.total_memory = gib * 2 ** 30
        assert default_budget(cuda, torch.bfloat16, lite) == want
        assert EngineConfig().resolved(cuda, torch.bfloat16, lite).max_num_batched_tokens == want
    Props.total_memory = 16 * 2 ** 30
    assert default_budget(cuda, torch.bfloat16, tiny) == CUDA_BUDGETS[0]   # a small model: the largest
    assert EngineConfig(max_num_batched_tokens=100).resolved(cuda, torch.bfloat16, lite).max_num_batched_tokens == 100


def test_cache_plan_keeps_room_for_the_budgets_activations(monkeypatch):
    """The cache is what is left after the weights and the activations of a step of the token budget (at least
    4 GiB kept); too large a budget for the memory is one clear error."""
    free, total = 60 * 2 ** 30, 80 * 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    cfg = get_config("deepseek-v2-lite")
    per_block = LatentCache().bytes_per_token(cfg, torch.bfloat16) * 64
    kw = dict(device=torch.device("cuda"), dtype=torch.bfloat16, block_size=64, cache_memory_gb=None, num_blocks=None,
              max_num_seqs=8, max_model_len=4096)
    plain, _ = plan_cache(cfg, LatentCache(), **kw)
    small, _ = plan_cache(cfg, LatentCache(), **kw, max_num_batched_tokens=16384)   # 1 + 1.25 GiB: 4 kept
    big, _ = plan_cache(cfg, LatentCache(), **kw, max_num_batched_tokens=262144)
    assert plain == small == int((0.9 * total - (total - free) - 4 * 2 ** 30) // per_block) + 1
    want = 0.9 * total - (total - free) - (2 ** 30 + 262144 * activation_bytes_per_token(cfg, torch.bfloat16))
    assert big == int(want // per_block) + 1 < plain
    with pytest.raises(ValueError, match="lower max_num_batched_tokens"):
        plan_cache(cfg, LatentCache(), **kw, max_num_batched_tokens=2 ** 20)


def test_engine_config_as_object_or_keywords(model):
    cfg = EngineConfig(block_size=4, num_blocks=40, max_num_seqs=3)
    llm = LLM(model, config=cfg)
    assert llm.engine_config.max_num_batched_tokens == 2048 and llm.engine_config.block_size == 4
    # The token budget's default depends on the device: on CUDA the smallest of its choices without a model
    # config (default_budget: by the model's activations and the GPU's memory), 2,048 elsewhere.
    cfg = EngineConfig()
    assert cfg.resolved(torch.device("cuda"), torch.bfloat16).max_num_batched_tokens == CUDA_BUDGETS[-1]
    assert EngineConfig(max_num_seqs=4096).resolved(torch.device("cpu"), torch.float32).max_num_batched_tokens == 4096
    assert llm.engine_config.experts_impl == "model" and llm.engine_config.fused_ops is False   # CPU defaults
    assert cfg.device is None   # the caller's config is not resolved in place
    with pytest.raises(ValueError, match="not both"):
        LLM(model, config=cfg, block_size=8)
    with pytest.raises(TypeError):
        LLM(model, expert_parallel_size=2)   # not an option: tensor_parallel_size + enable_expert_parallel


def test_requests_without_prefill_decode_at_their_context(model):
    llm = LLM(model, block_size=4, num_blocks=60, max_num_seqs=3)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    reqs = [llm.add_request_without_prefill(p, params) for p in random_prompts([21, 9])]
    steps = []
    while llm.has_unfinished():
        batch_before = len(llm.scheduler.running)
        llm.step()
        steps.append(batch_before)
    assert steps == [2, 2, 2, 2]                      # no prefill step: four decodes of both at once
    assert all(len(r.output().outputs[0].token_ids) == 4 for r in reqs)
    assert llm.block_manager.hash_to_block == {}      # placeholder contents never offered as a prefix
    assert_no_leak(llm)
    with pytest.raises(ValueError, match="no room"):   # the second of n=2 does not fit: the first is undone
        llm.add_request_without_prefill(list(range(3, 153)), SamplingParams(n=2, max_tokens=1))
    assert_no_leak(llm)
    assert not llm.requests
