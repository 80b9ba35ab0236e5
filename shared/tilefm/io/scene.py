"""Scene inputs: what a user names with `--scene MODALITY=SOURCE`, resolved to one file per band.

A source is a folder of single-band rasters named by band, one multi-band raster, or a STAC item.
Everything is validated when the scene is opened (files readable, georeferenced, bands named), so
a bad scene fails before any tile is planned.

Why one module (~830 lines): the five ways to name a scene (band folder, multi-band raster, STAC
item, item collection, a series of acquisitions) end in the same validated `Scene`, through
shared checks (drivers, georeferencing, declared nodata, dates); split by source kind, each part
would import the others' private checks.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import itertools
import json
import math
import posixpath
import re
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import MaskFlags
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.warp import transform_geom
from shapely.geometry import box, mapping, shape
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union

from tilefm.errors import NotGeoreferencedError, SceneError, TileFMError
from tilefm.io.bands import (
    Sensor,
    StacBand,
    band_id,
    canonical_band,
    sensor_of_file,
    sensor_of_item,
    stac_band,
)
from tilefm.settings import Settings, get_settings
from tilefm.storage import gdal_env, storage_for

RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".vrt", ".img")

#: `check(location, field)`: raises a `TileFMError` naming `field` if `location` may not be
#: opened (a service's allowlist); called with every file or URL before it is opened
SourceCheck = Callable[[str, str], None]
#: the formats a checked scene's rasters open as, by suffix (GeoTIFF for any other name): none
#: of them can name another file or URL, as a VRT can whatever its file is called (GDAL knows a
#: format by its content, unless told which to use)
CHECKED_DRIVERS = {".tif": "GTiff", ".tiff": "GTiff", ".jp2": "JP2OpenJPEG", ".img": "HFA"}


@dataclass(frozen=True)
class BandFile:
    """One band of a modality: a GDAL-readable path and a 1-based band index in it."""

    name: str
    path: str
    index: int = 1
    #: added to raw values to get the card's units (e.g. -1000 for Sentinel-2 baseline >= 04.00)
    offset: float = 0.0
    #: raw values times this, before the offset, are the card's units (reflectance x 10000 for
    #: optical bands: 0.275 for Landsat Collection 2 Level-2 surface reflectance)
    scale: float = 1.0
    #: nodata the source declares for the band (STAC), where the file itself may not
    nodata: float | None = None
    #: the band's centre wavelength as its sensor or item states it, um (None: unknown, or the
    #: band id's own); what a wavelength-conditioned encoder is given
    wavelength_um: float | None = None

    def to_units(self, values: np.ndarray) -> np.ndarray:
        """Raw values in place to the card's units (values * scale + offset); returns `values`.
        A band already in the card's units is left as it is, bit for bit."""
        if self.scale != 1.0:
            values *= np.float32(self.scale)
        if self.offset:
            values += np.float32(self.offset)
        return values


@dataclass
class Modality:
    """The bands of one sensor (s2, s1, dem, ...) and where they come from."""

    name: str
    source: str
    bands: dict[str, BandFile]
    datetime: datetime | None = None
    #: footprint in WGS84 lon/lat (the union of the bands' valid extents)
    footprint: BaseGeometry | None = None
    #: finest native pixel size, metres (ground)
    resolution_m: float | None = None
    properties: dict[str, Any] = field(default_factory=dict)
    #: the sensor the bands were recognised as (`tilefm.io.bands.SENSORS`), where known
    sensor: str | None = None
    #: each file's pixel grid, as opened: path -> (CRS as WKT, affine transform, width, height),
    #: so that what needs a band's grid later (`tilefm.io.native`) does not open the file again
    grids: dict[str, tuple[str, tuple[float, ...], int, int]] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "bands": {k: f"{v.path}#{v.index}" for k, v in sorted(self.bands.items())},
            "datetime": self.datetime.isoformat() if self.datetime else None,
        }


