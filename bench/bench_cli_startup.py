"""CLI start-up benchmark: wall time of ``pycluster --help``, ``pycluster status --help``,
``pycluster version`` and ``pycluster status`` against a real nats-server (a platform with no
node: it connects, reads membership and exits 2), beside
``python -c pass`` (the interpreter's own start) and the eager start of the same command line
(every plugin and every command module imported first, as the command line did before its
commands were declared lazily), all in one run and interleaved.

Run: ``python bench/bench_cli_startup.py [--runs 9] [--before CHECKOUT]``. ``--before`` adds
the same commands run from another checkout's sources (e.g. a ``git worktree`` of an older
commit: its ``core/src`` and ``plugins/*/src`` go first on ``PYTHONPATH``). Starts its own
nats-server. Prints the median and the spread (min-max) of each.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pycluster.testing import NatsServer

# The command line as it started before: the plugin manager and every command imported first.
EAGER = ("import sys, click; from pycluster.cli.main import cli; "
         "from pycluster.plugins import create_plugin_manager; pm = create_plugin_manager(); "
         "pm.hook.pycluster_add_cli_commands(cli=cli); ctx = click.Context(cli, obj=pm); "
         "[cli.get_command(ctx, n) for n in cli.list_commands(ctx)]; "
         "cli.main(args=sys.argv[1:], obj=pm, prog_name='pycluster')")
LAZY = "from pycluster.cli.main import main; main()"


def run(code: str, args: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code, *args], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    took = time.perf_counter() - t0
    # ``status`` of a platform without nodes connects, reads membership and exits 2 (no node
    # is alive): the whole path of a status command but the table.
    if res.returncode != 0 and not (res.returncode == 2 and "is alive" in res.stderr):
        raise SystemExit(f"{args}: exit {res.returncode}: {res.stderr[-500:]}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--before", type=Path, help="another checkout to run the same commands from")
    opts = ap.parse_args()
    server = NatsServer()
    asyncio.run(server.start())
    try:
        env = {**os.environ, "PYCLUSTER_NATS_URL": server.url}
        env.pop("PYCLUSTER_CONFIG", None)
        before_env = None
        if opts.before is not None:
            src = [opts.before / "core" / "src", *sorted(opts.before.glob("plugins/*/src"))]
            before_env = {**env, "PYTHONPATH": os.pathsep.join(map(str, src))}
        commands = {"--help": ["--help"], "status --help": ["status", "--help"],
                    "version": ["version"],
                    "status (real NATS, no node)": ["status", "-p", "bench"]}
        variants: dict[str, tuple[str, dict[str, str]]] = {"lazy": (LAZY, env),
                                                           "eager": (EAGER, env)}
        if before_env is not None:
            variants["before"] = (LAZY, before_env)
        times: dict[tuple[str, str], list[float]] = {}
        floor: list[float] = []
        for _ in range(opts.runs):  # interleaved: load on the machine hits every row alike
            floor.append(run("pass", [], env))
            for label, args in commands.items():
                for variant, (code, venv) in variants.items():
                    times.setdefault((label, variant), []).append(run(code, args, venv))

        def show(name: str, xs: list[float]) -> None:
            print(f"{name:<48} median {1000 * statistics.median(xs):7.0f} ms  "
                  f"(min {1000 * min(xs):5.0f}, max {1000 * max(xs):5.0f}; n={len(xs)})")

        print("load average (1, 5, 15 min): " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
        show("python -c pass", floor)
        for label in commands:
            for variant in variants:
                show(f"pycluster {label} [{variant}]", times[(label, variant)])
    finally:
        asyncio.run(server.stop())


if __name__ == "__main__":
    main()
