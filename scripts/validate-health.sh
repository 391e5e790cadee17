#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR disable=SC2034,SC2015
# Health: every node answers `pycluster health` with nothing critical (within 30 s), and every
# node with a health_addr serves /health, /ready and /status with 200. Figure: the slowest
# /ready.
CHECK=health
. "$(dirname "$0")/validate-lib.sh"

# Checks run every health_interval: right after a fault a check may still show its last
# (failing) result, so a critical problem must persist for 30 s to fail this script.
for _ in $(seq 1 30); do
    out="$(pyc health -o json)" && break
    sleep 1
done
[ "$(echo "$out" | jsget "d.get('ok')" 2>/dev/null)" = "True" ] || fail "pycluster health for 30 s: $(echo "$out" | jsget "d['problems']" 2>/dev/null || echo "$out")"
nodes="$(echo "$out" | jsget "len(d['nodes'])")"
urls="$(pyc status -o json | jsget "' '.join(n['detail']['health_url'] for n in d['nodes'] if (n.get('detail') or {}).get('health_url'))")"
[ -n "$urls" ] || pass "$nodes node(s) healthy (no health_addr set: HTTP endpoints not checked)"
# shellcheck disable=SC2086  # one argument per URL
figure="$("$PYTHON" - $urls <<'PY'
import sys, time, urllib.request
worst = 0.0
for base in sys.argv[1:]:
    for path in ("/health", "/ready", "/status"):
        t = time.monotonic()
        with urllib.request.urlopen(base + path, timeout=5) as r:
            assert r.status == 200, (base, path, r.status)
        if path == "/ready":
            worst = max(worst, time.monotonic() - t)
print(f"{worst * 1000:.1f}")
PY
)" || fail "an HTTP endpoint did not answer 200 ($urls)"
pass "$nodes node(s) healthy; /health /ready /status 200 on $(echo "$urls" | wc -w); slowest /ready ${figure} ms"
