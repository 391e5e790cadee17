#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR disable=SC2034,SC2015
# Failover: SIGSTOP the leader's node process (it runs on this host) past its lease; another
# node must take over with a higher epoch; after SIGCONT the old node comes back as a standby.
# Figure: the failover time, from the SIGSTOP to the new leader's leader_acquired entry in the
# audit trail (compare with the apps' lease_ttl).
CHECK=failover
. "$(dirname "$0")/validate-lib.sh"

read -r leader epoch <<<"$(leader_of "$APP")"
[ "$leader" != "None" ] || fail "$APP has no leader"
read -r host pid <<<"$(pyc status --no-detail -o json | jsget "' '.join(str(n.get(k)) for n in d['nodes'] if n['node_id'] == '$leader' for k in ('host', 'pid'))")"
[ "$host" = "$(hostname)" ] || fail "the leader $leader runs on $host, not on this host"
t0="$(wallclock)"
kill -STOP "$pid" || fail "cannot stop pid $pid"
trap 'kill -CONT "$pid" 2>/dev/null' EXIT
took=""
for _ in $(seq 1 600); do
    read -r new new_epoch <<<"$(leader_of "$APP")"
    if [ "$new" != "None" ] && [ "$new" != "$leader" ] && [ "$new_epoch" -gt "$epoch" ]; then
        got="$(audit_time leader_acquired "$t0")"
        took="$(secs "$t0" "${got:-nan}")"
        break
    fi
    sleep 0.1
done
kill -CONT "$pid"
[ -n "$took" ] || fail "no failover within 60 s of stopping $leader (pid $pid)"
for _ in $(seq 1 600); do
    role="$(pyc status --no-detail -o json | jsget "next((n.get('apps') or {}).get('$APP', {}).get('role') for n in d['nodes'] if n['node_id'] == '$leader')" 2>/dev/null)"
    [ "$role" = "passive" ] && pass "$leader -> $new (epoch $epoch -> $new_epoch) in $took s; $leader back as standby"
    sleep 0.1
done
fail "failover in $took s, but $leader did not come back as a standby (role: ${role:-?})"
