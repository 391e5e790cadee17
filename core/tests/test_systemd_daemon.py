"""``pycluster run`` under a real systemd (PID 1 of a podman container), with the shipped unit.

The container gets this machine's Python, the venv and the repository read-only (its own image
has no Python), and ``/usr/local/bin/pycluster``, which is what the unit
``packaging/pycluster@.service`` runs. The unit file is installed verbatim, plus a drop-in that
shortens the watchdog and restart timers for the test (and, only for a checkout under /root or
/home, relaxes ProtectHome= to read-only). The node runs an embedded nats-server and one app
with a process backend. A first test reads the notify protocol from a plain socket.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import pycluster
from pycluster.testing import require, wait_for_sync
from pycluster.testing.engines.systemd import SystemdContainer, systemd_available

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(pycluster.__file__).resolve().parents[3]
UNIT = REPO / "packaging" / "pycluster@.service"
PY_HOME = "/opt/pyc-python"  # where the container sees this machine's Python
DATA = "/var/lib/pycluster/test"

CONFIG = f"""
name: sdtest
node_id: sd1
lease_ttl: 2
heartbeat_interval: 0.5
apps:
  - name: web
    process:
      command:
        - sh
        - -c
        - |
          touch /etc/pyc-probe 2>/dev/null && echo rw > "{DATA}/etc" || echo ro > "{DATA}/etc"
          echo "started epoch=$PYCLUSTER_EPOCH"
          echo $$ > "{DATA}/backend.pid"
          exec sleep 100000
      grace: 2
"""

DROP_IN = """[Service]
WatchdogSec=4
RestartSec=1
"""


def _python() -> tuple[list[str], str, str, str | None]:
    """How the container gets the Python running the tests: (podman volume options, its
    site-packages, the interpreter's path in the container, a library folder for ldconfig)."""
    base = Path(sys.base_prefix)
    site = sysconfig.get_paths()["purelib"]
    exe = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if base == Path("/usr"):  # Debian's own Python: the image has the libraries it needs
        vols = ["-v", f"/usr/bin/{exe}:/usr/bin/{exe}:ro",
                "-v", f"/usr/lib/{exe}:/usr/lib/{exe}:ro"]
        return vols, site, f"/usr/bin/{exe}", None
    # A self-contained build (pyenv, python.org): its prefix may live under /root, which the
    # unit's ProtectHome= hides, so it is mounted elsewhere (libpython found through ldconfig).
    return ["-v", f"{base}:{PY_HOME}:ro"], site, f"{PY_HOME}/bin/{exe}", f"{PY_HOME}/lib"


def _home_paths() -> bool:
    """Whether the venv or the repository lives where ProtectHome= hides it."""
    _, site, _, _ = _python()
    return any(str(p).startswith(("/root/", "/home/")) for p in (REPO, Path(site)))


def _tmp_paths() -> bool:
    """Whether the venv or the repository lives where PrivateTmp= hides it."""
    _, site, _, _ = _python()
    return any(str(p).startswith(("/tmp/", "/var/tmp/")) for p in (REPO, Path(site)))


class Node:
    """The pycluster@test unit in the container."""

    def __init__(self, sd: SystemdContainer) -> None:
        self.sd = sd

    def show(self, *props: str) -> dict[str, str]:
        out = self.sd.systemctl("show", "-p", ",".join(props), "pycluster@test").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self) -> str:
        return self.sd.exec("journalctl", "-u", "pycluster@test", "--no-pager", "-o", "cat",
                            check=False).stdout

    def alive(self, pid: int) -> bool:
        return self.sd.exec("test", "-d", f"/proc/{pid}", check=False).returncode == 0

    def read(self, path: str) -> str:
        return self.sd.exec("cat", path, check=False).stdout.strip()

    def backend_pid(self) -> int:
        return int(self.read(f"{DATA}/backend.pid") or 0)

    def ensure_started(self) -> None:
        if self.show("ActiveState")["ActiveState"] != "active":
            self.sd.systemctl("start", "pycluster@test")
        wait_for_sync(lambda: "web active (epoch" in self.show("StatusText")["StatusText"],
                      60, interval=0.2, message="app web active under systemd")


