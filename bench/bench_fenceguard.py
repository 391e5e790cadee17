"""What the fence guard costs: start and stop of a command with and without it.

Run by hand: ``python bench/bench_fenceguard.py [rounds]``. Baseline: the same command started
directly with ``asyncio.create_subprocess_exec`` (its own session) and stopped with SIGTERM to
its group. Guarded: started through ``fenceguard.py`` until it reports ``started PID``, stopped
with ``stop 5`` until the guard exited (the whole tree reaped).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import sys
import time

from pycluster import fenceguard

COMMAND = ["sleep", "600"]


async def direct() -> tuple[float, float]:
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(*COMMAND, start_new_session=True)
    t1 = time.perf_counter()
    os.killpg(proc.pid, signal.SIGTERM)
    await proc.wait()
    return t1 - t0, time.perf_counter() - t1


async def guarded() -> tuple[float, float]:
    ours, theirs = socket.socketpair()
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-S", fenceguard.__file__, "--control-fd", str(theirs.fileno()),
        "--", *COMMAND, pass_fds=(theirs.fileno(),), start_new_session=True,
        stderr=asyncio.subprocess.DEVNULL)
    theirs.close()
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    line = await reader.readline()
    assert line.startswith(b"started "), line
    t1 = time.perf_counter()
    writer.write(b"stop 5\n")
    await proc.wait()
    t2 = time.perf_counter()
    writer.close()
    return t1 - t0, t2 - t1


def ms(xs: list[float]) -> str:
    xs = sorted(xs)
    return (f"p50 {statistics.median(xs) * 1000:7.2f} ms  "
            f"p90 {xs[int(len(xs) * 0.9) - 1] * 1000:7.2f} ms")


async def main(rounds: int) -> None:
    for name, fn in (("direct (baseline)", direct), ("fence guard", guarded)):
        starts, stops = [], []
        for _ in range(rounds):
            a, b = await fn()
            starts.append(a)
            stops.append(b)
        print(f"{name:18}  start {ms(starts)}   stop {ms(stops)}")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 50))
