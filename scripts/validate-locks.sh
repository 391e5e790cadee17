#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR disable=SC2034,SC2015
# Locks: probe nodes (in one python process) increment a counter in a NATS KV bucket under a
# platform lock, read-sleep-write: a lost or doubled increment means two holders at once.
# Figure: increments, and lock hand-overs per second.
CHECK=locks
. "$(dirname "$0")/validate-lib.sh"

out="$("$PYTHON" "$VALIDATE_DIR/validate_probe.py" locks 2>&1 | tail -1)" || fail "$out"
pass "$out"
