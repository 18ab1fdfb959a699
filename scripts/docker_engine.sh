#!/usr/bin/env bash
# Makes a Docker engine able to run kat_jax's SWE sandboxes (the docker backend of kat_jax.envs), with
# no image registry needed. Idempotent; each step is skipped when its result is already there:
#   1. engine: installs docker.io (apt-get) when there is no dockerd, starts `dockerd` with the vfs
#      storage driver in the background (log: $KAT_JAX_DOCKERD_LOG) when no engine answers, waits for
#      `docker info`;
#   2. base image kat-jax-base:bookworm: a Debian bookworm root filesystem (debootstrap --variant=minbase
#      with python3, pytest and git, from $KAT_JAX_DEBIAN_MIRROR) imported with `docker import`;
#   3. sandbox image ($KAT_JAX_SANDBOX_IMAGE, default kat-jax-sandbox:latest): docker/Dockerfile.sandbox
#      built FROM the base ($KAT_JAX_SANDBOX_BASE, default kat-jax-base:bookworm; a registry image such
#      as python:3.11-slim works where one is reachable), rebuilt when the Dockerfile or the base image
#      changed (label kat_jax.build_sha256);
#   4. check: `kat-jax env check --env swe --backend docker` on the bundled SWE instances must pass.
# Exits 0 only when all four succeed; otherwise names the failed step. Installing packages and
# starting dockerd need root. Run from anywhere: bash scripts/docker_engine.sh
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE_LOCAL=kat-jax-base:bookworm
BASE=${KAT_JAX_SANDBOX_BASE:-$BASE_LOCAL}
IMAGE=${KAT_JAX_SANDBOX_IMAGE:-kat-jax-sandbox:latest}
MIRROR=${KAT_JAX_DEBIAN_MIRROR:-http://deb.debian.org/debian}
DOCKERD_LOG=${KAT_JAX_DOCKERD_LOG:-/var/log/kat-jax-dockerd.log}
PYTHON=${KAT_JAX_PYTHON:-$(command -v python || command -v python3 || echo python3)}
STEP=start
ROOTFS=""
REPORTED=0

say() { echo "[docker_engine] $*"; }
fail() { echo "[docker_engine] FAILED at step '$STEP': $*" >&2; REPORTED=1; exit 1; }
on_exit() {
  local rc=$?
  [ -z "$ROOTFS" ] || rm -rf "$ROOTFS" "$ROOTFS.log"
  if [ "$rc" -ne 0 ] && [ "$REPORTED" -eq 0 ]; then
    echo "[docker_engine] FAILED at step '$STEP' (exit $rc)" >&2
  fi
}
trap on_exit EXIT

need_root() {
  [ "$(id -u)" -eq 0 ] || fail "$1 needs root (run this script as root, or by hand: docker/README.md)"
}

apt_install() {
  need_root "installing $*"
  say "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq || fail "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null \
    || fail "apt-get install $* failed"
}

engine_up() { docker info >/dev/null 2>&1; }

# 1. engine ----------------------------------------------------------------------------------------
STEP=engine
if engine_up; then
  say "engine: answering ($(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
else
  if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
    apt_install docker.io
  fi
fi
if ! engine_up; then   # (installing docker.io starts the engine where systemd runs)
  need_root "starting dockerd"
  say "engine: starting dockerd --storage-driver=vfs (log: $DOCKERD_LOG)"
  mkdir -p "$(dirname "$DOCKERD_LOG")"
  setsid dockerd --storage-driver=vfs >>"$DOCKERD_LOG" 2>&1 < /dev/null &
  for _ in $(seq 60); do
    engine_up && break
    kill -0 "$!" 2>/dev/null \
      || fail "dockerd exited; last lines of $DOCKERD_LOG: $(tail -n 5 "$DOCKERD_LOG")"
    sleep 1
  done
  engine_up || fail "no answer from dockerd after 60 s; see $DOCKERD_LOG"
  say "engine: up ($(docker info --format '{{.Driver}}, cgroup v{{.CgroupVersion}}'))"
fi

# 2. base image ------------------------------------------------------------------------------------
STEP=base-image
if docker image inspect "$BASE" >/dev/null 2>&1; then
  say "base image $BASE: present"
elif [ "$BASE" != "$BASE_LOCAL" ]; then
  say "base image $BASE: pulling"
  docker pull "$BASE" || fail "cannot pull $BASE (unset KAT_JAX_SANDBOX_BASE to build $BASE_LOCAL here)"
else
  command -v debootstrap >/dev/null || apt_install debootstrap
  need_root "debootstrap"
  ROOTFS=$(mktemp -d "${TMPDIR:-/tmp}/kat-jax-rootfs.XXXXXX")
  chmod 755 "$ROOTFS"   # it becomes the image's / (mktemp makes it 0700: no one but root could enter)
  say "base image $BASE: debootstrap bookworm from $MIRROR into $ROOTFS (a few minutes)"
  debootstrap --variant=minbase --include=python3,python3-pytest,git bookworm "$ROOTFS" "$MIRROR" \
    >"$ROOTFS.log" 2>&1 || fail "debootstrap failed; last lines: $(tail -n 5 "$ROOTFS.log")"
  say "base image $BASE: docker import"
  # package caches, apt lists and docs are left out: a smaller image makes containers faster to start
  tar -C "$ROOTFS" --exclude='./var/cache/apt/archives/*.deb' --exclude='./var/lib/apt/lists/*' \
      --exclude='./usr/share/doc/*' --exclude='./usr/share/man/*' --exclude='./usr/share/info/*' \
      --exclude='./usr/share/locale/*' -c . | docker import - "$BASE" >/dev/null \
    || fail "docker import of the root filesystem failed"
  rm -rf "$ROOTFS" "$ROOTFS.log"
  ROOTFS=""
  say "base image $BASE: imported"
fi

# 3. sandbox image ---------------------------------------------------------------------------------
STEP=sandbox-image
DOCKERFILE=$REPO/docker/Dockerfile.sandbox
[ -f "$DOCKERFILE" ] || fail "$DOCKERFILE not found"
want=$( { cat "$DOCKERFILE"; docker image inspect --format '{{.Id}}' "$BASE"; } | sha256sum | cut -c1-64)
have=$(docker image inspect --format '{{index .Config.Labels "kat_jax.build_sha256"}}' "$IMAGE" \
       2>/dev/null || true)
if [ "$have" = "$want" ]; then
  say "sandbox image $IMAGE: up to date"
else
  if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    why="not built from this Dockerfile and base"
  else
    why="missing"
  fi
  say "sandbox image $IMAGE: building FROM $BASE ($why)"
  # the Dockerfile copies nothing in: no build context (the repository root is large); the
  # builder's output (a deprecation notice for the legacy builder) is shown only when it fails
  if ! log=$(docker build --quiet --force-rm --build-arg "BASE=$BASE" \
               --label "kat_jax.build_sha256=$want" -t "$IMAGE" - < "$DOCKERFILE" 2>&1); then
    echo "$log" >&2
    fail "docker build of $IMAGE from $DOCKERFILE failed (output above)"
  fi
  docker image prune --force --filter "label=kat_jax.build_sha256" >/dev/null || true  # older builds
  say "sandbox image $IMAGE: built"
fi

# 4. check -----------------------------------------------------------------------------------------
STEP=env-check
# outside the repository: its docker/ folder would shadow the docker package for `python -m`
cd /
"$PYTHON" -c 'import docker; docker.from_env' 2>/dev/null \
  || fail "$PYTHON cannot import the docker package: pip install 'docker>=7.0' (or kat_jax[docker])"
"$PYTHON" -c 'import kat_jax' 2>/dev/null \
  || fail "$PYTHON cannot import kat_jax: pip install -e $REPO (or set KAT_JAX_PYTHON)"
say "check: kat-jax env check --env swe --backend docker (image $IMAGE)"
KAT_JAX_SANDBOX_IMAGE=$IMAGE "$PYTHON" -m kat_jax.cli env check --env swe --backend docker \
  || fail "kat-jax env check --env swe --backend docker failed with the image $IMAGE"
STEP=finished
say "ok: the engine runs $IMAGE"
