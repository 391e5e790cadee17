"""The Helm chart (packaging/helm/pycluster): `helm lint`, and `helm template` output validated
like the plain manifests and wired to what pycluster reads."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_util import (
    PACKAGING,
    check_wiring,
    helm_binary,
    load_docs,
    one,
    validate_objects,
)

from pycluster.testing.pytest_plugin import require

CHART = PACKAGING / "helm" / "pycluster"
OPERATOR = ["--api-versions", "monitoring.coreos.com/v1"]


@pytest.fixture(scope="module")
def helm() -> str:
    path, reason = helm_binary()
    require("helm", path is not None, reason)
    assert path is not None
    return path


def _helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120,
                          check=False)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _render(helm: str, *args: str) -> list[dict[str, object]]:
    return load_docs([_helm(helm, "template", "rel", str(CHART), *args).stdout])


@pytest.mark.timeout(60)
def test_default_values_match_the_values_schema() -> None:
    """Runs without helm: the chart's own schema accepts its defaults and refuses bad values."""
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(values, schema)
    for path, bad in ((("config", "stream_replicas"), 2), (("nats", "url"), "http://x:4222"),
                      (("replicaCount",), 0), (("config", "node_id"), "fixed")):
        broken = json.loads(json.dumps(values))
        where = broken
        for key in path[:-1]:
            where = where[key]
        where[path[-1]] = bad
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "pycluster"


@pytest.mark.timeout(120)
def test_helm_lint_is_clean(helm: str) -> None:
    out = _helm(helm, "lint", "--strict", str(CHART)).stdout
    assert "0 chart(s) failed" in out


@pytest.mark.timeout(120)
def test_rendered_objects_validate_and_match_what_pycluster_reads(
        helm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _render(helm, *OPERATOR)
    manifests = load_docs(p.read_text() for p in (PACKAGING / "kubernetes").glob("*.yaml")
                          if p.name != "kustomization.yaml")
    assert sorted(str(d["kind"]) for d in docs) == sorted(str(d["kind"]) for d in manifests)
    validate_objects(docs)  # type: ignore[arg-type]
    settings = check_wiring(docs, tmp_path, monkeypatch)  # type: ignore[arg-type]
    assert settings.stream_replicas == 3
    assert settings.nats_url == ["nats://nats:4222"]


@pytest.mark.timeout(120)
def test_values_move_ports_secrets_and_replicas_together(
        helm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _render(helm, *OPERATOR, "--set", "healthPort=8181", "--set", "metricsPort=9191",
                   "--set", "replicaCount=5", "--set", "config.name=prod",
                   "--set", "config.stream_replicas=5",
                   "--set", "nats.url=nats://a:4222\\,nats://b:4222",
                   "--set", "nats.creds=-----BEGIN NATS USER JWT-----")
    validate_objects(docs)  # type: ignore[arg-type]
    settings = check_wiring(docs, tmp_path, monkeypatch)  # type: ignore[arg-type]
    assert settings.name == "prod" and settings.stream_replicas == 5
    assert settings.nats_url == ["nats://a:4222", "nats://b:4222"]
    assert settings.health_addr == "0.0.0.0:8181"
    sts = one(docs, "StatefulSet")  # type: ignore[arg-type]
    assert sts["spec"]["replicas"] == 5
    container = sts["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["PYCLUSTER_NATS_CREDS"]["value"] == "/etc/pycluster/nats/nats.creds"
    assert "/etc/pycluster/nats" in {m["mountPath"] for m in container["volumeMounts"]}
    assert "PYCLUSTER_NATS_CREDS" not in {e["name"] for e in one(
        _render(helm), "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["env"]}  # type: ignore[index]
    assert "nats.creds" in one(docs, "Secret")["data"]  # type: ignore[arg-type, operator]


@pytest.mark.timeout(120)
def test_without_the_operator_or_with_an_existing_secret(helm: str) -> None:
    docs = _render(helm, "--set", "nats.existingSecret=my-nats",
                   "--set", "persistence.enabled=false",
                   "--set", "podDisruptionBudget.enabled=false")
    kinds = sorted(str(d["kind"]) for d in docs)
    assert kinds == ["ConfigMap", "Service", "StatefulSet"]  # no Secret, PDB, ServiceMonitor
    validate_objects(docs)  # type: ignore[arg-type]
    sts = one(docs, "StatefulSet")  # type: ignore[arg-type]
    spec = sts["spec"]
    assert "volumeClaimTemplates" not in spec
    env = {e["name"]: e for e in spec["template"]["spec"]["containers"][0]["env"]}
    assert env["PYCLUSTER_NATS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "my-nats"
    assert "PYCLUSTER_NATS_CREDS" not in env


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bad", ["config.stream_replicas=2", "nats.url=http://x:4222",
                                 "replicaCount=0", "config.node_id=fixed"])
def test_the_values_schema_refuses_bad_values(helm: str, bad: str) -> None:
    proc = _helm(helm, "template", "rel", str(CHART), "--set", bad, check=False)
    assert proc.returncode != 0
    assert "schema" in proc.stderr.lower() or "values don't meet" in proc.stderr.lower()


def _normalised(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` without what only Helm adds (its labels, the config checksum), with a Secret's
    values decoded and a ConfigMap's config file parsed (key order and comments do not count)."""
    doc = json.loads(json.dumps(doc))
    for meta in (doc["metadata"], doc.get("spec", {}).get("template", {}).get("metadata", {}),
                 *[t["metadata"] for t in doc.get("spec", {}).get("volumeClaimTemplates", [])]):
        for key in ("helm.sh/chart", "app.kubernetes.io/version", "app.kubernetes.io/managed-by"):
            meta.get("labels", {}).pop(key, None)
        meta.pop("annotations", None)
    if doc["kind"] == "Secret":
        data = {k: base64.b64decode(v).decode() for k, v in doc.pop("data", {}).items()}
        doc["stringData"] = data | doc.get("stringData", {})
    if doc["kind"] == "ConfigMap":
        doc["data"] = {k: yaml.safe_load(v) for k, v in doc["data"].items()}
    return doc


@pytest.mark.timeout(120)
def test_the_plain_manifests_are_what_the_chart_renders(helm: str) -> None:
    """The manifests and the chart stay one design: rendered as release "pycluster" with the
    manifests' platform name and NATS URL, the chart gives the same objects (Helm's own labels
    and the checksum annotation aside)."""
    manifests = load_docs(p.read_text() for p in (PACKAGING / "kubernetes").glob("*.yaml")
                          if p.name != "kustomization.yaml")
    url = str(one(manifests, "Secret")["stringData"]["url"])  # type: ignore[index]
    rendered = load_docs([_helm(helm, "template", "pycluster", str(CHART), *OPERATOR,
                                "--set", "config.name=prod",
                                "--set", "nats.url=" + url.replace(",", "\\,")).stdout])
    by_kind = {str(d["kind"]): _normalised(d) for d in rendered}  # type: ignore[arg-type]
    for doc in manifests:
        assert _normalised(doc) == by_kind[str(doc["kind"])], doc["kind"]  # type: ignore[arg-type]
