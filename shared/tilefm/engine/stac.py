"""The STAC item written beside each output COG, so catalogues and GIS tools can find and read it."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

import rasterio
from rasterio.warp import transform_geom
from shapely.geometry import box, mapping

from tilefm import __version__
from tilefm.card import ModelCard
from tilefm.grid import TilePlan
from tilefm.io.scene import Scene
from tilefm.values import Encoding

EXTENSIONS = [
    "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "https://stac-extensions.github.io/classification/v1.1.0/schema.json",
]


def output_item(
    cog: Path, card: ModelCard, plan: TilePlan, scene: Scene, href: str, encoding: Encoding
) -> dict[str, Any]:
    with rasterio.open(cog) as src:
        bounds = src.bounds
        shape = [src.height, src.width]
        transform = list(src.transform)[:6]
        overviews = src.overviews(1)
        inference_grid = src.tags().get("TILEFM_INFERENCE_GRID")
    footprint = plan.footprint
    d = scene.date
    dt = datetime.combine(d, time(0), tzinfo=UTC) if d else datetime.now(UTC)
    ll_bounds = transform_geom("EPSG:3857", "EPSG:4326", mapping(box(*bounds)))["coordinates"][0]
    lons = [p[0] for p in ll_bounds]
    lats = [p[1] for p in ll_bounds]
    band = {
        "data_type": encoding.dtype,
        "nodata": "nan" if encoding.nodata != encoding.nodata else encoding.nodata,
    }
    if encoding.dtype == "int8":
        band.update(scale=encoding.scale, offset=encoding.offset)
    if encoding.nbits:
        band["bits_per_sample"] = encoding.nbits
    asset: dict[str, Any] = {
        "href": href,
        "type": "image/tiff; application=geotiff; profile=cloud-optimized",
        "title": f"{card.title}: {card.output.kind}",
        "roles": ["data"],
        "raster:bands": [band] if card.output.kind == "classes" else [band] * card.output.channels,
    }
    if card.output.kind == "classes":
        asset["classification:classes"] = [
            {
                "value": c.value,
                "name": c.name.replace(" ", "_"),
                "description": c.name,
                "color_hint": c.color.lstrip("#").upper(),
            }
            for c in card.output.classes
        ]
    links = []
    for source in dict.fromkeys(
        m.source.split("#", 1)[0] for m in scene.acquisitions()
    ):  # an ItemCollection's items: SOURCE#ID
        if source.endswith(".json"):
            links.append({"rel": "derived_from", "href": source, "type": "application/geo+json"})
    # a time series: the date of every timestep, and the range they span (STAC common metadata)
    series = (
        {
            "start_datetime": _stamp(scene.timesteps[0]),
            "end_datetime": _stamp(scene.timesteps[-1]),
            "tilefm:timesteps": [d.isoformat() for d in scene.timesteps],
        }
        if scene.series
        else {}
    )
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": EXTENSIONS,
        "id": Path(href.rstrip("/")).stem,
        "geometry": mapping(footprint),
        "bbox": [min(lons), min(lats), max(lons), max(lats)],
        "properties": {
            "datetime": dt.isoformat().replace("+00:00", "Z"),
            "proj:epsg": 3857,
            "proj:shape": shape,
            "proj:transform": transform,
            "tilefm:model": card.name,
            "tilefm:model_version": card.version,
            "tilefm:model_sha256": card.weights.sha256,
            "tilefm:output_kind": card.output.kind,
            "tilefm:zoom": plan.zoom,
            #: where the model ran: its own grid (`context.grid: native`) or the tiles
            "tilefm:inference_grid": inference_grid or "web-mercator tiles",
            "tilefm:overviews": overviews,
            "tilefm:scene": scene.describe(),
            "tilefm:version": __version__,
            **series,
        },
        "links": links,
        "assets": {"data": asset},
    }


def _stamp(d: date) -> str:
    return datetime.combine(d, time(0), tzinfo=UTC).isoformat().replace("+00:00", "Z")


def dumps(item: dict[str, Any]) -> bytes:
    return json.dumps(item, indent=2).encode()
