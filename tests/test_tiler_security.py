"""The tile server's limits and defences, on small synthetic outputs (no scheduler, no Ray): caps
on sizes and bands (422 naming the parameter), the job list, API keys, the Host header, XML
escaping, and a matrix of bad query values that must never give a 5xx.

The outputs are grid-aligned GeoTIFFs written here the way tilefm lays out its COGs (EPSG:3857,
origin on a tile corner, 256-px blocks, an overview per zoom level, TILEFM_* tags), registered
as succeeded jobs in a job store of their own in the machine's Redis.
"""

from __future__ import annotations

import hashlib
import io
import json
import urllib.parse
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import drop_redis_keys
from fastapi.testclient import TestClient
from PIL import Image
from rasterio.enums import Resampling
from rasterio.transform import Affine

from tilefm.api.tiler import create_app
from tilefm.grid import TMS
from tilefm.jobs.models import JobSpec, JobState
from tilefm.jobs.store import JobStore
from tilefm.settings import Settings
from tilefm.tiler.wmts import capabilities

ZOOM = 12
TILE_X, TILE_Y = 1918, 1756  # the top-left tile: 2 x 2 tiles at zoom 12, inside the sample scene
BANDS = 16
#: caps small enough to reach with these outputs: 16 bands of 256 x 256 float32 are 4 MiB
CAPS = {
    "tiler_max_bands": 4,
    "tiler_max_tilesize": 512,
    "tiler_max_preview_px": 256,
    "tiler_max_statistics_px": 256,
    "tiler_max_read_mb": 4,
}
READ_KEY, WRITE_KEY = "read-key-for-tiler-tests", "write-only-key-for-tiler-tests"
KEYS = [
    {"name": "reader", "sha256": hashlib.sha256(READ_KEY.encode()).hexdigest(), "scopes": ["jobs:read"]},
    {"name": "writer", "sha256": hashlib.sha256(WRITE_KEY.encode()).hexdigest(), "scopes": ["jobs:write"]},
]
WMTS_NS = {"w": "http://www.opengis.net/wmts/1.0", "ows": "http://www.opengis.net/ows/1.1"}


def write_output(path: Path, job_id: str, kind: str) -> None:
    """A 512 x 512 px output on the zoom-12 grid: 16 float32 bands (NaN = no data), or classes."""
    b = TMS.xy_bounds(TILE_X, TILE_Y, ZOOM)
    res = (b.right - b.left) / 256
    yy, xx = np.mgrid[0:512, 0:512].astype(np.float32) / 512
    if kind == "classes":
        data = ((xx * 3).astype(np.uint8) % 3)[None]
        dtype, nodata = "uint8", 255
        data[0, :8, :8] = 255
    else:
        data = np.stack([np.sin(xx * (i + 1)) + np.cos(yy * (i + 2)) for i in range(BANDS)]).astype(
            np.float32
        )
        data[:, :8, :8] = np.nan
        dtype, nodata = "float32", float("nan")
    profile = {
        "driver": "GTiff",
        "width": 512,
        "height": 512,
        "count": data.shape[0],
        "dtype": dtype,
        "nodata": nodata,
        "crs": "EPSG:3857",
        "transform": Affine(res, 0, b.left, 0, -res, b.top),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.update_tags(
            TILEFM_ZOOM=str(ZOOM), TILEFM_OUTPUT_KIND=kind, TILEFM_MODEL="synthetic", TILEFM_JOB=job_id
        )
        dst.build_overviews([2], Resampling.nearest)


class Deployment:
    """A job store of its own with a succeeded embedding job, a succeeded class-map job and one
    job in each unfinished or failed state; `app(**settings)` makes a tiler over it."""

    def __init__(self, root: Path, scene: Path) -> None:
        self.root = root
        self.prefix = f"tilefm-tiler-sec-{uuid.uuid4().hex[:8]}:"
        self.store = JobStore.from_url("redis://127.0.0.1:6379/0", prefix=self.prefix)
        self.scene = scene
        self.jobs: dict[str, str] = {}
        self.cogs: dict[str, Path] = {}
        for name in ("embedding", "classes"):
            job = self._claimed(name, labels={"owner": "secret-team"})
            cog = root / job.id / f"{name}.tif"
            cog.parent.mkdir()
            write_output(cog, job.id, name)
            self.store.transition(job.id, JobState.SUCCEEDED, outputs=[cog.as_uri()])
            self.jobs[name] = job.id
            self.cogs[name] = cog
        failed = self._claimed("failed")
        self.store.transition(failed.id, JobState.FAILED, error="it broke")
        self.jobs["failed"] = failed.id
        self.jobs["running"] = self._claimed("running").id
        self.jobs["queued"] = self.store.create(self._spec("queued"), body_hash=uuid.uuid4().hex)[0].id

    def _spec(self, name: str, labels: dict[str, str] | None = None) -> JobSpec:
        return JobSpec(
            scene={"s2": str(self.scene)},
            model=f"synthetic-{name}",
            output_prefix=self.root.as_uri() + "/",
            labels=labels or {"owner": "secret-team"},
        )

    def _claimed(self, name: str, labels: dict[str, str] | None = None):
        self.store.create(self._spec(name, labels), body_hash=uuid.uuid4().hex)
        return self.store.claim_next("tiler-security-test", 600)

    def settings(self, **overrides) -> Settings:
        return Settings(
            redis_prefix=self.prefix, allowed_outputs=[str(self.root)], tiler_cache_mb=0, **overrides
        )

    def app(self, viewer_dir: Path | None = None, **overrides):
        return create_app(self.settings(**overrides), store=self.store, viewer_dir=viewer_dir)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, scene_dir: Path) -> Iterator[Deployment]:
    d = Deployment(tmp_path_factory.mktemp("tiler-security"), scene_dir)
    yield d
    drop_redis_keys(d.prefix)


