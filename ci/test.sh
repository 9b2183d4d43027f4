#!/usr/bin/env bash
# cargo test with the given arguments (none: the fast tests; `--features
# chaos`: the README's test command, every test). Ends with one line summing
# every test binary's results, and fails if no test ran.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test "$@" 2>&1 | tee "$log"
awk '/^test result:/ { passed += $4; failed += $6 }
     END { printf "tests: %d passed, %d failed\n", passed, failed; exit (failed > 0 || passed == 0) }' "$log"
