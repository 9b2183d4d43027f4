#!/usr/bin/env bash
# The criterion benchmarks (benches/): built always; with BENCH_RUN=1 also
# run briefly, their report kept in target/bench-output.txt. A short run
# checks that they work and gives rough figures, not reference ones: see
# BENCHMARKING.md for how figures are taken.
#   usage: ci/bench.sh            (BENCH_RUN=1 ci/bench.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --no-run
if [ "${BENCH_RUN:-0}" = 1 ]; then
  mkdir -p target
  # `--bench '*'` picks the bench targets alone: the library's own libtest
  # harness would refuse criterion's options and fail the run.
  cargo bench --bench '*' -- --warm-up-time 1 --measurement-time 3 | tee target/bench-output.txt
  echo "bench: report written to target/bench-output.txt"
fi
