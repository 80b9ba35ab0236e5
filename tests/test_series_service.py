"""A Presto time series through the job service as deployed: `tilefm serve` (HTTP and gRPC, API
keys) and `tilefm scheduler` (a local Ray cluster) as processes of their own, over real Redis,
writing to a file:// prefix. The series is submitted over both APIs, run to the end, and each
output is the map `tilefm run --executor local` makes of the same series, bit for bit: one engine,
whichever way the job came in. The outputs record the series (docs/pipeline.md, "Time series")."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse

import grpc
import httpx
import numpy as np
import pytest
import rasterio
from conftest import drop_redis_keys, run_cli, start_scheduler, stop_process
from test_grpc_deployed import Deployment
from test_grpc_deployed import _start as start_serve
from test_time_series import SHARED, _dated

from tilefm.api.auth import hash_key
from tilefm.jobs.proto import pb, pb_grpc

#: `tilefm serve` and `tilefm scheduler` as processes of their own
pytestmark = pytest.mark.integration

KEY = "series-" + uuid.uuid4().hex
#: three acquisitions months apart, across a year end: months 11, 0 and 2
DAYS = ["20191203", "20200119", "20200302"]
TIMESTEPS = ["2019-12-03", "2020-01-19", "2020-03-02"]
BBOX = [-11.45, 24.75, -11.40, 24.80]  # one z10 tile in the middle of the sample scene
ZOOM = 10
JOB_TIMEOUT_S = 300


def _wait_all(
    http: httpx.Client, ids: dict[str, str], scheduler: subprocess.Popen, scheduler_log: Path
) -> dict[str, dict]:
    """Poll the API until every job in `ids` (name -> id) is final, the scheduler gone or
    JOB_TIMEOUT_S over; fail unless all succeeded, with their states and the scheduler's log."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        jobs = {name: http.get(f"/v1/jobs/{i}").json() for name, i in ids.items()}
        final = all(j["state"] in ("succeeded", "failed", "cancelled") for j in jobs.values())
        if final or scheduler.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    bad = {
        n: (j["state"], j.get("error"), j["progress"]) for n, j in jobs.items() if j["state"] != "succeeded"
    }
    assert not bad, (
        f"jobs not succeeded (scheduler exit status {scheduler.poll()}, waited up to "
        f"{JOB_TIMEOUT_S} s): {bad}\nscheduler log:\n{scheduler_log.read_text(errors='replace')[-4000:]}"
    )
    return jobs


def _local(uri: str) -> Path:
    assert uri.startswith("file://"), uri
    return Path(urlparse(uri).path)


def _read(cog: Path) -> tuple[dict, np.ndarray]:
    with rasterio.open(cog) as src:
        meta = {
            "shape": (src.count, src.height, src.width),
            "dtypes": src.dtypes,
            "crs": src.crs,
            "transform": src.transform,
            "bounds": src.bounds,
            "nodata": str(src.nodata),  # NaN for embeddings: compared as text
        }
        return {**meta, "tags": src.tags()}, src.read()


def _series_recorded(cog: Path, tags: dict, sources: list[str]) -> None:
    """The COG's and its STAC item's record of the series (docs/pipeline.md, "Time series")."""
    assert json.loads(tags["TILEFM_TIMESTEPS"]) == TIMESTEPS, (cog, tags["TILEFM_TIMESTEPS"])
    steps = json.loads(tags["TILEFM_SCENE"])["s2"]["timesteps"]
    assert [(t["source"], t["datetime"][:10]) for t in steps] == list(zip(sources, TIMESTEPS, strict=True))
    props = json.loads(cog.with_suffix(".stac.json").read_text())["properties"]
    assert props["tilefm:timesteps"] == TIMESTEPS, (cog, props)
    # the item's datetime is the first date
    assert (props["datetime"], props["start_datetime"], props["end_datetime"]) == (
        f"{TIMESTEPS[0]}T00:00:00Z",
        f"{TIMESTEPS[0]}T00:00:00Z",
        f"{TIMESTEPS[-1]}T00:00:00Z",
    ), (cog, props)
    assert [t["source"] for t in props["tilefm:scene"]["s2"]["timesteps"]] == sources, (cog, props)


