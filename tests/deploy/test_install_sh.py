"""packaging/install.sh: run for real inside a container with systemd as PID 1 (a Debian rootfs
with python3 and venv), installing pycluster offline from a directory of wheels built here."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from deploy_util import PACKAGING, node_status, wait_app_active

from pycluster.testing import free_port
from pycluster.testing.engines.systemd import SystemdContainer
from pycluster.testing.pytest_plugin import require

INSTALL = PACKAGING / "install.sh"


@pytest.mark.timeout(60)
def test_install_sh_passes_shellcheck() -> None:
    require("shellcheck", shutil.which("shellcheck") is not None,
            "shellcheck is not installed (run .ci/install-system.sh)")
    proc = subprocess.run(["shellcheck", "--severity=style", str(INSTALL)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.timeout(30)
def test_help_shows_examples_and_a_wrong_option_fails() -> None:
    out = subprocess.run(["bash", str(INSTALL), "--help"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    assert "Examples:" in out and "--from PATH" in out
    bad = subprocess.run(["bash", str(INSTALL), "--nope"], capture_output=True, text=True,
                         timeout=30, check=False)
    assert bad.returncode != 0 and "unknown option: --nope" in bad.stderr


def _install(sd: SystemdContainer, *args: str) -> str:
    proc = sd.exec("/src/packaging/install.sh", "--from", "/wheels", "--platform", "node1",
                   "--node-id", "n1", *args, check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _fingerprint(sd: SystemdContainer) -> str:
    """Content, mode and owner of everything install.sh writes, and the venv's packages."""
    return sd.exec("sh", "-c",
                   "cd / && find etc/pycluster etc/systemd/system/pycluster@.service "
                   "etc/systemd/system/pycluster@.service.d usr/local/bin/pycluster "
                   "-exec stat -c '%n %a %U:%G %s %Y' {} + | sort && "
                   "sha256sum etc/pycluster/* etc/systemd/system/pycluster@.service && "
                   "/opt/pycluster/bin/python -m pip freeze --all && getent passwd pycluster"
                   ).stdout


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first run builds the image (debootstrap) and the wheels
def test_install_sh_installs_starts_and_is_idempotent(
        systemd_host: Callable[..., SystemdContainer], wheelhouse: Path) -> None:
    sd = systemd_host({PACKAGING: "/src/packaging", wheelhouse: "/wheels"})
    out = _install(sd, "--start")
    for line in ("created user pycluster", "created the virtualenv /opt/pycluster",
                 "wrote /etc/systemd/system/pycluster@.service", "wrote /etc/pycluster/node1.env",
                 "started pycluster@node1.service"):
        assert line in out, out

    # Type=notify: "active" means the node joined its platform (READY=1 after the join).
    assert sd.systemctl("is-active", "pycluster@node1").stdout.strip() == "active"
    assert sd.systemctl("is-enabled", "pycluster@node1").stdout.strip() == "enabled"
    pid = sd.systemctl("show", "-p", "MainPID", "--value", "pycluster@node1").stdout.strip()
    assert sd.exec("stat", "-c", "%U", f"/proc/{pid}").stdout.strip() == "pycluster"
    status = node_status(sd)
    assert status["node_id"] == "n1"  # from node1.env, through the unit's EnvironmentFile
    assert status["connected"] is True and status["members"] == ["n1"]
    env = sd.exec("cat", "/etc/pycluster/node1.env").stdout
    assert "PYCLUSTER_NODE_ID=n1" in env

    # An operator adds an app to the config file and restarts: the node leads it.
    sd.exec("sed", "-i", "s/^apps: \\[\\]$/apps:\\n  - name: demo/", "/etc/pycluster/node1.yaml")
    sd.systemctl("restart", "pycluster@node1")
    assert wait_app_active(sd, "demo")["leader"] == "n1"

    # Run again: nothing changes (the edited config is kept, the node is not restarted).
    before = _fingerprint(sd)
    pid = sd.systemctl("show", "-p", "MainPID", "--value", "pycluster@node1").stdout.strip()
    out = _install(sd, "--start")
    assert "nothing changed" in out, out
    assert _fingerprint(sd) == before
    assert sd.systemctl("show", "-p", "MainPID", "--value",
                        "pycluster@node1").stdout.strip() == pid
    assert "name: demo" in sd.exec("cat", "/etc/pycluster/node1.yaml").stdout


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_install_sh_with_a_nats_url_keeps_a_prepared_config(
        systemd_host: Callable[..., SystemdContainer], wheelhouse: Path, nats_url: str) -> None:
    """A host's NATS (the container shares the host's network namespace; only loopback is
    used): --nats-url goes to the env file, and a config file prepared before the install is
    kept as it is."""
    sd = systemd_host({PACKAGING: "/src/packaging", wheelhouse: "/wheels"}, network="host")
    health = free_port("127.0.0.1")
    prepared = (f"name: node2\nhealth_addr: 127.0.0.1:{health}\nlease_ttl: 4\n"
                f"heartbeat_interval: 1\napps:\n  - name: demo\n")
    sd.write_file("/etc/pycluster/node2.yaml", prepared, mode=0o644)
    proc = sd.exec("/src/packaging/install.sh", "--from", "/wheels", "--platform", "node2",
                   "--node-id", "n2", "--nats-url", nats_url, "--start", check=False,
                   timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "wrote /etc/pycluster/node2.yaml" not in proc.stdout
    assert sd.exec("cat", "/etc/pycluster/node2.yaml").stdout == prepared
    assert f"PYCLUSTER_NATS_URL={nats_url}" in sd.exec("cat", "/etc/pycluster/node2.env").stdout
    assert sd.systemctl("is-active", "pycluster@node2").stdout.strip() == "active"
    status = node_status(sd, port=health)
    assert status["node_id"] == "n2" and status["connected"] is True
    assert wait_app_active(sd, "demo", port=health)["leader"] == "n2"
    nats = status["checks"]["nats"]["details"]["server"]  # type: ignore[index]
    assert nats == nats_url.removeprefix("nats://")  # the host's server, not an embedded one
