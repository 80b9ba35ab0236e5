"""One interface over local files and S3-compatible object stores.

A location is written as a URI:

* ``file:///abs/path/out.tif`` or a plain path (``out.tif``, ``/data/out.tif``, ``~/out.tif``);
* ``s3://bucket/key/out.tif`` (AWS, or the endpoint in ``Settings.s3_endpoint_url``).

Anything else (``http://``, ``gs://``, ``ftp://``, a URI without a bucket or key, ...) is a
`StorageError` naming the URI and what is wrong with it.

    storage = storage_for(uri, settings)
    storage.check_writable(uri)          # before a long run: fail now, not after it
    ...
    storage.put_file(local_cog, uri)     # atomic: the destination is whole or absent
    with storage.writing(uri) as path:   # or: write a local file that becomes the object
        make_cog(path)

GDAL reads through `rasterio_path` under ``rasterio.Env(**gdal_env(settings))`` (or with
`gdal_config(settings)` in a GDAL process's environment).

Writes never leave a half-written object behind: local files are written to a temporary file
in the destination folder and renamed into place; S3 objects only appear once a (multipart)
upload completes, and a failed multipart upload is aborted.

Why one module (~850 lines): URI parsing, the `Storage` interface and its two backends are one
contract that every caller sees through `storage_for`; the S3 half is most of it (multipart uploads,
early parts, error mapping), and its errors must name the URI the same way the local half does.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import unquote, urlsplit

from tilefm.errors import StorageError
from tilefm.settings import Settings, get_settings

if TYPE_CHECKING:  # boto3 is imported lazily: local-only runs never pay for it
    from botocore.client import BaseClient

__all__ = [
    "FileLocation",
    "FileStorage",
    "Location",
    "S3Location",
    "S3Storage",
    "Storage",
    "gdal_config",
    "gdal_env",
    "make_s3_client",
    "parse_uri",
    "storage_for",
]

PathLike = str | os.PathLike[str]

# ---------------------------------------------------------------------------------------------
# URIs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileLocation:
    """A local file, as an absolute path (not resolved through symlinks)."""

    path: Path
    scheme: ClassVar[str] = "file"

    @property
    def uri(self) -> str:
        return self.path.as_uri()

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class S3Location:
    """An object in an S3 bucket."""

    bucket: str
    key: str
    scheme: ClassVar[str] = "s3"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def __str__(self) -> str:
        return self.uri


Location = FileLocation | S3Location

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):(.*)$", re.DOTALL)
# schemes we recognise even without "//" after them, so that "s3:bucket/key" is an error and
# not a local file called "s3:bucket"
_KNOWN_SCHEMES = {
    "s3", "s3a", "s3n", "file", "http", "https", "gs", "gcs", "ftp", "ftps", "sftp", "ssh",
    "az", "abfs", "abfss", "wasb", "wasbs", "adl", "hdfs", "webdav", "oss", "swift", "vsis3",
}  # fmt: skip
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def parse_uri(uri: PathLike) -> Location:
    """Parse ``file://`` / ``s3://`` URIs and plain local paths into a typed location.

    Raises `StorageError` (naming the URI) for unsupported schemes, a missing or invalid
    bucket, a missing key, a ``file://`` URI with a host or a relative path, or an empty URI.
    """
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if not isinstance(uri, str):
        raise StorageError(f"expected a URI or a path, got {type(uri).__name__}: {uri!r}")
    if not uri.strip():
        raise StorageError("empty URI: give a local path, file:///path or s3://bucket/key")

    m = _SCHEME_RE.match(uri)
    scheme = m.group(1).lower() if m else ""
    if not m or (not m.group(2).startswith("//") and scheme not in _KNOWN_SCHEMES):
        # a plain path (possibly with a ':' in a file name)
        return FileLocation(Path(os.path.abspath(os.path.expanduser(uri))))

    rest = m.group(2)
    if not rest.startswith("//"):
        raise StorageError(f"malformed URI {uri!r}: expected {scheme}://...")
    if scheme == "file":
        return _parse_file_uri(uri)
    if scheme == "s3":
        return _parse_s3_uri(uri, rest[2:])
    raise StorageError(
        f"unsupported URI scheme {scheme!r} in {uri!r}: use s3://bucket/key, file:///path or a local path"
    )


def _parse_file_uri(uri: str) -> FileLocation:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise StorageError(
            f"file URI {uri!r} names host {parts.netloc!r}: only local files are supported "
            "(write file:///absolute/path, with three slashes)"
        )
    if parts.query or parts.fragment:
        raise StorageError(
            f"file URI {uri!r} has a query or fragment; percent-encode '?' and '#' in file names"
        )
    path = unquote(parts.path)
    if not path or not path.startswith("/"):
        raise StorageError(f"file URI {uri!r} has no absolute path (write file:///abs/path)")
    if path.endswith("/"):
        raise StorageError(f"file URI {uri!r} names a folder, not a file")
    return FileLocation(Path(os.path.normpath(path)))


def _parse_s3_uri(uri: str, rest: str) -> S3Location:
    # S3 URIs are not percent-encoded (as in the AWS CLI): '?', '#', spaces belong to the key
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"S3 URI {uri!r} has no bucket (expected s3://bucket/key)")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise StorageError(
            f"S3 URI {uri!r} has an invalid bucket name {bucket!r} "
            "(3-63 characters: lower-case letters, digits, '.', '-')"
        )
    if not key:
        raise StorageError(f"S3 URI {uri!r} has no object key (expected s3://{bucket}/key)")
    return S3Location(bucket, key)


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------


@dataclass
class Staged:
    """The local file an object is written to before it is put (`Storage.writing`)."""

    path: Path
    #: where the bytes behind the file's front can go ahead while it is written (S3
    #: multipart parts); None: the file is put whole when the block ends
    early: EarlyParts | None = None
    #: the size of the front, given by the writer once the file is complete, if it sent parts
    front: int | None = None


class EarlyParts:
    """An object uploaded in parts while its file is written: first the bytes behind a front
    whose size is known only at the end (a COG's full resolution, which the stream writes
    before its header, IFDs and overviews), in order, as they are final; then, once the file
    is complete (`complete`), the front as the first parts (numbers 1 to FRONT_PARTS) and the
    rest as the last ones, in parallel. S3 joins parts by number, so no byte goes up twice and
    the bytes' final offsets need not be known when they go. Parts go up on background
    threads, each read from the file when its turn comes (`quiesce` waits for those reads,
    before the file is rearranged). Nothing is started for a file that never had a part to
    send: it is then put whole."""

    #: S3's smallest part (all but the last): a front must be at least this large
    MIN_PART = 5 * 1024 * 1024
    #: part numbers kept for the front (it goes up in up to this many parts, in parallel);
    #: the bytes behind it are numbered from FRONT_PARTS + 1
    FRONT_PARTS = 16

    def __init__(self, storage: S3Storage, loc: S3Location, workers: int = 4):
        self.storage, self.loc = storage, loc
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tilefm-upload")
        self._parts: dict[int, Future[str]] = {}
        self._reads: list[Future[None]] = []
        self._created: Future[str] | None = None  # the multipart upload's id, once asked for
        self._given = 0  # bytes behind the front given by the writer so far
        self._sent = 0  # of which sent as parts (a part waits for MIN_PART of them)

    @property
    def started(self) -> bool:
        return self._created is not None

    def send(self, path: Path, offset: int, n: int) -> None:
        """Bytes [offset, offset + n) of `path` are final and come next behind the front (they
        go up once MIN_PART of them have come)."""
        if offset != self._given:
            raise ValueError(f"parts come in order: {self._given} bytes given, then {offset}")
        self._given += n
        n = self._given - self._sent
        if n < self.MIN_PART:
            return
        if self._created is None:  # on the pool too: no round trip on the writer's thread
            self._created = self._pool.submit(self._create)
        number = self.FRONT_PARTS + 1 + len(self._parts)
        read: Future[None] = Future()
        self._reads.append(read)
        self._parts[number] = self._pool.submit(self._read_and_upload, number, read, path, self._sent, n)
        self._sent = self._given

    def _read_and_upload(self, number: int, read: Future[None], path: Path, offset: int, n: int) -> str:
        try:
            with open(path, "rb") as f:
                data = os.pread(f.fileno(), n, offset)
            if len(data) != n:
                raise StorageError(f"cannot upload to {self.loc}: {path} ends before byte {offset + n}")
        except BaseException as e:
            read.set_exception(e)
            raise
        read.set_result(None)
        return self._upload(number, data)

    def _create(self) -> str:
        loc = self.loc
        with self.storage._errors("cannot upload to", loc):
            return str(
                self.storage.client.create_multipart_upload(Bucket=loc.bucket, Key=loc.key)["UploadId"]
            )

    def _upload(self, number: int, data: bytes) -> str:
        if self._created is None:
            raise RuntimeError("self._created is not set")
        upload_id = self._created.result()
        loc = self.loc
        with self.storage._errors("cannot upload to", loc):
            r = self.storage.client.upload_part(
                Bucket=loc.bucket, Key=loc.key, UploadId=upload_id, PartNumber=number, Body=data
            )
        return str(r["ETag"])

    def quiesce(self) -> None:
        """Wait until every part sent has read its bytes (the file may then be rearranged)."""
        for r in self._reads:
            r.result()

    def complete(self, path: Path, front: int) -> None:
        """`path` is the whole object: its first `front` bytes, then those sent, then the rest."""
        self.quiesce()
        size = os.path.getsize(path)
        if front + self._sent > size:
            raise StorageError(f"cannot upload to {self.loc}: {path} is shorter than the parts sent")
        if front < self.MIN_PART:
            raise ValueError(f"a front of {front} bytes is under S3's smallest part ({self.MIN_PART} bytes)")
        uploads = dict(self._parts)
        last = self.FRONT_PARTS + len(self._parts)
        pieces = [(n + 1, at, m) for n, (at, m) in enumerate(_pieces(0, front, self.FRONT_PARTS))]
        pieces += [
            (last + n + 1, at, m)
            for n, (at, m) in enumerate(_pieces(front + self._sent, size - front - self._sent, 64))
        ]
        for number, at, m in pieces:
            read: Future[None] = Future()
            uploads[number] = self._pool.submit(self._read_and_upload, number, read, path, at, m)
        etags = [{"PartNumber": k, "ETag": uploads[k].result()} for k in sorted(uploads)]
        if self._created is None:
            raise RuntimeError("self._created is not set")
        loc = self.loc
        with self.storage._errors("cannot upload to", loc):
            self.storage.client.complete_multipart_upload(
                Bucket=loc.bucket,
                Key=loc.key,
                UploadId=self._created.result(),
                MultipartUpload={"Parts": etags},
            )
        self._created = None
        self._pool.shutdown()

    def abort(self) -> None:
        """Drop what was sent (on any failure before `complete`): the object stays as it was."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._created is not None:
            loc = self.loc
            with contextlib.suppress(Exception):
                self.storage.client.abort_multipart_upload(
                    Bucket=loc.bucket, Key=loc.key, UploadId=self._created.result()
                )
            self._created = None


