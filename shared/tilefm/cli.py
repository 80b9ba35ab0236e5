"""`tilefm`: run a model over a scene, and manage models.

Errors a user can fix print one line (`tilefm: error: FIELD: what is wrong`) and exit with 2.

Why one module (~600 lines): Typer commands only, each a thin wrapper over the library (options,
help text, error mapping to exit 2); one file reads as the CLI's table of contents.
"""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path
from typing import Annotated

import typer

from tilefm import __version__
from tilefm.errors import TileFMError

app = typer.Typer(
    name="tilefm",
    help="Run Earth-observation foundation models over whole scenes; outputs are web-optimized COGs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="Model cards, weights and reference checks.", no_args_is_help=True)
app.add_typer(models_app, name="models")

EXIT_USER_ERROR = 2


def fail(err: Exception) -> None:
    typer.echo(f"tilefm: error: {err}", err=True)
    raise typer.Exit(EXIT_USER_ERROR)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tilefm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    pass


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        k, sep, val = v.partition("=")
        if not sep or not k or not val:
            raise TileFMError(f"expected KEY=VALUE, got {v!r}", field=what)
        out[k.strip()] = val.strip()
    return out


@app.command(
    epilog=(
        "Example:\n\n"
        "  tilefm run --scene s2=../shared/data/s2-l2a-29RKH-20200219 --model ukis-csmask "
        "--zoom 11 --out file:///tmp/clouds.tif"
    )
)
def run(
    scene: Annotated[
        list[str],
        typer.Option(
            "--scene",
            help=(
                "MODALITY=SOURCE (band folder, raster, STAC item, STAC ItemCollection, or a folder of dated "
                "band folders or items); repeatable. A modality given more than once, or with several "
                "acquisitions, is a time series (models that take one, e.g. presto)."
            ),
        ),
    ],
    model: Annotated[str, typer.Option(help="Model name (see `tilefm models list`).")],
    out: Annotated[
        str, typer.Option(help="Output COG URI: file:///path.tif, s3://bucket/key.tif or a local path.")
    ],
    zoom: Annotated[
        int | None, typer.Option(help="Web-mercator zoom; default matches the scene's native resolution.")
    ] = None,
    bbox: Annotated[
        str | None,
        typer.Option(help="minlon,minlat,maxlon,maxlat (WGS84) to process only part of the scene."),
    ] = None,
    backend: Annotated[
        str, typer.Option(help="auto (the fastest available), torch, torch-cuda, onnxruntime or tensorrt.")
    ] = "auto",
    precision: Annotated[
        str | None,
        typer.Option(
            help=(
                "Model arithmetic: auto (bf16/fp16 on a GPU, else fp32), fp32, fp16, bf16 or int8 "
                "(onnxruntime on CPUs; tensorrt from `tilefm models calibrate`); default TILEFM_PRECISION."
            )
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(help="Embedding storage: float16 (default), float32 or int8 (scale/offset recorded)."),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=256,
            help="Tiles per batch sent to an encoder (default: what a GPU encoder's memory allows, else 4).",
        ),
    ] = None,
    executor: Annotated[
        str, typer.Option(help="ray (local cluster or TILEFM_RAY_ADDRESS) or local (in-process).")
    ] = "ray",
    asset: Annotated[
        list[str],
        typer.Option(help="STAC asset KEY=PATH, to read an item's assets from local files; repeatable."),
    ] = [],  # noqa: B006 - typer takes a list default; never mutated
    band: Annotated[
        list[str],
        typer.Option(
            "--band",
            help=(
                "[MODALITY:]NAME=FILE[:SCALE:OFFSET]: a band (B08, nir08, vv, ...) added to the scene or in "
                "place of its own; SCALE and OFFSET take the file's values to the model card's units "
                "(reflectance x 10000: 0.275:-2000 for Landsat Collection 2 Level-2); repeatable."
            ),
        ),
    ] = [],  # noqa: B006 - typer takes a list default; never mutated
    scene_date: Annotated[
        str | None,
        typer.Option("--date", help="Scene date YYYY-MM-DD when the source has none (a scene of one date)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate and print the tile plan; read and write nothing.")
    ] = False,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help=(
                "Refuse (exit 2) a run whose inputs would be resampled further from the model's training "
                "pixels than its card allows, instead of warning."
            ),
        ),
    ] = False,
) -> None:
    """Run MODEL over a scene and write a Cloud-Optimized GeoTIFF (+ a STAC item beside it)."""
    from tilefm.engine.pipeline import RunSpec, execute, prepare
    from tilefm.grid import parse_bbox
    from tilefm.io.scene import parse_scene_args

    try:
        scenes = parse_scene_args(scene)
        if executor not in ("ray", "local"):
            raise TileFMError(f"unknown executor {executor!r} (ray or local)", field="executor")
        if dtype not in (None, "float16", "float32", "int8"):
            raise TileFMError(f"unknown dtype {dtype!r} (float16, float32 or int8)", field="dtype")
        try:
            d = date.fromisoformat(scene_date) if scene_date else None
        except ValueError:
            raise TileFMError(f"expected YYYY-MM-DD, got {scene_date!r}", field="date") from None
        spec = RunSpec(
            scene=scenes,
            model=model,
            out=out,
            zoom=zoom,
            bbox=parse_bbox(bbox) if bbox else None,
            backend=backend,
            precision=precision,
            dtype=dtype,
            batch_size=batch_size,
            executor=executor,
            asset_map=_pairs(asset, "asset"),
            date=d,
            bands=list(band),
            strict=strict,
        )
        prep = prepare(spec)
    except TileFMError as e:
        fail(e)
    summary = prep.summary()
    if dry_run:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(
        f"{summary['model']} on {summary['backend']} ({summary['precision']}): {summary['tiles']} tiles at "
        f"zoom {summary['zoom']} "
        f"({summary['pixel_size_m']} m pixels) -> {out}; {summary['zoom_reason']}; the model sees "
        f"{summary['grid_description']}",
        err=True,
    )
    for warning in summary["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("tiles"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("tiles", total=summary["tiles"])
        try:
            result = execute(prep, progress=lambda done, total: bar.update(task, completed=done))
        except TileFMError as e:
            fail(e)
    typer.echo(
        f"wrote {result.out} ({result.tiles} tiles in batches of {result.batch_size} on {result.backend} "
        f"({result.precision}), {result.readers}, {result.seconds:.1f} s) and {result.stac_item}",
        err=True,
    )


@models_app.command("list")
def models_list(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the models tilefm knows and whether their weights are in the store."""
    from tilefm.models import list_cards
    from tilefm.models.store import weights_path
    from tilefm.settings import get_settings

    rows = []
    for card in list_cards():
        try:
            have = "yes" if weights_path(card, get_settings().model_store, verify=False) else "seeded"
        except TileFMError:
            have = "no"
        rows.append(
            {
                "name": card.name,
                "architecture": card.architecture,
                "output": f"{card.output.kind}[{card.output.channels}]",
                "inputs": ",".join(i.modality for i in card.inputs),
                "backends": ",".join(card.backends),
                "weights": have,
                "title": card.title,
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    cols = ["name", "architecture", "output", "inputs", "backends", "weights", "title"]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    typer.echo("  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip())
    for r in rows:
        typer.echo("  ".join(r[c].ljust(widths[c]) for c in cols).rstrip())


@models_app.command("info")
def models_info(name: str) -> None:
    """Print a model's card."""
    from tilefm.models import get_card

    try:
        typer.echo(get_card(name).model_dump_json(indent=2))
    except TileFMError as e:
        fail(e)


@models_app.command("pull")
def models_pull(
    name: str,
    url: Annotated[
        str | None, typer.Option(help="Fetch from here instead of the card's official source.")
    ] = None,
) -> None:
    """Fetch a model's weights into the store and verify their sha256."""
    from tilefm.models import get_card
    from tilefm.models.store import pull
    from tilefm.settings import get_settings

    try:
        path = pull(get_card(name), get_settings().model_store, url=url)
    except TileFMError as e:
        fail(e)
    typer.echo(f"{name}: {path} (sha256 verified)")


@models_app.command("calibrate")
def models_calibrate(
    name: str,
    scene: Annotated[
        list[str], typer.Option("--scene", help="MODALITY=SOURCE of a representative scene; repeatable.")
    ],
    zoom: Annotated[
        int | None,
        typer.Option(help="Web-mercator zoom of the tiles (default: the scene's native resolution)."),
    ] = None,
    tiles: Annotated[int, typer.Option(min=1, max=512, help="Tiles in the set, spread over the scene.")] = 32,
    scene_date: Annotated[
        str | None, typer.Option("--date", help="Scene date YYYY-MM-DD when the source has none.")
    ] = None,
) -> None:
    """Make the calibration set an int8 TensorRT engine takes its scales from (real tiles of a
    scene, as the model sees them) and put it in the model store beside the weights."""
    from tilefm.io.scene import parse_scene_args
    from tilefm.models.calibrate import calibrate

    try:
        try:
            d = date.fromisoformat(scene_date) if scene_date else None
        except ValueError:
            raise TileFMError(f"expected YYYY-MM-DD, got {scene_date!r}", field="date") from None
        path = calibrate(name, parse_scene_args(scene), zoom=zoom, tiles=tiles, date=d)
    except TileFMError as e:
        fail(e)
    typer.echo(f"{name}: calibration set at {path}")


@models_app.command("verify")
def models_verify(
    name: str,
    reference: Annotated[Path, typer.Option(help="Reference .npz (layout of shared/reference/presto).")],
    tolerance: Annotated[float | None, typer.Option(help="Override the card's tolerance.")] = None,
) -> None:
    """Evaluate a model on a reference file; exit 1 when the max abs difference exceeds the tolerance."""
    from tilefm.models.verify import verify

    try:
        report = verify(name, reference, tolerance=tolerance)
    except TileFMError as e:
        fail(e)
    status = "ok" if report["passed"] else "FAILED"
    typer.echo(
        f"{name} vs {reference}: max abs diff {report['max_abs_diff']:.3g} over {report['pixels']} pixels "
        f"(tolerance {report['tolerance']:g}): {status}"
    )
    if not report["passed"]:
        raise typer.Exit(1)


jobs_app = typer.Typer(help="Submit and follow jobs on a tilefm job service.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
ApiUrl = Annotated[str, typer.Option("--api", envvar="TILEFM_API_URL", help="Job API base URL.")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="TILEFM_API_KEY", help="API key.")]


def _client(api: str, api_key: str | None):
    from tilefm.client import JobsClient

    return JobsClient(api, api_key)


def _follow(client, job_id: str) -> int:
    """Progress bar from the job's event stream; exit code 0 only if the job succeeded."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    state = None
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} tiles/s"),
        TimeElapsedColumn(),
        disable=not sys.stderr.isatty(),
    ) as bar:
        task = bar.add_task(job_id[:8], total=None, rate="-")
        for ev in client.events(job_id):
            state = ev.state.value
            bar.update(
                task,
                total=ev.progress.tiles_total or None,
                completed=ev.progress.tiles_done,
                description=f"{job_id[:8]} {state}",
                rate=f"{ev.tiles_per_second:.2f}",
            )
    job = client.get(job_id)
    typer.echo(job.model_dump_json(indent=2))
    return 0 if job.state.value == "succeeded" else 1


@jobs_app.command("submit")
def jobs_submit(
    scene: Annotated[
        list[str],
        typer.Option(
            "--scene", help="MODALITY=SOURCE; repeatable (a modality given more than once is a time series)."
        ),
    ],
    model: Annotated[str, typer.Option(help="Model name.")],
    out: Annotated[str, typer.Option(help="Output prefix (s3://bucket/prefix/ or file:///dir/).")],
    api: ApiUrl = "http://127.0.0.1:8080",
    api_key: ApiKey = None,
    zoom: Annotated[int | None, typer.Option()] = None,
    bbox: Annotated[str | None, typer.Option()] = None,
    priority: Annotated[int, typer.Option(min=0, max=9)] = 5,
    idempotency_key: Annotated[str | None, typer.Option()] = None,
    watch: Annotated[bool, typer.Option("--watch/--no-watch", help="Follow the job to the end.")] = True,
) -> None:
    """Submit a job; with --watch, follow it with a progress bar."""
    from tilefm.grid import parse_bbox
    from tilefm.io.scene import parse_scene_args
    from tilefm.jobs.models import JobSpec

    try:
        spec = JobSpec(
            scene=parse_scene_args(scene),
            model=model,
            output_prefix=out,
            zoom=zoom,
            bbox=parse_bbox(bbox) if bbox else None,
            priority=priority,
        )
        client = _client(api, api_key)
        job = client.submit(spec, idempotency_key)
        typer.echo(job.id)
        if watch:
            raise typer.Exit(_follow(client, job.id))
    except TileFMError as e:
        fail(e)


@jobs_app.command("watch")
def jobs_watch(job_id: str, api: ApiUrl = "http://127.0.0.1:8080", api_key: ApiKey = None) -> None:
    """Follow a job until it ends."""
    try:
        raise typer.Exit(_follow(_client(api, api_key), job_id))
    except TileFMError as e:
        fail(e)


@jobs_app.command("list")
def jobs_list(
    api: ApiUrl = "http://127.0.0.1:8080",
    api_key: ApiKey = None,
    state: Annotated[str | None, typer.Option()] = None,
    limit: int = 20,
) -> None:
    """Newest jobs first."""
    try:
        jobs, _ = _client(api, api_key).list(state=state, limit=limit)
    except TileFMError as e:
        fail(e)
    for j in jobs:
        p = j.progress
        typer.echo(
            f"{j.id}  {j.state.value:<9}  {p.tiles_done}/{p.tiles_total}  {j.spec.model}  "
            f"{j.timings.created:%Y-%m-%d %H:%M:%S}"
        )


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, api: ApiUrl = "http://127.0.0.1:8080", api_key: ApiKey = None) -> None:
    """Cancel a job."""
    try:
        job = _client(api, api_key).cancel(job_id)
    except TileFMError as e:
        fail(e)
    typer.echo(f"{job.id} {job.state.value}")


@app.command()
def scheduler(
    max_jobs: Annotated[
        int | None, typer.Option(help="Jobs run at once (TILEFM_SCHEDULER_MAX_JOBS).")
    ] = None,
    metrics_port: Annotated[int, typer.Option(help="Prometheus port (0: none).")] = 9464,
    metrics_host: Annotated[
        str, typer.Option(help="Address the metrics endpoint binds (0.0.0.0 in a pod).")
    ] = "127.0.0.1",
) -> None:
    """Run queued jobs on Ray until interrupted."""
    import logging
    import signal
    import threading

    from prometheus_client import start_http_server

    from tilefm.engine.memory import release_large_arrays
    from tilefm.jobs.scheduler import Scheduler
    from tilefm.jobs.store import JobStore
    from tilefm.settings import get_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # a long-lived process whose jobs' tile outputs (tens of MiB a batch) come and go: their
    # memory goes back when they are stitched, as in the tiler (tilefm.engine.memory)
    release_large_arrays()
    s = get_settings()
    if metrics_port:
        start_http_server(metrics_port, addr=metrics_host)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    store = JobStore.from_url(s.redis_url, prefix=s.redis_prefix)
    Scheduler(store, s, max_jobs=max_jobs or s.scheduler_max_jobs, lease_s=s.job_lease_s).run(stop)


@app.command()
def serve(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8080,
    grpc_port: Annotated[int, typer.Option(help="gRPC JobService port (0: none).")] = 50051,
    workers: Annotated[int, typer.Option()] = 1,
) -> None:
    """Serve the job API (HTTP, and gRPC on its own port)."""
    import signal

    import uvicorn

    from tilefm.api.grpc_service import serve_background, stop_server

    # this process owns the gRPC server for as long as uvicorn runs: with --workers N the HTTP
    # workers are child processes, and only this one listens on the gRPC port
    grpc_server = serve_background(f"{host}:{grpc_port}") if grpc_port else None
    # uvicorn re-raises the signal that stopped it once HTTP is down; with the default SIGTERM
    # action the process would end right there, before the gRPC server is stopped below
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    try:
        uvicorn.run(
            "tilefm.api.jobs:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level="info",
        )
    finally:
        if grpc_server is not None:
            stop_server(grpc_server)


@app.command()
def up(
    port: Annotated[int, typer.Option(help="Job API port.")] = 8080,
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 50051,
    tiler_port: Annotated[int, typer.Option(help="Tile server (and viewer) port.")] = 8081,
) -> None:
    """Start the local stack: Redis, SeaweedFS (S3), the scheduler on local Ray, the job API and the
    tile server (viewer at http://127.0.0.1:8081/viewer)."""
    from tilefm.localstack import up as run_up
    from tilefm.settings import get_settings

    s = get_settings()
    raise typer.Exit(
        run_up(port, grpc_port, tiler_port=tiler_port, redis_url=s.redis_url, models=s.model_store)
    )


@app.command(
    epilog="Example:\n\n  tilefm view demo-output/clouds.tif demo-output/presto.tif",
)
def view(
    files: Annotated[
        list[str],
        typer.Argument(
            metavar="PATH_OR_URI...", help="COGs written by `tilefm run`: paths, file:// or s3:// URIs."
        ),
    ],
    host: Annotated[
        str, typer.Option(help="Address to listen on; anything but a loopback one shares the files.")
    ] = "127.0.0.1",
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Port (default: 8090 if free, else any free one).")
    ] = None,
    no_browser: Annotated[
        bool, typer.Option("--no-browser", help="Only print the URL; do not open a browser.")
    ] = False,
) -> None:
    """Show COG outputs on a map in the viewer (class maps with their legend, embeddings as PCA
    colours or a similarity map), served on 127.0.0.1 until interrupted."""
    from tilefm.api import view as viewing
    from tilefm.settings import get_settings

    try:
        viewer_dir = viewing.check_viewer()
        outputs = viewing.open_files(files, get_settings())
        sock = viewing.bind(host, port)
    except TileFMError as e:
        fail(e)
    app = viewing.create_view_app(
        outputs, get_settings(), viewer_dir, loopback_only=viewing.is_loopback_address(host)
    )
    viewing.warm(app, outputs)
    url = viewing.url_of(sock)
    for out in outputs:
        typer.echo(f"{out.uri}: {out.model} ({out.kind}, {out.count} band{'s' * (out.count != 1)})")
    typer.echo(f"tilefm view: {url}  (Ctrl-C to stop)")
    sys.stdout.flush()
    if not no_browser and viewing.can_open_browser():
        import webbrowser

        webbrowser.open(url)
    viewing.serve(app, sock)


@app.command("keys")
def keys_hash(key: str) -> None:
    """Print the TILEFM_API_KEYS entry (a sha256) for KEY; only the hash goes in settings."""
    from tilefm.api.auth import hash_key

    typer.echo(json.dumps({"name": "my-key", "sha256": hash_key(key), "scopes": ["jobs:read", "jobs:write"]}))
