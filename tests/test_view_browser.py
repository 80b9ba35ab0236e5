"""`tilefm view` as a user runs it: the command in a subprocess over the cloud mask and the Presto
embeddings of part of the sample scene (the session's `finished_jobs`: one COG copied to a local
file, the other read from S3 where the job wrote it), the page in headless Chromium.

Both files are layers (first named on top), the class map has its legend, every tile the page
asks for is served (200), the map opens on the data and is not blank, and a click reads both
files and draws the embedding's similarity. Screenshot: test-output/view.png.

Chromium as in tests/test_viewer_browser.py (Debian's, with SwiftShader WebGL; missing fails).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import settings_from
from test_viewer_browser import Page, assert_not_blank, browser  # noqa: F401 (the browser fixture)

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def view_server(
    finished_jobs: dict[str, str], tiler_env: dict[str, str], tmp_path_factory
) -> Iterator[tuple[str, dict[str, str], Path]]:
    """`tilefm view CLOUDS.tif s3://.../presto.tif --no-browser --port N` in a subprocess:
    (base URL, {"clouds": argument, "presto": argument}, its log)."""
    from tilefm.jobs.store import JobStore
    from tilefm.storage import storage_for

    settings = settings_from(tiler_env)
    store = JobStore.from_url(settings.redis_url, prefix=settings.redis_prefix)
    cogs = {
        name: next(o for o in store.get(i).outputs if o.endswith(".tif")) for name, i in finished_jobs.items()
    }
    local = tmp_path_factory.mktemp("view") / "clouds.tif"
    local.write_bytes(storage_for(cogs["clouds"], settings).read_bytes(cogs["clouds"]))
    arguments = {"clouds": str(local), "presto": cogs["presto"]}

    port = _free_port()
    log = local.parent / "view.log"
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "tilefm", "view", arguments["clouds"], arguments["presto"], "--no-browser"]
            + ["--port", str(port)],
            env={**os.environ, **tiler_env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"tilefm view exited with {proc.returncode}:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"{base}/v1/files", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (
                f"tilefm view did not answer in {START_TIMEOUT_S} s:\n{log.read_text()}"
            )
            time.sleep(0.5)
        # the PCA projection of the embedding (computed once, in the background from the start)
        # takes seconds, many more on a busy machine: wait for it here, not in the page's budget
        with urllib.request.urlopen(f"{base}/v1/files", timeout=5) as r:
            presto = json.load(r)["files"][1]["id"]
        t0 = time.monotonic()
        with urllib.request.urlopen(
            f"{base}/v1/jobs/{presto}/preview.png?render=pca&max_size=64", timeout=START_TIMEOUT_S
        ) as r:
            assert r.status == 200
        print(f"the PCA projection was ready after {time.monotonic() - t0:.1f} s")
        yield base, arguments, log
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_view_two_files(browser, view_server, output_dir: Path) -> None:  # noqa: F811  pytest passes the imported fixture by name
    base, arguments, log = view_server
    assert f"tilefm view: {base}/viewer/files" in log.read_text()  # the URL to open is printed

    page = Page(browser, base)
    try:
        assert page.open("/") == "ready", page.hook("errors")  # / leads to the page
        assert page.page.url == f"{base}/viewer/files"
        files = page.hook("files")
        assert [f["model"] for f in files] == ["ukis-csmask", "presto"]
        clouds, presto = files
        assert presto["output"] == arguments["presto"]
        assert clouds["output"] == Path(arguments["clouds"]).as_uri()

        # both layers, in the order named (the first on top), and the class map's legend
        layers = page.page.locator("#layers li")
        assert layers.count() == 2
        names = layers.all_inner_texts()
        assert "clouds.tif" in names[0] and "ukis-csmask" in names[0], names
        assert "presto" in names[1], names
        legend = page.page.locator("#legend li")
        assert legend.count() == len(clouds["classes"]) > 0
        assert legend.first.inner_text().startswith(clouds["classes"][0]["name"])
        assert page.page.locator("#jobs a[data-file]").count() == 2

        # every tile served; the map opened on the data
        for info in files:
            page.assert_tiles_ok(f"/{info['id']}/tiles/", info["bounds"])
        assert all(f"/{clouds['id']}/tiles/" not in u or "render=classes" in u for _, u in page.tiles)
        lon, lat = page.page.evaluate("() => window.tilefmViewer.map.getCenter().toArray()")
        w = min(f["bounds"][0] for f in files)
        s = min(f["bounds"][1] for f in files)
        e = max(f["bounds"][2] for f in files)
        n = max(f["bounds"][3] for f in files)
        assert w <= lon <= e and s <= lat <= n, ((lon, lat), (w, s, e, n))
        assert page.hook("tileErrors") == []
        assert page.hook("errors") == [], "the error banner was shown"
        assert page.page_errors == []
        page.screenshot(output_dir / "view.png")
        assert_not_blank(page.map_pixels(), "tilefm view")

        # a click reads both files; the embedding (selected) gets its similarity layer
        page.click_map_centre()
        page.page.wait_for_function("window.tilefmViewer.lastPoint !== null")
        page.settle("pending")
        panel = page.page.locator("#point").inner_text()
        assert "clouds.tif" in panel and "presto" in panel, panel
        assert len(page.hook("lastPoint")["values"]) == presto["count"]
        assert page.page.evaluate("() => !!window.tilefmViewer.map.getLayer('similarity')")
        page.assert_tiles_ok("render=similarity", presto["bounds"])
        assert page.hook("tileErrors") == [] and page.hook("errors") == [] and page.page_errors == []
        page.screenshot(output_dir / "view-point.png")
    finally:
        page.close()
    # the input scenes and anything else stay unreachable
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{base}/v1/jobs/{presto['id']}/scene/tilejson.json")
    assert err.value.code == 404