def _bad_submissions(root: Path, folders: list[str]) -> dict[str, dict]:
    """Job bodies (without output_prefix) that must be refused, -> a word the error names:
    a STAC item without usable bands, a `raster:bands` scale that is not a number, more dates
    than Presto takes, a date that is not one."""
    item = json.loads((SHARED / "data" / "s2-l2a-29RKH-20200219" / "stac-item.json").read_text())
    red = str(Path(folders[0]) / "B04.tif")

    def write(name: str, assets: dict, when: str = item["properties"]["datetime"]) -> str:
        body = {**item, "id": name, "properties": {"datetime": when}, "assets": assets, "links": []}
        (root / f"{name}.json").write_text(json.dumps(body))
        return str(root / f"{name}.json")

    image = {"href": red, "type": "image/tiff", "eo:bands": [{"common_name": "red"}]}
    no_bands = write("no-bands", {"thumbnail": {"href": "./t.jpg", "type": "image/jpeg"}})
    bad_scale = write("bad-scale", {"red": {**image, "raster:bands": [{"scale": "0.0001"}]}})
    not_a_date = write("not-a-date", {"red": image}, when="yesterday")
    many = [
        str(f) for f in _dated(root / "many", [f"2019{m:02d}{d:02d}" for m in range(1, 13) for d in (5, 20)])
    ]
    base = {"model": "presto", "zoom": ZOOM, "bbox": BBOX}
    return {
        "no usable band": {**base, "scene": {"s2": no_bands}},
        "must be a number": {**base, "scene": {"s2": bad_scale}},
        "(24)": {**base, "scene": {"s2": [*folders, *many]}},
        "not a date": {**base, "scene": {"s2": [not_a_date, folders[0]]}},
    }


