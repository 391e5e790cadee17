# shellcheck shell=bash disable=SC2015
# Sourced by scripts/validate-*.sh: black-box checks of a running cluster through the
# `pycluster` CLI and small python snippets. Each script prints one line
#   PASS <check>: <figure>     (exit 0)   or   FAIL <check>: <why>   (exit 1)
#
# Environment:
#   PYCLUSTER_CONFIG  a node's config file (platform, NATS URL, credentials); default: n1.yaml
#                     of the dev cluster in PYCLUSTER_DEV_DIR (default .pycluster-dev)
#   PYTHON            the interpreter that has pycluster installed (default: python3)
#   VALIDATE_APP      the elected app to check (default: hello, the app of `pycluster dev up`)
set -u -o pipefail
PYTHON="${PYTHON:-python3}"
export VALIDATE_DIR
VALIDATE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYCLUSTER_CONFIG="${PYCLUSTER_CONFIG:-${PYCLUSTER_DEV_DIR:-.pycluster-dev}/n1.yaml}"
APP="${VALIDATE_APP:-hello}"

pyc() { "$PYTHON" -m pycluster.cli "$@"; }
pass() { echo "PASS $CHECK: $*"; exit 0; }
fail() { echo "FAIL $CHECK: $*"; exit 1; }
# jsget EXPR: evaluate a python expression over the JSON document on stdin (named d).
jsget() { "$PYTHON" -c "import json, sys; d = json.load(sys.stdin); print($1)"; }
wallclock() { date +%s.%N; }
# audit_time ACTION SINCE: unix time of the first audit entry ACTION about APP since SINCE.
audit_time() {
    pyc audit --app "$APP" --action "$1" --since "$2" -o json | "$PYTHON" -c "import json, sys; print(min((json.loads(l)['time'] for l in sys.stdin), default=''))"
}
# secs A B: B - A in seconds (milliseconds shown).
secs() { "$PYTHON" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"; }

[ -f "$PYCLUSTER_CONFIG" ] || { echo "FAIL ${CHECK:-validate}: no config file $PYCLUSTER_CONFIG (set PYCLUSTER_CONFIG or start pycluster dev up)"; exit 1; }

# leader_of APP -> "node epoch" from the election lease (no node detail: fast).
leader_of() {
    pyc status --no-detail -o json | jsget "' '.join(str(a.get(k)) for a in d['apps'] if a['app'] == '$1' for k in ('leader', 'epoch'))"
}
