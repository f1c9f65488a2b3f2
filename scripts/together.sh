#!/usr/bin/env bash
# Run commands side by side; each one's output goes to a file, printed whole when it ends, with
# its time. Exits 1 when any failed (after all ended). `make test` runs its long checks in pairs
# with it: a molecule scenario spends half its time waiting (SSH round trips, systemd, the
# database), so two of them, or one and pytest, share the 2 cores instead of leaving one idle.
#
#   scripts/together.sh "make pytest" "scripts/molecule.sh test -s upgrade"
set -uo pipefail
cd "$(dirname "$0")/.."

[ "$#" -ge 1 ] || exit 0  # nothing asked (make test with no scenario of the pair)
logs=$(mktemp -d "${TMPDIR:-/tmp}/webstats-together.XXXXXX")
declare -A index=()
declare -a commands=() rcs=()
start=$SECONDS

stop() {
  for pid in "${!index[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
  wait
  rm -rf "$logs"
  exit 130
}
trap stop INT TERM HUP
# Each command leads its own process group, so that an interrupted run stops all of each.
set -m
for cmd in "$@"; do
  i=${#commands[@]}
  commands+=("$cmd")
  bash -c "$cmd" </dev/null >"$logs/$i.log" 2>&1 &
  index[$!]=$i
  echo "together: [$((i + 1))] started: $cmd"
done
set +m

failed=0
for _ in "${commands[@]}"; do
  wait -n -p pid
  rc=$?
  i=${index[$pid]}
  rcs[i]=$rc
  echo
  echo "==== together: [$((i + 1))] $([ "$rc" -eq 0 ] && echo ok || echo "FAILED (exit $rc)") after $((SECONDS - start)) s: ${commands[i]}"
  cat "$logs/$i.log"
  echo "==== together: [$((i + 1))] end of output"
  [ "$rc" -eq 0 ] || failed=1
done
rm -rf "$logs"
for i in "${!commands[@]}"; do
  [ "${rcs[i]}" -eq 0 ] || echo "together: FAILED (exit ${rcs[i]}): ${commands[i]}" >&2
done
exit "$failed"
