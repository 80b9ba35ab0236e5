"""The COG laid out from blocks compressed while stitching (tilefm.engine.cog): GDAL reads back exactly
what went in, at every level, and the file has the layout that COG readers rely on."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rio_cogeo import cog_validate

from tilefm.engine import cog
from tilefm.engine.cog import BLOCK, COGBuilder, encode_block, read_fields, template_fields
from tilefm.storage import EarlyParts, S3Storage

BANDS = 5
TRANSFORM = Affine(19.1, 0, -1_291_000.0, 0, -19.1, 2_870_000.0)
SPARSE = (2, 1)  # a base block no tile filled


def _levels(rng: np.random.Generator, bits: int, bands: int = BANDS) -> list[np.ndarray]:
    """A 3 x 2-block base with nodata holes and its two overview levels, as stored."""
    dtype = np.float16 if bits == 16 else np.float32
    base = rng.normal(scale=3, size=(bands, 2 * BLOCK, 3 * BLOCK)).astype(dtype).astype(np.float32)
    base[:, :10, :20] = np.nan
    base[:, BLOCK:, 2 * BLOCK :] = np.nan  # the sparse block
    levels = [base]
    for _ in range(2):
        c, h, w = levels[-1].shape
        levels.append(
            levels[-1].reshape(c, h // 2, 2, w // 2, 2).mean(axis=(2, 4)).astype(dtype).astype(np.float32)
        )
    return levels


def _build(
    tmp_path: Path,
    levels: list[np.ndarray],
    bits: int,
    bigtiff: bool | None = None,
    order: str = "reversed",
    expected: bool = True,
    base: Path | None = None,
    early: EarlyParts | None = None,
) -> COGBuilder:
    """The COG of `levels`, its blocks put in `order`: `reversed` (the last row's last block
    first), `rows` (row-major, as a stream over the plan mostly gives them); `expected`: the
    builder is told which full-resolution blocks will come."""
    bands, h, w = levels[0].shape
    profile = dict(
        count=bands,
        dtype="float32",
        nodata=float("nan"),
        crs="EPSG:3857",
        transform=TRANSFORM,
        **({"nbits": 16} if bits == 16 else {}),
    )
    fields = template_fields(profile, {"TILEFM_MODEL": "test"}, [f"embedding_{i:03d}" for i in range(bands)])
    puts = []
    for level, a in enumerate(levels):
        for by in range(-(-a.shape[1] // BLOCK)):
            for bx in range(-(-a.shape[2] // BLOCK)):
                if level == 0 and (bx, by) == SPARSE:
                    continue
                block = np.full((bands, BLOCK, BLOCK), np.nan, np.float32)
                part = a[:, by * BLOCK : (by + 1) * BLOCK, bx * BLOCK : (bx + 1) * BLOCK]
                block[:, : part.shape[1], : part.shape[2]] = part
                puts.append((level, bx, by, block))
    builder = COGBuilder(
        tmp_path / "blocks.bin",
        w,
        h,
        bands,
        len(levels) - 1,
        bits,
        fields,
        base=base or tmp_path / "out.tif",
        expected={(bx, by) for level, bx, by, _ in puts if level == 0} if expected else None,
        early=early,
    )
    for level, bx, by, block in puts[::-1] if order == "reversed" else puts:
        builder.put(level, bx, by, encode_block(block, bits))
    builder.finish(bigtiff=bigtiff)
    return builder


#: GDAL 3.11 on reads IEEE half floats as Float16; before, as Float32 with NBITS=16
GDAL_HAS_FLOAT16 = tuple(int(v) for v in rasterio.__gdal_version__.split(".")[:2]) >= (3, 11)


@pytest.fixture(params=["inserted", "rebuilt"])
def room(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How `finish` puts the front before the full-resolution blocks: room inserted in place
    where this file system can, or (as on tmpfs or macOS) a new file with them copied in."""
    if request.param == "rebuilt":
        monkeypatch.setattr(cog, "_insert_room", lambda path, n: False)
    return request.param


