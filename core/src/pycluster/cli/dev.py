"""``pycluster dev up`` / ``dev down`` / ``dev status``: a local cluster that stays up.

``up`` starts nats-server processes (one, or a 3-server JetStream cluster) and node processes
(``pycluster run --config nodeN.yaml``), each in its own session so that they outlive the
command, writes everything under one directory (``state.json``, a config file per node, logs,
data) and prints the URLs. ``down`` stops them by the PIDs in ``state.json`` (SIGTERM, then
SIGKILL), after checking that each PID still runs the command it was started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import yaml

from ..kernel.embedded import find_nats_server, free_port
from ..kernel.errors import PyclusterError

DEV_DIR_ENV = "PYCLUSTER_DEV_DIR"
STATE = "state.json"


class DevError(PyclusterError):
    """``pycluster dev`` could not do what was asked (exit code 2)."""


def _spawn(argv: list[str], log: Path, cwd: Path) -> int:
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc.pid


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [p.decode(errors="replace") for p in raw.split(b"\0") if p]


def _ours(proc: dict[str, Any]) -> bool:
    """The PID still runs what ``up`` started (a PID may have been reused since)."""
    cmd = _cmdline(int(proc["pid"]))
    return cmd is not None and proc["mark"] in cmd


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    return True


def _alive(proc: dict[str, Any]) -> bool:
    return _ours(proc) and not _zombie(int(proc["pid"]))


def _nats_argv(binary: str, i: int, port: int, cport: int | None, routes: list[int],
               store: Path) -> list[str]:
    argv = [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store),
            "--server_name", f"dev-nats-{i + 1}"]
    if cport is not None:
        argv += ["--cluster_name", "dev", "--cluster", f"nats://127.0.0.1:{cport}",
                 "--routes", ",".join(f"nats://127.0.0.1:{p}" for p in routes)]
    return argv


async def _quiet(exc: Exception) -> None:
    """nats-py prints a traceback per failed attempt by default: a server starting up is
    expected to refuse at first."""


async def _wait_nats(urls: list[str], replicas: int, timeout: float) -> None:
    """Until a stream with ``replicas`` replicas can be created (JetStream and its meta leader
    are up: what a node needs)."""
    import nats
    from nats.js.api import StorageType, StreamConfig

    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            nc = await nats.connect(urls, connect_timeout=1, allow_reconnect=False,
                                    error_cb=_quiet)
        except Exception as exc:  # not listening yet
            last = exc
            await asyncio.sleep(0.2)
            continue
        try:
            js = nc.jetstream(timeout=2)
            name = f"pycluster_dev_probe_{os.getpid()}"
            await js.add_stream(StreamConfig(name=name, subjects=[f"pycluster.devprobe.{name}"],
                                             num_replicas=replicas, storage=StorageType.MEMORY))
            await js.delete_stream(name)
            return
        except Exception as exc:  # the cluster is still electing its meta leader
            last = exc
            await asyncio.sleep(0.3)
        finally:
            await nc.close()
    raise DevError(f"NATS at {', '.join(urls)} not ready after {timeout:g}s: {last}")


async def _wait_nodes(urls: list[str], platform: str, nodes: list[str],
                      procs: list[dict[str, Any]], timeout: float) -> None:
    import nats
    import nats.js.errors

    from ..kernel import natsutil as nu

    deadline = time.monotonic() + timeout
    nc = await nats.connect(urls, connect_timeout=2)
    try:
        js = nc.jetstream()
        while True:
            for p in procs:
                if not _alive(p):
                    raise DevError(f"{p['name']} exited; see its log {p['log']}")
            try:
                live = await nu.live_values(js, f"{platform}_platform", "nodes.")
            except nats.js.errors.NotFoundError:
                live = {}
            if {f"nodes.{n}" for n in nodes} <= set(live) or {n for n in nodes} <= set(live):
                return
            if time.monotonic() > deadline:
                raise DevError(f"nodes not all up after {timeout:g}s (alive: "
                               f"{', '.join(sorted(live)) or 'none'}); see the logs")
            await asyncio.sleep(0.2)
    finally:
        await nc.close()


def load_state(root: Path) -> dict[str, Any] | None:
    """The state ``up`` wrote under ``root`` (None when there is none)."""
    try:
        data: dict[str, Any] = json.loads((root / STATE).read_text())
    except (OSError, ValueError):
        return None
    return data


def stop_all(state: dict[str, Any], timeout: float = 15.0) -> list[str]:
    """SIGTERM nodes (a graceful leave), then servers; SIGKILL what outlives ``timeout``.
    Returns the names stopped."""
    stopped: list[str] = []
    for group in ("nodes", "nats"):
        procs = [p for p in state.get(group, []) if _alive(p)]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(p["pid"]), signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        for p in procs:
            if _alive(p):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(p["pid"]), signal.SIGKILL)
            stopped.append(p["name"])
    return stopped


def dev_up(root: Path, nodes: int, nats_cluster: bool, platform: str, lease_ttl: float,
           apps_file: str | None, timeout: float = 90.0) -> dict[str, Any]:
    """Start the servers and nodes under ``root``; return the state (also in state.json)."""
    root = root.absolute()
    old = load_state(root)
    if old is not None:
        running = [p["name"] for g in ("nats", "nodes") for p in old.get(g, []) if _alive(p)]
        if running:
            raise DevError(f"a dev cluster already runs from {root} ({', '.join(running)}); "
                           f"stop it first: pycluster dev down --dir {root}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    apps: list[Any] = [{"name": "hello", "mode": "singleton"}]
    if apps_file:
        from ..kernel.settings import read_config_file

        apps = list(read_config_file(apps_file).get("apps") or [])
    binary = find_nats_server()
    size = 3 if nats_cluster else 1
    ports = [free_port() for _ in range(size)]
    cports = [free_port() for _ in range(size)] if nats_cluster else [None] * size
    state: dict[str, Any] = {"platform": platform, "dir": str(root), "nats": [], "nodes": [],
                             "nats_urls": [f"nats://127.0.0.1:{p}" for p in ports],
                             "started": time.time()}
    try:
        for i in range(size):
            routes = [c for j, c in enumerate(cports) if j != i and c is not None]
            store = root / "nats" / f"s{i + 1}"
            store.mkdir(parents=True, exist_ok=True)
            argv = _nats_argv(binary, i, ports[i], cports[i], routes, store)
            log = root / "logs" / f"nats-{i + 1}.log"
            state["nats"].append({"name": f"nats-{i + 1}", "pid": _spawn(argv, log, root),
                                  "url": state["nats_urls"][i], "log": str(log),
                                  "mark": str(store), "argv": argv})
        _write(root, state)
        asyncio.run(_wait_nats(state["nats_urls"], size, timeout))
        for n in range(1, nodes + 1):
            node = f"n{n}"
            health = f"127.0.0.1:{free_port()}"
            cfg = {"name": platform, "node_id": node, "nats_url": state["nats_urls"],
                   "stream_replicas": size, "data_dir": str(root / "data" / node),
                   "health_addr": health, "lease_ttl": lease_ttl,
                   "heartbeat_interval": round(lease_ttl / 4, 3),
                   "labels": {"dev": "true", "index": str(n)}, "apps": apps}
            path = root / f"{node}.yaml"
            path.write_text("# written by pycluster dev up\n" + yaml.safe_dump(cfg))
            log = root / "logs" / f"{node}.log"
            argv = [sys.executable, "-m", "pycluster.cli", "run", "--config", str(path)]
            state["nodes"].append({"name": node, "pid": _spawn(argv, log, root),
                                   "config": str(path), "health": f"http://{health}",
                                   "log": str(log), "mark": str(path)})
        _write(root, state)
        asyncio.run(_wait_nodes(state["nats_urls"], platform,
                                [p["name"] for p in state["nodes"]],
                                state["nats"] + state["nodes"], timeout))
    except BaseException:
        stop_all(state, timeout=5)
        raise
    return state


class DevServers:
    """The nats-servers of a running dev cluster, as `pycluster.testing.chaos.FaultInjector`
    faults them: SIGKILL and restart with the same command line and store (each new PID is
    written to state.json at once, so ``dev down`` still stops it). Partitions need the
    proxies of a `pycluster.testing.NatsCluster` and are refused."""

    def __init__(self, root: Path, state: dict[str, Any]) -> None:
        self.root, self.state = root, state
        self.urls: list[str] = list(state["nats_urls"])

    def __len__(self) -> int:
        return len(self.state["nats"])

    def partition(self, i: int) -> None:
        raise DevError("a dev cluster cannot be partitioned (no proxies between its servers)")

    def heal(self) -> None:
        """Nothing to heal: servers are restarted at the end of each fault."""

    def kill(self, i: int) -> None:
        """SIGKILL server ``i`` and wait until it is gone."""
        proc = self.state["nats"][i]
        if _alive(proc):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc["pid"]), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(proc) and time.monotonic() < deadline:
            time.sleep(0.05)

    async def restart(self, i: int, timeout: float = 60.0) -> None:
        """Start server ``i`` again (same port, store and routes) and wait until JetStream
        places streams with every server's replicas again."""
        proc = self.state["nats"][i]
        if not _alive(proc):
            proc["pid"] = _spawn(list(proc["argv"]), Path(proc["log"]), self.root)
            _write(self.root, self.state)
        await _wait_nats(self.urls, len(self), timeout)


