"""The tile server over real outputs: two jobs run by a real scheduler (Ray, SeaweedFS S3, the real
models), served by the tiler app; tiles compared with the COGs read straight through GDAL."""

from __future__ import annotations

import gzip
import io
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import CLOUDS_BBOX, PRESTO_BBOX, TILER_PREFIX, settings_from
from fastapi.testclient import TestClient
from PIL import Image
from rasterio.windows import from_bounds

from tilefm.api.tiler import create_app
from tilefm.grid import TMS
from tilefm.jobs.models import JobSpec
from tilefm.jobs.store import JobStore
from tilefm.storage import gdal_env, storage_for
from tilefm.tiler.render import cosine_similarity


@pytest.fixture(scope="module")
def client(tiler_app) -> TestClient:
    with TestClient(tiler_app) as c:
        yield c


@pytest.fixture(scope="module")
def outputs(client: TestClient, finished_jobs: dict[str, str]) -> dict[str, dict]:
    return {name: client.get(f"/v1/jobs/{i}/info").json() | {"job": i} for name, i in finished_jobs.items()}


def _cog(info: dict, settings) -> tuple[np.ndarray, rasterio.Affine, float | None]:
    """The whole output COG, read with rasterio (not through the tiler)."""
    path = storage_for(info["output"], settings).rasterio_path(info["output"])
    with rasterio.Env(**gdal_env(settings)), rasterio.open(path) as src:
        return src.read(), src.transform, src.nodata


@pytest.fixture(scope="module")
def cogs(outputs: dict[str, dict], tiler_env) -> dict[str, tuple]:
    settings = settings_from(tiler_env)
    return {name: _cog(info, settings) for name, info in outputs.items()}


def _tiles(info: dict) -> list:
    w, s, e, n = info["bounds"]
    eps = 1e-6
    return list(TMS.tiles(w + eps, s + eps, e - eps, n - eps, [info["native_zoom"]]))


def _window(transform, tile) -> tuple[slice, slice]:
    win = from_bounds(*TMS.xy_bounds(tile), transform=transform).round_offsets().round_lengths()
    return slice(win.row_off, win.row_off + win.height), slice(win.col_off, win.col_off + win.width)