@dataclass
class Scene:
    """All modalities of a job. Their footprints may differ; the scene's is their union.

    A time series is a scene with a modality given more than once: `series` holds every
    acquisition of such a modality, sorted by date, and `modalities` the first of each (so that
    what looks at one date sees the first). Its timesteps are the distinct dates of those
    acquisitions; a modality given once (a DEM) is static, the same at every timestep."""

    modalities: dict[str, Modality]
    #: overrides the sources' dates (e.g. for a band folder with no metadata)
    date_override: date | None = None
    #: modality -> its acquisitions, sorted by date, for the modalities given more than once
    series: dict[str, list[Modality]] = field(default_factory=dict)

    def acquisitions(self) -> list[Modality]:
        """Every acquisition of every modality (one per modality for a scene of one date)."""
        return [a for name, m in self.modalities.items() for a in self.series.get(name, [m])]

    @functools.cached_property
    def footprint(self) -> BaseGeometry:
        # cached: a service validates many submissions against one opened scene
        return unary_union([m.footprint for m in self.acquisitions() if m.footprint is not None])

    @property
    def date(self) -> date | None:
        if self.date_override is not None:
            return self.date_override
        if self.series:
            return self.timesteps[0]
        for m in self.modalities.values():
            if m.datetime is not None:
                return m.datetime.date()
        return None

    @property
    def timesteps(self) -> list[dt.date]:  # `date` is the property above here
        """The dates of a time series, in order (every acquisition of `series` has one); empty
        for a scene of one date."""
        return sorted(
            {a.datetime.date() for acqs in self.series.values() for a in acqs if a.datetime is not None}
        )

    def timestep(self, day: dt.date) -> Scene:
        """The acquisitions of a time series on `day`, as a scene of that date (a modality with
        none that day is absent from it)."""
        mods = {
            name: a
            for name, acqs in self.series.items()
            for a in acqs
            if a.datetime is not None and a.datetime.date() == day
        }
        return Scene(modalities=mods, date_override=day)

    def static(self) -> Scene:
        """The modalities given once, as a scene of their own: a time series reads them once
        and uses them at every timestep."""
        return Scene(
            modalities={k: m for k, m in self.modalities.items() if k not in self.series},
            date_override=self.date,
        )

    @property
    def resolution_m(self) -> float:
        return min(m.resolution_m for m in self.acquisitions() if m.resolution_m)

    def describe(self) -> dict[str, Any]:
        return {
            k: {"timesteps": [a.describe() for a in self.series[k]]} if k in self.series else m.describe()
            for k, m in self.modalities.items()
        }


def parse_scene_arg(arg: str) -> tuple[str, str]:
    """`s2=path` -> ("s2", "path"), with a clear error for anything else."""
    name, sep, source = arg.partition("=")
    name = name.strip().lower()
    if not sep or not name or not source.strip():
        raise SceneError(f"expected MODALITY=SOURCE (e.g. s2=./scene_dir), got {arg!r}")
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
        raise SceneError(f"modality name {name!r} must be lower-case letters, digits, - or _")
    return name, source.strip()


def parse_scene_args(args: list[str]) -> dict[str, str | list[str]]:
    """Repeated `--scene MODALITY=SOURCE`: a modality given once maps to its source, one given
    more than once to its sources in the order given (a time series, `open_scene`)."""
    out: dict[str, str | list[str]] = {}
    for name, source in map(parse_scene_arg, args):
        given = out.get(name)
        out[name] = source if given is None else [*([given] if isinstance(given, str) else given), source]
    return out


#: `--band [MODALITY:]NAME=FILE[:SCALE:OFFSET]`
BAND_ARG = re.compile(
    r"(?:(?P<modality>[A-Za-z][A-Za-z0-9_-]*):)?(?P<name>[A-Za-z0-9_]+)=(?P<rest>.+)", re.DOTALL
)
#: a band's file and its optional `:SCALE:OFFSET` (neither holds a `/`, as any part of a path may)
BAND_FILE = re.compile(r"(?P<path>.+?)(?::(?P<scale>[^:/]*):(?P<offset>[^:/]*))?", re.DOTALL)


@dataclass(frozen=True)
class BandArg:
    """A band given on its own: for `modality` (None: the scene's only one)."""

    modality: str | None
    band: BandFile