def load_running(root: Path) -> tuple[Path, dict[str, Any]]:
    """The state of the dev cluster under ``root``; `DevError` unless every server runs."""
    root = root.absolute()
    state = load_state(root)
    if state is None:
        raise DevError(f"no dev cluster in {root} (start one: pycluster dev up --dir {root})")
    down = [p["name"] for p in state["nats"] if not _alive(p)]
    if down:
        raise DevError(f"the dev cluster in {root} is not running ({', '.join(down)} down)")
    return root, state


def _write(root: Path, state: dict[str, Any]) -> None:
    tmp = root / f".{STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(root / STATE)


DIR_OPT = click.option(
    "--dir", "root", envvar=DEV_DIR_ENV, type=click.Path(file_okay=False),
    default=".pycluster-dev", show_default=True,
    help="Where state.json, the node config files, logs and data go (env: PYCLUSTER_DEV_DIR).")


@click.group("dev")
def dev_group() -> None:
    """A local cluster of real nats-server and node processes that stays up, for trying
    apps and the CLI by hand."""


@dev_group.command("up")
@click.option("--nodes", type=click.IntRange(1, 9), default=3, show_default=True,
              help="Node processes.")
@click.option("--nats-cluster", is_flag=True,
              help="Three nats-servers in one JetStream cluster, buckets with 3 replicas "
                   "(default: one server).")
