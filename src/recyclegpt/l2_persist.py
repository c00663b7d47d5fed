"""Keep the recyclable module's weights in the GPU's L2 cache across decode steps (CUDA graphs only; off by default).

A recycle step streams the base's weights (270 MB for SmolLM2) through the 50 MB L2 of an H100 and then runs the
module: its layers, its input product and its head over the draft vocabulary (34 MB in all for the shipped module),
which by then come from HBM again. Devices of compute capability 8.0 and up can set part of L2 aside for
"persisting" accesses to one address window a kernel launch names (the CUDA programming guide's "L2 cache
control"): lines of the window stay in that part while other traffic streams past them.

`pin_module` moves the module's floating-point tensors and the draft head (`RecycleModel.draft_weight`) into one
contiguous buffer (the same values; parameters and buffers are rebound to views, and views into one storage, as
`fuse_projections` makes them, stay views into one), and sets the L2 aside for it. `apply_window` names that window
on every kernel node of a captured graph before it is instantiated (`torch.cuda.CUDAGraph(keep_graph=True)`), so that
the setting travels with the graph. Neither changes any value a kernel computes: tokens are the same with and
without (tested on CUDA).

The driver calls go through ctypes to libcuda, which every CUDA build of torch loads; nothing here runs without CUDA.

Measured on an H100 (sixteenth session, `gpu_step_profile.py --l2-persist`, docs/engine.md): SmolLM2's recycle step
0.612 -> 0.621 ms with the window, the standard step unchanged. So `engine.L2_PERSIST` stays off; the module is kept
for the A/B and for wider modules, where more of a step's time is weight traffic.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch
from torch import nn

ALIGN = 256  # bytes: each moved storage starts at a multiple of this in the buffer

_CU_LIMIT_PERSISTING_L2_CACHE_SIZE = 0x06
_CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE = 108
_CU_DEVICE_ATTRIBUTE_MAX_ACCESS_POLICY_WINDOW_SIZE = 109
_CU_LAUNCH_ATTRIBUTE_ACCESS_POLICY_WINDOW = 1
_CU_GRAPH_NODE_TYPE_KERNEL = 0
_CU_ACCESS_PROPERTY_STREAMING, _CU_ACCESS_PROPERTY_PERSISTING = 1, 2


class Window(NamedTuple):
    """The address window kernels are told to keep in L2, and the share of its lines that may persist (the L2 set
    aside over the window's size, at most 1)."""
    ptr: int
    nbytes: int
    hit_ratio: float


class _AccessPolicyWindow(ctypes.Structure):
    _fields_ = [("base_ptr", ctypes.c_void_p), ("num_bytes", ctypes.c_size_t), ("hitRatio", ctypes.c_float),
                ("hitProp", ctypes.c_int), ("missProp", ctypes.c_int)]


class _LaunchAttributeValue(ctypes.Union):  # CUlaunchAttributeValue: 64 bytes
    _fields_ = [("accessPolicyWindow", _AccessPolicyWindow), ("pad", ctypes.c_char * 64)]


_libcuda = None


def _driver():
    global _libcuda
    if _libcuda is None:
        try:
            _libcuda = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise RuntimeError(f"L2 persistence needs the CUDA driver library libcuda.so.1: {e}") from None
    return _libcuda


def _check(result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"L2 persistence: {what} failed with CUDA driver error {result}")


def device_limits(device: torch.device) -> tuple[int, int]:
    """(the most L2 that may be set aside for persisting accesses, the largest window), in bytes."""
    cu = _driver()
    torch.cuda.init()
    with torch.cuda.device(device):
        torch.cuda.current_stream(device)  # the primary context is current on this thread from here on
        dev = ctypes.c_int()
        _check(cu.cuCtxGetDevice(ctypes.byref(dev)), "cuCtxGetDevice")
        out = []
        for attr in (_CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE, _CU_DEVICE_ATTRIBUTE_MAX_ACCESS_POLICY_WINDOW_SIZE):
            v = ctypes.c_int()
            _check(cu.cuDeviceGetAttribute(ctypes.byref(v), attr, dev), "cuDeviceGetAttribute")
            out.append(v.value)
    return out[0], out[1]


def gather(tensors: dict[tuple[nn.Module, str], torch.Tensor]) -> torch.Tensor:
    """Copy the storages behind `tensors` ({(owner, parameter or buffer name): tensor}, one device) into one uint8
    buffer and rebind each to the same view of its new place (a Parameter keeps its identity: its .data moves).
    Tensors that share a storage share it again afterwards. Returns the buffer."""
    groups: dict[int, tuple[torch.UntypedStorage, list]] = {}
    for key, t in tensors.items():
        s = t.untyped_storage()
        groups.setdefault(s.data_ptr(), (s, []))[1].append((key, t))
    offsets, total = {}, 0
    for ptr, (s, _) in groups.items():
        offsets[ptr] = total
        total += -(-s.nbytes() // ALIGN) * ALIGN
    device = next(iter(tensors.values())).device
    buf = torch.empty(total, dtype=torch.uint8, device=device)
    for ptr, (s, members) in groups.items():
        start = offsets[ptr]
        old = torch.empty(0, dtype=torch.uint8, device=device).set_(s)
        buf[start:start + s.nbytes()].copy_(old)
        for (owner, name), t in members:
            assert start % t.element_size() == 0
            # as_strided's offset counts from the start of buf's storage, in elements of t's dtype
            new = buf.view(t.dtype).as_strided(t.shape, t.stride(), start // t.element_size() + t.storage_offset())
            if name in owner._parameters:
                owner._parameters[name].data = new
            else:  # a buffer (draft_weight is one too)
                owner._buffers[name] = new
    return buf


def module_tensors(model) -> dict[tuple[nn.Module, str], torch.Tensor]:
    """The floating-point parameters and buffers of `model.module`, and `model.draft_weight` when set."""
    found = {}
    for owner in model.module.modules():
        for name, t in [*owner._parameters.items(), *owner._buffers.items()]:
            if t is not None and t.is_floating_point():
                found[(owner, name)] = t
    if model.draft_weight is not None:
        found[(model, "draft_weight")] = model.draft_weight
    return found


def pin_module(model) -> Window:
    """Move the module's weights (and the draft head) into one buffer and set L2 aside for it (once a model: a
    second call finds the buffer and returns its window). CUDA only."""
    tensors = module_tensors(model)
    buf = getattr(model, "_l2_buffer", None)
    if buf is None or not _all_inside(tensors.values(), buf):
        # graphs captured before this move read the old storages: keep them alive (a copy of the module's weights)
        model._l2_previous = [*getattr(model, "_l2_previous", []), *{t.untyped_storage() for t in tensors.values()}]
        buf = gather(tensors)
        model._l2_buffer = buf
    max_persist, max_window = device_limits(buf.device)
    nbytes = min(buf.numel(), max_window)
    set_aside = min(max_persist, nbytes)
    if set_aside <= 0:
        raise RuntimeError(f"this device sets no L2 aside for persisting accesses ({torch.cuda.get_device_name()})")
    with torch.cuda.device(buf.device):
        _check(_driver().cuCtxSetLimit(_CU_LIMIT_PERSISTING_L2_CACHE_SIZE, ctypes.c_size_t(set_aside)),
               "cuCtxSetLimit(persisting L2 size)")
    return Window(buf.data_ptr(), nbytes, min(1.0, set_aside / nbytes))


def _all_inside(tensors, buf: torch.Tensor) -> bool:
    lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel()
    return all(lo <= t.data_ptr() < hi for t in tensors)


def apply_window(graph: torch.cuda.CUDAGraph, window: Window) -> int:
    """Name `window` as persisting on every kernel node of `graph` (captured with keep_graph=True, not yet
    instantiated). Returns the number of kernel nodes set."""
    cu = _driver()
    g = ctypes.c_void_p(graph.raw_cuda_graph())
    n = ctypes.c_size_t(0)
    _check(cu.cuGraphGetNodes(g, None, ctypes.byref(n)), "cuGraphGetNodes")
    nodes = (ctypes.c_void_p * n.value)()
    _check(cu.cuGraphGetNodes(g, nodes, ctypes.byref(n)), "cuGraphGetNodes")
    value = _LaunchAttributeValue()
    value.accessPolicyWindow = _AccessPolicyWindow(window.ptr, window.nbytes, window.hit_ratio,
                                                   _CU_ACCESS_PROPERTY_PERSISTING, _CU_ACCESS_PROPERTY_STREAMING)
    kinds, count = ctypes.c_int(), 0
    for node in nodes:
        _check(cu.cuGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(kinds)), "cuGraphNodeGetType")
        if kinds.value == _CU_GRAPH_NODE_TYPE_KERNEL:
            _check(cu.cuGraphKernelNodeSetAttribute(ctypes.c_void_p(node), _CU_LAUNCH_ATTRIBUTE_ACCESS_POLICY_WINDOW,
                                                    ctypes.byref(value)), "cuGraphKernelNodeSetAttribute")
            count += 1
    return count
