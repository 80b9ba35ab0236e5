"""Large arrays reused from the heap in the processes that read tiles.

Why: glibc's malloc gives each allocation above its mmap threshold fresh pages from the kernel
and returns them on free, and trims its main heap's top whenever more than its trim threshold
lies free there. A reader allocates and frees arrays of a few MB per tile (the strip's samples,
the tile's stack, the model's input; a 32-tile ViT batch holds ~84 MB of them until it is
sent), so its memory went back and forth to the kernel: ~700 page faults a vit-base tile at
zoom 14, ~20% of a reader's CPU.
With the thresholds raised, freed arrays stay in the heap and the next batch takes them without
a fault. That is the main thread's heap, where reader processes and Ray tasks work; threads get
heaps of their own, which malloc does not trim that way (there it changed nothing measurable).
The price: a reader keeps its peak working set (a batch: a few hundred MB) between batches. The
processes that call this are dedicated to reading, so that is their steady state anyway.
"""

from __future__ import annotations

import logging

from tilefm import libc
from tilefm.libc import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD

log = logging.getLogger(__name__)

#: allocations up to this size come from the heap (glibc's largest allowed value on 64-bit)
MMAP_THRESHOLD = 32 << 20
#: the heap's top is given back to the kernel only when this much lies free there
TRIM_THRESHOLD = 1 << 30

_done = False


def retain_freed_memory() -> bool:
    """Raise this process's malloc thresholds (once; glibc only: elsewhere nothing changes).
    True when they are set."""
    global _done
    if _done:
        return True
    _done = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    if not _done:
        log.debug("mallopt refused the thresholds; freed memory goes back to the kernel")
    return _done


#: the tiler's threshold: arrays over it get pages of their own, returned when freed
SERVER_MMAP_THRESHOLD = 2 << 20


def release_large_arrays(threshold: int = SERVER_MMAP_THRESHOLD) -> bool:
    """The opposite trade, for a long-lived server whose requests vary in size (the tiler):
    every allocation over `threshold` is mapped on its own and unmapped on free, and the
    threshold stays where it is put. glibc otherwise raises it to the largest block freed (up
    to 32 MiB) and serves blocks under it from per-thread heaps it does not return, so a tiler
    kept what its largest concurrent reads had needed (docs/tiler.md, "Threats and limits").
    True when set."""
    return libc.mallopt(M_MMAP_THRESHOLD, threshold)
