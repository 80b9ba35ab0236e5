"""A whole run: scene -> tile plan -> read -> encode -> stitch -> COG + STAC item -> storage.

Everything that can be checked is checked before the first tile is read (scene, model, backend,
weights, zoom, bbox, output URI), and nothing is written to the output URI until the COG is
complete and valid: a failed run leaves the destination as it was.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Any

from tilefm.backends import GPU_BACKENDS, check_precision, resolve_precision, select_backend
from tilefm.card import ModelCard
from tilefm.engine import stac
from tilefm.engine.fidelity import InputGrid, input_grid
from tilefm.engine.runtime import LocalExecutor, WorkerSpec, local_threads, make_executor
from tilefm.engine.stitch import MosaicWriter, output_tags
from tilefm.errors import SceneError, StorageError
from tilefm.grid import Tile, TilePlan, plan_tiles
from tilefm.io.bands import bind_card
from tilefm.io.native import NATIVE_BATCH
from tilefm.io.read import check_scene, scene_bands
from tilefm.io.scene import Scene, open_scene, with_bands
from tilefm.models import get_card
from tilefm.models.store import weights_path
from tilefm.settings import Settings, get_settings
from tilefm.storage import gdal_env, storage_for
from tilefm.values import Encoding, TileOutput

log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".tif", ".tiff")
#: tiles per batch when neither the run nor the encoders say
DEFAULT_BATCH = 4


def default_batch(card: ModelCard) -> int:
    """Tiles per batch where neither the run nor the encoders' device says: larger on the scene's
    own grid, where a batch's tiles share their windows (`tilefm.io.native.NATIVE_BATCH`)."""
    return NATIVE_BATCH if card.context.native else DEFAULT_BATCH


@dataclass
class RunSpec:
    #: modality -> source, or its sources (a time series: `tilefm.io.scene.open_scene`)
    scene: dict[str, str | list[str]]
    model: str
    out: str
    zoom: int | None = None
    bbox: tuple[float, float, float, float] | None = None
    backend: str = "auto"
    #: model precision (auto, fp32, fp16, bf16, int8); None: TILEFM_PRECISION
    precision: str | None = None
    dtype: str | None = None
    #: tiles per batch; None: what the encoders' device takes (GPU memory), else DEFAULT_BATCH
    batch_size: int | None = None
    executor: str = "ray"
    asset_map: dict[str, str] = field(default_factory=dict)
    date: date | None = None
    #: refuse a run whose inputs would be resampled further than the card allows
    strict: bool = False
    #: bands given on their own, `[MODALITY:]NAME=FILE[:SCALE:OFFSET]` (`tilefm.io.scene.with_bands`)
    bands: list[str] = field(default_factory=list)


@dataclass
class Prepared:
    """A validated run, ready to execute (also what a dry run prints)."""

    spec: RunSpec
    scene: Scene
    card: ModelCard
    plan: TilePlan
    backend: str
    #: None for a card without a checkpoint (seeded init, throughput work only)
    weights: Path | None
    #: resolved for `backend` where this host resolved it; `auto` or as asked where GPU
    #: encoder actors resolve it on their own hosts
    precision: str = "auto"
    #: the grid the model sees and why the zoom is what it is (`tilefm.engine.fidelity`)
    grid: InputGrid | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.card.name,
            "backend": self.backend,
            "precision": self.precision,
            "out": self.spec.out,
            **self.plan.summary(),
            **(self.grid.as_dict() if self.grid else {}),
            **({"timesteps": timesteps(self.scene)} if self.scene.series else {}),
        }


def timesteps(scene: Scene) -> list[str]:
    """The dates of a time series' timesteps, YYYY-MM-DD, in order."""
    return [d.isoformat() for d in scene.timesteps]


@dataclass
class RunResult:
    out: str
    stac_item: str
    tiles: int
    seconds: float
    plan: dict[str, Any]
    timings: dict[str, float]
    #: what ran: the backend (as the encoders resolved it) and the tiles per batch
    backend: str = ""
    batch_size: int = 0
    precision: str = ""
    #: who read the tiles: "2 reader processes", "Ray reader tasks"
    readers: str = ""


def stac_uri_for(out: str) -> str:
    stem = out.rsplit(".", 1)[0]
    return f"{stem}.stac.json"


