"""Where TensorRT engines are cached, and under which key.

An engine is only valid for the exact model, GPU architecture, TensorRT version, precision and
input shapes it was built for, so all of them go into the key; one worker builds and puts the
serialized engine in the object store (atomically), the others load it. Two workers that miss at
once both build; they build the same engine and the later put wins, which is harmless.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from tilefm.storage import Storage, storage_for

log = logging.getLogger(__name__)

#: bump when the way engines are built changes (flags, profiles), to invalidate old ones
BUILD_VERSION = 1


@dataclass(frozen=True)
class EngineKey:
    model_sha256: str
    #: GPU compute capability (major, minor), e.g. (9, 0) for an H100
    compute_capability: tuple[int, int]
    tensorrt_version: str
    precision: str
    #: one sample's input shape, e.g. (10, 256, 256); the batch axis is the profile's
    input_shape: tuple[int, ...]
    #: the optimisation profile's (min, opt, max) batch sizes
    batch_sizes: tuple[int, int, int]
    #: int8: the digest of the calibration inputs its scales came from ("" otherwise)
    calibration_sha256: str = ""

    def digest(self) -> str:
        fields = {**asdict(self), "build": BUILD_VERSION}
        if not self.calibration_sha256:
            del fields["calibration_sha256"]  # the keys of engines built before int8 stay as they were
        return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    @property
    def filename(self) -> str:
        """Readable where it can be (`ls` tells engines apart), unique by the digest."""
        major, minor = self.compute_capability
        shape = "x".join(map(str, self.input_shape))
        return (
            f"{self.model_sha256[:12]}-sm{major}{minor}-trt{self.tensorrt_version}-{self.precision}"
            f"-{shape}-b{self.batch_sizes[2]}-{self.digest()[:16]}.engine"
        )


def engine_key(
    model_sha256: str,
    compute_capability: tuple[int, int],
    tensorrt_version: str,
    precision: str,
    input_shape: tuple[int, ...],
    max_batch: int,
    *,
    opt_batch: int | None = None,
    calibration_sha256: str = "",
) -> EngineKey:
    """The cache key of an engine (a pure function of what the engine depends on)."""
    if len(model_sha256) != 64 or any(c not in "0123456789abcdef" for c in model_sha256):
        raise ValueError("model_sha256 must be 64 lowercase hex digits")
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    return EngineKey(
        model_sha256=model_sha256,
        compute_capability=(int(compute_capability[0]), int(compute_capability[1])),
        tensorrt_version=str(tensorrt_version),
        precision=precision,
        input_shape=tuple(int(s) for s in input_shape),
        batch_sizes=(1, opt_batch or max_batch, max_batch),
        calibration_sha256=calibration_sha256,
    )


def calibration_digest(samples: np.ndarray | None) -> str:
    """The sha256 of calibration inputs as the engine sees them (float32, C order)."""
    if samples is None:
        return ""
    return hashlib.sha256(np.ascontiguousarray(samples, np.float32).tobytes()).hexdigest()


def engine_uri(prefix: str, key: EngineKey) -> str:
    """Where the engine lives: `<prefix>/<filename>` (a folder or an s3:// prefix)."""
    return f"{str(prefix).rstrip('/')}/{key.filename}"


def load_or_build(
    prefix: str, key: EngineKey, build: Callable[[], bytes], *, storage: Storage | None = None
) -> tuple[bytes, bool]:
    """The serialized engine for `key`: from the cache, or built and put there. Returns (engine,
    built)."""
    uri = engine_uri(prefix, key)
    store = storage or storage_for(uri)
    if store.exists(uri):
        log.info("loading TensorRT engine %s", uri)
        return store.read_bytes(uri), False
    t0 = time.perf_counter()
    data = build()
    log.info("built TensorRT engine in %.0f s; caching it at %s", time.perf_counter() - t0, uri)
    store.write_bytes(uri, data)
    return data, True
