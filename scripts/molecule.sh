#!/usr/bin/env bash
# Run molecule with this host prepared: `scripts/molecule.sh test -s default`.
# Prepares the machine first (scripts/prepare-molecule.sh: fast when done), then runs the venv's
# molecule with the image name and container limits it computed.
set -euo pipefail
cd "$(dirname "$0")/.."
# What this run's preparation found, in a file of its own: a run beside it (make test: two at a
# time) may prepare another image.
env_file=$(mktemp "${TMPDIR:-/tmp}/webstats-molecule-env.XXXXXX")
trap 'rm -f "$env_file"' EXIT
WEBSTATS_MOLECULE_ENV_FILE=$env_file scripts/prepare-molecule.sh >/dev/null
# shellcheck source=/dev/null
. "$env_file"
rm -f "$env_file"
export PATH="$PWD/.venv/bin:$PATH"
export ANSIBLE_FORCE_COLOR=0 PY_COLORS=0 ANSIBLE_NOCOLOR=1
exec molecule "$@"
