"""The real components that system tests run against: podman, systemd, network namespaces.

Each test skips with the reason when its component is unavailable (with PYCLUSTER_STRICT=1, as in
CI, such a skip counts as a failure). ``.ci/install-system.sh`` installs what they need.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from pycluster.testing.engines.netns import NetNamespaces, netns_available
from pycluster.testing.engines.podman import (
    PodmanService,
    build_busybox_image,
    image_exists,
    podman,
    podman_available,
)
from pycluster.testing.engines.systemd import (
    SystemdContainer,
    build_systemd_image,
    systemd_available,
)
from pycluster.testing.wait import wait_for_sync

pytestmark = pytest.mark.slow


def _require(check: Callable[[], tuple[bool, str]]) -> None:
    ok, reason = check()
    if not ok:
        pytest.skip(reason)


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    wait_for_sync(predicate, timeout, interval=0.1, message=f"waiting for {what}")


# --------------------------------------------------------------------------- podman


@pytest.fixture(scope="session")
def busybox_image() -> str:
    _require(podman_available)
    return build_busybox_image()


@pytest.fixture(scope="module")
def podman_service() -> Iterator[PodmanService]:
    _require(podman_available)
    svc = PodmanService().start()
    try:
        yield svc
    finally:
        svc.stop()


@pytest.mark.timeout(120)
def test_podman_service_answers_docker_api(podman_service: PodmanService) -> None:
    assert podman_service.ping()
    assert podman_service.socket_path.is_socket()
    assert not str(podman_service.socket_path).startswith("/run/podman")
    docker = pytest.importorskip("docker", reason="the docker SDK is not installed")
    client = docker.DockerClient(base_url=podman_service.base_url)
    try:
        assert client.ping() is True
        version = client.version()
        assert version.get("ApiVersion")
        assert any(c.get("Name") == "Podman Engine" for c in version.get("Components", []))
    finally:
        client.close()


@pytest.mark.timeout(120)
def test_docker_sdk_runs_stops_removes_busybox(
    podman_service: PodmanService, busybox_image: str
) -> None:
    docker = pytest.importorskip("docker", reason="the docker SDK is not installed")
    assert image_exists(busybox_image)
    # A second call finds the image and does nothing.
    t0 = time.monotonic()
    assert build_busybox_image() == busybox_image
    assert time.monotonic() - t0 < 5

    client = docker.DockerClient(base_url=podman_service.base_url)
    name = f"pyc-test-bb-{secrets.token_hex(4)}"
    created: list[str] = []
    try:
        container = client.containers.run(
            busybox_image,
            ["sh", "-c", "echo hello-from-busybox; exec sleep 300"],
            name=name,
            detach=True,
            network_mode="none",
            labels={"pycluster.test": "infra"},
        )
        created.append(container.id)

        def running() -> bool:
            container.reload()
            return bool(container.status == "running")

        _wait_for(running, 30, "the container to run")
        _wait_for(lambda: b"hello-from-busybox" in container.logs(), 10, "the container's output")

        container.stop(timeout=1)
        container.reload()
        assert container.status == "exited"
        container.remove()
        created.remove(container.id)
        assert name not in {c.name for c in client.containers.list(all=True)}

        # Exit codes come back through the API (what a backend's health logic reads).
        failing = client.containers.run(
            busybox_image,
            ["sh", "-c", "exit 3"],
            detach=True,
            network_mode="none",
            labels={"pycluster.test": "infra"},
        )
        created.append(failing.id)
        assert failing.wait(timeout=30)["StatusCode"] == 3
    finally:
        for cid in created:
            podman("rm", "-f", "--time", "0", cid, check=False)
        client.close()


# --------------------------------------------------------------------------- systemd


@pytest.fixture(scope="session")
def systemd_image() -> str:
    _require(systemd_available)
    return build_systemd_image()


@pytest.fixture(scope="module")
def systemd_container(systemd_image: str) -> Iterator[SystemdContainer]:
    sd = SystemdContainer(image=systemd_image).start()
    try:
        yield sd
    finally:
        sd.stop()
    assert podman("container", "exists", sd.name, check=False).returncode != 0


UNIT = """\
[Unit]
Description=pycluster infra test unit

