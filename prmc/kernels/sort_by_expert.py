"""Sort by expert: the routed slots grouped by expert (stable), then the unrouted ones, in three launches.

The story
---------
Dispatch needs the ``T * K`` slots (``t * K + k``) sorted by the expert each one chose, with ties kept in
slot order, and the group ends. Through torch (a stable radix sort of narrowed keys, a search for the group
ends, an index_put for the inverse) that is ~0.05 ms of GPU time in ~10 launches at Qwen3-30B-A3B sizes
(65536 slots, 128 experts). The keys are small integers, so a counting sort does it in three launches with
no host sync: the slots are cut into segments; the first kernel counts each segment's slots per expert (a
histogram), the second scans those counts down the segments (per expert: the rows that earlier segments
hold), the third walks each segment in slot order, handing out rows. Each slot's row is known where it is
written, so the inverse permutation (slot -> sorted row), which the combines need to find a token's rows,
comes for free. Measured on an H100 at those sizes: ~6 + ~5 + ~15 us.

Slots whose id is outside ``[0, E)`` are unrouted: they go after every routed slot, in slot order. They
are not counted per segment; a segment's unrouted slots are its length less its routed ones.

Each slot costs O(E) work (a one-hot row), so past ``MAX_EXPERTS`` experts the launcher leaves the job to
the torch path (:func:`prmc.kernels.reference.sort_by_expert`), whose radix sort does not care.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prmc.kernels import reference
from prmc.kernels._triton_common import INTERPRET, LAUNCH_OPTIONS

# 256 experts (DeepSeek-V3) is the most any supported model routes over; past 512 the one-hot per slot
# would cost more than the radix sort.
MAX_EXPERTS = 512


@triton.jit
def _keys(ids_ptr, offs, end, E):
    """(expert of each slot, -1 where unrouted or past ``end``; whether it is an unrouted slot)."""
    valid = offs < end
    ids = tl.load(ids_ptr + offs, mask=valid, other=0)
    # NOTE: compared in the ids' own dtype before narrowing: an int64 id far out of range could wrap into it.
    routed = valid & (ids >= 0) & (ids < E)
    return tl.where(routed, ids.to(tl.int32), -1), valid & ~routed


@triton.jit
def segment_counts_kernel(ids_ptr, seg_counts_ptr, M, E, SEG: tl.constexpr, BLOCK_E: tl.constexpr):
    seg = tl.program_id(0)
    key, _ = _keys(ids_ptr, seg * SEG + tl.arange(0, SEG), M, E)
    # Unrouted slots (and those past M) land in the upper half of the bins, which is not stored.
    counts = tl.histogram(tl.where(key < 0, BLOCK_E, key), 2 * BLOCK_E)
    experts = tl.arange(0, 2 * BLOCK_E)
    tl.store(seg_counts_ptr + seg * BLOCK_E + experts, counts, mask=experts < BLOCK_E)


@triton.jit
def segment_bases_kernel(
    seg_counts_ptr, counts_ptr, E, S, BLOCK_E: tl.constexpr, EXPERTS: tl.constexpr, ROWS: tl.constexpr
):  # fmt: skip
    """One program per EXPERTS experts: seg_counts[s, e] becomes the routed rows of expert e in the segments
    before s (in place), and counts[e] their total."""
    experts = tl.program_id(0) * EXPERTS + tl.arange(0, EXPERTS)
    before = tl.zeros((EXPERTS,), dtype=tl.int32)
    for row0 in range(0, S, ROWS):
        rows = row0 + tl.arange(0, ROWS)
        ptrs = seg_counts_ptr + rows[:, None] * BLOCK_E + experts[None, :]
        tile = tl.load(ptrs, mask=(rows < S)[:, None], other=0)
        inclusive = tl.cumsum(tile, axis=0)
        tl.store(ptrs, inclusive - tile + before[None, :], mask=(rows < S)[:, None])
        before += tl.sum(tile, axis=0)
    tl.store(counts_ptr + experts, before.to(tl.int64), mask=experts < E)


@triton.jit
def scatter_kernel(
    ids_ptr, seg_bases_ptr, counts_ptr, offsets_ptr, order_ptr, inverse_ptr,
    M, E, SEG, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    seg = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + experts, mask=experts < E, other=0).to(tl.int32)
    ends = tl.cumsum(counts, axis=0)
    if seg == 0:
        tl.store(offsets_ptr + experts, ends, mask=experts < E)
    earlier = tl.load(seg_bases_ptr + seg * BLOCK_E + experts)
    next_row = ends - counts + earlier
    start = seg * SEG
    end = tl.minimum(start + SEG, M)
    # Earlier segments are full, so their unrouted slots are their length less their routed ones.
    next_unrouted = tl.sum(counts) + start - tl.sum(earlier)
    for chunk in range(start, end, CHUNK):
        offs = chunk + tl.arange(0, CHUNK)
        key, unrouted = _keys(ids_ptr, offs, end, E)
        hit = key[:, None] == experts[None, :]
        rank = tl.cumsum(hit.to(tl.int32), axis=0)  # inclusive: 1 for an expert's first slot in the chunk
        routed_row = tl.sum(tl.where(hit, rank + next_row[None, :], 0), axis=1) - 1
        unrouted_row = next_unrouted + tl.cumsum(unrouted.to(tl.int32), axis=0) - 1
        row = tl.where(unrouted, unrouted_row, routed_row)
        next_row += tl.sum(hit.to(tl.int32), axis=0)
        next_unrouted += tl.sum(unrouted.to(tl.int32), axis=0)
        valid = offs < end
        tl.store(order_ptr + row, offs.to(tl.int64), mask=valid)
        tl.store(inverse_ptr + offs, row.to(tl.int64), mask=valid)


def blocking(m: int, num_experts: int) -> tuple[int, int, int]:
    """(BLOCK_E, CHUNK, SEG) of ``m`` slots: experts padded to a power of two, slots per step of the
    scatter, slots per segment (a power of two, and a multiple of CHUNK)."""
    block_e = triton.next_power_of_2(num_experts)
    if INTERPRET:
        # Small, so that the tests' few dozen slots still span several chunks and segments.
        chunk, max_segs = 8, 4
    else:
        # Measured on an H100 (65536 slots; 64, 128, 256 experts): the scatter at 12-19 us with a one-hot of
        # up to 32K int32 per step (at most 128 slots) and 256 segments; fewer segments leave SMs idle, more
        # lengthen the scan of the counts.
        chunk, max_segs = max(2, min(128, 32768 // block_e)), 256
    # A segment is one histogram: at most 64K slots (more segments past 16M slots).
    seg = min(max(chunk, triton.next_power_of_2(triton.cdiv(m, max_segs))), 65536)
    return block_e, chunk, seg


def sort_by_expert(
    expert_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route table -> expert-sorted order, stable; ids outside ``[0, num_experts)`` are unrouted.

    ``expert_ids`` [T, K] (any shape, read flat) of an integer dtype, ``num_experts`` E >= 1. Returns
    ``order`` [T*K] int64 (the routed slots ``t * K + k`` by expert then slot, then the unrouted slots),
    ``counts`` [E] int64 (routed rows per expert), ``offsets`` [E] int32 (their inclusive cumulative sum,
    the end row of each group) and ``inverse`` [T*K] int64 (``inverse[order[r]] = r``).
    """
    ids = expert_ids.reshape(-1).contiguous()
    m = ids.shape[0]
    if num_experts > MAX_EXPERTS or m >= 2**31:  # slots are indexed in int32
        return reference.sort_by_expert(expert_ids, num_experts)
    order = torch.empty(m, device=ids.device, dtype=torch.int64)
    inverse = torch.empty_like(order)
    if m == 0:
        counts = torch.zeros(num_experts, device=ids.device, dtype=torch.int64)
        return order, counts, counts.to(torch.int32), inverse
    counts = torch.empty(num_experts, device=ids.device, dtype=torch.int64)
    offsets = torch.empty(num_experts, device=ids.device, dtype=torch.int32)
    block_e, chunk, seg = blocking(m, num_experts)
    segs = triton.cdiv(m, seg)
    seg_counts = torch.empty(segs, block_e, device=ids.device, dtype=torch.int32)
    warps = 1 if INTERPRET else 4
    segment_counts_kernel[(segs,)](
        ids, seg_counts, m, num_experts, SEG=seg, BLOCK_E=block_e, num_warps=warps, **LAUNCH_OPTIONS
    )  # fmt: skip
    experts = min(block_e, 16)
    rows = min(triton.next_power_of_2(segs), 4096 // experts)
    segment_bases_kernel[(block_e // experts,)](
        seg_counts, counts, num_experts, segs, BLOCK_E=block_e, EXPERTS=experts, ROWS=rows, num_warps=warps,
        **LAUNCH_OPTIONS,
    )  # fmt: skip
    scatter_kernel[(segs,)](
        ids, seg_counts, counts, offsets, order, inverse, m, num_experts, seg,
        BLOCK_E=block_e, CHUNK=chunk, num_warps=warps, **LAUNCH_OPTIONS,
    )  # fmt: skip
    return order, counts, offsets, inverse


if __name__ == "__main__":
    # Check against the torch path (reference) + benchmark at Qwen3-30B-A3B sizes (8192 tokens, top-8, 128 experts).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(8192, 8, 128), (4096, 8, 256), (8192, 1, 1)] if device == "cuda" else [(37, 3, 5), (29, 2, 1)]
    for tokens, top_k, experts in shapes:
        # a few slots unrouted, on both sides of the range
        ids = torch.randint(-(experts // 50) - 1, experts + experts // 50 + 1, (tokens, top_k), device=device)
        got, expected = sort_by_expert(ids, experts), reference.sort_by_expert(ids, experts)
        exact = all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got, expected))
        print(f"sort_by_expert {tokens}x{top_k}, {experts} experts: {'exact' if exact else 'MISMATCH'}")
    if device == "cuda":
        ids = torch.randint(0, 128, (8192, 8), device=device)
        for name, fn in [("triton", sort_by_expert), ("torch", reference.sort_by_expert)]:
            ms = triton.testing.do_bench(lambda fn=fn: fn(ids, 128), return_mode="median")
            print(f"{name}: {ms:.4f} ms")
