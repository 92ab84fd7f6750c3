"""FP8 on CPU (the dequantising reference path): quantisation bounds, the FP8 engine against a model
holding the dequantised weights, block-FP8 checkpoints, the FP8 latent cache, options and errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from latentmoe import kernels
from latentmoe.checkpoint import CheckpointError, load_model, save_fp8_model
from latentmoe.config import get_config
from latentmoe.engine import LLM, EngineConfig, SamplingParams
from latentmoe.engine.attention import AttentionMetadata, PrefillMetadata
from latentmoe.engine.kv_cache import LatentCache, LatentFp8Cache, cache_layout, plan_cache
from latentmoe.engine.layers import Fp8Experts, Fp8Linear, engine_model
from latentmoe.model import Experts

from test_engine import random_prompts, reference_greedy, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def dequantized_copy(model):
    """The model with every weight the FP8 engine quantises replaced by its dequantised 128x128-block value."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in ref.named_modules():
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in ("lm_head", "kv_b_proj"):
                m.weight.copy_(kernels.dequantize_fp8_blocks(*kernels.quantize_fp8_blocks(m.weight)))
            elif isinstance(m, Experts):
                for p in (m.gate_up_proj, m.down_proj):
                    p.copy_(kernels.dequantize_fp8_blocks(*kernels.quantize_fp8_blocks(p)))
    return ref


# ----------------------------------------------------------------------------- quantisation
def test_block_quantisation_round_trip_bounds():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 300, 260, generator=g) * torch.logspace(-4, 1, 260)   # columns of very different ranges
    q, s = kernels.quantize_fp8_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 3, 3)
    back = kernels.dequantize_fp8_blocks(q, s)
    # e4m3: 3 mantissa bits -> half a step is 1/16 of the value; below 2^-6 (subnormals) steps of 2^-9 x scale.
    scale = s.repeat_interleave(128, 1)[:, :300].repeat_interleave(128, 2)[..., :260]
    assert ((back - w).abs() <= w.abs() / 16 + scale * 2 ** -10 + 1e-12).all()
    # each tile's largest element lands on 448 exactly: the full range is used
    amax = torch.stack([w[:, i:i + 128, j:j + 128].abs().amax((1, 2))
                        for i in range(0, 300, 128) for j in range(0, 260, 128)], -1).view(3, 3, 3)
    assert torch.allclose(s * 448, amax)
    # quantising a dequantised block-FP8 weight again gives it back exactly
    q2, s2 = kernels.quantize_fp8_blocks(back)
    assert torch.equal(q2.float(), q.float()) and torch.allclose(s2, s, rtol=1e-6)


def test_zero_block_quantises_to_zero():
    w = torch.zeros(130, 10)
    w[129, 3] = 1.0
    q, s = kernels.quantize_fp8_blocks(w)
    assert torch.equal(kernels.dequantize_fp8_blocks(q, s), w)


def test_dense_activations_rounded_where_the_gpu_rounds():
    # The CPU path mirrors the GPU's rule: from FP8_SCALED_MM_MIN_ROWS rows, for widths of whole 128-blocks,
    # x goes through per-token fp8 groups; fewer rows, or other widths, keep x as it is.
    from latentmoe.kernels.fp8 import FP8_SCALED_MM_MIN_ROWS, uses_fp8_dense_activations
    g = torch.Generator().manual_seed(4)
    w, s = kernels.quantize_fp8_blocks(torch.randn(128, 512, generator=g) * 0.05)
    n = FP8_SCALED_MM_MIN_ROWS
    x = torch.randn(n, 512, generator=g)
    rounded = kernels.fp8_linear_ref(x, w, s, quantize_input=True)
    assert torch.equal(kernels.fp8_linear(x, w, s), rounded)
    assert torch.equal(kernels.fp8_linear(x[:n - 1], w, s), kernels.fp8_linear_ref(x[:n - 1], w, s))
    assert not torch.equal(rounded[:n - 1], kernels.fp8_linear_ref(x[:n - 1], w, s))
    assert not uses_fp8_dense_activations(n, (576, 2048)) and uses_fp8_dense_activations(n, (3072, 2048))
    assert not uses_fp8_dense_activations(n, (2048, 2816))   # K: 22 blocks of 128, not whole groups of 4


# ----------------------------------------------------------------------------- the FP8 engine
@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


