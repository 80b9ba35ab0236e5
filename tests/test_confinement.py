"""Confinement of jobs: each job writes only under its own id and never replaces what it did not
write; the source and output allowlists hold for everything that is opened (STAC asset hrefs,
symlinks, `..` in URLs and S3 keys); validation creates nothing. Real files (the sample scene),
real Redis, a real S3 server (SeaweedFS) and, for the end-to-end run, a real scheduler on Ray."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import rasterio
from botocore.exceptions import ClientError
from conftest import start_scheduler, stop_process
from fastapi.testclient import TestClient

from tilefm.api.jobs import create_app
from tilefm.engine.pipeline import check_unclaimed
from tilefm.errors import StorageError, TileFMError
from tilefm.jobs import locations
from tilefm.jobs.models import JobSpec, JobState
from tilefm.jobs.service import JobService, output_uri
from tilefm.jobs.store import JobStore
from tilefm.settings import Settings
from tilefm.storage import storage_for
from tilefm.tiler.errors import OutputUnreadable
from tilefm.tiler.outputs import read_output

SMALL_BBOX = [-11.5, 24.7, -11.3, 24.85]  # 4 z11 tiles in the middle of the scene
CSMASK_BANDS = ["B02", "B03", "B04", "B08", "B11", "B12"]
VICTIM = b"the victim's output: these bytes must never change\n"


@pytest.fixture
def store() -> Iterator[JobStore]:
    prefix = f"tilefm-confine-{uuid.uuid4().hex[:8]}:"
    s = JobStore.from_url("redis://127.0.0.1:6379/0", prefix=prefix)
    yield s
    keys = list(s.redis.scan_iter(f"{prefix}*"))
    if keys:
        s.redis.delete(*keys)


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    """The one source folder the service may read (the sample scene is outside it)."""
    path = tmp_path / "allowed"
    path.mkdir()
    return path


@pytest.fixture
def inside(allowed: Path, scene_dir: Path) -> Path:
    """The cloud mask's bands, copied into the allowed folder."""
    path = allowed / "inside"
    path.mkdir()
    for b in CSMASK_BANDS:
        shutil.copy(scene_dir / f"{b}.tif", path / f"{b}.tif")
    return path


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    path = tmp_path / "outputs"
    path.mkdir()
    return path


@pytest.fixture
def victim(outputs: Path) -> Path:
    """Another job's finished output, at the key the service gives it."""
    cog = Path(
        output_uri(JobSpec(scene={"s2": "/x"}, model="ukis-csmask", output_prefix=str(outputs)), "0" * 32)
    )
    cog.parent.mkdir(parents=True)
    cog.write_bytes(VICTIM)
    return cog


def _settings(store: JobStore, sources: list[str], outs: list[str], base: Settings | None = None) -> Settings:
    update = {
        "redis_prefix": store.prefix,
        "allowed_sources": sources,
        "allowed_outputs": outs,
        "auth_disabled": True,
    }
    return (base or Settings()).model_copy(update=update)


@pytest.fixture
def api(store: JobStore, allowed: Path, outputs: Path) -> Iterator[TestClient]:
    settings = _settings(store, [str(allowed)], [str(outputs)])
    with TestClient(create_app(settings, store=store)) as client:
        yield client


def _spec(scene: str, output_prefix: str, **kw: object) -> dict:
    return {
        "scene": {"s2": scene},
        "model": "ukis-csmask",
        "zoom": 11,
        "bbox": SMALL_BBOX,
        "output_prefix": output_prefix,
        **kw,
    }


def _refused(r, field: str) -> str:
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == field, err
    return err["message"]


def _item(folder: Path, hrefs: dict[str, str]) -> Path:
    """A STAC item in `folder` whose bands are at `hrefs` (band -> href)."""
    item = json.loads(
        (Path(__file__).resolve().parents[2] / "shared/data/s2-l2a-29RKH-20200219/stac-item.json").read_text()
    )
    item["assets"] = {
        b: {"href": h, "type": "image/tiff; application=geotiff", "eo:bands": [{"name": b}]}
        for b, h in hrefs.items()
    }
    path = folder / "item.json"
    path.write_text(json.dumps(item))
    return path


# -- each job's own key ---------------------------------------------------------------------------