def test_series_job_over_http_and_grpc_is_tilefm_runs_map(tmp_path: Path) -> None:
    t0 = time.monotonic()
    folders = [str(f) for f in _dated(tmp_path / "scenes", DAYS)]  # links to the sample's bands
    recorded = [os.path.realpath(f) for f in folders]  # the service resolves sources at submission
    a, b, c = folders
    keys_env = {
        "TILEFM_API_KEYS": json.dumps(
            [{"name": "rw", "sha256": hash_key(KEY), "scopes": ["jobs:read", "jobs:write"]}]
        ),
        "TILEFM_AUTH_DISABLED": "false",
        # the band folders' files are links into the shared sample scene: both must be allowed
        "TILEFM_ALLOWED_SOURCES": json.dumps([str(tmp_path / "scenes"), str(SHARED / "data")]),
    }
    sched_log = tmp_path / "scheduler.log"
    dep: Deployment | None = None
    sched = None
    try:
        dep = start_serve(keys_env, tmp_path)  # outputs allowed under file://{tmp_path}/out/
        out_prefix = f"file://{dep.out_dir}/"
        sched = start_scheduler(
            {
                **keys_env,
                "TILEFM_REDIS_PREFIX": dep.redis_prefix,
                "TILEFM_ALLOWED_OUTPUTS": json.dumps([out_prefix]),
            },
            sched_log,
        )
        t_up = time.monotonic()
        with httpx.Client(base_url=dep.http, headers={"X-API-Key": KEY}, timeout=60) as http:
            r = http.post(
                "/v1/jobs",
                json={
                    "scene": {"s2": [a, b, c]},
                    "model": "presto",
                    "zoom": ZOOM,
                    "bbox": BBOX,
                    "output_prefix": out_prefix,
                },
            )
            assert r.status_code == 202, r.text
            assert r.json()["spec"]["scene"] == {"s2": [a, b, c]}
            ids = {"http": r.json()["id"]}
            with grpc.insecure_channel(f"127.0.0.1:{dep.grpc_port}") as channel:
                stub = pb_grpc.JobServiceStub(channel)
                reply = stub.Submit(
                    pb.SubmitRequest(
                        spec=pb.JobSpec(
                            # the sources in another order: a series is sorted by date
                            scene_series={"s2": pb.SourceList(sources=[c, a, b])},
                            model="presto",
                            zoom=ZOOM,
                            bbox=pb.BBox(min_lon=BBOX[0], min_lat=BBOX[1], max_lon=BBOX[2], max_lat=BBOX[3]),
                            output_prefix=out_prefix,
                        )
                    ),
                    timeout=60,
                    metadata=[("authorization", f"Bearer {KEY}")],
                )
            assert reply.created and list(reply.job.spec.scene_series["s2"].sources) == [c, a, b]
            assert not reply.job.spec.scene
            ids["grpc"] = reply.job.id
            # bad input to the deployed API: 422 naming the field, no job, nothing written
            for words, body in _bad_submissions(tmp_path / "scenes", folders).items():
                r = http.post("/v1/jobs", json={**body, "output_prefix": out_prefix})
                assert r.status_code == 422, (words, r.text)
                err = r.json()["error"]
                assert err["field"] == "scene.s2" and words in err["message"], (words, err)
            # the same series by the command line, in process, while the scheduler runs the jobs
            cli_out = tmp_path / "cli" / "presto.tif"
            t_cli = time.monotonic()
            r = run_cli(
                "run",
                *("--scene", f"s2={a}", "--scene", f"s2={b}", "--scene", f"s2={c}"),
                *("--model", "presto", "--zoom", str(ZOOM), "--bbox", ",".join(map(str, BBOX))),
                *("--executor", "local", "--out", str(cli_out)),
            )
            assert r.returncode == 0, r.stderr
            t_cli = time.monotonic() - t_cli
            jobs = _wait_all(http, ids, sched, sched_log)
        t_jobs = time.monotonic()
    finally:
        if sched is not None:
            stop_process(sched)
        if dep is not None:
            stop_process(dep.proc)
            drop_redis_keys(dep.redis_prefix)

    # only the two jobs wrote anything
    assert sorted(p.name for p in dep.out_dir.iterdir()) == sorted(j["id"] for j in jobs.values())
    print(f"timing: up {t_up - t0:.1f} s, cli run {t_cli:.1f} s, jobs done at {t_jobs - t0:.1f} s")
    cli_meta, cli_values = _read(cli_out)
    assert cli_meta["shape"][0] == 128 and np.isfinite(cli_values).any()
    _series_recorded(cli_out, cli_meta["tags"], recorded)
    for name, job in jobs.items():
        cog_uri, stac_uri = job["outputs"]
        assert cog_uri == f"{out_prefix}{job['id']}/presto.tif", cog_uri
        assert stac_uri == f"{out_prefix}{job['id']}/presto.stac.json", stac_uri
        assert job["progress"]["tiles_done"] == job["progress"]["tiles_total"] > 0, job
        cog = _local(cog_uri)
        meta, values = _read(cog)
        assert meta["tags"]["TILEFM_JOB"] == job["id"]
        _series_recorded(cog, meta["tags"], recorded)
        for k in ("shape", "dtypes", "crs", "transform", "bounds", "nodata"):
            assert meta[k] == cli_meta[k], (name, k, meta[k], cli_meta[k])
        for tag in ("TILEFM_MODEL", "TILEFM_MODEL_SHA256", "TILEFM_ZOOM", "TILEFM_BACKEND", "TILEFM_SCENE"):
            assert meta["tags"][tag] == cli_meta["tags"][tag], (name, tag)
        started, finished = (datetime.fromisoformat(job["timings"][k]) for k in ("started", "finished"))
        ran = (finished - started).total_seconds()
        print(f"{name} job: {job['progress']['tiles_total']} tile(s), ran {ran:.1f} s")
        diff = np.abs(values.astype(np.float64) - cli_values.astype(np.float64))
        print(
            f"{name} job vs tilefm run: shape {values.shape} {values.dtype}, "
            f"NaN {int(np.isnan(values).sum())}/{int(np.isnan(cli_values).sum())}, "
            f"max abs diff {np.nanmax(diff):.3g}, values differing {int(np.count_nonzero(diff > 0))}"
        )
        np.testing.assert_array_equal(values, cli_values, err_msg=f"the {name} job's map is not tilefm run's")
