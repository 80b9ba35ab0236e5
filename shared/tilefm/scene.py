"""Scene inputs: what a user names with `--scene MODALITY=SOURCE`, resolved to one file per band.

A source is a folder of single-band rasters named by band, one multi-band raster, or a STAC item.
Everything is validated when the scene is opened (files readable, georeferenced, bands named), so
a bad scene fails before any tile is planned.
"""

from __future__ import annotations

import functools
import json
import re
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.warp import transform_geom
from shapely.geometry import box, mapping, shape
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union

from tilefm.errors import NotGeoreferencedError, SceneError

RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".vrt", ".img")

#: STAC eo:bands common names for Sentinel-2 and a few others, so items without band ids resolve
COMMON_NAMES = {
    "coastal": "B01",
    "blue": "B02",
    "green": "B03",
    "red": "B04",
    "rededge1": "B05",
    "rededge2": "B06",
    "rededge3": "B07",
    "nir": "B08",
    "nir08": "B8A",
    "nir09": "B09",
    "cirrus": "B10",
    "swir16": "B11",
    "swir22": "B12",
}


def canonical_band(name: str) -> str:
    """`b2`, `B2`, `B02` -> `B02`; `b8a` -> `B8A`; other names are lower-cased (`elevation`, `vv`)."""
    m = re.fullmatch(r"[bB]0?(\d{1,2})([aA]?)", name.strip())
    if m:
        return f"B{int(m.group(1)):02d}" if not m.group(2) else f"B{int(m.group(1))}A"
    return name.strip().lower()


@dataclass(frozen=True)
class BandFile:
    """One band of a modality: a GDAL-readable path and a 1-based band index in it."""

    name: str
    path: str
    index: int = 1
    #: added to raw values to get the card's units (e.g. -1000 for Sentinel-2 baseline >= 04.00)
    offset: float = 0.0


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

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "bands": {k: f"{v.path}#{v.index}" for k, v in sorted(self.bands.items())},
            "datetime": self.datetime.isoformat() if self.datetime else None,
        }


@dataclass
class Scene:
    """All modalities of a job. Their footprints may differ; the scene's is their union."""

    modalities: dict[str, Modality]
    #: overrides the sources' dates (e.g. for a band folder with no metadata)
    date_override: date | None = None

    @functools.cached_property
    def footprint(self) -> BaseGeometry:
        # cached: a service validates many submissions against one opened scene
        return unary_union([m.footprint for m in self.modalities.values() if m.footprint is not None])

    @property
    def date(self) -> date | None:
        if self.date_override is not None:
            return self.date_override
        for m in self.modalities.values():
            if m.datetime is not None:
                return m.datetime.date()
        return None

    @property
    def resolution_m(self) -> float:
        return min(m.resolution_m for m in self.modalities.values() if m.resolution_m)

    def describe(self) -> dict[str, Any]:
        return {k: m.describe() for k, m in self.modalities.items()}


def parse_scene_arg(arg: str) -> tuple[str, str]:
    """`s2=path` -> ("s2", "path"), with a clear error for anything else."""
    name, sep, source = arg.partition("=")
    name = name.strip().lower()
    if not sep or not name or not source.strip():
        raise SceneError(f"expected MODALITY=SOURCE (e.g. s2=./scene_dir), got {arg!r}")
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
        raise SceneError(f"modality name {name!r} must be lower-case letters, digits, - or _")
    return name, source.strip()


def open_scene(
    sources: dict[str, str],
    *,
    asset_map: dict[str, str] | None = None,
    date_override: date | None = None,
) -> Scene:
    """Resolve and validate every modality's source."""
    if not sources:
        raise SceneError("no scene given: pass --scene MODALITY=SOURCE at least once")
    mods = {name: open_modality(name, src, asset_map=asset_map) for name, src in sources.items()}
    return Scene(modalities=mods, date_override=date_override)


