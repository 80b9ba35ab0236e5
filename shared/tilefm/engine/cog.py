"""A Cloud-Optimized GeoTIFF laid out from blocks compressed while the stream runs.

GDAL's COG driver copies a finished mosaic: it decompresses it, interleaves it, compresses it
again and computes the overviews, all after the last tile. For a 128-band full-resolution
output that takes seconds per tile on a CPU core (the overviews most of it), far more than a
GPU spends encoding the tile. Here each 256-px block of every level is compressed as soon as it is
final (DEFLATE with the TIFF predictor, on worker threads: the predictor through torch and the
compression through ISA-L both run without the GIL). The full-resolution blocks are written
straight into the COG's file, row-major, as the stream completes them; the overviews' go to a
scratch file. `finish` then puts the TIFF header, every IFD and the overviews (smallest first)
in front of the full resolution, without decoding anything and, where the file system can
insert room at a file's start, without moving the full resolution's bytes.

The georeferencing and GDAL's metadata (tags, band descriptions, nodata) are not encoded here:
GDAL writes them into a small template GeoTIFF, and their TIFF fields are copied as they are.

Why one module (~510 lines): one file format, laid out by hand (TIFF fields, IFDs, block
offsets, moving bytes); split, the byte offsets would be computed in one module and trusted in
another.
"""

from __future__ import annotations

import errno
import os
import struct
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import rasterio

from tilefm import libc

if TYPE_CHECKING:
    from tilefm.storage import EarlyParts

BLOCK = 256
#: ISA-L's levels are 0-3; 1 is ~6x libdeflate's level 6 on float16 embeddings, 3% larger
DEFLATE_LEVEL = 1
#: rows of a block split into the predictor's byte planes and differenced at once: few enough to
#: stay in cache (and for a thread's scratch to stay small: a block's worth was 100 MB of fresh
#: pages per mosaic thread and job), enough that a block takes few calls (each gives up the GIL
#: and waits for it)
SHIFT_ROWS = 16
#: the TIFF fields GDAL writes for georeferencing and its metadata, copied from the template
GEO_FIELDS = (33550, 33922, 34264, 34735, 34736, 34737, 42112)
NODATA_FIELD = 42113

_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8, 17: 8, 18: 8}
SHORT, LONG, LONG8 = 3, 4, 16


@dataclass(frozen=True)
class TiffField:
    type: int
    count: int
    data: bytes  # the values, little-endian

    @classmethod
    def of(cls, type_: int, values: list[int]) -> TiffField:
        fmt = {SHORT: "H", LONG: "I", LONG8: "Q"}[type_]
        return cls(type_, len(values), struct.pack(f"<{len(values)}{fmt}", *values))


def read_fields(path: Path) -> dict[int, TiffField]:
    """The fields of a TIFF's first IFD (classic or BigTIFF, little-endian, as GDAL writes)."""
    with open(path, "rb") as f:
        head = f.read(16)
        if head[:2] != b"II":
            raise ValueError(f"{path}: not a little-endian TIFF")
        big = struct.unpack_from("<H", head, 2)[0] == 43
        f.seek(struct.unpack_from("<Q", head, 8)[0] if big else struct.unpack_from("<I", head, 4)[0])
        count_fmt, entry_fmt, inline = ("<Q", "<HHQ", 8) if big else ("<H", "<HHI", 4)
        n = struct.unpack(count_fmt, f.read(struct.calcsize(count_fmt)))[0]
        entries = [
            struct.unpack(entry_fmt, f.read(struct.calcsize(entry_fmt))) + (f.read(inline),) for _ in range(n)
        ]
        fields = {}
        for tag, type_, count, value in entries:
            size = _TYPE_SIZE[type_] * count
            if size <= inline:
                data = value[:size]
            else:
                f.seek(struct.unpack("<Q" if big else "<I", value)[0])
                data = f.read(size)
            fields[tag] = TiffField(type_, count, data)
        return fields


