#!/usr/bin/env bash
# What `cargo publish` would upload: the crate's file list must hold the
# README, both licence texts and the library's root. Lists only; builds
# nothing. (--allow-dirty: also works on a work tree with changes.)
set -euo pipefail
cd "$(dirname "$0")/.."
files=$(cargo package --list -p handover --allow-dirty)
missing=()
for file in README.md LICENSE-MIT LICENSE-APACHE src/lib.rs; do
  grep -qxF "$file" <<<"$files" || missing+=("$file")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "package: FAIL: the published crate would lack ${missing[*]}" >&2
  echo "package: it would hold:" >&2
  echo "$files" >&2
  exit 1
fi
echo "package: PASS: $(wc -l <<<"$files") files, README.md, LICENSE-MIT, LICENSE-APACHE and src/lib.rs among them"
