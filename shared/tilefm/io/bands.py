"""Bands by what they measure, whatever the sensor.

A scene's bands are keyed by one sensor-independent identity: the Sentinel-2 MSI band id where
the band is the equivalent of one (`B04` is red, be it Sentinel-2's, Landsat's or HLS's; Landsat
OLI's narrow NIR is `B8A`), else its STAC common name (`lwir11`) or its polarisation (`vv`).
Model cards name their bands by that identity. The tables here say, per sensor, which file or
STAC asset is which band and how its raw values become the cards' units: optical reflectance is
read as reflectance x 10000 (Sentinel-2's own integers), brightness temperature in kelvin, SAR
backscatter in dB as given. docs/pipeline.md ("Band mapping") has the tables in prose.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from tilefm.errors import MissingBandError, SceneError

if TYPE_CHECKING:
    from tilefm.card import ModelCard
    from tilefm.io.scene import Scene

#: card units per unit of reflectance: cards read optical bands as reflectance x 10000
REFLECTANCE_UNITS = 10000.0


@dataclass(frozen=True)
class Band:
    """A band identity: its id, STAC common name, and the centre wavelength it stands for."""

    id: str
    common_name: str
    #: centre wavelength of the band the id names (Sentinel-2A MSI for the `B..` ids), um
    wavelength_um: float | None
    #: optical reflectance, read as reflectance x 10000; else physical units as they are
    reflectance: bool = True


BANDS: dict[str, Band] = {b.id: b for b in (
    Band("B01", "coastal", 0.443), Band("B02", "blue", 0.49), Band("B03", "green", 0.56),
    Band("B04", "red", 0.665), Band("B05", "rededge1", 0.705), Band("B06", "rededge2", 0.74),
    Band("B07", "rededge3", 0.783), Band("B08", "nir", 0.842), Band("B8A", "nir08", 0.865),
    Band("B09", "nir09", 0.945), Band("B10", "cirrus", 1.375), Band("B11", "swir16", 1.61),
    Band("B12", "swir22", 2.19), Band("pan", "pan", 0.59),
    Band("lwir", "lwir", 11.45, False), Band("lwir11", "lwir11", 10.9, False),
    Band("lwir12", "lwir12", 12.0, False),
    Band("vv", "vv", None, False), Band("vh", "vh", None, False),
    Band("hh", "hh", None, False), Band("hv", "hv", None, False),
)}  # fmt: skip

#: STAC eo common names (and Earth Search's `rededge1..3`) -> band id
COMMON_NAMES: dict[str, str] = {
    **{b.common_name: b.id for b in BANDS.values()},
    "rededge071": "B05", "rededge075": "B06", "rededge078": "B07",
}  # fmt: skip

#: the Sentinel-2 MSI band ids
S2_IDS = tuple(k for k in BANDS if k.startswith("B"))
#: a band named only by its centre wavelength is the nearest band within this, um
WAVELENGTH_TOLERANCE_UM = 0.03


def canonical_band(name: str) -> str:
    """`b2`, `B2`, `B02` -> `B02`; `b8a` -> `B8A`; other names are lower-cased (`elevation`, `vv`)."""
    m = re.fullmatch(r"[bB]0?(\d{1,2})([aA]?)", name.strip())
    if m:
        return f"B{int(m.group(1)):02d}" if not m.group(2) else f"B{int(m.group(1))}A"
    return name.strip().lower()


def band_id(name: str) -> str | None:
    """The identity a sensor-independent name stands for: a Sentinel-2 id (`B4`, `b8a`) or a
    common name (`nir08` -> `B8A`); None for anything else."""
    c = canonical_band(name)
    if c in BANDS:
        return c
    return COMMON_NAMES.get(name.strip().lower())


def band_by_wavelength(centre_um: float) -> str | None:
    """The Sentinel-2 band nearest a centre wavelength, if one is within the tolerance."""
    centres = {k: w for k in S2_IDS if (w := BANDS[k].wavelength_um) is not None}  # all of them
    best = min(centres, key=lambda k: abs(centres[k] - centre_um))
    return best if abs(centres[best] - centre_um) <= WAVELENGTH_TOLERANCE_UM else None


@dataclass(frozen=True)
class Sensor:
    """One sensor's products: its own band names and how their raw values become card units."""

    name: str
    title: str
    #: the sensor's band names, as `canonical_band` writes them without an `SR_`/`ST_` prefix
    #: ("B05" is Landsat OLI's band 5), -> band id
    bands: dict[str, str]
    #: band id -> (scale, offset) from raw values to card units; others (1, 0)
    scaling: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: band id -> the sensor's own centre wavelength, um, where it is not the band id's
    #: (Landsat OLI's blue is centred at 0.482 um, MSI's at 0.490): what a wavelength-conditioned
    #: encoder is given for the band
    wavelengths: dict[str, float] = field(default_factory=dict)

    def resolve(self, name: str) -> str | None:
        """The band id of one of the sensor's band names (`SR_B5`, `B5`, `B05`), or None."""
        return self.bands.get(canonical_band(re.sub(r"^S[RT]_", "", name.strip(), flags=re.IGNORECASE)))

    def scale_offset(self, band: str) -> tuple[float, float]:
        return self.scaling.get(band, (1.0, 0.0))

    def wavelength(self, band: str) -> float | None:
        """Centre wavelength (um) of this sensor's band `band` (a band id); None for bands
        without one (SAR)."""
        if band in self.wavelengths:
            return self.wavelengths[band]
        return BANDS[band].wavelength_um if band in BANDS else None

    @property
    def ids(self) -> set[str]:
        return set(self.bands.values())