def stored_dtype(ds: rasterio.io.DatasetReader) -> str:
    """The type a GeoTIFF's first band is stored as, whatever GDAL reads: before 3.11 GDAL reads
    IEEE half floats as Float32 with NBITS=16, from 3.11 on as Float16."""
    if ds.dtypes[0] == "float32" and ds.tags(1, ns="IMAGE_STRUCTURE").get("NBITS") == "16":
        return "float16"
    return ds.dtypes[0]


def template_fields(
    profile: dict[str, Any],
    tags: dict[str, str],
    descriptions: list[str],
    scale_offset: tuple[float, float] | None = None,
) -> dict[int, TiffField]:
    """GDAL's georeferencing and metadata fields for a raster of this profile (and the scale and
    offset of every band, for quantized values): written by GDAL into a one-block GeoTIFF and
    read back."""
    with tempfile.TemporaryDirectory(prefix="tilefm-cog-") as tmp:
        path = Path(tmp) / "template.tif"
        small = {
            **profile,
            "driver": "GTiff",
            "width": BLOCK,
            "height": BLOCK,
            "tiled": True,
            "blockxsize": BLOCK,
            "blockysize": BLOCK,
            "sparse_ok": True,
        }
        with rasterio.open(path, "w", **small) as ds:
            ds.update_tags(**tags)
            for i, name in enumerate(descriptions, start=1):
                ds.set_band_description(i, name)
            if scale_offset is not None:
                ds.scales = [scale_offset[0]] * ds.count
                ds.offsets = [scale_offset[1]] * ds.count
        fields = read_fields(path)
    return {tag: f for tag, f in fields.items() if tag in GEO_FIELDS or tag == NODATA_FIELD}