def _png(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGBA"))


# ------------------------------------------------------------------------------------------------
# TileJSON, tiles, values
# ------------------------------------------------------------------------------------------------


def test_info_names_the_stored_type(outputs: dict[str, dict]) -> None:
    """Presto's float16 embeddings are float16 whichever GDAL reads them (before 3.11 GDAL says
    Float32 with NBITS=16), class maps uint8."""
    assert outputs["presto"]["dtype"] == "float16" and outputs["clouds"]["dtype"] == "uint8"


def test_tilejson_for_both_outputs(client: TestClient, outputs: dict[str, dict]) -> None:
    for name, info in outputs.items():
        tj = client.get(f"/v1/jobs/{info['job']}/tilejson.json").json()
        assert tj["tilejson"] == "3.0.0"
        assert tj["minzoom"] <= info["native_zoom"] <= tj["maxzoom"]
        assert tj["tiles"][0].endswith(f"/v1/jobs/{info['job']}/tiles/WebMercatorQuad/{{z}}/{{x}}/{{y}}.png")
        w, s, e, n = tj["bounds"]  # the tile-aligned COG: the job's bbox and at most a tile more
        bb = CLOUDS_BBOX if name == "clouds" else PRESTO_BBOX
        assert w <= bb[0] < bb[2] <= e and s <= bb[1] < bb[3] <= n and e - w < 1.0 and n - s < 1.0, tj[
            "bounds"
        ]
        if name == "clouds":
            assert [c["name"] for c in tj["legend"]] == ["clear", "cloud", "cloud shadow"]
            assert tj["legend"][1]["color"] == "#f5f5f5"
        else:
            assert "legend" not in tj
    # rendering parameters travel into the template; tile_format / tile_scale shape it
    presto = outputs["presto"]["job"]
    tj = client.get(
        f"/v1/jobs/{presto}/tilejson.json?render=rgb&bands=4,5,6&tile_format=webp&tile_scale=2"
    ).json()
    assert tj["tiles"][0].endswith("/{z}/{x}/{y}@2x.webp?render=rgb&bands=4,5,6")


def test_class_tiles_equal_the_cog(client: TestClient, outputs: dict[str, dict], cogs: dict) -> None:
    info = outputs["clouds"]
    data, transform, nodata = cogs["clouds"]
    colors = {c["value"]: tuple(int(c["color"][i : i + 2], 16) for i in (1, 3, 5)) for c in info["classes"]}
    tiles = _tiles(info)
    assert len(tiles) == 12
    seen = set()
    for t in tiles:
        base = f"/v1/jobs/{info['job']}/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}"
        expected = data[0][_window(transform, t)]
        raw = np.load(io.BytesIO(client.get(base + ".npy").content))
        assert raw.shape == (1, 256, 256) and raw.dtype == np.uint8
        assert np.array_equal(raw[0], expected), f"tile {t}: npy differs from the COG"
        rgba = _png(client.get(base + ".png").content)
        for value, rgb in colors.items():
            sel = expected == value
            seen.add(value) if sel.any() else None
            assert (rgba[sel][:, :3] == rgb).all() and (rgba[sel][:, 3] == 255).all(), (
                f"tile {t}: class {value} drawn wrong"
            )
        assert (rgba[expected == nodata][:, 3] == 0).all(), "no-data pixels must be transparent"
    assert {0, 1} <= seen, "the sample area should show clear and cloudy pixels"


def test_embedding_tiles_equal_the_cog(client: TestClient, outputs: dict[str, dict], cogs: dict) -> None:
    info = outputs["presto"]
    data, transform, _ = cogs["presto"]
    tiles = _tiles(info)
    assert len(tiles) == 2
    for t in tiles:
        raw = np.load(
            io.BytesIO(
                client.get(f"/v1/jobs/{info['job']}/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.npy").content
            )
        )
        expected = data[(slice(None), *_window(transform, t))]
        assert raw.shape == (128, 256, 256) and raw.dtype == np.float32
        # stored as float16 in a Float32 COG: the served values are those floats, exactly
        assert np.array_equal(raw, expected, equal_nan=True)
        assert np.isfinite(raw).mean() > 0.5
    # a GeoTIFF tile is georeferenced on the tile
    t = tiles[0]
    with (
        rasterio.MemoryFile(
            client.get(f"/v1/jobs/{info['job']}/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.tif").content
        ) as mem,
        mem.open() as src,
    ):
        assert src.crs.to_epsg() == 3857 and src.count == 128
        assert np.allclose(src.bounds, TMS.xy_bounds(t), atol=1e-6)


def test_pca_render_is_one_projection_for_the_whole_job(
    client: TestClient, outputs: dict[str, dict], cogs: dict, tiler_env
) -> None:
    info = outputs["presto"]
    data, transform, _ = cogs["presto"]
    stats = json.loads(
        storage_for(info["output"], settings_from(tiler_env)).read_bytes(info["output"][:-4] + ".pca.json")
    )
    assert len(stats["components"]) == 3 and len(stats["components"][0]) == 128
    assert 0 < sum(stats["explained_variance_ratio"]) <= 1.0
    comps, mean = np.array(stats["components"], np.float32), np.array(stats["mean"], np.float32)
    lo, hi = np.array(stats["pca_lo"]), np.array(stats["pca_hi"])
    for t in _tiles(info):
        rgba = _png(client.get(f"/v1/jobs/{info['job']}/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.png").content)
        values = data[(slice(None), *_window(transform, t))]
        valid = np.isfinite(values).all(axis=0)
        proj = np.tensordot(comps, values - mean[:, None, None], axes=1)
        expected = np.clip((proj - lo[:, None, None]) / (hi - lo)[:, None, None], 0, 1) * 255
        got = np.moveaxis(rgba[..., :3], -1, 0).astype(float)
        assert np.abs(got[:, valid] - expected[:, valid]).max() <= 1.01
        assert (rgba[..., 3][~valid] == 0).all() and (rgba[..., 3][valid] == 255).all()


def test_similarity_of_a_pixel_to_itself_is_one(
    client: TestClient, outputs: dict[str, dict], cogs: dict
) -> None:
    info = outputs["presto"]
    data, transform, _ = cogs["presto"]
    rows, cols = np.nonzero(np.isfinite(data).all(axis=0))
    k = len(rows) // 3
    r, c = int(rows[k]), int(cols[k])
    x, y = transform @ (c + 0.5, r + 0.5)
    lon, lat = TMS.lnglat(x, y)
    t = TMS.tile(lon, lat, info["native_zoom"])
    url = (
        f"/v1/jobs/{info['job']}/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.npy"
        f"?render=similarity&lon={lon!r}&lat={lat!r}"
    )
    sim = np.load(io.BytesIO(client.get(url).content))[0]
    rows_t, cols_t = _window(transform, t)
    assert sim[r - rows_t.start, c - cols_t.start] == pytest.approx(1.0, abs=1e-6)
    finite = sim[np.isfinite(sim)]
    assert finite.min() >= -1 and finite.max() <= 1 and finite.std() > 1e-3
    # the same map from the vector itself, and from an independent computation
    vector = ",".join(repr(float(v)) for v in data[:, r, c])
    sim2 = np.load(
        io.BytesIO(
            client.get(
                f"/v1/jobs/{info['job']}/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.npy?render=similarity&vector={vector}"
            ).content
        )
    )[0]
    assert np.allclose(sim, sim2, equal_nan=True)
    expected = cosine_similarity(data[(slice(None), rows_t, cols_t)], data[:, r, c])
    assert np.allclose(sim, expected, atol=1e-5, equal_nan=True)
    png = client.get(url.replace(".npy", ".png"))
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"


def test_point_values_are_dequantized_cog_values(
    client: TestClient, outputs: dict[str, dict], cogs: dict
) -> None:
    for name in ("presto", "clouds"):
        info = outputs[name]
        data, transform, nodata = cogs[name]
        r, c = data.shape[1] // 2 + 3, data.shape[2] // 2 - 5
        lon, lat = TMS.lnglat(*(transform @ (c + 0.5, r + 0.5)))
        body = client.get(f"/v1/jobs/{info['job']}/point/{lon!r},{lat!r}").json()
        assert len(body["values"]) == info["count"] == len(body["band_names"])
        expected = data[:, r, c].astype(float)
        assert np.allclose([np.nan if v is None else v for v in body["values"]], expected, equal_nan=True)
        if name == "clouds":
            assert body["class"]["value"] == int(expected[0])
            assert body["class"]["name"] == info["classes"][int(expected[0])]["name"]


def test_statistics_preview_and_wmts(client: TestClient, outputs: dict[str, dict], cogs: dict) -> None:
    clouds = outputs["clouds"]
    stats = client.get(f"/v1/jobs/{clouds['job']}/statistics").json()["class"]
    assert set(stats["classes"]) == {"clear", "cloud", "cloud shadow"}
    assert sum(stats["fractions"].values()) == pytest.approx(1.0, abs=1e-4)
    data = cogs["clouds"][0][0]
    cloud_share = (data == 1).sum() / (data != 255).sum()
    assert stats["fractions"]["cloud"] == pytest.approx(cloud_share, abs=0.02)
    presto = outputs["presto"]
    s = client.get(f"/v1/jobs/{presto['job']}/statistics?bands=1,2").json()
    band0 = cogs["presto"][0][0]
    assert list(s) == presto["band_names"][:2]
    assert s[presto["band_names"][0]]["mean"] == pytest.approx(float(np.nanmean(band0)), abs=1e-3)
    for info in outputs.values():
        prev = client.get(f"/v1/jobs/{info['job']}/preview.png?max_size=256")
        assert prev.status_code == 200 and max(Image.open(io.BytesIO(prev.content)).size) <= 256
        xml = client.get(f"/v1/jobs/{info['job']}/WMTSCapabilities.xml")
        assert xml.status_code == 200 and xml.headers["content-type"].startswith("application/xml")
        root = ET.fromstring(xml.content)
        ns = {"w": "http://www.opengis.net/wmts/1.0", "ows": "http://www.opengis.net/ows/1.1"}
        ids = [int(e.text) for e in root.findall(".//w:TileMatrixSet/w:TileMatrix/ows:Identifier", ns)]
        assert ids == list(range(info["minzoom"], info["maxzoom"] + 1))
        template = root.find(".//w:ResourceURL", ns).get("template")
        z, t = info["native_zoom"], _tiles(info)[0]
        url = (
            template.replace("{TileMatrix}", str(z))
            .replace("{TileCol}", str(t.x))
            .replace("{TileRow}", str(t.y))
        )
        assert client.get(url.replace("http://testserver", "")).status_code == 200


def test_input_scene_true_colour(client: TestClient, outputs: dict[str, dict], scene_dir: Path) -> None:
    info = outputs["clouds"]
    tj = client.get(f"/v1/jobs/{info['job']}/scene/tilejson.json").json()
    w, s, e, n = tj["bounds"]
    assert -12.1 < w < -11.9 and 25.2 < n < 25.4  # the whole scene's footprint, not the job's bbox
    t = _tiles(info)[5]
    rgba = _png(
        client.get(f"/v1/jobs/{info['job']}/scene/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.png").content
    )
    assert (rgba[..., 3] == 255).mean() > 0.99 and rgba[..., :3].std() > 5
    # red channel = B04 reflectance x 10000 over 0..3000, read independently with rio-tiler
    from rio_tiler.io import Reader

    with Reader(str(scene_dir / "B04.tif")) as r:
        b04 = (
            r.tile(t.x, t.y, t.z, resampling_method="bilinear", reproject_method="bilinear")
            .array[0]
            .filled(0)
            .astype(float)
        )
    expected = np.clip(b04 / 3000 * 255, 0, 255)
    assert np.abs(rgba[..., 0] - expected).mean() < 1.0
    brighter = client.get(
        f"/v1/jobs/{info['job']}/scene/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.png?rescale=0,1500"
    )
    assert _png(brighter.content)[..., 0].mean() > rgba[..., 0].mean()


# ------------------------------------------------------------------------------------------------
# errors, caching, metrics
# ------------------------------------------------------------------------------------------------


def _error(resp, status: int, field: str | None = None, words: str = "") -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["status"] == status and words in err["message"], err
    if field:
        assert err["field"] == field, err


def test_errors_are_json_with_the_right_status(
    client: TestClient, outputs: dict[str, dict], tiler_env, scene_dir
) -> None:
    clouds, presto = outputs["clouds"]["job"], outputs["presto"]["job"]
    z = outputs["clouds"]["native_zoom"]
    t = _tiles(outputs["clouds"])[0]
    _error(client.get("/v1/jobs/0123456789abcdef0123456789abcdef/tilejson.json"), 404, "id", "no job")
    _error(
        client.get(f"/v1/jobs/{clouds}/tiles/WebMercatorQuad/{z + 9}/{t.x}/{t.y}.png"),
        404,
        "z",
        "outside this layer's range",
    )
    _error(client.get(f"/v1/jobs/{clouds}/tiles/WebMercatorQuad/{z}/0/0.png"), 404, "z", "outside the output")
    _error(
        client.get(f"/v1/jobs/{clouds}/tiles/WebMercatorQuad/{z}/{2**z}/0.png"), 404, "x", "does not exist"
    )
    _error(client.get(f"/v1/jobs/{clouds}/tiles/WorldCRS84Quad/{z}/{t.x}/{t.y}.png"), 404, "tms")
    _error(client.get(f"/v1/jobs/{clouds}/tiles/WebMercatorQuad/{z}/{t.x}/{t.y}.gif"), 422, "path.fmt")
    _error(
        client.get(f"/v1/jobs/{clouds}/tiles/WebMercatorQuad/{z}/{t.x}/{t.y}.png?render=pca"),
        422,
        "render",
        "not available",
    )
    _error(client.get(f"/v1/jobs/{presto}/tilejson.json?render=rgb&bands=1,2,300"), 422, "bands")
    _error(client.get(f"/v1/jobs/{presto}/tilejson.json?render=rgb&rescale=5,1"), 422, "rescale")
    _error(client.get(f"/v1/jobs/{presto}/tilejson.json?render=similarity"), 422, "lon", "needs a query")
    _error(
        client.get(f"/v1/jobs/{presto}/tilejson.json?render=similarity&vector=1,2,3"),
        422,
        "vector",
        "128 bands",
    )
    _error(
        client.get(f"/v1/jobs/{presto}/tilejson.json?render=similarity&lon=10&lat=10"), 404, "lon", "outside"
    )
    _error(client.get(f"/v1/jobs/{presto}/point/200,10"), 422, "path.lon")
    # a job that has not finished: 409
    settings = settings_from(tiler_env)
    store = JobStore.from_url(settings.redis_url, prefix=settings.redis_prefix)
    queued, _ = store.create(
        JobSpec(scene={"s2": str(scene_dir)}, model="presto", output_prefix=TILER_PREFIX),
        idempotency_key=None,
        body_hash="queued-for-tiler-test",
    )
    _error(client.get(f"/v1/jobs/{queued.id}/tiles/WebMercatorQuad/{z}/{t.x}/{t.y}.png"), 409, "id", "queued")
    store.request_cancel(queued.id)


def test_http_caching_and_metrics(client: TestClient, outputs: dict[str, dict]) -> None:
    info = outputs["clouds"]
    t = _tiles(info)[3]
    url = f"/v1/jobs/{info['job']}/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.png"
    first = client.get(url)
    assert "immutable" in first.headers["cache-control"] and first.headers["etag"]
    again = client.get(url, headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and not again.content
    other = client.get(url + "?render=raw")
    assert other.headers["etag"] != first.headers["etag"]
    before = _metric(client, 'tilefm_tile_cache_requests_total{result="hit"}')
    assert client.get(url).content == first.content
    assert _metric(client, 'tilefm_tile_cache_requests_total{result="hit"}') == before + 1
    assert _metric(client, 'tilefm_tile_request_seconds_count{format="png",route="output"}') >= 1
    # gzip for JSON, never for images
    big = client.get(f"/v1/jobs/{outputs['presto']['job']}/statistics", headers={"Accept-Encoding": "gzip"})
    assert big.headers.get("content-encoding") == "gzip"
    raw = client.get(url, headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in raw.headers
    assert gzip  # imported for clarity of intent: httpx decodes gzip itself


def _metric(client: TestClient, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_cors_is_configurable(tiler_env) -> None:
    app = create_app(settings_from({**tiler_env, "TILEFM_CORS_ORIGINS": '["https://maps.example.org"]'}))
    with TestClient(app) as c:
        r = c.get("/healthz", headers={"Origin": "https://maps.example.org"})
        assert r.headers["access-control-allow-origin"] == "https://maps.example.org"
        assert (
            "access-control-allow-origin"
            not in c.get("/healthz", headers={"Origin": "https://evil.example"}).headers
        )


def test_job_list_for_the_viewer(client: TestClient, outputs: dict[str, dict]) -> None:
    jobs = client.get("/v1/jobs").json()["jobs"]
    ids = {j["id"] for j in jobs}
    assert {o["job"] for o in outputs.values()} <= ids
    assert all(
        set(j) == {"id", "model", "created", "finished"} and j["finished"] for j in jobs
    )  # no labels, no storage


# ------------------------------------------------------------------------------------------------
# security: the generic COG endpoints read only the configured storage
# ------------------------------------------------------------------------------------------------


REFUSED = [
    "/etc/passwd",
    "file:///etc/passwd",
    "/etc/../etc/passwd.tif",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "https://example.com/cog.tif",
    "/vsicurl/http://169.254.169.254/latest/meta-data/x.tif",
    "/vsis3/tilefm/tiler-test/x.tif",
    "s3://tilefm/tiler-test/../secrets/x.tif",
    "s3://tilefm/other-prefix/x.tif",
    "s3://another-bucket/tiler-test/x.tif",
    "gs://tilefm/tiler-test/x.tif",
    "s3://tilefm/tiler-test/x.vrt",
]


@pytest.mark.parametrize("url", REFUSED)
def test_cog_endpoints_refuse_paths_outside_storage(client: TestClient, url: str) -> None:
    for route in ("/cog/info", "/cog/tiles/WebMercatorQuad/0/0/0.png", "/cog/point/0,0"):
        r = client.get(route, params={"url": url})
        assert r.status_code == 403, (route, url, r.text)
        assert r.json()["error"]["field"] == "url"


def test_cog_endpoints_serve_outputs_under_the_prefix(client: TestClient, outputs: dict[str, dict]) -> None:
    info = outputs["clouds"]
    assert info["output"].startswith(TILER_PREFIX)
    r = client.get("/cog/info", params={"url": info["output"]})
    assert r.status_code == 200 and r.json()["count"] == 1
    # the same tile through plain TiTiler and through the job route: same pixels
    t = _tiles(info)[4]
    cog = client.get(f"/cog/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.png", params={"url": info["output"]})
    job = client.get(f"/v1/jobs/{info['job']}/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.png")
    assert np.array_equal(_png(cog.content), _png(job.content))


def test_local_prefix_refuses_traversal_and_symlinks(
    tiler_env, tmp_path: Path, outputs: dict[str, dict]
) -> None:
    served = tmp_path / "served"
    served.mkdir()
    secret = tmp_path / "secret.tif"
    secret.write_bytes(b"not for you")
    os.symlink(secret, served / "link.tif")
    (served / "sub").mkdir()
    app = create_app(settings_from({**tiler_env, "TILEFM_TILER_PREFIXES": json.dumps([str(served)])}))
    with TestClient(app) as c:
        for url in (
            str(secret),
            str(served / "link.tif"),
            f"{served}/sub/../../secret.tif",
            f"file://{served}/../secret.tif",
            f"{served}%2F..%2Fsecret.tif",
            f"{served}/sub/..\\..\\secret.tif",
        ):
            r = c.get("/cog/info", params={"url": url})
            assert r.status_code == 403, (url, r.text)
        # a real file inside the prefix is served; a missing one is a 4xx, not a 500
        missing = c.get("/cog/info", params={"url": str(served / "missing.tif")})
        assert 400 <= missing.status_code < 500, missing.text


def test_cog_endpoints_off_without_prefixes(tiler_env, outputs) -> None:
    env = {**tiler_env, "TILEFM_ALLOWED_OUTPUTS": "[]", "TILEFM_TILER_PREFIXES": "[]"}
    with TestClient(create_app(settings_from(env))) as c:
        r = c.get("/cog/info", params={"url": outputs["clouds"]["output"]})
        assert r.status_code == 403 and "disabled" in r.json()["error"]["message"]


def test_viewer_files_stay_in_their_folder(client: TestClient) -> None:
    for path in (
        "/viewer/static/..%2F..%2F..%2Fpyproject.toml",
        "/viewer/static/%2e%2e%2fapp.py",
        "/viewer/vendor/..%2Fpackage.json",
    ):
        r = client.get(path)
        assert r.status_code == 404, (path, r.status_code)