def test_output_key_is_the_jobs_own() -> None:
    spec = JobSpec(scene={"s2": "/x"}, model="presto", output_prefix="s3://tilefm/shared/")
    a, b = "a" * 32, "b" * 32
    assert output_uri(spec, a) == f"s3://tilefm/shared/{a}/presto.tif"
    assert output_uri(spec, b) == f"s3://tilefm/shared/{b}/presto.tif"
    assert (
        output_uri(spec.model_copy(update={"output_prefix": "file:///data/out"}), a)
        == f"file:///data/out/{a}/presto.tif"
    )
    with pytest.raises(ValueError):
        output_uri(spec, "../" + a)  # only a job id names the folder
    with pytest.raises(TileFMError) as e:
        output_uri(spec.model_copy(update={"output_prefix": f"s3://tilefm/shared/{a}/presto.tif"}), b)
    assert e.value.field == "output_prefix"


def test_prefix_naming_another_jobs_cog_is_refused(
    api: TestClient, inside: Path, victim: Path, outputs: Path
) -> None:
    for prefix in (str(victim), victim.as_uri(), str(victim.with_suffix(".TIFF")) + "/"):
        message = _refused(api.post("/v1/jobs", json=_spec(str(inside), prefix)), "output_prefix")
        assert "folder" in message
    assert victim.read_bytes() == VICTIM
    # the victim's folder as a prefix is a folder like any other: the job gets its own key in it
    r = api.post("/v1/jobs", json=_spec(str(inside), str(victim.parent)))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert (
        output_uri(JobSpec.model_validate(r.json()["spec"]), job_id)
        == f"{victim.parent}/{job_id}/ukis-csmask.tif"
    )
    assert victim.read_bytes() == VICTIM and not (victim.parent / job_id).exists()


def test_an_output_is_replaced_only_by_the_job_that_wrote_it(tmp_path: Path, scene_dir: Path) -> None:
    settings = Settings()
    mine, other = "a" * 32, "b" * 32
    out = str(tmp_path / mine / "ukis-csmask.tif")
    check_unclaimed(out, mine, settings)  # nothing there yet
    Path(out).parent.mkdir()
    with rasterio.open(scene_dir / "B02.tif") as src:
        profile, data = src.profile, src.read()
    with rasterio.open(out, "w", **profile) as dst:  # a COG as a job tags it
        dst.write(data)
        dst.update_tags(TILEFM_JOB=mine)
    check_unclaimed(out, mine, settings)  # a retry of the job that wrote it
    before = Path(out).read_bytes()
    with pytest.raises(StorageError, match="not written by job"):
        check_unclaimed(out, other, settings)
    Path(out).write_bytes(VICTIM)  # something no job wrote
    with pytest.raises(StorageError, match="not written by job"):
        check_unclaimed(out, mine, settings)
    assert Path(out).read_bytes() == VICTIM and before != VICTIM
    Path(out).unlink()
    Path(out).with_suffix(".stac.json").write_bytes(VICTIM)  # a STAC item alone
    with pytest.raises(StorageError, match="stac.json already exists"):
        check_unclaimed(out, mine, settings)


# -- sources: what is opened is what is allowed ---------------------------------------------------


def test_stac_href_out_of_the_allowed_folder_is_refused(
    api: TestClient, allowed: Path, outputs: Path, scene_dir: Path
) -> None:
    victim_bytes = (scene_dir / "B02.tif").read_bytes()
    absolute = _item(allowed, {b: str(scene_dir / f"{b}.tif") for b in CSMASK_BANDS})
    assert "outside" in _refused(api.post("/v1/jobs", json=_spec(str(absolute), str(outputs))), "scene.s2")
    os.symlink(scene_dir, allowed.parent / "elsewhere")
    relative = _item(allowed, {b: f"../elsewhere/{b}.tif" for b in CSMASK_BANDS})
    assert "outside" in _refused(api.post("/v1/jobs", json=_spec(str(relative), str(outputs))), "scene.s2")
    file_uris = _item(allowed, {b: (scene_dir / f"{b}.tif").as_uri() for b in CSMASK_BANDS})
    _refused(api.post("/v1/jobs", json=_spec(str(file_uris), str(outputs))), "scene.s2")
    assert (scene_dir / "B02.tif").read_bytes() == victim_bytes
    # the same item with its bands inside the folder is accepted
    for b in CSMASK_BANDS:
        shutil.copy(scene_dir / f"{b}.tif", allowed / f"{b}.tif")
    inside = _item(allowed, {b: f"{b}.tif" for b in CSMASK_BANDS})
    r = api.post("/v1/jobs", json=_spec(str(inside), str(outputs)))
    assert r.status_code == 202, r.text
    api.post(f"/v1/jobs/{r.json()['id']}:cancel")


