"""Pieces the prmc Triton kernels share: activations, the dot they all use, the tile order, configs.

Everything here is either a ``@triton.jit`` helper (inlined into the kernels that call it) or a small
host-side helper for launching. Nothing here launches a kernel.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# NOTE: read once at import, like Triton itself does for the kernels defined below.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The dtypes the kernels take; anything else (fp64 gradcheck, mixed dtypes) runs the reference.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Compile options every prmc launch passes. FP fusion (a * b + c rounded once, one FMA) is what the kernels were
# measured and checked with; left to Triton's default, 3.9 warns at the first compile and 3.10 turns it off.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def num_programs(device: torch.device) -> int:
    """Programs of a persistent launch: one per multiprocessor (a few under the interpreter, which runs
    them one after another, so that the tile loop still hands several tiles to each program)."""
    if INTERPRET:
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count


def fp32_dot(dtype: torch.dtype) -> bool:
    """Whether the kernels multiply in exact fp32 (``input_precision="ieee"``).

    fp32 inputs: tf32 would cost ~3e-4 relative error, more than the fp32 tests allow. Under the CPU
    interpreter too, because Triton 3.9's interpreter returns garbage for ``tl.dot`` on bf16 operands.
    """
    return dtype == torch.float32 or INTERPRET


def gemm_configs(block_m: str, block_n: str, widest_n: bool = True) -> list[triton.Config]:
    """A short Hopper list (each config costs a compile and a benchmark the first time a shape is seen,
    and the pick is kept on disk: see ``AUTOTUNE``).

    ``block_m``/``block_n`` name the kernel's tile parameters. ``widest_n`` adds a 128x256 tile, which
    only kernels with a single accumulator can hold in registers.
    """
    if INTERPRET:
        config = {block_m: 16, block_n: 16, "BLOCK_K": 16, "GROUP": 2}
        return [triton.Config(config, num_warps=1, num_stages=1)]
    # 128x128 with 4 stages: the gated gate_up forward at Qwen3-30B-A3B sizes 0.82 ms vs 0.87 with 3 (H100,
    # benchmarks/KERNELS_NOTES.md, v5 sweep); BLOCK_K 128 or 32, other GROUPs and 4-warp tiles were slower.
    shapes = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]
    if widest_n:
        shapes.append((128, 256, 64, 8, 3))
    return [
        triton.Config({block_m: bm, block_n: bn, "BLOCK_K": bk, "GROUP": 8}, num_warps=warps, num_stages=stages)
        for bm, bn, bk, warps, stages in shapes
    ]


# ``triton.autotune`` options every autotuned prmc kernel passes. ``cache_results``: the timings of a shape's first
# tuning are written to Triton's cache directory (keyed by the kernel's source, the GPU, Triton's version, the tuning
# key and the configs), so a later process launches the same pick without compiling and timing every config again,
# and two runs of a benchmark time the same tiles. Triton keeps no timings of a config with a ``pre_hook``, so the
# kernels make their TMA descriptors on the device (``descriptor_workspace``) instead of setting a host descriptor's
# block in a pre-hook. The interpreter never caches.
AUTOTUNE = {"cache_results": True}


def descriptor_workspace(device: torch.device) -> None:
    """Before a launch that makes TMA descriptors on the device (``tl.make_tensor_descriptor``): Triton asks
    for their workspace at launch through ``triton.set_allocator``. The allocator is per thread (a ContextVar),
    and the backward runs on autograd's thread, so this is called on every such launch, as Inductor's launcher
    does."""
    triton.set_allocator(functools.partial(_workspace, device=device))


def _workspace(size: int, alignment: int, stream: int | None, *, device: torch.device) -> torch.Tensor:
    """Triton's allocator protocol: ``size`` bytes for the kernel's descriptors (the caching allocator's
    blocks are 512-byte aligned, past the 128 bytes a descriptor needs)."""
    return torch.empty(size, dtype=torch.int8, device=device)


@functools.cache
def capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA device's compute capability, looked up once per device (the launchers ask on every call);
    None off CUDA."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _has_tma(device: torch.device) -> bool:
    """Hopper-class GPUs (sm90 on) have TMA; the interpreter emulates descriptors."""
    return INTERPRET or (capability(device) or (0, 0)) >= (9, 0)


def tma_reads(t: torch.Tensor) -> bool:
    """Whether the GEMM kernels can read ``t`` (an operand they do not gather) through TMA: a device with TMA,
    unit stride last, base and other strides 16-byte aligned."""
    aligned = t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
    return _has_tma(t.device) and t.stride(-1) == 1 and aligned


@triton.jit
def mma(a, b, acc, FP32_DOT: tl.constexpr):
    """``acc += a @ b`` with fp32 accumulation; exact fp32 products when ``FP32_DOT``."""
    if FP32_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def load_tile(ptrs, row_ok, col_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a 2-D tile, masking only the dimensions that can run out (masks cost vector width and
    instructions in the main loop). Masks, never clamped indices, on the contiguous dimension: a
    ``tl.where`` there hides the contiguity from Triton's analysis and turns 16-byte loads into 2-byte
    ones (measured 10x slower, see benchmarks/KERNELS_NOTES.md)."""
    if CHECK_ROWS and CHECK_COLS:
        tile = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif CHECK_COLS:
        tile = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def swizzle(tile, num_m, num_n, GROUP: tl.constexpr):
    """Tile index -> (m, n) visiting GROUP rows of tiles column by column, so that the programs running
    at one time share a few A row-blocks and a few B column-blocks in L2 instead of sweeping all of B."""
    tiles_per_band = GROUP * num_n
    band = tile // tiles_per_band
    first_m = band * GROUP
    band_rows = tl.minimum(num_m - first_m, GROUP)
    in_band = tile % tiles_per_band
    return first_m + in_band % band_rows, in_band // band_rows


@triton.jit
def group_start(offsets_ptr, e):
    """First row of group ``e``: offsets hold the group ends, so the start is the previous end."""
    return tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def activation(x, ACTIVATION: tl.constexpr):
    """act(x) in fp32; the same closed forms as ``reference._act`` (tanh through the sigmoid, which
    every Triton backend and the interpreter have)."""
    if ACTIVATION == "silu":
        y = x * _sigmoid(x)
    elif ACTIVATION == "gelu":
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        t = 2.0 * _sigmoid(2.0 * 0.7978845608028654 * (x + 0.044715 * x * x * x)) - 1.0
        y = 0.5 * x * (1.0 + t)
    else:
        y = tl.maximum(x, 0.0)
    return y


@triton.jit
def activation_grad(x, ACTIVATION: tl.constexpr):
    """d act(x) / dx in fp32, the closed forms of ``reference._act_grad``."""
    if ACTIVATION == "silu":
        s = _sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    elif ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        d = cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACTIVATION == "gelu_tanh":
        c = 0.7978845608028654
        t = 2.0 * _sigmoid(2.0 * c * (x + 0.044715 * x * x * x)) - 1.0
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
    else:
        d = tl.where(x > 0, 1.0, 0.0)
    return d
