#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR disable=SC2034,SC2015
# SQLite no-loss: two node processes of examples/sqlite (app validate_notes, plugin
# pycluster-sqlite) join the cluster; rows acknowledged after db.wal.sync() on the primary must
# all be on the standby it promotes after a SIGKILL of the primary. Figure: rows, and how soon
# the promoted standby served.
CHECK=sqlite
. "$(dirname "$0")/validate-lib.sh"

out="$("$PYTHON" "$VALIDATE_DIR/validate_probe.py" sqlite 2>&1 | tail -1)" || fail "$out"
pass "$out"
