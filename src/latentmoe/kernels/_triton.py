"""Whether Triton can run here, and on which tensors: compiled on CUDA, interpreted on CPU under TRITON_INTERPRET=1.
Also what every kernel module shares: output buffers (NaN-poisoned on request) and the multiprocessor count."""
import contextlib
import contextvars
import functools
import os

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - Triton ships with CUDA builds of torch; only odd installs lack it
    import types
    triton = None
    tl = types.SimpleNamespace(constexpr=None)  # lets kernel signatures be defined (never launched)
    HAS_TRITON = False

# Read once, at import: triton.jit decides at decoration time whether a kernel is interpreted.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


_POISON = contextvars.ContextVar("latentmoe_kernels_poison", default=False)


@contextlib.contextmanager
def poisoned_outputs():
    """Within the block, every buffer a kernel must write starts filled with NaN (-1 for integers), so an
    element a kernel leaves unwritten shows up in the result (the kernel tests run inside this)."""
    token = _POISON.set(True)
    try:
        yield
    finally:
        _POISON.reset(token)


def new_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for a kernel's output, or NaN/-1-filled inside `poisoned_outputs()`."""
    if _POISON.get():
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and (t.is_cuda or (INTERPRET and t.device.type == "cpu"))


def _index(device: torch.device) -> int:
    """A CUDA device's index (the current device for a bare "cuda")."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _major(index: int) -> int:
    """The compute capability's major version of CUDA device `index` (9: Hopper, 10: Blackwell)."""
    return torch.cuda.get_device_capability(index)[0]


def sm_count(device: torch.device) -> int:
    """Multiprocessors of the device (a nominal 8 for the CPU interpreter)."""
    if device.type != "cuda":
        return 8
    return _sm_count(_index(device))


def jit(fn=None, *, do_not_specialize=()):
    """triton.jit where Triton exists; the plain function otherwise (never launched then).

    `do_not_specialize` names integer arguments that vary from call to call (a token count): Triton would
    otherwise compile a variant for the values 1 and multiples of 16, which the engine's start-up cannot
    know it must warm."""
    if fn is None:
        return lambda f: jit(f, do_not_specialize=do_not_specialize)
    if not HAS_TRITON:
        return fn
    return triton.jit(fn, do_not_specialize=list(do_not_specialize)) if do_not_specialize else triton.jit(fn)


def _pdl_in_triton() -> bool:
    """This Triton launches with programmatic dependent launch (the `launch_pdl` option) and has gdc_wait."""
    if not HAS_TRITON or INTERPRET:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra import cuda as cuda_lang
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {}) and hasattr(cuda_lang, "gdc_wait")


_PDL_IN_TRITON = _pdl_in_triton()
if _PDL_IN_TRITON:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
else:   # never traced: the kernels only call them under PDL=True, which pdl_launch never asks for here
    gdc_launch_dependents = gdc_wait = None


