"""Transparent huge pages for large CPU buffers (Linux), asked for with madvise(MADV_HUGEPAGE).

Most distributions run THP in "madvise" mode: a process gets 2 MiB pages only where it asks. Asking costs
nothing and is ignored where THP is off or on other systems.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

HUGE_PAGE_BYTES = 2 << 20
_MADV_HUGEPAGE = 14


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask for huge pages under the 2 MiB-aligned part of `tensor`'s memory; call it before the memory
    is first written (pages already touched stay small). Returns whether the kernel accepted."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu":
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES, end // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if last <= first:
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(first, last - first, _MADV_HUGEPAGE) == 0
