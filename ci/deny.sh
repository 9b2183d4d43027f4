#!/usr/bin/env bash
# The dependency tree (every crate of Cargo.lock, dev-dependencies and every
# feature included) against deny.toml with cargo-deny: licenses (each
# crate's licence allowed), bans (no `*` requirement; duplicate versions
# warned about), sources (crates.io only), and advisories (the RustSec
# database: vulnerabilities, unsound and unmaintained crates).
#
# The RustSec database is a git repository on GitHub, fetched at each run.
# When it cannot be fetched (CI's machine reaches the package registries
# alone, and no registry ships it), the script says that advisories were NOT
# checked and why, checks the other three, and passes if they pass;
# DENY_ADVISORIES_REQUIRED=1 (the GitHub workflow) makes that a failure.
#
# cargo-deny missing from PATH (or older than 0.20) is built from crates.io,
# pinned, with `cargo install --locked` into target/ci-tools/ (once: later
# runs find it there). Outside the checkout, only cargo's download cache and
# cargo-deny's clone of the database ($CARGO_HOME/advisory-dbs) are written.
#   usage: ci/deny.sh            (DENY_ADVISORIES_REQUIRED=1 ci/deny.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

version=0.20.2 # installed when none is found; the one this was tested with
minimum=0.20.0 # the oldest one accepted on PATH
dir=$PWD/target/ci-tools/cargo-deny-$version

# Prints the version of the cargo-deny at $1 ("0.20.2"), empty if none.
version_of() { "$1" --version 2>/dev/null | awk '{ print $2; exit }'; }
# True if version $1 is at least $minimum.
recent_enough() { [ -n "$1" ] && [ "$(printf '%s\n' "$minimum" "$1" | sort -V | head -n 1)" = "$minimum" ]; }
# With a time limit where coreutils' timeout exists (not on stock macOS).
limited() {
  if command -v timeout >/dev/null; then timeout "$@"; else shift; "$@"; fi
}

deny=""
found=$(command -v cargo-deny || true)
if [ -n "$found" ]; then
  if recent_enough "$(version_of "$found")"; then
    deny=$found
  else
    echo "deny.sh: not using $found: its version, '$(version_of "$found")', is older than $minimum"
  fi
fi
if [ -z "$deny" ] && ! recent_enough "$(version_of "$dir/bin/cargo-deny")"; then
  echo "deny.sh: installing cargo-deny $version into $dir (cargo install --locked; a few minutes)"
  start=$SECONDS
  cargo install --locked --quiet --root "$dir" "cargo-deny@$version"
  echo "deny.sh: cargo-deny $version installed in $((SECONDS - start)) s"
fi
deny=${deny:-$dir/bin/cargo-deny}
echo "deny.sh: $("$deny" --version) ($deny)"

# The advisory database first, alone, so that a failure to fetch it is told
# apart from a finding of the check.
checks=(bans licenses sources)
not_checked=""
fetch_log=$(mktemp)
trap 'rm -f "$fetch_log"' EXIT
start=$SECONDS
if GIT_TERMINAL_PROMPT=0 limited 180 "$deny" fetch db >"$fetch_log" 2>&1; then
  echo "deny.sh: RustSec advisory database fetched in $((SECONDS - start)) s"
  checks=(advisories "${checks[@]}")
else
  status=$?
  cat "$fetch_log" >&2
  how="exit $status"
  [ "$status" = 124 ] && how="timed out after 180 s"
  not_checked="advisories were NOT checked: the RustSec advisory database, a git repository on GitHub, could not be fetched (cargo deny fetch db: $how; its error is above)"
  echo "deny.sh: ${not_checked}" >&2
  if [ "${DENY_ADVISORIES_REQUIRED:-0}" = 1 ]; then
    echo "deny.sh: FAIL (DENY_ADVISORIES_REQUIRED=1)" >&2
    exit 1
  fi
  echo "deny.sh: checking ${checks[*]} only" >&2
fi

start=$SECONDS
# --workspace: the harness and its dependencies too (the root Cargo.toml is
# also a package, which alone would be the graph's root otherwise).
# --locked: the Cargo.lock of the checkout, exactly. Without advisories,
# nothing is fetched from GitHub (deny.toml asks for no std-replacements
# data); with them, the database just cloned is brought up to date again.
"$deny" --workspace --locked check --show-stats "${checks[@]}"
echo "deny.sh: cargo deny check ${checks[*]}: $((SECONDS - start)) s"

if [ -n "$not_checked" ]; then
  echo "deny.sh: PASS: ${checks[*]}; ${not_checked}"
else
  echo "deny.sh: PASS: ${checks[*]}"
fi
