"""The web viewer (services/tiler/viewer) in a real headless Chromium against the tile server.

For a finished class-map job and a finished embedding job: the page loads, every tile it asks for
is served (200), MapLibre reports no tile error, the map is not blank, a click shows the pixel's
values, and for embeddings a similarity layer is added and its tiles are served. Screenshots go to
test-output/viewer/.

Tile statuses: MapLibre asks only for tiles that intersect the TileJSON `bounds` (within its
minzoom..maxzoom), and the tiler rounds an output's bounds inwards (a grid-aligned output's bounds
rounded outwards would overshoot a tile edge by ~1e-7 degrees and make MapLibre ask for a row of
tiles past the edge). So every tile the viewer asks for is one the server has data for: the test
accepts 200 only (204 and 404 fail). A failure says, for each bad tile, whether it only touches
the bounds (a sliver under 1/1000 of a tile: a rounding problem) or lies inside them.

`tiler_server` (tests/conftest.py) is the real app (`tilefm.api.tiler.create_app`) over HTTP with
two jobs run by the real scheduler: (base_url, {"clouds": job_id, "presto": job_id}).

With API keys required (`keyed_server`, synthetic outputs, reached on a host name that is not a
loopback one): the viewer opened with `?api_key=` sends the key on every request of its own and
of MapLibre's, and resolves the tiler's root-relative tile URLs; without a key it asks for one.

Needs the Python package `playwright` and Debian's Chromium (/usr/bin/chromium, or set
TILEFM_CHROMIUM); no `playwright install`. WebGL comes from SwiftShader (CPU), see CHROMIUM_ARGS.
Either missing fails the test (never a skip).
"""

from __future__ import annotations

import io
import math
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

#: headless Chromium against the tile server over HTTP, which serves two jobs of the scheduler
pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("TILEFM_CHROMIUM", "/usr/bin/chromium")
#: software WebGL for MapLibre in headless Chromium on machines without a GPU; `tiles.test`, a
#: host name that is not a loopback one, for the tiler on 127.0.0.1
CHROMIUM_ARGS = [
    "--use-gl=angle",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--host-resolver-rules=MAP tiles.test 127.0.0.1",
]
VIEWPORT = {"width": 1280, "height": 800}
#: the viewer's map background (viewer.js BACKGROUND): a blank map is all this colour
BACKGROUND = (0x1D, 0x21, 0x26)
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "the Python package playwright is missing: pip install 'playwright==1.65.2' "
            "(the browser is Debian's chromium, no `playwright install` needed)"
        )
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).is_file()):
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install chromium (or set TILEFM_CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """A fresh page that records tile responses, failed requests and page errors."""

    def __init__(self, browser, base_url: str):
        self.base_url = base_url
        self.context = browser.new_context(viewport=VIEWPORT)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.tiles: list[tuple[int, str]] = []
        self.failed: list[tuple[str, str]] = []
        self.page_errors: list[str] = []
        self.in_flight: dict[object, str] = {}
        self.page.on("request", lambda r: self.in_flight.__setitem__(r, r.url))
        self.page.on("requestfinished", lambda r: self.in_flight.pop(r, None))
        self.page.on(
            "response", lambda r: self.tiles.append((r.status, r.url)) if "/tiles/" in r.url else None
        )
        self.page.on(
            "requestfailed",
            lambda r: (self.in_flight.pop(r, None), self.failed.append((r.failure or "", r.url))),
        )
        self.page.on("pageerror", lambda e: self.page_errors.append(str(e)))

    def open(self, path: str) -> str:
        """Loads a viewer page and waits until it is ready (or failed); returns the state."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        self.page.goto(self.base_url + path)
        try:
            self.page.wait_for_function("window.tilefmViewer && window.tilefmViewer.state !== 'loading'")
        except PlaywrightTimeout:
            pytest.fail(
                f"{path} did not load in {TIMEOUT_MS} ms; requests in flight: "
                f"{list(self.in_flight.values())[:10]}"
            )
        return self.hook("state")

    def settle(self, what: str = "whenIdle()") -> None:
        """Awaits the hook's promise `what` (the map's next idle, or the last click), at most
        TIMEOUT_MS; on a timeout, fails with the requests still in flight."""
        done = self.page.evaluate(
            f"""() => Promise.race([window.tilefmViewer.{what}.then(() => true),
                                   new Promise(r => setTimeout(() => r(false), {TIMEOUT_MS}))])"""
        )
        if not done:
            state = self.page.evaluate("""() => new Promise(res => { const m = window.tilefmViewer.map;
                const s = {loaded: m.loaded(), tiles: m.areTilesLoaded(), moving: m.isMoving(),
                           frame: !!m._frameRequest, hidden: document.hidden,
                           ctxLost: m.painter && m.painter.context.gl.isContextLost()};
                let done = false;
                requestAnimationFrame(() => { if (!done) { done = true; res({...s, raf: true}); } });
                setTimeout(() => { if (!done) { done = true; res({...s, raf: false}); } }, 3000); })""")
            pytest.fail(
                f"the map did not settle ({what}) in {TIMEOUT_MS} ms: {state}; "
                f"requests in flight: {list(self.in_flight.values())[:10]}"
            )

    def hook(self, expr: str):
        return self.page.evaluate(f"() => window.tilefmViewer.{expr}")

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))

    def map_pixels(self) -> np.ndarray:
        """The map area as an (H, W, 3) uint8 array, from a PNG screenshot of #map."""
        import rasterio
        from rasterio.io import MemoryFile

        png = self.page.locator("#map").screenshot()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with MemoryFile(io.BytesIO(png)) as mem, mem.open() as ds:
                return np.moveaxis(ds.read()[:3], 0, -1)

    def click_map_centre(self) -> None:
        box = self.page.locator("#map").bounding_box()
        self.page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)

    def assert_tiles_ok(self, match: str, bounds: list[float], since: int = 0) -> list[str]:
        """Every tile whose URL contains `match` was 200 (`bounds`: the layer's, for the message)."""
        got = [(s, u) for s, u in self.tiles[since:] if match in u]
        assert got, f"no tile requests matching {match!r}"
        bad = [
            (s, u, "touches the bounds only" if touches_only(u, bounds) else "inside the bounds")
            for s, u in got
            if s != 200
        ]
        assert not bad, f"{len(bad)} of {len(got)} tiles were not 200: {bad[:5]}"
        assert any(s == 200 for s, _ in got), f"no tile matching {match!r} was served: {got[:5]}"
        failed = [(f, u) for f, u in self.failed if "/tiles/" in u and match in u and "ERR_ABORTED" not in f]
        assert not failed, f"tile requests failed in the network: {failed[:5]}"
        return [u for _, u in got]

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def viewer(browser, tiler_server) -> Iterator[Page]:
    page = Page(browser, tiler_server[0])
    yield page
    page.close()


