#!/usr/bin/env bash
# Build the platform image with podman, on a machine without Docker and without a reachable registry.
#
#   deploy/podman/image.sh [--target runtime|local|""] [--tag NAME:TAG] [--dockerfile FILE] [--context DIR] [--base IMAGE]
#   deploy/podman/image.sh --base-only      # only the tools and the base image
#
# Idempotent: installs podman, runc and debootstrap (Debian packages) when missing, writes the containers.conf
# this sandbox needs, and builds the base image once (a Debian bookworm minbase with Python 3.11, imported as
# localhost/lp-base:bookworm-py311) unless --base names another one (python:3.11-slim where a registry is
# reachable). Prints the image's size in bytes on the last line. State lives in .local/podman.
set -euo pipefail
cd "$(dirname "$0")/../.."

TARGET=runtime
TAG=""
DOCKERFILE=Dockerfile
CONTEXT=.
BASE=""
BASE_ONLY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --target) TARGET=$2; shift 2 ;;
        --tag) TAG=$2; shift 2 ;;
        --dockerfile) DOCKERFILE=$2; shift 2 ;;
        --context) CONTEXT=$2; shift 2 ;;
        --base) BASE=$2; shift 2 ;;
        --base-only) BASE_ONLY=1; shift ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
TAG=${TAG:-localhost/lambda-pipeline:${TARGET:-latest}}
STATE=.local/podman
LOCAL_BASE=localhost/lp-base:bookworm-py311
mkdir -p "$STATE"

# -- tools ---------------------------------------------------------------------------------------------------
missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "needs ${missing[*]}: sudo apt-get install -y podman runc debootstrap" >&2
        exit 1
    fi
    echo "installing ${missing[*]} (Debian packages)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc debootstrap >"$STATE/apt.log" 2>&1 \
        || { apt-get update -q >>"$STATE/apt.log" 2>&1 \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc debootstrap >>"$STATE/apt.log" 2>&1; } \
        || { tail -20 "$STATE/apt.log" >&2; exit 1; }
fi

# Default ulimits and systemd cgroups both fail in this sandbox; crun fails on its hybrid cgroups (runc works).
cat >"$STATE/containers.conf" <<'CONF'
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
CONF
export CONTAINERS_CONF=$PWD/$STATE/containers.conf

# -- base image ----------------------------------------------------------------------------------------------
if [ -z "$BASE" ]; then
    BASE=$LOCAL_BASE
    if ! podman image exists "$BASE"; then
        echo "building $BASE with debootstrap (about a minute)"
        rootfs=$(mktemp -d "$PWD/$STATE/rootfs.XXXXXX")
        trap 'rm -rf "$rootfs"' EXIT
        debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3-pip,ca-certificates \
            bookworm "$rootfs" >"$STATE/debootstrap.log" 2>&1 || { tail -20 "$STATE/debootstrap.log" >&2; exit 1; }
        # The official image calls it `python`; the Dockerfile does too.
        ln -sf python3.11 "$rootfs/usr/bin/python"
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -c . | podman import --quiet - "$BASE" >/dev/null
        rm -rf "$rootfs"
        trap - EXIT
    fi
fi

[ "$BASE_ONLY" = 1 ] && { echo "base image: $BASE"; exit 0; }

# -- the image -----------------------------------------------------------------------------------------------
# --network host and the host's CA bundle: pip inside a RUN step reaches the package registry as the host does.
podman build --runtime runc --network host -v /etc/ssl/certs:/etc/ssl/certs:ro \
    --build-arg BASE_IMAGE="$BASE" ${TARGET:+--target "$TARGET"} -f "$DOCKERFILE" -t "$TAG" "$CONTEXT"
echo "$TAG size: $(podman image inspect --format '{{.Size}}' "$TAG")"
