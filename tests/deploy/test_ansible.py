"""The Ansible role (packaging/ansible/roles/pycluster): ansible-lint, and a real run with
``ansible-playbook -c local`` inside a systemd container (ansible-core installed there into a
venv of its own), twice: the second run changes nothing."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from deploy_util import PACKAGING, node_status, pip_wheel, wait_app_active

from pycluster.testing.engines.systemd import SystemdContainer
from pycluster.testing.pytest_plugin import require

ANSIBLE = PACKAGING / "ansible"
ROLE = ANSIBLE / "roles" / "pycluster"

PLAYBOOK = """\
- name: Install a pycluster node on this machine
  hosts: localhost
  connection: local
  roles:
    - role: pycluster
      vars:
        pycluster_platform: node1
        pycluster_node_id: n1
        pycluster_pip_extra_args: --no-index --find-links /wheels
        # The container has python3-venv, and the modules run in ansible-core's venv (which has
        # `packaging`, the pip module's need); apt would need python3-apt and a network.
        pycluster_install_system_packages: false
        pycluster_env:
          PYCLUSTER_LABELS: '{"zone": "a"}'
        pycluster_config:
          health_addr: 127.0.0.1:8080
          lease_ttl: 5
          heartbeat_interval: 1
          apps:
            - name: demo
"""


@pytest.mark.slow  # ~14 s: ansible-lint loads ansible-core and its schemas
@pytest.mark.timeout(300)
def test_ansible_lint_passes_with_the_production_profile() -> None:
    require("ansible-lint", shutil.which("ansible-lint") is not None,
            "ansible-lint is not installed (the umbrella's test extra)")
    proc = subprocess.run(["ansible-lint", "--offline", "--profile", "production",
                           "playbook.yml"], cwd=ANSIBLE, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 failure(s), 0 warning(s)" in proc.stdout + proc.stderr


@pytest.mark.timeout(30)
def test_the_role_ships_the_repositorys_unit() -> None:
    """The role carries a copy (it must work when copied alone, e.g. by ansible-galaxy): it must
    stay the same as packaging/pycluster@.service."""
    unit = ROLE / "files" / "pycluster@.service"
    assert not unit.is_symlink()
    assert unit.read_bytes() == (PACKAGING / "pycluster@.service").read_bytes(), (
        "copy packaging/pycluster@.service to packaging/ansible/roles/pycluster/files/")


def _recap(out: str) -> dict[str, int]:
    found = re.search(r"localhost\s*:\s*(.*)", out.rsplit("PLAY RECAP", 1)[-1])
    assert found, out[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", found.group(1))}


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first run builds the image (debootstrap) and the wheels
def test_the_role_installs_and_starts_a_node_then_changes_nothing(
        systemd_host: Callable[..., SystemdContainer], wheelhouse: Path,
        tmp_path: Path) -> None:
    version = importlib.metadata.version("ansible-core")
    ansible_wheels = pip_wheel(tmp_path / "ansible-wheels", f"ansible-core=={version}")
    (tmp_path / "play").mkdir()
    (tmp_path / "play" / "site.yml").write_text(PLAYBOOK)
    sd = systemd_host({ANSIBLE: "/src/ansible", wheelhouse: "/wheels",
                       ansible_wheels: "/ansible-wheels", tmp_path / "play": "/play"})
    sd.exec("python3", "-m", "venv", "/opt/ansible", timeout=120)
    sd.exec("/opt/ansible/bin/pip", "install", "--quiet", "--no-index", "--find-links",
            "/ansible-wheels", "ansible-core", timeout=300)

    def play() -> dict[str, int]:
        proc = sd.exec("env", "LC_ALL=C.UTF-8", "ANSIBLE_ROLES_PATH=/src/ansible/roles",
                       "ANSIBLE_NOCOLOR=1", "ANSIBLE_LOCAL_TEMP=/tmp/ansible-local",
                       "/opt/ansible/bin/ansible-playbook", "-i", "localhost,",
                       "-e", "ansible_python_interpreter=/opt/ansible/bin/python",
                       "/play/site.yml", check=False, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
        return _recap(proc.stdout)

    first = play()
    assert first["failed"] == 0 and first["changed"] > 0
    assert sd.systemctl("is-active", "pycluster@node1").stdout.strip() == "active"
    assert sd.systemctl("is-enabled", "pycluster@node1").stdout.strip() == "enabled"
    pid = sd.systemctl("show", "-p", "MainPID", "--value", "pycluster@node1").stdout.strip()
    assert sd.exec("stat", "-c", "%U", f"/proc/{pid}").stdout.strip() == "pycluster"
    status = node_status(sd)
    assert status["node_id"] == "n1" and status["labels"] == {"zone": "a"}
    assert wait_app_active(sd, "demo")["leader"] == "n1"
    assert sd.exec("stat", "-c", "%a %U:%G", "/etc/pycluster/node1.env").stdout.strip() == (
        "640 root:pycluster")

    second = play()
    assert second["failed"] == 0 and second["changed"] == 0, second
    assert sd.systemctl("show", "-p", "MainPID", "--value",
                        "pycluster@node1").stdout.strip() == pid
