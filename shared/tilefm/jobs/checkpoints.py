"""A job's checkpoints: every finished tile's output stored beside the job's output
(`.parts-<id>/`), so that a job whose scheduler died resumes without redoing those tiles.

They are written as tiles finish and read back only when a job resumes (in parallel, into the
new stitcher first); the running job's outputs reach its stitcher directly. They go once the job
is final, whatever its state: a failed or cancelled job is never resumed.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import logging
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tilefm.grid import Tile
from tilefm.jobs.models import Job
from tilefm.jobs.service import output_uri
from tilefm.settings import Settings
from tilefm.storage import FileLocation, S3Storage, Storage, parse_uri, storage_for
from tilefm.values import Encoding, TileOutput

log = logging.getLogger(__name__)

#: checkpoints read back at once when a job resumes
RESUME_READERS = 8


class Stopped(Exception):
    """The job stopped while its checkpoints were being read back."""


def parts_prefix(job: Job) -> str:
    """Scratch space for a job's finished tiles, in the job's own output folder."""
    return output_uri(job.spec, job.id).rsplit("/", 1)[0] + f"/.parts-{job.id}/"


def part_uri(job: Job, tile: Tile) -> str:
    return f"{parts_prefix(job)}{tile.z}-{tile.x}-{tile.y}.npz"


def part_dtype(encoding: Encoding) -> np.dtype:
    """What a checkpoint stores: float16 where the output holds no more (16-bit or int8 outputs)."""
    return np.dtype(np.float16) if encoding.nbits == 16 or encoding.dtype == "int8" else np.dtype(np.float32)


def encode_part(out: TileOutput, dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, values=out.values.astype(dtype, copy=False), weight=out.weight, halo=np.int32(out.halo))
    return buf.getvalue()


def decode_part(data: bytes, tile: Tile) -> TileOutput:
    with np.load(io.BytesIO(data)) as z:
        return TileOutput(
            tile=tile, halo=int(z["halo"]), values=z["values"].astype(np.float32), weight=z["weight"]
        )


class Checkpoints:
    """The checkpoints of one job.

    Args:
        job: the job.
        settings: where its output's storage is (the checkpoints live beside the output).
    """

    def __init__(self, job: Job, settings: Settings):
        self.job = job
        self.settings = settings

    @functools.cached_property
    def storage(self) -> Storage:
        return storage_for(output_uri(self.job.spec, self.job.id), self.settings)

    def write(self, out: TileOutput, dtype: np.dtype) -> None:
        self.storage.write_bytes(part_uri(self.job, out.tile), encode_part(out, dtype))

    def exists(self, tile: Tile) -> bool:
        return self.storage.exists(part_uri(self.job, tile))

    def read_back(self, tiles: list[Tile], stopped: threading.Event) -> Iterator[TileOutput]:
        """The checkpoints of `tiles`, RESUME_READERS read at a time, in the order given; raises
        `Stopped` once `stopped` is set."""
        if not tiles:
            return
        store = self.storage

        def read(t: Tile) -> TileOutput:
            return decode_part(store.read_bytes(part_uri(self.job, t)), t)

        todo = iter(tiles)
        pool = ThreadPoolExecutor(max_workers=RESUME_READERS, thread_name_prefix="tilefm-resume")
        try:  # up to twice as many read ahead as read at once: memory stays a few tiles
            reads = deque(pool.submit(read, t) for t in itertools.islice(todo, 2 * RESUME_READERS))
            while reads:
                if stopped.is_set():
                    raise Stopped
                got = reads.popleft().result()
                if (t := next(todo, None)) is not None:
                    reads.append(pool.submit(read, t))
                yield got
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        log.info("job %s: %d finished tiles read back from their checkpoints", self.job.id, len(tiles))

    def delete(self) -> None:
        """Remove everything under the job's `.parts-<id>/` (whichever plan wrote it). Never
        raises: the job's state is recorded by now, and parts left behind only take space."""
        prefix = parts_prefix(self.job)
        try:
            parts = self.storage
            folder = parse_uri(prefix.rstrip("/"))
            if isinstance(folder, FileLocation):
                if folder.path.is_dir():
                    for p in folder.path.iterdir():
                        parts.delete(p.as_uri())
                    with contextlib.suppress(OSError):
                        folder.path.rmdir()
            elif isinstance(parts, S3Storage):
                pages = parts.client.get_paginator("list_objects_v2").paginate(
                    Bucket=folder.bucket, Prefix=folder.key + "/"
                )
                for page in pages:
                    for obj in page.get("Contents", []):
                        parts.delete(f"s3://{folder.bucket}/{obj['Key']}")
        except Exception as e:  # noqa: BLE001 - logged; see above
            log.warning(
                "job %s: parts under %s not removed: %s: %s", self.job.id, prefix, type(e).__name__, e
            )