@pytest.mark.parametrize(
    "bits,bigtiff", [(16, None), (32, None), (16, True)], ids=["float16", "float32", "float16-bigtiff"]
)
def test_gdal_reads_back_every_level(tmp_path: Path, bits: int, bigtiff: bool | None, room: str) -> None:
    levels = _levels(np.random.default_rng(bits), bits)
    dst = _build(tmp_path, levels, bits, bigtiff).base
    with open(dst, "rb") as f:
        assert struct.unpack("<H", f.read(4)[2:])[0] == (43 if bigtiff else 42)
    valid, errors, warnings = cog_validate(str(dst), quiet=True)
    assert valid and not errors and not warnings, errors + warnings
    with rasterio.open(dst) as ds:
        assert ds.overviews(1) == [2, 4]
        assert ds.crs.to_epsg() == 3857 and ds.transform == TRANSFORM and np.isnan(ds.nodata)
        assert ds.tags()["TILEFM_MODEL"] == "test" and ds.descriptions[-1] == f"embedding_{BANDS - 1:03d}"
        assert (
            ds.profile["compress"] == "deflate"
            and ds.profile["interleave"] == "pixel"
            and ds.block_shapes[0] == (BLOCK, BLOCK)
        )
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        nbits = ds.tags(1, ns="IMAGE_STRUCTURE").get("NBITS")
        if bits == 32:
            assert (ds.dtypes[0], nbits) == ("float32", None)
        elif GDAL_HAS_FLOAT16:
            assert (ds.dtypes[0], nbits) == ("float16", None)
        else:
            assert (ds.dtypes[0], nbits) == ("float32", "16")
        assert "LAYOUT=IFDS_BEFORE_DATA" in ds.get_tag_item("GDAL_STRUCTURAL_METADATA", "TIFF")
        assert ds.get_tag_item("BLOCK_OFFSET_2_1", "TIFF", bidx=1) is None  # sparse: GDAL fills nodata
        np.testing.assert_array_equal(ds.read(), levels[0])
        windowed = ds.read(window=((300, 400), (100, 700)))
        np.testing.assert_array_equal(windowed, levels[0][:, 300:400, 100:700])
    for i in (1, 2):
        with rasterio.open(dst, OVERVIEW_LEVEL=i - 1) as ovr:
            np.testing.assert_array_equal(ovr.read(), levels[i])


@pytest.mark.parametrize("bits", [16, 32])
def test_a_block_encodes_the_same_in_any_memory_layout(bits: int) -> None:
    """The stitcher hands pixel-interleaved blocks (float16 for 16 bits), tests and GDAL-made
    data are bands-first float32: the same values give the same bytes (which GDAL reads back
    exactly, above)."""
    rng = np.random.default_rng(7)
    block = (
        rng.normal(scale=3, size=(BANDS, BLOCK, BLOCK))
        .astype(np.float16 if bits == 16 else np.float32)
        .astype(np.float32)
    )
    block[:, 5:9, 100:140] = np.nan
    want = encode_block(block, bits)
    pixels = np.ascontiguousarray(block.transpose(1, 2, 0))
    layouts = [pixels.transpose(2, 0, 1), np.asfortranarray(block)]
    if bits == 16:
        layouts += [block.astype(np.float16), pixels.astype(np.float16).transpose(2, 0, 1)]
    for a in layouts:
        assert encode_block(a, bits) == want


