import sys, torch
sys.path.insert(0, "benchmarks")
from bench_kernels import bench, roofline
from latentmoe.config import get_config
from latentmoe.kernels import fused_moe_triton
from latentmoe.kernels.moe import choose_moe_config
copy_gbs, tflops = roofline()
print(f"matmul {tflops:.0f}")
cfgs = [None] + [dict(block_m=bm, block_n1=n1, block_n2=n2, block_k=bk, num_warps=nw, num_stages=st) for bm, n1, n2, bk, nw, st in [
    (64, 128, 128, 64, 4, 3), (64, 128, 128, 64, 8, 3), (64, 64, 128, 64, 4, 4), (128, 128, 256, 64, 8, 3),
    (128, 64, 128, 64, 8, 4), (64, 128, 256, 64, 8, 3), (128, 128, 128, 64, 8, 4), (64, 256, 128, 64, 8, 3), (128, 128, 128, 32, 8, 5)]]
for preset, M in [("deepseek-v2", 8192), ("deepseek-v2", 4096), ("deepseek-v2-lite", 8192), ("deepseek-v2-lite", 4096)]:
    cfg = get_config(preset)
    E, D, I, K = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    w1 = torch.randn(E, 2 * I, D, device="cuda", dtype=torch.bfloat16) * D**-0.5
    w2 = torch.randn(E, D, I, device="cuda", dtype=torch.bfloat16) * I**-0.5
    x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
    w, idx = torch.randn(M, E, device="cuda").softmax(-1).topk(K, dim=-1)
    flops = 6 * M * K * D * I
    print(preset, M, "default", choose_moe_config(M * K, E))
    for c in cfgs:
        try:
            ms = bench(lambda: fused_moe_triton(x, w1, w2, idx, w, c), iters=10, graph=True)
            print(f"  {c}: {ms*1e3:.0f} us {flops/ms/1e9:.0f} TFLOP/s ({flops/ms/1e9/tflops*100:.0f}%)", flush=True)
        except Exception as e:
            print(f"  {c}: FAIL {str(e)[:100]}")
    del w1, w2
    torch.cuda.empty_cache()
