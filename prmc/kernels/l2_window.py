"""Keeping one tensor in L2 for a kernel launch: the stream's access-policy window (persisting lines).

Why: the combined row products (``gluon_gemm.grouped_gemm(..., combine=...)``: the down forward and the gate_up grad_x)
add each routed row into its token's row of the [T, H] output by reductions in L2. A token's top_k rows come from
different experts, so its row is touched top_k times across the launch while the operands (h and w_down: 402 MB on
OLMoE at 8192 tokens) stream through the 50 MB L2, and the output (33.5 MB) is evicted and fetched again between
those additions: ncu counted 814-880 MB of DRAM traffic for OLMoE's down forward, whose operands are 405 MB (v52,
v53, ``benchmarks/KERNELS_NOTES.md``). With the output's lines persisting for the launch it moves 522 MB and runs in
0.54 (burst) / 0.61 (steady, at the power cap) of the time; grad_x in 0.84 / 0.88; OLMoE's layer step (fwd+bwd) at
the cap went from 6.43 to 5.87 ms (H100, v53, at hit ratio 1; the ratio below gives those layers ~0.98).

How, through the CUDA driver API (libcuda, which every CUDA process has loaded; torch may link the runtime
statically, so its ``cudaStreamSetAttribute`` is not reachable):

- once per device, the persisting set-aside (``CU_LIMIT_PERSISTING_L2_CACHE_SIZE``) at the device's maximum (31.2 MiB
  of an H100's 50). Normal and streaming accesses use it while no persisting lines hold it.
- around the launch, the current stream's ``CU_STREAM_ATTRIBUTE_ACCESS_POLICY_WINDOW`` over the tensor: hits
  persisting, misses streaming, hit ratio ``set-aside / bytes`` capped at 1 (the CUDA guide's rule, so that a window
  larger than the set-aside does not make its own lines evict each other). After it, the window is cleared and the
  persisting lines are made normal again (``cuCtxResetPersistingL2Cache``) for the kernels that follow.

Where it does nothing: off CUDA, on a device without a persisting set-aside, and while the stream is being captured
(CUDA graphs: the reset is not a stream operation, so it cannot be replayed in order).
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

import torch

CU_LIMIT_PERSISTING_L2_CACHE_SIZE = 0x06
CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE = 108
CU_DEVICE_ATTRIBUTE_MAX_ACCESS_POLICY_WINDOW_SIZE = 109
CU_STREAM_ATTRIBUTE_ACCESS_POLICY_WINDOW = 1
CU_ACCESS_PROPERTY_NORMAL, CU_ACCESS_PROPERTY_STREAMING, CU_ACCESS_PROPERTY_PERSISTING = 0, 1, 2


class AccessPolicyWindow(ctypes.Structure):
    """``CUaccessPolicyWindow`` (cuda.h)."""

    _fields_ = [
        ("base_ptr", ctypes.c_void_p),
        ("num_bytes", ctypes.c_size_t),
        ("hitRatio", ctypes.c_float),
        ("hitProp", ctypes.c_int),
        ("missProp", ctypes.c_int),
    ]


class StreamAttrValue(ctypes.Union):
    """``CUstreamAttrValue`` (= ``CUlaunchAttributeValue``, a 64-byte union); only its window is used here."""

    _fields_ = [("accessPolicyWindow", AccessPolicyWindow), ("pad", ctypes.c_char * 64)]


def hit_ratio(num_bytes: int, set_aside: int) -> float:
    """The share of a window's lines given the persisting property: all of them where they fit in the set-aside,
    else as many as fit."""
    return min(1.0, set_aside / num_bytes)


class _Driver:
    """libcuda's calls, each checked; a failure names the call and its CUresult."""

    def __init__(self):
        self.lib = ctypes.CDLL("libcuda.so.1")

    def __call__(self, name: str, *args) -> None:
        err = getattr(self.lib, name)(*args)
        if err != 0:
            raise RuntimeError(f"prmc: the CUDA driver call {name} failed with CUresult {err}")


_driver: _Driver | None = None
_limits: dict[int, tuple[int, int]] = {}  # device index -> (persisting set-aside, largest window), both in bytes


def _device_limits(device: torch.device) -> tuple[int, int]:
    """The device's persisting set-aside, raised to its maximum on first use, and its largest window (bytes); called
    with the device's primary context current."""
    global _driver
    index = device.index
    if index not in _limits:
        if _driver is None:
            _driver = _Driver()
        dev, value = ctypes.c_int(), ctypes.c_int()
        _driver("cuCtxGetDevice", ctypes.byref(dev))
        _driver("cuDeviceGetAttribute", ctypes.byref(value), CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE, dev)
        set_aside = value.value
        _driver("cuDeviceGetAttribute", ctypes.byref(value), CU_DEVICE_ATTRIBUTE_MAX_ACCESS_POLICY_WINDOW_SIZE, dev)
        if set_aside > 0:
            _driver("cuCtxSetLimit", CU_LIMIT_PERSISTING_L2_CACHE_SIZE, ctypes.c_size_t(set_aside))
        _limits[index] = (set_aside, value.value)
    return _limits[index]


def _set_window(stream: torch.cuda.Stream, window: AccessPolicyWindow) -> None:
    value = StreamAttrValue()
    value.accessPolicyWindow = window
    handle = ctypes.c_void_p(stream.cuda_stream)
    _driver("cuStreamSetAttribute", handle, CU_STREAM_ATTRIBUTE_ACCESS_POLICY_WINDOW, ctypes.byref(value))


@contextlib.contextmanager
def persisting(t: torch.Tensor) -> Iterator[None]:
    """Kernels launched inside on the current stream keep ``t``'s lines (``t`` contiguous) in L2, as many as the
    set-aside holds; on leaving, the window is cleared and persisting lines are normal again. Does nothing where the
    module docstring says."""
    if not t.is_contiguous():
        raise ValueError(f"prmc: an L2 window covers one contiguous range; got a tensor of strides {t.stride()}")
    if t.device.type != "cuda" or t.numel() == 0:
        yield
        return
    with torch.cuda.device(t.device):
        set_aside, largest = (0, 0) if torch.cuda.is_current_stream_capturing() else _device_limits(t.device)
        if set_aside == 0:
            yield
            return
        stream = torch.cuda.current_stream(t.device)
        num_bytes = min(t.numel() * t.element_size(), largest)
        _set_window(stream, AccessPolicyWindow(
            t.data_ptr(), num_bytes, hit_ratio(num_bytes, set_aside), CU_ACCESS_PROPERTY_PERSISTING,
            CU_ACCESS_PROPERTY_STREAMING,
        ))  # fmt: skip
        try:
            yield
        finally:
            _set_window(stream, AccessPolicyWindow(None, 0, 0.0, CU_ACCESS_PROPERTY_NORMAL, CU_ACCESS_PROPERTY_NORMAL))
            _driver("cuCtxResetPersistingL2Cache")
