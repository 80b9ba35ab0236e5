"""Where a job may read and write: the allowlists (`TILEFM_ALLOWED_SOURCES`,
`TILEFM_ALLOWED_OUTPUTS`), checked on every location a job opens, and each job's own output key.

A location is compared in a normal form, never as the string it was given as:

* local paths and ``file://`` URIs through `os.path.realpath`, so a symlink inside an allowed
  folder that points out of it is outside;
* ``http(s)://`` URLs by scheme, host and port, with the path percent-decoded first and its dot
  segments then resolved (``/allowed/../other`` is ``/other``); a ``..`` left over, one that
  climbs above the root, is refused;
* ``s3://`` URIs by the exact bucket (``s3://allowed/../other`` is a key in `allowed` that
  climbs out of it: refused), and the key resolved like a URL's path;
* GDAL's ``/vsicurl/URL`` and ``/vsis3/bucket/key`` paths (what a STAC item's hrefs become) as
  the URL or ``s3://`` URI they name; any other ``/vsi...`` file system is refused, since GDAL
  would open whatever it names.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Callable
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

from tilefm.errors import TileFMError

#: a job's output key: `<output_prefix>/<job id>/<model>.tif`, its STAC item beside it
OUTPUT_SUFFIXES = (".tif", ".tiff")
#: job ids as the store makes them (32 hex characters): only these name an output folder
JOB_ID = re.compile(r"[0-9a-f]{32}")
#: rasters that can name other files or URLs, so that an allowed one could read anything
REFERENCING_SUFFIXES = (".vrt",)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_DEFAULT_PORTS = {"http": 80, "https": 443}

#: `check(location, field)`: raises a `TileFMError` naming `field` if `location` may not be opened
SourceCheck = Callable[[str, str], None]


class Place(NamedTuple):
    """A location as allowlists compare it."""

    #: "" for local files, "s3://bucket", or "scheme://host:port"
    root: str
    #: the normalised path under `root`, without a leading "/" ("" for the root itself)
    path: str

    def within(self, prefix: Place) -> bool:
        """Whether this is `prefix` or under it, a whole path segment at a time."""
        if self.root != prefix.root:
            return False
        return not prefix.path or self.path == prefix.path or self.path.startswith(prefix.path + "/")


def place(location: str, field: str) -> Place:
    """`location` in normal form; `TileFMError` naming `field` if it cannot be compared safely."""
    if any(ord(c) < 32 for c in location):
        raise TileFMError("control characters are not allowed in a path or URI", field=field)
    uri = location  # messages name the location as given
    if location.startswith("/vsicurl/"):
        uri = location[len("/vsicurl/") :]
    elif location.startswith("/vsis3/"):
        uri = "s3://" + location[len("/vsis3/") :]
    elif location.lower().startswith("/vsi"):
        raise TileFMError(
            f"GDAL virtual file systems are not allowed here ({location!r}): give a path, "
            "file://, s3:// or https:// URI",
            field=field,
        )
    m = _SCHEME.match(uri)
    if m is None:
        return Place("", _local(os.path.expanduser(uri)))
    scheme = m.group(1).lower()
    if scheme == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise TileFMError(
                f"file URI {location!r} must be file:///absolute/path (no host, query or fragment)",
                field=field,
            )
        return Place("", _local(unquote(parts.path) or "/"))
    if scheme == "s3":
        # not split as a URL: S3 URIs are not percent-encoded, and '?' or '#' belong to the key
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise TileFMError(f"{location!r} has no valid bucket name (s3://bucket/key)", field=field)
        if key.startswith("/"):  # S3 keeps the slash: "//x" is not the key "x"
            raise TileFMError(f"{location!r}: an S3 key must not start with '/'", field=field)
        return Place(f"s3://{bucket}", _resolved(key, location, field))
    if scheme in _DEFAULT_PORTS:
        parts = urlsplit(uri)
        try:
            port = parts.port or _DEFAULT_PORTS[scheme]
        except ValueError:
            raise TileFMError(f"{location!r} has an invalid port", field=field) from None
        if not parts.hostname:
            raise TileFMError(f"{location!r} names no host", field=field)
        return Place(f"{scheme}://{parts.hostname}:{port}", _resolved(parts.path, location, field))
    raise TileFMError(
        f"unsupported URI scheme {scheme!r} in {location!r}: use a path, file://, s3:// or https://",
        field=field,
    )


def _local(path: str) -> str:
    return os.path.realpath(os.path.abspath(path)).lstrip("/")


def _resolved(path: str, location: str, field: str) -> str:
    """A URL path or S3 key, percent-decoded (so `%2e%2e` is `..`), dot segments resolved."""
    decoded = unquote(path)
    if "\\" in decoded:  # some servers read a backslash as '/', which would skip the checks below
        raise TileFMError(f"backslashes are not allowed in {location!r}", field=field)
    resolved = posixpath.normpath(decoded.lstrip("/")) if decoded.strip("/") else ""
    if resolved == ".." or resolved.startswith("../"):
        raise TileFMError(f"{location!r} climbs out of its root with '..'", field=field)
    return "" if resolved == "." else resolved


def check_allowed(location: str, allowed: list[str], field: str) -> None:
    """Raise `TileFMError` naming `field` unless `location` is under one of `allowed` (path or
    URI prefixes; empty: anywhere)."""
    if not allowed:
        if any(ord(c) < 32 for c in location):
            raise TileFMError("control characters are not allowed in a path or URI", field=field)
        return
    here = place(location, field)
    if not any(here.within(place(prefix, "settings")) for prefix in allowed):
        raise TileFMError(
            f"{location!r} is outside the locations this service may use ({', '.join(allowed)})", field=field
        )


def source_check(allowed: list[str]) -> SourceCheck | None:
    """The check a scene applies to every file or URL it opens (the sources, a STAC item's asset
    hrefs, a band folder's files); None where sources are not restricted."""
    if not allowed:
        return None

    def check(location: str, field: str) -> None:
        check_allowed(location, allowed, field)
        if location.lower().endswith(REFERENCING_SUFFIXES):
            raise TileFMError(
                f"{location!r}: VRT files can name any file or URL, so this service does not open them; "
                "give the rasters themselves",
                field=field,
            )

    return check


def absolute(location: str) -> str:
    """A relative local path as an absolute one (resolved once, at submission, against the API
    process's folder, so every process that later opens it opens the same file); URIs as given."""
    if _SCHEME.match(location) or location.startswith("/vsi"):
        return location
    return os.path.abspath(os.path.expanduser(location))


def check_output_prefix(prefix: str) -> None:
    """An output prefix is a folder: each job writes into its own `<job id>/` under it, so a
    prefix naming a file (`.tif`) could only mean an object key the job would not write."""
    if prefix.rstrip("/").lower().endswith(OUTPUT_SUFFIXES):
        raise TileFMError(
            f"{prefix!r} names a file: output_prefix is a folder, and each job writes "
            "<output_prefix>/<job id>/<model>.tif (and its .stac.json) under it",
            field="output_prefix",
        )


def output_uri(prefix: str, model: str, job_id: str) -> str:
    """Where job `job_id` writes its COG: `<prefix>/<job id>/<model>.tif`. Only the job's own
    id names the folder, so no two jobs share a key, whatever prefixes they were given."""
    if not JOB_ID.fullmatch(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    check_output_prefix(prefix)
    if "/" in model or model in (".", ".."):
        raise ValueError(f"not a model name: {model!r}")
    return f"{prefix if prefix.endswith('/') else prefix + '/'}{job_id}/{model}.tif"
