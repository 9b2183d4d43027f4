#!/usr/bin/env bash
# The privileged bootstrap of the systemd proof. The cases themselves (install
# a unit, reload it under load, follow MainPID, stop it, read the manager's
# log) are Rust: harness/src/systemd.rs, run by
# `cargo test -p handover-harness --features chaos --test systemd`. This
# script only does what needs root and a shell:
#
#   ci/systemd-bootstrap.sh needs
#       Installs what the proof needs and is missing (systemd, util-linux,
#       bsdutils for script(1)), with apt-get, under a lock shared with a
#       parallel run. Last line: `ok`, or `skip REASON`.
#   ci/systemd-bootstrap.sh backports DIR
#       Debian bookworm-backports' systemd (254, for Type=notify-reload),
#       downloaded through a private apt configuration (the machine's
#       sources and state are left alone) and unpacked with dpkg -x into
#       DIR/root, once (a parallel run waits for the lock, then finds it
#       done). Last line: `ok DIR/root`, or `skip REASON`.
#   ci/systemd-bootstrap.sh manager DIR SYSTEMD LIBDIR CGROUP...
#       Execs a private `systemd --user` manager, in the foreground: a new
#       mount namespace with a tmpfs on /run/systemd (so that it believes
#       systemd runs), the console bound to a pty from script(1), the
#       manager in the cgroups CGROUP... (made by the caller), its pid in
#       DIR/manager.pid, units from DIR/units, XDG_RUNTIME_DIR=DIR/rt.
#       LIBDIR ("" for none) is its LD_LIBRARY_PATH.
set -uo pipefail

say() { printf '%s\n' "$*"; }

# Runs "$@" holding the lock file $1 (flock), bounded: 10 minutes.
locked() {
  local lock=$1; shift
  if command -v flock >/dev/null; then
    flock -w 600 "$lock" "$@"
  else
    "$@"
  fi
}

needs() {
  local need=()
  [ -x /lib/systemd/systemd ] || [ -x /usr/lib/systemd/systemd ] || need+=(systemd)
  { command -v unshare && command -v setsid; } >/dev/null || need+=(util-linux)
  command -v script >/dev/null || need+=(bsdutils)
  [ ${#need[@]} -eq 0 ] && { say ok; return; }
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "skip missing ${need[*]}, and cannot install them (not root on a Debian machine)"; return
  fi
  local log
  log=$(mktemp)
  # apt's own locks fail at once when busy: another run installs, wait.
  if locked /tmp/handover-systemd-apt.lock sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"' sh "${need[@]}" >"$log" 2>&1; then
    say ok
  else
    say "skip could not install ${need[*]}: $(tail -n 1 "$log")"
  fi
  rm -f "$log"
}

backports() {
  local dir=$1
  mkdir -p "$dir"
  # One unpacking at a time; the lock is released when the subshell exits.
  (
    command -v flock >/dev/null && { flock -w 600 9 || { say "skip waited 10 minutes for another run's unpacking of 254"; exit 0; }; }
    backports_locked "$dir"
  ) 9>"$dir.lock"
}

backports_locked() {
  local dir=$1 deb
  if [ -x "$dir/root/lib/systemd/systemd" ] || [ -x "$dir/root/usr/lib/systemd/systemd" ]; then
    say "ok $dir/root"; return
  fi
  grep -q '^VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null ||
    { say "skip not Debian bookworm: no bookworm-backports systemd to unpack"; return; }
  { command -v apt-get && command -v dpkg; } >/dev/null ||
    { say "skip no apt-get/dpkg to fetch bookworm-backports' systemd"; return; }
  rm -rf "$dir"
  mkdir -p "$dir/apt/lists/partial" "$dir/apt/cache/archives/partial" "$dir/debs"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main" \
    >"$dir/apt/sources.list"
  local apt=(-o "Dir::Etc::SourceList=$dir/apt/sources.list" -o "Dir::Etc::SourceParts=$dir/apt/none"
    -o "Dir::State::Lists=$dir/apt/lists" -o "Dir::Cache=$dir/apt/cache" -o "APT::Sandbox::User=root")
  if ! { timeout 300 apt-get "${apt[@]}" update -qq &&
    (cd "$dir/debs" && timeout 300 apt-get "${apt[@]}" download systemd/bookworm-backports libsystemd-shared/bookworm-backports); } \
    >"$dir/apt.log" 2>&1; then
    say "skip could not download bookworm-backports' systemd: $(grep -E '^(E|W):' "$dir/apt.log" | head -n 1)"; return
  fi
  for deb in "$dir"/debs/*.deb; do
    dpkg -x "$deb" "$dir/root" || { say "skip dpkg -x $deb failed"; return; }
  done
  say "ok $dir/root"
}

manager() {
  [ $# -ge 4 ] || { say "usage: $0 manager DIR SYSTEMD LIBDIR CGROUP..."; exit 2; }
  MGR_B=$1 MGR_EXEC=$2 MGR_LIB=$3
  shift 3
  MGR_CG="$*"
  export MGR_B MGR_EXEC MGR_LIB MGR_CG
  # setsid: script(1) makes its pty the controlling terminal of a session
  # of its own. (The caller is no group leader, so setsid does not fork.)
  exec setsid unshare --mount --propagation private script -qefc '
    set -e
    mkdir -p /run/systemd
    mount -t tmpfs tmpfs /run/systemd && mkdir /run/systemd/system
    mount --bind "$(tty)" /dev/console
    for d in $MGR_CG; do echo $$ > "$d/cgroup.procs"; done
    echo $$ > "$MGR_B/manager.pid"
    export XDG_RUNTIME_DIR="$MGR_B/rt" SYSTEMD_UNIT_PATH="$MGR_B/units" HOME="$MGR_B"
    if [ -n "$MGR_LIB" ]; then export LD_LIBRARY_PATH="$MGR_LIB"; fi
    exec "$MGR_EXEC" --user --log-target=console --log-level=debug \
         --default-standard-output=inherit --default-standard-error=inherit
  ' /dev/null </dev/null
}

case ${1:-} in
  needs) needs ;;
  backports) [ $# -eq 2 ] || { say "usage: $0 backports DIR"; exit 2; }; backports "$2" ;;
  manager) shift; manager "$@" ;;
  *) say "usage: $0 needs | backports DIR | manager DIR SYSTEMD LIBDIR CGROUP..."; exit 2 ;;
esac
