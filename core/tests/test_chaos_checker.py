"""The chaos checker's pure logic on synthetic histories: it must find each kind of violation
(so that a green chaos run means something) and accept a clean history."""

from __future__ import annotations

import json
from pathlib import Path

from pycluster.testing.chaos import Witness, check


def _write(state: Path, node: str, *ops: dict[str, object]) -> None:
    state.mkdir(exist_ok=True)
    with (state / f"{node}.ops.jsonl").open("a") as fh:
        for op in ops:
            fh.write(json.dumps({"node": node, "pid": 1, **op}) + "\n")


def _incr(op: str, value: int, t0: float, t: float) -> list[dict[str, object]]:
    return [{"type": "invoke", "op": op, "t": t0},
            {"type": "ok", "op": op, "value": value, "t0": t0, "t": t}]


def test_clean_history(tmp_path: Path) -> None:
    _write(tmp_path, "n1", *_incr("a1", 1, 0.0, 1.0), *_incr("a2", 2, 1.1, 2.0),
           {"type": "invoke", "op": "a3", "t": 2.1})  # killed mid-op: indeterminate
    _write(tmp_path, "n2", {"type": "read", "value": 0, "t0": 0.0, "t": 0.5},
           {"type": "read", "value": 2, "t0": 2.5, "t": 2.6})
    report = check(tmp_path, final_value=3)  # a3 landed: allowed, it was indeterminate
    assert report.ok, report.summary()
    assert (report.acked, report.indeterminate, report.reads) == (2, 1, 2)


def test_overwritten_increment_is_lost(tmp_path: Path) -> None:
    _write(tmp_path, "n1", *_incr("a1", 1, 0.0, 1.0))
    _write(tmp_path, "n2", *_incr("b1", 1, 0.5, 1.5))
    report = check(tmp_path, final_value=1)
    assert len(report.lost) == 1 and not report.ok


def test_rolled_back_value_is_lost(tmp_path: Path) -> None:
    _write(tmp_path, "n1", *_incr("a1", 1, 0.0, 1.0), *_incr("a2", 2, 1.0, 2.0))
    assert check(tmp_path, final_value=1).lost


def test_increment_applied_twice_is_doubled(tmp_path: Path) -> None:
    _write(tmp_path, "n1", *_incr("a1", 1, 0.0, 1.0))
    report = check(tmp_path, final_value=2)
    assert report.doubled and not report.lost


def test_stale_read_after_acknowledged_write_or_read(tmp_path: Path) -> None:
    _write(tmp_path, "n1", *_incr("a1", 1, 0.0, 1.0))
    _write(tmp_path, "n2", {"type": "read", "value": 0, "t0": 1.5, "t": 1.6})
    assert len(check(tmp_path, final_value=1).stale_reads) == 1
    # Concurrent with the write: either value is fine.
    other = tmp_path / "other"
    _write(other, "n1", *_incr("a1", 1, 0.0, 1.0))
    _write(other, "n2", {"type": "read", "value": 0, "t0": 0.9, "t": 1.6},
           {"type": "read", "value": 1, "t0": 2.0, "t": 2.1},
           {"type": "read", "value": 0, "t0": 2.2, "t": 2.3})  # after a read of 1: stale
    assert len(check(other, final_value=1).stale_reads) == 1


def test_witness_split_brain_and_gaps() -> None:
    w = Witness()
    w.records = [(0.0, "n1", 5), (0.01, "n1", 5), (1.0, "n2", 7), (1.01, "n1", 5),
                 (1.02, "n2", 7), (1.03, "n1", 9)]
    bad = w.violations()
    assert len(bad) == 1 and "n1 acted with epoch 5 after n2 acted with 7" in bad[0]
    assert [round(g, 2) for g in w.gaps()] == [0.99]
