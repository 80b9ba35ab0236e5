"""`tilefm view` without a browser: arguments it refuses (exit 2, naming the argument), and the app
it serves, on small synthetic COGs laid out as tilefm writes them: the named files and nothing
else, for requests addressed to this machine only.

The browser test over real model outputs is tests/test_view_browser.py.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import run_cli
from fastapi.testclient import TestClient
from rasterio.shutil import copy as rio_copy
from rasterio.transform import from_origin
from test_tiler_security import write_output

from tilefm.api.view import ViewError, create_view_app, open_file, open_files
from tilefm.settings import Settings


def _cog(src: Path, dst: Path) -> Path:
    rio_copy(str(src), str(dst), driver="COG", BLOCKSIZE=256, COMPRESS="DEFLATE")
    return dst


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A class map and an embedding (COGs with TILEFM_* tags), a GeoTIFF that is not a COG, a COG
    not written by tilefm, and a file that is no raster."""
    d = tmp_path_factory.mktemp("view")
    out: dict[str, Path] = {}
    for kind in ("classes", "embedding"):
        write_output(d / f"{kind}-src.tif", "0" * 32, kind)
        out[kind] = _cog(d / f"{kind}-src.tif", d / f"{kind}.tif")
    profile = {
        "driver": "GTiff",
        "width": 600,
        "height": 600,
        "count": 1,
        "dtype": "uint8",
        "crs": "EPSG:3857",
        "transform": from_origin(0, 0, 10, 10),
    }
    with rasterio.open(d / "striped.tif", "w", **profile) as dst:  # not tiled: not a COG
        dst.write(np.zeros((1, 600, 600), np.uint8))
    out["striped"] = d / "striped.tif"
    out["plain"] = _cog(d / "striped.tif", d / "plain-cog.tif")
    out["text"] = d / "notes.tif"
    out["text"].write_text("not a raster")
    return out


def test_missing_and_non_cog_arguments_exit_2(files: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nope.tif"
    r = run_cli("view", "--no-browser", str(files["classes"]), str(missing), timeout=120)
    assert r.returncode == 2, r.stderr
    assert f"{missing}: no such file" in r.stderr
    assert r.stdout == ""  # nothing served, no URL printed

    r = run_cli("view", "--no-browser", str(files["striped"]), timeout=120)
    assert r.returncode == 2, r.stderr
    assert f"{files['striped']}: not a Cloud-Optimized GeoTIFF" in r.stderr


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("text", "not a raster GDAL can read"),
        ("plain", "not an output of `tilefm run`"),
        ("folder", "not a file"),
        ("url", "unsupported URI scheme"),
    ],
)
def test_refused_files_name_the_argument(files: dict[str, Path], name: str, message: str) -> None:
    argument = {"folder": str(files["text"].parent), "url": "https://example.com/a.tif"}.get(name) or str(
        files[name]
    )
    with pytest.raises(ViewError, match=message) as e:
        open_file(argument, Settings())
    assert e.value.field == argument


@pytest.fixture(scope="module")
def client(files: dict[str, Path]) -> Iterator[tuple[TestClient, dict[str, str]]]:
    outputs = open_files([str(files["classes"]), str(files["embedding"]), str(files["classes"])], Settings())
    app = create_view_app(outputs, Settings(tiler_cache_mb=0))
    with TestClient(app, base_url="http://127.0.0.1:8090") as c:
        yield c, {o.kind: o.job_id for o in outputs}


def test_serves_the_named_files(client, files: dict[str, Path]) -> None:
    c, ids = client
    listed = c.get("/v1/files").json()["files"]
    assert [(f["name"], f["kind"]) for f in listed] == [
        ("classes.tif", "classes"),
        ("embedding.tif", "embedding"),
    ]
    assert c.get("/", follow_redirects=False).headers["location"] == "/viewer/files"
    assert c.get("/viewer/files").status_code == 200
    info = c.get(f"/v1/jobs/{ids['classes']}/info").json()
    assert info["kind"] == "classes" and info["output"] == files["classes"].as_uri()
    tj = c.get(f"/v1/jobs/{ids['classes']}/tilejson.json").json()
    assert tj["bounds"] == info["bounds"] and "legend" in tj
    tile = tj["tiles"][0].split("8090", 1)[1]
    assert c.get(tile.format(z=12, x=1918, y=1756)).status_code == 200
    for render in ("pca", "rgb"):
        r = c.get(f"/v1/jobs/{ids['embedding']}/tiles/WebMercatorQuad/12/1918/1756.png?render={render}")
        assert r.status_code == 200, r.text
    assert not list(files["embedding"].parent.glob("*.pca.json"))  # nothing written beside the files


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/" + "a" * 32 + "/info",  # an id not given out
        "/v1/jobs",  # no job store
        "/viewer/jobs/" + "a" * 32,
        "/cog/info?url=/etc/hosts.tif",  # no generic COG endpoints
        "/docs",
    ],
)
def test_nothing_else_is_reachable(client, path: str) -> None:
    c, _ = client
    assert c.get(path).status_code == 404


