"""The few C library calls tilefm makes through ctypes, each feature-detected.

Why in one place: they are Linux / glibc specific, and a caller should not need to know how to
find them or what to do where they are missing. Every function here answers False (or None)
where the platform lacks the call, and the caller carries on without the optimisation it
stood for. Nothing here raises for a missing symbol.

Users: `tilefm.engine.memory` (malloc thresholds), `tilefm.engine.cog` (write-back and fallocate for the
streamed COG), `tilefm.engine.mosaic.threads` (one OpenMP thread for the mosaic threads) and
`tilefm.localstack` (the local S3 server dies with its parent).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from typing import Any

#: glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: sync_file_range's flag: start writing, do not wait
SYNC_FILE_RANGE_WRITE = 2
#: fallocate's mode: insert a range of zeros, moving the data after it (ext4, XFS)
FALLOC_FL_INSERT_RANGE = 0x20
#: prctl's option: the signal this process gets when its parent dies
PR_SET_PDEATHSIG = 1

LINUX = sys.platform.startswith("linux")
_found: dict[str, Any] = {}


def _function(name: str, *argtypes: Any, glibc: bool = False) -> Any:
    """A function of the libraries loaded in this process (libc and what is linked in), or
    None. Found functions are kept; a missing one is looked up again next time, since a library
    loaded later (torch's OpenMP runtime) may bring it."""
    fn = _found.get(name)
    if fn is not None:
        return fn
    if not LINUX:
        return None
    try:
        lib = ctypes.CDLL(None, use_errno=True)
        if glibc:
            lib.gnu_get_libc_version  # noqa: B018  attribute lookup is the test: musl has no such symbol
        fn = getattr(lib, name)
    except (AttributeError, OSError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    _found[name] = fn
    return fn


def mallopt(param: int, value: int) -> bool:
    """glibc's mallopt. True when glibc took the value; False elsewhere (musl's mallopt accepts
    and ignores these parameters, so it is not called)."""
    fn = _function("mallopt", ctypes.c_int, ctypes.c_int, glibc=True)
    return fn is not None and bool(fn(param, value))


def sync_file_range(fd: int, start: int, length: int, flags: int = SYNC_FILE_RANGE_WRITE) -> bool:
    """Linux's sync_file_range (by default: start writing the range back, without waiting).
    True when the kernel took the request."""
    fn = _function("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return fn is not None and fn(fd, start, length, flags) == 0


def has_fallocate() -> bool:
    """Whether this platform has Linux's fallocate (a file system may still refuse a mode)."""
    return _function("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64) is not None


def fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """Linux's fallocate. False where the platform lacks it or the file system refuses the mode."""
    fn = _function("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    return fn is not None and fn(fd, mode, offset, length) == 0


def omp_set_num_threads(n: int) -> bool:
    """The OpenMP runtime's thread count for the calling thread's parallel regions. False where
    no OpenMP runtime is loaded into the process's global namespace (macOS torch keeps its own,
    loaded locally)."""
    fn = _function("omp_set_num_threads", ctypes.c_int)
    if fn is None:
        return False
    fn(n)
    return True


def parent_death_signal() -> Callable[[], None] | None:
    """A function to run in a forked child before exec (subprocess's preexec_fn) that asks the
    kernel to send the child SIGTERM when its parent dies; None where there is no prctl. The
    lookup happens here, in the parent: between fork and exec the child must only make the call."""
    import signal

    fn = _function("prctl", ctypes.c_int, ctypes.c_ulong)
    if fn is None:
        return None

    def die_with_parent() -> None:
        fn(PR_SET_PDEATHSIG, signal.SIGTERM)

    return die_with_parent
