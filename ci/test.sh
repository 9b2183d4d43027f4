#!/usr/bin/env bash
# The README's test command: every test, including the soaks on real processes.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --features chaos
