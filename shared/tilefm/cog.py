"""A Cloud-Optimized GeoTIFF laid out from blocks compressed while the stream runs.

GDAL's COG driver copies a finished mosaic: it decompresses it, interleaves it, compresses it
again and computes the overviews, all after the last tile. For a 128-band full-resolution
output that took ~3 s per tile on two cores (the overviews ~2.7 s of it), far more than a GPU
spends encoding the tile. Here each 256-px block of every level is compressed as soon as it is
final (DEFLATE with the TIFF predictor, on worker threads: the predictor through torch and the
compression through ISA-L both run without the GIL) and appended to a scratch file; `finish`
then writes the TIFF header and every IFD, and copies the blocks behind them in COG order
(smallest overview first), without decoding anything.

The georeferencing and GDAL's metadata (tags, band descriptions, nodata) are not encoded here:
GDAL writes them into a small template GeoTIFF, and their TIFF fields are copied as they are.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import rasterio

BLOCK = 256
#: the words' byte order in memory (the predictor's planes go most significant byte first)
LITTLE_ENDIAN = sys.byteorder == "little"
#: ISA-L's levels are 0-3; 1 is ~6x libdeflate's level 6 on float16 embeddings, 3% larger
DEFLATE_LEVEL = 1
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
    def of(cls, type_: int, values: list[int]) -> "TiffField":
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
        entries = [struct.unpack(entry_fmt, f.read(struct.calcsize(entry_fmt))) + (f.read(inline),) for _ in range(n)]
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


def template_fields(profile: dict[str, Any], tags: dict[str, str], descriptions: list[str], scale_offset: tuple[float, float] | None = None) -> dict[int, TiffField]:
    """GDAL's georeferencing and metadata fields for a raster of this profile (and the scale and
    offset of every band, for quantized values): written by GDAL into a one-block GeoTIFF and
    read back."""
    with tempfile.TemporaryDirectory(prefix="tilefm-cog-") as tmp:
        path = Path(tmp) / "template.tif"
        small = {**profile, "driver": "GTiff", "width": BLOCK, "height": BLOCK, "tiled": True, "blockxsize": BLOCK, "blockysize": BLOCK, "sparse_ok": True}
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
    """A thread's two byte arrays for the predictor (the planes and their difference), kept for
    the block shape it last encoded."""

    def __init__(self) -> None:
        self.arrays: tuple[np.ndarray, np.ndarray] | None = None

    def get(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        if self.arrays is None or self.arrays[0].shape != shape:
            self.arrays = (np.empty(shape, np.uint8), np.empty(shape, np.uint8))
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
    words; each byte plane is copied out of the interleaved words, and the difference written
    into another array (torch's in-place difference over overlapping slices is ~10x slower).
    Both arrays are the calling thread's, reused: fresh ones cost a 768-band block ~50k page
    faults each."""
    import torch
    from isal import isal_zlib

    bands, h, w = values.shape
    if bits == 8:
        pixels8 = torch.from_numpy(values).to(torch.int8).permute(1, 2, 0).contiguous()
        return isal_zlib.compress(memoryview(pixels8.numpy()), DEFLATE_LEVEL)
    nbytes = bits // 8
    x = torch.from_numpy(values).to(torch.float16 if bits == 16 else torch.float32)  # strides kept
    words = x.view(torch.int16 if bits == 16 else torch.int32)
    if words.is_contiguous():  # bands first
        pixels = words.reshape(bands, h * w).t().contiguous()
    else:
        pixels = words.permute(1, 2, 0).contiguous()  # no copy when pixel-interleaved
    # each word's bytes as they lie in memory; plane j takes the j-th most significant byte of
    # every word, one strided copy per plane through numpy (GIL released; shifting and narrowing
    # through torch took 5x as long for a 768-band block, torch's strided byte copy 1.7x)
    octets = pixels.view(torch.uint8).view(h, w * bands, nbytes).numpy()
    split, out = _scratch.get((h, nbytes, w * bands))
    for j in range(nbytes):  # most significant byte first
        split[:, j] = octets[:, :, nbytes - 1 - j if LITTLE_ENDIAN else j]
    planes = torch.from_numpy(split).view(h, -1)
    diff = torch.from_numpy(out).view(h, -1)
    diff[:, :bands] = planes[:, :bands]
    torch.sub(planes[:, bands:], planes[:, :-bands], out=diff[:, bands:])  # uint8: wraps, as the predictor does
    return isal_zlib.compress(memoryview(diff.numpy()), DEFLATE_LEVEL)


