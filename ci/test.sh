#!/usr/bin/env bash
# The README's test command: every test, including the soaks on real
# processes. Ends with one line summing every test binary's results.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --features chaos 2>&1 | tee "$log"
awk '/^test result:/ { passed += $4; failed += $6 }
     END { printf "tests: %d passed, %d failed\n", passed, failed; exit (failed > 0 || passed == 0) }' "$log"
