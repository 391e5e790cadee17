#!/usr/bin/env bash
# Install pycluster as a systemd service on a Debian/Ubuntu/RHEL-like host.
#
#   sudo ./install.sh --platform prod --nats-url nats://10.0.0.1:4222,nats://10.0.0.2:4222 --start
#
# What it does (each step only when something differs; a second run changes nothing and says so):
#   - a system user and group "pycluster" (home /var/lib/pycluster, no login shell);
#   - a virtualenv under /opt/pycluster with pycluster (from PyPI, or --from a local path:
#     a directory of wheels or a wheel file) and the extras asked for;
#   - /usr/local/bin/pycluster -> the venv's script (the unit's ExecStart);
#   - the unit pycluster@.service (next to this script) in /etc/systemd/system, plus a drop-in
#     that runs it as the pycluster user;
#   - /etc/pycluster/<platform>.yaml and /etc/pycluster/<platform>.env (mode 0640, group
#     pycluster) when they do not exist yet: files you edited are never overwritten;
#   - with --enable / --start: enables / starts pycluster@<platform>.
# Needs root, python3 with the venv module (Debian: apt-get install python3-venv) and systemd.
set -euo pipefail

PREFIX=/opt/pycluster
CONF_DIR=/etc/pycluster
UNIT_DIR=/etc/systemd/system
BIN_LINK=/usr/local/bin/pycluster
USER_NAME=pycluster
PLATFORM=default
SOURCE=""
EXTRAS=""
VERSION=""
NATS_URL=""
NODE_ID=""
ENABLE=0
START=0
UPGRADE=()
PYTHON=python3
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
UNIT_SRC="$HERE/pycluster@.service"
ENV_EXAMPLE="$HERE/pycluster.env.example"

