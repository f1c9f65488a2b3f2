#!/usr/bin/env bash
# Prepare this machine to run the molecule scenarios (and `make demo`) on a real systemd host in
# a podman container, from nothing. Idempotent; about a second when everything is in place.
#
#   1. Debian packages (podman, debootstrap, ...) through scripts/install-deps.sh;
#   2. the Python tools venv and the Ansible collections (make venv);
#   3. cgroups: on a hybrid v1/v2 host, move every controller still on the cgroup2 side to a v1
#      hierarchy, or crun refuses to start anything (once per boot);
#   4. the systemd image: built with debootstrap and `podman import` when `podman image exists`
#      says it is missing (or its recipe changed); any other image name is pulled instead, e.g.
#      WEBSTATS_MOLECULE_IMAGE=docker.io/geerlingguy/docker-ubuntu2404-ansible:latest;
#   5. container limits: root here may lack CAP_SYS_RESOURCE, so each container gets explicit
#      rlimits no higher than this shell's hard limits;
#   6. an SSH key for the scenarios' Ansible connection (.cache/molecule-ssh/).
# Writes the results to .cache/molecule.env (or $WEBSTATS_MOLECULE_ENV_FILE), which the demo
# sources (scripts/molecule.sh: a file of its own, as runs of two images may go side by side).
#
# Environment: WEBSTATS_MOLECULE_IMAGE (default localhost/bioc-webstats-systemd:bookworm),
#              WEBSTATS_DEBIAN_MIRROR (default: debootstrap's own).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "prepare-molecule: $*"; }
image=${WEBSTATS_MOLECULE_IMAGE:-localhost/bioc-webstats-systemd:bookworm}
[ "$(id -u)" -eq 0 ] || { echo "prepare-molecule: run as root (podman, debootstrap, mounts)" >&2; exit 1; }

# 1-2. packages, venv, collections (each fast when already done)
scripts/install-deps.sh >/dev/null
make --no-print-directory -s venv >/dev/null

# 3. cgroups: hybrid mode → every controller on v1. Nothing to do on pure v1 or v2 hosts.
hybrid=0
unified=/sys/fs/cgroup/unified
if [ -d "$unified" ] && mountpoint -q "$unified"; then
  hybrid=1
  # (cgroupfs files report size 0: read them, don't test -s)
  for c in $(cat "$unified/cgroup.controllers" 2>/dev/null); do
    mkdir -p "/sys/fs/cgroup/$c"
    if ! mountpoint -q "/sys/fs/cgroup/$c"; then
      mount -t cgroup -o "rw,nosuid,nodev,noexec,relatime,$c" cgroup "/sys/fs/cgroup/$c"
      log "mounted cgroup v1 controller $c"
    fi
  done
fi

# 4. the image
# The recipe's hash is stored as a label: change the recipe and the image is rebuilt.
suite=${image##*:}
# openssh-server: the scenarios' Ansible runs reach the container over SSH with pipelining (a
# task costs a fraction of the podman connection's four podman calls); testinfra uses podman.
packages=systemd,systemd-sysv,python3,sudo,dbus,iproute2,ca-certificates,openssh-server
recipe="debootstrap minbase $suite $packages v2"
recipe_id=$(printf '%s' "$recipe" | sha256sum | cut -c1-16)
if [[ $image == localhost/bioc-webstats-systemd:* ]]; then
  have=""
  if podman image exists "$image"; then
    have=$(podman image inspect --format '{{ index .Labels "io.bioc-webstats.recipe" }}' "$image")
  fi
  if [ "$have" != "$recipe_id" ]; then
    log "building $image with debootstrap ($suite, about a minute)"
    rootfs=$(mktemp -d /var/tmp/webstats-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    # shellcheck disable=SC2086  # the mirror is optional
    debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" \
      ${WEBSTATS_DEBIAN_MIRROR:-} >"$rootfs.log" 2>&1 \
      || { tail -20 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
    rm -f "$rootfs.log"
    # A container has no console to log in on, and no hardware clock or udev to wait for.
    chroot "$rootfs" systemctl mask getty.target console-getty.service \
      systemd-udevd.service systemd-udev-trigger.service systemd-hwdb-update.service \
      systemd-remount-fs.service sys-kernel-debug.mount >/dev/null 2>&1 || true
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*_Packages
    tar -C "$rootfs" -c . | podman import -q \
      --change 'CMD ["/sbin/init"]' --change 'STOPSIGNAL SIGRTMIN+3' \
      --change 'ENV container=podman' \
      --change "LABEL io.bioc-webstats.recipe=$recipe_id" - "$image" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    log "built $image"
  fi
elif ! podman image exists "$image"; then
  log "pulling $image"
  podman pull -q "$image" >/dev/null
fi

# 5. limits for each container: podman's defaults exceed what an unprivileged root may set
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
pid_max=$(cat /proc/sys/kernel/pid_max)
[ "$nofile" = unlimited ] && nofile=1048576
[ "$nproc" = unlimited ] && nproc=$pid_max
[ "$nproc" -gt "$pid_max" ] && nproc=$pid_max
[ "$nofile" -gt 65536 ] && nofile=65536  # plenty for a test; keeps memory use of fd tables low

# 6. the SSH key of the scenarios' Ansible connection (create.yml authorizes it in each container)
mkdir -p .cache/molecule-ssh
chmod 0700 .cache/molecule-ssh
[ -f .cache/molecule-ssh/id_ed25519 ] || ssh-keygen -q -t ed25519 -N '' -C bioc-webstats-molecule -f .cache/molecule-ssh/id_ed25519

mkdir -p .cache
env_file=${WEBSTATS_MOLECULE_ENV_FILE:-.cache/molecule.env}
tmp=$(mktemp "$env_file.XXXXXX")  # its own: another run may be writing one
cat >"$tmp" <<EOF
# written by scripts/prepare-molecule.sh; sourced by scripts/molecule.sh and make demo
export WEBSTATS_MOLECULE_IMAGE=$image
export WEBSTATS_MOLECULE_NOFILE=$nofile
export WEBSTATS_MOLECULE_NPROC=$nproc
export WEBSTATS_MOLECULE_CGROUP_HYBRID=$hybrid
export WEBSTATS_MOLECULE_SSH_KEY=$PWD/.cache/molecule-ssh/id_ed25519
EOF
chmod 0644 "$tmp"
mv "$tmp" "$env_file"
log "ok ($image, nofile=$nofile nproc=$nproc hybrid_cgroups=$hybrid)"
