"""tilefm.storage against local files and a real S3 server (SeaweedFS, see tilefm.localstack)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import uuid
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from tilefm.errors import StorageError
from tilefm.settings import Settings
from tilefm.storage import (
    EarlyParts,
    FileLocation,
    FileStorage,
    S3Location,
    S3Storage,
    Storage,
    _pieces,
    gdal_config,
    gdal_env,
    parse_uri,
    storage_for,
)

MiB = 1024 * 1024


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.integration)])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty 'folder' URI on each backend."""
    if request.param == "file":
        return (tmp_path / "store").as_uri()
    request.getfixturevalue("s3_settings")
    return f"s3://tilefm/tests/{uuid.uuid4().hex}"


def _storage(uri: str, request: pytest.FixtureRequest) -> Storage:
    settings = request.getfixturevalue("s3_settings") if uri.startswith("s3://") else None
    return storage_for(uri, settings)


# -- round trips ----------------------------------------------------------------------------------


def test_round_trip(root: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    uri = f"{root}/a/b/hello.bin"
    storage = _storage(uri, request)
    assert not storage.exists(uri)

    storage.write_bytes(uri, b"hello")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"hello"
    storage.write_bytes(uri, b"replaced")
    assert storage.read_bytes(uri) == b"replaced"

    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(100_000))
    other = f"{root}/c/file with spaces.bin"
    storage.put_file(src, other)
    assert storage.read_bytes(other) == src.read_bytes()
    got = storage.get_file(other, tmp_path / "down" / "deep" / "got.bin")
    assert got == tmp_path / "down" / "deep" / "got.bin"
    assert got.read_bytes() == src.read_bytes()
    assert not [p for p in got.parent.iterdir() if p.name != "got.bin"], "temp files left"

    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)  # deleting what is not there is fine
    with pytest.raises(StorageError, match="hello.bin"):
        storage.read_bytes(uri)
    with pytest.raises(StorageError, match="hello.bin"):
        storage.get_file(uri, tmp_path / "missing.bin")
    assert not (tmp_path / "missing.bin").exists()


def test_plain_paths_are_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    storage = storage_for("out/x.txt")
    assert isinstance(storage, FileStorage)
    storage.write_bytes("out/x.txt", b"x")
    assert (tmp_path / "out" / "x.txt").read_bytes() == b"x"
    assert storage.read_bytes(tmp_path / "out" / "x.txt") == b"x"  # a Path works too
    assert storage.read_bytes((tmp_path / "out" / "x.txt").as_uri()) == b"x"
    assert storage.rasterio_path("out/x.txt") == str(tmp_path / "out" / "x.txt")
    assert parse_uri("file:///tmp/a%20b.tif") == FileLocation(Path("/tmp/a b.tif"))
    assert parse_uri("weird:name.tif") == FileLocation(tmp_path / "weird:name.tif")


def test_file_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FileStorage()
    dest = tmp_path / "out.tif"
    dest.write_bytes(b"old")
    src = tmp_path / "big.bin"
    src.write_bytes(b"n" * MiB)

    def broken_copy(a: object, b: str | Path, *args: object, **kwargs: object) -> None:
        Path(b).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", broken_copy)
    with pytest.raises(StorageError, match="No space left"):
        storage.put_file(src, dest)
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin", "out.tif"]

    monkeypatch.undo()
    storage.put_file(src, dest)
    assert dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin", "out.tif"]