TILE = re.compile(r"/tiles/(?:WebMercatorQuad/)?(\d+)/(\d+)/(\d+)[.@]")


def _merc(lon: float, lat: float) -> tuple[float, float]:
    """Web Mercator x, y in 0..1 (y down), as MapLibre computes them."""
    y = (180 - math.degrees(math.log(math.tan(math.pi / 4 + math.radians(lat) / 2)))) / 360
    return (180 + lon) / 360, y


def touches_only(url: str, bounds: list[float], tolerance: float = 1e-3) -> bool:
    """Whether tile z/x/y of the URL overlaps `bounds` (lon/lat) by less than `tolerance` of a
    tile in x or y: a tile MapLibre asks for only because the bounds overshoot a tile edge."""
    m = TILE.search(url)
    assert m, f"not a tile URL: {url}"
    z, x, y = (int(g) for g in m.groups())
    w, s, e, n = bounds
    (x0, y0), (x1, y1) = (_merc(w, n), _merc(e, s))
    size = 2**z
    over_x = min(x + 1, x1 * size) - max(x, x0 * size)
    over_y = min(y + 1, y1 * size) - max(y, y0 * size)
    return min(over_x, over_y) < tolerance


def assert_not_blank(pixels: np.ndarray, name: str) -> None:
    """More than a quarter of the map differs from the background, in many colours."""
    h, w, _ = pixels.shape
    differs = (np.abs(pixels.astype(int) - np.array(BACKGROUND)).max(axis=-1) > 12).mean()
    rgb = pixels.astype(np.int32)
    colours = len(np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]))
    std = pixels.reshape(-1, 3).std(axis=0).max()
    assert differs > 0.25, f"{name}: only {differs:.1%} of the {w}x{h} map differs from the background"
    assert colours > 100, f"{name}: the map has only {colours} distinct colours"
    assert std > 8, f"{name}: the map is nearly uniform (std {std:.1f})"


