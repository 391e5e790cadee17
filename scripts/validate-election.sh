#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR disable=SC2034,SC2015
# Election: APP has exactly one leader, active on that node only; a graceful step-down hands
# leadership to another node with a higher epoch. Figure: the hand-over time, from the audit
# trail (the old leader's step_down entry to the new leader's leader_acquired, both stamped by the nodes).
CHECK=election
. "$(dirname "$0")/validate-lib.sh"

st="$(pyc status --no-detail -o json)" || fail "pycluster status failed"
read -r leader epoch active <<<"$(echo "$st" | jsget "' '.join([str(a['leader']), str(a['epoch']), ','.join(a['active_on'])]) if (a := next((a for a in d['apps'] if a['app'] == '$APP'), None)) else 'none none none'")"
[ "$leader" != "none" ] && [ "$leader" != "None" ] || fail "$APP has no leader ($st)"
[ "$active" = "$leader" ] || fail "$APP: leader $leader but active on '$active'"
t0="$(wallclock)"
pyc stepdown "$APP" -o json >/dev/null || fail "stepdown of $APP refused"
for _ in $(seq 1 300); do
    read -r new new_epoch <<<"$(leader_of "$APP")"
    if [ "$new" != "None" ] && [ "$new" != "$leader" ] && [ "$new_epoch" -gt "$epoch" ]; then
        asked="$(audit_time step_down "$t0")"
        got="$(audit_time leader_acquired "$t0")"
        [ -n "$asked" ] && [ -n "$got" ] || fail "hand-over to $new not in the audit trail"
        pass "one leader ($leader, epoch $epoch); hand-over to $new (epoch $new_epoch) in $(secs "$asked" "$got") s"
    fi
    sleep 0.1
done
fail "no new leader of $APP within 30 s of the step-down (still ${new:-?})"