@dataclass
class COGBuilder:
    """Blocks of every level, compressed elsewhere and appended here in any order; `finish`
    writes the COG. Level 0 is the full resolution; level i is 2^i coarser (GDAL's overviews).
    `bits`: 16 or 32 (IEEE floats, floating-point predictor) or 8 (int8, no predictor)."""

    scratch: Path
    width: int
    height: int
    bands: int
    levels: int
    bits: int
    fields: dict[int, TiffField]
    _offsets: list[dict[tuple[int, int], tuple[int, int]]] = field(init=False)
    _file: BinaryIO = field(init=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._offsets = [{} for _ in range(self.levels + 1)]
        self._file = open(self.scratch, "wb")

    def size(self, level: int) -> tuple[int, int]:
        return -(-self.width // (1 << level)), -(-self.height // (1 << level))

    def blocks(self, level: int) -> tuple[int, int]:
        w, h = self.size(level)
        return -(-w // BLOCK), -(-h // BLOCK)

    def put(self, level: int, bx: int, by: int, data: bytes) -> None:
        """One compressed block (thread-safe). A block never put is sparse: nodata to GDAL."""
        with self._lock:
            self._offsets[level][(bx, by)] = (self._file.tell(), len(data))
            self._file.write(data)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def finish(self, dst: Path, bigtiff: bool | None = None) -> None:
        """Header, ghost area and IFDs, then the blocks, smallest overview first, each level in
        row-major order, each block with GDAL's 4-byte size before and its last 4 bytes after
        (what GDAL's own COGs carry, and its ghost area announces). BigTIFF only where the
        file needs it, unless `bigtiff` says."""
        self.close()
        data_bytes = sum(n + 8 for level in self._offsets for _, n in level.values())
        for big in (False, True) if bigtiff is None else (bigtiff,):
            head, ifds = self._layout(big)  # sizes only
            start = len(head) + len(ifds)
            if big or start + data_bytes < 2**32 or bigtiff is False:
                break
        # where each block lands: levels coarsest first, blocks row-major
        placed: list[dict[tuple[int, int], int]] = [{} for _ in self._offsets]
        pos = start
        for level in range(self.levels, -1, -1):
            for key in sorted(self._offsets[level], key=lambda k: (k[1], k[0])):
                placed[level][key] = pos + 4  # after the size leader
                pos += self._offsets[level][key][1] + 8
        head, ifds = self._layout(big, placed)
        with open(dst, "wb") as out, open(self.scratch, "rb") as src:
            out.write(head + ifds)
            for level in range(self.levels, -1, -1):
                for key in sorted(self._offsets[level], key=lambda k: (k[1], k[0])):
                    off, n = self._offsets[level][key]
                    out.write(struct.pack("<I", n))
                    _copy_range(src, out, off, n)
                    out.write(os.pread(src.fileno(), 4, off + n - 4))

    def _layout(self, big: bool, placed: list[dict[tuple[int, int], int]] | None = None) -> tuple[bytes, bytes]:
        ghost = (
            "LAYOUT=IFDS_BEFORE_DATA\nBLOCK_ORDER=ROW_MAJOR\nBLOCK_LEADER=SIZE_AS_UINT4\n"
            "BLOCK_TRAILER=LAST_4_BYTES_REPEATED\nKNOWN_INCOMPATIBLE_EDITION=NO\n "
        )  # the space, as in GDAL's: room for an editor to say YES
        ghost = f"GDAL_STRUCTURAL_METADATA_SIZE={len(ghost):06d} bytes\n{ghost}".encode()
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
                339: TiffField.of(SHORT, [2 if self.bits == 8 else 3] * self.bands),  # signed int / IEEE float
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


def _copy_range(src: BinaryIO, dst: BinaryIO, offset: int, n: int) -> None:
    """Bytes [offset, offset + n) of `src` appended to `dst`: by the kernel where it can
    (copy_file_range: no pass through user memory, and no GIL held), else read and written.
    Joining each block with its leader and trailer in Python took ~2 s of a 1.2 GB COG, all
    of it holding the GIL."""
    dst.flush()
    if hasattr(os, "copy_file_range"):
        try:
            done = 0
            while done < n:
                step = os.copy_file_range(src.fileno(), dst.fileno(), n - done, offset + done)
                if step == 0:
                    raise OSError(f"{src.name} ends before byte {offset + n}")
                done += step
            dst.seek(0, os.SEEK_END)
            return
        except OSError as e:
            if done or e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                raise
    src.seek(offset)
    dst.write(src.read(n))


def _ifd(fields: dict[int, TiffField], big: bool, at: int, last: bool) -> bytes:
    """One IFD at file offset `at`, its out-of-line values right behind it, then (unless last)
    the next IFD."""
    inline = 8 if big else 4
    entry_fmt, count_fmt, ptr_fmt = ("<HHQ", "<Q", "<Q") if big else ("<HHI", "<H", "<I")
    n = len(fields)
    table_size = struct.calcsize(count_fmt) + n * (struct.calcsize(entry_fmt) + inline) + struct.calcsize(ptr_fmt)
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