def _pieces(start: int, n: int, most: int) -> list[tuple[int, int]]:
    """[start, start + n) as up to `most` (offset, size) pieces of at least EarlyParts.MIN_PART
    each (the last takes the rest; one piece if n is smaller)."""
    count = max(1, min(most, n // EarlyParts.MIN_PART))
    step = n // count
    return [(start + i * step, step if i < count - 1 else n - i * step) for i in range(count)] if n else []


class Storage(ABC):
    """Read and write whole objects at URIs of one scheme. Every failure is a `StorageError`."""

    scheme: ClassVar[str]

    @abstractmethod
    def put_file(self, local_path: PathLike, uri: PathLike) -> None:
        """Copy a local file to `uri`, atomically (the destination is whole or untouched)."""

    @contextmanager
    def writing(self, uri: PathLike, work_dir: PathLike | None = None) -> Iterator[Staged]:
        """A local file to write the object for `uri` into (what is there may be replaced):
        once the block exits without an error the object is put at `uri`, atomically;
        otherwise nothing is. Here, a file in a temporary folder (in `work_dir`) that is then
        uploaded; local files are written in place instead (`FileStorage.writing`), so that a
        large output is not written twice, and S3 objects can go up in parts while they are
        written (`S3Storage.writing`)."""
        name = Path(self._parse(uri).uri).name or "object"
        with tempfile.TemporaryDirectory(prefix="tilefm-put-", dir=work_dir) as tmp:
            staged = Staged(Path(tmp) / name)
            staged.path.touch()
            yield staged
            self.put_file(staged.path, uri)

    @abstractmethod
    def get_file(self, uri: PathLike, local_path: PathLike) -> Path:
        """Copy `uri` to a local file (atomically, creating its folder); returns its path."""

    @abstractmethod
    def read_bytes(self, uri: PathLike) -> bytes: ...

    @abstractmethod
    def write_bytes(self, uri: PathLike, data: bytes) -> None:
        """Write `data` to `uri`, atomically, replacing what was there."""

    @abstractmethod
    def exists(self, uri: PathLike) -> bool: ...

    @abstractmethod
    def delete(self, uri: PathLike) -> None:
        """Delete `uri`; deleting something that is not there is not an error."""

    @abstractmethod
    def check_writable(self, uri: PathLike) -> None:
        """Raise `StorageError` now if `uri` cannot be written later (call before a long run)."""

    def check_creatable(self, uri: PathLike) -> None:
        """`check_writable`, leaving nothing behind: for a check on behalf of others (a service
        validating a submission), where a folder made for a job that never runs would stay."""
        self.check_writable(uri)

    @abstractmethod
    def rasterio_path(self, uri: PathLike) -> str:
        """A path GDAL/rasterio can open (use it under ``rasterio.Env(**gdal_env(settings))``)."""

    def _parse(self, uri: PathLike) -> Location:
        loc = parse_uri(uri)
        if loc.scheme != self.scheme:
            raise StorageError(f"{type(self).__name__} cannot handle {loc.scheme} URI {uri!r}")
        return loc


def storage_for(uri: PathLike, settings: Settings | None = None) -> Storage:
    """The storage for `uri`'s scheme (validating the URI). `settings` defaults to the env's."""
    loc = parse_uri(uri)
    if isinstance(loc, S3Location):
        return S3Storage(settings if settings is not None else get_settings())
    return FileStorage()


# ---------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------


@contextmanager
def _atomic_dest(dest: Path, uri: object) -> Iterator[Path]:
    """Yield a fresh temporary path beside `dest`; on success rename it onto `dest`.

    The temporary file is created with the default permissions (0666 & ~umask), like a plain
    ``open(dest, "w")`` would, and is removed if anything fails.
    """
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(e, "cannot create the folder for", uri) from e
    if dest.is_dir():
        raise StorageError(f"cannot write {uri}: it is a folder")
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:
        raise _os_error(e, "cannot write", uri) from e
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _os_error(e, "cannot write", uri) from e
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error(e: OSError, what: str, uri: object) -> StorageError:
    reason = e.strerror or str(e)
    if isinstance(e, FileNotFoundError):
        reason = "no such file or folder"
    elif isinstance(e, PermissionError):
        reason = "permission denied"
    elif isinstance(e, IsADirectoryError):
        reason = "it is a folder"
    filename = f" ({e.filename})" if e.filename and str(e.filename) != str(uri) else ""
    return StorageError(f"{what} {uri}: {reason}{filename}")


class FileStorage(Storage):
    """Local files (``file://`` URIs and plain paths)."""

    scheme = "file"

    def _path(self, uri: PathLike) -> Path:
        loc = self._parse(uri)
        if not isinstance(loc, FileLocation):
            raise TypeError(f"expected a FileLocation, got {loc!r}")
        return loc.path

    def put_file(self, local_path: PathLike, uri: PathLike) -> None:
        self._copy(Path(local_path), self._path(uri), uri)

    @contextmanager
    def writing(self, uri: PathLike, work_dir: PathLike | None = None) -> Iterator[Staged]:
        """`Storage.writing`, in place: a temporary name beside the destination, flushed to
        disk and renamed onto it (a 1.3 GB COG written once, not written then copied)."""
        with _atomic_dest(self._path(uri), uri) as tmp:
            yield Staged(tmp)  # an empty file: the writer replaces its content
            _fsync(tmp)

    def get_file(self, uri: PathLike, local_path: PathLike) -> Path:
        dest = Path(os.path.abspath(os.path.expanduser(os.fspath(local_path))))
        self._copy(self._path(uri), dest, uri)
        return dest

    def _copy(self, src: Path, dest: Path, uri: PathLike) -> None:
        if not src.is_file():
            raise StorageError(f"cannot copy {src} to {dest}: no such file")
        if dest.exists() and os.path.samefile(src, dest):
            return
        with _atomic_dest(dest, uri) as tmp:
            shutil.copyfile(src, tmp)
            _fsync(tmp)

    def read_bytes(self, uri: PathLike) -> bytes:
        path = self._path(uri)
        try:
            return path.read_bytes()
        except OSError as e:
            raise _os_error(e, "cannot read", uri) from e

    def write_bytes(self, uri: PathLike, data: bytes) -> None:
        path = self._path(uri)
        with _atomic_dest(path, uri) as tmp, open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def exists(self, uri: PathLike) -> bool:
        return self._path(uri).is_file()

    def delete(self, uri: PathLike) -> None:
        path = self._path(uri)
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            raise _os_error(e, "cannot delete", uri) from e

    def check_writable(self, uri: PathLike) -> None:
        """The destination's folder is created if needed and a probe file written there."""
        path = self._path(uri)
        if path.is_dir():
            raise StorageError(f"cannot write {uri}: it is a folder")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _os_error(e, "cannot create the folder for", uri) from e
        probe = path.with_name(f".tilefm-write-probe-{secrets.token_hex(6)}")
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as e:
            raise _os_error(e, "cannot write", uri) from e
        probe.unlink(missing_ok=True)

    def check_creatable(self, uri: PathLike) -> None:
        """The nearest folder on the destination's path that exists is a writable folder, so
        the rest could be created; nothing is created (and no probe written)."""
        path = self._path(uri)
        if path.is_dir():
            raise StorageError(f"cannot write {uri}: it is a folder")
        folder = path.parent
        while not os.path.lexists(folder):
            folder = folder.parent
        if not folder.is_dir():  # a file, or a link to nothing, where a folder would go
            raise StorageError(f"cannot write {uri}: {folder} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):  # EROFS included
            raise StorageError(f"cannot write {uri}: permission denied ({folder})")

    def rasterio_path(self, uri: PathLike) -> str:
        return str(self._path(uri))


# ---------------------------------------------------------------------------------------------
# S3
# ---------------------------------------------------------------------------------------------


def make_s3_client(settings: Settings) -> BaseClient:
    """A boto3 S3 client for `settings`: its endpoint (path-style addressing when one is set),
    region and keys; with no keys set, boto3's default credential chain."""
    import boto3
    from botocore.config import Config

    key_id, secret = _keys(settings)
    if bool(key_id) != bool(secret):
        raise StorageError(
            "set both TILEFM_S3_ACCESS_KEY_ID and TILEFM_S3_SECRET_ACCESS_KEY, or neither "
            "(to use the default AWS credential chain)",
            field="settings",
        )
    config_args: dict[str, Any] = {
        "signature_version": "s3v4",
        "retries": {"max_attempts": 3, "mode": "standard"},
        "connect_timeout": 10,
        "read_timeout": 120,
    }
    if settings.s3_endpoint_url:
        config_args["s3"] = {"addressing_style": "path"}
        # S3-compatible stores do not all speak the newer default CRC checksums
        config_args["request_checksum_calculation"] = "when_required"
        config_args["response_checksum_validation"] = "when_required"
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url or None,
        region_name=settings.s3_region,
        aws_access_key_id=key_id or None,
        aws_secret_access_key=secret or None,
        config=Config(**config_args),
    )


def _keys(settings: Settings) -> tuple[str | None, str | None]:
    key_id = settings.s3_access_key_id.get_secret_value() if settings.s3_access_key_id else None
    secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
    return key_id or None, secret or None


class S3Storage(Storage):
    """Objects in S3 or an S3-compatible store (the client is made on first use)."""

    scheme = "s3"

    def __init__(self, settings: Settings | None = None, client: BaseClient | None = None):
        self.settings = settings if settings is not None else get_settings()
        self._client = client

    @property
    def client(self) -> BaseClient:
        if self._client is None:
            self._client = make_s3_client(self.settings)
        return self._client

    @property
    def endpoint(self) -> str:
        return self.settings.s3_endpoint_url or "AWS S3"

    def _loc(self, uri: PathLike) -> S3Location:
        loc = self._parse(uri)
        if not isinstance(loc, S3Location):
            raise TypeError(f"expected a S3Location, got {loc!r}")
        return loc

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        chunk = self.settings.s3_multipart_chunksize
        return TransferConfig(
            multipart_threshold=chunk,
            multipart_chunksize=chunk,
            preferred_transfer_client="classic",  # honour the chunk size even with awscrt
        )

    @contextmanager
    def _errors(self, what: str, loc: S3Location) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except Exception as e:
            mapped = _s3_error(e, what, loc, self.endpoint)
            if mapped is None:
                raise
            raise mapped from e

    def put_file(self, local_path: PathLike, uri: PathLike) -> None:
        loc = self._loc(uri)
        src = Path(local_path)
        if not src.is_file():
            raise StorageError(f"cannot upload {src} to {loc}: no such file")
        with self._errors("cannot upload to", loc):
            self.client.upload_file(os.fspath(src), loc.bucket, loc.key, Config=self._transfer_config())

    @contextmanager
    def writing(self, uri: PathLike, work_dir: PathLike | None = None) -> Iterator[Staged]:
        """`Storage.writing`, with `Staged.early`: a writer that knows its file's bytes behind
        a front before the front (a streamed COG) sends them as they are final, and they go up
        while it writes; the object appears only when the last part is in (an error aborts
        the upload). A writer that sends nothing gets the plain upload at the end."""
        loc = self._loc(uri)
        with tempfile.TemporaryDirectory(prefix="tilefm-put-", dir=work_dir) as tmp:
            staged = Staged(Path(tmp) / (Path(loc.key).name or "object"), EarlyParts(self, loc))
            staged.path.touch()
            early = staged.early
            if early is None:
                raise RuntimeError("early is not set")
            try:
                yield staged
                if not early.started:
                    self.put_file(staged.path, uri)
                elif staged.front is None:
                    raise StorageError(
                        f"cannot upload to {loc}: parts were sent but the file's front was never given"
                    )
                else:
                    early.complete(staged.path, staged.front)
            finally:
                early.abort()  # after `complete`: nothing left to abort

    def get_file(self, uri: PathLike, local_path: PathLike) -> Path:
        loc = self._loc(uri)
        dest = Path(os.path.abspath(os.path.expanduser(os.fspath(local_path))))
        with _atomic_dest(dest, dest) as tmp, self._errors("cannot download", loc):
            self.client.download_file(loc.bucket, loc.key, os.fspath(tmp), Config=self._transfer_config())
        return dest

    def read_bytes(self, uri: PathLike) -> bytes:
        loc = self._loc(uri)
        with self._errors("cannot read", loc):
            resp = self.client.get_object(Bucket=loc.bucket, Key=loc.key)
            with resp["Body"] as body:
                data: bytes = body.read()
                return data

    def write_bytes(self, uri: PathLike, data: bytes) -> None:
        loc = self._loc(uri)
        with self._errors("cannot write", loc):
            self.client.put_object(Bucket=loc.bucket, Key=loc.key, Body=bytes(data))

    def exists(self, uri: PathLike) -> bool:
        from botocore.exceptions import ClientError

        loc = self._loc(uri)
        with self._errors("cannot check", loc):
            try:
                self.client.head_object(Bucket=loc.bucket, Key=loc.key)
            except ClientError as e:
                if _error_code(e) in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
                    return False
                raise
            return True

    def delete(self, uri: PathLike) -> None:
        loc = self._loc(uri)
        with self._errors("cannot delete", loc):
            self.client.delete_object(Bucket=loc.bucket, Key=loc.key)

    def check_writable(self, uri: PathLike) -> None:
        """The bucket exists and a small probe object can be put beside the key and deleted."""
        from botocore.exceptions import ClientError

        loc = self._loc(uri)
        with self._errors("cannot write", loc):
            try:
                self.client.head_bucket(Bucket=loc.bucket)
            except ClientError as e:
                if _error_code(e) in ("404", "NoSuchBucket", "NotFound"):
                    raise StorageError(
                        f"cannot write {loc}: bucket {loc.bucket!r} does not exist at {self.endpoint}"
                    ) from e
                raise
            folder = loc.key.rpartition("/")[0]
            probe = f"{folder}/" if folder else ""
            probe += f".tilefm-write-probe-{secrets.token_hex(6)}"
            self.client.put_object(Bucket=loc.bucket, Key=probe, Body=b"tilefm write probe\n")
            try:
                self.client.delete_object(Bucket=loc.bucket, Key=probe)
            except ClientError as e:
                raise StorageError(
                    f"cannot write {loc}: a probe object could be written but not deleted "
                    f"({_error_code(e)}); s3://{loc.bucket}/{probe} was left behind"
                ) from e

    def rasterio_path(self, uri: PathLike) -> str:
        loc = self._loc(uri)
        return f"/vsis3/{loc.bucket}/{loc.key}"


def _error_code(e: Exception) -> str:
    response = getattr(e, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    if not code:
        code = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return code


def _s3_error(e: Exception, what: str, loc: S3Location, endpoint: str) -> StorageError | None:
    """Map a boto3/botocore error to a `StorageError`, or None if it is not one of theirs."""
    from boto3.exceptions import Boto3Error, S3UploadFailedError
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    # upload_file wraps the ClientError in a message-only S3UploadFailedError
    if isinstance(e, S3UploadFailedError) and isinstance(e.__context__, ClientError):
        e = e.__context__
    head = f"{what} {loc}"
    if isinstance(e, ClientError):
        code = _error_code(e)
        message = e.response.get("Error", {}).get("Message") or ""
        if code == "NoSuchBucket":
            return StorageError(f"{head}: bucket {loc.bucket!r} does not exist at {endpoint}")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageError(f"{head}: no such object")
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
            return StorageError(
                f"{head}: access denied by {endpoint} (check the credentials and the bucket policy)"
            )
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            return StorageError(
                f"{head}: {endpoint} rejected the credentials ({code}); check "
                "TILEFM_S3_ACCESS_KEY_ID / TILEFM_S3_SECRET_ACCESS_KEY"
            )
        return StorageError(f"{head}: {code or 'error'} from {endpoint}: {message or e}")
    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(
            f"{head}: no S3 credentials found; set TILEFM_S3_ACCESS_KEY_ID and "
            "TILEFM_S3_SECRET_ACCESS_KEY (or configure the AWS credential chain)"
        )
    if isinstance(e, ConnectionError):
        return StorageError(f"{head}: cannot connect to S3 endpoint {endpoint} ({e})")
    if isinstance(e, (BotoCoreError, Boto3Error)):
        return StorageError(f"{head}: S3 error at {endpoint}: {e}")
    if isinstance(e, OSError):  # e.g. the local side of a transfer
        return _os_error(e, what, loc)
    return None


# ---------------------------------------------------------------------------------------------
# GDAL
# ---------------------------------------------------------------------------------------------


def gdal_config(settings: Settings | None = None) -> dict[str, str]:
    """GDAL config options (all strings) to read ``/vsis3/`` paths from the configured S3
    endpoint, credentials included: for a subprocess's environment or ``gdal.SetConfigOption``.

    With no keys in `settings`, GDAL falls back to its own AWS credential chain. For
    ``rasterio.Env`` use `gdal_env`, since rasterio refuses credentials given as options.
    """
    settings = settings if settings is not None else get_settings()
    env: dict[str, str] = {
        "AWS_REGION": settings.s3_region,
        # do not list the "folder" of every file opened: slow (and often forbidden) on S3
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    }
    key_id, secret = _keys(settings)
    if key_id and secret:
        env["AWS_ACCESS_KEY_ID"] = key_id
        env["AWS_SECRET_ACCESS_KEY"] = secret
    if settings.s3_endpoint_url:
        parts = urlsplit(settings.s3_endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise StorageError(
                f"S3 endpoint {settings.s3_endpoint_url!r} is not an http(s)://host[:port] URL",
                field="settings",
            )
        env["AWS_S3_ENDPOINT"] = parts.netloc + parts.path.rstrip("/")
        env["AWS_HTTPS"] = "YES" if parts.scheme == "https" else "NO"
        env["AWS_VIRTUAL_HOSTING"] = "FALSE"
    return env


def gdal_env(settings: Settings | None = None) -> dict[str, Any]:
    """Keyword arguments for ``rasterio.Env`` to read ``/vsis3/`` paths from the configured
    S3 endpoint:

        with rasterio.Env(**gdal_env(settings)), rasterio.open(storage.rasterio_path(uri)):

    These are `gdal_config`'s options (AWS_S3_ENDPOINT, AWS_HTTPS, AWS_VIRTUAL_HOSTING,
    AWS_REGION, ...), except that the keys travel in a ``session`` (a rasterio ``AWSSession``),
    the only way rasterio accepts them. With no keys in `settings` there is no session and
    GDAL uses its own AWS credential chain.
    """
    config: dict[str, Any] = gdal_config(settings)
    key_id = config.pop("AWS_ACCESS_KEY_ID", None)
    secret = config.pop("AWS_SECRET_ACCESS_KEY", None)
    if key_id and secret:
        from rasterio.session import AWSSession

        config["session"] = AWSSession(
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            region_name=config["AWS_REGION"],
            endpoint_url=config.get("AWS_S3_ENDPOINT"),
        )
    return config
