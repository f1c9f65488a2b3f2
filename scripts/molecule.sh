#!/usr/bin/env bash
# Run molecule with this host prepared: `scripts/molecule.sh test -s default`.
# Prepares the machine first (scripts/prepare-molecule.sh: fast when done), then runs the venv's
# molecule with the image name and container limits it computed.
set -euo pipefail
cd "$(dirname "$0")/.."
chosen=${WEBSTATS_MOLECULE_IMAGE:-}
scripts/prepare-molecule.sh >/dev/null
# shellcheck source=/dev/null
. .cache/molecule.env
# the image asked for, whatever a run beside this one prepared last (make test: two at a time)
[ -z "$chosen" ] || export WEBSTATS_MOLECULE_IMAGE="$chosen"
export PATH="$PWD/.venv/bin:$PATH"
export ANSIBLE_FORCE_COLOR=0 PY_COLORS=0 ANSIBLE_NOCOLOR=1
exec molecule "$@"