@pytest.fixture(scope="module")
def client(deployment: Deployment) -> Iterator[TestClient]:
    """The tiler with small caps, no keys, no public URL."""
    with TestClient(deployment.app(**CAPS)) as c:
        yield c


@pytest.fixture(scope="module")
def lenient(deployment: Deployment) -> Iterator[TestClient]:
    """`client`'s tiler, answering server errors with their 500 instead of raising them here."""
    with TestClient(deployment.app(**CAPS), raise_server_exceptions=False) as c:
        yield c


def _error(resp, status: int | None, field: str) -> dict:
    """The response is the 4xx `status` (any 4xx for None) in tilefm's format, naming `field`."""
    assert resp.status_code < 500, (resp.status_code, resp.request.url, resp.text[:300])
    if status is None:
        assert 400 <= resp.status_code < 500, (resp.status_code, resp.request.url, resp.text[:300])
    else:
        assert resp.status_code == status, (resp.status_code, resp.request.url, resp.text[:300])
    err = resp.json()["error"]
    assert err["field"] == field or (err["field"] or "").split(".")[-1] == field, (resp.request.url, err)
    return err


def _tile(deployment: Deployment, name: str, suffix: str = ".png", dz: int = 0) -> str:
    tile = f"{ZOOM + dz}/{TILE_X * 2**dz}/{TILE_Y * 2**dz}"
    return f"/v1/jobs/{deployment.jobs[name]}/tiles/WebMercatorQuad/{tile}{suffix}"


def _cog(deployment: Deployment, route: str, **params) -> tuple[str, dict]:
    return f"/cog{route}", {"url": str(deployment.cogs["embedding"]), **params}


COG_TILE = f"/tiles/WebMercatorQuad/{ZOOM}/{TILE_X}/{TILE_Y}.png"


# ------------------------------------------------------------------------------------------------
# caps: each gives a 422 naming its parameter; the largest allowed request is served
# ------------------------------------------------------------------------------------------------


def _cap_cases(d: Deployment) -> list[tuple[str, dict, str]]:
    emb = d.jobs["embedding"]
    bbox = "/bbox/-11.40,24.70,-11.30,24.80"
    return [
        (f"/v1/jobs/{emb}/statistics", {"bands": "1,1,1,1,1"}, "bands"),
        (f"/v1/jobs/{emb}/statistics", {"bands": ",".join(["1"] * 5000)}, "bands"),
        (f"/v1/jobs/{emb}/statistics", {"max_size": 257}, "max_size"),
        (f"/v1/jobs/{emb}/preview.png", {"max_size": 257}, "max_size"),
        (f"/v1/jobs/{emb}/preview.png", {"max_size": 10**12}, "max_size"),
        (_tile(d, "embedding", "@2x.npy"), {"render": "raw"}, "scale"),
        (
            _tile(d, "embedding", "@4x.png"),
            {"render": "similarity", "vector": ",".join(["1"] * BANDS)},
            "scale",
        ),
        (*_cog(d, COG_TILE, tilesize=513, bidx=1), "tilesize"),
        (*_cog(d, COG_TILE, tilesize=10**9, bidx=1), "tilesize"),
        (*_cog(d, COG_TILE, tilesize=512), "tilesize"),  # 16 bands of 512 x 512: 16 MiB, over the 4 MiB read
        (*_cog(d, COG_TILE, bidx=[1, 1, 1, 1, 1]), "bidx"),
        (*_cog(d, COG_TILE, expression="b1+b2+b3+b4+b5"), "expression"),
        (*_cog(d, COG_TILE, expression="b1;b1;b1;b1;b1"), "expression"),
        (*_cog(d, COG_TILE, bidx=1, buffer=200), "buffer"),
        (*_cog(d, COG_TILE, bidx=1, padding=200), "padding"),
        (*_cog(d, "/preview.png", bidx=1, max_size=257), "max_size"),
        (*_cog(d, "/preview.png", bidx=1, width=257, height=10), "width"),
        (*_cog(d, "/preview.png", bidx=1, height=100000), "height"),
        (*_cog(d, "/preview/257x10.png", bidx=1), "width"),
        (*_cog(d, "/preview/10x257.png", bidx=1), "height"),
        (*_cog(d, "/statistics", bidx=1, max_size=257), "max_size"),
        (*_cog(d, "/statistics", bidx=1, histogram_bins=10**9), "histogram_bins"),
        (*_cog(d, "/statistics", bidx=1, p=list(range(101))), "p"),
        (*_cog(d, f"{bbox}/257x10.png", bidx=1), "width"),
        (*_cog(d, f"{bbox}.png", bidx=1, max_size=300), "max_size"),
    ]


