#!/usr/bin/env bash
# Builds the fleetboot Debian package from this workspace: the binary, its man pages and
# shell completions (generated from the command line by `fleetboot manual`), the config,
# the systemd units, sysusers/tmpfiles entries and maintainer scripts (packaging/), as
# described by [package.metadata.deb] in crates/fleetboot/Cargo.toml.
#   usage: packaging/build-deb.sh [--profile release|dev] [--output DIR] [--fast] [--no-build]
# --no-build packages the binary already in target/PROFILE (the tests use it: rebuilding
# it while other tests run it would replace it under them).
# Needs cargo-deb (cargo install cargo-deb --locked; scripts/setup.sh installs it).
# Prints the path of the .deb it wrote on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release output=target/debian fast=() build=1
while [ $# -gt 0 ]; do
  case $1 in
    --profile) profile=$2; shift 2 ;;
    --output) output=$2; shift 2 ;;
    --fast) fast=(--fast); shift ;;
    --no-build) build=0; shift ;;
    *) echo "usage: packaging/build-deb.sh [--profile release|dev] [--output DIR] [--fast] [--no-build]" >&2; exit 2 ;;
  esac
done
command -v cargo-deb >/dev/null || { echo "build-deb.sh: cargo-deb is missing: cargo install cargo-deb --locked" >&2; exit 1; }
[ $build = 0 ] || cargo build -p fleetboot --profile "$profile" --locked --quiet
target=${CARGO_TARGET_DIR:-target}
case $profile in dev) out=$target/debug ;; *) out=$target/$profile ;; esac
[ -x "$out/fleetboot" ] || { echo "build-deb.sh: no $out/fleetboot (build it, or drop --no-build)" >&2; exit 1; }
rm -rf "$out/manual"
"$out/fleetboot" manual --out "$out/manual"
# Debian policy: man pages compressed, reproducibly (no name or time in the header).
gzip -9n "$out"/manual/man1/*.1
mkdir -p "$output"
cargo deb -p fleetboot --no-build --profile "$profile" --output "$output" "${fast[@]}" --quiet
