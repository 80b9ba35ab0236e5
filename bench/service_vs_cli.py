"""The same run through the job service and through `tilefm run`: wall times, alternating,
whether the two COGs hold the same values, and the scheduler's peak memory.

    .venv/bin/python bench/service_vs_cli.py [--rounds 2] [--model presto] [--zoom 11]
        [--bbox -11.85,24.4,-11.1,25.05] [--whole-scene]
        [--jsonl bench/results/cpu-2core/service-vs-cli.jsonl]

What users run, all real and local: `tilefm up` (Redis at 127.0.0.1:6379 under a private key
prefix, removed afterwards; a SeaweedFS S3 server; `tilefm scheduler` on its own local Ray
cluster; the job API) and `tilefm jobs submit --watch` against it; `tilefm run` as a process per
run (its own local Ray cluster, Ray executor), writing to the same S3 server. The scheduler's
first job (Ray's start, the model's load) is a warm-up, reported on its own; after it the
scheduler keeps its encoder actors, as deployed, while every `tilefm run` starts its own (its
`load_s` is printed beside its wall time).

Service time: the wall time of `tilefm jobs submit --watch` (the request, validation, the job,
the event stream to its end). CLI time: the wall time of `tilefm run`, and the run's own seconds.
During each job the scheduler process's memory is sampled (`memory_mib`): its peak resident
set, split into private pages and the Ray object store's shared pages it has mapped.
`--whole-scene` ends with one job over the whole scene, whose output is larger than any before
it, to show whether that peak follows the output's size or the tiles in flight.

The COGs are compared block by block (rasterio), every band, NaN equal to NaN.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from tiler_memory import free_port, rss  # this folder's: the same port and /proc readings

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SCENE = SHARED / "data" / "s2-l2a-29RKH-20200219"
TILEFM = [sys.executable, "-m", "tilefm"]


def children(pid: int) -> list[int]:
    """Every process below `pid`."""
    out: list[int] = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out += [int(p.name), *children(int(p.name))]
    return out


def scheduler_pid(up_pid: int) -> int:
    for pid in children(up_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"tilefm" in cmd and b"scheduler" in cmd:
            return pid
    raise SystemExit("no `tilefm scheduler` under `tilefm up`")


def memory_mib(pid: int) -> dict[str, float]:
    """The process's resident memory now (MiB): all of it, its private pages (`RssAnon`) and the
    shared memory it has mapped (`RssShmem`: for a Ray driver, the object store's pages it has
    touched, which stay mapped after the objects are gone), and its peak so far (`VmHWM`)."""
    return {k: rss(pid, k) for k in ("VmRSS", "RssAnon", "RssShmem", "VmHWM")}


class MemorySampler:
    """The peaks of `memory_mib(pid)` while a job runs, sampled every 0.2 s on a thread."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            for k, v in memory_mib(self.pid).items():
                self.peak[k] = max(self.peak.get(k, 0.0), v)
            if self._stop.wait(0.2):
                return