def test_each_cap_gives_422_naming_its_parameter(client: TestClient, deployment: Deployment) -> None:
    cases = _cap_cases(deployment)
    for path, params, field in cases:
        err = _error(client.get(path, params=params), 422, field)
        assert (
            "TILEFM_TILER_MAX" in err["message"] or "at most" in err["message"] or "over" in err["message"]
        ), err


def test_the_largest_allowed_requests_are_served(client: TestClient, deployment: Deployment) -> None:
    emb = deployment.jobs["embedding"]
    ok = [
        (f"/v1/jobs/{emb}/statistics", {"bands": "1,2,3,4", "max_size": 256}),
        (f"/v1/jobs/{emb}/statistics", {"max_size": 256}),  # all 16 bands, read 4 MiB at a time
        (f"/v1/jobs/{emb}/preview.png", {"max_size": 256}),
        (_tile(deployment, "embedding", ".npy"), {"render": "raw"}),
        (_tile(deployment, "classes", "@2x.png"), {}),
        (*_cog(deployment, COG_TILE.replace(".png", ".npy"), tilesize=512, bidx=[1, 2, 3, 4]),),
        (*_cog(deployment, COG_TILE, expression="b1+b2+b3+b4"),),
        (*_cog(deployment, "/preview.png", bidx=[1, 2, 3], max_size=256),),
        (*_cog(deployment, "/statistics", bidx=1, max_size=256, histogram_bins=1024),),
        (*_cog(deployment, "/bbox/-11.40,24.70,-11.30,24.80/256x256.png", bidx=1),),
    ]
    for path, params in ok:
        r = client.get(path, params=params)
        assert r.status_code == 200, (path, params, r.text[:300])
    stats = client.get(f"/v1/jobs/{emb}/statistics", params={"max_size": 256}).json()
    assert len(stats) == BANDS and all(s["count"] > 0 for s in stats.values())


def test_many_bands_without_a_size_get_the_largest_that_fits(deployment: Deployment) -> None:
    """1 MiB of reads: 16 bands fit at 128 px. Asked for no size, previews and statistics of all
    bands come at that size; asked for more, they are refused naming max_size."""
    emb = deployment.jobs["embedding"]
    with TestClient(deployment.app(tiler_max_read_mb=1)) as c:
        assert c.get(f"/v1/jobs/{emb}/statistics").status_code == 200
        assert c.get(f"/v1/jobs/{emb}/statistics", params={"bands": "1,2,3"}).status_code == 200
        prev = c.get(f"/v1/jobs/{emb}/preview.png", params={"render": "raw"})
        assert prev.status_code == 200
        assert max(Image.open(io.BytesIO(prev.content)).size) == 128
        _error(c.get(f"/v1/jobs/{emb}/statistics", params={"max_size": 256}), 422, "max_size")
        _error(
            c.get(f"/v1/jobs/{emb}/preview.png", params={"render": "pca", "max_size": 129}), 422, "max_size"
        )
        assert (
            c.get(f"/v1/jobs/{emb}/preview.png", params={"render": "rgb", "max_size": 256}).status_code == 200
        )


# ------------------------------------------------------------------------------------------------
# the job list
# ------------------------------------------------------------------------------------------------


def test_job_list_shows_only_finished_jobs_and_only_what_the_viewer_needs(
    client: TestClient, deployment: Deployment
) -> None:
    body = client.get("/v1/jobs").json()
    listed = {j["id"] for j in body["jobs"]}
    assert listed == {deployment.jobs["embedding"], deployment.jobs["classes"]}
    for job in body["jobs"]:
        assert set(job) == {"id", "model", "created", "finished"}, job
    assert "secret-team" not in client.get("/v1/jobs").text
    _error(client.get("/v1/jobs", params={"state": "queued"}), 422, "state")
    _error(client.get("/v1/jobs", params={"state": "failed"}), 422, "state")
    assert client.get("/v1/jobs", params={"state": "succeeded"}).status_code == 200