def parse_band_arg(arg: str) -> BandArg:
    """`[MODALITY:]NAME=FILE[:SCALE:OFFSET]` -> the band. NAME is a band id or common name
    (`B08`, `nir08`); SCALE and OFFSET take the file's raw values to the card's units
    (reflectance x 10000 for optical bands: `0.275:-2000` for Landsat Collection 2 Level-2)."""
    m = BAND_ARG.fullmatch(arg.strip())
    if m is None:
        raise SceneError(
            f"expected [MODALITY:]NAME=FILE[:SCALE:OFFSET] (e.g. s2:B08=./nir.tif), got {arg!r}", field="band"
        )
    name = band_id(m["name"]) or canonical_band(m["name"])
    f = BAND_FILE.fullmatch(m["rest"].strip())
    if f is None:  # the path alone always matches
        raise RuntimeError("f is not set")
    path, scale, offset = f["path"], 1.0, 0.0
    if f["scale"] is not None:
        try:
            scale, offset = float(f["scale"]), float(f["offset"])
        except ValueError:
            raise SceneError(
                f"SCALE and OFFSET must be numbers, got {f['scale']!r} and {f['offset']!r} in {arg!r}",
                field="band",
            ) from None
        if scale == 0 or not (math.isfinite(scale) and math.isfinite(offset)):
            raise SceneError(
                f"SCALE must be a non-zero finite number and OFFSET finite, got {arg!r}", field="band"
            )
    if any(ord(c) < 32 for c in path):
        raise SceneError("control characters are not allowed in a band's file", field="band")
    if path.startswith("file://"):
        path = _file_path(path, "band")
    if path.startswith(("http://", "https://")):
        path = "/vsicurl/" + path
    elif path.startswith("s3://"):
        path = "/vsis3/" + path[len("s3://") :]
    elif not path.startswith("/vsi"):
        local = Path(path).expanduser()
        if not local.exists():
            raise SceneError(f"band file {path!r} does not exist (in {arg!r})", field="band")
        path = str(local)
    return BandArg(
        m["modality"].lower() if m["modality"] else None, BandFile(name, path, offset=offset, scale=scale)
    )


def with_bands(scene: Scene, args: list[str]) -> Scene:
    """`scene` with the bands given on their own (`--band`) added, or in place of its own. A
    new Scene: the one given, which a service may cache, is left as it is."""
    mods = dict(scene.modalities)
    changed = set()
    for arg in map(parse_band_arg, args):
        modality = arg.modality
        if modality is None:
            if len(mods) != 1:
                raise SceneError(
                    f"say which modality band {arg.band.name} is for (MODALITY:{arg.band.name}=FILE): the "
                    "scene has "
                    f"{', '.join(sorted(mods)) or 'no modality'}",
                    field="band",
                )
            modality = next(iter(mods))
        if modality in scene.series:  # which of its dates would the file be?
            raise SceneError(
                f"{modality} is a time series of {len(scene.series[modality])} acquisitions: give each "
                "one's bands in its own source, "
                f"not with --band",
                field="band",
            )
        mod = mods.get(modality) or Modality(name=modality, source=arg.band.path, bands={})
        mods[modality] = replace(mod, bands={**mod.bands, arg.band.name: arg.band})
        changed.add(modality)
    for modality in sorted(changed):
        _inspect_rasters(mods[modality], "band")
    return replace(scene, modalities=mods)


def open_scene(
    sources: Mapping[str, str | Sequence[str]],
    *,
    asset_map: dict[str, str] | None = None,
    date_override: date | None = None,
    check: SourceCheck | None = None,
    settings: Settings | None = None,
) -> Scene:
    """Resolve and validate every modality's source.

    A modality's source may hold several acquisitions (a STAC ItemCollection, a folder of dated
    band folders or items), and a modality may be given a list of sources: a modality with more
    than one acquisition in all makes the scene a time series (`Scene.series`), each acquisition
    with its own date (none may be missing, none may repeat), at most `MAX_ACQUISITIONS`.

    With `check`, every file or URL is checked before it is opened (each source, a band
    folder's files, a STAC item's asset hrefs as resolved), and rasters open only as
    `CHECKED_DRIVERS` say. `s3://` sources are read with `settings`' endpoint and keys (default:
    the environment's)."""
    if not sources:
        raise SceneError("no scene given: pass --scene MODALITY=SOURCE at least once")
    mods: dict[str, Modality] = {}
    series: dict[str, list[Modality]] = {}
    with s3_env(settings):
        for name, given in sources.items():
            listed = [given] if isinstance(given, str) else list(given)
            if not listed:
                raise SceneError("no source given", field=f"scene.{name}")
            acquisitions: list[Modality] = []
            for source in listed:
                acquisitions += open_acquisitions(
                    name, source, asset_map=asset_map, check=check, settings=settings
                )
                if len(acquisitions) > MAX_ACQUISITIONS:
                    raise SceneError(
                        f"more than {MAX_ACQUISITIONS} acquisitions: no model takes that many dates",
                        field=f"scene.{name}",
                    )
            if len(acquisitions) > 1:
                acquisitions = _by_date(name, acquisitions)
                series[name] = acquisitions
            mods[name] = acquisitions[0]
    if series and date_override is not None:
        raise SceneError(
            "a date sets the date of a scene of one date; each acquisition of a time series "
            f"({', '.join(f'scene.{n}' for n in series)}) "
            "has its own",
            field="date",
        )
    return Scene(modalities=mods, date_override=date_override, series=series)


