"""Timing for the benchmarks: the median of CUDA-event timings, optionally of CUDA-graph replays."""
import statistics
import time

import torch


def median_seconds(fn, iters: int = 30, warmup: int = 5, graph: bool = False, calls_per_graph: int = 1) -> float:
    """Median seconds of one fn() call: CUDA events on a GPU (wall clock on a CPU).

    graph=True captures fn once in a CUDA graph and times its replays, which is how the engine runs
    decode: the kernels' time without the host's launch time. Replays run until the clocks settle
    first (in one run the first kernel timed after heavy matmuls read 141 us against 129 us a minute
    later). `calls_per_graph` > 1 captures that many calls back to back and divides: a kernel of a few
    microseconds as it runs inside a decode step's graph, without the ~8 us of one replay's own latency
    (on an H200 every single-kernel replay read 9.5 us or more).
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
            for _ in range(calls_per_graph):
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
    return statistics.median(times) / (calls_per_graph if graph and cuda else 1)


def kernel_profile(fn, device: torch.device, row_limit: int = 30, name_width: int = 70):
    """Profile one fn() call -> (fn's result, the ops table sorted by self time on the device (CPU
    elsewhere), the number of CUDA kernels, their total time in microseconds)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        result = fn()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=row_limit, max_name_column_width=name_width)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0) for e in kernels)
    return result, table, len(kernels), busy