def test_no_input_scene(client) -> None:
    c, ids = client
    r = c.get(f"/v1/jobs/{ids['embedding']}/scene/tilejson.json")
    assert r.status_code == 404 and r.json()["error"]["field"] == "scene"


@pytest.mark.parametrize("host", ["localhost:8090", "127.0.0.1", "[::1]:8090"])
def test_loopback_hosts_are_answered(client, host: str) -> None:
    c, _ = client
    assert c.get("/v1/files", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8090", "192.168.1.5:8090"])
def test_other_hosts_are_refused(client, host: str) -> None:
    """A page elsewhere that points a DNS name at 127.0.0.1 cannot read the files."""
    c, _ = client
    r = c.get("/v1/files", headers={"Host": host})
    assert r.status_code == 400 and r.json()["error"]["field"] == "host"


def test_ports() -> None:
    """A port given and taken: an error naming the port; none given: 8090, or any free one."""
    from tilefm.api.view import DEFAULT_PORT, bind
    from tilefm.errors import TileFMError

    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", DEFAULT_PORT))  # 8090 held here, or already held elsewhere
        taken.listen()
    except OSError:
        pass
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        with pytest.raises(TileFMError, match="cannot listen") as e:
            bind("127.0.0.1", held.getsockname()[1])
        assert e.value.field == "port"
    with bind("127.0.0.1", None) as sock:
        assert sock.getsockname()[1] not in (0, DEFAULT_PORT)
    taken.close()


def test_missing_file_names_the_argument(tmp_path: Path) -> None:
    argument = str(tmp_path / "nope.tif")
    with pytest.raises(ViewError, match="no such file") as e:
        open_file(argument, Settings())
    assert e.value.field == argument


def test_viewer_files_are_checked(tmp_path: Path) -> None:
    """A viewer folder without its page, or without MapLibre (`make viewer`): a clear error."""
    from tilefm.api.view import VIEWER_DIR, check_viewer
    from tilefm.errors import TileFMError

    with pytest.raises(TileFMError, match="viewer's files are not at"):
        check_viewer(tmp_path)
    (tmp_path / "index.html").write_text("<html></html>")
    with pytest.raises(TileFMError, match="make viewer"):
        check_viewer(tmp_path)
    assert check_viewer(VIEWER_DIR) == VIEWER_DIR  # this checkout's, after `make install`


def test_urls_and_browser(monkeypatch) -> None:
    from tilefm.api.view import PAGE, can_open_browser, is_loopback_address, url_of

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))  # noqa: S104  listening everywhere: the URL shown is loopback's
        assert url_of(s) == f"http://127.0.0.1:{s.getsockname()[1]}{PAGE}"
    assert is_loopback_address("127.0.0.1") and is_loopback_address("::1")
    assert not is_loopback_address("0.0.0.0")  # noqa: S104  the address, not a bind
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER"):
        monkeypatch.delenv(name, raising=False)
    assert can_open_browser() is False  # a terminal without a display: no text browser takes it
    monkeypatch.setenv("DISPLAY", ":0")
    assert can_open_browser() is True


def test_embedding_projection_warmed_before_the_first_tile(files: dict[str, Path]) -> None:
    """`warm` computes the embeddings' PCA in the background; class maps need none."""
    from tilefm.api.view import warm

    outputs = open_files([str(files["classes"]), str(files["embedding"])], Settings())
    app = create_view_app(outputs, Settings(tiler_cache_mb=0))
    tiles = app.state.output_tiles
    assert tiles._stats == {}
    thread = warm(app, outputs)
    thread.join(timeout=120)
    assert not thread.is_alive()
    embedding = next(o for o in outputs if not o.is_classes)
    assert list(tiles._stats) == [embedding.job_id]  # computed before any tile asked
    assert tiles.stats(embedding) is tiles._stats[embedding.job_id]  # and kept
