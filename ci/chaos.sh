#!/usr/bin/env bash
# Every test with the chaos feature: the contract on real processes under
# load, and the soaks (100 upgrades: no leaked descriptor, no zombie). Ends
# with one line summing every test binary's results.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --features chaos 2>&1 | tee "$log"
awk '/^test result:/ { passed += $4; failed += $6 }
     END { printf "chaos: %d passed, %d failed\n", passed, failed; exit (failed > 0 || passed == 0) }' "$log"
