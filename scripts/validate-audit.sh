#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR disable=SC2034,SC2015
# Audit: the trail has election entries for APP, and a step-down shows up in it within
# seconds. Figure: the number of entries read, and how long after the step-down request (its
# step_down entry) the new leader's entry was written.
CHECK=audit
. "$(dirname "$0")/validate-lib.sh"

count="$(pyc audit --app "$APP" --limit 1000 -o json | "$PYTHON" -c "import json, sys; print(sum(1 for l in sys.stdin if json.loads(l)['category'] == 'election'))")" || fail "pycluster audit failed"
[ "$count" -gt 0 ] || fail "no election entry for $APP"
since="$(wallclock)"
pyc stepdown "$APP" >/dev/null || fail "stepdown of $APP refused"
for _ in $(seq 1 100); do
    asked="$(audit_time step_down "$since")"
    got="$(audit_time leader_acquired "$since")"
    [ -n "$asked" ] && [ -n "$got" ] && pass "$count election entries for $APP; step_down and the new leader's leader_acquired audited, $(secs "$asked" "$got") s apart"
    sleep 0.2
done
fail "the step-down of $APP was not audited within 20 s"