def test_job_list_can_be_switched_off(deployment: Deployment) -> None:
    with TestClient(deployment.app(tiler_list_jobs=False)) as c:
        assert c.get("/v1/jobs").status_code == 404
        assert c.get(f"/v1/jobs/{deployment.jobs['classes']}/info").status_code == 200


# ------------------------------------------------------------------------------------------------
# API keys
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(deployment: Deployment) -> Iterator[TestClient]:
    with TestClient(deployment.app(tiler_auth=True, api_keys=KEYS, auth_disabled=True)) as c:
        yield c


def _data_routes(d: Deployment) -> list[str]:
    cls = d.jobs["classes"]
    return [
        "/v1/jobs",
        f"/v1/jobs/{cls}/info",
        f"/v1/jobs/{cls}/tilejson.json",
        _tile(d, "classes"),
        _tile(d, "embedding", ".npy"),
        f"/v1/jobs/{cls}/WMTSCapabilities.xml",
        f"/v1/jobs/{cls}/point/-11.34,24.77",
        f"/v1/jobs/{cls}/statistics",
        f"/v1/jobs/{cls}/preview.png?max_size=64",
        f"/cog/info?url={d.cogs['classes']}",
        f"/cog{COG_TILE}?url={d.cogs['classes']}",
    ]


def test_with_auth_every_data_route_needs_a_read_key(keyed: TestClient, deployment: Deployment) -> None:
    for path in _data_routes(deployment):
        assert keyed.get(path).status_code == 401, path
        assert keyed.get(path, headers={"X-API-Key": "wrong"}).status_code == 401, path
        assert keyed.get(path, headers={"X-API-Key": WRITE_KEY}).status_code == 403, path
        ok = keyed.get(path, headers={"X-API-Key": READ_KEY})
        assert ok.status_code == 200, (path, ok.text[:200])
        assert keyed.get(path, headers={"Authorization": f"Bearer {READ_KEY}"}).status_code == 200, path
        sep = "&" if "?" in path else "?"
        assert keyed.get(f"{path}{sep}api_key={READ_KEY}").status_code == 200, path
        if "cache-control" in ok.headers:
            assert ok.headers["cache-control"].startswith("private"), (path, ok.headers["cache-control"])


def test_with_auth_bad_parameters_are_not_judged_before_the_key(
    keyed: TestClient, deployment: Deployment
) -> None:
    r = keyed.get(f"/v1/jobs/{deployment.jobs['classes']}/point/nan,nan")
    assert r.status_code == 401


def test_with_auth_the_key_never_goes_into_tile_urls(keyed: TestClient, deployment: Deployment) -> None:
    cls = deployment.jobs["classes"]
    tj = keyed.get(f"/v1/jobs/{cls}/tilejson.json?api_key={READ_KEY}").json()
    assert READ_KEY not in json.dumps(tj) and "api_key" not in tj["tiles"][0]
    xml = keyed.get(f"/v1/jobs/{cls}/WMTSCapabilities.xml?api_key={READ_KEY}").text
    assert READ_KEY not in xml


def test_with_auth_the_viewer_page_and_health_stay_open(keyed: TestClient) -> None:
    assert keyed.get("/healthz").status_code == 200
    assert keyed.get("/metrics").status_code == 200


def test_without_auth_no_key_is_needed(client: TestClient, deployment: Deployment) -> None:
    for path in _data_routes(deployment):
        r = client.get(path)
        assert r.status_code == 200, (path, r.text[:200])


# ------------------------------------------------------------------------------------------------
# the Host header
# ------------------------------------------------------------------------------------------------


def _tile_urls(c: TestClient, d: Deployment, host: str) -> list[str]:
    cls = d.jobs["classes"]
    headers = {"Host": host}
    tj = c.get(f"/v1/jobs/{cls}/tilejson.json", headers=headers)
    wmts = c.get(f"/v1/jobs/{cls}/WMTSCapabilities.xml", headers=headers)
    cog = c.get(f"/cog/WebMercatorQuad/tilejson.json?url={d.cogs['classes']}", headers=headers)
    assert tj.status_code == wmts.status_code == cog.status_code == 200, (tj.text, wmts.text, cog.text)
    template = ET.fromstring(wmts.content).find(".//w:ResourceURL", WMTS_NS).get("template")
    return [tj.json()["tiles"][0], template, cog.json()["tiles"][0]]


