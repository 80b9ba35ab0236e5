"""WMTS 1.0.0 capabilities for one layer, so GIS desktops (QGIS, ArcGIS) can add a job's output
the way they add any tiled service.

Everything interpolated is escaped, text with `escape` and attributes with `quoteattr`: the tile
URL carries the request's rendering parameters, and no value of them may close an attribute or
open an element."""

from __future__ import annotations

from xml.sax.saxutils import escape, quoteattr

from tilefm.grid import TMS


def capabilities(
    *,
    title: str,
    layer: str,
    bounds: tuple[float, float, float, float],
    minzoom: int,
    maxzoom: int,
    tile_url: str,
    fmt: str = "image/png",
) -> str:
    """`tile_url` has {TileMatrix}, {TileCol} and {TileRow} placeholders (WMTS RESTful names)."""
    w, s, e, n = (float(v) for v in bounds)  # numbers, whatever was passed in
    matrices = []
    for z in range(minzoom, maxzoom + 1):
        m = TMS.matrix(z)
        matrices.append(
            f"""
      <TileMatrix>
        <ows:Identifier>{z}</ows:Identifier>
        <ScaleDenominator>{m.scaleDenominator!r}</ScaleDenominator>
        <TopLeftCorner>{m.pointOfOrigin[0]!r} {m.pointOfOrigin[1]!r}</TopLeftCorner>
        <TileWidth>{m.tileWidth}</TileWidth>
        <TileHeight>{m.tileHeight}</TileHeight>
        <MatrixWidth>{m.matrixWidth}</MatrixWidth>
        <MatrixHeight>{m.matrixHeight}</MatrixHeight>
      </TileMatrix>"""
        )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Capabilities xmlns="http://www.opengis.net/wmts/1.0" xmlns:ows="http://www.opengis.net/ows/1.1"
  xmlns:xlink="http://www.w3.org/1999/xlink" version="1.0.0">
  <ows:ServiceIdentification>
    <ows:Title>{escape(title)}</ows:Title>
    <ows:ServiceType>OGC WMTS</ows:ServiceType>
    <ows:ServiceTypeVersion>1.0.0</ows:ServiceTypeVersion>
  </ows:ServiceIdentification>
  <Contents>
    <Layer>
      <ows:Title>{escape(title)}</ows:Title>
      <ows:Identifier>{escape(layer)}</ows:Identifier>
      <ows:WGS84BoundingBox crs="urn:ogc:def:crs:OGC:2:84">
        <ows:LowerCorner>{w!r} {s!r}</ows:LowerCorner>
        <ows:UpperCorner>{e!r} {n!r}</ows:UpperCorner>
      </ows:WGS84BoundingBox>
      <Style isDefault="true"><ows:Identifier>default</ows:Identifier></Style>
      <Format>{escape(fmt)}</Format>
      <TileMatrixSetLink><TileMatrixSet>WebMercatorQuad</TileMatrixSet></TileMatrixSetLink>
      <ResourceURL format={quoteattr(fmt)} resourceType="tile" template={quoteattr(tile_url)}/>
    </Layer>
    <TileMatrixSet>
      <ows:Identifier>WebMercatorQuad</ows:Identifier>
      <ows:SupportedCRS>urn:ogc:def:crs:EPSG::3857</ows:SupportedCRS>{"".join(matrices)}
    </TileMatrixSet>
  </Contents>
</Capabilities>
"""
