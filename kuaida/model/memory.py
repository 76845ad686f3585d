"""Memory that the CPU kernels stream, on transparent huge pages (Linux).

A decode step streams every quantized weight (~140 MB for the default model in int8) and every active
conversation's keys and values (~90 MB at 8 streams of ~840 tokens). With 4 KiB pages that is one TLB miss
and page walk per 4 KiB read; with 2 MiB pages, one per 2 MiB. Linux backs a region with huge pages when it
is asked to (madvise(MADV_HUGEPAGE), the default "madvise" mode of transparent huge pages) before its pages
are first touched. Measured (Zen 4, 2 threads, benchmarks/results/kernels.md): decode attention 7-10 %
faster, the int8 weights' matmuls ~5 %.

Where huge pages are unavailable (another OS, THP "never", KUAIDA_NO_HUGE_PAGES=1, a failed madvise) the
same tensors come from ordinary memory: results never depend on it.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys

import torch
from torch import nn

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20  # bytes: x86-64's transparent huge page
MADV_HUGEPAGE = 14
_ALIGN = 64  # bytes between tensors packed into one arena: a cache line


@functools.cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def enabled() -> bool:
    """Linux with madvise, and KUAIDA_NO_HUGE_PAGES is not 1 (read on every call)."""
    return os.environ.get("KUAIDA_NO_HUGE_PAGES") != "1" and _madvise() is not None


def huge_empty(nbytes: int) -> tuple[torch.Tensor, bool]:
    """An uninitialized uint8 tensor of `nbytes`, and whether its whole 2 MiB pages were advised to be
    huge. Its memory must not have been touched yet for the advice to take effect at the first touch:
    large allocations are fresh mappings, so write it only after this returns."""
    if nbytes < HUGE_PAGE or not enabled():
        return torch.empty(nbytes, dtype=torch.uint8), False
    buf = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    addr = buf.data_ptr()
    skip = -addr % HUGE_PAGE  # to the first 2 MiB boundary
    ok = _madvise()(addr + skip, nbytes // HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE) == 0
    if not ok:
        log.debug("madvise(MADV_HUGEPAGE) failed (errno %d): 4 KiB pages", ctypes.get_errno())
    return buf[skip:skip + nbytes], ok


def huge_zeros(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros(shape, dtype=dtype) on huge pages where available (see the module docstring)."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    raw, _ = huge_empty(nbytes)
    return raw.view(dtype).view(shape).zero_()


def buffers_on_huge_pages(model: nn.Module) -> nn.Module:
    """Move the model's CPU buffers (a quantized layer's weights and scales: what each decode step streams)
    into one arena on huge pages, in place; values and module structure unchanged. Parameters (fp32
    weights, the embedding table) stay where they are. For a final inference model: the buffers become views
    of one storage, which serialization of shared storage (safetensors) refuses."""
    found = [(module, name, t) for module in model.modules() for name, t in module._buffers.items()
             if t is not None and t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad]
    sizes = [(t.numel() * t.element_size() + _ALIGN - 1) // _ALIGN * _ALIGN for _, _, t in found]
    if sum(sizes) < HUGE_PAGE or not enabled():
        return model
    arena, ok = huge_empty(sum(sizes))
    offset = 0
    for (module, name, t), size in zip(found, sizes):
        view = arena[offset:offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        module._buffers[name] = view.copy_(t)
        offset += size
    log.info("%d buffers (%.0f MB) in one arena%s", len(found), sum(sizes) / 1e6,
             " on huge pages" if ok else " (huge pages refused)")
    return model
