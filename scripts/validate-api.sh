#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR disable=SC2034,SC2015
# API bus: a probe node serves an app's method, another probe node calls it through the
# cluster's NATS; every call must be answered by the active instance. Figure: p50/p99.
CHECK=api
. "$(dirname "$0")/validate-lib.sh"

out="$("$PYTHON" "$VALIDATE_DIR/validate_probe.py" api 2>&1 | tail -1)" || fail "$out"
pass "$out"
