#!/usr/bin/env bash
# Every test with the chaos feature (the README's test command): the
# contract on real processes under load, every scenario, and the soaks.
set -euo pipefail
exec "$(dirname "$0")/test.sh" --features chaos