def same_values(a: Path, b: Path) -> tuple[bool, str]:
    """Whether two COGs hold the same values at full resolution and in every overview."""
    import rasterio

    with rasterio.open(a) as x, rasterio.open(b) as y:
        for k in ("count", "width", "height", "dtypes", "transform", "crs"):
            if getattr(x, k) != getattr(y, k):
                return False, f"{k}: {getattr(x, k)} != {getattr(y, k)}"
        if not np.array_equal(np.array(x.nodatavals, float), np.array(y.nodatavals, float), equal_nan=True):
            return False, f"nodata: {x.nodatavals[:1]} != {y.nodatavals[:1]}"
        levels = len(x.overviews(1))
        if levels != len(y.overviews(1)):
            return False, "different overview levels"
        windows = [w for _, w in x.block_windows(1)]
    for level in [None, *range(levels)]:
        kw = {} if level is None else {"overview_level": level}
        with rasterio.open(a, **kw) as x, rasterio.open(b, **kw) as y:
            for window in windows if level is None else [None]:
                u, v = x.read(window=window), y.read(window=window)
                if not np.array_equal(u, v, equal_nan=u.dtype.kind == "f"):
                    diff = np.nanmax(np.abs(u.astype(np.float64) - v.astype(np.float64)))
                    where = "full resolution" if level is None else f"overview {level}"
                    return False, f"values differ at {where} {window or ''} (max |diff| {diff})"
    return True, f"identical values (full resolution and {levels} overviews)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model", default="presto")
    p.add_argument("--zoom", type=int, default=11)
    p.add_argument("--bbox", default="-11.85,24.4,-11.1,25.05", help="25 z11 tiles of the sample scene")
    p.add_argument("--whole-scene", action="store_true", help="end with a service job over the whole scene")
    p.add_argument("--jsonl", type=Path, default=None, help="append each measurement here")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tilefm-bench-"))
    prefix = f"tilefm-bench-{uuid.uuid4().hex[:8]}:"
    api_port = free_port()
    api = f"http://127.0.0.1:{api_port}"
    env = {
        **os.environ,
        "TILEFM_MODEL_STORE": os.environ.get("TILEFM_MODEL_STORE", str(SHARED / "models")),
        "TILEFM_REDIS_PREFIX": prefix,
        "TILEFM_ALLOWED_SOURCES": json.dumps([str(SHARED / "data")]),
        "TILEFM_ALLOWED_OUTPUTS": json.dumps(["s3://tilefm/"]),
        "TILEFM_AUTH_DISABLED": "true",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("TILEFM_API_KEYS", None)
    log = work / "up.log"
    up = subprocess.Popen(
        [
            *TILEFM,
            "up",
            "--port",
            str(api_port),
            "--grpc-port",
            str(free_port()),
            "--tiler-port",
            str(free_port()),
        ],
        env=env,
        stdout=open(log, "ab"),  # noqa: SIM115 - the stack writes to it for its whole life
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    results: list[dict] = []
    cogs: dict[str, Path] = {}

    def record(kind: str, n: int, **kw: object) -> None:
        row = {"kind": kind, "round": n, "model": args.model, "zoom": args.zoom, **kw}
        results.append(row)
        print(json.dumps(row), flush=True)
        if args.jsonl:
            with args.jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")

    try:
        # the stack prints the S3 server's settings (export NAME=VALUE) once it is up
        import httpx

        deadline = time.monotonic() + 300
        while True:
            if up.poll() is not None:
                raise SystemExit(f"tilefm up exited:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"tilefm up did not start:\n{log.read_text()[-3000:]}")
            exports = dict(re.findall(r"^export (TILEFM_S3_\w+)=(\S+)$", log.read_text(), re.M))
            try:
                if exports and httpx.get(f"{api}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        env.update(exports)
        os.environ.update(exports)
        from tilefm.settings import Settings
        from tilefm.storage import storage_for

        settings = Settings()
        sched = scheduler_pid(up.pid)

        def fetch(uri: str, name: str) -> Path:
            local = work / name
            storage_for(uri, settings).get_file(uri, local)
            cogs[name] = local
            return local

        def service_run(n: int, kind: str, area: list[str]) -> None:
            cmd = [
                *TILEFM, "jobs", "submit", "--api", api, "--scene", f"s2={SCENE}", "--model", args.model,
                "--zoom", str(args.zoom), *area, "--out", f"s3://tilefm/bench-service/{uuid.uuid4().hex[:8]}/",
            ]  # fmt: skip
            t0 = time.perf_counter()
            with MemorySampler(sched) as mem:
                r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
            wall = time.perf_counter() - t0
            if r.returncode:
                raise SystemExit(f"the job failed ({r.returncode}):\n{r.stdout[-3000:]}{r.stderr[-2000:]}")
            job = json.loads(r.stdout[r.stdout.index("{") :])
            cog = fetch(job["outputs"][0], f"{kind}-{n}.tif")
            record(
                kind,
                n,
                wall_s=round(wall, 2),
                tiles=job["progress"]["tiles_total"],
                scheduler_peak_mib={k: round(v, 1) for k, v in mem.peak.items()},
                cog_mib=round(cog.stat().st_size / 2**20, 1),
                output_mib=round(_output_mib(cog), 1),
            )

        def cli_run(n: int) -> None:
            out = f"s3://tilefm/bench-cli/{uuid.uuid4().hex[:8]}/{args.model}.tif"
            cmd = [
                *TILEFM, "run", "--scene", f"s2={SCENE}", "--model", args.model, "--zoom", str(args.zoom),
                f"--bbox={args.bbox}", "--out", out,
            ]  # fmt: skip
            t0 = time.perf_counter()
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
            wall = time.perf_counter() - t0
            if r.returncode:
                raise SystemExit(f"tilefm run failed ({r.returncode}):\n{r.stderr[-3000:]}")
            m = re.search(r"tiles in batches of \d+ .*?, ([\d.]+) s\)", r.stdout + r.stderr)
            fetch(out, f"cli-{n}.tif")
            record("cli", n, wall_s=round(wall, 2), run_s=float(m.group(1)) if m else None)

        service_run(0, "service-warmup", [f"--bbox={args.bbox}"])  # the scheduler's Ray start, model load
        for n in range(1, args.rounds + 1):
            cli_run(n)
            service_run(n, "service", [f"--bbox={args.bbox}"])
        first = cogs["cli-1.tif"]
        for name, path in list(cogs.items()):
            if path != first:
                ok, why = same_values(first, path)
                record("compare", 0, a=first.name, b=name, identical=ok, detail=why)
        if args.whole_scene:
            service_run(0, "service-whole-scene", [])
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGINT)  # `tilefm up` stops what it started
            try:
                up.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
        import redis

        r = redis.Redis.from_url(env.get("TILEFM_REDIS_URL", "redis://127.0.0.1:6379/0"))
        keys = list(r.scan_iter(f"{prefix}*"))
        if keys:
            r.delete(*keys)
    for kind in ("cli", "service"):
        walls = [r["wall_s"] for r in results if r["kind"] == kind]
        if walls:
            print(f"{kind}: wall {', '.join(f'{w:.1f}' for w in walls)} s")
    print(f"stack log: {log}")


def _output_mib(cog: Path) -> float:
    """The output's full resolution, uncompressed: what a stitcher holding it all would hold."""
    import rasterio

    with rasterio.open(cog) as src:
        return src.width * src.height * src.count * np.dtype(src.dtypes[0]).itemsize / 2**20


if __name__ == "__main__":
    main()
