"""`tilefm`: run a model over a scene, and manage models.

Errors a user can fix print one line (`tilefm: error: FIELD: what is wrong`) and exit with 2.
"""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path
from typing import Annotated, Optional

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
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
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
    scene: Annotated[list[str], typer.Option("--scene", help="MODALITY=SOURCE (band folder, raster, or STAC item); repeatable.")],
    model: Annotated[str, typer.Option(help="Model name (see `tilefm models list`).")],
    out: Annotated[str, typer.Option(help="Output COG URI: file:///path.tif, s3://bucket/key.tif or a local path.")],
    zoom: Annotated[Optional[int], typer.Option(help="Web-mercator zoom; default matches the scene's native resolution.")] = None,
    bbox: Annotated[Optional[str], typer.Option(help="minlon,minlat,maxlon,maxlat (WGS84) to process only part of the scene.")] = None,
    backend: Annotated[str, typer.Option(help="auto, torch or onnxruntime.")] = "auto",
    dtype: Annotated[Optional[str], typer.Option(help="Embedding storage: float16 (default), float32 or int8 (scale/offset recorded).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=256, help="Tiles per batch sent to an encoder.")] = 4,
    executor: Annotated[str, typer.Option(help="ray (local cluster or TILEFM_RAY_ADDRESS) or local (in-process).")] = "ray",
    asset: Annotated[list[str], typer.Option(help="STAC asset KEY=PATH, to read an item's assets from local files; repeatable.")] = [],  # noqa: B006
    scene_date: Annotated[Optional[str], typer.Option("--date", help="Scene date YYYY-MM-DD when the source has none.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the tile plan; read and write nothing.")] = False,
) -> None:
    """Run MODEL over a scene and write a Cloud-Optimized GeoTIFF (+ a STAC item beside it)."""
    from tilefm.grid import parse_bbox
    from tilefm.pipeline import RunSpec, execute, prepare
    from tilefm.scene import parse_scene_arg

    try:
        scenes = dict(parse_scene_arg(s) for s in scene)
        if executor not in ("ray", "local"):
            raise TileFMError(f"unknown executor {executor!r} (ray or local)", field="executor")
        if dtype not in (None, "float16", "float32", "int8"):
            raise TileFMError(f"unknown dtype {dtype!r} (float16, float32 or int8)", field="dtype")
        try:
            d = date.fromisoformat(scene_date) if scene_date else None
        except ValueError:
            raise TileFMError(f"expected YYYY-MM-DD, got {scene_date!r}", field="date") from None
        spec = RunSpec(
            scene=scenes, model=model, out=out, zoom=zoom, bbox=parse_bbox(bbox) if bbox else None,
            backend=backend, dtype=dtype, batch_size=batch_size, executor=executor,
            asset_map=_pairs(asset, "asset"), date=d,
        )
        prep = prepare(spec)
    except TileFMError as e:
        fail(e)
    summary = prep.summary()
    if dry_run:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(
        f"{summary['model']} on {summary['backend']}: {summary['tiles']} tiles at zoom {summary['zoom']} "
        f"({summary['pixel_size_m']} m pixels) -> {out}",
        err=True,
    )
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("tiles"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("tiles", total=summary["tiles"])
        try:
            result = execute(prep, progress=lambda done, total: bar.update(task, completed=done))
        except TileFMError as e:
            fail(e)
    typer.echo(
        f"wrote {result.out} ({result.tiles} tiles, {result.seconds:.1f} s) and {result.stac_item}",
        err=True,
    )


@models_app.command("list")
def models_list(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """List the models tilefm knows and whether their weights are in the store."""
    from tilefm.models import list_cards
    from tilefm.models.store import weights_path
    from tilefm.settings import get_settings

    rows = []
    for card in list_cards():
        try:
            weights_path(card, get_settings().model_store, verify=False)
            have = "yes"
        except TileFMError:
            have = "no"
        rows.append({
            "name": card.name, "architecture": card.architecture, "output": f"{card.output.kind}[{card.output.channels}]",
            "inputs": ",".join(i.modality for i in card.inputs), "backends": ",".join(card.backends), "weights": have,
            "title": card.title,
        })
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
    url: Annotated[Optional[str], typer.Option(help="Fetch from here instead of the card's official source.")] = None,
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


@models_app.command("verify")
def models_verify(
    name: str,
    reference: Annotated[Path, typer.Option(help="Reference .npz (layout of shared/reference/presto).")],
    tolerance: Annotated[Optional[float], typer.Option(help="Override the card's tolerance.")] = None,
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