def prepare(
    spec: RunSpec,
    settings: Settings | None = None,
    *,
    open_scene_fn: Callable[..., Scene] = open_scene,
    check_writable_fn: Callable[[str], None] | None = None,
    weights_fn: Callable[[ModelCard, Path], Path | None] = weights_path,
) -> Prepared:
    """Validate a run. A long-lived service passes cached `open_scene_fn` / `check_writable_fn` /
    `weights_fn` so that validating many similar submissions does not reopen every file each time."""
    settings = settings or get_settings()
    card = get_card(spec.model)
    if not spec.out.lower().endswith(OUTPUT_SUFFIXES):
        raise StorageError(f"output {spec.out!r} must name a GeoTIFF (.tif)")
    if spec.scene or not spec.bands:
        scene = open_scene_fn(spec.scene, asset_map=spec.asset_map, date_override=spec.date)
    else:  # every band given on its own
        scene = Scene({}, date_override=spec.date)
    if spec.bands:
        scene = with_bands(scene, spec.bands)
    scene = bind_card(scene, card)  # a card band the sensor lacks: its close equivalent, if any
    check_scene(scene, card)
    if card.architecture == "presto" and scene.date is None:
        raise SceneError(
            "the scene has no date (Presto needs the month): pass --date YYYY-MM-DD", field="date"
        )
    grid = input_grid(scene, card, spec.zoom, strict=spec.strict)
    plan = plan_tiles(scene.footprint, grid.zoom, bbox=spec.bbox, max_tiles=settings.max_tiles)
    remote = spec.executor == "ray" and bool(settings.ray_address)
    precision = spec.precision or settings.precision
    check_precision(card, precision)  # before the backend: GPU workers may resolve that later
    backend = select_backend(card, spec.backend, remote=remote, precision=precision)
    if backend != "auto" and not (remote and backend in GPU_BACKENDS):
        precision = resolve_precision(card, backend, precision)
    weights = weights_fn(card, settings.model_store)
    (check_writable_fn or storage_for(spec.out, settings).check_writable)(spec.out)
    return Prepared(
        spec=spec,
        scene=scene,
        card=card,
        plan=plan,
        backend=backend,
        weights=weights,
        precision=precision,
        grid=grid,
    )


def check_unclaimed(out: str, job_id: str, settings: Settings) -> None:
    """Raise `StorageError` if something already at `out` (the COG, or its STAC item) was not
    written by job `job_id`: a job replaces only its own output (a retry), never another's."""
    store = storage_for(out, settings)
    if store.exists(out):
        taken = out if _written_by(out, settings) != job_id else None
    else:
        taken = stac_uri_for(out) if store.exists(stac_uri_for(out)) else None
    if taken:
        raise StorageError(
            f"{taken} already exists and was not written by job {job_id}: refusing to replace it",
            field="output_prefix",
        )


def _written_by(cog: str, settings: Settings) -> str | None:
    """The job a COG's tags name (`TILEFM_JOB`), or None for any other file."""
    import rasterio

    try:
        with (
            rasterio.Env(**gdal_env(settings)),
            rasterio.open(storage_for(cog, settings).rasterio_path(cog)) as src,
        ):
            return src.tags().get("TILEFM_JOB")
    except rasterio.errors.RasterioIOError:
        return None


def batches(tiles: list[Tile], size: int) -> Iterator[list[Tile]]:
    for i in range(0, len(tiles), size):
        yield tiles[i : i + size]


