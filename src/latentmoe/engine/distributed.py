"""The multi-process engine: one process per device, each running the same step on its share of the model.

Rank 0 is the caller's process: it owns the scheduler, the block manager and sampling, and runs its
own share like every rank. Ranks 1..P-1 are new processes (torch.multiprocessing), each
loading only its slices (tensor_parallel.load_shard) onto its device. Per step rank 0 sends the
scheduled batch (each sequence's new tokens, positions and block table: a few hundred bytes) down a
pipe to every worker; every rank then runs the step and the ranks meet in the collectives inside
the layers (torch.distributed: NCCL on CUDA, gloo on CPU). Each rank keeps its own latent cache; the
block tables are rank 0's, so all caches hold the same rows. Only rank 0's logits are sampled.

Why pipes for the batch and not a broadcast: idle workers wait on their pipe with no timeout (a
server may idle for hours), while every collective has one; a dead rank 0 closes the pipes, so its
workers exit.

Failure: a worker that raises sends its traceback to rank 0 and exits; rank 0's collective then fails
(gloo sees the closed connection; NCCL times out) and the caller gets `ParallelError` naming the rank
and its error, after every worker has been stopped. An error of rank 0's own (a checkpoint that does
not match, a bad input) stops the workers and is raised as it is. A worker that dies without a word is seen through
its process sentinel; if rank 0 is still stuck in a collective `HANG_GRACE_S` later, the process
exits (code 70) rather than hang.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait as wait_any

import torch
import torch.distributed as dist

from ..checkpoint import resolve_dtype
from ..config import ModelConfig
from .config import EngineConfig
from .kv_cache import plan_cache
from .layers import engine_model
from .sampling import SamplingParams
from .scheduler import ScheduledBatch
from .tensor_parallel import ShardPlan, check_divisible, load_shard

log = logging.getLogger("latentmoe.engine")

COLLECTIVE_TIMEOUT_S = 300   # a step (or start-up rendezvous) that waits this long on a peer fails
STARTUP_TIMEOUT_S = 1800     # loading a rank's share of a large checkpoint
HANG_GRACE_S = 30            # after a worker died, how long rank 0 may stay inside a step


class ParallelError(RuntimeError):
    """A rank of the multi-process engine failed; the engine has stopped all of its processes."""


# ----------------------------------------------------------------------------- the step on the wire
_GREEDY = SamplingParams(temperature=0.0)


class _Window:
    """The token ids a step reads (positions start .. start+n), indexed by absolute position."""

    def __init__(self, start: int, ids: list[int]):
        self.start, self.ids = start, ids

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.ids[k.start - self.start:k.stop - self.start]
        return self.ids[k - self.start]


class _SeqView:
    """What a worker's runner reads of a sequence: the step's tokens, its block table and length."""
    params = _GREEDY   # workers' logits are discarded: the cheapest "sampling"
    generator = None

    def __init__(self, token_ids: _Window, num_computed_tokens: int, block_table: list[int], length: int):
        self.token_ids, self.num_computed_tokens, self.block_table, self.length = (
            token_ids, num_computed_tokens, block_table, length)

    def __len__(self) -> int:
        return self.length


class StepSender:
    """Rank 0's side of the wire: each sequence's new tokens, and only the part of its block table that
    the workers have not seen (a decode at 4K context would otherwise resend 64 block ids per sequence
    per step). Workers keep the tables (`StepReceiver`); finished sequences are dropped on both sides."""

    def __init__(self):
        self.sent: dict[int, tuple[object, list[int]]] = {}   # seq_id -> (sequence, its table as sent)

    def message(self, batch: ScheduledBatch) -> tuple:
        drop = [sid for sid, (seq, _) in self.sent.items() if seq.is_finished]
        for sid in drop:
            del self.sent[sid]
        seqs = []
        for s, n in zip(batch.seqs, batch.num_new_tokens):
            start, table = s.num_computed_tokens, s.block_table
            last = self.sent.get(s.seq_id, (None, []))[1]
            keep = len(last) if len(table) >= len(last) and table[:len(last)] == last else 0
            self.sent[s.seq_id] = (s, list(table))
            seqs.append((s.seq_id, start, s.token_ids[start:start + n], keep, table[keep:], len(s)))
        return batch.num_decodes, list(batch.num_new_tokens), seqs, drop


class StepReceiver:
    """A worker's side: rebuilds the step's batch (stand-in sequences over the sent tokens and tables)."""

    def __init__(self):
        self.tables: dict[int, list[int]] = {}

    def batch(self, msg: tuple) -> ScheduledBatch:
        num_decodes, num_new, seqs, drop = msg
        for sid in drop:
            self.tables.pop(sid, None)
        views = []
        for sid, start, ids, keep, tail, length in seqs:
            table = self.tables.get(sid, [])[:keep] + tail
            self.tables[sid] = table
            views.append(_SeqView(_Window(start, ids), start, table, length))
        return ScheduledBatch(views, num_new, num_decodes, [])


# ----------------------------------------------------------------------------- processes
def rank_device(base: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", (base.index or 0) + rank) if base.type == "cuda" else base


def _init_group(base: torch.device, rank: int, world: int, init_method: str) -> None:
    if base.type == "cuda":
        torch.cuda.set_device(rank_device(base, rank))
    dist.init_process_group("nccl" if base.type == "cuda" else "gloo", init_method=init_method, rank=rank,
                            world_size=world, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def _build_rank(path: str, config: EngineConfig, rank: int, base: torch.device):
    """This rank's engine module tree and resolved config (after its slices are loaded)."""
    device = rank_device(base, rank)
    dtype = resolve_dtype(config.dtype, device)
    shard = load_shard(path, ShardPlan(rank, config.tensor_parallel_size, config.enable_expert_parallel), device, dtype)
    resolved = config.resolved(device, dtype, shard.config)   # the full model's config: every rank settles alike
    model = engine_model(shard, fused_ops=resolved.fused_ops, fused_experts=resolved.experts_impl == "fused")
    return model, resolved


