"""The Kubernetes manifests (packaging/kubernetes): valid objects, wired to what pycluster
reads, and a node run with exactly the pod's config and environment serves the probes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from deploy_util import (
    PACKAGING,
    check_wiring,
    config_file,
    load_docs,
    one,
    pod_environment,
    unknown_env_names,
    validate_objects,
)

from pycluster.testing import NatsCluster, free_port

KUBE = PACKAGING / "kubernetes"


def _manifests() -> list[Path]:
    return sorted(p for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")


def _docs() -> list[dict[str, object]]:
    return load_docs(p.read_text() for p in _manifests())


@pytest.mark.timeout(60)
def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    docs = _docs()
    kinds = sorted(str(d["kind"]) for d in docs)
    assert kinds == ["ConfigMap", "PodDisruptionBudget", "Secret", "Service", "ServiceMonitor",
                     "StatefulSet"]
    validate_objects(docs)
    assert one(docs, "StatefulSet")["spec"]["replicas"] == 3  # type: ignore[index]


@pytest.mark.timeout(30)
def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in _manifests())


@pytest.mark.timeout(30)
def test_a_misspelt_field_is_refused() -> None:
    import jsonschema
    import kubernetes_validate

    docs = _docs()
    sts = one(docs, "StatefulSet")
    sts["spec"]["replica"] = 3  # type: ignore[index]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_objects([sts])
    sm = one(docs, "ServiceMonitor")
    sm["spec"]["endpoints"][0]["intervall"] = "30s"  # type: ignore[index]
    with pytest.raises(jsonschema.ValidationError):
        validate_objects([sm])


@pytest.mark.timeout(30)
def test_config_env_probes_and_ports_match_what_pycluster_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = check_wiring(_docs(), tmp_path, monkeypatch)  # type: ignore[arg-type]
    assert settings.stream_replicas == 3


@pytest.mark.timeout(30)
def test_every_pycluster_variable_named_in_packaging_exists() -> None:
    unknown = {}
    for path in PACKAGING.rglob("*"):
        if path.is_file() and path.suffix in ("", ".yaml", ".yml", ".sh", ".j2", ".tpl", ".md",
                                              ".example", ".service", ".txt"):
            names = unknown_env_names(path.read_text())
            if names:
                unknown[str(path.relative_to(PACKAGING))] = sorted(names)
    assert not unknown


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def wait_status(url: str, want: int, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    """Poll ``url`` until it answers ``want`` (the node process must stay alive)."""
    deadline = time.monotonic() + timeout
    last = 0
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the node exited with {proc.returncode}"
        last = _get(url)
        if last == want:
            return
        time.sleep(0.3)
    raise AssertionError(f"{url} answered {last}, not {want}, for {timeout}s")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_node_with_the_pods_config_serves_the_probe_paths(
        tmp_path: Path, nats_cluster: NatsCluster) -> None:
    """`pycluster run` with the ConfigMap's file and the pod's environment (R3 streams on a
    3-server NATS cluster, as the ConfigMap asks): /health, /ready and /metrics answer 200.

    Only the addresses differ from the pod: the NATS URLs are the test cluster's, and the HTTP
    ports are free loopback ports (the fixed ports may be taken on a shared machine)."""
    docs = _docs()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("PYCLUSTER_")}
    env.update(pod_environment(docs, "pycluster-0"))  # type: ignore[arg-type]
    health, metrics = free_port("127.0.0.1"), free_port("127.0.0.1")
    env.update(PYCLUSTER_NATS_URL=",".join(nats_cluster.urls),
               PYCLUSTER_DATA_DIR=str(tmp_path / "data"),
               PYCLUSTER_HEALTH_ADDR=f"127.0.0.1:{health}",
               PYCLUSTER_METRICS_ADDR=f"127.0.0.1:{metrics}")
    cfg = config_file(docs, tmp_path)  # type: ignore[arg-type]
    exe = Path(sys.executable).with_name("pycluster")
    log = tmp_path / "node.log"
    with log.open("w") as err:
        proc = subprocess.Popen([str(exe), "run", "--config", str(cfg)], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_status(f"http://127.0.0.1:{health}/health", 200, 60, proc)
        wait_status(f"http://127.0.0.1:{health}/ready", 200, 60, proc)
        wait_status(f"http://127.0.0.1:{metrics}/metrics", 200, 10, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-3000:]
