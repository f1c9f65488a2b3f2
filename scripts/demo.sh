#!/usr/bin/env bash
# make demo / make demo-down: the real playbooks/deploy.yml into a local systemd container.
#
#   scripts/demo.sh up     prepare the machine, start the container `bioc-webstats-demo` (port
#                          published on 127.0.0.1:${WEBSTATS_DEMO_PORT:-8000}), copy the sample
#                          logs in, create the database and its logins (db-bootstrap.yml: a local
#                          PostgreSQL), deploy with inventory/local (which seeds the packages
#                          table), import the legacy history, run the ETL once through
#                          systemd, print the URL
#   scripts/demo.sh down   remove the container
# Idempotent: `up` again re-runs the deploy (0 changes) and the ETL (nothing new).
set -euo pipefail
cd "$(dirname "$0")/.."

name=bioc-webstats-demo   # = ansible_host of webstats-local in inventory/local/hosts.yml
port=${WEBSTATS_DEMO_PORT:-8000}
work=.cache/demo
log() { echo "demo: $*"; }

down() {
  if podman container exists "$name" 2>/dev/null; then
    podman rm -f -t 10 "$name" >/dev/null
    log "removed the container $name"
  else
    log "no container $name"
  fi
  rm -rf "$work"
}

up() {
  scripts/prepare-molecule.sh
  # shellcheck source=/dev/null
  . .cache/molecule.env
  export PATH="$PWD/.venv/bin:$PATH" ANSIBLE_FORCE_COLOR=0 ANSIBLE_NOCOLOR=1
  mkdir -p "$work"

  log "container $name (systemd, 127.0.0.1:$port → 8000)"
  cat >"$work/platform.yml" <<YAML
molecule_yml:
  platforms:
    - name: $name
      image: $WEBSTATS_MOLECULE_IMAGE
      published_ports: ["127.0.0.1:$port:8000"]
YAML
  ansible-playbook molecule/shared/create.yml -e "@$work/platform.yml"

  local inv=(-i inventory/local -i molecule/shared/local-overrides.yml)
  # (the options: webstats_sample_args in molecule/shared/local-overrides.yml)
  log "sample data (the legacy server's databases since 2009, then CloudFront logs from the cut-over day) into the container"
  ansible-playbook "${inv[@]}" molecule/shared/sample.yml -e "webstats_sample_dir=$PWD/$work/sample"

  log "database and logins: ansible-playbook playbooks/db-bootstrap.yml -i inventory/local"
  ansible-playbook "${inv[@]}" playbooks/db-bootstrap.yml

  log "deploy: ansible-playbook playbooks/deploy.yml -i inventory/local"
  ansible-playbook "${inv[@]}" playbooks/deploy.yml

  log "the legacy history up to the cut-over day (docs/CUTOVER.md step 3: import legacy-db)"
  podman exec "$name" runuser -u webstats -- env WEBSTATS_ENV_FILE=/etc/bioc-webstats/webstats.env \
    sh -c '/opt/bioc-webstats/current/bin/bioc-webstats import legacy-db /srv/bioc-webstats/legacy/download_db_*.sqlite' \
    | tail -n 2

  log "the ETL once through systemd (the timer's job: bioc-webstats daily)"
  podman exec "$name" timeout 600 systemctl start bioc-webstats-etl.service
  podman exec "$name" tail -n 1 /var/log/bioc-webstats/etl.log

  local url="http://127.0.0.1:$port"
  for _ in $(seq 60); do
    curl -fsS "$url/healthz" >/dev/null 2>&1 && break
    sleep 1
  done
  curl -fsS "$url/healthz" >/dev/null || { log "the service does not answer on $url/healthz"; exit 1; }
  echo
  echo "  bioc-webstats is running in the container $name (systemd, PostgreSQL, sample data)."
  echo "  Open: $url/packages/stats/"
  echo "  Shell: podman exec -it $name bash   (then: systemctl status bioc-webstats.target)"
  echo "  Remove: make demo-down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