def test_symlinks_out_of_the_allowed_folder_are_refused(
    api: TestClient, allowed: Path, inside: Path, outputs: Path, scene_dir: Path, victim: Path
) -> None:
    os.symlink(scene_dir, allowed / "scene")  # a whole folder
    _refused(api.post("/v1/jobs", json=_spec(str(allowed / "scene"), str(outputs))), "scene.s2")
    _refused(
        api.post("/v1/jobs", json=_spec(str(allowed / "scene" / "stac-item.json"), str(outputs))), "scene.s2"
    )
    bands = allowed / "bands"  # a real folder, one band of it a link out
    bands.mkdir()
    for b in CSMASK_BANDS[:-1]:
        shutil.copy(scene_dir / f"{b}.tif", bands / f"{b}.tif")
    os.symlink(scene_dir / "B12.tif", bands / "B12.tif")
    assert "B12" in _refused(api.post("/v1/jobs", json=_spec(str(bands), str(outputs))), "scene.s2")
    elsewhere = outputs.parent / "elsewhere-out"  # an output folder through a link is where the link goes
    elsewhere.mkdir()
    os.symlink(elsewhere, outputs / "link")
    _refused(api.post("/v1/jobs", json=_spec(str(inside), str(outputs / "link"))), "output_prefix")
    assert victim.read_bytes() == VICTIM and not any(elsewhere.iterdir())


def test_vrt_is_not_opened_where_sources_are_restricted(
    api: TestClient, allowed: Path, outputs: Path, scene_dir: Path
) -> None:
    vrt = allowed / "bands"
    vrt.mkdir()
    for b in CSMASK_BANDS:
        text = (
            '<VRTDataset rasterXSize="1" rasterYSize="1"><VRTRasterBand dataType="UInt16" band="1">'
            f"<SimpleSource><SourceFilename>{scene_dir / (b + '.tif')}</SourceFilename></SimpleSource>"
            "</VRTRasterBand></VRTDataset>"
        )
        (vrt / f"{b}.vrt").write_text(text)
    assert "VRT" in _refused(api.post("/v1/jobs", json=_spec(str(vrt), str(outputs))), "scene.s2")
    disguised = allowed / "disguised"  # a VRT is a VRT whatever it is called
    disguised.mkdir()
    for b in CSMASK_BANDS:
        shutil.copy(vrt / f"{b}.vrt", disguised / f"{b}.tif")
    _refused(api.post("/v1/jobs", json=_spec(str(disguised), str(outputs))), "scene.s2")


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self) -> None:  # http.server's name
        self.seen.append(self.path)
        self.send_error(404)

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_host() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1 that records every request: (base URL, paths requested)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Recorder", (_Recorder,), {"seen": []}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server.RequestHandlerClass.seen
    server.shutdown()


def test_dot_segments_in_urls_are_refused_before_any_request(
    store: JobStore, allowed: Path, outputs: Path, http_host
) -> None:
    base, seen = http_host
    settings = _settings(store, [f"{base}/allowed/", str(allowed)], [str(outputs)])
    with TestClient(create_app(settings, store=store)) as api:
        for source in (
            f"{base}/allowed/../private/B02.tif",
            f"{base}/allowed/%2e%2e/private/B02.tif",
            f"{base}/allowed/..%2fprivate/B02.tif",
            f"{base}/allowed/../../private/B02.tif",
            f"/vsicurl/{base}/private/B02.tif",
            f"/vsizip//vsicurl/{base}/allowed/x.zip",
        ):
            _refused(api.post("/v1/jobs", json=_spec(source, str(outputs))), "scene.s2")
        # an allowed item naming a host it may not read: refused before GDAL is pointed at it
        item = _item(allowed, {b: f"{base}/private/{b}.tif" for b in CSMASK_BANDS})
        _refused(api.post("/v1/jobs", json=_spec(str(item), str(outputs))), "scene.s2")
        item = _item(allowed, {b: f"http://169.254.169.254/latest/{b}.tif" for b in CSMASK_BANDS})
        _refused(api.post("/v1/jobs", json=_spec(str(item), str(outputs))), "scene.s2")
    assert seen == []


# -- S3: buckets compared exactly; scenes read with the service's settings ------------------------


