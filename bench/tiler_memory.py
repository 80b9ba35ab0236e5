"""The tiler's memory under the largest requests its caps allow.

    python bench/tiler_memory.py [--cog OUTPUT.tif] [--size 2048] [--requests 20] [--clients 1,4]

Starts the tiler the way users do (`uvicorn app:app --app-dir services/tiler`, default settings)
over one Presto-like output: 128 bands of 16-bit floats (Float32 with NBITS=16, pixel-interleaved,
DEFLATE with the floating-point predictor), `--size` pixels square on the web-mercator grid at
zoom 13 with three overviews, written here with rasterio unless `--cog` names a tilefm output.
It is registered as a succeeded job in its own Redis key prefix.

For each kind of request (named after the cap it presses against), `--requests` requests, each
one different (no rendered-tile cache hits), by 1 and by 4 clients at once (4 = the tiler's
render threads); the process's peak RSS (VmHWM, reset before each kind) and its RSS after are
printed. Every request must answer 200. The caps are the settings' defaults unless TILEFM_TILER_*
variables say otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.windows import Window

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ZOOM = 13
BANDS = 128
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_cog(path: Path, size: int, job_id: str) -> None:
    """A Presto-like output on the zoom-13 grid: smooth fields plus noise, NaN in one corner."""
    from tilefm.grid import TMS

    x0, y0 = TMS.tile(-11.6, 24.9, ZOOM)[:2]
    b = TMS.xy_bounds(x0, y0, ZOOM)
    res = (b.right - b.left) / 256
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": BANDS,
        "dtype": "float32",
        "nodata": float("nan"),
        "crs": "EPSG:3857",
        "transform": Affine(res, 0, b.left, 0, -res, b.top),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "predictor": 3,
        "interleave": "pixel",
        "nbits": 16,
        "bigtiff": "if_safer",
    }
    rng = np.random.default_rng(0)
    freq = rng.uniform(0.5, 6.0, (BANDS, 2)).astype(np.float32)
    phase = rng.uniform(0, 6.3, BANDS).astype(np.float32)
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, size, 256):
            yy, xx = np.mgrid[row : row + 256, 0:size].astype(np.float32) / size
            block = np.empty((BANDS, 256, size), np.float32)
            for i in range(BANDS):
                block[i] = np.sin(xx * freq[i, 0] * 6.3 + phase[i]) * np.cos(yy * freq[i, 1] * 6.3) * 0.5
            block += rng.normal(0, 0.02, block.shape).astype(np.float32)
            if row == 0:
                block[:, :64, :64] = np.nan
            dst.write(block, window=Window(0, row, size, 256))
        dst.update_tags(
            TILEFM_ZOOM=str(ZOOM), TILEFM_OUTPUT_KIND="embedding", TILEFM_MODEL="presto", TILEFM_JOB=job_id
        )
        dst.build_overviews([2, 4, 8], Resampling.nearest)


def register_job(prefix: str, out_dir: Path, cog: Path | None, size: int) -> tuple[str, Path]:
    """A succeeded job whose output is `cog` (written now when None)."""
    from tilefm.jobs.models import JobSpec, JobState
    from tilefm.jobs.store import JobStore

    store = JobStore.from_url(os.environ.get("TILEFM_REDIS_URL", "redis://127.0.0.1:6379/0"), prefix=prefix)
    spec = JobSpec(
        scene={"s2": str(SHARED / "data" / "s2-l2a-29RKH-20200219")},
        model="presto",
        zoom=ZOOM,
        output_prefix=out_dir.as_uri() + "/",
    )
    store.create(spec, body_hash=uuid.uuid4().hex)
    job = store.claim_next("bench", 600)
    if cog is None:
        cog = out_dir / job.id / "presto.tif"
        cog.parent.mkdir(parents=True)
        t0 = time.perf_counter()
        write_cog(cog, size, job.id)
        print(
            f"wrote {cog} ({cog.stat().st_size / MIB:.0f} MiB) in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    else:
        with rasterio.open(cog, "r+") as ds:  # the tiler serves a file only for the job that wrote it
            ds.update_tags(TILEFM_JOB=job.id)
    store.transition(job.id, JobState.SUCCEEDED, outputs=[cog.as_uri()])
    return job.id, cog


def rss(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for process {pid}")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM back to the current RSS


def request_kinds(job: str, cog: Path, info: dict, n: int, salt: int) -> dict[str, list[str]]:
    """Per cap, `n` different requests as large as the defaults allow (or the TILEFM_TILER_*
    values in the environment); `salt` makes them differ from another pass's."""
    from tilefm.grid import TMS
    from tilefm.settings import Settings

    s = Settings()
    budget = s.tiler_max_read_mb * MIB
    w, so, e, no = info["bounds"]
    tiles = list(TMS.tiles(w + 1e-6, so + 1e-6, e - 1e-6, no - 1e-6, [info["native_zoom"]]))
    tile = [f"{t.z}/{t.x}/{t.y}" for t in tiles]
    jobs = f"/v1/jobs/{job}"
    url = f"url={cog}"

    def bidx(k: int) -> str:
        return "&".join(f"bidx={b}" for b in range(1, k + 1))

    def fits(px: int) -> int:
        """The most bands a read of `px` x `px` may hold, within the band cap."""
        return min(s.tiler_max_bands, budget // (px * px * 4))

    def side(bands: int) -> int:
        return int((budget / (bands * 4)) ** 0.5)

    k_bands = s.tiler_max_bands
    j = [salt * n + i for i in range(n)]  # a number per request, unique over passes
    return {
        # bands=: the most named bands, at the largest statistics size (read a chunk at a time)
        "bands (statistics, named)": [
            f"{jobs}/statistics?bands={','.join(str((b + k) % BANDS + 1) for b in range(k_bands))}"
            f"&max_size={min(s.tiler_max_statistics_px, side(k_bands))}"
            for k in j
        ],
        "bands (/cog tile, bidx)": [
            f"/cog/tiles/WebMercatorQuad/{tile[i % len(tile)]}.npy?{url}&{bidx(k_bands)}"
            f"&tilesize={min(s.tiler_max_tilesize, side(k_bands)) // 2 * 2 - 2 * (i % 2)}"
            for i in range(n)
        ],
        "tilesize (/cog tile)": [
            f"/cog/tiles/WebMercatorQuad/{tile[i % len(tile)]}.npy?{url}&{bidx(fits(s.tiler_max_tilesize))}"
            f"&tilesize={s.tiler_max_tilesize - (i % 3)}"
            for i in range(n)
        ],
        "preview (job, rgb)": [
            f"{jobs}/preview.png?render=rgb&bands=1,2,3&rescale=-1,{1 + k / 1000}"
            f"&max_size={s.tiler_max_preview_px}"
            for k in j
        ],
        "preview (job, pca, all bands)": [
            f"{jobs}/preview.png?render=pca&rescale=-2,{2 + k / 1000}&max_size={side(BANDS)}" for k in j
        ],
        "preview (/cog)": [
            f"/cog/preview.npy?{url}&{bidx(fits(s.tiler_max_preview_px))}"
            f"&max_size={s.tiler_max_preview_px - i}"
            for i in range(n)
        ],
        "statistics (job, all 128 bands)": [
            f"{jobs}/statistics?max_size={min(s.tiler_max_statistics_px, side(BANDS)) - i}" for i in range(n)
        ],
        "statistics (/cog)": [
            f"/cog/statistics?{url}&{bidx(fits(s.tiler_max_statistics_px))}"
            f"&max_size={s.tiler_max_statistics_px - i}"
            for i in range(n)
        ],
        "tiles (job, pca and similarity)": [
            f"{jobs}/tiles/WebMercatorQuad/{tile[k % len(tile)]}.png?render="
            + (
                f"pca&rescale=-2,{2 + k / 1000}"
                if k % 2
                else f"similarity&lon={w + 0.01 + k * 0.002:.5f}&lat={(so + no) / 2:.5f}"
            )
            for k in j
        ],
    }


def run_kind(base: str, pid: int, urls: list[str], clients: int) -> dict:
    reset_peak(pid)
    before = rss(pid)
    statuses: dict[int, int] = {}
    t0 = time.perf_counter()
    with httpx.Client(base_url=base, timeout=300) as http, ThreadPoolExecutor(clients) as pool:
        for r in pool.map(http.get, urls):
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code != 200:
                print(f"  {r.status_code} {r.request.url.path}: {r.text[:200]}", flush=True)
    return {
        "requests": len(urls),
        "statuses": statuses,
        "seconds": round(time.perf_counter() - t0, 1),
        "rss_before_mib": round(before),
        "peak_rss_mib": round(rss(pid, "VmHWM")),
        "rss_after_mib": round(rss(pid)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cog", type=Path, help="a tilefm embedding output to serve (default: write one)")
    ap.add_argument("--size", type=int, default=2048, help="pixels per side of the written output")
    ap.add_argument("--requests", type=int, default=20, help="requests per kind")
    ap.add_argument("--clients", default="1,4", help="clients at once, one pass per number")
    ap.add_argument(
        "--kinds", default="", help="only the kinds whose names contain one of these words (comma-separated)"
    )
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tilefm-bench-tiler-memory-"))
    prefix = f"tilefm-bench-mem-{uuid.uuid4().hex[:6]}:"
    job, cog = register_job(prefix, work, args.cog.resolve() if args.cog else None, args.size)
    port = free_port()
    env = {
        **os.environ,
        "TILEFM_REDIS_PREFIX": prefix,
        "TILEFM_ALLOWED_OUTPUTS": json.dumps([str(cog.parent)]),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app:app",
            "--app-dir",
            str(REPO / "services" / "tiler"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    results: dict[str, dict] = {}
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        info = httpx.get(f"{base}/v1/jobs/{job}/info", timeout=60).json()
        print(
            f"tiler pid {proc.pid}: {rss(proc.pid):.0f} MiB after start; output {info['count']} bands, "
            f"{args.size} px, zoom {info['native_zoom']}; "
            f"GDAL_CACHEMAX={os.environ.get('GDAL_CACHEMAX', '(tiler default)')}",
            flush=True,
        )
        for salt, clients in enumerate(int(c) for c in args.clients.split(",")):
            kinds = request_kinds(job, cog, info, args.requests, salt)
            if args.kinds:
                kinds = {k: v for k, v in kinds.items() if any(w in k for w in args.kinds.split(","))}
            for kind, urls in kinds.items():
                res = run_kind(base, proc.pid, urls, clients)
                results[f"{kind} x{clients}"] = res
                print(
                    f"{clients} client(s)  {kind:34s} {res['statuses']}  peak {res['peak_rss_mib']:5d} MiB  "
                    f"after {res['rss_after_mib']:5d} MiB  ({res['seconds']} s)",
                    flush=True,
                )
        peak = max(r["peak_rss_mib"] for r in results.values())
        print(
            f"\nhighest peak RSS: {peak} MiB; process peak since start (VmHWM was reset per kind): see above"
        )
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        proc.terminate()
        proc.wait(20)
        from tilefm.jobs.store import JobStore

        store = JobStore.from_url(
            os.environ.get("TILEFM_REDIS_URL", "redis://127.0.0.1:6379/0"), prefix=prefix
        )
        keys = list(store.redis.scan_iter(f"{prefix}*"))
        if keys:
            store.redis.delete(*keys)


if __name__ == "__main__":
    main()
