"""Each example run as documented in its README: real node processes (``pycluster run
app:platform``) on a real nats-server, checked from outside over HTTP, through a SIGKILL of the
active node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pycluster.kernel.embedded import free_port

HERE = Path(__file__).resolve().parent
LEASE = 2.0


class Nodes:
    """Node processes of one example, started the way its README says."""

    def __init__(self, folder: Path, nats_url: str, platform: str, tmp: Path) -> None:
        self.folder, self.tmp = folder, tmp
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PYCLUSTER_")}
        self.env.update({"PYCLUSTER_NATS_URL": nats_url, "PYCLUSTER_NAME": platform,
                         "PYCLUSTER_LEASE_TTL": str(LEASE),
                         "PYCLUSTER_HEARTBEAT_INTERVAL": "0.5",
                         "XDG_DATA_HOME": str(tmp / "data"), "PYTHONUNBUFFERED": "1"})
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, node: str, **env: str) -> None:
        """Start ``pycluster run app:TARGET`` (``TARGET`` in ``env``, default ``platform``)."""
        target = env.pop("TARGET", "platform")
        log = (self.tmp / f"{node}.log").open("ab")
        self.procs[node] = subprocess.Popen(
            [sys.executable, "-m", "pycluster.cli", "run", f"app:{target}"], cwd=self.folder,
            env={**self.env, "PYCLUSTER_NODE_ID": node, **env}, stdout=log,
            stderr=subprocess.STDOUT)
        log.close()

    def stop_one(self, node: str) -> int:
        """SIGTERM one node and return its exit code."""
        p = self.procs[node]
        p.send_signal(signal.SIGTERM)
        try:
            return p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            return p.wait()

    def log(self, node: str) -> str:
        return (self.tmp / f"{node}.log").read_text(errors="replace")

    def stop(self) -> dict[str, int | None]:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = {}
        for n, p in self.procs.items():
            try:
                codes[n] = p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[n] = p.wait()
        return codes


@pytest.fixture
def nodes(request: pytest.FixtureRequest, nats_url: str, unique_name: str,
          tmp_path: Path) -> Iterator[Any]:
    made: list[Nodes] = []

    def make(example: str) -> Nodes:
        made.append(Nodes(HERE / example, nats_url, unique_name, tmp_path))
        return made[-1]

    yield make
    for n in made:
        n.stop()


def get(url: str, timeout: float = 15) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def poll(fn: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_basic_fails_over_the_worker(nodes: Any) -> None:
    port = free_port()
    n = nodes("basic")
    n.start("n1", BASIC_PORT=str(port))
    n.start("n2", BASIC_PORT=str(port))
    url = f"http://127.0.0.1:{port}/"

    def answer() -> tuple[str, int] | None:
        status, body = get(url, timeout=2)
        if status != 200:
            return None
        _, node, _, epoch = body.split()
        return node, int(epoch)

    first, epoch = poll(answer, 60, "the worker to answer")
    # on_active runs after the backend stage: its line may follow the worker's first answer.
    poll(lambda: f"{first}: active (epoch {epoch})" in n.log(first), 30, "on_active")
    other = "n2" if first == "n1" else "n1"
    poll(lambda: f"{other}: standby" in n.log(other), 30, "the standby")
    n.procs[first].kill()  # SIGKILL the active node: its fence guard stops the worker
    n.procs[first].wait()
    t0 = time.monotonic()
    second = poll(lambda: (a := answer()) and a[0] == other and a, 30, "the failover")
    print(f"worker answered from {other} {time.monotonic() - t0:.2f}s after the SIGKILL")
    assert second[1] > epoch
    assert n.stop()[other] == 0  # a graceful leave on SIGTERM


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_gateway_calls_the_leader_across_a_failover(nodes: Any) -> None:
    ports = {"n1": free_port(), "n2": free_port()}
    n = nodes("gateway")
    for node, port in ports.items():
        n.start(node, GATEWAY_PORT=str(port))

    def quote(node: str) -> dict[str, Any] | None:
        status, body = get(f"http://127.0.0.1:{ports[node]}/price?sku=a1", timeout=15)
        return json.loads(body) if status == 200 else None

    a = poll(lambda: quote("n1"), 60, "gateway n1")
    b = poll(lambda: quote("n2"), 60, "gateway n2")
    assert a["gateway"] == "n1" and b["gateway"] == "n2"
    assert (a["node"], a["epoch"], a["price"]) == (b["node"], b["epoch"], b["price"])
    status, body = get(f"http://127.0.0.1:{ports['n1']}/price")
    assert status == 400 and "sku" in body
    leader = a["node"]
    survivor = "n2" if leader == "n1" else "n1"
    n.procs[leader].kill()
    n.procs[leader].wait()
    # The first request after the kill may wait for the failover; the bus retries it.
    after = poll(lambda: quote(survivor), 60, "an answer from the new leader")
    assert after["node"] == survivor and after["epoch"] > a["epoch"]
    assert after["price"] == a["price"]
    assert n.stop()[survivor] == 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sqlite_loses_no_synced_row(nodes: Any, tmp_path: Path) -> None:
    ports = {"n1": free_port(), "n2": free_port()}
    n = nodes("sqlite")
    for node, port in ports.items():
        n.start(node, NOTES_PORT=str(port), NOTES_DB=str(tmp_path / node / "notes.db"))

    def on(node: str, path: str) -> dict[str, Any] | None:
        status, body = get(f"http://127.0.0.1:{ports[node]}{path}", timeout=15)
        return json.loads(body) if status == 200 else None

    first = poll(lambda: next((x for x in ports if on(x, "/notes")), None), 90,
                 "the active node to serve")
    other = "n2" if first == "n1" else "n1"
    poll(lambda: f"{other}: standby" in n.log(other), 60, "the standby")
    acked = []
    for i in range(20):
        res = on(first, f"/add?text=row-{i}")
        assert res is not None and res["synced"] and res["node"] == first, res
        acked.append(res["id"])
    epoch = on(first, "/notes")["epoch"]  # type: ignore[index]

    def lag_shown() -> dict[str, Any] | None:
        # `pycluster status` asks each node: the standby's replication state and lag.
        out = subprocess.run([sys.executable, "-m", "pycluster.cli", "status", "-o", "json"],
                             capture_output=True, text=True, timeout=60, env=n.env)
        (app,) = json.loads(out.stdout)["apps"] if out.returncode == 0 else [{}]
        rep = (app.get("replication") or {}).get(other, {}).get("sqlite")
        return rep if rep and rep.get("lag") is not None else None

    rep = poll(lag_shown, 60, "the standby's lag in pycluster status")
    assert rep["plugin"] == "sqlite" and rep["lag"] >= 0
    n.procs[first].kill()  # SIGKILL the primary: only what NATS holds can survive
    n.procs[first].wait()
    t0 = time.monotonic()
    after = poll(lambda: on(other, "/notes"), 60, "the promoted standby to serve")
    print(f"{other} served the notes {time.monotonic() - t0:.2f}s after the SIGKILL")
    assert after["node"] == other and after["epoch"] > epoch
    ids = [r["id"] for r in after["notes"]]
    assert set(acked) <= set(ids), f"lost synced rows: {sorted(set(acked) - set(ids))}"
    assert [r["text"] for r in after["notes"] if r["id"] in acked] == [
        f"row-{i}" for i in range(20)]
    res = on(other, "/add?text=after")
    assert res is not None and res["id"] > max(acked)
    assert n.stop()[other] == 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_cache_keeps_every_entry_when_an_owner_dies(nodes: Any) -> None:
    ports = {f"n{i}": free_port() for i in (1, 2, 3)}
    n = nodes("cache")
    for node, port in ports.items():
        n.start(node, CACHE_PORT=str(port))

    def call(node: str, path: str) -> tuple[int, dict[str, Any]]:
        status, body = get(f"http://127.0.0.1:{ports[node]}{path}", timeout=20)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, {"raw": body}

    def ring_stable() -> bool:
        status, stats = call("n1", "/ring")
        return status == 200 and len(stats.get("members") or {}) == 3

    poll(ring_stable, 90, "the ring to have three members")
    keys = [f"user-{i}" for i in range(30)]
    owners = {}
    for k in keys:
        status, res = call("n1", f"/put?key={k}&value=v-{k}")
        assert status == 200, res
        owners[k] = res["node"]
    assert len(set(owners.values())) >= 2, owners  # the keys are spread over the nodes
    for k in keys[:5]:
        status, res = call("n2", f"/get?key={k}")
        assert status == 200 and res["value"] == f"v-{k}" and res["via"] == "n2", res
    assert call("n2", "/get?key=never-put")[0] == 404
    victim = next(x for x in ("n3", "n2") if x in owners.values())
    n.procs[victim].kill()  # its partitions move to the others, which load them from KV
    n.procs[victim].wait()
    t0 = time.monotonic()
    survivor = "n1"
    for k in keys:
        res = poll(lambda k=k: (r := call(survivor, f"/get?key={k}"))[0] == 200 and r[1], 90,
                   f"{k} after the owner died")
        assert res["value"] == f"v-{k}" and res["node"] != victim, res
    print(f"all {len(keys)} entries served {time.monotonic() - t0:.2f}s after the SIGKILL")
    assert all(code == 0 for node, code in n.stop().items() if node != victim)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_docker_container_follows_the_leader(nodes: Any, unique_name: str) -> None:
    from pycluster.testing.engines.podman import (
        PodmanService,
        build_busybox_image,
        podman_available,
    )
    from pycluster.testing.pytest_plugin import require

    ok, reason = podman_available()
    require("podman", ok, reason)
    image = build_busybox_image()  # local: no registry is reachable from the tests
    ports = {"n1": free_port(), "n2": free_port()}
    with PodmanService() as engine:
        import docker

        client = docker.DockerClient(base_url=engine.base_url, timeout=60)
        try:
            n = nodes("docker")
            for node, port in ports.items():
                n.start(node, WEB_PORT=str(port), WEB_IMAGE=image, DOCKER_HOST=engine.base_url)

            def page(node: str) -> tuple[str, int] | None:
                status, body = get(f"http://127.0.0.1:{ports[node]}/", timeout=3)
                if status != 200:
                    return None
                _, who, _, epoch = body.split()
                return who, int(epoch)

            first, epoch = poll(lambda: page("n1") or page("n2"), 120, "the container")
            # The README says to kill the node once it printed on_active (the container is
            # healthy by then).
            poll(lambda: f"{first}: active (epoch {epoch})" in n.log(first), 60, "on_active")
            other = "n2" if first == "n1" else "n1"
            poll(lambda: f"{other}: standby" in n.log(other), 30, "the standby")
            name = f"pycluster-{unique_name}-web-{first}"
            ctr = client.containers.get(name)
            assert ctr.labels["pycluster.epoch"] == str(epoch)
            n.procs[first].kill()  # SIGKILL the active node: its fence guard stops the container
            n.procs[first].wait()
            t0 = time.monotonic()
            second = poll(lambda: page(other), 90, "the container on the new leader")
            print(f"{other}'s container answered {time.monotonic() - t0:.2f}s after the SIGKILL")
            assert second[0] == other and second[1] > epoch
            def stopped() -> bool:
                ctr.reload()
                return bool(ctr.status != "running")

            t1 = time.monotonic()
            poll(stopped, 30, "the old container to stop")
            print(f"old container stopped {time.monotonic() - t1:.2f}s after the new answered")
            assert n.stop()[other] == 0
            gone = [c.name for c in client.containers.list(
                filters={"label": "pycluster.example=docker"})]
            assert gone == [], gone  # a graceful leave stops (and removes) the container
        finally:
            for c in client.containers.list(all=True,
                                            filters={"label": "pycluster.example=docker"}):
                c.remove(force=True)
            client.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_multizone_calls_across_the_leaf_link(nodes: Any) -> None:
    leaf_port, shop_port = free_port(), free_port()
    n = nodes("multizone")
    n.env.pop("PYCLUSTER_NATS_URL")  # each zone runs its own embedded nats-server
    n.start("hub-1", HUB_LEAF_PORT=str(leaf_port), TARGET="hub")
    n.start("edge-1", HUB_LEAF_URL=f"nats-leaf://127.0.0.1:{leaf_port}",
            SHOP_PORT=str(shop_port), TARGET="edge")

    def where() -> tuple[int, dict[str, Any]]:
        status, body = get(f"http://127.0.0.1:{shop_port}/where", timeout=15)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, {}

    got = poll(lambda: (lambda r: r[1] if r[0] == 200 else None)(where()), 90,
               "a cross-zone answer")
    assert got["edge_zone"] == "paris" and got["answered_from_zone"] == "eu"
    assert got["answer"]["platform"] == "prod" and got["answer"]["node"] == "hub-1"
    assert got["answer"]["asked_by"] == "edge"
    # The hub stops: the edge answers 503 (zone unreachable) and keeps running.
    assert n.stop_one("hub-1") == 0
    _, body = poll(lambda: (lambda r: r if r[0] == 503 else None)(where()), 60,
                   "503 once the hub is gone")
    assert "unreachable" in body["error"], body
    assert n.procs["edge-1"].poll() is None
    assert n.stop()["edge-1"] == 0