def open_modality(name: str, source: str, *, asset_map: dict[str, str] | None = None) -> Modality:
    field_name = f"scene.{name}"
    if any(ord(c) < 32 for c in source):
        raise SceneError("control characters are not allowed in a source", field=field_name)
    parsed = urllib.parse.urlparse(source)
    is_url = parsed.scheme in ("http", "https", "s3")
    if source.endswith(".json") or (is_url and parsed.path.endswith(".json")):
        mod = _from_stac_item(name, source, asset_map or {})
    elif is_url:
        mod = _from_raster(name, source)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise SceneError(f"source {source!r} does not exist", field=field_name)
        if path.is_dir():
            mod = _from_band_dir(name, path)
        else:
            mod = _from_raster(name, str(path))
    _inspect_rasters(mod, field_name)
    return mod


def _from_band_dir(name: str, path: Path) -> Modality:
    bands: dict[str, BandFile] = {}
    for f in sorted(path.iterdir()):
        if f.suffix.lower() in RASTER_SUFFIXES:
            bands[canonical_band(f.stem)] = BandFile(canonical_band(f.stem), str(f))
    if not bands:
        raise SceneError(f"folder {str(path)!r} holds no rasters ({', '.join(RASTER_SUFFIXES)})", field=f"scene.{name}")
    mod = Modality(name=name, source=str(path), bands=bands)
    item = path / "stac-item.json"
    if item.exists():  # a folder exported with its item: take the date and processing metadata
        props = _load_json(str(item), f"scene.{name}").get("properties", {})
        _apply_stac_properties(mod, props)
    else:
        m = re.search(r"(20\d{2})(\d{2})(\d{2})", path.name)
        if m:
            try:
                mod.datetime = datetime(int(m.group(1)), int(m.group(2)), int(m.group(3)))
            except ValueError:
                pass
    return mod


def _from_raster(name: str, path: str) -> Modality:
    try:
        with _open(path) as src:
            descriptions = list(src.descriptions)
            count = src.count
            tags = src.tags()
    except RasterioIOError as e:
        raise SceneError(f"cannot read {path!r}: {_short(e)}", field=f"scene.{name}") from None
    if count == 1 and not descriptions[0]:
        names = [_single_band_name(name)]
    else:
        names = [canonical_band(d) if d else f"b{i + 1}" for i, d in enumerate(descriptions)]
    bands = {n: BandFile(n, path, i + 1) for i, n in enumerate(names)}
    mod = Modality(name=name, source=path, bands=bands)
    dt = tags.get("TIFFTAG_DATETIME") or tags.get("datetime")
    if dt:
        mod.datetime = _parse_datetime(dt)
    return mod


def _single_band_name(modality: str) -> str:
    """A lone unnamed band takes the modality's obvious name (a DEM's band is its elevation)."""
    return {"dem": "elevation", "srtm": "elevation", "elevation": "elevation"}.get(modality, "b1")


def _from_stac_item(name: str, source: str, asset_map: dict[str, str]) -> Modality:
    field_name = f"scene.{name}"
    item = _load_json(source, field_name)
    if item.get("type") != "Feature" or "assets" not in item:
        raise SceneError(f"{source!r} is not a STAC item (no Feature with assets)", field=field_name)
    base_dir = Path(source).parent if "://" not in source else None
    bands: dict[str, BandFile] = {}
    for key, asset in item["assets"].items():
        eo = asset.get("eo:bands") or []
        if len(eo) != 1 or "image/tiff" not in str(asset.get("type", "image/tiff")):
            continue  # multi-band previews (visual, thumbnails) and metadata are not model inputs
        band = _stac_band_name(eo[0], key)
        href = _resolve_href(key, asset["href"], asset_map, base_dir)
        if href is None:
            continue
        bands[band] = BandFile(band, href)
    if not bands:
        raise SceneError(f"STAC item {source!r} has no single-band raster assets", field=field_name)
    mod = Modality(name=name, source=source, bands=bands)
    _apply_stac_properties(mod, item.get("properties", {}))
    return mod