def test_writing_puts_the_object_only_when_the_block_succeeds(
    root: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """`Storage.writing`: what is written to the path it gives becomes the object on a clean
    exit; an error leaves what was there (or nothing) and no temporary file. Local files are
    written in place, beside the destination, not in the work folder."""
    uri = f"{root}/w/out.tif"
    storage = _storage(uri, request)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(RuntimeError, match="the job failed"), storage.writing(uri, work_dir=work) as staged:
        staged.path.write_bytes(b"half")
        raise RuntimeError("the job failed")
    assert not storage.exists(uri)
    with storage.writing(uri, work_dir=work) as staged:
        staged.path.write_bytes(b"a COG" * 1000)
        assert not storage.exists(uri)  # not before the block ends
        if uri.startswith("file:"):
            assert staged.path.parent == Path(uri[len("file://") :]).parent
    assert storage.read_bytes(uri) == b"a COG" * 1000
    with pytest.raises(RuntimeError), storage.writing(uri, work_dir=work) as staged:
        staged.path.write_bytes(b"new")
        raise RuntimeError
    assert storage.read_bytes(uri) == b"a COG" * 1000
    assert list(work.iterdir()) == []
    if uri.startswith("file:"):
        assert [p.name for p in Path(uri[len("file://") :]).parent.iterdir()] == ["out.tif"]


@pytest.mark.parametrize(
    "n",
    [
        0,
        1,
        EarlyParts.MIN_PART - 1,
        EarlyParts.MIN_PART,
        3 * EarlyParts.MIN_PART + 7,
        100 * EarlyParts.MIN_PART,
    ],
)
def test_early_parts_split_a_range_into_parts_s3_takes(n: int) -> None:
    """The front and the rest go up in parts that cover them exactly, in order, each but the
    last at least S3's smallest part, no more than asked for."""
    pieces = _pieces(1000, n, 16)
    assert len(pieces) <= 16 and (pieces == [] if n == 0 else len(pieces) >= 1)
    at = 1000
    for i, (offset, size) in enumerate(pieces):
        assert offset == at and (size >= EarlyParts.MIN_PART or i == len(pieces) - 1)
        at += size
    assert at == 1000 + n


# -- S3 specifics ---------------------------------------------------------------------------------


def test_multipart_upload(s3_server, s3_settings: Settings, tmp_path: Path) -> None:
    settings = s3_settings.model_copy(update={"s3_multipart_chunksize": 5 * MiB})
    storage = storage_for("s3://tilefm/x", settings)
    src = tmp_path / "big.bin"
    data = os.urandom(12 * MiB)
    src.write_bytes(data)
    uri = f"s3://tilefm/tests/{uuid.uuid4().hex}/big.bin"

    storage.put_file(src, uri)

    head = s3_server.client().head_object(Bucket="tilefm", Key=uri.split("/", 3)[3])
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3"), f"not a 3-part upload: {head['ETag']}"
    got = storage.get_file(uri, tmp_path / "got.bin")
    assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(data).digest()
    storage.delete(uri)


def test_check_writable(root: str, request: pytest.FixtureRequest) -> None:
    uri = f"{root}/run/out.tif"
    storage = _storage(uri, request)
    storage.check_writable(uri)
    assert not storage.exists(uri)
    if isinstance(storage, S3Storage):  # the probe object is gone again
        loc = parse_uri(uri)
        listing = storage.client.list_objects_v2(Bucket="tilefm", Prefix=loc.key.rsplit("/", 1)[0])
        assert listing["KeyCount"] == 0


def test_check_writable_missing_bucket(s3_settings: Settings) -> None:
    storage = storage_for("s3://no-such-bucket-tilefm/out.tif", s3_settings)
    with pytest.raises(StorageError, match="'no-such-bucket-tilefm' does not exist") as e:
        storage.check_writable("s3://no-such-bucket-tilefm/out.tif")
    assert e.value.field == "out"
    with pytest.raises(StorageError, match="no-such-bucket-tilefm"):
        storage.write_bytes("s3://no-such-bucket-tilefm/out.tif", b"x")


def test_check_writable_file_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_bytes(b"")
    uri = (tmp_path / "a-file" / "out.tif").as_uri()
    with pytest.raises(StorageError, match="out.tif"):
        FileStorage().check_writable(uri)
    with pytest.raises(StorageError, match="it is a folder"):
        FileStorage().check_writable(tmp_path)


def test_bad_credentials(s3_settings: Settings) -> None:
    settings = Settings(**{**s3_settings.model_dump(), "s3_secret_access_key": "wrong"})
    with pytest.raises(StorageError, match="rejected the credentials"):
        storage_for("s3://tilefm/x", settings).read_bytes("s3://tilefm/x")


def test_connection_refused_names_the_endpoint() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    settings = Settings(s3_endpoint_url=endpoint, s3_access_key_id="k", s3_secret_access_key="s")
    storage = storage_for("s3://tilefm/x.tif", settings)
    with pytest.raises(StorageError, match=f"cannot connect to S3 endpoint {endpoint}"):
        storage.check_writable("s3://tilefm/x.tif")


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("http://example.com/a.tif", "unsupported URI scheme 'http'"),
        ("https://example.com/a.tif", "unsupported URI scheme 'https'"),
        ("gs://bucket/a.tif", "unsupported URI scheme 'gs'"),
        ("ftp://host/a.tif", "unsupported URI scheme 'ftp'"),
        ("s3:bucket/a.tif", "malformed URI"),
        ("s3://", "no bucket"),
        ("s3:///a.tif", "no bucket"),
        ("s3://bucket", "no object key"),
        ("s3://bucket/", "no object key"),
        ("s3://Bad_Bucket/a.tif", "invalid bucket name"),
        ("file://host/a.tif", "names host 'host'"),
        ("file://relative.tif", "names host"),
        ("file:///data/out/", "names a folder"),
    ],
)
def test_bad_uris(uri: str, problem: str) -> None:
    for call in (parse_uri, storage_for):
        with pytest.raises(StorageError) as e:
            call(uri)
        assert problem in str(e.value)
        assert repr(uri) in str(e.value)