#: acquisitions one modality of a scene may have: more than any model takes (Presto: 24), few
#: enough that opening them all (every file of each) stays quick
MAX_ACQUISITIONS = 64


def _by_date(name: str, acquisitions: list[Modality]) -> list[Modality]:
    """A modality's acquisitions sorted by date; each must have one, and no two the same day."""
    field_name = f"scene.{name}"
    for a in acquisitions:
        if a.datetime is None:
            raise SceneError(
                f"{a.source!r} has no acquisition date (a STAC item's datetime, a YYYYMMDD in a band "
                "folder's name, or the "
                "raster's TIFFTAG_DATETIME): each acquisition of a time series needs its own",
                field=field_name,
            )
    dated = sorted(
        ((a.datetime.date(), a) for a in acquisitions if a.datetime is not None),  # all of them (above)
        key=lambda pair: pair[0],
    )
    for (day_a, a), (day, b) in itertools.pairwise(dated):
        if day_a == day:
            raise SceneError(
                f"{a.source!r} and {b.source!r} are both from {day}: a time series takes one acquisition a "
                "day",
                field=field_name,
            )
    return [a for _, a in dated]


def open_acquisitions(
    name: str,
    source: str,
    *,
    asset_map: dict[str, str] | None = None,
    check: SourceCheck | None = None,
    settings: Settings | None = None,
) -> list[Modality]:
    """The acquisitions one source holds, in its order: one for a band folder, a raster or a
    STAC item (`open_modality`); each item of a STAC ItemCollection (a search result); each band
    folder and item in a folder that holds no rasters of its own (dated acquisitions side by side)."""
    field_name = f"scene.{name}"
    if any(ord(c) < 32 for c in source):
        raise SceneError("control characters are not allowed in a source", field=field_name)
    if check is not None:
        check(source, field_name)
    where = _file_path(source, field_name) if source.startswith("file://") else source
    parsed = urllib.parse.urlparse(where)
    is_url = parsed.scheme in ("http", "https", "s3")
    if where.endswith(".json") or (is_url and parsed.path.endswith(".json")):
        doc = _load_json(where, field_name, settings)
        if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
            return _from_item_collection(
                name, where, doc, asset_map=asset_map, check=check, settings=settings
            )
        return [open_modality(name, source, asset_map=asset_map, check=check, settings=settings, item=doc)]
    if not is_url:
        folder = Path(where).expanduser()
        if folder.is_dir() and not any(f.suffix.lower() in RASTER_SUFFIXES for f in folder.iterdir()):
            members = [
                f
                for f in sorted(folder.iterdir())
                if not f.name.startswith(".")
                and (
                    (f.is_dir() and any(g.suffix.lower() in RASTER_SUFFIXES for g in f.iterdir()))
                    or f.suffix == ".json"
                )
            ]
            if members:
                return [
                    open_modality(name, str(f), asset_map=asset_map, check=check, settings=settings)
                    for f in members
                ]
    return [open_modality(name, source, asset_map=asset_map, check=check, settings=settings)]


def _from_item_collection(
    name: str,
    source: str,
    doc: dict[str, Any],
    *,
    asset_map: dict[str, str] | None,
    check: SourceCheck | None,
    settings: Settings | None,
) -> list[Modality]:
    """Each item of a STAC ItemCollection as an acquisition, named `SOURCE#ITEM_ID`."""
    field_name = f"scene.{name}"
    features = doc.get("features")
    if not isinstance(features, list):
        raise SceneError(
            f"{source!r}: a FeatureCollection's features must be a list of STAC items", field=field_name
        )
    if not features:
        raise SceneError(
            f"{source!r} is a STAC ItemCollection with no items: nothing to read", field=field_name
        )
    if len(features) > MAX_ACQUISITIONS:
        raise SceneError(
            f"{source!r} holds {len(features)} items, more than {MAX_ACQUISITIONS}: no model takes that "
            "many dates",
            field=field_name,
        )
    out = []
    for i, item in enumerate(features):
        if not isinstance(item, dict):
            raise SceneError(f"{source!r}: features[{i}] is not a STAC item", field=field_name)
        mod = _from_stac_item(name, source, asset_map or {}, settings, item=item)
        mod.source = f"{source}#{item.get('id', i)}"
        out.append(_finish_modality(mod, field_name, check))
    return out