def test_notify_protocol_on_a_plain_socket(tmp_path: Path) -> None:
    """What `pycluster run` sends, read from an abstract datagram socket (no systemd needed)."""
    name = f"pyc-notify-{secrets.token_hex(4)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(0.5)
    cfg = tmp_path / "node.yaml"
    cfg.write_text(CONFIG.replace(DATA, str(tmp_path)) + f"data_dir: {tmp_path / 'data'}\n")
    env = dict(os.environ, NOTIFY_SOCKET="@" + name, WATCHDOG_USEC="2000000")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "pycluster"), "run", "--config",
                             str(cfg)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    got: list[str] = []

    def receive_until(pred: str, timeout: float, since: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while not any(pred in m for m in got[since:]) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                got.append(sock.recv(4096).decode())
            except TimeoutError:
                pass
        assert any(pred in m for m in got[since:]), got

    try:
        receive_until("READY=1", 60)
        receive_until("STATUS=sdtest/sd1: web active (epoch ", 30)
        receive_until("WATCHDOG=1", 10, since=len(got))  # the pings go on
        ready = next(i for i, m in enumerate(got) if m.startswith("READY=1"))
        assert all("WATCHDOG" not in m for m in got[:ready])  # no pings before READY
        proc.send_signal(signal.SIGTERM)
        receive_until("STOPPING=1", 30)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        sock.close()
    assert got[0].startswith("STATUS=sdtest/sd1: starting")


def make_container() -> SystemdContainer:
    """A systemd container that sees this machine's Python, venv and repository."""
    vols, site, _, _ = _python()
    venv = Path(site).parents[2]
    # --cgroupns=private: with the host's cgroup namespace (hybrid v1 here) systemd in the
    # container never learns that a unit's cgroup became empty and every stop waits for its
    # timeout. CAP_SYS_ADMIN: without it systemd cannot set up the unit's mount namespace and
    # silently runs it without ProtectSystem= and friends.
    return SystemdContainer(extra_args=[
        "--cgroupns=private", "--cap-add=SYS_ADMIN", *vols,
        "-v", f"{venv}:{venv}:ro",
        "-v", f"{REPO}:{REPO}:ro",
    ])


def install(sd: SystemdContainer) -> None:
    """Install the interpreter path, the ``pycluster`` script, the config and the unit."""
    _, site, exe, libdir = _python()
    if libdir is not None:
        sd.write_file("/etc/ld.so.conf.d/pycluster-test.conf", f"{libdir}\n")
        sd.exec("ldconfig")
    sd.write_file("/usr/local/bin/pycluster", (
        f"#!{exe}\n"
        "import site, sys\n"
        f"site.addsitedir({site!r})\n"
        "from pycluster.cli.main import main\n"
        "sys.exit(main())\n"
    ), mode=0o755)
    sd.write_file("/etc/pycluster/test.yaml", CONFIG)
    # Quoted: the venv's path may contain spaces (systemd's EnvironmentFile= syntax).
    server = json.dumps(f"{Path(site).parents[2]}/bin/nats-server")
    sd.write_file("/etc/pycluster/test.env", f"PYCLUSTER_NATS_SERVER={server}\n", 0o640)
    sd.write_file("/etc/systemd/system/pycluster@.service", UNIT.read_text())
    # Only if this checkout lives under /root or /home: let the node read it there; likewise
    # PrivateTmp= hides a checkout (or venv) under /tmp, where CI may clone the repository.
    home = "ProtectHome=read-only\n" if _home_paths() else ""
    tmp = "PrivateTmp=no\n" if _tmp_paths() else ""
    sd.write_file("/etc/systemd/system/pycluster@test.service.d/test.conf", DROP_IN + home + tmp)
    sd.systemctl("daemon-reload")


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    ok, reason = systemd_available()
    require("systemd", ok, reason)
    sd = make_container()
    sd.start(timeout=120)
    try:
        install(sd)
        yield Node(sd)
    finally:
        sd.stop()


def test_ready_and_status_under_a_notify_unit(node: Node) -> None:
    # `systemctl start` of a Type=notify unit returns once READY=1 arrived.
    node.sd.systemctl("start", "pycluster@test")
    st = node.show("ActiveState", "SubState", "Type", "NRestarts", "WatchdogUSec")
    assert (st["ActiveState"], st["SubState"], st["Type"]) == ("active", "running", "notify")
    assert st["NRestarts"] == "0" and st["WatchdogUSec"] == "4s"
    node.ensure_started()  # STATUS= follows the role change once the app is active
    status = node.show("StatusText")["StatusText"]
    assert status.startswith("sdtest/sd1: web active (epoch ")
    pid = node.backend_pid()
    assert pid and node.alive(pid)
    journal = node.journal()
    assert "systemd: READY sent; watchdog every 1.0s" in journal
    assert "web[stdout] started epoch=" in journal  # backend output, with the app name
    # The hardening of the unit applies to the backend too: /etc is read-only.
    assert node.read(f"{DATA}/etc") == "ro"
    hard = node.show("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp")
    assert hard == {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                    "ProtectHome": "read-only" if _home_paths() else "yes",
                    "PrivateTmp": "no" if _tmp_paths() else "yes"}


def test_watchdog_kills_a_stuck_node_and_systemd_restarts_it(node: Node) -> None:
    node.ensure_started()
    before = node.show("MainPID", "NRestarts", "StatusText")
    main, backend = int(before["MainPID"]), node.backend_pid()
    epoch = int(before["StatusText"].rsplit(" ", 1)[1].rstrip(")"))
    node.sd.exec("sh", "-c", f"kill -STOP {main}")  # frozen: no more watchdog pings
    t0 = time.monotonic()

    def restarted() -> bool:
        st = node.show("MainPID", "NRestarts", "StatusText")
        return (st["NRestarts"] == str(int(before["NRestarts"]) + 1)
                and st["MainPID"] not in ("0", str(main))
                and "web active (epoch" in st["StatusText"])

    wait_for_sync(restarted, 120, interval=0.5, message="node killed and restarted")
    assert time.monotonic() - t0 >= 4  # not before WatchdogSec
    journal = node.journal()
    assert "Watchdog timeout" in journal
    assert "Fatal Python error: Aborted" in journal  # the fault handler's traceback
    assert not node.alive(main) and not node.alive(backend)
    new_backend = node.backend_pid()
    assert new_backend != backend and node.alive(new_backend)
    new_epoch = int(node.show("StatusText")["StatusText"].rsplit(" ", 1)[1].rstrip(")"))
    assert new_epoch > epoch


def test_graceful_stop_steps_down_and_exits_cleanly(node: Node) -> None:
    node.ensure_started()
    backend = node.backend_pid()
    node.sd.systemctl("stop", "pycluster@test")
    st = node.show("ActiveState", "Result", "ExecMainStatus")
    assert (st["ActiveState"], st["Result"], st["ExecMainStatus"]) == ("inactive", "success", "0")
    assert not node.alive(backend)
    journal = node.journal()
    assert "leaving gracefully" in journal and "backend stopped" in journal
    assert "Deactivated successfully" in journal
