"""The container packaging (packaging/docker): the image, the compose stack, Prometheus, Grafana.

The quick test checks the files against each other (compose, Prometheus, Grafana provisioning,
dashboard, Dockerfile). The slow ones build the image with podman from a locally made Python
base (no registry is reachable: ``BASE`` is a build argument), run the compose file with
``podman-compose`` (NATS x3 with R3 streams, three nodes, Prometheus) and check: the nodes are
up, healthy and non-root, exactly one leads, killing the leader's container fails over, the
image's HEALTHCHECK passes, Prometheus scrapes the nodes and evaluates every dashboard query,
and every metric the dashboard uses is exported by a real node.

Stand-ins for images that cannot be pulled: NATS runs from the pycluster image itself (it
ships nats-server) as root, like the official image; Prometheus is Debian's package in an image
built from the same base. Grafana is not run (it is not packaged by Debian): its dashboard and
provisioning files are checked structurally and against the real nodes' metrics.

Container names resolve through podman's netavark/aardvark-dns backend, which this test selects
for its own podman calls only (``CONTAINERS_CONF``): the machine's default stays as it is.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pycluster.testing.engines.podman import PodmanError, image_exists, podman, podman_available
from pycluster.testing.pytest_plugin import require
from pycluster.testing.wait import wait_for_sync

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "packaging" / "docker"
COMPOSE = DOCKER / "compose.yaml"
IMAGE = "localhost/pycluster-test-image:latest"
BUILDER_IMAGE = "localhost/pycluster-test-builder:latest"  # the builder stage, kept as cache
NATS_IMAGE = "localhost/pycluster-test-nats:latest"
PROMETHEUS_IMAGE = "localhost/pycluster-test-prometheus:latest"
NODES = ("node-1", "node-2", "node-3")
NATS = ("nats-1", "nats-2", "nats-3")
APP = "demo"
NETAVARK = (Path("/usr/lib/podman/netavark"), Path("/usr/lib/podman/aardvark-dns"))
# The containers.conf of this test's podman calls: the machine's settings plus netavark, whose
# aardvark-dns lets containers reach each other by service name.
CONTAINERS_CONF = """[containers]
default_ulimits = []
[network]
network_backend = "netavark"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""
METRIC = re.compile(r"\bpycluster_[a-z_]+\b")
# Grafana's built-in variables, as the dashboard's queries are sent to Prometheus.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "30m", "$app": ".*"}


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DOCKER / "grafana" / "dashboard.json").read_text())
    return data


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def _base_metric(name: str) -> str:
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


# -- the files agree with each other (quick) --------------------------------------------------