def s3_env(settings: Settings | None = None, **options: Any) -> contextlib.AbstractContextManager[object]:
    """GDAL set up for the configured S3 endpoint and keys (default: the environment's
    settings), with `options`; without an endpoint or keys, GDAL's own AWS environment as it is."""
    settings = settings if settings is not None else get_settings()
    if not (settings.s3_endpoint_url or settings.s3_access_key_id):
        return contextlib.nullcontext()
    return rasterio.Env(**{**options, **gdal_env(settings)})


def on_s3(scene: Scene) -> bool:
    """Whether any band of `scene` is read from S3."""
    return any(
        b.path.startswith(("s3://", "/vsis3/")) for m in scene.acquisitions() for b in m.bands.values()
    )


def open_modality(
    name: str,
    source: str,
    *,
    asset_map: dict[str, str] | None = None,
    check: SourceCheck | None = None,
    settings: Settings | None = None,
    item: dict[str, Any] | None = None,
) -> Modality:
    """One acquisition: a band folder, a raster or a STAC item (`item`: the item's JSON, where
    the caller has read it already)."""
    field_name = f"scene.{name}"
    if any(ord(c) < 32 for c in source):
        raise SceneError("control characters are not allowed in a source", field=field_name)
    if check is not None:
        check(source, field_name)
    if source.startswith("file://"):
        source = _file_path(source, field_name)
    checked = check is not None
    parsed = urllib.parse.urlparse(source)
    is_url = parsed.scheme in ("http", "https", "s3")
    if source.endswith(".json") or (is_url and parsed.path.endswith(".json")):
        mod = _from_stac_item(name, source, asset_map or {}, settings, item=item)
    elif is_url:
        mod = _from_raster(name, source, checked)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise SceneError(f"source {source!r} does not exist", field=field_name)
        mod = _from_band_dir(name, path, check) if path.is_dir() else _from_raster(name, str(path), checked)
    return _finish_modality(mod, field_name, check)


def _finish_modality(mod: Modality, field_name: str, check: SourceCheck | None) -> Modality:
    """Every band file checked (before GDAL opens any of them), opened and inspected."""
    if check is not None:
        for band_path in sorted({b.path for b in mod.bands.values()}):
            check(band_path, field_name)
    _inspect_rasters(mod, field_name, check is not None)
    _apply_declared_nodata(mod, field_name, check is not None)
    return mod


def _file_path(uri: str, field_name: str) -> str:
    """`file:///abs/path` (percent-encoded) -> `/abs/path`."""
    parts = urllib.parse.urlsplit(uri)
    if (
        parts.netloc not in ("", "localhost")
        or not parts.path.startswith("/")
        or parts.query
        or parts.fragment
    ):
        raise SceneError(f"{uri!r} is not a local file URI (file:///absolute/path)", field=field_name)
    return urllib.parse.unquote(parts.path)


def _from_band_dir(name: str, path: Path, check: SourceCheck | None = None) -> Modality:
    item_path = path / "stac-item.json"
    item: dict[str, Any] | None = None
    if item_path.exists():  # a folder exported with its item: its sensor, date and processing metadata
        if check is not None:
            check(str(item_path), f"scene.{name}")
        item = _load_json(str(item_path), f"scene.{name}")
    item_sensor = sensor_of_item(item) if item is not None else None
    bands: dict[str, BandFile] = {}
    sensors = set()
    for f in sorted(path.iterdir()):
        if f.suffix.lower() in RASTER_SUFFIXES:
            # a file name that says its sensor (LC09_L2SP_..._SR_B4.TIF), else the item's sensor's
            # band names (HLS L30's B05 is its NIR), else a band id or common name as it is
            named = sensor_of_file(f.stem)
            if named is None and item_sensor is not None and (own := item_sensor.resolve(f.stem)) is not None:
                named = item_sensor, own
            if named is None:
                bands[canonical_band(f.stem)] = BandFile(canonical_band(f.stem), str(f))
                continue
            sensor, band = named
            scale, offset = sensor.scale_offset(band)
            bands[band] = BandFile(
                band, str(f), offset=offset, scale=scale, wavelength_um=sensor.wavelength(band)
            )
            sensors.add(sensor.name)
    if not bands:
        raise SceneError(
            f"folder {str(path)!r} holds no rasters ({', '.join(RASTER_SUFFIXES)})", field=f"scene.{name}"
        )
    mod = Modality(
        name=name, source=str(path), bands=bands, sensor=next(iter(sensors)) if len(sensors) == 1 else None
    )
    if item is not None:
        _apply_stac_properties(mod, item.get("properties", {}))
    else:
        mod.datetime = date_in_name(path.name)
    return mod