def test_a_public_url_replaces_the_host_header(deployment: Deployment) -> None:
    with TestClient(deployment.app(tiler_public_url="https://tiles.example.org/maps/")) as c:
        for url in _tile_urls(c, deployment, "evil.example"):
            assert url.startswith("https://tiles.example.org/maps/"), url
            assert "evil" not in url
        tj = c.get(f"/v1/jobs/{deployment.jobs['classes']}/tilejson.json", headers={"Host": "evil.example"})
        assert tj.headers["cache-control"].startswith("public")


def test_without_a_public_url_a_foreign_host_is_never_reflected(
    client: TestClient, deployment: Deployment
) -> None:
    for url in _tile_urls(client, deployment, "evil.example"):
        assert url.startswith("/v1/jobs/") or url.startswith("/cog/"), url
    for host in ("evil.example:8081", "127.0.0.1.evil.example", 'localhost"><x', "localhost@evil.example"):
        for url in _tile_urls(client, deployment, host):
            assert "evil" not in url and "<" not in url and url.startswith("/"), (host, url)
    tj = client.get(f"/v1/jobs/{deployment.jobs['classes']}/tilejson.json", headers={"Host": "evil.example"})
    assert tj.headers["cache-control"].startswith("private") and tj.headers["vary"] == "Host"


def test_without_a_public_url_a_loopback_host_gets_absolute_urls(
    client: TestClient, deployment: Deployment
) -> None:
    for host in ("127.0.0.1:8081", "localhost:8081", "[::1]:8081"):
        for url in _tile_urls(client, deployment, host):
            assert url.startswith(f"http://{host}/"), (host, url)


def test_a_bad_public_url_stops_the_tiler_at_start(deployment: Deployment) -> None:
    for url in ("tiles.example.org", "javascript:alert(1)", "https://tiles.example.org/?a=1", "https://a@b/"):
        with pytest.raises(ValueError, match="TILEFM_TILER_PUBLIC_URL"):
            deployment.app(tiler_public_url=url)


# ------------------------------------------------------------------------------------------------
# WMTS: nothing interpolated can add XML
# ------------------------------------------------------------------------------------------------


INJECTIONS = [
    '"/><Layer><ows:Identifier>evil</ows:Identifier></Layer><x a="',
    "' onload='x",
    "</Contents>",
    "&amp;<>\"'",
    'a" evil="1',
    "]]><!--",
]


@pytest.mark.parametrize("value", INJECTIONS)
def test_wmts_query_values_cannot_inject(client: TestClient, deployment: Deployment, value: str) -> None:
    r = client.get(
        f"/v1/jobs/{deployment.jobs['classes']}/WMTSCapabilities.xml",
        params={"render": "classes", "x": value},
    )
    assert r.status_code == 200, r.text
    root = ET.fromstring(r.content)  # well-formed
    layers = root.findall(".//w:Layer", WMTS_NS)
    assert len(layers) == 1
    resource = layers[0].find("w:ResourceURL", WMTS_NS)
    assert set(resource.attrib) == {"format", "resourceType", "template"}
    template = resource.get("template")
    assert not any(ch in template for ch in "\"'<> ") and "evil" not in [e.tag for e in root.iter()]
    assert template.endswith("?render=classes&x=" + urllib.parse.quote_plus(value, safe=","))


def test_wmts_document_escapes_every_value() -> None:
    xml = capabilities(
        title='t"<b>&',
        layer="l'<x/>",
        bounds=(1, 2, 3, 4),
        minzoom=1,
        maxzoom=2,
        tile_url='https://h/{TileMatrix}/{TileCol}/{TileRow}.png?a="b"&c=<d>',
        fmt='image/png" evil="1',
    )
    root = ET.fromstring(xml)
    assert root.find(".//ows:Title", WMTS_NS).text == 't"<b>&'
    assert root.find(".//w:Layer/ows:Identifier", WMTS_NS).text == "l'<x/>"
    res = root.find(".//w:ResourceURL", WMTS_NS)
    assert set(res.attrib) == {"format", "resourceType", "template"}
    assert res.get("template").endswith('?a="b"&c=<d>') and res.get("format") == 'image/png" evil="1'


# ------------------------------------------------------------------------------------------------
# positions: NaN and out-of-range numbers are 4xx naming the parameter
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lon,lat,field",
    [
        ("nan", "nan", "lon"),
        ("0", "nan", "lat"),
        ("inf", "0", "lon"),
        ("0", "-inf", "lat"),
        ("1e999", "0", "lon"),
        ("200", "10", "lon"),
        ("10", "95", "lat"),
        ("-180.5", "0", "lon"),
    ],
)
def test_point_positions_are_checked(
    client: TestClient, deployment: Deployment, lon: str, lat: str, field: str
) -> None:
    _error(client.get(f"/cog/point/{lon},{lat}", params={"url": str(deployment.cogs["classes"])}), 422, field)
    _error(client.get(f"/v1/jobs/{deployment.jobs['classes']}/point/{lon},{lat}"), 422, field)