@pytest.mark.parametrize(
    "order,expected,hold",
    [("rows", False, None), ("reversed", True, None), ("reversed", False, None), ("reversed", True, 1)],
    ids=["in-order", "held-in-order", "as-they-came", "spilled"],
)
def test_blocks_lie_smallest_overview_first_with_gdals_leaders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, order: str, expected: bool, hold: int | None, room: str
) -> None:
    """Every IFD before any block; the coarsest level's blocks first, each overview row-major,
    the full resolution's last, each block with its size before it and its last 4 bytes after
    it. Full-resolution blocks that come early wait for those ahead of them (`expected`), so
    they lie row-major and the ghost area says so; past what may wait (`hold`), or when the
    builder was not told what will come, they lie as they came and the ghost area does not
    say ROW_MAJOR (a valid COG still, to rio-cogeo)."""
    if hold is not None:
        monkeypatch.setattr(cog, "HOLD_BYTES", hold)
    levels = _levels(np.random.default_rng(0), 16)
    dst = _build(tmp_path, levels, 16, order=order, expected=expected).base
    row_major = hold is None and (order == "rows" or expected)
    assert cog_validate(str(dst), quiet=True)[0]
    with rasterio.open(dst) as ds:
        np.testing.assert_array_equal(ds.read(), levels[0])
    raw = dst.read_bytes()
    spans = []
    with rasterio.open(dst) as ds:
        first_ifd = int(ds.get_tag_item("IFD_OFFSET", "TIFF", bidx=1))
        ifds = [first_ifd] + [int(ds.get_tag_item("IFD_OFFSET", "TIFF", bidx=1, ovr=i)) for i in range(2)]
        for level in range(3):
            src = ds if level == 0 else rasterio.open(dst, OVERVIEW_LEVEL=level - 1)
            ny, nx = -(-src.height // BLOCK), -(-src.width // BLOCK)
            for y in range(ny):
                for x in range(nx):
                    off = src.get_tag_item(f"BLOCK_OFFSET_{x}_{y}", "TIFF", bidx=1)
                    if off is None:
                        assert (level, x, y) == (0, *SPARSE)
                        continue
                    size = int(src.get_tag_item(f"BLOCK_SIZE_{x}_{y}", "TIFF", bidx=1))
                    spans.append((level, y, x, int(off), size))
        ghost = ds.get_tag_item("GDAL_STRUCTURAL_METADATA", "TIFF")
    assert first_ifd < 300 and ifds == sorted(ifds)
    assert min(s[3] for s in spans) > max(ifds)
    laid = [s[:3] for s in sorted(spans, key=lambda s: s[3])]
    overviews = [k for k in laid if k[0]]
    assert laid[: len(overviews)] == overviews == sorted(overviews, key=lambda k: (-k[0], k[1], k[2]))
    full = laid[len(overviews) :]
    rows = sorted(full, key=lambda k: (k[1], k[2]))
    assert full == (rows if row_major else rows[::-1])
    assert ("BLOCK_ORDER=ROW_MAJOR" in ghost) == row_major
    for *_, off, size in spans:
        assert struct.unpack("<I", raw[off - 4 : off])[0] == size
        assert raw[off + size : off + size + 4] == raw[off + size - 4 : off + size]


def test_template_fields_are_gdals(tmp_path: Path) -> None:
    """The georeferencing and metadata fields are those GDAL writes for the same profile."""
    profile = dict(count=3, dtype="float32", nodata=float("nan"), crs="EPSG:3857", transform=TRANSFORM)
    fields = template_fields(profile, {"A": "1"}, ["x", "y", "z"])
    ref = tmp_path / "ref.tif"
    with rasterio.open(ref, "w", driver="GTiff", width=BLOCK, height=BLOCK, **profile) as ds:
        ds.update_tags(A="1")
        ds.descriptions = ("x", "y", "z")
    theirs = read_fields(ref)
    assert set(fields) == {33550, 33922, 34735, 34737, 42112, 42113}
    for tag, f in fields.items():
        assert theirs[tag] == f, tag
    assert b'<Item name="DESCRIPTION" sample="2" role="description">z</Item>' in fields[42112].data


def test_room_is_inserted_before_a_files_data_or_nothing_changes(tmp_path: Path) -> None:
    """`_insert_room` moves no data where it works (ext4, XFS): the file reads as zeros, then
    what it held; where it cannot, it says so and the file is as it was."""
    path = tmp_path / "f.bin"
    data = np.random.default_rng(1).integers(0, 256, 3 * 4096 + 123, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    n = 2 * os.statvfs(tmp_path).f_bsize
    if cog._insert_room(path, n):
        assert path.read_bytes() == bytes(n) + data
    else:
        assert path.read_bytes() == data
    assert cog._insert_room(path, 0)  # nothing to insert: done


@pytest.mark.parametrize(
    "order,expected", [("reversed", True), ("rows", False)], ids=["held", "as-they-come"]
)
def test_full_resolution_goes_up_to_s3_while_the_cog_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_settings, order: str, expected: bool
) -> None:
    """With `early` parts, the full resolution's bytes go up as they are written (here given
    every ~1 MB, sent as parts of S3's smallest size), the front (header, IFDs, overviews,
    padded to S3's smallest part) and the rest at the end: the object is the COG, byte for
    byte. A failure before the end aborts the upload: no object, no upload left open."""
    monkeypatch.setattr(cog, "WRITEBACK_BYTES", 1 << 20)
    storage = S3Storage(s3_settings)
    uri = f"s3://tilefm/tests/cog-{os.getpid()}-{order}/out.tif"
    levels = _levels(np.random.default_rng(3), 16, bands=48)  # ~6 MB a block
    with storage.writing(uri, work_dir=tmp_path) as staged:
        builder = _build(
            tmp_path, levels, 16, order=order, expected=expected, base=staged.path, early=staged.early
        )
        assert staged.early is not None and staged.early.started  # parts went up during the writes
        staged.front = builder.front
        assert builder.front is not None and builder.front >= EarlyParts.MIN_PART
        written = staged.path.read_bytes()
    got = storage.get_file(uri, tmp_path / "got.tif")
    assert got.read_bytes() == written
    valid, errors, warnings = cog_validate(str(got), quiet=True)
    assert valid and not errors and not warnings, errors + warnings
    with rasterio.open(got) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        np.testing.assert_array_equal(ds.read(), levels[0])
    for i in (1, 2):
        with rasterio.open(got, OVERVIEW_LEVEL=i - 1) as ovr:
            np.testing.assert_array_equal(ovr.read(), levels[i])

    failed = uri.replace("out.tif", "failed.tif")
    (tmp_path / "again").mkdir()
    with (
        pytest.raises(RuntimeError, match="the stream broke"),
        storage.writing(failed, work_dir=tmp_path / "again") as staged,
    ):
        _build(tmp_path / "again", levels, 16, base=staged.path, early=staged.early)
        assert staged.early is not None and staged.early.started
        raise RuntimeError("the stream broke")
    assert not storage.exists(failed)
    key = failed.split("/", 3)[3]
    assert not storage.client.list_multipart_uploads(Bucket="tilefm", Prefix=key).get("Uploads")


@pytest.mark.parametrize("kernel", [True, False])
def test_copy_ranges_puts_every_byte_where_it_belongs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: bool
) -> None:
    """The COG step's copies: ranges split into pieces, by copy_file_range or, where the kernel
    cannot, by pread and pwrite; a source that ends early is an error."""
    monkeypatch.setattr(cog, "COPY_PIECE", 1000)
    if not kernel:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    data = np.random.default_rng(1).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    (tmp_path / "src").write_bytes(data)
    moves = [(0, 5000, 3500), (3500, 100, 2100), (9000, 0, 100), (6000, 8500, 3000)]
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "dst", "w+b") as dst:
        cog.copy_ranges(src.fileno(), dst.fileno(), moves)
        with open(tmp_path / "other", "wb") as other, pytest.raises(OSError, match="ends before byte 10001"):
            cog.copy_ranges(src.fileno(), other.fileno(), [(9000, 0, 1001)])
    got = (tmp_path / "dst").read_bytes()
    assert len(got) == 11_500
    for a, b, n in moves:
        assert got[b : b + n] == data[a : a + n]