@pytest.mark.parametrize("name", ["clouds", "presto"])
def test_job_view(viewer: Page, tiler_server, output_dir: Path, name: str) -> None:
    _, jobs = tiler_server
    job_id = jobs[name]
    shots = output_dir / "viewer"

    state = viewer.open(f"/viewer/jobs/{job_id}")
    assert state == "ready", f"the viewer failed: {viewer.hook('errors')}"
    info = viewer.hook("info")
    assert info["id"] == job_id
    bounds = info["bounds"]
    scene_bounds = viewer.page.request.get(f"{viewer.base_url}/v1/jobs/{job_id}/scene/tilejson.json").json()[
        "bounds"
    ]
    scene = viewer.assert_tiles_ok(f"/{job_id}/scene/tiles/", scene_bounds)
    output = viewer.assert_tiles_ok(f"/{job_id}/tiles/", bounds)
    assert all(f"render={info['default_render']}" in u for u in output), output[:3]
    assert viewer.hook("tileErrors") == []
    assert viewer.hook("errors") == [], "the error banner was shown"
    assert viewer.page.locator("#banner").is_hidden()
    assert viewer.page_errors == []
    viewer.screenshot(shots / f"{name}.png")
    assert_not_blank(viewer.map_pixels(), name)
    print(f"{name}: {len(scene)} scene tiles, {len(output)} output tiles")

    # the panel: one layer row per layer, the legend for class maps
    assert viewer.page.locator("#layers li").count() == 2
    if info["kind"] == "classes":
        legend = viewer.page.locator("#legend li")
        assert legend.count() == len(info["classes"]) > 0
        assert legend.first.inner_text().startswith(info["classes"][0]["name"])

    # a click at the centre reads the pixel
    viewer.click_map_centre()
    viewer.page.wait_for_function("window.tilefmViewer.lastPoint !== null")
    viewer.settle("pending")
    point = viewer.hook("lastPoint")
    assert len(point["values"]) == info["count"]
    lon, lat = point["coordinates"]
    w, s, e, n = bounds
    assert w <= lon <= e and s <= lat <= n
    panel = viewer.page.locator("#point").inner_text()
    assert f"{lon:.5f}, {lat:.5f}" in panel
    if info["kind"] == "classes":
        assert point["class"]["name"] in panel
    else:
        assert any(v is not None for v in point["values"]), "no value at the centre of the job"
        assert viewer.page.locator("#point svg.spark").count() == 1
        # the similarity layer on top, served
        assert viewer.page.evaluate("() => !!window.tilefmViewer.map.getLayer('similarity')")
        similarity = viewer.assert_tiles_ok("render=similarity", bounds)
        assert all(f"/{job_id}/tiles/" in u for u in similarity)
        assert viewer.page.locator("#layers li").count() == 3
        # its opacity slider drives the layer
        slider = viewer.page.locator("#layers li[data-layer=similarity] input[type=range]")
        slider.fill("40")
        assert (
            viewer.page.evaluate(
                "() => window.tilefmViewer.map.getPaintProperty('similarity', 'raster-opacity')"
            )
            == 0.4
        )
    assert viewer.hook("tileErrors") == []
    assert viewer.hook("errors") == []
    viewer.screenshot(shots / f"{name}-point.png")
    assert_not_blank(viewer.map_pixels(), f"{name} after the click")

    if info["kind"] == "embedding" and "rgb" in info["renders"]:
        # RGB of three chosen bands replaces the PCA layer
        since = len(viewer.tiles)
        viewer.page.select_option("#render", "rgb")
        viewer.page.select_option("#band-g", "5")
        viewer.page.wait_for_function(
            "() => { const s = window.tilefmViewer.map.getSource('output'); return s && "
            "s.url.includes('bands=1,5,3'); }"
        )
        viewer.settle()
        rgb = viewer.assert_tiles_ok("bands=1,5,3", bounds, since)
        assert all("render=rgb" in u for u in rgb)
        assert viewer.hook("tileErrors") == []
        viewer.screenshot(shots / f"{name}-rgb.png")
        assert_not_blank(viewer.map_pixels(), f"{name} rgb")
    assert viewer.page_errors == []


