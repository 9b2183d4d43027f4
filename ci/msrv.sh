#!/usr/bin/env bash
# The library builds with the oldest Rust it promises: the `rust-version` of
# Cargo.toml. Installs that toolchain with rustup if it is missing; if it
# cannot, says so and fails, unless MSRV_SKIP_IF_MISSING=1, which turns that
# one case (and only that one) into a visible skip.
#   usage: ci/msrv.sh            (MSRV_SKIP_IF_MISSING=1 ci/msrv.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

msrv=$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' Cargo.toml | head -n 1)
if [ -z "$msrv" ]; then
  echo "msrv: no rust-version in Cargo.toml" >&2
  exit 1
fi

missing() {
  echo "msrv: Rust $msrv (the rust-version of Cargo.toml) is not available: $1" >&2
  echo "msrv: to install it: rustup toolchain install $msrv --profile minimal" >&2
  if [ "${MSRV_SKIP_IF_MISSING:-0}" = 1 ]; then
    echo "msrv: SKIPPED (MSRV_SKIP_IF_MISSING=1): the MSRV build was NOT checked" >&2
    exit 0
  fi
  echo "msrv: FAIL (MSRV_SKIP_IF_MISSING=1 turns this into a skip)" >&2
  exit 1
}

# Toolchains are listed as `1.85-x86_64-unknown-linux-gnu (...)`.
installed() { rustup toolchain list | awk -v name="$msrv-" 'index($0, name) == 1 { found = 1 } END { exit !found }'; }
install() {
  if command -v timeout >/dev/null; then
    timeout 600 rustup toolchain install "$msrv" --profile minimal --no-self-update
  else
    rustup toolchain install "$msrv" --profile minimal --no-self-update
  fi
}

command -v rustup >/dev/null || missing "rustup is not on PATH, so no other toolchain can be chosen"
if ! installed; then
  echo "msrv: Rust $msrv is not installed; trying: rustup toolchain install $msrv --profile minimal"
  if ! install || ! installed; then
    missing "rustup could not install it (its error is above)"
  fi
fi

# A target directory of its own: another compiler's artifacts never mix with
# the stable ones, and this check never waits for another build's lock.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/msrv}
# Never let rustup pick or fetch a different toolchain behind our back.
export RUSTUP_AUTO_INSTALL=0
echo "msrv: $(rustup run "$msrv" rustc --version)"
cargo "+$msrv" check --locked -p handover --all-features
echo "msrv: PASS: handover builds with Rust $msrv"
