"""A real multi-node Ray cluster on the local host, for the tests: a head and worker nodes, each its
own `ray start` with its own ports and temp dir, all bound to 127.0.0.1.

Ray (2.5x and later) switches token authentication on by default for clusters it starts: a node
that joins, a driver and a Ray Client connection all have to present the cluster's token. The
cluster here generates its own token and hands it to every process it starts (and to the
processes the tests start: `env`) through RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, so nothing is
read from or written to ~/.ray, and other Ray clusters on the machine are not touched.

Teardown kills this cluster's processes by pid (those whose command line names its temp dirs,
and their children): `ray stop` would stop every Ray process of the machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path


def _procs() -> dict[int, tuple[int, list[str]]]:
    """{pid: (parent pid, command line)} of the machine's processes, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        found[int(entry.name)] = (ppid, cmdline)
    return found


def descendants(pid: int, procs: dict[int, tuple[int, list[str]]] | None = None) -> list[int]:
    procs = procs if procs is not None else _procs()
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, (ppid, _) in procs.items() if ppid == parent]
        out += kids
        todo += kids
    return out


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 now (held open together, so that none repeats)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@dataclass
class RayNode:
    name: str
    temp_dir: Path
    node_manager_port: int
    resources: dict[str, float] = field(default_factory=dict)

    def raylet(self) -> int:
        """The pid of the node's raylet (found by its node manager port, this node's alone)."""
        for pid, (_, cmd) in _procs().items():
            if (
                cmd
                and Path(cmd[0]).name == "raylet"
                and f"--node_manager_port={self.node_manager_port}" in cmd
            ):
                return pid
        raise LookupError(f"no raylet for node {self.name} (port {self.node_manager_port})")


class RayCluster:
    """`ray start --head`, then `add_node` for each further node. `address` is the GCS address
    a driver joins with; `client_address` the Ray Client server's (ray://)."""

    def __init__(self, root: Path | None = None, *, head_cpus: int = 1, object_store_mb: int = 200):
        # short: Ray's Unix sockets live under the temp dir, and their paths are limited to 107 bytes
        self.root = Path(tempfile.mkdtemp(prefix="tfray-", dir=root or "/tmp"))
        self.token = secrets.token_hex(32)
        self.object_store_mb = object_store_mb
        self.nodes: list[RayNode] = []
        self.gcs_port, self.client_port = free_ports(2)
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.client_address = f"ray://127.0.0.1:{self.client_port}"
        try:
            self._start(
                "head",
                head_cpus,
                {},
                [
                    "--head",
                    f"--port={self.gcs_port}",
                    f"--ray-client-server-port={self.client_port}",
                    "--include-dashboard=false",
                ],
            )
        except BaseException:
            self.shutdown()
            raise

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to join this cluster (as a driver or a Ray Client)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0"}

    def add_node(self, name: str, num_cpus: int = 1, resources: dict[str, float] | None = None) -> RayNode:
        return self._start(name, num_cpus, resources or {}, [f"--address={self.address}"])

    def _start(self, name: str, num_cpus: int, resources: dict[str, float], args: list[str]) -> RayNode:
        import json

        temp_dir = self.root / name
        temp_dir.mkdir()
        nm, om, agent_http, agent_grpc, runtime_env, metrics = free_ports(6)
        node = RayNode(name, temp_dir, nm, resources)
        cmd = [
            RAY,
            "start",
            *args,
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps(resources)}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
            f"--node-manager-port={nm}",
            f"--object-manager-port={om}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}",
            # each node its own worker ports: two raylets on one host must not hand out the same
            f"--worker-port-list={','.join(map(str, free_ports(16)))}",
        ]
        env = {
            **os.environ,
            **self.env,
            # a killed node is noticed in ~3 s instead of Ray's ~30 s (the tests kill one)
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        }
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if out.returncode != 0:
            raise RuntimeError(
                f"`ray start` of node {name} failed "
                f"({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
            )
        self.nodes.append(node)
        deadline = time.monotonic() + 60
        while True:  # its raylet has registered with the GCS by the time `ray start` returns
            try:
                node.raylet()
                return node
            except LookupError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def alive_nodes(self) -> list[dict]:
        """`ray.nodes()` as seen from a fresh driver process (this process stays out of Ray)."""
        import json

        code = (
            "import json, ray; ray.init(address=%r, logging_level='ERROR'); print(json.dumps([n for n in "
            "ray.nodes() if n['Alive']]))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code % self.address],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        return json.loads(out.stdout.strip().splitlines()[-1])

    def processes(self) -> list[int]:
        """This cluster's processes: those whose command line names its temp dirs, and their children."""
        root, procs = str(self.root), _procs()
        found = {
            pid for pid, (_, cmd) in procs.items() if any(root in part for part in cmd) and pid != os.getpid()
        }
        for pid in list(found):
            found.update(descendants(pid, procs))
        return sorted(found)

    def shutdown(self) -> None:
        pids = self.processes()
        _signal(pids, signal.SIGTERM)
        _signal(_wait_gone(pids, 5), signal.SIGKILL)
        _wait_gone(pids, 10)
        shutil.rmtree(self.root, ignore_errors=True)
