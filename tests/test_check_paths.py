"""``.ci/check-paths``: tracked files must not name absolute paths of a developer's machine."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pycluster.testing import require

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "check-paths"


def check(repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), str(repo)], capture_output=True, text=True,
                          timeout=30)


@pytest.fixture(autouse=True)
def _git() -> None:
    require("git", shutil.which("git") is not None, "git is not installed")


def test_this_checkout_is_clean() -> None:
    out = check(ROOT)
    assert out.returncode == 0, out.stderr


def test_flags_machine_paths_and_spares_system_paths(tmp_path: Path) -> None:
    repo = tmp_path / "checkout"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    # Built from pieces so that this file itself stays clean.
    bad = {
        "venv.py": 'NATS = "/' + 'work/venv/bin/nats-server"\n',
        "home.md": "see /" + "home/alice/notes.txt\n",
        "mac.md": "cd /" + "Users/bob/src\n",
        "root.sh": "cp x /" + "root/.cache/y\n",
        "url.md": "file:///" + "home/carol/x.html\n",
        "own.py": f"DATA = '{repo}/core/data'\n",  # the checkout's own absolute path
        "sibling.py": f"VENV = '{tmp_path}/venv/bin/python'\n",  # the folder holding it
    }
    good = {
        "system.py": (
            "SOCK = '/run/podman/podman.sock'\nBB = '/bin/busybox'\nCONF = '/etc/containers/x'\n"
            "TMP = '/tmp/pycluster-x'\nPROC = '/proc/self/stat'\nDATA = '/var/lib/pycluster'\n"
        ),
        "relative.py": "HOME = '~/" + "work/x'\nENV = '$HOME/" + "home/x'\n",
        "url.md": "https://example.com/" + "home/alice\n",
        "bare.py": "UNDER = ('/" + "root/', '/" + "home/')  # a checkout under these\n",
        "passwd": "root:x:0:0:root:/" + "root:/bin/sh\n",
        "allowed.md": "e.g. /" + "home/alice/x  <!-- check-paths: allow -->\n",
    }
    for sub, files in (("bad", bad), ("good", good)):
        (repo / sub).mkdir()
        for name, text in files.items():
            (repo / sub / name).write_text(text)
    (repo / "untracked.py").write_text("X = '/" + "work/untracked'\n")
    subprocess.run(["git", "-C", str(repo), "add", "bad", "good"], check=True)

    out = check(repo)
    assert out.returncode == 1, out.stdout + out.stderr
    flagged = {line.split(":", 1)[0] for line in out.stderr.splitlines() if ":" in line
               and line.startswith(("bad/", "good/", "untracked"))}
    assert flagged == {f"bad/{name}" for name in bad}, out.stderr
    assert "check-paths: allow" in out.stderr  # the hint names the escape hatch


def test_not_a_checkout(tmp_path: Path) -> None:
    out = check(tmp_path)
    assert out.returncode == 2 and "not a git checkout" in out.stderr