def _peak_host_gib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2   # KiB on Linux


def _worker(rank: int, path: str, config: EngineConfig, base: torch.device, init_method: str, runner_class,
            conn) -> None:
    """A rank > 0: join the group, load its share, then run every step rank 0 sends until told to stop."""
    world = config.tensor_parallel_size
    if base.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
    try:
        _init_group(base, rank, world, init_method)
        model, resolved = _build_rank(path, config, rank, base)
        _, num_blocks, max_model_len = conn.recv()
        runner = runner_class(model, resolved, num_blocks, max_model_len)
        conn.send(("loaded", rank, _peak_host_gib()))
        # The same warm-up plan as rank 0's (it depends on the config only): collectives in step.
        runner.warm_up(resolved.max_num_batched_tokens, progress=False)
        conn.send(("ready", rank))
        receiver = StepReceiver()
        with torch.inference_mode():
            while True:
                msg = conn.recv()
                if msg[0] == "stop":
                    break
                runner.execute(receiver.batch(msg[1]))
        conn.send(("stopped", rank))
        dist.destroy_process_group()
    except (EOFError, BrokenPipeError):   # rank 0 went away: nothing to report to
        os._exit(1)
    except BaseException as e:   # noqa: BLE001 - everything is reported, then the process ends
        try:
            conn.send(("error", rank, f"{type(e).__name__}: {e}", traceback.format_exc()))
        finally:
            os._exit(1)