#: Landsat 8/9 OLI/TIRS band numbers -> band id (OLI band 5 is the narrow NIR, like MSI's 8A)
OLI = {
    "B01": "B01",
    "B02": "B02",
    "B03": "B03",
    "B04": "B04",
    "B05": "B8A",
    "B06": "B11",
    "B07": "B12",
    "B08": "pan",
    "B09": "B10",
    "B10": "lwir11",
    "B11": "lwir12",
}
#: Collection 2 Level-2 surface reflectance: reflectance = DN * 2.75e-5 - 0.2
LANDSAT_L2_SR = (2.75e-5 * REFLECTANCE_UNITS, -0.2 * REFLECTANCE_UNITS)
#: Landsat 8/9 OLI/TIRS centre wavelengths (USGS, Landsat 8 Data Users Handbook), by band id
OLI_WAVELENGTHS = {
    "B01": 0.443, "B02": 0.482, "B03": 0.561, "B04": 0.655, "B8A": 0.865, "B11": 1.609,
    "B12": 2.201, "pan": 0.59, "B10": 1.373, "lwir11": 10.895, "lwir12": 12.005,
}  # fmt: skip

SENTINEL2 = Sensor("sentinel-2", "Sentinel-2 MSI (L1C / L2A)", {k: k for k in S2_IDS})
HLS_S30 = Sensor("hls-s30", "HLS S30 (Sentinel-2 MSI, harmonized)", {k: k for k in S2_IDS})
LANDSAT_L2 = Sensor(
    "landsat-c2-l2", "Landsat 8/9 OLI/TIRS Collection 2 Level-2",
    {k: OLI[k] for k in ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B10")},
    # surface temperature (ST_B10): kelvin = DN * 0.00341802 + 149
    {
        **{OLI[k]: LANDSAT_L2_SR for k in ("B01", "B02", "B03", "B04", "B05", "B06", "B07")},
        "lwir11": (0.00341802, 149.0),
    },
    OLI_WAVELENGTHS,
)  # fmt: skip
HLS_L30 = Sensor(
    "hls-l30", "HLS L30 (Landsat 8/9 OLI/TIRS, harmonized)",
    {k: OLI[k] for k in ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B09", "B10", "B11")},
    # brightness temperature in 0.01 degrees Celsius
    {"lwir11": (0.01, 273.15), "lwir12": (0.01, 273.15)},
    OLI_WAVELENGTHS,
)  # fmt: skip
SENTINEL1 = Sensor(
    "sentinel-1", "Sentinel-1 GRD (backscatter in dB)", {k: k for k in ("vv", "vh", "hh", "hv")}
)

SENSORS: dict[str, Sensor] = {s.name: s for s in (SENTINEL2, HLS_S30, LANDSAT_L2, HLS_L30, SENTINEL1)}

#: file names that say their sensor and band: (pattern with the band name as group 1, sensor)
FILE_NAMES: list[tuple[re.Pattern[str], Sensor]] = [
    (re.compile(r"L[CO]0[89]_L2S[PR]_.+_(SR_B[1-7]|ST_B10)", re.IGNORECASE), LANDSAT_L2),
    (re.compile(r"HLS\.S30\..+\.(B\d\d|B8A)", re.IGNORECASE), HLS_S30),
    (re.compile(r"HLS\.L30\..+\.(B\d\d)", re.IGNORECASE), HLS_L30),
    # granule images of a .SAFE: T29RKH_20200219T112111_B04(_10m)
    (re.compile(r"T\d\d[A-Z]{3}_\d{8}T\d{6}_(B\d\d|B8A)(?:_\d+m)?", re.IGNORECASE), SENTINEL2),
    # a GRD's measurement: s1a-iw-grd-vv-20200219t...
    (re.compile(r"s1[a-d]-\w+-grd[hm]?-(vv|vh|hh|hv)-.+", re.IGNORECASE), SENTINEL1),
]


def sensor_of_file(stem: str) -> tuple[Sensor, str] | None:
    """(sensor, band id) for a file name that says both (`LC09_L2SP_..._SR_B4` -> Landsat, B04)."""
    for pattern, sensor in FILE_NAMES:
        m = pattern.fullmatch(stem)
        if m and (band := sensor.resolve(m.group(1))) is not None:
            return sensor, band
    return None


def sensor_of_item(item: dict[str, Any]) -> Sensor | None:
    """The sensor of a STAC item, from its id or collection (HLS), `platform`, `constellation`
    and `instruments`. Landsat only where the item is Level-2 (its surface reflectance)."""
    props = item.get("properties") or {}
    ident = f"{item.get('id', '')} {item.get('collection', '')}".upper()
    if "HLS.S30" in ident or "HLSS30" in ident:
        return HLS_S30
    if "HLS.L30" in ident or "HLSL30" in ident:
        return HLS_L30
    platform = str(props.get("platform", "")).lower().replace("_", "-")
    constellation = str(props.get("constellation", "")).lower()
    instruments = {str(i).lower() for i in props.get("instruments") or []}
    if platform.startswith("sentinel-2") or constellation == "sentinel-2" or "msi" in instruments:
        return SENTINEL2
    if platform.startswith("sentinel-1") or constellation == "sentinel-1" or "c-sar" in instruments:
        return SENTINEL1
    landsat = re.fullmatch(r"landsat-?0?[89]", platform) or any(i.startswith("oli") for i in instruments)
    level2 = re.search(
        r"L2", f"{ident} {props.get('landsat:correction', '')} {props.get('processing:level', '')}"
    )
    if landsat and (level2 or any(str(k).upper().startswith("SR_") for k in item.get("assets") or {})):
        return LANDSAT_L2
    return None


@dataclass(frozen=True)
class StacBand:
    """A STAC asset as a band: its id, raw -> card units, and the nodata it declares."""

    id: str
    scale: float = 1.0
    offset: float = 0.0
    nodata: float | None = None
    #: the centre wavelength the item declares (eo `center_wavelength`), else the sensor's, um
    wavelength_um: float | None = None


def stac_band(
    key: str, asset: dict[str, Any], sensor: Sensor | None, field_name: str, *, use_offset: bool = True
) -> StacBand | None:
    """The band a single-band asset holds, or None where it is not a model input (previews,
    masks, multi-band assets, assets without band metadata whose key names no band).

    The identity comes from, in order: the sensor's own band name (eo:bands `name`, then the
    asset key: `SR_B5`, HLS L30's `B05`), which is exact where a common name may be broad (old
    Landsat items call OLI's band 5 `nir`); the eo common name; a Sentinel-2 id or common name as
    `name` or key (a sensor with its own table excepted); the centre wavelength; "(band 8A)" in
    the description. STAC 1.0 (`eo:bands`, `raster:bands`) and 1.1 (`bands` with `eo:` /
    `raster:` fields, or the same fields on the asset) both resolve. Where the band declares a
    `scale`, its scale and offset (raw -> physical units) give the card units; else the
    sensor's table does. `use_offset` False: the declared offset is not the authority
    (Sentinel-2's processing baseline is)."""
    descs = asset.get("eo:bands") or asset.get("bands") or []
    if not isinstance(descs, list) or len(descs) > 1:
        return None
    desc = descs[0] if descs and isinstance(descs[0], dict) else {}
    where = f"assets.{key}"

    def get(name: str) -> Any:
        # STAC 1.0 eo:bands, then 1.1 band fields, then 1.1 fields on the asset
        for source, k in ((desc, name), (desc, f"eo:{name}"), (asset, f"eo:{name}")):
            if source.get(k) is not None:
                return source[k]
        return None

    common, centre = get("common_name"), get("center_wavelength")
    if centre is not None:
        centre = _number(centre, f"{where}.eo:bands[0].center_wavelength", field_name)
    own = [n for n in (desc.get("name"), key) if isinstance(n, str) and n]
    band = (
        next((b for n in own if (b := sensor.resolve(n)) is not None), None) if sensor is not None else None
    )
    if band is None and common:
        band = COMMON_NAMES.get(str(common).lower())
    if band is None and (sensor is None or sensor is SENTINEL2):
        band = next((b for n in own if (b := band_id(n)) is not None), None)
    if band is None and centre is not None:
        band = band_by_wavelength(centre)
    if band is None:
        m = re.search(r"band (\d{1,2}[aA]?)\)", str(desc.get("description", "")))
        band = canonical_band(f"B{m.group(1)}") if m else None
    if band is None:
        if not desc:
            return None  # no band metadata, and the key names no band: quality masks, AOT, ...
        band = canonical_band(key)
    scale, offset, nodata = _raster_fields(asset, desc, where, field_name)
    if scale is not None:
        units = REFLECTANCE_UNITS if band in BANDS and BANDS[band].reflectance else 1.0
        card = (scale * units, (offset or 0.0) * units if use_offset else 0.0)
    else:
        card = sensor.scale_offset(band) if sensor is not None else (1.0, 0.0)
    wavelength = centre if centre is not None else sensor.wavelength(band) if sensor is not None else None
    return StacBand(band, _tidy(card[0]), _tidy(card[1]), nodata, wavelength)


def _raster_fields(
    asset: dict[str, Any], desc: dict[str, Any], where: str, field_name: str
) -> tuple[float | None, float | None, float | None]:
    """(scale, offset, nodata) a band declares, validated: STAC 1.0 raster:bands, else 1.1."""
    raster = asset.get("raster:bands")
    if raster is not None:
        if not isinstance(raster, list) or not all(isinstance(r, dict) for r in raster):
            raise SceneError(f"{where}.raster:bands must be a list of objects", field=field_name)
        r = raster[0] if len(raster) == 1 else {}
        names = {
            "scale": ("scale", "raster:bands[0].scale"),
            "offset": ("offset", "raster:bands[0].offset"),
            "nodata": ("nodata", "raster:bands[0].nodata"),
        }
        sources = [r]
    else:
        names = {
            "scale": ("raster:scale", "raster:scale"),
            "offset": ("raster:offset", "raster:offset"),
            "nodata": ("nodata", "nodata"),
        }
        sources = [desc, asset]
    out: dict[str, float | None] = {}
    for what, (key, label) in names.items():
        value = next((s[key] for s in sources if s.get(key) is not None), None)
        out[what] = (
            None
            if value is None
            else _number(value, f"{where}.{label}", field_name, special=what == "nodata")
        )
    if out["scale"] is not None and (out["scale"] == 0 or not math.isfinite(out["scale"])):
        raise SceneError(
            f"{where}: scale must be a non-zero finite number, got {out['scale']!r}", field=field_name
        )
    return out["scale"], out["offset"], out["nodata"]


def _number(value: Any, label: str, field_name: str, *, special: bool = False) -> float:
    """A JSON number (for nodata also "nan", "inf", "-inf", as STAC allows), else a SceneError."""
    if special and isinstance(value, str) and value.lower() in ("nan", "inf", "-inf"):
        return float(value)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (special or math.isfinite(value))
    ):
        raise SceneError(f"{label} must be a number, got {value!r}", field=field_name)
    return float(value)


def _tidy(x: float) -> float:
    """Products of decimal metadata to the decimals they stand for (2.75e-5 * 1e4 -> 0.275)."""
    return float(f"{x:.12g}")


def bind_card(scene: Scene, card: ModelCard) -> Scene:
    """The scene as `card` reads it. A card band the scene lacks is read from the first of its
    `alternatives` the scene has (Landsat OLI's NIR for a model that takes either NIR). A band a
    required input still lacks, on a scene whose sensor is known, is a MissingBandError naming
    the band and the sensor; optional inputs' missing bands stay missing (masked when read).
    Each acquisition of a time series is bound as a scene of its own."""
    if scene.series:
        series = {
            name: [
                bind_card(replace(scene, modalities={name: a}, series={}), card).modalities[name]
                for a in acqs
            ]
            for name, acqs in scene.series.items()
        }
        scene = replace(
            scene,
            modalities={**scene.modalities, **{name: acqs[0] for name, acqs in series.items()}},
            series=series,
        )
    mods = dict(scene.modalities)
    changed = False
    for inp in card.inputs:
        mod = scene.modalities.get(inp.modality)
        if mod is None:
            continue
        extra = {}
        for b in inp.bands:
            if b.name not in mod.bands:
                alt = next((a for a in b.alternatives if a in mod.bands), None)
                if alt is not None:
                    extra[b.name] = mod.bands[alt]
        sensor = SENSORS.get(mod.sensor or "")
        if sensor is not None and inp.required:
            # bands the sensor does not measure at all (one it measures but the source lacks, a
            # file missing from a folder, is `read.check_scene`'s to report)
            unmeasured = [
                b.name
                for b in inp.bands
                if b.name not in mod.bands and b.name not in extra and b.name not in sensor.ids
            ]
            if unmeasured:
                what = ", ".join(
                    f"{m} ({BANDS[m].common_name}, {BANDS[m].wavelength_um} um)"
                    if m in BANDS and BANDS[m].wavelength_um
                    else m
                    for m in unmeasured
                )
                raise MissingBandError(
                    f"model {card.name!r} needs band{'s' if len(unmeasured) > 1 else ''} {what}, which "
                    f"{sensor.title} "
                    f"does not measure ({mod.source!r} has {', '.join(sorted(mod.bands))})",
                    field=f"scene.{inp.modality}",
                )
        if extra:
            mods[inp.modality] = replace(mod, bands={**mod.bands, **extra})
            changed = True
    return replace(scene, modalities=mods) if changed else scene
