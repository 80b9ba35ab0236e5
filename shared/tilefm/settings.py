"""Settings from the environment (prefix `TILEFM_`), shared by the CLI and every service."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TILEFM_", env_file=".env", extra="ignore")

    #: where model weights live (a folder per model, as `tilefm models pull` writes it)
    model_store: Path = Field(default=Path("~/.cache/tilefm/models").expanduser())
    #: scratch space for tiles and mosaics before upload; outputs are never built in place
    work_dir: Path | None = None

    #: S3-compatible object store; empty endpoint means AWS itself
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    #: part size for multipart uploads, bytes
    s3_multipart_chunksize: int = 16 * 1024 * 1024

    #: Ray cluster address; empty starts a local one
    ray_address: str | None = None
    #: CPUs a local Ray cluster may use (default: all)
    ray_num_cpus: int | None = None
    #: GPUs a local Ray cluster declares (default: those Ray detects)
    ray_num_gpus: int | None = Field(None, ge=0)
    #: Ray CPU reservations: an encoder actor and a reader task. Fractions, so that several
    #: models' encoder actors and the readers feeding them fit on a small node together
    #: (whole CPUs per actor deadlock a 2-CPU node once two models are loaded).
    encoder_num_cpus: float = 0.5
    reader_num_cpus: float = 0.5
    #: GPUs each encoder actor reserves: unset = 1 where the cluster has GPUs now and the model
    #: can run on one (one actor per GPU); a number = always (an autoscaled GPU group starts
    #: nodes for them; the chart sets it); 0 = encoders never take a GPU
    encoder_num_gpus: float | None = Field(None, ge=0)
    #: Ray custom resources each encoder actor reserves, as JSON ({"encoder": 1}): the actors go
    #: only to nodes that declare them (`ray start --resources`), reader tasks anywhere. Empty
    #: = no such constraint
    encoder_resources: dict[str, float] = Field(default_factory=dict)
    #: how long encoder actors may take to be placed and load their model before the run fails
    encoder_start_timeout_s: float = Field(900.0, gt=0)
    #: encoder actors per model; 0 = one per `encoder_num_gpus` GPUs of the cluster, or one
    encoder_replicas: int = Field(0, ge=0)
    #: batches outstanding per encoder actor; 0 = 2 on CPUs, and on GPUs enough for every
    #: reader slot of the cluster to hold one (the GPU must not wait for a read)
    encoder_in_flight: int = Field(0, ge=0)
    #: how tile reads resample: `auto` = tilefm's own sampler where it computes what GDAL's
    #: 4-sample kernels do (bilinear / nearest, no downsampling; ~10x faster) and GDAL's warper
    #: elsewhere; `gdal` = GDAL's warper for every read
    warp: Literal["auto", "gdal"] = "auto"
    #: readers of the local executor (`tilefm run --executor local`); 0 = on a GPU host three
    #: quarters of the CPUs, elsewhere min(4, CPUs) (`runtime.local_threads`)
    local_readers: int = Field(0, ge=0, le=256)
    #: what those readers are: `process` (each its own GIL; batches handed over in shared
    #: memory), `thread`, or `auto` = processes where the model runs on a GPU
    local_reader_kind: Literal["auto", "thread", "process"] = "auto"
    #: threads that compress a float output's COG blocks while the tiles stream; 0 = min(4,
    #: CPUs), or 3/8 of the CPUs where a local run's model is on a GPU (`runtime.local_threads`)
    cog_threads: int = Field(0, ge=0, le=256)

    #: model precision on GPU backends: auto (bf16/fp16 where the card allows), fp32, fp16, bf16
    precision: str = "auto"
    #: largest batch an encoder worker runs: TensorRT's optimisation profile and the CUDA graphs'
    #: fixed shape (smaller batches are padded to it); 0 = on a GPU what its free memory holds
    #: (measured at load, up to `batch_cap`, and also the run's tiles per batch), 8 on a CPU
    max_batch: int = Field(0, ge=0)
    batch_cap: int = Field(64, ge=1, le=1024)
    #: torch-cuda: torch.compile the model (slow first batch, faster after) and replay CUDA graphs
    torch_compile: bool = False
    cuda_graphs: bool = True
    #: where TensorRT engines are cached (file path or s3:// prefix), shared by all workers
    engine_cache: str = str(Path("~/.cache/tilefm/engines").expanduser())

    redis_url: str = "redis://127.0.0.1:6379/0"
    #: whether the job API's /readyz fails (503) when that Redis says it keeps no append-only
    #: file: jobs accepted there are lost if it restarts. Off for local use against a machine's
    #: own Redis (readiness still names the persistence and warns); deployments switch it on.
    #: A Redis that does not say (INFO switched off) passes with a warning.
    require_durable_redis: bool = False

    #: the largest plan a single run accepts
    max_tiles: int = 20000

    #: API keys as JSON:
    #: [{"name": "ci", "sha256": "<hex of the key>", "scopes": ["jobs:read", "jobs:write"]}].
    #: Only hashes are kept; `tilefm keys hash KEY` prints one.
    api_keys: list[dict] = Field(default_factory=list)
    #: no authentication at all (local use only; logged loudly at start)
    auth_disabled: bool = False
    #: CORS origins allowed to call the APIs from a browser
    cors_origins: list[str] = Field(default_factory=list)

    #: where submitted jobs may read scenes from and write outputs to (path or URI prefixes);
    #: empty = anywhere. A service open to others should always set both.
    allowed_sources: list[str] = Field(default_factory=list)
    allowed_outputs: list[str] = Field(default_factory=list)

    #: key prefix of the job store in Redis
    redis_prefix: str = "tilefm:"
    #: seconds a scheduler's claim on a job lasts without renewal (a dead scheduler's jobs are
    #: re-queued after this)
    job_lease_s: float = 30.0
    #: jobs one scheduler runs at once (their batches share the encoder actors round-robin)
    scheduler_max_jobs: int = 4

    #: storage the tiler's generic COG endpoints (/cog/...) may read, as path or URI prefixes;
    #: empty = the job outputs' locations (allowed_outputs); both empty = /cog is switched off
    tiler_prefixes: list[str] = Field(default_factory=list)
    #: memory for rendered tiles kept by each tiler process, MiB
    tiler_cache_mb: int = 256
    #: whether the tiler lists finished jobs (GET /v1/jobs), for the viewer; job ids are
    #: unguessable, so switching this off leaves outputs reachable only by those who know an id
    tiler_list_jobs: bool = True
    #: threads a tiler process renders tiles on at once (0 = anyio's default of 40). A tile costs
    #: ~1-2 ms of CPU: a few threads keep the cores busy, many only contend for the GIL and
    #: stretch the latency tail
    tiler_threads: int = 4
    #: the tiler's caps on one request, each refused with a 422 naming the parameter: band
    #: numbers a request may name (`bands=`, and on /cog `bidx=` or the bands of `expression=`)
    tiler_max_bands: int = Field(32, ge=1, le=4096)
    #: /cog tile size in pixels (`tilesize=`, with `buffer=` and `padding=` added)
    tiler_max_tilesize: int = Field(1024, ge=256, le=4096)
    #: longest side of a preview or a /cog image, pixels (`max_size=`, `width=`, `height=`)
    tiler_max_preview_px: int = Field(1024, ge=64, le=8192)
    #: longest side statistics are computed at, pixels (`max_size=` of the statistics routes)
    tiler_max_statistics_px: int = Field(1024, ge=64, le=8192)
    #: values one request may read at once, MiB of float32 (bands x pixels x 4): the many-band
    #: embeddings need it beside the caps above (128 bands of a 1024-px preview are 512 MiB)
    tiler_max_read_mb: int = Field(32, ge=1, le=16384)
    #: GDAL's block cache of a tiler process, MiB, where GDAL_CACHEMAX is not set (GDAL's own
    #: default is 5 % of the machine's memory)
    tiler_gdal_cache_mb: int = Field(128, ge=0)
    #: API keys (`api_keys`, scope jobs:read) on every data route of the tiler; off keeps the
    #: viewer usable locally without keys. TILEFM_AUTH_DISABLED does not switch this off
    tiler_auth: bool = False
    #: the tiler's URL as clients reach it (https://tiles.example.org, or with a path prefix):
    #: TileJSON and WMTS name tiles from it. Unset: from the request only where it came in on
    #: a loopback host, else as root-relative paths (never from another Host header)
    tiler_public_url: str | None = None
    #: threads per job-API process for its blocking handlers (validation, Redis); the same GIL
    #: argument: a submission is ~1 ms of CPU and one Redis round trip
    api_threads: int = 8
    #: largest request the job API reads, bytes (HTTP bodies: 413 above it; gRPC messages:
    #: RESOURCE_EXHAUSTED); a job spec is a few hundred bytes
    api_max_body_bytes: int = Field(1024 * 1024, ge=1024)


@lru_cache
def get_settings() -> Settings:
    return Settings()