[Service]
ExecStart=/bin/sleep infinity
"""


@pytest.mark.timeout(900)  # first run: debootstrap (~40 s here, more on a slow mirror)
def test_systemd_container_starts_and_stops_a_unit(systemd_container: SystemdContainer) -> None:
    sd = systemd_container
    state = sd.systemctl("is-system-running", check=False).stdout.strip()
    assert state in ("running", "degraded")
    assert sd.exec("cat", "/proc/1/comm").stdout.strip() == "systemd"

    unit = f"pyc-infra-{secrets.token_hex(3)}.service"
    sd.write_file(f"/etc/systemd/system/{unit}", UNIT)
    assert sd.exec("cat", f"/etc/systemd/system/{unit}").stdout == UNIT
    sd.systemctl("daemon-reload")

    prefix = sd.systemctl_prefix()
    subprocess.run([*prefix, "start", unit], check=True, timeout=60)
    active = subprocess.run([*prefix, "is-active", unit], capture_output=True, text=True)
    assert active.stdout.strip() == "active"
    pid = sd.systemctl("show", "-p", "MainPID", "--value", unit).stdout.strip()
    assert int(pid) > 0

    subprocess.run([*prefix, "stop", unit], check=True, timeout=60)
    inactive = subprocess.run([*prefix, "is-active", unit], capture_output=True, text=True)
    assert inactive.stdout.strip() == "inactive"
    assert inactive.returncode != 0


# --------------------------------------------------------------------------- network namespaces


@pytest.fixture
def net3() -> Iterator[NetNamespaces]:
    _require(netns_available)
    net = NetNamespaces(3).create()
    try:
        yield net
    finally:
        net.cleanup()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert net.prefix not in listed


def _ping(net: NetNamespaces, src: str, dst_ip: str) -> bool:
    return net.run(src, "ping", "-c", "1", "-W", "1", dst_ip, check=False).returncode == 0


@pytest.mark.timeout(60)
def test_namespaces_ping_across_bridge_and_partition(net3: NetNamespaces) -> None:
    a, b, c = net3.hosts
    assert _ping(net3, a, net3.ip(b))
    assert _ping(net3, b, net3.ip(c))
    # The host's own network is not involved: the address lives only inside the namespace.
    root_addrs = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True).stdout
    assert all(
        info.get("local") != net3.ip(a)
        for link in json.loads(root_addrs)
        for info in link.get("addr_info", [])
    )

    net3.link_down(b)
    assert not _ping(net3, a, net3.ip(b))
    assert not _ping(net3, b, net3.ip(c))
    assert _ping(net3, a, net3.ip(c))  # the others still see each other

    net3.link_up(b)
    _wait_for(lambda: _ping(net3, a, net3.ip(b)), 10, "b to come back")


@pytest.mark.timeout(60)
def test_gratuitous_arp_moves_vip_in_peer_cache(net3: NetNamespaces) -> None:
    a, b, c = net3.hosts
    vip = net3.address(200)

    def neigh_mac() -> str | None:
        out = net3.run(c, "ip", "-j", "neigh", "show", vip).stdout
        entries = json.loads(out or "[]")
        return entries[0].get("lladdr") if entries else None

    net3.add_address(a, vip)
    assert _ping(net3, c, vip)
    assert neigh_mac() == net3.mac(a)

    # Fail over: the VIP moves to b, which announces it; c's cache follows without c asking.
    net3.del_address(a, vip)
    net3.add_address(b, vip)
    net3.run(b, "arping", "-U", "-c", "1", "-I", net3.iface, vip)
    _wait_for(lambda: neigh_mac() == net3.mac(b), 5, "c's ARP cache to learn b's MAC for the VIP")
    assert _ping(net3, c, vip)