def test_a_point_outside_the_output_is_404(client: TestClient, deployment: Deployment) -> None:
    _error(client.get("/cog/point/10,10", params={"url": str(deployment.cogs["classes"])}), 404, "lon")
    _error(client.get(f"/v1/jobs/{deployment.jobs['classes']}/point/10,10"), 404, "lon")
    assert client.get(f"/v1/jobs/{deployment.jobs['classes']}/point/-11.34,24.77").status_code == 200


# ------------------------------------------------------------------------------------------------
# the bad-input matrix: every query parameter of the tiler with values it must refuse
# ------------------------------------------------------------------------------------------------

NON_FINITE = ["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-1e999"]
NOT_NUMBERS = ["abc", "", "1;2", "0x10", "[1]", "1,,2", "\u0661", "%00", "1 2"]


def _matrix(d: Deployment) -> list[tuple[str, str, dict, str]]:
    """(case id, path, params, the field the error must name)."""
    emb, cls = d.jobs["embedding"], d.jobs["classes"]
    tile_emb, tile_cls = _tile(d, "embedding"), _tile(d, "classes")
    tj = f"/v1/jobs/{emb}/tilejson.json"
    url = str(d.cogs["embedding"])
    cog_tile, cog_prev, cog_stats = f"/cog{COG_TILE}", "/cog/preview.png", "/cog/statistics"
    cases: list[tuple[str, str, dict, str]] = []

    def add(path: str, params: dict, field: str, tag: str = "") -> None:
        cases.append((f"{path.split('/')[-1][:24]}-{field}-{tag or len(cases)}", path, params, field))

    # job routes: rendering parameters
    for path in (tile_emb, tj, f"/v1/jobs/{emb}/preview.png", f"/v1/jobs/{emb}/WMTSCapabilities.xml"):
        for v in [
            "17",
            "1,2",
            "0,1,2",
            "1,2,17",
            "-1,2,3",
            "a,b,c",
            "1.5,2,3",
            ",".join(["1"] * 50),
            *NON_FINITE,
        ]:
            add(path, {"render": "rgb", "bands": v}, "bands")
        for v in ["1", "5,1", "1,1", "1,2,3", "a,b", *[f"0,{x}" for x in NON_FINITE]]:
            add(path, {"render": "rgb", "rescale": v}, "rescale")
        for v in ["nope", "RGB", "pca;", "<x>"]:
            add(path, {"render": v}, "render")
        for v in ["nope", "viridis'", "../x"]:
            add(
                path,
                {"render": "similarity", "vector": ",".join(["1"] * BANDS), "colormap_name": v},
                "colormap_name",
            )
        for v in ["1,2", ",".join(["0"] * BANDS), "a" * 10, *[",".join([x] * BANDS) for x in NON_FINITE[:3]]]:
            add(path, {"render": "similarity", "vector": v}, "vector")
        for lon, lat, field in [
            ("nan", "1", "lon"),
            ("1", "nan", "lat"),
            ("181", "1", "lon"),
            ("1", "86", "lat"),
            ("x", "1", "lon"),
        ]:
            add(path, {"render": "similarity", "lon": lon, "lat": lat}, field)
    add(f"/v1/jobs/{cls}/tilejson.json", {"render": "pca"}, "render")
    for v in ["0", "5", "-1", "x", "nan", "1e999"]:
        add(tj, {"tile_scale": v}, "tile_scale")
    for v in ["gif", "PNG", "", "png;"]:
        add(tj, {"tile_format": v}, "tile_format")
    # job routes: sizes and tile positions
    for v in ["0", "63", "-5", "x", "nan", "inf", "257", "99999999999999999999"]:
        add(f"/v1/jobs/{emb}/preview.png", {"max_size": v}, "max_size")
        add(f"/v1/jobs/{emb}/statistics", {"max_size": v}, "max_size")
    for v in ["0", "17", "-1", "1,x", "1.5", "nan", ",".join(["2"] * 6)]:
        add(f"/v1/jobs/{emb}/statistics", {"bands": v}, "bands")
    base = f"/v1/jobs/{cls}/tiles/WebMercatorQuad"
    for z, x, y, field in [
        (ZOOM + 9, TILE_X, TILE_Y, "z"),
        (ZOOM, 2**ZOOM, 0, "x"),
        (ZOOM, 0, 2**ZOOM, "x"),
        (ZOOM, 0, 0, "z"),
        (99999999999999999999, 0, 0, "z"),
        (0, 0, 0, "z"),
    ]:
        add(f"{base}/{z}/{x}/{y}.png", {}, field)
    for fmt in ("gif", "PNG", "png5", "tiff"):
        add(f"{base}/{ZOOM}/{TILE_X}/{TILE_Y}.{fmt}", {}, "fmt")
    for scale in ("0", "5", "99"):
        add(f"{base}/{ZOOM}/{TILE_X}/{TILE_Y}@{scale}x.png", {}, "scale")
    add(f"/v1/jobs/{cls}/tiles/WorldCRS84Quad/{ZOOM}/{TILE_X}/{TILE_Y}.png", {}, "tms")
    add(tile_cls, {"render": "raw", "x": "nan"}, "x")
    add(tile_cls, {"anything": "inf"}, "anything")
    for lon, lat, field in [
        ("nan", "0", "lon"),
        ("0", "inf", "lat"),
        ("181", "0", "lon"),
        ("0", "-86", "lat"),
        ("a", "0", "lon"),
    ]:
        add(f"/v1/jobs/{cls}/point/{lon},{lat}", {}, field)
    for v in ["0", "101", "x", "-1"]:
        add("/v1/jobs", {"limit": v}, "limit")
    add("/v1/jobs", {"cursor": "x" * 300}, "cursor")
    add("/v1/jobs", {"cursor": "not-a-cursor"}, "cursor")
    # /cog: the same kinds of values through TiTiler's parameters
    for path in (cog_tile, cog_prev, cog_stats, "/cog/point/-11.34,24.77"):
        for v in ["0", "17", "-1", "x", "nan", "1.5"]:
            add(path, {"url": url, "bidx": v}, "bidx")
        for v in [
            "b0",
            "b17",
            "b1+",
            "import os",
            "b1/;",
            "x" * 2000,
            "b1+nan",
            "b1*inf",
            "__import__('os')",
            "b1;" * 5,
        ]:
            add(path, {"url": url, "expression": v}, "expression")
        for v in [*NON_FINITE[:4]]:
            add(path, {"url": url, "bidx": 1, "nodata": "x" + v}, "nodata")
    for path in (cog_tile, cog_prev, "/cog/bbox/-11.40,24.70,-11.30,24.80.png"):
        for v in ["1", "1,2,3", "a,b", *[f"0,{x}" for x in NON_FINITE[:4]]]:
            add(path, {"url": url, "bidx": 1, "rescale": v}, "rescale")
        for v in ["nope", "VIRIDIS ", "<x>"]:
            add(path, {"url": url, "bidx": 1, "colormap_name": v}, "colormap_name")
        for v in [
            "{",
            "[1,2]",
            '{"a": "red"}',
            '{"1": "notacolor"}',
            "3",
            "[[[1,2],[1,2,3,4]],[[0]]]",
            '{"99999999": "red"}',
        ]:
            add(path, {"url": url, "bidx": 1, "colormap": v}, "colormap")
        for v in ["gamma", "sigmoidal rgb x", "saturation nan", "gamma r inf"]:
            add(path, {"url": url, "bidx": 1, "color_formula": v}, "color_formula")
        for v in ["x", "bilinearx", "nan"]:
            add(path, {"url": url, "bidx": 1, "resampling": v}, "resampling")
        for v in ["epsg:0", "nope", "EPSG:99999"]:
            if path != cog_tile:  # tiles are always in their tile matrix set's CRS
                add(path, {"url": url, "bidx": 1, "dst_crs": v}, "dst_crs")
        for v in ["x", "2"]:
            add(path, {"url": url, "bidx": 1, "return_mask": v}, "return_mask")
    for v in ["0", "-1", "x", "nan", "inf", "513", "1e9"]:
        add(cog_tile, {"url": url, "bidx": 1, "tilesize": v}, "tilesize")
    for v in ["0.3", "-1", "x", "nan", "300"]:
        add(cog_tile, {"url": url, "bidx": 1, "buffer": v}, "buffer")
    for v in ["-1", "x", "nan", "300"]:
        add(cog_tile, {"url": url, "bidx": 1, "padding": v}, "padding")
    for z, x, y, field in [
        (31, 0, 0, "z"),
        (99999999999999999999, 0, 0, "z"),
        (ZOOM, 2**ZOOM, 0, "x"),
        (ZOOM, 0, 2**ZOOM, "y"),
        (-1, 0, 0, "z"),
        (ZOOM, -1, 0, "x"),
        (ZOOM, 0, 0, "z"),
        ("nan", 0, 0, "z"),
        (ZOOM, "x", 0, "x"),
    ]:
        add(f"/cog/tiles/WebMercatorQuad/{z}/{x}/{y}.png", {"url": url, "bidx": 1}, field)
    for fmt in ("gif", "PNG", "exe"):
        add(f"/cog/tiles/WebMercatorQuad/{ZOOM}/{TILE_X}/{TILE_Y}.{fmt}", {"url": url, "bidx": 1}, "format")
    add(f"/cog/tiles/Nope/{ZOOM}/{TILE_X}/{TILE_Y}.png", {"url": url, "bidx": 1}, "tileMatrixSetId")
    for name in ("max_size", "width", "height"):
        for v in ["0", "-1", "x", "nan", "inf", "257", "99999999999999999999"]:
            add(cog_prev, {"url": url, "bidx": 1, name: v}, name)
            add(cog_stats, {"url": url, "bidx": 1, name: v}, name)
    for w, h, field in [
        ("0", "10", "width"),
        ("10", "0", "height"),
        ("257", "10", "width"),
        ("x", "10", "width"),
        ("10", "99999999999", "height"),
    ]:
        add(f"/cog/preview/{w}x{h}.png", {"url": url, "bidx": 1}, field)
        add(f"/cog/bbox/-11.40,24.70,-11.30,24.80/{w}x{h}.png", {"url": url, "bidx": 1}, field)
    for v in ["0", "-5", "x", "nan", "100000", ",".join(map(str, range(2000)))]:
        add(cog_stats, {"url": url, "bidx": 1, "histogram_bins": v}, "histogram_bins")
    for v in ["-1", "101", "x", "nan", "1e999"]:
        add(cog_stats, {"url": url, "bidx": 1, "p": v}, "p")
    for v in ["x", "nan", "inf"]:
        add(cog_stats, {"url": url, "bidx": 1, "c": v}, "c")
    for v in ["x", "2"]:
        add(cog_stats, {"url": url, "bidx": 1, "categorical": v}, "categorical")
    for box, field in [
        ("nan,0,1,1", "minx"),
        ("0,0,-1,1", "minx"),
        ("0,1,1,0", "miny"),
        ("0,0,0,1", "minx"),
        ("-200,0,1,1", "minx"),
        ("0,0,1,inf", "maxy"),
        ("a,0,1,1", "minx"),
    ]:
        add(f"/cog/bbox/{box}.png", {"url": url, "bidx": 1}, field)
    for lon, lat, field in [
        ("nan", "0", "lon"),
        ("0", "nan", "lat"),
        ("181", "0", "lon"),
        ("0", "91", "lat"),
        ("1e999", "0", "lon"),
        ("x", "0", "lon"),
    ]:
        add(f"/cog/point/{lon},{lat}", {"url": url}, field)
    for v in ["epsg:0", "nope"]:
        add("/cog/point/-11.34,24.77", {"url": url, "coord_crs": v}, "coord_crs")
    for v in ["-1", "x", "nan"]:
        add("/cog/WebMercatorQuad/tilejson.json", {"url": url, "minzoom": v}, "minzoom")
        add("/cog/WebMercatorQuad/tilejson.json", {"url": url, "maxzoom": v}, "maxzoom")
    for v in ["0", "-1", "x", "5000"]:
        add("/cog/WebMercatorQuad/tilejson.json", {"url": url, "tilesize": v}, "tilesize")
    for v in ["/etc/passwd", "http://169.254.169.254/x.tif", "", "x" * 5000, "nan"]:
        add("/cog/info", {"url": v}, "url")
    add("/cog/info", {}, "url")
    return cases