def publish(
    prep: Prepared,
    encoding: Encoding,
    outputs: Iterable[TileOutput],
    out: str,
    settings: Settings,
    *,
    extra_tags: dict[str, Any] | None = None,
    proceed: Callable[[], bool] | None = None,
    timings: dict[str, float] | None = None,
    threads: int = 0,
    owner: str | None = None,
) -> str | None:
    """Stitch tile outputs (in any order) into a mosaic, make the COG and its STAC item, and put
    both at `out` — only when every tile arrived and the COG is valid, and `proceed()` (if given)
    still says so. Returns the STAC item's URI, or None when `proceed()` said no. `threads`: the
    mosaic's (0: TILEFM_COG_THREADS, or its default). `owner`: the job the output belongs to,
    which replaces only what it wrote itself (`check_unclaimed`, before the stitching and again
    just before the output is put); None (a user naming their own file): `out` is replaced."""
    card, plan = prep.card, prep.plan
    timings = timings if timings is not None else {}
    t0 = time.perf_counter()
    if owner is not None:
        check_unclaimed(out, owner, settings)
    with tempfile.TemporaryDirectory(prefix="tilefm-", dir=settings.work_dir) as tmp:
        mosaic = Path(tmp) / "mosaic.tif"
        stride = card.output_stride
        out_plan = plan.coarsen(stride.bit_length() - 1)
        extra = {
            "backend": prep.backend,
            "precision": prep.precision,
            **({"inference_grid": prep.grid.description} if prep.grid else {}),
            **({"tile_zoom": str(plan.zoom), "output_stride": str(stride)} if stride > 1 else {}),
            **({"timesteps": timesteps(prep.scene)} if prep.scene.series else {}),
            **(extra_tags or {}),
        }
        tags = output_tags(card, out_plan, prep.scene.describe(), encoding, extra)
        store = storage_for(out, settings)
        try:
            # the COG is made where the storage takes it from (local files: in place, its
            # full-resolution blocks written there during the stream; S3: they go up as parts
            # during the stream), put only when complete
            with store.writing(out, work_dir=tmp) as staged:
                cog = staged.path
                writer = MosaicWriter(
                    plan,
                    card,
                    mosaic,
                    encoding,
                    halo=card.context.halo,
                    tags=tags,
                    out_plan=out_plan,
                    threads=threads or settings.cog_threads,
                    cog_path=cog,
                    early=staged.early,
                )
                try:
                    for o in outputs:
                        writer.add(o)
                finally:
                    writer.close()
                if writer.missing:
                    raise RuntimeError(
                        f"{len(writer.missing)} tiles were not written: "
                        f"{', '.join(map(str, writer.missing[:10]))}"
                    )
                timings["tiles_s"] = time.perf_counter() - t0
                writer.finish(cog)
                staged.front = writer.front
                item = stac.output_item(cog, card, out_plan, prep.scene, out, encoding)
                timings["cog_s"] = time.perf_counter() - t0 - timings["tiles_s"]
                if proceed is not None and not proceed():
                    raise _Withdrawn
                if owner is not None:  # as late as it can be: the put is the block's exit
                    check_unclaimed(out, owner, settings)
                t1 = time.perf_counter()
        except _Withdrawn:
            return None
        stac_uri = stac_uri_for(out)
        store.write_bytes(stac_uri, stac.dumps(item))
        timings["upload_s"] = time.perf_counter() - t1
    return stac_uri


class _Withdrawn(Exception):
    """`proceed()` said no before the output was put: nothing is."""


def execute(
    prep: Prepared,
    settings: Settings | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RunResult:
    settings = settings or get_settings()
    spec, card, plan = prep.spec, prep.card, prep.plan
    t0 = time.perf_counter()
    worker = WorkerSpec(
        card=card, backend=prep.backend, weights=prep.weights, precision=prep.precision, out_dtype=spec.dtype
    )
    executor = make_executor(spec.executor, worker, settings, requested=spec.backend)
    try:
        executor.warm(prep.scene.modalities, scene_bands(prep.scene, card))
    except BaseException:
        executor.close()
        raise
    load_s = time.perf_counter() - t0
    if (executor.backend, executor.precision) != (
        prep.backend,
        prep.precision,
    ):  # GPU encoders picked their own (the output says which)
        prep = replace(prep, backend=executor.backend, precision=executor.precision)
    batch_size = spec.batch_size or executor.batch_size or default_batch(prep.card)

    def outputs() -> Iterator[TileOutput]:
        done = 0
        try:
            for batch in executor.map(prep.scene, batches(plan.tiles, batch_size)):
                yield from batch
                done += len(batch)
                if progress:
                    progress(done, len(plan.tiles))
        finally:
            executor.close()

    timings: dict[str, float] = {"load_s": load_s}
    on_gpu = (
        isinstance(executor, LocalExecutor) and executor.on_gpu
    )  # its readers and the stitcher share this host
    threads = settings.cog_threads or local_threads(on_gpu)[1]
    stac_uri = publish(
        prep,
        Encoding.for_card(card, spec.dtype),
        outputs(),
        spec.out,
        settings,
        timings=timings,
        threads=threads,
    )
    timings["total_s"] = time.perf_counter() - t0
    return RunResult(
        out=spec.out,
        stac_item=stac_uri or "",
        tiles=len(plan.tiles),
        seconds=timings["total_s"],
        plan=plan.summary(),
        timings=timings,
        backend=prep.backend,
        batch_size=batch_size,
        precision=prep.precision,
        readers=executor.readers_desc,
    )


def run(
    spec: RunSpec, settings: Settings | None = None, progress: Callable[[int, int], None] | None = None
) -> RunResult:
    return execute(prepare(spec, settings), settings, progress)
