"""Shared checks of the deployment files: Kubernetes objects (from the manifests or rendered by
the Helm chart) validated against the Kubernetes schemas, and their wiring to what pycluster
really reads (the config file through the settings loader, the environment, the probe paths
and ports)."""

from __future__ import annotations

import base64
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
KUBE_VERSION = "1.30.0"  # the oldest Kubernetes the manifests claim to support (README)

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
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


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
    for name in list(__import__("os").environ):
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