usage() {
    cat <<'EOF'
Usage: install.sh [OPTIONS]

  --platform NAME     platform (unit instance pycluster@NAME, /etc/pycluster/NAME.yaml/.env);
                      default: default
  --nats-url URLS     NATS URL(s), comma-separated, written to NAME.env when it is created
                      (unset: the node runs an embedded nats-server)
  --node-id ID        node id written to NAME.env when it is created (default: host name)
  --from PATH         install from PATH instead of PyPI: a directory of wheels (no index is
                      used: it must hold every dependency; from a checkout:
                      pip wheel -w wheels ./core ./plugins/* .) or a wheel file
  --extras LIST       pycluster extras, comma-separated (e.g. systemd,sqlite)
  --version VERSION   pycluster version from PyPI (default: the newest)
  --prefix DIR        virtualenv directory (default: /opt/pycluster)
  --python PYTHON     interpreter that creates the venv (default: python3)
  --upgrade           upgrade pycluster (and the extras) to the newest version found
  --enable            enable pycluster@NAME (started at boot)
  --start             enable and start pycluster@NAME now
  -h, --help          this help

Examples:
  sudo ./install.sh --platform prod --nats-url nats://10.0.0.1:4222 --extras sqlite --start
  sudo ./install.sh --from ./wheels --platform lab      # offline, from `pip wheel` output
EOF
}

die() { echo "install.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --platform) PLATFORM="${2:?}"; shift 2 ;;
        --nats-url) NATS_URL="${2:?}"; shift 2 ;;
        --node-id) NODE_ID="${2:?}"; shift 2 ;;
        --from) SOURCE="${2:?}"; shift 2 ;;
        --extras) EXTRAS="${2:?}"; shift 2 ;;
        --version) VERSION="${2:?}"; shift 2 ;;
        --prefix) PREFIX="${2:?}"; shift 2 ;;
        --python) PYTHON="${2:?}"; shift 2 ;;
        --upgrade) UPGRADE=(--upgrade); shift ;;
        --enable) ENABLE=1; shift ;;
        --start) ENABLE=1; START=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "must run as root"
[[ "$PLATFORM" =~ ^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$ ]] \
    || die "--platform: '$PLATFORM' must be letters, digits, '-' or '_'"
[ -f "$UNIT_SRC" ] || die "$UNIT_SRC not found (run install.sh from pycluster's packaging/)"
command -v systemctl >/dev/null || die "systemctl not found: this script installs a systemd unit"

CHANGED=0
changed() { CHANGED=1; echo "install.sh: $*"; }

# Write stdin to $1 (mode $2, owner $3) unless it already has exactly that content and mode.
put_file() {
    local dest="$1" mode="$2" owner="$3" tmp
    tmp="$(mktemp)"
    cat >"$tmp"
    if [ -f "$dest" ] && cmp -s "$tmp" "$dest" \
        && [ "$(stat -c '%a %U:%G' "$dest")" = "${mode#0} $owner" ]; then
        rm -f "$tmp"
        return 1
    fi
    install -D -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" "$tmp" "$dest"
    rm -f "$tmp"
    changed "wrote $dest"
}

# 1. The system user.
if ! getent group "$USER_NAME" >/dev/null; then
    groupadd --system "$USER_NAME"
    changed "created group $USER_NAME"
fi
if ! getent passwd "$USER_NAME" >/dev/null; then
    useradd --system --gid "$USER_NAME" --home-dir /var/lib/pycluster --no-create-home \
        --shell /usr/sbin/nologin --comment "pycluster node" "$USER_NAME"
    changed "created user $USER_NAME"
fi

# 2. The virtualenv and pycluster in it.
if [ ! -x "$PREFIX/bin/python" ]; then
    "$PYTHON" -m venv "$PREFIX" || die "cannot create a venv with $PYTHON (Debian: apt-get install python3-venv)"
    changed "created the virtualenv $PREFIX"
fi
PIP=("$PREFIX/bin/python" -m pip --disable-pip-version-check --quiet)
spec="pycluster"
[ -n "$EXTRAS" ] && spec="pycluster[$EXTRAS]"
if [ -z "$SOURCE" ]; then
    [ -n "$VERSION" ] && spec="$spec==$VERSION"
    args=("$spec")
elif [ -d "$SOURCE" ] && compgen -G "$SOURCE/*.whl" >/dev/null; then
    [ -n "$VERSION" ] && spec="$spec==$VERSION"
    args=(--no-index --find-links "$(cd "$SOURCE" && pwd)" "$spec")
elif [ -f "$SOURCE" ] && [[ "$SOURCE" == *.whl ]]; then
    src="$(cd "$(dirname "$SOURCE")" && pwd)/$(basename "$SOURCE")"
    args=("$src${EXTRAS:+[$EXTRAS]}")
else
    die "--from $SOURCE: expected a directory of wheels or a .whl file (from a checkout: pip wheel -w wheels ./core ./plugins/* .)"
fi
before="$("${PIP[@]}" freeze --all)"
"${PIP[@]}" install "${UPGRADE[@]}" "${args[@]}"
after="$("${PIP[@]}" freeze --all)"
if [ "$before" != "$after" ]; then
    changed "installed into $PREFIX: $(diff <(echo "$before") <(echo "$after") | sed -n 's/^> //p' | tr '\n' ' ')"
fi
[ -x "$PREFIX/bin/pycluster" ] || die "$PREFIX/bin/pycluster missing after the install"
if [ "$(readlink "$BIN_LINK" 2>/dev/null || true)" != "$PREFIX/bin/pycluster" ]; then
    mkdir -p "$(dirname "$BIN_LINK")"
    ln -sfn "$PREFIX/bin/pycluster" "$BIN_LINK"
    changed "linked $BIN_LINK -> $PREFIX/bin/pycluster"
fi

# 3. The unit, and a drop-in that runs it as the pycluster user (the unit's hardening stays).
unit_changed=0
put_file "$UNIT_DIR/pycluster@.service" 0644 root:root <"$UNIT_SRC" && unit_changed=1
put_file "$UNIT_DIR/pycluster@.service.d/10-install.conf" 0644 root:root <<EOF && unit_changed=1
# Written by install.sh: the node runs as the $USER_NAME user, from the virtualenv.
[Service]
User=$USER_NAME
Group=$USER_NAME
Environment=PYCLUSTER_NATS_SERVER=$PREFIX/bin/nats-server
EOF
if [ "$unit_changed" -eq 1 ]; then
    systemctl daemon-reload
fi

# 4. Config and environment files: created once, never overwritten.
install -d -m 0750 -o root -g "$USER_NAME" "$CONF_DIR"
conf="$CONF_DIR/$PLATFORM.yaml"
if [ ! -e "$conf" ]; then
    put_file "$conf" 0640 "root:$USER_NAME" <<EOF
# pycluster node of platform $PLATFORM (pycluster@$PLATFORM). Settings: docs/configuration.md;
# NATS URL, credentials and the node id are in $PLATFORM.env. \`pycluster doctor --config $conf\`
# checks this file against the machine.
name: $PLATFORM
health_addr: 127.0.0.1:8080
metrics_addr: 127.0.0.1:9100
apps: []
EOF
fi
envf="$CONF_DIR/$PLATFORM.env"
if [ ! -e "$envf" ]; then
    {
        if [ -f "$ENV_EXAMPLE" ]; then cat "$ENV_EXAMPLE"; echo; fi
        echo "# Set by install.sh:"
        [ -n "$NODE_ID" ] && echo "PYCLUSTER_NODE_ID=$NODE_ID"
        [ -n "$NATS_URL" ] && echo "PYCLUSTER_NATS_URL=$NATS_URL"
        true
    } | put_file "$envf" 0640 "root:$USER_NAME"
fi

# 5. Enable / start the instance.
instance="pycluster@$PLATFORM.service"
if [ "$ENABLE" -eq 1 ] && ! systemctl is-enabled --quiet "$instance" 2>/dev/null; then
    systemctl enable --quiet "$instance"
    changed "enabled $instance"
fi
if [ "$START" -eq 1 ] && ! systemctl is-active --quiet "$instance"; then
    systemctl start "$instance"
    changed "started $instance"
elif [ "$CHANGED" -eq 1 ] && systemctl is-active --quiet "$instance"; then
    echo "install.sh: $instance is running the previous installation: systemctl restart $instance"
fi

if [ "$CHANGED" -eq 0 ]; then
    echo "install.sh: nothing changed (everything was already installed)"
else
    echo "install.sh: done. Edit $conf and $envf, then: systemctl enable --now $instance"
fi