def test_fp8_engine_module_tree(model):
    e = engine_model(model, quantization="fp8")
    layer = e.model.layers[1]
    assert isinstance(layer.self_attn.q_proj, Fp8Linear) and isinstance(layer.self_attn.o_proj, Fp8Linear)
    assert type(layer.self_attn.kv_b_proj) is nn.Linear and type(e.lm_head) is nn.Linear
    assert isinstance(layer.mlp.experts, Fp8Experts) and isinstance(layer.mlp.shared_experts.down_proj, Fp8Linear)
    assert isinstance(e.model.layers[0].mlp.gate_proj, Fp8Linear)          # the dense first layer
    keys = set(e.state_dict())
    assert "model.layers.1.self_attn.q_proj.weight_scale_inv" in keys
    assert "model.layers.1.mlp.experts.gate_up_proj_scale_inv" in keys
    assert all(p.dtype != torch.float8_e4m3fn for p in model.parameters())   # the caller's model is untouched
    assert e.model.embed_tokens.weight is model.model.embed_tokens.weight    # the rest is shared


def test_fp8_gate_up_one_tensor():
    """Under FP8 an MLP's gate and up weights are the halves of one e4m3 tensor where H is whole 128-row blocks:
    each half exactly its own quantisation, one GEMM above the few-row kernel's rows giving what two give."""
    m = tiny_model(seed=6, moe_intermediate_size=128)              # shared experts H = 128; the dense layer's 384
    e = engine_model(m, fused_ops=True, fused_experts=True, quantization="fp8")
    for mlp, src in ((e.model.layers[0].mlp, m.model.layers[0].mlp), (e.model.layers[1].mlp.shared_experts,
                                                                         m.model.layers[1].mlp.shared_experts)):
        q, s = mlp.gate_up_fp8
        H = src.gate_proj.out_features
        assert q.shape == (2 * H, src.gate_proj.in_features) and s.shape == (2 * H // 128, 1)
        assert mlp.gate_proj.weight.data_ptr() == q.data_ptr() and mlp.up_proj.weight.data_ptr() == q[H:].data_ptr()
        for lin, ref in ((mlp.gate_proj, src.gate_proj), (mlp.up_proj, src.up_proj)):
            q_ref, s_ref = kernels.quantize_fp8_blocks(ref.weight.detach())
            assert torch.equal(lin.weight.float(), q_ref.float()) and torch.equal(lin.weight_scale_inv, s_ref)
        x = torch.randn(70, src.gate_proj.in_features, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            two = mlp.down_proj(kernels.silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))
            assert torch.allclose(mlp(x), two, rtol=1e-5, atol=1e-6)
    assert set(e.state_dict()) == set(engine_model(m, quantization="fp8").state_dict())   # names unchanged
    # H = 64 (tiny's default experts): a scale block would span gate and up, so they stay apart
    e64 = engine_model(tiny_model(seed=6), fused_ops=True, fused_experts=True, quantization="fp8")
    assert e64.model.layers[1].mlp.shared_experts.gate_up_fp8 is None


def test_fp8_engine_is_the_dequantised_model(model):
    ids = torch.tensor(random_prompts([20, 20], seed=3))
    with torch.no_grad():
        fp8 = engine_model(model, quantization="fp8")(ids)
        deq = dequantized_copy(model)(ids)
        full = model(ids)
    assert rel(fp8, deq) < 1e-5
    # against the unquantised model (random weights, std 0.08: flat logits, errors compound over layers;
    # benchmarks/bench_fp8.py measures a trained model): a bounded logit error, the arg-max mostly kept
    assert rel(fp8, full) < 0.15
    assert (fp8.argmax(-1) == full.argmax(-1)).float().mean() >= 0.75


def test_fp8_engine_greedy(model):
    prompts = random_prompts([7, 12, 3], seed=5)
    llm = LLM(model, quantization="fp8", num_blocks=40, block_size=8)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    deq = dequantized_copy(model)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == reference_greedy(deq, p, 6)


# ----------------------------------------------------------------------------- block-FP8 checkpoints
def test_block_fp8_checkpoint_loads(model, tmp_path):
    m = tiny_model(seed=2, moe_intermediate_size=128, hidden_size=128)   # I = 128: experts stored as pairs too
    save_fp8_model(m, tmp_path / "fp8")
    meta = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert meta["quantization_config"]["weight_block_size"] == [128, 128]
    loaded = load_model(tmp_path / "fp8")
    ref = dequantized_copy(m)
    with torch.no_grad():
        kv_b = m.model.layers[1].self_attn.kv_b_proj.weight
        kv_b_ref = kernels.dequantize_fp8_blocks(*kernels.quantize_fp8_blocks(kv_b))
        ref.model.layers[1].self_attn.kv_b_proj.weight.copy_(kv_b_ref)
    assert torch.equal(loaded.model.layers[1].mlp.experts.down_proj, ref.model.layers[1].mlp.experts.down_proj)
    assert torch.equal(loaded.model.layers[1].self_attn.kv_b_proj.weight, kv_b_ref)   # dequantised on load
    assert torch.equal(loaded.lm_head.weight, m.lm_head.weight)                       # kept as it was
    # the engine takes the stored pairs as they are
    llm = LLM(str(tmp_path / "fp8"), quantization="fp8", device="cpu", num_blocks=8, block_size=8)
    from safetensors.torch import load_file
    stored = load_file(tmp_path / "fp8" / "model.safetensors")
    q = llm.runner.model.model.layers[1].self_attn.q_proj
    assert torch.equal(q.weight.float(), stored["model.layers.1.self_attn.q_proj.weight"].float())
    assert torch.equal(q.weight_scale_inv, stored["model.layers.1.self_attn.q_proj.weight_scale_inv"])
    ex = llm.runner.model.model.layers[1].mlp.experts
    assert torch.equal(ex.gate_up_proj[3, 128:].float(), stored["model.layers.1.mlp.experts.3.up_proj.weight"].float())
    assert torch.equal(ex.down_proj_scale_inv[5], stored["model.layers.1.mlp.experts.5.down_proj.weight_scale_inv"])


def test_block_fp8_checkpoint_missing_scale(tmp_path):
    from safetensors.torch import load_file, save_file
    m = tiny_model(seed=2)
    save_fp8_model(m, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.2.self_attn.o_proj.weight_scale_inv"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="o_proj.weight in float8 without its scales") as e:
        load_model(tmp_path)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- the FP8 latent cache
def test_fp8_cache_attention_reads_dequantised_rows(model):
    """Prefill then decode through the FP8 backend == the bf16/fp32 backend over the dequantised rows."""
    cfg = model.config
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(4)
    H, N, R, C, T, BS = attn.n_heads, attn.nope_dim, attn.rope_dim, attn.kv_lora_rank, 11, 4
    fp8 = LatentFp8Cache().allocate(cfg, 6, BS, torch.float32, torch.device("cpu"))
    ref = LatentCache().allocate(cfg, 6, BS, torch.float32, torch.device("cpu"))

    def step(backend, meta, q_nope, q_pe, c_kv, k_pe):
        backend.meta = meta
        return backend.attend(attn, q_nope, q_pe, c_kv, k_pe)

    q_nope, q_pe = torch.randn(1, T, H, N, generator=g), torch.randn(1, T, H, R, generator=g)
    c_kv, k_pe = torch.randn(1, T, C, generator=g), torch.randn(1, T, R, generator=g) * 0.2
    slots = torch.arange(BS, BS + T)
    cu = torch.tensor([0, T], dtype=torch.int32)
    pre = AttentionMetadata(slot_mapping=slots, prefill=PrefillMetadata(slots, cu, cu, T, T))
    out8 = step(fp8, pre, q_nope, q_pe, c_kv, k_pe)
    rows, scales = fp8.kv_caches[0]
    assert rows.dtype == torch.float8_e4m3fn
    ref.kv_caches[0].copy_(kernels.dequantize_latent_rows(rows, scales, C, torch.float32))
    # prefill: the chunk attends over its own rows as stored (quantised)
    deq = ref.kv_caches[0].view(-1, C + R)[slots][None]
    want = attn.attend_decompressed(q_nope, q_pe, deq[..., :C], deq[..., C:], None)
    assert rel(out8, want) < 1e-5
    assert rel(out8, attn.attend_decompressed(q_nope, q_pe, c_kv, k_pe, None)) < 0.05
    # decode of token T against the T cached ones
    dq = [torch.randn(1, 1, H, N, generator=g), torch.randn(1, 1, H, R, generator=g),
          torch.randn(1, 1, C, generator=g), torch.randn(1, 1, R, generator=g) * 0.2]
    dec = AttentionMetadata(slot_mapping=torch.tensor([BS + T]), num_decodes=1,
                            block_table=torch.tensor([[1, 2, 3, 4]], dtype=torch.int32),
                            seq_lens=torch.tensor([T + 1], dtype=torch.int32))
    o8 = step(fp8, dec, *dq)
    ref.kv_caches[0].copy_(kernels.dequantize_latent_rows(rows, scales, C, torch.float32))
    ref_dec = AttentionMetadata(slot_mapping=torch.tensor([-1]), num_decodes=1, block_table=dec.block_table,
                                seq_lens=dec.seq_lens)
    assert rel(o8, step(ref, ref_dec, *dq)) < 1e-5


def test_fp8_cache_engine_greedy_close(model):
    prompts = random_prompts([9, 14, 5], seed=7)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = {kv: [o.outputs[0].token_ids for o in LLM(model, kv_cache_dtype=kv, num_blocks=40, block_size=8)
                 .generate(prompts, sp)] for kv in ("auto", "fp8")}
    agree = sum(a == b for x, y in zip(outs["auto"], outs["fp8"]) for a, b in zip(x, y))
    assert agree >= 20   # of 24 tokens; the first token (prefill) of each prompt always
    assert all(x[0] == y[0] for x, y in zip(outs["auto"], outs["fp8"]))


def test_planner_counts_fp8_bytes():
    cfg = get_config("deepseek-v2-lite")
    L, C, R = cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    assert LatentFp8Cache().bytes_per_token(cfg) == L * (C + R) + L * 8          # e4m3 rows + two fp32 scales
    assert LatentCache().bytes_per_token(cfg, torch.bfloat16) == L * (C + R) * 2
    kw = dict(device=torch.device("cpu"), dtype=torch.bfloat16, block_size=64, cache_memory_gb=1.0,
              num_blocks=None, max_num_seqs=8, max_model_len=4096)
    n16, _ = plan_cache(cfg, LatentCache(), **kw)
    n8, _ = plan_cache(cfg, LatentFp8Cache(), **kw)
    assert n8 - 1 == 2 ** 30 // (64 * L * (C + R + 8)) and n16 - 1 == 2 ** 30 // (64 * L * (C + R) * 2)


def test_kv_report_shows_both(capsys):
    from latentmoe.cli import main
    assert main(["kv-report", "deepseek-v2-lite", "--context", "4096"]) == 0
    out = capsys.readouterr().out
    L = 27
    assert f"{L * 576 * 2 / 1024:,.1f} KiB" in out and f"{(L * 576 + L * 8) / 1024:,.1f} KiB" in out
    assert f"{L * 576 * 2 / (L * 584):.2f}x" in out


# ----------------------------------------------------------------------------- options and errors
def test_options_and_errors():
    assert isinstance(EngineConfig(kv_cache_dtype="fp8").kv_cache, LatentFp8Cache)
    assert EngineConfig(quantization="fp8").quantization == "fp8"
    with pytest.raises(ValueError, match="quantization must be None or 'fp8', got 'int4'"):
        EngineConfig(quantization="int4")
    with pytest.raises(ValueError, match="kv_cache_dtype must be 'auto' or 'fp8', got 'fp16'"):
        EngineConfig(kv_cache_dtype="fp16")
    with pytest.raises(ValueError, match="not kv_cache='mha'"):
        EngineConfig(kv_cache="mha", kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="needs the latent cache"):
        cache_layout(LatentCache(), "fp8")


def test_fp8_refused_on_a_gpu_without_fp8(monkeypatch):
    from latentmoe.engine import config as engine_config
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match=r"compute capability 8.9\+.*A100 \(8.0\)"):
        engine_config.check_fp8_device(torch.device("cuda:0"))
    engine_config.check_fp8_device(torch.device("cpu"))   # the reference path: fine


def test_cli_flags_give_one_line_errors(tmp_path, capsys):
    from latentmoe.cli import main
    rc = main(["generate", str(tmp_path), "--prompt", "x", "--quantization", "int8"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "quantization must be None or 'fp8'" in err and len(err.splitlines()) == 1
    rc = main(["generate", str(tmp_path), "--prompt", "x", "--kv-cache-dtype", "e5m2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "kv_cache_dtype must be 'auto' or 'fp8'" in err and len(err.splitlines()) == 1
