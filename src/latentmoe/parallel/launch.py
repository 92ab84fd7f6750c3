"""Run a function on N local processes joined by a gloo (CPU) or NCCL process group: tests and debugging."""

from __future__ import annotations

import os
import socket
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args, backend: str, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    try:
        if backend == "nccl":
            import torch
            torch.cuda.set_device(rank)  # one GPU per process
        dist.init_process_group(backend, rank=rank, world_size=world)
        fn(rank, world, *args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(fn, world_size: int, *args, backend: str = "gloo") -> None:
    """fn(rank, world_size, *args) on `world_size` new processes (fn must be importable).

    They fork from a server process that imported torch once (not from this process, whose
    thread pools must not be forked), so each call costs no fresh `import torch`.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "latentmoe.model", "latentmoe.parallel.launch"])
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(_worker, args=(world_size, free_port(), fn, args, backend, errors),
                           nprocs=world_size, join=True, start_method="forkserver")
    except mp.ProcessRaisedException as e:
        details = [] if errors.empty() else [errors.get()]
        raise RuntimeError("\n".join(details) or str(e)) from None