def _matrix_ids() -> list[tuple[str, int]]:
    """Case ids without a deployment (parametrize runs before fixtures): built from a stand-in."""
    stub = Deployment.__new__(Deployment)
    stub.jobs = {k: "0" * 32 for k in ("embedding", "classes", "failed", "running", "queued")}
    stub.cogs = {"embedding": Path("/x.tif"), "classes": Path("/y.tif")}
    return [(case[0], i) for i, case in enumerate(_matrix(stub))]


MATRIX = _matrix_ids()


@pytest.mark.parametrize("index", [i for _, i in MATRIX], ids=[c for c, _ in MATRIX])
def test_bad_input_matrix(lenient: TestClient, deployment: Deployment, index: int) -> None:
    _, path, params, field = _matrix(deployment)[index]
    r = lenient.get(path, params=params)
    assert r.status_code < 500, (path, params, r.status_code, r.text[:300])
    assert 400 <= r.status_code < 500, (path, params, r.status_code, r.text[:300])
    err = r.json()["error"]
    named = [err.get("field") or ""] + [d.get("field") or "" for d in err.get("details") or []]
    assert any(field in n.split(".") for n in named), (path, params, err)


def test_the_matrix_is_a_few_hundred_cases() -> None:
    assert len(MATRIX) >= 300, len(MATRIX)
