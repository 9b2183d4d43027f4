#!/usr/bin/env bash
# Type-checks and lints the whole workspace for macOS on a Linux machine,
# without a Mac or an Apple SDK, so that a macOS-only compile error cannot
# land: Debian's own Rust toolchain (rustc-web, cargo-web, rust-web-src,
# rust-web-clippy; 1.96 in bookworm-security) ships the standard library's
# source, so `-Zbuild-std` builds std for an Apple target, and `cargo
# clippy` never links. clang compiles the few C files of build scripts
# (freestanding). It proves that every cfg(target_os = "macos") and
# non-Linux branch compiles against the real macOS definitions of libc,
# nix, mio, tokio and socket2; it runs nothing, so behaviour still needs a
# Mac (the GitHub matrix's macos-latest jobs).
#
# usage: ci/macos-check.sh [TARGET...]  (default: aarch64-apple-darwin x86_64-apple-darwin)
# Installs, where missing (apt, as root): rustc-web cargo-web rust-web-src
# rust-web-clippy clang llvm. Output goes to target/macos-check/.
set -euo pipefail
cd "$(dirname "$0")/.."
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(aarch64-apple-darwin x86_64-apple-darwin)
if [ ! -d /usr/lib/rustlib/src/rust/library ] || ! command -v clang >/dev/null ||
  [ ! -x /usr/bin/cargo-clippy ] || ! command -v llvm-ar >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    rustc-web cargo-web rust-web-src rust-web-clippy clang llvm ca-certificates
fi
# Debian's cargo and rustc, not rustup's: only they have the std source.
export PATH=/usr/bin:$PATH
export RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/macos-check}
# ring (rustls's provider, features tls and the TLS tests) compiles C that
# includes the Apple SDK's <TargetConditionals.h>, which no Linux machine
# has: this stand-in defines what ring reads (macOS, not iOS); and
# RING_CORE_NOSTDLIBINC (ring's own switch, for targets without a libc)
# keeps it from <string.h> and <assert.h>, which would be the host's glibc.
# The objects are only compiled here, never linked into anything that runs.
stub=$CARGO_TARGET_DIR/apple-sdk-stub
mkdir -p "$stub"
cat >"$stub/TargetConditionals.h" <<'HEADER'
#define TARGET_OS_MAC 1
#define TARGET_OS_OSX 1
#define TARGET_OS_IPHONE 0
#define TARGET_OS_IOS 0
#define TARGET_OS_TV 0
#define TARGET_OS_WATCH 0
#define TARGET_OS_SIMULATOR 0
HEADER
for target in "${targets[@]}"; do
  t=${target//-/_}
  export "CC_$t=clang" "AR_$t=llvm-ar" "CFLAGS_$t=-ffreestanding -I$stub -DRING_CORE_NOSTDLIBINC=1"
  echo "macos-check: $target"
  /usr/bin/cargo clippy -Zbuild-std=std,panic_abort,test --target "$target" \
    --workspace --all-targets --all-features -- -D warnings
done
echo "macos-check: ${targets[*]}: type-checked and linted"
