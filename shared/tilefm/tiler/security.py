"""Which datasets the generic COG endpoints may open: only files under the configured storage
prefixes. GDAL opens far more than files (`/vsicurl/` URLs, cloud metadata endpoints, VRTs that
point anywhere), so the `url` parameter is parsed and checked here before GDAL ever sees it.

Also here: the base of the URLs TileJSON and WMTS documents name, which never comes from a Host
header the server does not know (a shared cache would hand a forged one to everyone)."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from starlette.requests import Request

from tilefm.errors import StorageError
from tilefm.settings import Settings
from tilefm.storage import FileLocation, S3Location, parse_uri, storage_for
from tilefm.tiler.errors import PathNotAllowed

#: what the generic endpoints open; no VRT (it can reference any file or URL), no sidecars
EXTENSIONS = (".tif", ".tiff")


def _prefix_location(prefix: str) -> FileLocation | S3Location:
    if prefix.startswith("s3://"):
        bucket, _, key = prefix[5:].partition("/")
        return S3Location(bucket, key)
    path = prefix[7:] if prefix.startswith("file://") else prefix
    return FileLocation(Path(os.path.realpath(os.path.expanduser(path))))


def allowed_path(url: str, prefixes: list[str], settings: Settings) -> str:
    """`url` (s3://..., file:///..., or a path) -> the path GDAL opens, if it is a .tif under one
    of `prefixes`; `PathNotAllowed` (403) for anything else, naming the reason."""
    if not prefixes:
        raise PathNotAllowed(
            "the generic COG endpoints are disabled: no storage prefixes are configured "
            "(TILEFM_TILER_PREFIXES)"
        )
    if any(ord(c) < 32 for c in url) or "\\" in url:
        raise PathNotAllowed("control characters and backslashes are not allowed in url")
    if url.lower().startswith("/vsi") or "/vsi" in url.lower():
        raise PathNotAllowed(
            "GDAL virtual file systems (/vsi...) are not allowed in url; give s3://bucket/key.tif"
        )
    try:
        loc = parse_uri(url)
    except StorageError as e:
        raise PathNotAllowed(Exception.__str__(e)) from None
    raw_path = loc.key if isinstance(loc, S3Location) else url.split("://", 1)[-1]
    if ".." in raw_path.replace("\\", "/").split("/"):
        raise PathNotAllowed("'..' is not allowed in url")
    if not str(loc.key if isinstance(loc, S3Location) else loc.path).lower().endswith(EXTENSIONS):
        raise PathNotAllowed(f"only GeoTIFFs ({', '.join(EXTENSIONS)}) can be served, not {url!r}")
    for prefix in prefixes:
        p = _prefix_location(prefix)
        if isinstance(loc, S3Location) and isinstance(p, S3Location):
            key_prefix = p.key.rstrip("/") + "/" if p.key else ""
            if loc.bucket == p.bucket and loc.key.startswith(key_prefix):
                return storage_for(url, settings).rasterio_path(url)
        elif isinstance(loc, FileLocation) and isinstance(p, FileLocation):
            real = os.path.realpath(loc.path)  # symlinks out of the prefix do not count as inside
            if os.path.commonpath([real, str(p.path)]) == str(p.path):
                return real
    raise PathNotAllowed(f"{url!r} is outside the storage this tiler serves ({', '.join(prefixes)})")


#: a Host header: a name or an IPv4 address, or an IPv6 address in brackets, and a port
_HOST = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9.-]+))(?::[0-9]{1,5})?$")


def is_loopback_host(host: str) -> bool:
    """Whether a Host header names this machine (localhost, 127.0.0.0/8, ::1), with any port."""
    m = _HOST.match(host)
    if m is None:
        return False
    name = m.group("v6") or m.group("name")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_public_url(url: str) -> str:
    """`TILEFM_TILER_PUBLIC_URL` as the base of tile URLs: http(s), a host, no query or fragment."""
    parts = urlsplit(url)
    if (
        parts.scheme not in ("http", "https")
        or not parts.netloc
        or parts.query
        or parts.fragment
        or not _HOST.match(parts.netloc)
    ):
        raise ValueError(
            f"TILEFM_TILER_PUBLIC_URL must be an http(s) URL with a host and no query, not {url!r}"
        )
    return url.rstrip("/")


def public_base(request: Request, public_url: str | None) -> str:
    """What TileJSON and WMTS put before `/v1/...`, without a trailing slash: the configured
    public URL; else the request's own scheme and host where that host is a loopback one (local
    use, so GIS desktops get absolute URLs); else nothing, i.e. root-relative URLs, which a
    browser resolves against the page's own origin."""
    if public_url:
        return public_url
    root = str(request.scope.get("root_path") or "").rstrip("/")
    host = request.headers.get("host", "")
    if is_loopback_host(host):
        return f"{request.url.scheme}://{host}{root}"
    return root