@pytest.fixture
def s3_scene(s3_settings: Settings, scene_dir: Path) -> Iterator[str]:
    """The sample scene's cloud-mask bands and a STAC item naming them by relative hrefs, on S3:
    the item's URI."""
    root = f"s3://tilefm/confine-{uuid.uuid4().hex[:8]}"
    s3 = storage_for(root + "/x", s3_settings)
    for b in CSMASK_BANDS:
        s3.put_file(scene_dir / f"{b}.tif", f"{root}/scene/{b}.tif")
    doc = json.loads((scene_dir / "stac-item.json").read_text())
    doc["assets"] = {
        b: {"href": f"{b}.tif", "type": "image/tiff", "eo:bands": [{"name": b}]} for b in CSMASK_BANDS
    }
    s3.write_bytes(f"{root}/scene/item.json", json.dumps(doc).encode())
    doc["assets"] = {
        b: {"href": f"{root}/private/{b}.tif", "type": "image/tiff", "eo:bands": [{"name": b}]}
        for b in CSMASK_BANDS
    }
    s3.write_bytes(f"{root}/scene/escape.json", json.dumps(doc).encode())
    s3.write_bytes(f"{root}/private/B02.tif", VICTIM)
    yield f"{root}/scene/item.json"
    client = s3.client
    for o in client.list_objects_v2(Bucket="tilefm", Prefix=root[len("s3://tilefm/") :]).get("Contents", []):
        client.delete_object(Bucket="tilefm", Key=o["Key"])


def test_s3_buckets_and_keys_are_compared_after_normalising(
    store: JobStore, s3_settings: Settings, s3_scene: str, outputs: Path
) -> None:
    root = s3_scene.rsplit("/scene/", 1)[0]
    s3 = storage_for(s3_scene, s3_settings)
    with contextlib.suppress(ClientError):  # made by an earlier test of this session's server
        s3.client.create_bucket(Bucket="tilefm-victim")
    s3.write_bytes("s3://tilefm-victim/out/cog.tif", VICTIM)
    settings = _settings(store, [f"{root}/scene/"], [f"{root}/out/"], base=s3_settings)
    with TestClient(create_app(settings, store=store)) as api:
        # the scene, read from S3 with the service's endpoint and keys
        r = api.post("/v1/jobs", json=_spec(s3_scene, f"{root}/out/"))
        assert r.status_code == 202, r.text
        assert r.json()["progress"]["tiles_total"] == 4
        api.post(f"/v1/jobs/{r.json()['id']}:cancel")
        for prefix in (
            "s3://tilefm/../tilefm-victim/out/",
            f"{root}/out/../../../tilefm-victim/out/",
            f"{root}/out/../private/",
            "s3://tilefm-victim/out/",
            f"s3://tilefm//{root[12:]}/out/",
            f"{root}/out/x/../../private/",
        ):
            _refused(api.post("/v1/jobs", json=_spec(s3_scene, prefix)), "output_prefix")
        for source in (
            f"{root}/scene/../private/B02.tif",
            f"{root}/scene/escape.json",
            "s3://tilefm/../tilefm-victim/out/cog.tif",
            f"/vsis3/tilefm/{root[12:]}/scene/../private/B02.tif",
        ):
            _refused(api.post("/v1/jobs", json=_spec(source, f"{root}/out/")), "scene.s2")
    assert s3.read_bytes("s3://tilefm-victim/out/cog.tif") == VICTIM
    assert s3.read_bytes(f"{root}/private/B02.tif") == VICTIM
    s3.delete("s3://tilefm-victim/out/cog.tif")


# -- validation creates nothing; paths as users have them -----------------------------------------