def date_in_name(name: str) -> datetime | None:
    """The acquisition date a granule's name states: HLS's year and day of year
    (`HLS.S30.T29RKH.2020050T112111.v2.0`), else the first YYYYMMDD that is a date
    (`LC09_L2SP_203043_20200219_...`, `S2A_29RKH_20200219_0_L2A`)."""
    hls = re.search(r"\.(\d{4})(\d{3})T\d{6}\.", name)
    if hls and 1 <= int(hls.group(2)) <= 366:
        with contextlib.suppress(ValueError):  # day 366 of a year that has 365
            day = datetime(int(hls.group(1)), 1, 1) + timedelta(days=int(hls.group(2)) - 1)
            if day.year == int(hls.group(1)):
                return day
    for m in re.finditer(r"(20\d{2})(\d{2})(\d{2})", name):
        with contextlib.suppress(ValueError):  # 8 digits that are not a date
            return datetime(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    return None


def _from_raster(name: str, path: str, checked: bool = False) -> Modality:
    try:
        with _open(path, checked) as src:
            descriptions = list(src.descriptions)
            count = src.count
            tags = src.tags()
    except RasterioIOError as e:
        raise SceneError(f"cannot read {path!r}: {_short(e)}", field=f"scene.{name}") from None
    named = sensor_of_file(Path(urllib.parse.urlsplit(path).path).stem) if count == 1 else None
    if named is not None:  # LC09_L2SP_..._SR_B4.TIF, HLS.S30....B04.tif
        sensor, band = named
        scale, offset = sensor.scale_offset(band)
        mod = _with_date(
            Modality(
                name=name,
                source=path,
                bands={
                    band: BandFile(
                        band, path, offset=offset, scale=scale, wavelength_um=sensor.wavelength(band)
                    )
                },
                sensor=sensor.name,
            ),
            tags,
        )
        # a granule's name says its date where its tags do not
        mod.datetime = mod.datetime or date_in_name(Path(urllib.parse.urlsplit(path).path).name)
        return mod
    if count == 1 and not descriptions[0]:
        names = [_single_band_name(name)]
    else:
        names = [(band_id(d) or canonical_band(d)) if d else f"b{i + 1}" for i, d in enumerate(descriptions)]
    bands = {n: BandFile(n, path, i + 1) for i, n in enumerate(names)}
    return _with_date(Modality(name=name, source=path, bands=bands), tags)


def _with_date(mod: Modality, tags: dict[str, str]) -> Modality:
    """The raster's own acquisition time (GeoTIFF tags), where it has one."""
    dt = tags.get("TIFFTAG_DATETIME") or tags.get("datetime")
    if dt:
        mod.datetime = _parse_datetime(dt)
    return mod


def _single_band_name(modality: str) -> str:
    """A lone unnamed band takes the modality's obvious name (a DEM's band is its elevation)."""
    return {"dem": "elevation", "srtm": "elevation", "elevation": "elevation"}.get(modality, "b1")


def _from_stac_item(
    name: str,
    source: str,
    asset_map: dict[str, str],
    settings: Settings | None = None,
    item: dict[str, Any] | None = None,
) -> Modality:
    field_name = f"scene.{name}"
    item = _load_json(source, field_name, settings) if item is None else item
    if not isinstance(item, dict) or item.get("type") != "Feature" or "assets" not in item:
        raise SceneError(f"{source!r} is not a STAC item (no Feature with assets)", field=field_name)
    base_dir = Path(source).parent if "://" not in source else None
    if not isinstance(item["assets"], dict):
        raise SceneError(f"{source!r}: assets must be an object of assets by key", field=field_name)
    props = item.get("properties") or {}
    sensor = sensor_of_item(item)
    bands: dict[str, BandFile] = {}
    for key, asset in item["assets"].items():
        if not isinstance(asset, dict) or "image/tiff" not in str(asset.get("type", "image/tiff")):
            continue  # previews (thumbnails, JPEG 2000 copies) and metadata are not model inputs
        # where the item states Sentinel-2's processing baseline, the baseline says the offset
        # (below): Earth Search stamps raster:bands offset -0.1 on baseline >= 04.00 items
        # whether or not their COGs were shifted back
        found = _stac_band_name(
            key, asset, sensor, field_name, use_offset="s2:processing_baseline" not in props
        )
        if found is None:
            continue  # multi-band previews (visual), masks and auxiliary layers
        href = asset.get("href")
        if not isinstance(href, str) or not href:
            raise SceneError(f"assets.{key}.href must be a URL or path, got {href!r}", field=field_name)
        href = href if base_dir is not None else _remote_href(source, href)
        href = _resolve_href(key, href, asset_map, base_dir)
        if href is None:
            continue
        bands[found.id] = BandFile(
            found.id,
            href,
            offset=found.offset,
            scale=found.scale,
            nodata=found.nodata,
            wavelength_um=found.wavelength_um,
        )
    if not bands:
        raise SceneError(
            f"STAC item {source!r} has no usable band assets (single-band GeoTIFFs whose eo:bands, bands or "
            "key "
            "name a band, e.g. common_name red)",
            field=field_name,
        )
    mod = Modality(name=name, source=source, bands=bands, sensor=sensor.name if sensor else None)
    _apply_stac_properties(mod, props)
    return mod


def _stac_band_name(
    key: str, asset: dict[str, Any], sensor: Sensor | None, field_name: str, *, use_offset: bool = True
) -> StacBand | None:
    """The band an asset holds and its raw -> card units: `tilefm.io.bands.stac_band` (the eo
    common name, the sensor's band names, a Sentinel-2 id, the centre wavelength, ...)."""
    return stac_band(key, asset, sensor, field_name, use_offset=use_offset)


def _resolve_href(key: str, href: str, asset_map: dict[str, str], base_dir: Path | None) -> str | None:
    """Asset map first, then a file of the same name beside the item (an offline copy), then the href."""
    if key in asset_map:
        return asset_map[key]
    filename = Path(urllib.parse.urlparse(href).path).name
    if base_dir is not None:
        local = base_dir / filename
        if local.exists():
            return str(local)
        if "://" not in href:
            return str((base_dir / href).resolve()) if (base_dir / href).exists() else None
    if href.startswith(("http://", "https://")):
        return "/vsicurl/" + href
    if href.startswith("s3://"):
        return "/vsis3/" + href[5:]
    return href


def _remote_href(item: str, href: str) -> str:
    """An asset href of a remote item as a URL: a relative one is relative to the item (RFC
    3986 for http(s); an S3 item's folder for s3://), not to this process's folder."""
    if "://" in href:
        return href
    if not item.startswith("s3://"):
        return urllib.parse.urljoin(item, href)
    bucket, _, key = item[len("s3://") :].partition("/")
    joined = href.lstrip("/") if href.startswith("/") else posixpath.join(posixpath.dirname(key), href)
    return f"s3://{bucket}/{posixpath.normpath(joined)}"


def _apply_stac_properties(mod: Modality, props: dict[str, Any]) -> None:
    mod.properties = props
    if props.get("datetime"):
        mod.datetime = _parse_datetime(props["datetime"]) if isinstance(props["datetime"], str) else None
        if mod.datetime is None:
            raise SceneError(
                f"{mod.source!r}: datetime {props['datetime']!r} is not a date and time (RFC 3339)",
                field=f"scene.{mod.name}",
            )
    # Sentinel-2 L2A from processing baseline 04.00 on carries a +1000 offset (unless already removed)
    baseline = props.get("s2:processing_baseline")
    if baseline and float(baseline) >= 4.0 and not props.get("earthsearch:boa_offset_applied", False):
        for k, b in list(mod.bands.items()):
            if re.fullmatch(r"B\d\d|B8A", k):
                mod.bands[k] = replace(b, offset=-1000.0)


def _inspect_rasters(mod: Modality, field_name: str, checked: bool = False) -> None:
    """Open every distinct file once: readable, georeferenced; record footprint and resolution."""
    footprints = []
    resolutions = []
    for path in sorted({b.path for b in mod.bands.values()}):
        try:
            with _open(path, checked) as src:
                if src.crs is None or src.transform.is_identity:
                    raise NotGeoreferencedError(
                        f"{path!r} is not georeferenced (no CRS or geotransform)", field=field_name
                    )
                outline = box(*src.bounds)
                outline = outline.segmentize(max(src.width, src.height) * abs(src.transform.a) / 20)
                geom = transform_geom(src.crs, "EPSG:4326", mapping(outline))
                footprints.append(shape(geom))
                resolutions.append(_ground_resolution(src))
                mod.grids[path] = (src.crs.to_wkt(), tuple(src.transform)[:6], src.width, src.height)
        except RasterioIOError as e:
            raise SceneError(f"cannot read {path!r}: {_short(e)}", field=field_name) from None
    mod.footprint = unary_union(footprints)
    mod.resolution_m = min(resolutions)


def _apply_declared_nodata(mod: Modality, field_name: str, checked: bool = False) -> None:
    """A nodata the source declares (STAC) for a file that has neither nodata nor a mask: the
    band is read through GDAL's `vrt://` with that nodata. A file's own nodata or mask wins.
    A checked scene cannot name a VRT, so there such a band is an error, not unmasked values."""
    for key, band in list(mod.bands.items()):
        if band.nodata is None:
            continue
        try:
            with _open(band.path, checked) as src:
                all_valid = (
                    src.nodatavals[band.index - 1] is None
                    and MaskFlags.all_valid in src.mask_flag_enums[band.index - 1]
                )
        except RasterioIOError as e:
            raise SceneError(f"cannot read {band.path!r}: {_short(e)}", field=field_name) from None
        if not all_valid:
            continue
        if checked or "?" in band.path:
            raise SceneError(
                f"{band.path!r} (band {key}) has no nodata of its own and its item declares {band.nodata!r}; "
                "write the nodata into the file",
                field=field_name,
            )
        mod.bands[key] = replace(band, path=f"vrt://{band.path}?a_nodata={band.nodata!r}")


def _open(path: str, checked: bool = False) -> rasterio.io.DatasetReader:
    """Open quietly: a missing georeference is reported as an error by the caller, not a warning.
    `checked`: only as the format its suffix says (`CHECKED_DRIVERS`)."""
    driver = None
    if checked:
        suffix = Path(urllib.parse.urlsplit(path).path if "://" in path else path).suffix.lower()
        driver = CHECKED_DRIVERS.get(suffix, "GTiff")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path, driver=driver)


