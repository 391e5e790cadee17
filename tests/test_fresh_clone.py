"""A checkout placed anywhere works: under a path with spaces, installed into a fresh venv.

Both tests copy the tracked files of this checkout (working-tree versions) into a folder whose
path contains spaces, like a clone in "~/My Projects/py cluster":

- a representative subset of the suite runs from the copy (its own code first on PYTHONPATH,
  temporary directories with spaces too): the CLI with a process backend, node processes of
  the test harness, the fence guard, the embedded server, SQLite replication, the path
  check;
- the documented install command for a checkout with plugin extras builds a fresh venv (also
  under a path with spaces), and its ``pycluster`` script lists the plugins and runs a node
  on an embedded nats-server until SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

import pycluster

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["core/src", "plugins/backend_systemd/src", "plugins/backend_docker/src",
           "plugins/vip/src", "plugins/sqlite/src", "plugins/ring/src",
           "plugins/discovery/src"]

# The exact command of docs/getting-started.md ("From a checkout, with plugin extras").
INSTALL = ["./core", "./plugins/backend_docker", "./plugins/vip", "./[docker,vip]"]

SUBSET = [
    "core/tests/test_cli.py::test_run_config_process_backend_and_graceful_exit",
    "core/tests/test_cli.py::test_bad_config_names_the_field",
    "core/tests/test_e2e_failover.py::test_graceful_sigterm_hands_over_and_exits_zero",
    "core/tests/test_process_backend.py::test_epoch_env_and_placeholders_reach_the_command",
    "core/tests/test_process_backend.py::test_guard_kills_the_tree_when_the_node_dies",
    "core/tests/test_testing_harness.py::test_server_restart_kill_and_pause_keep_jetstream_data",
    "tests/test_check_paths.py",
    "plugins/sqlite/tests/test_units.py",
    "plugins/sqlite/tests/test_replication.py::test_active_replicates_and_standby_follows",
]


def _tracked_files() -> list[str]:
    if shutil.which("git") and (ROOT / ".git").exists():
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True,
                             check=True, timeout=30).stdout.decode()
        return [f for f in out.split("\0") if f and (ROOT / f).is_file()]
    skip = {".git", "venv", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache",
            ".pytest_cache", "build", "dist"}
    return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
            and ".egg-info" not in str(p) and not str(p).startswith(str(ROOT / ".ci" / "venv"))]


def copy_checkout(dest: Path) -> Path:
    """Copy the tracked files of this checkout to ``dest`` (a git checkout again when git is
    there, so that ``.ci/check-paths`` works in it)."""
    for rel in _tracked_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    if shutil.which("git"):
        subprocess.run(["git", "init", "-q", str(dest)], check=True, timeout=30)
        subprocess.run(["git", "-C", str(dest), "add", "-A"], check=True, timeout=60)
    return dest


@pytest.fixture(scope="module")
def spaced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder whose path has spaces, holding a copy of the checkout in ``py cluster``."""
    base = tmp_path_factory.mktemp("fresh") / "a folder with spaces"
    copy_checkout(base / "py cluster")
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(240)
def test_suite_subset_runs_from_a_checkout_under_a_path_with_spaces(spaced: Path) -> None:
    repo = spaced / "py cluster"
    tmp = spaced / "tmp dir"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(repo / s) for s in SOURCES] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    where = subprocess.run([sys.executable, "-c", "import pycluster; print(pycluster.__file__)"],
                           env=env, cwd=repo, capture_output=True, text=True, timeout=60)
    assert where.stdout.startswith(str(repo)), where  # the copy's code runs, not this one's
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *SUBSET],
        env=env, cwd=repo, capture_output=True, text=True, timeout=220)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]


@pytest.mark.timeout(420)
def test_documented_install_with_extras_in_a_fresh_venv(spaced: Path) -> None:
    """``pip install ./core ./plugins/backend_docker ./plugins/vip './[docker,vip]'`` from a
    checkout (the extras alone name distributions that are not published yet)."""
    repo = spaced / "py cluster"
    env_dir = spaced / "venv with spaces"
    venv.create(env_dir, with_pip=True)
    bindir = env_dir / ("Scripts" if sys.platform == "win32" else "bin")
    python = bindir / "python"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYCLUSTER_NATS_SERVER")}
    env["PATH"] = os.pathsep.join([str(bindir), env.get("PATH", "")])
    pip = subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *INSTALL],
        cwd=repo, env=env, capture_output=True, text=True, timeout=360)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    pycluster_cmd = str(bindir / "pycluster")

    version = subprocess.run([pycluster_cmd, "--version"], env=env, capture_output=True,
                             text=True, timeout=60)
    assert pycluster.__version__ in version.stdout, version
    listed = subprocess.run([pycluster_cmd, "plugins", "--output", "json"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    dists = {p["name"]: p["distribution"] for p in json.loads(listed.stdout)}
    assert dists.get("docker") == "pycluster-docker" and dists.get("vip") == "pycluster-vip"
    assert "sqlite" not in dists and "systemd" not in dists  # exactly the named extras

    # A node from the fresh venv: its nats-server (next to its python) and data under spaces.
    cfg = spaced / "node config.yaml"
    cfg.write_text(f"name: fresh\nnode_id: n1\ndata_dir: {json.dumps(str(spaced / 'data'))}\n"
                   "lease_ttl: 2\nheartbeat_interval: 0.5\napps:\n  - name: web\n")
    proc = subprocess.Popen([pycluster_cmd, "run", "--config", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any("app web on n1: active" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, "".join(lines)
        reader.join(10)
        assert any("leaving gracefully" in line for line in lines), "".join(lines)
        # No app uses docker or vip: whether they work on this machine is not worth a warning.
        assert not any("unusable" in line for line in lines), "".join(lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
