"""The ``pycluster`` command line, run as real processes against a real NATS server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pycluster import App
from pycluster.testing import wait_for

pytestmark = pytest.mark.timeout(90)

PYCLUSTER = [sys.executable, "-m", "pycluster.cli"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PYCLUSTER, *args], capture_output=True, text=True, timeout=timeout)


async def arun(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run, *args, timeout=timeout)


@pytest.mark.slow
def test_help_and_version() -> None:
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("run", "status", "stepdown", "plugins", "hooks", "demo"):
        assert cmd in out.stdout
    assert "0.1.0" in run("--version").stdout


@pytest.mark.slow
async def test_status_and_stepdown(make_platform: Any, nats_url: str, unique_name: str) -> None:
    a, b = App("orders"), App("orders")
    await make_platform("a", a)
    await wait_for(lambda: a.is_leader, 10)
    await make_platform("b", b)
    await wait_for(lambda: b.leader == "a", 10)
    # The platforms live in this event loop: run the CLI in a thread so they keep renewing.
    st = await arun("status", "--nats-url", nats_url, "--platform", unique_name, "--output",
                    "json")
    assert st.returncode == 0, st.stderr
    data = json.loads(st.stdout)
    assert sorted(n["node_id"] for n in data["nodes"]) == ["a", "b"]
    (orders,) = data["apps"]
    assert orders["leader"] == "a" and orders["epoch"] == a.epoch
    assert orders["active_on"] == ["a"] and orders["standby_on"] == ["b"]
    text = await arun("status", "--nats-url", nats_url, "--platform", unique_name)
    assert "orders" in text.stdout and "LEADER" in text.stdout

    sd = await arun("stepdown", "orders", "--nats-url", nats_url, "--platform", unique_name,
                    "--output", "json")
    assert sd.returncode == 0, sd.stderr
    assert json.loads(sd.stdout)["node"] == "a"
    await wait_for(lambda: b.is_leader, 10)


@pytest.mark.slow
def test_stepdown_without_leader_is_a_clear_error(nats_url: str, unique_name: str) -> None:
    sd = run("stepdown", "nothing", "--nats-url", nats_url, "--platform", unique_name)
    assert sd.returncode == 2 and f"no node of platform {unique_name!r} is alive" in sd.stderr


@pytest.mark.slow
def test_status_unreachable_nats(monkeypatch: pytest.MonkeyPatch) -> None:
    from pycluster.kernel.embedded import free_port

    monkeypatch.setenv("PYCLUSTER_CONNECT_TIMEOUT", "0.5")  # settings apply to the CLI too
    monkeypatch.setenv("PYCLUSTER_RECONNECT_WAIT", "0.1")
    st = run("status", "--nats-url", f"nats://127.0.0.1:{free_port()}", "--platform", "p")
    assert st.returncode == 2 and "error: NATS at" in st.stderr


@pytest.mark.slow
def test_bad_config_names_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: prod\nnode_id: n1\nlease_ttl: 0.2\n")
    out = run("run", "--config", str(cfg))
    assert out.returncode == 2 and "lease_ttl" in out.stderr and "0.2" in out.stderr
    cfg.write_text("name: prod\nnode_id: n1\napps:\n  - name: web\n    dockr: {image: x}\n")
    out = run("run", "--config", str(cfg))
    assert out.returncode == 2 and "dockr" in out.stderr and "installed:" in out.stderr


@pytest.mark.slow
async def test_run_config_process_backend_and_graceful_exit(
    nats_url: str, unique_name: str, tmp_path: Path
) -> None:
    marker = tmp_path / "backend-ran"
    cfg = tmp_path / "node.yaml"
    cfg.write_text(
        f"name: {unique_name}\nnode_id: n1\nnats_url: {nats_url}\nlease_ttl: 2\n"
        "heartbeat_interval: 0.5\napps:\n  - name: web\n    process:\n"
        # The path is an argument ($0), never pasted into the script: it may contain spaces.
        f"      command: [sh, -c, 'echo $PYCLUSTER_EPOCH > \"$0\"; exec sleep 600', "
        f"{json.dumps(str(marker))}]\n"
        "      grace: 2\n"
    )
    proc = subprocess.Popen([*PYCLUSTER, "run", "--config", str(cfg)],  # noqa: ASYNC220
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        await wait_for(lambda: marker.exists() and marker.read_text().strip(), 30)
        assert int(marker.read_text()) >= 1  # the epoch reached the backend
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "leaving gracefully" in out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_demo_exits_zero_by_itself() -> None:
    t0 = time.monotonic()
    out = run("demo", timeout=90)
    assert out.returncode == 0, out.stdout + out.stderr
    for needle in ("1. election", "2. crash", "took over", "3. graceful handover",
                   "0 overlapping"):
        assert needle in out.stdout
    assert time.monotonic() - t0 < 90