def _stac_band_name(eo_band: dict[str, Any], key: str) -> str:
    """Band id from eo:bands: `B02` as is, a common/short name (`blue`, `rededge1`) via the
    Sentinel-2 table, else "(band 8A)" in the description, else the asset key."""
    for candidate in (eo_band.get("name"), eo_band.get("common_name"), key):
        if not candidate:
            continue
        if re.fullmatch(r"[bB]\d{1,2}[aA]?", candidate):
            return canonical_band(candidate)
        if candidate in COMMON_NAMES:
            return COMMON_NAMES[candidate]
    m = re.search(r"band (\d{1,2}[aA]?)\)", eo_band.get("description", ""))
    return canonical_band(f"B{m.group(1)}") if m else canonical_band(key)


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


def _apply_stac_properties(mod: Modality, props: dict[str, Any]) -> None:
    mod.properties = props
    if props.get("datetime"):
        mod.datetime = _parse_datetime(props["datetime"])
    # Sentinel-2 L2A from processing baseline 04.00 on carries a +1000 offset (unless already removed)
    baseline = props.get("s2:processing_baseline")
    if baseline and float(baseline) >= 4.0 and not props.get("earthsearch:boa_offset_applied", False):
        for k, b in list(mod.bands.items()):
            if re.fullmatch(r"B\d\d|B8A", k):
                mod.bands[k] = BandFile(b.name, b.path, b.index, offset=-1000.0)


def _inspect_rasters(mod: Modality, field_name: str) -> None:
    """Open every distinct file once: readable, georeferenced; record footprint and resolution."""
    footprints = []
    resolutions = []
    for path in sorted({b.path for b in mod.bands.values()}):
        try:
            with _open(path) as src:
                if src.crs is None or src.transform.is_identity:
                    raise NotGeoreferencedError(
                        f"{path!r} is not georeferenced (no CRS or geotransform)", field=field_name
                    )
                outline = box(*src.bounds)
                outline = outline.segmentize(max(src.width, src.height) * abs(src.transform.a) / 20)
                geom = transform_geom(src.crs, "EPSG:4326", mapping(outline))
                footprints.append(shape(geom))
                resolutions.append(_ground_resolution(src))
        except RasterioIOError as e:
            raise SceneError(f"cannot read {path!r}: {_short(e)}", field=field_name) from None
    mod.footprint = unary_union(footprints)
    mod.resolution_m = min(resolutions)


def _open(path: str) -> rasterio.io.DatasetReader:
    """Open quietly: a missing georeference is reported as an error by the caller, not a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path)


def _ground_resolution(src: rasterio.io.DatasetReader) -> float:
    res = abs(src.transform.a)
    if src.crs.is_geographic:  # degrees -> metres at the raster's centre latitude
        import math

        lat = (src.bounds.top + src.bounds.bottom) / 2
        return res * 111_320.0 * max(math.cos(math.radians(lat)), 0.01)
    return res * (src.crs.linear_units_factor[1] if src.crs.linear_units_factor else 1.0)


def _load_json(source: str, field_name: str) -> dict[str, Any]:
    try:
        if source.startswith(("http://", "https://")):
            with urllib.request.urlopen(source, timeout=30) as r:  # noqa: S310 - user-given STAC URL
                return json.loads(r.read())
        return json.loads(Path(source).read_text())
    except FileNotFoundError:
        raise SceneError(f"{source!r} does not exist", field=field_name) from None
    except (OSError, ValueError) as e:
        raise SceneError(f"cannot read STAC item {source!r}: {e}", field=field_name) from None


def _parse_datetime(value: str) -> datetime | None:
    for fmt in (None, "%Y:%m:%d %H:%M:%S"):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")) if fmt is None else datetime.strptime(value, fmt)
        except ValueError:
            continue
    return None


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg.rstrip(".")
