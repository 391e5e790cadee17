"""``pycluster dev up`` / ``dev down``: real nats-server and node processes that outlive the
command, reached by the other commands through the written config files, stopped by PID."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PYCLUSTER = [sys.executable, "-m", "pycluster.cli"]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYCLUSTER_")}
    return subprocess.run([*PYCLUSTER, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.split(")")[-1].split()[0] != "Z"


def up_down(tmp_path: Path, *up_args: str) -> dict[str, object]:
    root = tmp_path / "dev"
    up = run("dev", "up", "--dir", str(root), "-o", "json", *up_args)
    try:
        assert up.returncode == 0, up.stderr
        state = json.loads(up.stdout)
        pids = [p["pid"] for g in ("nats", "nodes") for p in state[g]]
        assert all(alive(pid) for pid in pids)  # the command returned, the cluster runs
        st = run("status", "--config", str(root / "n1.yaml"), "-o", "json")
        assert st.returncode == 0, st.stderr
        doc = json.loads(st.stdout)
        assert sorted(n["node_id"] for n in doc["nodes"]) == [
            p["name"] for p in state["nodes"]]
        (hello,) = doc["apps"]
        assert hello["app"] == "hello" and hello["leader"] in {"n1", "n2", "n3"}
        again = run("dev", "up", "--dir", str(root))
        assert again.returncode == 2 and "already runs" in again.stderr
        ds = run("dev", "status", "--dir", str(root))
        assert ds.returncode == 0 and ds.stdout.count("running") == len(pids)
    finally:
        down = run("dev", "down", "--dir", str(root))
    assert down.returncode == 0, down.stderr
    assert all(not alive(pid) for pid in pids)
    assert "stopped n1" in down.stdout
    assert run("dev", "status", "--dir", str(root)).returncode == 1
    return state


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dev_up_single_server_stays_up_and_down_stops_it(tmp_path: Path) -> None:
    state = up_down(tmp_path)
    assert len(state["nats"]) == 1 and len(state["nodes"]) == 3  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dev_up_nats_cluster_r3(tmp_path: Path) -> None:
    state = up_down(tmp_path, "--nats-cluster", "--nodes", "2")
    assert len(state["nats"]) == 3 and len(state["nodes"]) == 2  # type: ignore[arg-type]
    cfg = (tmp_path / "dev" / "n1.yaml").read_text()
    assert "stream_replicas: 3" in cfg


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_dev_down_without_a_cluster(tmp_path: Path) -> None:
    out = run("dev", "down", "--dir", str(tmp_path / "none"))
    assert out.returncode == 0 and "no dev cluster" in out.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_chaos_on_a_dev_cluster_keeps_it_stoppable(tmp_path: Path) -> None:
    root = tmp_path / "dev"
    up = run("dev", "up", "--dir", str(root), "--nats-cluster", "--nodes", "1", "-o", "json")
    assert up.returncode == 0, up.stderr
    before = [p["pid"] for p in json.loads(up.stdout)["nats"]]
    try:
        out = run("chaos", "--dev", str(root), "--faults", "12", "--seed", "5",
                  "--kind", "server_kill", "--kind", "node_kill", "--kind", "node_pause",
                  "--settle", "0.3", "--max-hold", "1.5", "-o", "json", timeout=500)
        assert out.returncode == 0, out.stdout + out.stderr[-3000:]
        summary = json.loads(out.stdout)
        assert summary["ok"] and summary["faults"] == 12 and summary["acked"] > 0
        assert "server_kill" in out.stderr  # seed 5 kills at least one server
        refused = run("chaos", "--dev", str(root), "--kind", "partition")
        assert refused.returncode == 2 and "cannot be partitioned" in refused.stderr
        state = json.loads((root / "state.json").read_text())
        after = [p["pid"] for p in state["nats"]]
        assert after != before and all(alive(pid) for pid in after)  # restarted, recorded
    finally:
        down = run("dev", "down", "--dir", str(root))
    assert down.returncode == 0
    assert not any(alive(pid) for pid in after)
    assert run("chaos", "--dev", str(root)).returncode == 2  # nothing runs there any more
