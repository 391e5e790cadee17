"""Hostile-client soak: for a bounded time a raw NATS client with the platform's access throws
random subjects, malformed payloads, floods, record forgeries, deletions of lease keys, buckets
and streams at three node processes running a Singleton. An external witness records every act
of the active instance: no node may act with an older epoch after another acted with a newer
one, every node keeps running, and a single leader is back at the end.

``PYCLUSTER_SOAK_SECONDS`` (default 40) and ``PYCLUSTER_SOAK_SEED`` tune the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections import Counter
from pathlib import Path

import nats
import pytest

from pycluster.kernel import natsutil as nu
from pycluster.testing import NatsServer
from pycluster.testing.chaos import Witness
from pycluster.testing.nodes import NodeCluster

SECONDS = float(os.environ.get("PYCLUSTER_SOAK_SECONDS", "40"))


def _junk(rng: random.Random) -> bytes:
    return rng.choice([
        b"", b"{", b"null", b"[]", b'"x"', b"1e999", b'{"cooldown": 1e12}',
        b'{"successor": 5}', b'{"node": [], "epoch": "x"}', os.urandom(rng.randrange(1, 512)),
        json.dumps({"node": "n9", "epoch": 10**12, "ttl": 1e9}).encode(),
        json.dumps({"id": "n1", "priority": "high", "apps": 5}).encode(),
    ])


async def _attack(nc: nats.aio.client.Client, p: str, rng: random.Random, stats: Counter[str],
                  until: float) -> None:
    js = nc.jetstream()
    nodes = ["n1", "n2", "n3"]
    election = f"{p}_svc_election"
    while time.monotonic() < until:
        kind = rng.choice([
            "random_subject", "rpc", "api", "control", "flood", "lease_forge", "lease_delete",
            "member_forge", "events", "audit", "delete_stream",
        ])
        stats[kind] += 1
        try:
            if kind == "random_subject":
                subject = ".".join([p, *(rng.choice(["_", "svc", "x", "*", "rpc", "api"])
                                         for _ in range(rng.randrange(1, 5)))]).replace("*", "q")
                await nc.publish(subject, _junk(rng))
            elif kind == "rpc":
                method = rng.choice(["ping", "x" * rng.randrange(1, 60), f"m{rng.random()}"])
                target = rng.choice([*nodes, "_leader"])
                with contextlib.suppress(Exception):
                    await nc.request(f"{p}.svc.rpc.{target}.{method}".replace("0.", "0"),
                                     _junk(rng), timeout=0.2,
                                     headers={"Pc-Call": rng.choice(["", "{", "x" * 300])})
            elif kind == "api":
                with contextlib.suppress(Exception):
                    await nc.request(f"{p}._.api.svc.m{rng.randrange(100)}", _junk(rng),
                                     timeout=0.2)
            elif kind == "control":
                with contextlib.suppress(Exception):
                    await nc.request(f"{p}.svc.control.stepdown", _junk(rng), timeout=0.5)
            elif kind == "flood":
                for i in range(2000):
                    await nc.publish(f"{p}.svc.rpc._leader.m{i % 50}", b"x", reply="_INBOX.x")
                await nc.flush()
            elif kind == "lease_forge":
                headers = rng.choice([None, {"Nats-TTL": "1h"}, {"Nats-TTL": "bogus"}])
                await js.publish(nu.kv_subject(election, "leader"), _junk(rng), headers=headers)
            elif kind == "lease_delete":
                await js.publish(nu.kv_subject(election, "leader"), b"",
                                 headers={nu.KV_OP: rng.choice(["DEL", "PURGE"])})
            elif kind == "member_forge":
                node = rng.choice([*nodes, "ghost"])
                body = rng.choice([_junk(rng), json.dumps(
                    {"id": node, "priority": 10**6, "inc": "forged", "labels": {},
                     "apps": {"svc": {"eligible": True, "priority": 10**6}}}).encode()])
                await js.publish(nu.kv_subject(f"{p}_platform", f"nodes.{node}"), body,
                                 headers=rng.choice([None, {"Nats-TTL": "2s"}]))
            elif kind == "events":
                await js.publish(f"{p}.svc.events.{rng.choice(['a', 'b.c'])}", _junk(rng))
            elif kind == "audit":
                await nc.publish(f"{p}._.audit.x", _junk(rng))
            elif kind == "delete_stream" and rng.random() < 0.25:
                stream = rng.choice([nu.kv_stream(election), nu.kv_stream(f"{p}_platform"),
                                     f"{p}_svc_events"])
                with contextlib.suppress(Exception):
                    await js.delete_stream(stream)
        except Exception as exc:  # the attacker's own errors (timeouts, refusals) don't matter
            stats[f"error:{type(exc).__name__}"] += 1
        await asyncio.sleep(rng.uniform(0, 0.05))


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_hostile_client_soak_keeps_one_leader(tmp_path: Path) -> None:
    seed = int(os.environ.get("PYCLUSTER_SOAK_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"soak seed {seed}, {SECONDS:g}s")
    platform = f"soak{seed % 10000}"
    witness = Witness()
    async with NatsServer() as server:
        witness.start()
        cluster = NodeCluster(
            platform, [server.url], tmp_path, size=3, lease_ttl=2.0, heartbeat=0.5,
            extra_args=["--setup", "pycluster.testing.chaos:options",
                        "--setup-arg", f"witness={witness.path}",
                        "--setup-arg", "workload=witness", "--log-level", "WARNING"],
        )
        nc = await nats.connect(server.url, max_reconnect_attempts=-1)
        stats: Counter[str] = Counter()
        try:
            await cluster.start(timeout=60)
            await cluster.wait_for_leader(timeout=30)
            await _attack(nc, platform, rng, stats, time.monotonic() + SECONDS)
            leader = await cluster.wait_for_leader(timeout=60)
            print(f"attacks {dict(stats)}; leader at the end {leader}; "
                  f"{len(witness.records)} acts; gaps {sorted(witness.gaps())[-5:]}")
            dead = [n for n, proc in cluster.nodes.items() if not proc.alive]
            assert not dead, f"seed {seed}: nodes exited: {dead}: {cluster.log_tail(dead[0])}"
            assert witness.violations() == [], f"seed {seed}"
            assert cluster.overlaps() == [], f"seed {seed}"
        finally:
            await nc.close()
            await cluster.stop()
            witness.stop()
