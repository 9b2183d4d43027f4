#!/usr/bin/env bash
# API documentation, warnings denied.
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features
# A user's `cargo doc` builds the default features: no link may point at an
# item that only another feature has.
RUSTDOCFLAGS="-D warnings" cargo doc -p handover --no-deps