class ParallelRunner:
    """Rank 0's runner: starts the other ranks, then runs each step on all of them.

    Built by `LLM` for tensor_parallel_size > 1 from a checkpoint directory. Attributes not defined
    here are the local runner's (`runner_class`, built on rank 0's share)."""

    def __init__(self, path: str, config: EngineConfig, runner_class):
        cfg = ModelConfig.from_json(path)
        world = config.tensor_parallel_size
        check_divisible(cfg, world, config.enable_expert_parallel)   # before any process starts
        if config.quantization is not None:
            # Its Fp8Linear / Fp8Experts would replace the row-parallel layers (and their all-reduce).
            raise ValueError(f"quantization={config.quantization!r} is not supported with tensor_parallel_size > 1 "
                             "yet (kv_cache_dtype='fp8' is)")
        if dist.is_initialized():
            raise ValueError("tensor_parallel_size > 1 starts its own torch.distributed group; this process "
                             "already has one")
        base = config.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if base.type == "cuda" and (base.index or 0) + world > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size {world} from {base} needs {(base.index or 0) + world} GPUs; "
                             f"{torch.cuda.device_count()} visible")
        if base.type not in ("cuda", "cpu"):
            raise ValueError(f"tensor_parallel_size > 1 runs on cuda or cpu devices, got {base}")
        self.model_config = cfg
        self.world = world
        self._threads = torch.get_num_threads()
        if base.type == "cpu":
            # The ranks share this host's cores; more threads than cores makes every collective wait on
            # spinning OpenMP threads (10x slower steps). Restored by close().
            torch.set_num_threads(max(1, self._threads // world))
        self._closed = False
        self._in_step = 0          # number of the step rank 0 is inside (0: none)
        self._step_count = 0
        self._errors: dict[int, str] = {}
        self._lock = threading.Lock()
        self._sender = StepSender()
        from ..parallel.launch import free_port
        init_method = f"tcp://127.0.0.1:{free_port()}"
        if base.type == "cuda":
            # CUDA must be initialised in each worker afresh: new interpreters.
            ctx = torch.multiprocessing.get_context("spawn")
        else:
            # Workers fork from a server process that imported torch and the engine once (not from
            # this process, whose threads must not be forked): each costs no fresh import.
            ctx = torch.multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["torch", "torch.distributed", "latentmoe.engine.distributed"])
        self.conns, self.procs = [], []
        try:
            for rank in range(1, world):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker, args=(rank, path, config, base, init_method, runner_class, child),
                                name=f"latentmoe-rank{rank}", daemon=True)
                p.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(p)
            _init_group(base, 0, world, init_method)
            model, self.config = _build_rank(path, config, 0, base)
            self.model = model
            num_blocks, self.max_model_len = plan_cache(
                model.config, self.config.kv_cache, self.config.device, self.config.dtype, self.config.block_size,
                self.config.cache_memory_gb, self.config.num_blocks, self.config.max_num_seqs,
                self.config.max_model_len, gpu_memory_utilization=self.config.gpu_memory_utilization,
                max_num_batched_tokens=self.config.max_num_batched_tokens)
            self.num_blocks = num_blocks
            self._send_all(("start", num_blocks, self.max_model_len))
            self.local = runner_class(model, self.config, num_blocks, self.max_model_len)
            peaks = {0: _peak_host_gib()}
            for rank, msg in self._collect("loaded", STARTUP_TIMEOUT_S).items():
                peaks[rank] = msg[2]
            log.info("%d ranks loaded (%s); peak host memory per rank: %s GiB", world,
                     "expert-parallel" if config.enable_expert_parallel else "tensor-parallel",
                     ", ".join(f"{peaks[r]:.2f}" for r in sorted(peaks)))
        except BaseException as e:
            err = self._failure(e)
            if err is e:
                raise
            raise err from e
        self._monitor = threading.Thread(target=self._watch, name="latentmoe-rank-monitor", daemon=True)
        self._monitor.start()

    @property
    def on_launch(self):
        """The engine's hand-out signal (LLM.step), called by rank 0's runner: set on it, not on this wrapper
        (whose attributes its runner never sees)."""
        return self.local.on_launch

    @on_launch.setter
    def on_launch(self, callback) -> None:
        self.local.on_launch = callback

    def __getattr__(self, name):
        if name == "local":   # not built (yet): no recursion
            raise AttributeError(name)
        return getattr(self.local, name)

    # ------------------------------------------------------------------ messages
    def _send_all(self, msg) -> None:
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send(msg)
            except (BrokenPipeError, OSError):
                raise ParallelError(f"rank {rank} is gone") from None

    def _drain(self, timeout: float = 0.0) -> None:
        """Read any error reports the workers sent (waiting up to `timeout` for the first)."""
        ready = wait_any(self.conns, timeout)
        for conn in ready:
            try:
                while conn.poll():
                    msg = conn.recv()
                    if msg[0] == "error":
                        self._errors[msg[1]] = f"{msg[2]}\n{msg[3]}"
            except (EOFError, OSError):
                pass

    def _collect(self, kind: str, timeout: float) -> dict[int, tuple]:
        """Wait for `kind` from every worker; a worker's error or exit raises ParallelError."""
        got: dict[int, tuple] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(self.conns):
            left = deadline - time.monotonic()
            if left <= 0:
                raise ParallelError(f"ranks {sorted(set(range(1, self.world)) - set(got))} did not answer in "
                                    f"{timeout:.0f} s")
            waiting = [c for r, c in enumerate(self.conns, 1) if r not in got]
            sentinels = [p.sentinel for r, p in enumerate(self.procs, 1) if r not in got]
            for obj in wait_any(waiting + sentinels, left):
                if obj in self.conns:
                    rank = self.conns.index(obj) + 1
                    try:
                        msg = obj.recv()
                    except (EOFError, OSError):
                        continue   # its sentinel tells
                    if msg[0] == "error":
                        self._errors[rank] = f"{msg[2]}\n{msg[3]}"
                        raise ParallelError(f"rank {rank} failed: {msg[2]}")
                    if msg[0] == kind:
                        got[rank] = msg
                else:
                    rank = [p.sentinel for p in self.procs].index(obj) + 1
                    self._drain(0.5)
                    if rank in self._errors:
                        raise ParallelError(f"rank {rank} failed: {self._errors[rank].splitlines()[0]}")
                    raise ParallelError(f"rank {rank} exited with code {self.procs[rank - 1].exitcode}")
        return got

    # ------------------------------------------------------------------ steps
    def warm_up(self, max_num_batched_tokens: int, progress: bool = True) -> None:
        """Rank 0's warm-up (compilations, graph captures) while every worker runs the same plan."""
        try:
            self._step_count += 1
            self._in_step = self._step_count   # watched like a step: a rank that dies here ends the wait
            try:
                with self._on_device():
                    self.local.warm_up(max_num_batched_tokens, progress=progress)
            finally:
                self._in_step = 0
            self._collect("ready", STARTUP_TIMEOUT_S)
        except BaseException as e:
            err = self._failure(e)
            if err is e:
                raise
            raise err from e

    def _on_device(self):
        """The current device is per thread (a server steps in a worker thread): rank 0's for its work."""
        return torch.cuda.device(self.config.device) if self.config.device.type == "cuda" else contextlib.nullcontext()

    def execute(self, batch: ScheduledBatch):
        if self._closed:
            raise ParallelError("the parallel engine has stopped (a rank failed or it was closed)")
        try:
            self._drain()
            if self._errors:
                raise ParallelError("a rank failed")
            self._send_all(("step", self._sender.message(batch)))
            self._step_count += 1
            self._in_step = self._step_count
            try:
                with self._on_device():
                    return self.local.execute(batch)
            finally:
                self._in_step = 0
        except BaseException as e:
            err = self._failure(e)
            if err is e:
                raise
            raise err from e

    def _failure(self, cause: BaseException) -> BaseException:
        """Stop every rank; the error to raise: the first failed worker's (ParallelError, naming it), or
        rank 0's own when it failed by itself (e.g. a checkpoint that does not match: its own type)."""
        # A collective that failed (RuntimeError) usually means a peer failed first: give its report a moment.
        peer_suspect = isinstance(cause, (ParallelError, RuntimeError))
        deadline = time.monotonic() + (5 if peer_suspect else 0.5)
        while not self._errors and time.monotonic() < deadline and any(p.is_alive() for p in self.procs):
            self._drain(0.2)
        self._drain()
        self._exit_codes = {r: p.exitcode for r, p in enumerate(self.procs, 1)}   # before close() ends them
        self.close(force=True)
        if self._errors and peer_suspect:
            rank = min(self._errors)
            first, _, tb = self._errors[rank].partition("\n")
            return ParallelError(f"rank {rank} failed: {first}\n{tb}".rstrip())
        dead = [(r, code) for r, code in self._exit_codes.items() if code not in (None, 0)]
        if dead and peer_suspect and not self._errors:
            return ParallelError(f"rank {dead[0][0]} exited with code {dead[0][1]}; rank 0 saw: "
                                 f"{type(cause).__name__}: {cause}")
        return cause

    def _watch(self) -> None:
        """A worker that dies while rank 0 waits in a collective that never fails (NCCL without a
        timeout firing) would hang the caller: end the process instead."""
        sentinels = [p.sentinel for p in self.procs]
        while not self._closed:
            if not wait_any(sentinels, 1.0) or self._closed:
                continue
            step = self._in_step
            if step:
                time.sleep(HANG_GRACE_S)
                if self._in_step == step and not self._closed:
                    log.critical("a rank died and rank 0 is still waiting on it after %d s: exiting", HANG_GRACE_S)
                    os._exit(70)
            return

    # ------------------------------------------------------------------ shutdown
    def close(self, force: bool = False) -> None:
        """Stop every worker (politely unless `force`) and leave the process group. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if not force:
            try:
                self._send_all(("stop",))
            except ParallelError:
                pass
        for p in self.procs:
            p.join(timeout=0 if force else 10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        for c in self.conns:
            c.close()
        torch.set_num_threads(self._threads)
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:   # noqa: BLE001 - a broken group may not tear down cleanly
                pass


__all__ = ["ParallelRunner", "ParallelError", "StepSender", "StepReceiver"]