class _Scratch(threading.local):
    """A thread's arrays for the predictor, kept for the block shape it last encoded: the
    planes' difference (the block's bytes to compress), and SHIFT_ROWS rows of planes and of
    words shifted."""

    def __init__(self) -> None:
        self.arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def get(self, shape: tuple[int, ...], words: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        _, nbytes, n = shape
        if self.arrays is None or self.arrays[0].shape != shape or self.arrays[2].dtype != words:
            self.arrays = (
                np.empty(shape, np.uint8),
                np.empty((SHIFT_ROWS, nbytes, n), np.uint8),
                np.empty((SHIFT_ROWS, n), words),
            )
        return self.arrays


_scratch = _Scratch()


def encode_block(values: np.ndarray, bits: int) -> bytes:
    """A [bands, 256, 256] block as a TIFF tile: pixel-interleaved, `bits`-bit IEEE floats
    (float16 blocks are stored as they are; float32 ones for 16 bits must be float16-exact),
    floating-point predictor (TIFF predictor 3: each row's bytes split into planes, most
    significant first, then differenced at a stride of one pixel), DEFLATE (zlib stream).
    8 bits: int8 values as they are, no predictor (as GDAL's COG driver writes them).
    Every step is one pass, without the GIL: a block whose memory is already pixel-interleaved
    (the stitcher's) is not transposed, a bands-first one as a 2-D transpose of its integer
    words; each byte plane is shifted and narrowed out of the interleaved words, and the
    difference written into another array (torch's in-place difference over overlapping slices
    is ~10x slower), a few rows at a time. The arrays are the calling thread's, reused: fresh
    ones cost a 768-band block ~25k page faults each."""
    import torch
    from isal import isal_zlib

    bands, h, w = values.shape
    if bits == 8:
        pixels8 = torch.from_numpy(values).to(torch.int8).permute(1, 2, 0).contiguous()
        return isal_zlib.compress(pixels8.numpy().data, DEFLATE_LEVEL)
    nbytes = bits // 8
    x = torch.from_numpy(values).to(torch.float16 if bits == 16 else torch.float32)  # strides kept
    words = x.view(torch.int16 if bits == 16 else torch.int32)
    if words.is_contiguous():  # bands first
        pixels = words.reshape(bands, h * w).t().contiguous()
    else:
        pixels = words.permute(1, 2, 0).contiguous()  # no copy when pixel-interleaved
    # plane j takes the j-th most significant byte of every word: the word shifted right, then
    # narrowed, by numpy, SHIFT_ROWS rows at a time (GIL released; 3.3x faster for a 768-band
    # float16 block than a strided copy of the j-th byte, 2.5x faster than torch's shift and
    # narrowing)
    unsigned = np.uint16 if bits == 16 else np.uint32
    wds = pixels.numpy().view(unsigned).reshape(h, w * bands)
    out, split, shifted = _scratch.get((h, nbytes, w * bands), np.dtype(unsigned))
    for r in range(0, h, SHIFT_ROWS):
        rows = wds[r : r + SHIFT_ROWS]
        m = len(rows)
        for j in range(nbytes):  # most significant byte first
            shift = 8 * (nbytes - 1 - j)
            if shift:
                np.right_shift(rows, shift, out=shifted[:m])
            np.copyto(split[:m, j], shifted[:m] if shift else rows, casting="unsafe")
        planes = torch.from_numpy(split[:m]).view(m, -1)
        diff = torch.from_numpy(out[r : r + m]).view(m, -1)
        diff[:, :bands] = planes[:, :bands]
        torch.sub(
            planes[:, bands:], planes[:, :-bands], out=diff[:, bands:]
        )  # uint8: wraps, as the predictor does
    return isal_zlib.compress(out.data, DEFLATE_LEVEL)


@dataclass
class COGBuilder:
    """Blocks of every level, compressed elsewhere and put here in any order; `finish` makes
    the COG. Level 0 is the full resolution; level i is 2^i coarser (GDAL's overviews).
    `bits`: 16 or 32 (IEEE floats, floating-point predictor) or 8 (int8, no predictor).

    The full-resolution blocks (three quarters of the bytes) go straight into the COG's own
    file (`base`), row-major, each with GDAL's leader and trailer, and are on their way to the
    disk while the stream runs; the overviews go to `scratch`. `finish` then puts the header,
    the IFDs and the overviews in front of them: where the file system can insert room at a
    file's start (ext4, XFS), the full-resolution blocks are not moved at all; else they are
    copied once, by the kernel, behind the new front."""

    scratch: Path
    width: int
    height: int
    bands: int
    levels: int
    bits: int
    fields: dict[int, TiffField]
    #: the COG's file (default: `scratch` with `.cog` added)
    base: Path | None = None
    #: the full-resolution blocks that will be put: one that comes before those ahead of it
    #: in row-major order waits in memory for them (up to HOLD_BYTES), so that the file is
    #: in COG order as written. None: written as they come
    expected: set[tuple[int, int]] | None = None
    #: where the full resolution's bytes go as they are final, while the stream runs (an S3
    #: object's parts: `tilefm.storage.EarlyParts`); None: nowhere but `base`
    early: EarlyParts | None = None
    #: bytes before the full resolution's, once `finish` has laid them out
    front: int | None = field(init=False, default=None)
    #: each block's (position of its leader in its file, size without leader and trailer)
    _offsets: list[dict[tuple[int, int], tuple[int, int]]] = field(init=False)
    _file: BinaryIO = field(init=False)
    _base: BinaryIO = field(init=False)
    _synced: int = field(init=False, default=0)
    #: expected full-resolution blocks row-major, the first not yet written, those waiting
    _order: list[tuple[int, int]] = field(init=False, default_factory=list)
    _next: int = field(init=False, default=0)
    _held: dict[tuple[int, int], bytes] = field(init=False, default_factory=dict)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.base = self.base or Path(f"{self.scratch}.cog")
        self._offsets = [{} for _ in range(self.levels + 1)]
        self._order = sorted(self.expected or (), key=lambda k: (k[1], k[0]))
        self._file = open(self.scratch, "wb")  # noqa: SIM115 - open while blocks come; `close` closes it
        self._base = open(self.base, "wb")  # noqa: SIM115 - likewise

    def size(self, level: int) -> tuple[int, int]:
        return -(-self.width // (1 << level)), -(-self.height // (1 << level))

    def blocks(self, level: int) -> tuple[int, int]:
        w, h = self.size(level)
        return -(-w // BLOCK), -(-h // BLOCK)

    def put(self, level: int, bx: int, by: int, data: bytes) -> None:
        """One compressed block (thread-safe). A block never put is sparse: nodata to GDAL."""
        if len(data) < 4:
            raise ValueError("a compressed block has at least 4 bytes")
        with self._lock:
            if level:
                return self._write(self._file, level, (bx, by), data)
            if self.expected is None or (bx, by) not in self.expected:
                self._write(self._base, 0, (bx, by), data)
            else:
                self._held[(bx, by)] = data
                self._write_ready()
            if self._base.tell() - self._synced >= WRITEBACK_BYTES:
                self._base.flush()
                if self.early is not None and self.base is not None:  # `base` is set by now
                    self.early.send(self.base, self._synced, self._base.tell() - self._synced)
                self._synced = _start_writeback(self._base.fileno(), self._synced, self._base.tell())

    def _write_ready(self) -> None:
        """Write the held full-resolution blocks whose turn has come (all of them, in row-major
        order, once they hold more than HOLD_BYTES: those then lie out of order)."""
        spill = sum(map(len, self._held.values())) > HOLD_BYTES
        while self._next < len(self._order):
            key = self._order[self._next]
            if key in self._held:
                self._write(self._base, 0, key, self._held.pop(key))
            elif key not in self._offsets[0]:  # not here yet
                if not spill:
                    return
                for k in sorted(self._held, key=lambda k: (k[1], k[0])):
                    self._write(self._base, 0, k, self._held.pop(k))
                spill = False
                continue
            self._next += 1

    def _write(self, f: BinaryIO, level: int, key: tuple[int, int], data: bytes) -> None:
        self._offsets[level][key] = (f.tell(), len(data))
        f.write(struct.pack("<I", len(data)))
        f.write(data)
        f.write(data[-4:])

    def close(self) -> None:
        with self._lock:
            for key in sorted(self._held, key=lambda k: (k[1], k[0])):  # an expected block never came
                self._write(self._base, 0, key, self._held.pop(key))
        for f in (self._file, self._base):
            if not f.closed:
                f.close()

    def finish(self, bigtiff: bool | None = None) -> Path:
        """Make `base` the COG and return its path: header, ghost area and IFDs, then the
        overviews' blocks, smallest first, each level row-major, then the full resolution's as
        written (row-major unless one waited past HOLD_BYTES: then the ghost area does not say
        ROW_MAJOR, and GDAL does not call the file's layout COG). Each block carries GDAL's
        4-byte size before it and its last 4 bytes after it (what GDAL's own COGs carry, and
        its ghost area announces). BigTIFF only where the file needs it, unless `bigtiff` says.
        Sets `front`: the bytes before the full resolution's (at least MIN_PART where parts
        were sent early)."""
        self.close()
        if self.base is None:
            raise RuntimeError("self.base is not set")
        if self.early is not None:
            self.early.quiesce()  # no part still to read from the file as it was
        base_bytes = os.path.getsize(self.base)
        rows = [sorted(level, key=lambda k: (k[1], k[0])) for level in self._offsets]
        written = [self._offsets[0][k][0] for k in rows[0]]
        row_major = written == sorted(written)
        block = os.statvfs(self.base.parent).f_bsize  # room is inserted in whole blocks
        least = self.early.MIN_PART if self.early is not None and self.early.started else 0
        ovr_bytes = sum(n + 8 for level in self._offsets[1:] for _, n in level.values())
        for big in (False, True) if bigtiff is None else (bigtiff,):
            head, ifds = self._layout(big, row_major=row_major)  # sizes only
            front = -(-max(len(head) + len(ifds) + ovr_bytes, least) // block) * block
            if big or front + base_bytes < 2**32 or bigtiff is False:
                break
        # where each block's data lands: overviews coarsest first, then the full resolution
        placed: list[dict[tuple[int, int], int]] = [{} for _ in self._offsets]
        pos = len(head) + len(ifds)
        for level in range(self.levels, 0, -1):
            for key in rows[level]:
                placed[level][key] = pos + 4  # after the size leader
                pos += self._offsets[level][key][1] + 8
        placed[0] = {key: front + at + 4 for key, (at, _) in self._offsets[0].items()}
        head, ifds = self._layout(big, placed, row_major)
        if not _insert_room(self.base, front):  # a new file, the full resolution copied behind its front
            rebuilt = Path(f"{self.base}.front")
            with open(rebuilt, "wb") as out, open(self.base, "rb") as src:
                out.truncate(front)
                copy_ranges(src.fileno(), out.fileno(), [(0, front, base_bytes)])
            os.replace(rebuilt, self.base)
        # the overviews' blocks (leader and trailer included) from the scratch file, in their
        # order: runs that lie together in both files are copied as one
        moves: list[tuple[int, int, int]] = []
        pos = len(head) + len(ifds)
        for level in range(self.levels, 0, -1):
            for key in rows[level]:
                at, n = self._offsets[level][key]
                if moves and moves[-1][0] + moves[-1][2] == at and moves[-1][1] + moves[-1][2] == pos:
                    moves[-1] = (moves[-1][0], moves[-1][1], moves[-1][2] + n + 8)
                else:
                    moves.append((at, pos, n + 8))
                pos += n + 8
        with open(self.base, "r+b") as out, open(self.scratch, "rb") as src:
            out.write(head + ifds)
            out.flush()
            copy_ranges(src.fileno(), out.fileno(), moves)
        self.front = front
        return self.base

    def _layout(
        self, big: bool, placed: list[dict[tuple[int, int], int]] | None = None, row_major: bool = True
    ) -> tuple[bytes, bytes]:
        order = "BLOCK_ORDER=ROW_MAJOR\n" if row_major else ""
        layout = (
            f"LAYOUT=IFDS_BEFORE_DATA\n{order}BLOCK_LEADER=SIZE_AS_UINT4\n"
            "BLOCK_TRAILER=LAST_4_BYTES_REPEATED\nKNOWN_INCOMPATIBLE_EDITION=NO\n "
        )  # the space, as in GDAL's: room for an editor to say YES
        ghost = f"GDAL_STRUCTURAL_METADATA_SIZE={len(layout):06d} bytes\n{layout}".encode()
        header_size = 16 if big else 8
        first_ifd = header_size + len(ghost)
        offset_type = LONG8 if big else LONG
        ifds = b""
        for level in range(self.levels + 1):
            bx, by = self.blocks(level)
            offsets, counts = [], []
            for y in range(by):
                for x in range(bx):
                    n = self._offsets[level].get((x, y), (0, 0))[1]
                    offsets.append(placed[level][(x, y)] if placed and n else 0)
                    counts.append(n)
            w, h = self.size(level)
            fields = {
                256: TiffField.of(LONG, [w]), 257: TiffField.of(LONG, [h]),
                258: TiffField.of(SHORT, [self.bits] * self.bands), 259: TiffField.of(SHORT, [8]),
                262: TiffField.of(SHORT, [1]), 277: TiffField.of(SHORT, [self.bands]),
                284: TiffField.of(SHORT, [1]), 317: TiffField.of(SHORT, [3]),
                322: TiffField.of(SHORT, [BLOCK]), 323: TiffField.of(SHORT, [BLOCK]),
                324: TiffField.of(offset_type, offsets), 325: TiffField.of(offset_type, counts),
                339: TiffField.of(SHORT, [2 if self.bits == 8 else 3] * self.bands),  # signed / IEEE float
            }  # fmt: skip
            if self.bits == 8:
                del fields[317]  # no predictor
            if self.bands > 1:
                fields[338] = TiffField.of(SHORT, [0] * (self.bands - 1))
            if level:
                fields[254] = TiffField.of(LONG, [1])  # a reduced-resolution image
                fields[NODATA_FIELD] = self.fields[NODATA_FIELD]
            else:
                fields.update(self.fields)
            last = level == self.levels
            ifds += _ifd(fields, big, at=first_ifd + len(ifds), last=last)
        if big:
            head = b"II" + struct.pack("<HHHQ", 43, 8, 0, first_ifd)
        else:
            head = b"II" + struct.pack("<HI", 42, first_ifd)
        return head + ghost, ifds


#: full-resolution bytes put before the disk is asked to start writing them (`_start_writeback`)
WRITEBACK_BYTES = 64 << 20
#: compressed full-resolution blocks held for those ahead of them (a vit-base block: ~90 MB)
HOLD_BYTES = 512 << 20


def _start_writeback(fd: int, start: int, end: int) -> int:
    """Ask the kernel to start writing bytes [start, end) of a file to disk, without waiting
    (Linux's sync_file_range; elsewhere nothing). The COG is then on its way to the disk while
    the stream runs, and the fsync that makes it durable (`FileStorage.writing`) waits for
    little, where a 1.3 GB COG written at the end would take seconds to fsync. Returns `end`."""
    libc.sync_file_range(fd, start, end - start)  # False only means no head start
    return end


def _insert_room(path: Path, n: int) -> bool:
    """Insert `n` bytes (a whole number of the file system's blocks) of zeros at the start of
    a file, moving no data (Linux's fallocate with FALLOC_FL_INSERT_RANGE: ext4, XFS). False
    where the file system or the platform cannot (tmpfs, btrfs, macOS)."""
    if not libc.has_fallocate() or n == 0 or os.path.getsize(path) == 0:  # room only before data
        return n == 0
    fd = os.open(path, os.O_RDWR)
    try:
        return libc.fallocate(fd, libc.FALLOC_FL_INSERT_RANGE, 0, n)
    finally:
        os.close(fd)


def copy_ranges(src: int, dst: int, moves: list[tuple[int, int, int]]) -> None:
    """Copy each (source offset, destination offset, length) of file descriptor `src` into
    `dst`: by the kernel where it can (copy_file_range: no pass through user memory, no GIL
    held), else by pread and pwrite. One thread: a file system takes one file's writes one at
    a time (on ext4 two threads copy no faster than one). Joining each block with its leader
    and trailer in Python instead took seconds for a 1.3 GB COG, holding the GIL."""
    for offset, to, n in moves:
        for k in range(0, n, COPY_PIECE):
            _copy_piece(src, dst, offset + k, to + k, min(COPY_PIECE, n - k))


#: bytes per copy_file_range call in `copy_ranges`
COPY_PIECE = 64 << 20


def _copy_piece(src: int, dst: int, offset: int, to: int, n: int) -> None:
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < n:
                step = os.copy_file_range(src, dst, n - done, offset + done, to + done)
                if step == 0:
                    raise OSError(f"the source ends before byte {offset + n}")
                done += step
        except OSError as e:
            if done or e.errno not in (
                errno.EXDEV,
                errno.ENOSYS,
                errno.EOPNOTSUPP,
                errno.EINVAL,
                errno.EPERM,
            ):
                raise
    while done < n:
        piece = os.pread(src, n - done, offset + done)
        if not piece:
            raise OSError(f"the source ends before byte {offset + n}")
        os.pwrite(dst, piece, to + done)
        done += len(piece)


def _ifd(fields: dict[int, TiffField], big: bool, at: int, last: bool) -> bytes:
    """One IFD at file offset `at`, its out-of-line values right behind it, then (unless last)
    the next IFD."""
    inline = 8 if big else 4
    entry_fmt, count_fmt, ptr_fmt = ("<HHQ", "<Q", "<Q") if big else ("<HHI", "<H", "<I")
    n = len(fields)
    table_size = (
        struct.calcsize(count_fmt) + n * (struct.calcsize(entry_fmt) + inline) + struct.calcsize(ptr_fmt)
    )
    values = b""
    table = struct.pack(count_fmt, n)
    for tag in sorted(fields):
        f = fields[tag]
        table += struct.pack(entry_fmt, tag, f.type, f.count)
        if len(f.data) <= inline:
            table += f.data.ljust(inline, b"\0")
        else:
            table += struct.pack(ptr_fmt, at + table_size + len(values))
            values += f.data + (b"\0" if len(f.data) % 2 else b"")  # word-aligned
    end = at + table_size + len(values)
    table += struct.pack(ptr_fmt, 0 if last else end)
    return table + values
