"""Tile latency and throughput: the tiler's job route against plain TiTiler on the same COG.

    python bench/tiler.py [--cog demo-output/.../ukis-csmask.tif] [--duration 10] [--rounds 2]

Both servers are single uvicorn processes on 127.0.0.1 serving the same COG; wrk (Debian
package `wrk`) requests random tiles from the same list (the output's tiles at its native zoom,
one level up and one down) with 1, 8 and 32 connections. Rounds alternate between the two
servers, so machine noise hits both alike. The job route runs with its rendered-tile cache off
for the comparison (`TILEFM_TILER_CACHE_MB=0`: every request reads and renders), then once with
the cache on, to show what a warm tiler serves.

Without --cog, the cloud mask of part of the sample scene is computed first (a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import rasterio
from rasterio.warp import transform_bounds

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PLAIN_TITILER = """
from fastapi import FastAPI
from titiler.core.errors import DEFAULT_STATUS_CODES, add_exception_handlers
from titiler.core.factory import TilerFactory

app = FastAPI()
app.include_router(TilerFactory(router_prefix="/cog").router, prefix="/cog")
add_exception_handlers(app, DEFAULT_STATUS_CODES)
"""
LUA = """
local urls = {}
for line in io.lines("%s") do urls[#urls + 1] = line end
math.randomseed(%d)
request = function()
  return wrk.format("GET", urls[math.random(#urls)])
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(app_dir: Path, module: str, port: int, env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            f"{module}:app",
            "--app-dir",
            str(app_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/docs", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{module} did not start on port {port}")


def make_cog(out: Path) -> Path:
    cog = out / "clouds" / "ukis-csmask.tif"
    if not cog.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "tilefm",
                "run",
                "--scene",
                f"s2={SHARED / 'data' / 's2-l2a-29RKH-20200219'}",
                "--model",
                "ukis-csmask",
                "--zoom",
                "11",
                "--bbox=-11.7,24.6,-11.2,24.95",
                "--out",
                str(cog),
                "--executor",
                "local",
            ],
            check=True,
            env={**os.environ, "TILEFM_MODEL_STORE": str(SHARED / "models")},
        )
    return cog


def register_job(cog: Path, prefix: str) -> str:
    """A succeeded job whose output is `cog`, in the job store the tiler reads."""
    from tilefm.jobs.models import JobSpec, JobState
    from tilefm.jobs.store import JobStore

    store = JobStore.from_url("redis://127.0.0.1:6379/0", prefix=prefix)
    spec = JobSpec(
        scene={"s2": str(SHARED / "data" / "s2-l2a-29RKH-20200219")},
        model="ukis-csmask",
        zoom=11,
        output_prefix=cog.parent.parent.as_uri() + "/",
    )
    store.create(spec, idempotency_key=None, body_hash=uuid.uuid4().hex)
    job = store.claim_next("bench", 60)
    store.transition(job.id, JobState.SUCCEEDED, outputs=[cog.as_uri()])
    return job.id


def tile_paths(cog: Path) -> list[tuple[int, int, int]]:
    import morecantile

    tms = morecantile.tms.get("WebMercatorQuad")
    with rasterio.open(cog) as src:
        zoom = int(src.tags()["TILEFM_ZOOM"])
        w, s, e, n = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    eps = 1e-6
    return [
        (t.z, t.x, t.y) for t in tms.tiles(w + eps, s + eps, e - eps, n - eps, [zoom - 1, zoom, zoom + 1])
    ]


def wrk(url_file: Path, base: str, conns: int, duration: int, seed: int) -> dict[str, float]:
    script = url_file.with_suffix(f".{seed}.lua")
    script.write_text(LUA % (url_file, seed))
    out = subprocess.run(
        [
            "wrk",
            "-t",
            "1",
            "-c",
            str(conns),
            "-d",
            f"{duration}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            str(script),
            base,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    pct = {m.group(1): _ms(m.group(2)) for m in re.finditer(r"^\s+(50|99)(?:\.0+)?%\s+(\S+)", out, re.M)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": pct["50"],
        "p99_ms": pct["99"],
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cog", type=Path, help="a class-map COG written by tilefm (default: compute one)")
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tilefm-bench-tiler-"))
    cog = (args.cog or make_cog(REPO / "bench-output")).resolve()
    prefix = f"tilefm-bench-{uuid.uuid4().hex[:6]}:"
    job = register_job(cog, prefix)
    (work / "plain.py").write_text(PLAIN_TITILER)
    env = {
        "TILEFM_REDIS_PREFIX": prefix,
        "TILEFM_ALLOWED_OUTPUTS": json.dumps([str(cog.parent)]),
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    }
    ports = {"job route": free_port(), "job route (cache on)": free_port(), "plain TiTiler": free_port()}
    procs = [
        serve(REPO / "services" / "tiler", "app", ports["job route"], {**env, "TILEFM_TILER_CACHE_MB": "0"}),
        serve(REPO / "services" / "tiler", "app", ports["job route (cache on)"], env),
        serve(work, "plain", ports["plain TiTiler"], {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}),
    ]
    try:
        tiles = tile_paths(cog)
        urls = {
            "job route": [f"/v1/jobs/{job}/tiles/WebMercatorQuad/{z}/{x}/{y}.png" for z, x, y in tiles],
            "plain TiTiler": [f"/cog/tiles/WebMercatorQuad/{z}/{x}/{y}.png?url={cog}" for z, x, y in tiles],
        }
        urls["job route (cache on)"] = urls["job route"]
        files = {}
        for name, lst in urls.items():
            files[name] = work / f"{name.replace(' ', '_').replace('(', '').replace(')', '')}.txt"
            files[name].write_text("\n".join(lst) + "\n")
            # every URL answers 200 on both, and the two servers' tiles are the same image
            for u in lst[:5]:
                r = httpx.get(f"http://127.0.0.1:{ports[name]}{u}", timeout=30)
                assert r.status_code == 200, (name, u, r.status_code, r.text[:200])
        results: dict[str, dict[int, list[dict]]] = {n: {} for n in urls}
        clients = [int(c) for c in args.clients.split(",")]
        for rnd in range(args.rounds):
            for conns in clients:
                for name in (
                    ("job route", "plain TiTiler") if rnd % 2 == 0 else ("plain TiTiler", "job route")
                ):
                    time.sleep(2)  # the previous server drains what it still had queued: no overlap
                    res = wrk(
                        files[name],
                        f"http://127.0.0.1:{ports[name]}",
                        conns,
                        args.duration,
                        seed=rnd * 100 + conns,
                    )
                    results[name].setdefault(conns, []).append(res)
                    print(
                        f"round {rnd + 1} {name:14s} c={conns:2d}: {res['rps']:7.1f} tiles/s  p50 "
                        f"{res['p50_ms']:6.1f} ms  p99 {res['p99_ms']:6.1f} ms  non-2xx {res['non_2xx']}",
                        flush=True,
                    )
        for conns in clients:
            time.sleep(2)
            res = wrk(
                files["job route (cache on)"],
                f"http://127.0.0.1:{ports['job route (cache on)']}",
                conns,
                args.duration,
                seed=999,
            )
            results["job route (cache on)"].setdefault(conns, []).append(res)
        print(
            f"\n{len(tiles)} tiles (zooms {min(t[0] for t in tiles)}-{max(t[0] for t in tiles)}) of "
            f"{cog.name}, {args.rounds} rounds of {args.duration} s, median of rounds\n"
        )
        print("| clients | route | tiles/s | p50 ms | p99 ms | non-2xx |")
        print("|---|---|---|---|---|---|")
        summary = {}
        for conns in clients:
            for name in urls:
                runs = results[name][conns]
                med = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in ("rps", "p50_ms", "p99_ms")}
                med["non_2xx"] = sum(r["non_2xx"] for r in runs)
                summary.setdefault(name, {})[conns] = med
                print(
                    f"| {conns} | {name} | {med['rps']:.1f} | {med['p50_ms']:.1f} | {med['p99_ms']:.1f} | "
                    f"{med['non_2xx']} |"
                )
        print()
        for conns in clients:
            ratio = summary["job route"][conns]["rps"] / summary["plain TiTiler"][conns]["rps"]
            print(f"c={conns}: job route / plain TiTiler throughput = {ratio:.2f}")
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


if __name__ == "__main__":
    main()