def test_validation_without_allowlists_creates_nothing(tmp_path: Path, scene_dir: Path) -> None:
    # no store: validation never records anything
    service = JobService(None, Settings(allowed_sources=[], allowed_outputs=[]))  # type: ignore[arg-type]
    for prefix in (tmp_path / "new" / "deep" / "out", (tmp_path / "uri" / "out").as_uri() + "/"):
        spec = JobSpec.model_validate(_spec(str(scene_dir), str(prefix)))
        assert service.validate(spec) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "file").write_bytes(
        b""
    )  # a prefix under a file cannot be written: refused, still nothing made
    with pytest.raises(TileFMError) as e:
        service.validate(JobSpec.model_validate(_spec(str(scene_dir), str(tmp_path / "file" / "out"))))
    assert e.value.field == "output_prefix"
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_sources_as_users_have_them(
    store: JobStore, scene_dir: Path, outputs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = JobService(store, _settings(store, [str(scene_dir.parent)], [str(outputs)]))
    monkeypatch.chdir(scene_dir.parent)
    job, _ = service.submit(JobSpec.model_validate(_spec(scene_dir.name, str(outputs))))
    assert job.spec.scene["s2"] == os.path.realpath(scene_dir)  # resolved once, at submission
    assert store.get(job.id).spec.scene["s2"] == os.path.realpath(scene_dir)
    assert service.validate(JobSpec.model_validate(_spec(scene_dir.as_uri(), str(outputs)))) == 4
    assert (
        service.validate(JobSpec.model_validate(_spec((scene_dir / "stac-item.json").as_uri(), str(outputs))))
        == 4
    )
    with pytest.raises(TileFMError):
        service.validate(JobSpec.model_validate(_spec("file://elsewhere" + str(scene_dir), str(outputs))))


def test_allowlist_normal_forms() -> None:
    allowed = ["/data/scenes", "s3://bucket/scenes/", "https://host.example/cogs/"]
    ok = [
        "/data/scenes/a/B02.tif",
        "file:///data/scenes/a",
        "s3://bucket/scenes/a/B02.tif",
        "/vsis3/bucket/scenes/B02.tif",
        "https://HOST.example:443/cogs/./a/B02.tif",
        "/vsicurl/https://host.example/cogs/B02.tif",
    ]
    for location in ok:
        locations.check_allowed(location, allowed, "f")
    bad = [
        "/data/scenes-other/x",
        "/data/scenes/../secret",
        "s3://bucket/scenes-other/x",
        "s3://bucket/scenes/../x",
        "s3://bucket/../other/scenes/x",
        "s3://other/scenes/x",
        "https://host.example/cogs/../private/x",
        "https://host.example/cogs/%2E%2E/private/x",
        "https://host.example@evil.example/cogs/x",
        "https://host.example:8443/cogs/x",
        "http://host.example/cogs/x",
        "https://host.example/cogs\\..\\x",
        "/vsizip//data/scenes/a.zip",
        "gs://bucket/scenes/x",
        "file://evil/data/scenes/x",
    ]
    for location in bad:
        with pytest.raises(TileFMError) as e:
            locations.check_allowed(location, allowed, "f")
        assert e.value.field == "f", location


# -- end to end: two jobs, one prefix; a key taken before a job ran -------------------------------


def test_jobs_sharing_a_prefix_succeed_into_their_own_keys(
    store: JobStore, scene_dir: Path, outputs: Path, s3_settings: Settings, s3_scene: str, tmp_path: Path
) -> None:
    root = s3_scene.rsplit("/scene/", 1)[0]
    settings = _settings(
        store, [str(scene_dir), f"{root}/scene/"], [str(outputs)], base=s3_settings
    ).model_copy(update={"job_lease_s": 30})
    service = JobService(store, settings)
    spec = JobSpec.model_validate(_spec(str(scene_dir), str(outputs)))
    a, _ = service.submit(spec)
    b, _ = service.submit(spec.model_copy(update={"labels": {"n": "2"}}))
    c, _ = service.submit(spec.model_copy(update={"labels": {"n": "3"}}))
    d, _ = service.submit(spec.model_copy(update={"scene": {"s2": s3_scene}}))  # read from S3 by Ray workers
    taken = Path(output_uri(c.spec, c.id))  # something already at c's key before c runs
    taken.parent.mkdir(parents=True)
    taken.write_bytes(VICTIM)
    # `tilefm scheduler` as deployed: its own process, on its own local Ray cluster
    env = {
        "TILEFM_REDIS_PREFIX": store.prefix,
        "TILEFM_ALLOWED_SOURCES": json.dumps(settings.allowed_sources),
        "TILEFM_ALLOWED_OUTPUTS": json.dumps(settings.allowed_outputs),
        "TILEFM_AUTH_DISABLED": "true",
        "TILEFM_JOB_LEASE_S": "30",
    }
    log = tmp_path / "scheduler.log"
    proc = start_scheduler(env, log)
    try:
        deadline = time.monotonic() + 400
        while True:
            jobs = {j.id: store.get(j.id) for j in (a, b, c, d)}
            if all(j.state.final for j in jobs.values()):
                break
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, (jobs, log.read_text()[-4000:])
            time.sleep(0.5)
    finally:
        stop_process(proc)
    ja, jb, jc, jd = (jobs[j.id] for j in (a, b, c, d))
    for j in (ja, jb, jd):
        assert j.state == JobState.SUCCEEDED, j.error
        assert j.outputs == [
            output_uri(j.spec, j.id),
            output_uri(j.spec, j.id).removesuffix(".tif") + ".stac.json",
        ]
        with rasterio.open(j.outputs[0]) as src:
            assert src.tags()["TILEFM_JOB"] == j.id
    assert len({ja.outputs[0], jb.outputs[0], jd.outputs[0]}) == 3
    assert jc.state == JobState.FAILED and "already exists and was not written by job" in jc.error.message, (
        jc.error
    )
    assert taken.read_bytes() == VICTIM
    # the tiler serves a job's key only while it holds that job's COG
    assert read_output(ja, settings).job_id == ja.id
    shutil.copy(jb.outputs[0], ja.outputs[0])
    with pytest.raises(OutputUnreadable, match="not written by job"):
        read_output(ja, settings)
