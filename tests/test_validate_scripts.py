"""``scripts/validate-*.sh`` against a cluster that ``pycluster dev up`` started (three
nats-servers, R3 buckets, three node processes): every script prints PASS with its figure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("validate-*.sh"))
CHECKS = [p.stem.removeprefix("validate-") for p in SCRIPTS if p.stem != "validate-lib"]


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PYCLUSTER_")}
    return {**base, "PYTHON": sys.executable, **extra}


def script(check: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ROOT / "scripts" / f"validate-{check}.sh")],
                          capture_output=True, text=True, timeout=180, env=env(**extra))


@pytest.mark.timeout(60)
def test_scripts_parse_and_fail_clearly_without_a_cluster(tmp_path: Path) -> None:
    assert {"election", "failover", "locks", "api", "health", "audit", "sqlite"} <= set(CHECKS)
    for check in CHECKS:
        path = ROOT / "scripts" / f"validate-{check}.sh"
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, check
        assert os.access(path, os.X_OK), f"{path.name} is not executable"
        out = script(check, PYCLUSTER_DEV_DIR=str(tmp_path / "none"))
        assert out.returncode == 1 and out.stdout.startswith(f"FAIL {check}: no config file")


@pytest.mark.timeout(60)
def test_scripts_pass_shellcheck() -> None:
    from pycluster.testing import require

    require("shellcheck", shutil.which("shellcheck") is not None, "shellcheck is not installed")
    out = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True,
                         text=True, timeout=50, cwd=ROOT / "scripts")
    assert out.returncode == 0, out.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_script_passes_against_dev_up(tmp_path: Path) -> None:
    root = tmp_path / "dev"
    cli = [sys.executable, "-m", "pycluster.cli"]
    up = subprocess.run([*cli, "dev", "up", "--dir", str(root), "--nats-cluster"],
                        capture_output=True, text=True, timeout=240, env=env())
    try:
        assert up.returncode == 0, up.stderr
        # The checks that disturb the cluster (step-downs, a paused leader) come last.
        order = sorted(CHECKS, key=lambda c: (c in ("election", "audit", "failover"), c))
        results = {c: script(c, PYCLUSTER_DEV_DIR=str(root)) for c in order}
    finally:
        down = subprocess.run([*cli, "dev", "down", "--dir", str(root)], capture_output=True,
                              text=True, timeout=120, env=env())
    report = "\n".join(f"{c}: {r.stdout.strip()} {r.stderr.strip()[-500:]}"
                       for c, r in results.items())
    print(report)  # the figures, in the test's output
    assert all(r.returncode == 0 and r.stdout.startswith(f"PASS {c}:")
               for c, r in results.items()), report
    assert down.returncode == 0, down.stderr