def _ground_resolution(src: rasterio.io.DatasetReader) -> float:
    res = abs(src.transform.a)
    if src.crs.is_geographic:  # degrees -> metres at the raster's centre latitude
        import math

        lat = (src.bounds.top + src.bounds.bottom) / 2
        return res * 111_320.0 * max(math.cos(math.radians(lat)), 0.01)
    return res * (src.crs.linear_units_factor[1] if src.crs.linear_units_factor else 1.0)


def _load_json(source: str, field_name: str, settings: Settings | None = None) -> dict[str, Any]:
    try:
        if source.startswith(("http://", "https://")):
            with urllib.request.urlopen(source, timeout=30) as r:  # noqa: S310 - user-given STAC URL
                return json.loads(r.read())
        if source.startswith("s3://"):
            try:
                return json.loads(storage_for(source, settings).read_bytes(source))
            except TileFMError as e:
                raise SceneError(
                    f"cannot read STAC item {source!r}: {Exception.__str__(e)}", field=field_name
                ) from None
        return json.loads(Path(source).read_text())
    except FileNotFoundError:
        raise SceneError(f"{source!r} does not exist", field=field_name) from None
    except (OSError, ValueError) as e:
        raise SceneError(f"cannot read STAC item {source!r}: {e}", field=field_name) from None


def _parse_datetime(value: str) -> datetime | None:
    for fmt in (None, "%Y:%m:%d %H:%M:%S"):
        try:
            return (
                datetime.fromisoformat(value.replace("Z", "+00:00"))
                if fmt is None
                else datetime.strptime(value, fmt)
            )
        except ValueError:
            continue
    return None


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg.rstrip(".")