@pytest.mark.timeout(30)
def test_compose_prometheus_grafana_and_dockerfile_agree() -> None:
    compose = _yaml(COMPOSE)
    services = compose["services"]
    assert set(services) == {*NATS, *NODES, "prometheus", "grafana"}
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    routes = {f"nats://{n}:6222" for n in NATS}
    for n in NATS:
        args = services[n]["command"]
        assert "--jetstream" in args and args[args.index("--server_name") + 1] == n
        assert set(args[args.index("--routes") + 1].split(",")) == routes
    health_ports = set()
    for n in NODES:
        env = services[n]["environment"]
        assert env["PYCLUSTER_NODE_ID"] == n and env["PYCLUSTER_STREAM_REPLICAS"] == "3"
        assert {u.split("//")[1].split(":")[0] for u in env["PYCLUSTER_NATS_URL"].split(",")} == \
            set(NATS)
        health_ports.add(env["PYCLUSTER_HEALTH_ADDR"].rsplit(":", 1)[1])
    assert len(health_ports) == 1
    port = health_ports.pop()

    prom = _yaml(DOCKER / "prometheus" / "prometheus.yml")
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "pycluster")
    assert job["metrics_path"] == "/metrics"
    assert {t for sc in job["static_configs"] for t in sc["targets"]} == \
        {f"{n}:{port}" for n in NODES}
    prom_mount = "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
    assert prom_mount in services["prometheus"]["volumes"]

    # Grafana: the provisioned datasource is the one every panel names; the provider's folder
    # is where compose mounts the dashboard.
    ds = _yaml(DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    uid = ds["datasources"][0]["uid"]
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    provider = _yaml(DOCKER / "grafana" / "provisioning" / "dashboards" / "pycluster.yaml")
    folder = provider["providers"][0]["options"]["path"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in services["grafana"]["volumes"]}
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert Path(mounts["./grafana/dashboard.json"]).parent == Path(folder)

    dash = _dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == uid, p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid and t["expr"].strip(), p["title"]
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("leader", "epoch", "failover", "lock", "rpc", "health"):
        assert topic in titles, f"the dashboard shows no {topic} panel"
    # Every pycluster metric a query uses is one the metrics plugin defines.
    source = "".join(p.read_text() for p in
                     (ROOT / "core/src/pycluster/builtin/metrics").glob("*.py"))
    defined = set(re.findall(r'"(pycluster_[a-z_]+)"', source))
    used = {_base_metric(m) for e in _exprs(dash) for m in METRIC.findall(e)}
    assert used - defined == set(), f"the dashboard uses undefined metrics: {used - defined}"

    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "ARG BASE=python:3.11-slim" in dockerfile
    assert dockerfile.count("FROM ${BASE}") == 2, "a builder and a runtime stage"
    assert re.search(r"^USER 10001", dockerfile, re.M), "the runtime stage runs as non-root"
    assert re.search(r"^HEALTHCHECK ", dockerfile, re.M)
    assert 'ENTRYPOINT ["pycluster", "run"]' in dockerfile


# -- the built image and the running stack (slow) ---------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _http(port: int, path: str, timeout: float = 3.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    _, text = _http(port, "/metrics")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _role(port: int) -> tuple[bool, int] | None:
    """(leads the demo app, epoch it sees) of the node on ``port``; None when unreachable."""
    try:
        samples = _samples(port)
    except OSError:
        return None
    key = (("app", APP),)
    epoch = samples.get(("pycluster_election_epoch", key))
    if epoch is None:
        return None
    return samples.get(("pycluster_leader", key)) == 1.0, int(epoch)


def _image_id(name: str) -> str | None:
    proc = podman("image", "inspect", "--format", "{{.Id}}", name, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _build_images() -> str | None:
    """Build the pycluster image, the NATS stand-in and (once, cached) the Prometheus image;
    return why the Prometheus image could not be built, or None."""
    from pycluster.testing.engines.pybase import build_python_base_image

    base = build_python_base_image()
    before = {name: _image_id(name) for name in (NATS_IMAGE, IMAGE, BUILDER_IMAGE)}
    build = ("build", "--format", "docker", "--build-arg", f"BASE={base}",
             "-f", str(DOCKER / "Dockerfile"))
    # The builder stage gets a name of its own, so its layers stay tagged (the next build's
    # cache) instead of piling up as untagged images.
    podman(*build, "--target", "builder", "-t", BUILDER_IMAGE, str(ROOT), timeout=900)
    podman(*build, "-t", IMAGE, str(ROOT), timeout=900)
    with tempfile.TemporaryDirectory(prefix="pyc-img-") as tmp:
        # The official NATS image runs as root with its store in a volume: so does the stand-in.
        (Path(tmp) / "Containerfile").write_text(f"FROM {IMAGE}\nUSER 0:0\n")
        podman("build", "-t", NATS_IMAGE, tmp, timeout=120)
        for name, previous in before.items():  # this test's images of an earlier source tree
            if previous is not None and previous != _image_id(name):
                podman("rmi", previous, check=False)
        if image_exists(PROMETHEUS_IMAGE):
            return None
        (Path(tmp) / "Containerfile").write_text(
            f"FROM {base}\n"
            "RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
            "--no-install-recommends prometheus && rm -rf /var/lib/apt/lists/*\n"
            "USER nobody\n")
        try:
            podman("build", "-t", PROMETHEUS_IMAGE, tmp, timeout=600)
        except PodmanError as exc:
            return f"Debian's prometheus could not be installed into an image: {exc}"
    return None


@dataclass
class Stack:
    """A running compose project: its name, host ports and the environment of its commands."""

    project: str
    env: dict[str, str]
    ports: dict[str, int]
    prometheus: str | None  # why Prometheus is not running, or None
    killed: list[str] = field(default_factory=list)
    epochs: dict[str, int] = field(default_factory=dict)

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "podman_compose", "-f", str(COMPOSE), "-p", self.project,
               *args]
        proc = subprocess.run(cmd, cwd=DOCKER, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if proc.returncode != 0:
            raise PodmanError(f"{' '.join(args)}: exit {proc.returncode}: "
                              f"{(proc.stderr or proc.stdout)[-3000:]}")
        return proc

    def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True,
                              timeout=120, check=check)

    def container(self, service: str) -> str:
        out = self.podman("ps", "-a", "--filter", f"label=io.podman.compose.project={self.project}",
                          "--filter", f"label=com.docker.compose.service={service}",
                          "--format", "{{.Names}}").stdout.split()
        assert len(out) == 1, f"containers of {service}: {out}"
        return out[0]

    def roles(self, nodes: tuple[str, ...] = NODES) -> dict[str, tuple[bool, int] | None]:
        return {n: _role(self.ports[n]) for n in nodes}


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    ok, reason = podman_available()
    require("podman", ok, reason)
    require("podman-compose", importlib.util.find_spec("podman_compose") is not None,
            "the Python package podman-compose is not installed (the umbrella's test extra)")
    require("netavark", all(p.exists() for p in NETAVARK),
            "netavark and aardvark-dns are not installed (run .ci/install-system.sh)")
    prom_reason = _build_images()
    tmp = Path(tempfile.mkdtemp(prefix="pyc-compose-"))
    (tmp / "containers.conf").write_text(CONTAINERS_CONF)
    ports = {n: _free_port() for n in (*NODES, "nats", "prometheus")}
    env = {**os.environ, "CONTAINERS_CONF": str(tmp / "containers.conf"),
           "NODE_IMAGE": IMAGE, "NATS_IMAGE": NATS_IMAGE,
           "PROMETHEUS_IMAGE": PROMETHEUS_IMAGE, "NATS_PORT": str(ports["nats"]),
           "PROMETHEUS_PORT": str(ports["prometheus"]),
           **{f"NODE{i}_PORT": str(ports[n]) for i, n in enumerate(NODES, 1)}}
    st = Stack(f"pyct{secrets.token_hex(3)}", env, ports, prom_reason)
    services = [*NATS, *NODES] + (["prometheus"] if prom_reason is None else [])
    try:
        st.compose("up", "-d", *services)
        yield st
    finally:
        with contextlib.suppress(PodmanError, subprocess.TimeoutExpired):
            st.compose("down", "-v", "-t", "2", timeout=180)
        # Anything of this project that down left behind (by its unique label only).
        left = st.podman("ps", "-aq", "--filter",
                         f"label=io.podman.compose.project={st.project}", check=False)
        for cid in left.stdout.split():
            st.podman("rm", "-f", "-t", "0", cid, check=False)
        for path in tmp.iterdir():
            path.unlink()
        tmp.rmdir()


def _one_leader(st: Stack, nodes: tuple[str, ...]) -> tuple[str, int] | None:
    roles = st.roles(nodes)
    if any(r is None for r in roles.values()):
        return None
    leaders = [(n, r[1]) for n, r in roles.items() if r is not None and r[0]]
    return leaders[0] if len(leaders) == 1 else None


@pytest.fixture(scope="module")
def failover(stack: Stack) -> tuple[str, str]:
    """Kill the leader's container (SIGKILL); return (killed node, new leader)."""
    leader, epoch = wait_for_sync(lambda: _one_leader(stack, NODES), 120, interval=0.5,
                                  message="no single leader among the three nodes")
    stack.podman("kill", "--signal", "KILL", stack.container(leader))
    stack.killed.append(leader)
    survivors = tuple(n for n in NODES if n != leader)
    start = time.monotonic()

    def taken_over() -> tuple[str, int] | None:
        found = _one_leader(stack, survivors)
        return found if found is not None and found[1] > epoch else None

    new, new_epoch = wait_for_sync(taken_over, 90, interval=0.2,
                                   message=f"no survivor took over from {leader}")
    print(f"failover after SIGKILL of {leader}: {new} leads epoch {new_epoch} (was {epoch}) "
          f"{time.monotonic() - start:.1f}s after the kill (lease_ttl 4s)")
    stack.epochs = {leader: epoch, new: new_epoch}
    return leader, new


@pytest.mark.slow
@pytest.mark.timeout(1500)  # includes building the base (first run) and the images
def test_nodes_start_healthy_as_non_root_with_one_leader(stack: Stack) -> None:
    def all_healthy() -> bool:
        return all(_http(stack.ports[n], "/health")[0] == 200 for n in NODES)

    wait_for_sync(all_healthy, 120, interval=0.5, ignore=(OSError,),
                  message="the three nodes' /health did not answer 200")
    wait_for_sync(lambda: _one_leader(stack, NODES), 120, interval=0.5,
                  message="no single leader among the three nodes")
    for n in NODES:
        status, body = _http(stack.ports[n], "/health")
        assert status == 200 and json.loads(body)["node"] == n
        port = stack.ports[n]
        wait_for_sync(lambda port=port: _samples(port).get(("pycluster_members", ())) == 3,
                      30, interval=0.5, message=f"{n} does not see 3 members")
        ctr = stack.container(n)
        uid = stack.podman("exec", ctr, "python3", "-c", "import os; print(os.getuid())").stdout
        assert uid.strip() == "10001", f"{n} runs as uid {uid.strip()}"
        top = stack.podman("top", ctr, "user", "args").stdout
        assert "pycluster run" in top and "root" not in top, top
        # The image's HEALTHCHECK (podman runs it on demand: no systemd timers here).
        check = stack.podman("healthcheck", "run", ctr, check=False)
        assert check.returncode == 0, f"HEALTHCHECK of {n} failed: {check.stdout}{check.stderr}"
        health = stack.podman("inspect", "--format", "{{.State.Health.Status}}", ctr).stdout
        assert health.strip() == "healthy", f"{n}: {health}"
    image = json.loads(stack.podman("image", "inspect", IMAGE).stdout)[0]
    assert image["Config"]["User"] == "10001:10001"
    assert image["Config"]["Entrypoint"] == ["pycluster", "run"]
    assert image["Healthcheck"]["Test"][:2] == ["CMD", "python3"], image.get("Healthcheck")


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_killing_the_leaders_container_fails_over(stack: Stack, failover: tuple[str, str]) -> None:
    killed, new = failover
    assert new != killed and stack.epochs[new] > stack.epochs[killed]
    state = stack.podman("inspect", "--format", "{{.State.Status}}",
                         stack.container(killed)).stdout.strip()
    assert state == "exited"
    survivors = tuple(n for n in NODES if n != killed)
    assert _one_leader(stack, survivors) is not None
    # The operator's view from inside a container, as docs/containers.md shows it.
    out = stack.podman("exec", stack.container(new), "pycluster", "status", "-p", APP,
                       "--nats-url", "nats://nats-1:4222", "--output", "json").stdout
    app = next(a for a in json.loads(out)["apps"] if a["app"] == APP)
    assert app["leader"] == new, app


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_every_metric_of_the_dashboard_is_exported_by_real_nodes(
        stack: Stack, failover: tuple[str, str]) -> None:
    killed, _new = failover
    used = {m for e in _exprs(_dashboard()) for m in METRIC.findall(e)}

    def missing() -> set[str]:
        seen: set[str] = set()
        for n in NODES:
            if n != killed:
                seen |= {name for name, _ in _samples(stack.ports[n])}
        return used - seen

    # The demo app takes its lock and calls RPC every 2 s: wait for the histograms to fill.
    with contextlib.suppress(Exception):
        wait_for_sync(lambda: not missing(), 30, interval=1)
    assert missing() == set(), f"the dashboard uses metrics no node exports: {missing()}"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_prometheus_scrapes_the_nodes_and_answers_every_dashboard_query(
        stack: Stack, failover: tuple[str, str]) -> None:
    require("Prometheus (Debian's package in a local image)", stack.prometheus is None,
            stack.prometheus or "")
    killed, new = failover
    check = stack.podman("run", "--rm", "--entrypoint", "promtool", "-v",
                         f"{DOCKER / 'prometheus' / 'prometheus.yml'}:/p.yml:ro",
                         PROMETHEUS_IMAGE, "check", "config", "/p.yml", check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    port = stack.ports["prometheus"]

    def api(path: str, **params: str) -> Any:
        status, body = _http(port, f"/api/v1/{path}?{urllib.parse.urlencode(params)}")
        assert status == 200, body
        return json.loads(body)["data"]

    def targets() -> dict[str, str]:
        return {t["labels"]["instance"]: t["health"] for t in api("targets")["activeTargets"]
                if t["labels"]["job"] == "pycluster"}

    want = {f"{n}:8080": ("down" if n == killed else "up") for n in NODES}
    wait_for_sync(lambda: targets() == want, 90, interval=1, ignore=(OSError,),
                  message=f"Prometheus targets are not {want}")

    def leader_seen() -> bool:
        res = api("query", query=f'pycluster_leader{{app="{APP}"}} == 1')["result"]
        return [r["metric"]["instance"] for r in res] == [f"{new}:8080"]

    wait_for_sync(leader_seen, 60, interval=1, message=f"Prometheus does not see {new} lead")
    for expr in _exprs(_dashboard()):
        query = expr
        for var, value in GRAFANA_VARS.items():
            query = query.replace(var, value)
        status, body = _http(port, "/api/v1/query?" + urllib.parse.urlencode({"query": query}))
        assert status == 200 and json.loads(body)["status"] == "success", (expr, body)
