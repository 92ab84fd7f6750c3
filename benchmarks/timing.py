"""Timing for the benchmarks: the median of CUDA-event timings, optionally of CUDA-graph replays."""
import statistics
import time

import torch


def median_seconds(fn, iters: int = 30, warmup: int = 5, graph: bool = False) -> float:
    """Median seconds of one fn() call: CUDA events on a GPU (wall clock on a CPU).

    graph=True captures fn once in a CUDA graph and times its replays, which is how the engine runs
    decode: the kernels' time without the host's launch time. Replays run until the clocks settle
    first (in one run the first kernel timed after heavy matmuls read 141 us against 129 us a minute
    later).
    """
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    run = fn
    if cuda:
        torch.cuda.synchronize()
    if graph and cuda:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
        for _ in range(max(warmup, 50)):
            run()
    times = []
    for _ in range(iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
    return statistics.median(times)
