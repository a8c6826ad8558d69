#!/usr/bin/env bash
# Builds the image splitmirror:latest from this checkout without pulling
# anything: release binaries (stripped) plus the shared libraries `ldd`
# names, staged as a root file system and copied onto `FROM scratch`.
set -euo pipefail
cd "$(dirname "$0")/.."
image="${1:-splitmirror:latest}"
binaries=(array-node db-server backup-server console)

cargo build --release --quiet $(printf -- '--bin %s ' "${binaries[@]}")

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/usr/local/bin" "$stage/tmp" "$stage/data"
chmod 1777 "$stage/tmp"
for bin in "${binaries[@]}"; do
  strip -o "$stage/usr/local/bin/$bin" "target/release/$bin"
  # Every library the binary loads, at the path the loader looks for it.
  ldd "target/release/$bin" | awk '/=>/ { print $3 } /^\t\// { print $1 }' | while read -r lib; do
    [ -n "$lib" ] && [ -e "$lib" ] || continue
    mkdir -p "$stage$(dirname "$lib")"
    cp -L -n "$lib" "$stage$lib"
  done
done
docker build --quiet -t "$image" -f docker/Dockerfile "$stage" >/dev/null
echo "built $image ($(docker image inspect "$image" --format '{{.Size}}') bytes)"
