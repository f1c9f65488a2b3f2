#!/usr/bin/env bash
# Re-fetch the vendored chart library (uPlot) from the npm registry at its pinned version and
# check it byte for byte. The pages load it from the wheel; nothing is fetched at run time.
#   scripts/vendor-chart.sh          fetch, verify, install into src/bioc_webstats/web/static/vendor/uplot
#   scripts/vendor-chart.sh --check  only verify that the committed files match the pinned release
set -euo pipefail

NAME=uplot
VERSION=1.6.32
TARBALL_SHA256=4b8a8191e425658e3ea8c8c1314b0fc679c861ee3a1af2b20c7b16ba50b5133d
JS_SHA256=19c8d4c6ad88929a79f4ae49d6f7161566dfd0ba3d15cc495e974f787eb78f1f

here=$(cd "$(dirname "$0")/.." && pwd)
dest="$here/src/bioc_webstats/web/static/vendor/uplot"

check_js() {
  echo "$JS_SHA256  $1" | sha256sum --check --quiet -
}

if [ "${1:-}" = "--check" ]; then
  check_js "$dest/uPlot.iife.min.js"
  grep -q "MIT License" "$dest/LICENSE"
  echo "vendor-chart: $NAME $VERSION ok"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$NAME@$VERSION" >/dev/null)
tarball="$tmp/$NAME-$VERSION.tgz"
echo "$TARBALL_SHA256  $tarball" | sha256sum --check --quiet -
tar -xzf "$tarball" -C "$tmp" package/dist/uPlot.iife.min.js package/LICENSE
check_js "$tmp/package/dist/uPlot.iife.min.js"
mkdir -p "$dest"
install -m 0644 "$tmp/package/dist/uPlot.iife.min.js" "$dest/uPlot.iife.min.js"
install -m 0644 "$tmp/package/LICENSE" "$dest/LICENSE"
printf '%s %s (npm), dist/uPlot.iife.min.js sha256 %s\n' "$NAME" "$VERSION" "$JS_SHA256" \
  >"$dest/VERSION"
echo "vendor-chart: installed $NAME $VERSION into $dest"