def pdl_launch(t: torch.Tensor) -> dict:
    """Launch options for a kernel on t's device that calls `wait_for_inputs(PDL)` before it reads anything an
    earlier kernel wrote: {"PDL": True, "launch_pdl": True} on sm90+ with a Triton that has programmatic
    dependent launch, else {"PDL": False}.

    Why: a batch-1 decode step is a chain of ~500 kernels of a few microseconds, and each one's launch,
    rasterisation and first loads otherwise start only when the previous kernel has fully drained. Launched
    this way a kernel's programs may start while the previous kernel finishes (CUDA graphs keep the
    dependency), load what does not depend on it (weights), and wait at `wait_for_inputs`.

    Measured on an H200 (V2-Lite shape, batch-1 decode, both engines in one process): bf16 3.05-3.21 ms a
    step against 3.26-3.32 without; with FP8 weights then 3.13 against 2.96, so the kernels that dequantise FP8
    weights launched without it. Letting the next kernel launch only at exit (no early trigger) measured the
    same as off. Again for the bf16 routed-expert kernels alone (H100, same process): batch 1 2.82 ms a step
    with it against 2.97 without. Since 2026-12-07 the FP8 weight-only MoE kernels over the few-token layout
    launch with it too (H100, FP8 engines in one process: B=1 at 1K 2.18 against 2.42 ms a step; the note in
    fp8_moe.py), while the few-row kernel over FP8 weights (skinny.py) still launches without: launching it with
    it as well, after that change, measured slower on either stream (H100, FP8 engines in one process, two
    rounds, B=1 at 1K / B=1 at 32K: without 2.175-2.176 / 2.679-2.689 ms a step; with it on the main stream
    only, for o_proj and q / kv_a, 2.255-2.258 / 2.823-2.836; on the shared experts' side stream only
    2.262-2.263 / 2.764-2.774; on both 2.340-2.356 / 2.933-2.945; B=2 within 0.5% throughout)."""
    on = t.is_cuda and _PDL_IN_TRITON and _major(_index(t.device)) >= 9
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@jit
def wait_for_inputs(PDL: tl.constexpr):
    """Under programmatic dependent launch: let the next kernel's programs start launching, then wait until
    the previous kernel has finished and its writes are visible. Every program of a kernel launched with
    `pdl_launch` calls it before its first load of an earlier kernel's output and before its first store
    (so the chain stays ordered: a kernel finishes only after the one before it has). A no-op otherwise."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


try:   # host-side tensor descriptors (TMA boxes on sm90+; the interpreter emulates them)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - Triton before 3.4
    TensorDescriptor = None


def tensor_descriptor(t: torch.Tensor, shape: list[int], strides: list[int], block: list[int]):
    """A TMA descriptor over t viewed as `shape`/`strides` (elements), loading `block` boxes (out-of-range
    elements read as zeros), or None where the kernels must use pointer loads instead: no descriptor
    support in this Triton, a GPU without the tensor memory accelerator (sm90/sm100 only: the boxes'
    shared-memory stages are sized for them), or strides/base not 16-byte aligned. Under the interpreter
    a descriptor is returned, so the CPU tests run the same kernel code."""
    if TensorDescriptor is None or strides[-1] != 1:
        return None
    if t.is_cuda:
        if _major(_index(t.device)) not in (9, 10):
            return None
    elif not INTERPRET:
        return None
    size = t.element_size()
    if t.data_ptr() % 16 or any(s * size % 16 for s in strides[:-1]):
        return None
    return TensorDescriptor(t, shape, strides, block)


@jit
def dot(a, b, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation; UPCAST feeds it fp32 operands (the CPU interpreter's bf16 dot is wrong).
    fp32 operands multiply in full fp32 ("ieee"), not tf32: an fp32 engine is the exact mode."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@jit
def dot_acc(a, b, acc, UPCAST: tl.constexpr):
    """acc + a . b, the dot accumulating into acc in place (operands as in `dot`)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@jit
def cast(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """x (fp32) in `dtype`, rounded to nearest even like torch. The GPU's cast is used as is; Triton's CPU
    interpreter truncates fp32 -> bf16, so there x is first rounded onto the bf16 grid in its bits (kept
    exactly by the cast). Where a kernel must equal torch bit for bit, it casts through this."""
    if INTERPRETED:
        if dtype == tl.bfloat16:
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


_COMPILATIONS = [0]


def _count_compilation(*args, **kwargs):
    _COMPILATIONS[0] += 1
    return None   # never skip the compilation


def compilations() -> int:
    """Triton kernels compiled (or loaded from Triton's disk cache) in this process since the first call.

    Counted by Triton's own JIT hook, installed on the first call (an engine calls it before warming
    up): the engine reports how many happen after it said it was ready, which should be none."""
    if not HAS_TRITON or INTERPRET:
        return _COMPILATIONS[0]
    runtime = triton.knobs.runtime
    previous = runtime.jit_cache_hook
    if previous is not _count_compilation and not getattr(previous, "_latentmoe_counts", False):
        def hook(*args, **kwargs):
            _count_compilation()
            return previous(*args, **kwargs) if previous else None
        hook._latentmoe_counts = True
        runtime.jit_cache_hook = hook if previous else _count_compilation
    return _COMPILATIONS[0]