def test_empty_uri() -> None:
    with pytest.raises(StorageError, match="empty URI"):
        parse_uri(" ")


def test_parse_s3() -> None:
    loc = parse_uri("s3://my-bucket/a/b c?d#e.tif")
    assert loc == S3Location("my-bucket", "a/b c?d#e.tif")
    assert loc.uri == "s3://my-bucket/a/b c?d#e.tif"
    assert S3Storage(Settings()).rasterio_path(loc.uri) == "/vsis3/my-bucket/a/b c?d#e.tif"


# -- GDAL -----------------------------------------------------------------------------------------


def test_gdal_config() -> None:
    settings = Settings(
        s3_endpoint_url="https://minio.example:9000",
        s3_region="eu-west-1",
        s3_access_key_id="AK",
        s3_secret_access_key="SK",
    )
    config = gdal_config(settings)
    assert config["AWS_S3_ENDPOINT"] == "minio.example:9000"
    assert config["AWS_HTTPS"] == "YES"
    assert config["AWS_VIRTUAL_HOSTING"] == "FALSE"
    assert config["AWS_REGION"] == "eu-west-1"
    assert (config["AWS_ACCESS_KEY_ID"], config["AWS_SECRET_ACCESS_KEY"]) == ("AK", "SK")
    assert all(isinstance(v, str) for v in config.values())

    env = gdal_env(settings)  # rasterio takes the keys only in a session
    assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert env["session"].get_credential_options()["AWS_ACCESS_KEY_ID"] == "AK"
    assert env["AWS_S3_ENDPOINT"] == "minio.example:9000"

    # AWS itself, and GDAL's own credential chain
    aws = Settings(s3_endpoint_url=None, s3_access_key_id=None, s3_secret_access_key=None)
    assert "AWS_S3_ENDPOINT" not in gdal_config(aws) and "AWS_ACCESS_KEY_ID" not in gdal_config(aws)
    assert "session" not in gdal_env(aws)
    with pytest.raises(StorageError, match="not an http"):
        gdal_config(Settings(s3_endpoint_url="127.0.0.1:9000"))


def test_rasterio_reads_from_s3(s3_settings: Settings, tmp_path: Path) -> None:
    data = np.arange(64 * 48, dtype=np.uint16).reshape(1, 48, 64)
    local = tmp_path / "small.tif"
    profile = dict(
        driver="GTiff",
        width=64,
        height=48,
        count=1,
        dtype="uint16",
        crs="EPSG:32633",
        transform=Affine(10, 0, 500000, 0, -10, 4600000),
        tiled=True,
        blockxsize=32,
        blockysize=16,
        compress="deflate",
    )
    with rasterio.open(local, "w", **profile) as dst:
        dst.write(data)
    uri = f"s3://tilefm/tests/{uuid.uuid4().hex}/small.tif"
    storage = storage_for(uri, s3_settings)
    storage.put_file(local, uri)

    path = storage.rasterio_path(uri)
    assert path.startswith("/vsis3/tilefm/tests/")
    with rasterio.Env(**gdal_env(s3_settings)), rasterio.open(path) as src:
        assert src.crs.to_epsg() == 32633
        assert src.transform == profile["transform"]
        np.testing.assert_array_equal(src.read(), data)
    storage.delete(uri)
