#!/usr/bin/env bash
# Install the Debian packages the tests, the demo and the benchmarks need. Idempotent and quick
# when everything is there already (no apt-get update unless something is missing).
set -euo pipefail

pkgs=(
  python3-venv git make curl ca-certificates
  gcc libc6-dev python3-dev        # the ETL's C scanner (setup.py), in the venv and the release
  postgresql                       # real PostgreSQL for the tests (throw-away clusters)
  r-base-core                      # contract tests: R reads the .tab files
  chromium                         # browser test of the pages
  nginx-light wrk                  # nginx in front of gunicorn in the tests; make bench-web
  logrotate                        # the base role's logrotate file and timer drop-in, checked
  sqlite3                          # make bench-history baseline (reading a legacy database)
  podman debootstrap uidmap slirp4netns fuse-overlayfs  # molecule on a real systemd host
  openssh-client                   # molecule: Ansible reaches the containers over SSH
  systemd                          # systemd-analyze for the static unit gates
  iptables                         # a database cut off by the network (test_web_http)
)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian package starts a cluster of its own; the tests start theirs, so keep it off.
if systemctl is-active --quiet postgresql 2>/dev/null; then systemctl stop postgresql || true; fi
echo "install-deps: ok"
