"""packaging/install.sh: run for real inside a container with systemd as PID 1 (a Debian rootfs
with python3 and venv), installing pycluster offline from a directory of wheels built here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_util import PACKAGING, ROOT, SYSTEMD_PYTHON_IMAGE, build_systemd_python_image

from pycluster.testing.engines.systemd import SystemdContainer, systemd_available
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


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pycluster, pycluster-core and every dependency as wheels (what --from installs)."""
    out = tmp_path_factory.mktemp("wheels")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "-w", str(out),
                           str(ROOT / "core"), str(ROOT)], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def host(wheelhouse: Path) -> Iterator[SystemdContainer]:
    """A fresh systemd container with packaging/ and the wheels mounted read-only."""
    ok, reason = systemd_available()
    require("systemd container", ok, reason)
    require("debootstrap", shutil.which("debootstrap") is not None,
            "debootstrap is not installed (run .ci/install-system.sh)")
    build_systemd_python_image()
    sd = SystemdContainer(image=SYSTEMD_PYTHON_IMAGE, extra_args=[
        "-v", f"{PACKAGING}:/src/packaging:ro", "-v", f"{wheelhouse}:/wheels:ro"])
    sd.start()
    try:
        yield sd
    finally:
        sd.stop()


def _install(sd: SystemdContainer, *args: str) -> str:
    proc = sd.exec("/src/packaging/install.sh", "--from", "/wheels", "--platform", "node1",
                   "--node-id", "n1", *args, check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _status(sd: SystemdContainer) -> dict[str, object]:
    code = ("import json, time, urllib.request\n"
            "deadline = time.monotonic() + 30\n"
            "while True:\n"
            "    try:\n"
            "        print(urllib.request.urlopen('http://127.0.0.1:8080/status', timeout=5)"
            ".read().decode())\n"
            "        break\n"
            "    except OSError:\n"
            "        if time.monotonic() > deadline: raise\n"
            "        time.sleep(0.3)\n")
    out = sd.exec("/opt/pycluster/bin/python", "-c", code, timeout=60).stdout
    result: dict[str, object] = json.loads(out)
    return result


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
def test_install_sh_installs_starts_and_is_idempotent(host: SystemdContainer) -> None:
    sd = host
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
    status = _status(sd)
    assert status["node_id"] == "n1"  # from node1.env, through the unit's EnvironmentFile
    assert status["connected"] is True and status["members"] == ["n1"]
    env = sd.exec("cat", "/etc/pycluster/node1.env").stdout
    assert "PYCLUSTER_NODE_ID=n1" in env

    # An operator adds an app to the config file and restarts: the node leads it.
    sd.exec("sed", "-i", "s/^apps: \\[\\]$/apps:\\n  - name: demo/", "/etc/pycluster/node1.yaml")
    sd.systemctl("restart", "pycluster@node1")
    deadline = time.monotonic() + 60
    while True:
        apps = _status(sd)["apps"]
        assert isinstance(apps, dict)
        if apps.get("demo", {}).get("role") == "active" or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert apps["demo"]["role"] == "active" and apps["demo"]["leader"] == "n1"

    # Run again: nothing changes (the edited config is kept, the node is not restarted).
    before = _fingerprint(sd)
    pid = sd.systemctl("show", "-p", "MainPID", "--value", "pycluster@node1").stdout.strip()
    out = _install(sd, "--start")
    assert "nothing changed" in out, out
    assert _fingerprint(sd) == before
    assert sd.systemctl("show", "-p", "MainPID", "--value",
                        "pycluster@node1").stdout.strip() == pid
    assert "name: demo" in sd.exec("cat", "/etc/pycluster/node1.yaml").stdout
