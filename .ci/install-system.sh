#!/usr/bin/env bash
# Install the Debian packages and configuration that pycluster's system tests need.
#
# Idempotent and fast when everything is already there: it asks dpkg first and only runs
# `apt-get update` / `apt-get install` when a package is missing, and rewrites
# /etc/containers/containers.conf only when its content differs.
#
#   podman, runc          container engine with a Docker-compatible API (runc: crun fails on
#                         this kind of machine's hybrid cgroups), used by the docker backend tests
#                         and to run systemd as PID 1 of a container
#   busybox-static        /bin/busybox, the only content of the minimal test image
#   debootstrap           builds the Debian rootfs of the systemd test image and of the
#                         Python base image of the container-packaging test
#   containernetworking-plugins
#                         podman's CNI network backend, pinned as the default below
#   netavark, aardvark-dns
#                         podman's other network backend, with DNS between containers by name:
#                         the compose test selects it for its own podman calls only
#   shellcheck            lints packaging/install.sh
#   iproute2              `ip netns`, veth, bridges (network-namespace hosts)
#   iputils-ping          reachability checks between namespaces
#   iputils-arping        gratuitous ARP for virtual-IP tests
#   procps                ps/pkill-free process inspection used by helpers (pgrep, ps)
#   bind9-dnsutils        `dig`, the DNS client the discovery plugin's DNS tests query it with
#
# Recommends are not installed: podman's (buildah, fuse-overlayfs, slirp4netns, uidmap,
# dbus-user-session) are for rootless use and image building, which the tests do not need.
set -euo pipefail

PACKAGES=(
    podman
    runc
    busybox-static
    debootstrap
    containernetworking-plugins
    netavark
    aardvark-dns
    shellcheck
    iproute2
    iputils-ping
    iputils-arping
    procps
    bind9-dnsutils
)

if [ "$(id -u)" -ne 0 ]; then
    echo "install-system.sh: must run as root" >&2
    exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
    if [ "$status" != "installed" ]; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-system.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # A failing extra source must not stop the install; a truly missing list fails below.
    apt-get update -q || echo "install-system.sh: apt-get update reported errors" >&2
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

CONF=/etc/containers/containers.conf
# network_backend: podman would pick netavark on a fresh machine where it is installed, and CNI
# on one whose store already has containers; pinned so every machine behaves the same.
WANTED='[containers]
default_ulimits = []
[network]
network_backend = "cni"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"'
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$WANTED" ]; then
    echo "install-system.sh: writing $CONF"
    mkdir -p /etc/containers
    printf '%s\n' "$WANTED" >"$CONF"
fi

echo "install-system.sh: system packages ready"
