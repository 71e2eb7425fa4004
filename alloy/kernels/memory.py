"""Memory that decoding streams, in transparent huge pages where Linux offers them.

A decode step reads every weight (and the KV cache) once per token. In 4 KiB pages the CPU's
prefetchers stop at every page boundary and every page costs a TLB walk; in 2 MiB pages the same
read runs much faster. Measured on machine B (Xeon, 2 cores, docs/BENCHMARKS.md), reading 365 MB
with `stream_read`: 25.7 GB/s in 4 KiB pages, 40 GB/s in huge pages. Linux's usual THP mode is
"madvise": anonymous memory gets huge pages only where madvise(MADV_HUGEPAGE) asks, which
PyTorch's allocator never does.

`packed(specs)` hands out tensors that lie one after another in one anonymous mapping advised for
huge pages (small tensors share pages, so a Q4_0 layer of a few hundred KiB gains too), each its own
storage (safetensors, torch.save and `data_ptr()` see ordinary tensors). The mapping is freed when
the last of them is. Elsewhere (macOS, THP off, ALLOY_HUGE_PAGES=0) it falls back to plain
`torch.zeros`: the same tensors, 4 KiB pages.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
from functools import cache
from pathlib import Path

import torch

HUGE_PAGE_BYTES = 2 << 20
ALIGN_BYTES = 4096  # each tensor starts on its own 4 KiB page (and so on a cache line)
MIN_BYTES = HUGE_PAGE_BYTES  # less than one huge page in all: not worth a mapping of its own
_MADV_HUGEPAGE = 14
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@cache
def huge_pages() -> bool:
    """Whether madvise(MADV_HUGEPAGE) can give this process huge pages (Linux, THP "always" or
    "madvise"; ALLOY_HUGE_PAGES=0 turns it off)."""
    if os.environ.get("ALLOY_HUGE_PAGES", "1") == "0" or not hasattr(mmap, "MAP_ANONYMOUS"):
        return False
    try:
        mode = THP_MODE.read_text()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def _advise(mapping: mmap.mmap) -> int:
    """madvise the mapping's whole huge pages for THP; returns the offset of the first one."""
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    first = -address % HUGE_PAGE_BYTES
    whole = (len(mapping) - first) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if whole:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(address + first), ctypes.c_size_t(whole), _MADV_HUGEPAGE)  # advice only
    return first


def packed(specs: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """Zero-filled CPU tensors of these (shape, dtype)s, laid out together in huge pages (an
    anonymous mapping: its untouched pages read as zeros). Plain `torch.zeros` where huge pages
    are not available or the tensors are small."""
    sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in specs]
    slots = [-(-size // ALIGN_BYTES) * ALIGN_BYTES for size in sizes]
    total = sum(slots)
    if not huge_pages() or total < MIN_BYTES:
        return [torch.zeros(shape, dtype=dtype) for shape, dtype in specs]
    # One huge page more than needed, so the tensors can start on a huge-page boundary; the pages
    # nobody touches cost address space, not memory.
    mapping = mmap.mmap(-1, total + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    offset = _advise(mapping)
    out = []
    for (shape, dtype), size, slot in zip(specs, sizes, slots):
        # each frombuffer is a storage of its own that keeps `mapping` alive
        flat = torch.frombuffer(mapping, dtype=torch.uint8, count=size, offset=offset) if size else torch.empty(0, dtype=torch.uint8)
        out.append(flat.view(dtype).view(shape))
        offset += slot
    return out