def test_job_list(viewer: Page, tiler_server, output_dir: Path) -> None:
    _, jobs = tiler_server
    assert viewer.open("/viewer") == "ready", viewer.hook("errors")
    for job_id in jobs.values():
        assert viewer.page.locator(f"#jobs a[data-job='{job_id}']").count() == 1
    # no job named: the viewer opens the job that finished last, on its data (not an empty map)
    listed = viewer.page.request.get(f"{viewer.base_url}/v1/jobs?state=succeeded").json()["jobs"]
    newest = max(listed, key=lambda j: j["finished"] or "")["id"]
    assert viewer.hook("info")["id"] == newest
    assert viewer.page.locator(f"#jobs a[data-job='{newest}']").get_attribute("class") == "current"
    assert viewer.page.locator("#layers li").count() == 2
    assert viewer.hook("tileErrors") == [] and viewer.hook("errors") == []
    viewer.screenshot(output_dir / "viewer" / "jobs.png")
    assert_not_blank(viewer.map_pixels(), "the newest job")
    viewer.page.click(f"#jobs a[data-job='{jobs['clouds']}']")
    viewer.page.wait_for_url(re.compile(rf"/viewer/jobs/{jobs['clouds']}$"))
    viewer.page.wait_for_function("window.tilefmViewer && window.tilefmViewer.state !== 'loading'")
    assert viewer.hook("state") == "ready", viewer.hook("errors")
    assert viewer.hook("info")["id"] == jobs["clouds"]
    assert viewer.page_errors == []


def test_api_error_shown(viewer: Page, output_dir: Path) -> None:
    """An unknown job: the API's JSON error reaches the user in the banner."""
    assert viewer.open("/viewer/jobs/" + "0" * 32) == "failed"
    banner = viewer.page.locator("#banner")
    assert banner.is_visible()
    assert "404" in banner.inner_text()
    viewer.screenshot(output_dir / "viewer" / "error.png")
    assert viewer.page_errors == []


# ------------------------------------------------------------------------------------------------
# API keys: the viewer over a tiler that asks for them
# ------------------------------------------------------------------------------------------------


def _serve(app) -> tuple[object, int]:
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the tile server did not start"
    return server, port


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, scene_dir: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A tiler with keys required (TILEFM_TILER_AUTH) over the synthetic outputs of
    test_tiler_security (in the sample scene; no scheduler), reached as http://tiles.test:PORT:
    not a loopback host, so its TileJSON URLs are root-relative."""
    from conftest import REPO, drop_redis_keys
    from test_tiler_security import KEYS, Deployment

    d = Deployment(tmp_path_factory.mktemp("viewer-keys"), scene_dir)
    server, port = _serve(
        d.app(viewer_dir=REPO / "services" / "tiler" / "viewer", tiler_auth=True, api_keys=KEYS)
    )
    yield f"http://tiles.test:{port}", d.jobs
    server.should_exit = True
    drop_redis_keys(d.prefix)


@pytest.mark.parametrize("name", ["classes", "embedding"])
def test_job_view_with_a_key(browser, keyed_server, name: str) -> None:
    """Opened with ?api_key=, the viewer keeps the key, takes it out of the address, and sends
    it on every request to its origin (TileJSON and tiles through MapLibre included): no 401,
    every tile served."""
    from test_tiler_security import READ_KEY

    base, jobs = keyed_server
    page = Page(browser, base)
    statuses: list[tuple[int, str]] = []
    page.page.on("response", lambda r: statuses.append((r.status, r.url)))
    try:
        assert page.open(f"/viewer/jobs/{jobs[name]}?api_key={READ_KEY}") == "ready", page.hook("errors")
        assert "api_key" not in page.page.url
        assert page.page.evaluate("() => localStorage.getItem('tilefm.apiKey')") == READ_KEY
        assert not [u for s, u in statuses if s == 401], statuses
        info = page.hook("info")
        tj = page.page.evaluate(f"""() => fetch('/v1/jobs/{jobs[name]}/tilejson.json',
                                  {{headers: {{'X-API-Key': '{READ_KEY}'}}}}).then(r => r.json())""")
        assert tj["tiles"][0].startswith("/v1/jobs/"), tj["tiles"]  # root-relative: the browser resolves it
        page.assert_tiles_ok(f"/{jobs[name]}/tiles/", info["bounds"])
        assert all("api_key" not in u for _, u in page.tiles)
        assert page.hook("tileErrors") == [] and page.hook("errors") == [] and page.page_errors == []
        # a reload keeps working from the stored key
        assert page.open(f"/viewer/jobs/{jobs[name]}") == "ready", page.hook("errors")
    finally:
        page.close()


def test_without_a_key_the_viewer_asks_for_one(browser, keyed_server) -> None:
    base, jobs = keyed_server
    page = Page(browser, base)
    try:
        assert page.open(f"/viewer/jobs/{jobs['classes']}") == "failed"
        assert page.page.locator("#key-form").is_visible()
        assert "401" in page.page.locator("#banner").inner_text()
        assert page.page_errors == []
    finally:
        page.close()