@click.option("--platform", "-p", default="dev", show_default=True, help="Platform name.")
@click.option("--lease-ttl", type=click.FloatRange(min=1.0), default=2.0, show_default=True,
              help="The apps' lease in seconds.")
@click.option("--apps", "apps_file", type=click.Path(exists=True, dir_okay=False),
              help="A YAML/TOML file whose 'apps:' every node runs (default: one singleton "
                   "app 'hello').")
@DIR_OPT
@click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output format.")
def up_cmd(nodes: int, nats_cluster: bool, platform: str, lease_ttl: float,
           apps_file: str | None, root: str, output: str) -> None:
    """Start a local cluster and return once every node has joined; it stays up until
    ``pycluster dev down``.

    \b
    Examples:
      pycluster dev up                      # 1 nats-server, 3 nodes, app 'hello'
      pycluster dev up --nodes 5 --nats-cluster --apps myapps.yaml
      pycluster status --config .pycluster-dev/n1.yaml
      pycluster dev down

    \b
    Exit codes: 0 up; 2 could not start (nothing is left running).
    """
    from ..kernel.names import validate_ident

    try:
        validate_ident("platform", platform)
        state = dev_up(Path(root), nodes, nats_cluster, platform, lease_ttl, apps_file)
    except PyclusterError as exc:
        from .common import _fail

        _fail(exc)
        return
    if output == "json":
        click.echo(json.dumps(state, indent=2))
        return
    first = state["nodes"][0]["config"]
    click.echo(f"platform {platform}: {len(state['nats'])} nats-server(s), "
               f"{len(state['nodes'])} node(s) up (state in {state['dir']})")
    click.echo(f"NATS:   {','.join(state['nats_urls'])}")
    for p in state["nodes"]:
        click.echo(f"{p['name']:<7} pid {p['pid']:<8} health {p['health']}/health   "
                   f"config {p['config']}   log {p['log']}")
    click.echo(f"\ntry:    pycluster status --config {first}\n"
               f"        export PYCLUSTER_CONFIG={first}   # then: pycluster status, "
               f"pycluster audit, ...\nstop:   pycluster dev down --dir {root}")


@dev_group.command("down")
@DIR_OPT
@click.option("--purge", is_flag=True, help="Also delete the directory (logs, data).")
def down_cmd(root: str, purge: bool) -> None:
    """Stop the local cluster started by ``dev up`` (nodes leave gracefully first).

    Example: ``pycluster dev down --purge``
    """
    path = Path(root).absolute()
    state = load_state(path)
    if state is None:
        click.echo(f"no dev cluster in {path}")
    else:
        stopped = stop_all(state)
        click.echo(f"stopped {', '.join(stopped) or 'nothing (not running)'}")
        (path / STATE).unlink(missing_ok=True)
    if purge and path.exists():
        shutil.rmtree(path)
        click.echo(f"removed {path}")


@dev_group.command("status")
@DIR_OPT
@click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output format.")
def dev_status_cmd(root: str, output: str) -> None:
    """Show the processes of the local cluster and whether each runs (exit 1 if none is up).

    Example: ``pycluster dev status -o json``
    """
    state = load_state(Path(root).absolute())
    if state is None:
        click.echo(f"no dev cluster in {Path(root).absolute()}", err=True)
        sys.exit(1)
    procs = [{"name": p["name"], "pid": p["pid"], "running": _alive(p),
              "url": p.get("url") or p.get("health")} for g in ("nats", "nodes")
             for p in state[g]]
    if output == "json":
        click.echo(json.dumps({"platform": state["platform"], "processes": procs}, indent=2))
    else:
        for p in procs:
            click.echo(f"{p['name']:<8} pid {p['pid']:<8} "
                       f"{'running' if p['running'] else 'stopped':<8} {p['url']}")
    sys.exit(0 if any(p["running"] for p in procs) else 1)
