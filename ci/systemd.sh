#!/usr/bin/env bash
# The example service under a real systemd: a private `systemd --user`
# manager (its own mount namespace and cgroup, XDG_RUNTIME_DIR in a temporary
# folder; PID 1 need not be systemd) runs the unit files of examples/systemd/,
# reloads each one under HTTP load and stops it, and systemd-socket-activate
# runs the example in front of a socket it made. Each case prints one line,
#   systemd: <case> (systemd <version>): PASS | FAIL | SKIPPED (<reason>)
# and what it saw when it fails. Exits 0 when no case failed: a case that
# cannot run here (no privileges for a manager, no systemd >= 253 for
# Type=notify-reload) is SKIPPED, loudly, never passed.
#
#   usage: ci/systemd.sh [PATH-TO-BINARY [PATH-TO-HANDOVER-CLI [PATH-TO-HARNESS]]]
#     default target/release/examples/http_server, target/release/handover
#     and target/release/handover-harness (built when missing); the
#     harness's `load` subcommand is the load generator
#   env:   SYSTEMD_SUITES="system backports"  which managers to run: the
#            installed systemd, and Debian bookworm-backports' systemd (254),
#            unpacked into target/systemd-backports/ (nothing is installed)
#          SYSTEMD_OTHER_SUITES="backports"  suites another run of this
#            script does at the same time (harness/tests/systemd.rs runs
#            one per suite, in parallel): a case they cover is not reported
#            SKIPPED here. Runs at the same time share nothing but the
#            unpacked 254 and apt (both under a lock), and take their ports
#            from separate ranges below the kernel's ephemeral ports
#          SYSTEMD_CASES="..."   run only these cases (names as printed)
#          SYSTEMD_RELOADS=20    reloads per case (back-to-back: this many
#                                  pairs' worth, in pairs)
#          SYSTEMD_FINDING_RELOADS=5  reloads per finding
#          SYSTEMD_RELOAD_PAUSE=0.2  seconds of load on each generation
#          SYSTEMD_KEEP=1        keep the work folder (logs) even on success
#          SYSTEMD_SERVICE_ENV="K=V ..."  more Environment= for every unit
#                                  (HANDOVER_SUCCESSOR_PARENT=own: the
#                                  successors the old generation's children,
#                                  the design before; set SYSTEMD_OWN_CHILDREN=1
#                                  with it, or each case fails for that alone)
#
# A case passes when every reload moved MainPID to the new generation (and
# the PID file and GET / agree), no request of the load failed (it keeps
# idle keep-alive connections, so each drain lasts the example's quiet
# period), systemd never said "Supervising process N which is not our
# child", and `systemctl stop` ended it by SIGTERM with Result=success.
# Cases: each unit of examples/systemd/ (Type=notify-reload on >= 253), the
# notify unit with `ExecReload=handover upgrade --socket`, and back-to-back
# reloads (the second while the old generation drains) for pidfile, notify
# and notify-reload. Every case also needs the service's log to show that
# its successors were started as systemd's children (the library's default
# under systemd): 'successor named the main process'. Besides PASS/FAIL, every managed case prints its reloads
# (old -> new pid, generation, time), the load (`handover-harness load`:
# requests ok and failed, by class) and how the stop went. Variants of the example
# units (without PIDFile=, with KillMode=process) run as `finding:` lines
# that do not decide the exit status: they record what this systemd does.
# About 8 minutes for both managers one after the other, about half that
# for each in a run of its own.
#
# Needs root (mount namespace, cgroups). Installs, where missing and
# possible: systemd, util-linux, bsdutils (script), curl, python3.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
repo=$PWD

say() { printf '%s\n' "$*"; }
# Indented details under a case line.
detail() { printf '    %s\n' "$@"; }

# ---------------------------------------------------------------- setup

bin=${1:-target/release/examples/http_server}
cli=${2:-target/release/handover}
if [ ! -x "$bin" ]; then
  if [ $# -eq 0 ]; then
    say "systemd.sh: building the example: cargo build --release --example http_server"
    cargo build --release --example http_server -q || { say "systemd.sh: the build failed"; exit 1; }
  else
    say "systemd.sh: $bin is not an executable file"; exit 2
  fi
fi
if [ ! -x "$cli" ]; then
  if [ $# -lt 2 ]; then
    say "systemd.sh: building the client: cargo build --release --bin handover"
    cargo build --release --bin handover -q || { say "systemd.sh: the build failed"; exit 1; }
  else
    say "systemd.sh: $cli is not an executable file"; exit 2
  fi
fi
harness=${3:-target/release/handover-harness}
if [ ! -x "$harness" ]; then
  if [ $# -lt 3 ]; then
    say "systemd.sh: building the load generator: cargo build --release -p handover-harness --bin handover-harness"
    cargo build --release -p handover-harness --bin handover-harness -q || { say "systemd.sh: the build failed"; exit 1; }
  else
    say "systemd.sh: $harness is not an executable file"; exit 2
  fi
fi
bin=$(realpath "$bin")
cli=$(realpath "$cli")
harness=$(realpath "$harness")
reloads=${SYSTEMD_RELOADS:-20}
finding_reloads=${SYSTEMD_FINDING_RELOADS:-5}
pause=${SYSTEMD_RELOAD_PAUSE:-0.2}
suites=${SYSTEMD_SUITES:-system backports}
backports_elsewhere=""
[[ " ${SYSTEMD_OTHER_SUITES:-} " == *" backports "* ]] && backports_elsewhere=yes
only=${SYSTEMD_CASES:-}

work=$(mktemp -d /tmp/handover-systemd.XXXXXX)
chmod 755 "$work"
failed=0
results=()          # every case line, repeated at the end
managers=()         # "pid script-pid cgroup-dirs..." of every manager started
bg_pids=()          # every other background process started here

skip_everything=""  # a reason why no manager can run here

wanted() { [ -z "$only" ] || [[ " $only " == *" $1 "* ]]; }

report() { # case version verdict [reason]
  local line="systemd: $1 (systemd $2): $3"
  [ -n "${4:-}" ] && line+=" ($4)"
  results+=("$line")
  say "$line"
  [ "$3" = FAIL ] && failed=1
  return 0
}

teardown() {
  local entry mpid spid d p pid
  for pid in "${bg_pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
  for entry in "${managers[@]}"; do
    read -r mpid spid d <<<"$entry"
    # The manager stops its units on SIGTERM (exit.target); bounded wait.
    if kill -TERM "$mpid" 2>/dev/null; then
      for _ in $(seq 300); do kill -0 "$mpid" 2>/dev/null || break; sleep 0.05; done
      kill -KILL "$mpid" 2>/dev/null
    fi
    for _ in $(seq 100); do kill -0 "$spid" 2>/dev/null || break; sleep 0.05; done
    kill -KILL "$spid" 2>/dev/null
    # Whatever is left in its cgroups is ours: kill it by pid, then remove
    # the cgroups, deepest first.
    for d in ${entry#* * }; do
      [ -d "$d" ] || continue
      find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null | while read -r p; do kill -KILL "$p" 2>/dev/null; done
      for _ in $(seq 100); do
        find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
        [ -d "$d" ] || break
        sleep 0.05
      done
    done
  done
  # Generations started outside a manager (systemd-socket-activate), by pid.
  if [ -f "$work/pids" ]; then
    while read -r pid; do
      [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$bin" && kill -KILL "$pid" 2>/dev/null
    done <"$work/pids"
  fi
  if [ "$failed" = 0 ] && [ -z "${SYSTEMD_KEEP:-}" ]; then
    rm -rf "$work"
  else
    say "systemd.sh: logs kept in $work"
  fi
}
trap teardown EXIT
trap 'exit 130' INT TERM

track_pid() { [ -n "$1" ] && [ "$1" != 0 ] && echo "$1" >>"$work/pids"; }

# A free port for a service, from this suite's range (port_lo..port_hi, set
# per suite): below the kernel's ephemeral ports, so that no client
# connection (this run's load, or a parallel run's) takes it between this
# choice and the service's bind, and apart from a parallel run's range.
# Without a range, any free port.
port_lo=0 port_hi=0
free_port() {
  python3 - "$port_lo" "$port_hi" <<'PY'
import random, socket, sys
lo, hi = int(sys.argv[1]), int(sys.argv[2])
for _ in range(1000):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", random.randrange(lo, hi) if hi > lo else 0))
        print(s.getsockname()[1])
        break
    except OSError:
        continue
    finally:
        s.close()
PY
}
# Ephemeral ports start at $1 (32768 by default): ten thousand below it, a
# half for each suite.
ephemeral_lo=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null)
ports_for() { # suite
  [ "${ephemeral_lo:-0}" -gt 11000 ] 2>/dev/null || { port_lo=0 port_hi=0; return; }
  case $1 in
    system) port_lo=$((ephemeral_lo - 10000)) port_hi=$((ephemeral_lo - 5000)) ;;
    *) port_lo=$((ephemeral_lo - 5000)) port_hi=$ephemeral_lo ;;
  esac
}

# Runs "$@" holding the lock file $1 (flock, from util-linux), so that two
# runs of this script at the same time do not install or unpack at once.
# Bounded: 10 minutes of waiting.
locked() { # lock-file command...
  local lock=$1; shift
  if command -v flock >/dev/null; then
    mkdir -p "$(dirname "$lock")"
    flock -w 600 "$lock" "$@"
  else
    "$@"
  fi
}

# GET / once; prints the body, empty on any failure. Bounded: $2 s (5).
get() { curl -s --max-time "${2:-5}" "http://127.0.0.1:$1/" 2>/dev/null; }

# Polls GET / until it answers from pid $2 (a generation that has handed
# over stops accepting only once told): prints the body. Bounded: 5 s.
get_from() {
  local port=$1 want=$2 body="" end=$((SECONDS + 5))
  while :; do
    body=$(get "$port" 1)
    [[ "$body" == "pid=$want "* ]] && break
    [ $SECONDS -ge $end ] && break
    sleep 0.05
  done
  printf '%s' "$body"
}

# Installs what is missing, on a fresh Debian machine.
install_needs() {
  local need=()
  [ -x /lib/systemd/systemd ] || [ -x /usr/lib/systemd/systemd ] || need+=(systemd)
  command -v unshare >/dev/null && command -v setsid >/dev/null || need+=(util-linux)
  command -v script >/dev/null || need+=(bsdutils)
  command -v curl >/dev/null || need+=(curl)
  command -v python3 >/dev/null || need+=(python3)
  [ ${#need[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    skip_everything="missing ${need[*]}, and cannot install them (not root on a Debian machine)"
    return 0
  fi
  say "systemd.sh: installing ${need[*]}"
  # apt's own locks fail at once when busy: another run installs, wait.
  if ! locked /tmp/handover-systemd-apt.lock sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"' sh "${need[@]}" >"$work/apt.log" 2>&1; then
    skip_everything="could not install ${need[*]}: $(tail -n 1 "$work/apt.log")"
  fi
}

# Debian bookworm-backports' systemd (254 today), for Type=notify-reload:
# downloaded with apt-get download through a private apt configuration (the
# machine's sources and state are left alone) and unpacked with dpkg -x into
# target/systemd-backports/root; run with LD_LIBRARY_PATH pointing at its
# libsystemd-shared. Sets backports_root, or backports_reason.
backports_root=""
backports_reason=""
fetch_backports() {
  local dir=$repo/target/systemd-backports lockfd
  # One unpacking at a time (a parallel run of this script waits, then
  # finds it done); the lock is released when this function returns.
  mkdir -p "$repo/target"
  if command -v flock >/dev/null && exec {lockfd}>"$repo/target/systemd-backports.lock"; then
    flock -w 600 "$lockfd" || { exec {lockfd}>&-; backports_reason="waited 10 minutes for another run's unpacking of 254"; return 0; }
    fetch_backports_locked
    exec {lockfd}>&-
  else
    fetch_backports_locked
  fi
}
fetch_backports_locked() {
  local dir=$repo/target/systemd-backports
  if [ -x "$dir/root/lib/systemd/systemd" ] || [ -x "$dir/root/usr/lib/systemd/systemd" ]; then
    backports_root=$dir/root; return 0
  fi
  if ! grep -q '^VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null; then
    backports_reason="not Debian bookworm: no bookworm-backports systemd to unpack"; return 0
  fi
  if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
    backports_reason="no apt-get/dpkg to fetch bookworm-backports' systemd"; return 0
  fi
  rm -rf "$dir"
  mkdir -p "$dir/apt/lists/partial" "$dir/apt/cache/archives/partial" "$dir/debs"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main" \
    >"$dir/apt/sources.list"
  local apt=(-o "Dir::Etc::SourceList=$dir/apt/sources.list" -o "Dir::Etc::SourceParts=$dir/apt/none"
    -o "Dir::State::Lists=$dir/apt/lists" -o "Dir::Cache=$dir/apt/cache" -o "APT::Sandbox::User=root")
  say "systemd.sh: downloading systemd and libsystemd-shared from bookworm-backports into $dir"
  if ! { timeout 300 apt-get "${apt[@]}" update -qq &&
    (cd "$dir/debs" && timeout 300 apt-get "${apt[@]}" download systemd/bookworm-backports libsystemd-shared/bookworm-backports); } \
    >"$dir/apt.log" 2>&1; then
    backports_reason="could not download bookworm-backports' systemd: $(grep -E '^(E|W):' "$dir/apt.log" | head -n 1)"
    return 0
  fi
  local deb
  for deb in "$dir"/debs/*.deb; do
    dpkg -x "$deb" "$dir/root" || { backports_reason="dpkg -x $deb failed"; return 0; }
  done
  backports_root=$dir/root
}

# ---------------------------------------------------------------- manager

# The manager of the current suite: set by start_manager.
B=""; SD_EXEC=""; SD_CTL=""; SD_LIB=""; SD_VER=""

sctl() {
  env XDG_RUNTIME_DIR="$B/rt" ${SD_LIB:+LD_LIBRARY_PATH="$SD_LIB"} timeout 60 "$SD_CTL" --user "$@"
}

# Prints the properties asked for as "Name=value" lines.
show() { local unit=$1; shift; sctl show "${@/#/-p}" "$unit" 2>/dev/null; }
prop() { sctl show -p "$2" --value "$1" 2>/dev/null; }

# Starts a private systemd --user manager, after the recipe in
# shared/recipes/systemd-user-manager.sh: a new mount namespace with a tmpfs on
# /run/systemd (so that the manager believes systemd is running), the
# console bound to a pty from script(1), its own cgroup in every hierarchy.
# Returns non-zero with start_reason set when it cannot start.
start_manager() { # label units-source-folder
  local label=$1 units=$2 cg d cgdirs=()
  start_reason=""
  B=$work/$label
  mkdir -p "$B/units" "$B/rt"; chmod 700 "$B/rt"
  for u in default.target basic.target exit.target shutdown.target systemd-exit.service; do
    cp "$units/$u" "$B/units/" 2>/dev/null || { start_reason="no $units/$u"; return 1; }
  done
  cg=handover-systemd-$label-$$
  if [ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" = cgroup2fs ]; then
    cgdirs=("/sys/fs/cgroup/$cg")
  else
    [ -d /sys/fs/cgroup/unified ] && cgdirs+=("/sys/fs/cgroup/unified/$cg")
    [ -d /sys/fs/cgroup/systemd ] && cgdirs+=("/sys/fs/cgroup/systemd/$cg")
  fi
  [ ${#cgdirs[@]} -gt 0 ] || { start_reason="no cgroup hierarchy for systemd under /sys/fs/cgroup"; return 1; }
  local made=()
  for d in "${cgdirs[@]}"; do
    if ! mkdir "$d" 2>"$B/mkdir.err"; then
      start_reason="cannot create the cgroup $d: $(cat "$B/mkdir.err")"
      [ ${#made[@]} -gt 0 ] && rmdir "${made[@]}"
      return 1
    fi
    made+=("$d")
  done
  MGR_B=$B MGR_CG="${cgdirs[*]}" MGR_EXEC=$SD_EXEC MGR_LIB=$SD_LIB \
    setsid unshare --mount --propagation private script -qefc '
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
  ' /dev/null </dev/null >"$B/manager.log" 2>&1 &
  local spid=$! mpid="" state=""
  disown "$spid"
  for _ in $(seq 300); do
    [ -z "$mpid" ] && [ -s "$B/manager.pid" ] && mpid=$(cat "$B/manager.pid")
    if [ -S "$B/rt/systemd/private" ]; then
      state=$(sctl show -p SystemState --value 2>/dev/null)
      [ "$state" = running ] || [ "$state" = degraded ] && break
    fi
    kill -0 "$spid" 2>/dev/null || break
    sleep 0.05
  done
  [ -z "$mpid" ] && [ -s "$B/manager.pid" ] && mpid=$(cat "$B/manager.pid")
  managers+=("${mpid:-0} $spid ${cgdirs[*]}")
  MGR_CGDIRS="${cgdirs[*]}"
  if [ "$state" != running ] && [ "$state" != degraded ]; then
    start_reason="the manager did not start (state '${state:-none}'): $(grep -v '^$' "$B/manager.log" | tail -n 1)"
    return 1
  fi
  return 0
}

# ---------------------------------------------------------------- units

# The unit files of examples/systemd/, for this manager: the binary and port
# substituted, and a drop-in that sends the service's output to a log file.
# install_unit SOURCE NAME PORT [sed-expression]
install_unit() {
  local src=$repo/examples/systemd/$1 name=$2 port=$3 extra=${4:-}
  sed -e "s|/usr/local/bin/http_server|$bin|g" -e "s|/usr/local/bin/handover|$cli|g" \
    -e "s|127\.0\.0\.1:8080|127.0.0.1:$port|g" \
    ${extra:+-e "$extra"} "$src" >"$B/units/$name"
  mkdir -p "$B/units/$name.d"
  cat >"$B/units/$name.d/ci.conf" <<EOF
[Service]
Environment=NO_COLOR=1 RUST_LOG=info ${SYSTEMD_SERVICE_ENV:-}
StandardOutput=append:$B/${name%.*}.log
StandardError=append:$B/${name%.*}.log
TimeoutStopSec=20
EOF
}

# The load generator (`handover-harness load`: busy new-connection and
# keep-alive clients, and keep-alive clients idle for 0.6 s and 2.5 s
# between requests, so that a drain waits for their next request or its
# quiet period), in
# the background until stop_load. Returns once every one of its clients has
# had an answer (the idle ones then hold connections that a drain must wait
# for). Bounded: 30 s.
start_load() { # port name
  rm -f "$B/$2.load.json" "$B/$2.load.out"
  "$harness" load "127.0.0.1:$1" --json "$B/$2.load.json" >"$B/$2.load.out" 2>&1 &
  load_pid=$!
  disown "$load_pid"
  bg_pids+=("$load_pid")
  load_out=$B/$2.load.out
  for _ in $(seq 600); do
    grep -q '^load: every client answered' "$load_out" 2>/dev/null && return 0
    kill -0 "$load_pid" 2>/dev/null || break
    sleep 0.05
  done
  say "systemd.sh: the load generator did not get going within 30 s: $(tail -n 1 "$load_out" 2>/dev/null)"
}

# Stops it (SIGTERM: it finishes the requests in flight and writes its
# summary) and sets load_ok, load_failed and load_line.
stop_load() { # name
  kill -TERM "$load_pid" 2>/dev/null
  # Its requests time out after 10 s.
  for _ in $(seq 300); do kill -0 "$load_pid" 2>/dev/null || break; sleep 0.05; done
  if [ -s "$B/$1.load.json" ]; then
    load_ok=$(grep -o '"ok":[0-9]*' "$B/$1.load.json" | cut -d: -f2)
    load_failed=$(grep -o '"failed":[0-9]*' "$B/$1.load.json" | cut -d: -f2)
    load_line=$(sed -n 's/^load: \(.*\) (stopped by .*)$/\1/p' "$load_out" | tail -n 1)
  else
    load_ok=0 load_failed=1 load_line="the load generator wrote no summary: $(tail -n 2 "$load_out" 2>/dev/null)"
  fi
}

# Waits until systemd's MainPID is not $2 (and not 0) and the unit is
# active/running; sets mainpid, active, sub. Bounded: 30 s.
wait_new_main() { # unit old-pid
  local line
  for _ in $(seq 600); do
    mainpid="" active="" sub=""
    while IFS='=' read -r k v; do
      case $k in MainPID) mainpid=$v ;; ActiveState) active=$v ;; SubState) sub=$v ;; esac
    done < <(show "$1" MainPID ActiveState SubState)
    [ "$mainpid" != "$2" ] && [ "${mainpid:-0}" != 0 ] && [ "$sub" = running ] && [ "$active" = active ] && return 0
    sleep 0.05
  done
  return 1
}

# The pids in a unit's cgroup (ControlGroup= is the path from the root of
# the hierarchy), from the first hierarchy of this manager that has it.
cgroup_procs() { # control-group-path
  local d
  [ -n "$1" ] || return 0
  for d in $MGR_CGDIRS; do
    if [ -r "${d%/*}$1/cgroup.procs" ]; then
      cat "${d%/*}$1/cgroup.procs" 2>/dev/null
      return 0
    fi
  done
}

# Waits until the unit's cgroup holds only the main process (the old
# generation has drained and left). Sets procs. Bounded: 30 s.
wait_one_process() { # unit
  local cgpath
  cgpath=$(prop "$1" ControlGroup)
  for _ in $(seq 600); do
    procs=$(cgroup_procs "$cgpath" | grep -c .)
    [ "$procs" -le 1 ] && return 0
    sleep 0.05
  done
  return 1
}

# How the unit's last main process was stopped, from the service's own log
# (the example logs "stopping" when SIGTERM asks it to stop) and the
# manager's debug log from byte $2 on. Sets stop_how (sigterm, sigkill,
# unknown) and stop_line.
stop_evidence() { # unit log-offset generation svc-log
  local unit=$1 offset=$2 generation=$3 svclog=$4 mlog kills
  mlog=$(tail -c +"$((offset + 1))" "$B/manager.log" | tr -d '\r')
  kills=$(grep -F "$unit" <<<"$mlog" | grep -E 'SIGKILL|status=9/KILL|signal=KILL|code=killed|-> stop-sigkill|-> final-sigkill' | head -n 3)
  if [ -n "$kills" ]; then
    stop_how=sigkill
  elif grep -E "stopping.*generation=$generation|generation=$generation.*stopping" "$svclog" >/dev/null 2>&1 &&
    grep -E "exiting.*generation=$generation|generation=$generation.*exiting" "$svclog" >/dev/null 2>&1; then
    stop_how=sigterm
  else
    stop_how=unknown
  fi
  stop_line=$(grep -F "$unit" <<<"$mlog" | grep -E 'Supervising|Changed|Killing|exited|Main process|Failed with|Deactivated' | head -n 8)
}

# ---------------------------------------------------------------- cases

# One managed case: start, reload under load, check, stop. Sets
# reload_fail (start, reloads, load: empty when clean), stop_fail (empty
# when SIGTERM stopped it), stop_how, case_info (a one-line summary).
# managed_case NAME UNIT PORT RELOADS [socket-unit]
managed_case() {
  local name=$1 unit=$2 port=$3 count=$4 socket=${5:-} svclog old body pidf i t0 elapsed
  local offset stop_ms result gen=0 reload_log=() start_log last cgpath left p case_offset
  svclog=$B/${unit%.*}.log
  pidf=$B/rt/${unit%.*}.pid
  reload_fail="" stop_fail="" stop_how="not stopped" stop_line="" case_info="" alien=0
  load_line="none"
  case_offset=$(stat -c %s "$B/manager.log")
  sctl daemon-reload
  if [ -n "$socket" ]; then
    if ! sctl start "$socket" 2>"$B/$name.err"; then
      reload_fail="systemctl start $socket: $(cat "$B/$name.err")"; return
    fi
    # The first connection activates the service.
    body=$(get "$port")
    [[ "$body" == pid=* ]] || reload_fail="the first GET through $socket answered '$body'"
  elif ! sctl start "$unit" 2>"$B/$name.err"; then
    reload_fail="systemctl start $unit: $(cat "$B/$name.err")"
  fi
  if [ -z "$reload_fail" ] && ! wait_new_main "$unit" 0; then
    reload_fail="not active/running 30 s after start: MainPID=$mainpid $active/$sub"
  fi
  if [ -n "$reload_fail" ]; then
    start_log=$(tail -n 5 "$svclog" 2>/dev/null)
    [ -n "$start_log" ] && reload_fail+=$'\n'"service log: $start_log"
    sctl stop "$unit" ${socket:+"$socket"} 2>/dev/null
    return
  fi
  track_pid "$mainpid"
  body=$(get_from "$port" "$mainpid")
  if [[ "$body" != "pid=$mainpid "* ]]; then
    reload_fail="after start MainPID=$mainpid but GET / answered '$body'"
  else
    start_load "$port" "$name"
    if [ "${mode:-}" = back-to-back ]; then
      back_to_back "$unit" "$port" "$count" "$pidf"
    fi
    for i in $(seq "$count"); do
      [ "${mode:-}" = back-to-back ] && break
      old=$mainpid
      t0=$(date +%s%N)
      if ! sctl reload "$unit" 2>"$B/$name.err"; then
        reload_fail="reload $i: systemctl reload $unit: $(cat "$B/$name.err")"; break
      fi
      if ! wait_new_main "$unit" "$old"; then
        reload_fail="reload $i: 30 s later MainPID is $mainpid (was $old), $active/$sub"; break
      fi
      elapsed=$((($(date +%s%N) - t0) / 1000000))
      track_pid "$mainpid"
      if [ "$(cat "$pidf" 2>/dev/null)" != "$mainpid" ]; then
        reload_fail="reload $i: MainPID=$mainpid but the PID file says '$(cat "$pidf" 2>/dev/null)'"; break
      fi
      body=$(get_from "$port" "$mainpid")
      if [[ "$body" != "pid=$mainpid "* ]]; then
        reload_fail="reload $i: MainPID=$mainpid but GET / answered '$body'"; break
      fi
      gen=${body##*generation=}
      reload_log+=("$old->$mainpid(gen $gen, ${elapsed}ms)")
      # The next reload once the old generation has left: a generation
      # refuses to upgrade while its parent still drains.
      if ! wait_one_process "$unit"; then
        reload_fail="reload $i: the unit's cgroup still holds $procs processes 30 s later"; break
      fi
      # Each generation serves the load for a while.
      sleep "$pause"
    done
    stop_load "$name"
    if [ -z "$reload_fail" ] && [ "$load_failed" != 0 ]; then
      reload_fail="failed requests under load: $load_line"
    elif [ -z "$reload_fail" ] && [ "$load_ok" -lt 50 ]; then
      reload_fail="the load made only $load_ok requests: $load_line"
    fi
  fi

  # Stop: SIGTERM, and the service drains and exits; not SIGKILL.
  last=$mainpid
  cgpath=$(prop "$unit" ControlGroup)
  offset=$(stat -c %s "$B/manager.log")
  t0=$(date +%s%N)
  sctl stop "$unit" 2>"$B/$name.err" || stop_fail="systemctl stop: $(cat "$B/$name.err")"
  stop_ms=$((($(date +%s%N) - t0) / 1000000))
  if [ "${last:-0}" != 0 ]; then
    for _ in $(seq 200); do kill -0 "$last" 2>/dev/null || break; sleep 0.05; done
    kill -0 "$last" 2>/dev/null && stop_fail+="${stop_fail:+; }pid $last still alive 10 s after the stop"
  fi
  result=$(prop "$unit" Result)
  sleep 0.3 # the manager's last lines about the stop
  stop_evidence "$unit" "$offset" "$gen" "$svclog"
  # (Connections still queued on the socket would start the service again.)
  [ -n "$socket" ] && sctl stop "$socket" "$unit" 2>/dev/null
  # Nothing of the service may outlive its stop (an untracked generation
  # would, with KillMode=process): kill what is left, by pid, and say so.
  left=$(cgroup_procs "$cgpath")
  if [ -n "$left" ]; then
    stop_fail+="${stop_fail:+; }processes left in the unit's cgroup after the stop: ${left//$'\n'/ }"
    for p in $left; do kill -KILL "$p" 2>/dev/null; done
  fi
  [ "$stop_how" = sigterm ] || stop_fail+="${stop_fail:+; }stopped by $stop_how, not SIGTERM"
  [ "$result" = success ] || stop_fail+="${stop_fail:+; }Result=$result, not success"
  drains=$(drain_times "$svclog")
  alien=$(tail -c +"$((case_offset + 1))" "$B/manager.log" | grep -F "$unit" | grep -c 'which is not our child')
  [ "$alien" = 0 ] || reload_fail+="${reload_fail:+; }systemd said 'Supervising process N which is not our child' $alien times"
  # Under systemd the library starts every successor as systemd's own
  # child and names it when it serves (SuccessorParent::Auto); a case in
  # which no generation did ran the other design (its successors the old
  # generation's children), which this suite must not take for a pass.
  named=$(grep -c 'successor named the main process' "$svclog" 2>/dev/null)
  if [ "${#reload_log[@]}" -gt 0 ] && [ "${named:-0}" = 0 ] && [ -z "${SYSTEMD_OWN_CHILDREN:-}" ]; then
    reload_fail+="${reload_fail:+; }no generation started its successor as systemd's child (no 'successor named the main process' in the service's log)"
  fi
  case_info="reloads: ${reload_log[*]:-none}; load: $load_line; drains: $drains; stop: $stop_how in ${stop_ms}ms, Result=$result; systemd said 'not our child' $alien times; successors named at commit: ${named:-0}"
}

# How long each generation drained, from the example's own log lines
# ("draining generation=N" to "exiting generation=N"): count and median.
drain_times() { # service-log
  python3 - "$1" <<'PY'
import re, sys
from datetime import datetime
start, took = {}, []
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"(\S+)\s+INFO http_server: (draining|exiting) generation=(\d+)", line)
    if not m:
        continue
    t = datetime.fromisoformat(m.group(1)[:26].rstrip("Z")).timestamp()
    if m.group(2) == "draining":
        start[m.group(3)] = t
    elif m.group(3) in start:
        took.append((t - start.pop(m.group(3))) * 1000)
took.sort()
print(f"{len(took)}, median {took[len(took) // 2]:.0f} ms, min {took[0]:.0f} ms" if took else "none")
PY
}

# Polls GET / until it answers from generation $2: prints the body.
# Bounded: 30 s.
get_generation() { # port generation
  local body="" end=$((SECONDS + 30))
  while :; do
    body=$(get "$1" 1)
    [[ "$body" == *" generation=$2" ]] && break
    [ $SECONDS -ge $end ] && break
    sleep 0.02
  done
  printf '%s' "$body"
}

# Reloads in pairs, the second of each pair as soon as the first one's new
# generation serves, while the old one still drains (the load's idle
# connections keep it draining for the quiet period). The second reload's
# signal reaches the old generation (systemd's main process until it
# exits), which passes it on; the pair must end two generations later with
# MainPID, the PID file and GET / agreeing. Sets reload_fail and reload_log
# like managed_case's own loop. On a loaded machine the old generation may
# be gone by the second reload (its drain ends with its last idle
# connection): that pair is checked all the same but does not count, and
# another is tried, up to twice as many pairs in all.
back_to_back() { # unit port reloads pid-file
  # (Sets managed_case's gen: the generation serving at the end.)
  local unit=$1 port=$2 pairs=$(($3 / 2)) pidf=$4 i=0 old body t0 elapsed b2b done_pairs=0
  [ "$pairs" -ge 1 ] || pairs=1
  while [ "$done_pairs" -lt "$pairs" ]; do
    i=$((i + 1))
    if [ "$i" -gt $((pairs * 2)) ]; then
      reload_fail="only $done_pairs of $((i - 1)) pairs were back to back (the old generation had left before the second reload); $pairs wanted"; return
    fi
    old=$mainpid
    body=$(get_from "$port" "$old")
    gen=${body##*generation=}
    t0=$(date +%s%N)
    if ! sctl reload "$unit" 2>"$B/b2b.err"; then
      reload_fail="pair $i: first systemctl reload: $(cat "$B/b2b.err")"; return
    fi
    body=$(get_generation "$port" $((gen + 1)))
    if [[ "$body" != *" generation=$((gen + 1))" ]]; then
      reload_fail="pair $i: generation $((gen + 1)) did not serve after the first reload ('$body')"; return
    fi
    b2b=yes
    kill -0 "$old" 2>/dev/null || b2b=no
    if ! sctl reload "$unit" 2>"$B/b2b.err"; then
      reload_fail="pair $i: second systemctl reload ($([ $b2b = yes ] && echo "while $old drains" || echo "$old gone already")): $(cat "$B/b2b.err")"; return
    fi
    body=$(get_generation "$port" $((gen + 2)))
    if [[ "$body" != *" generation=$((gen + 2))" ]]; then
      reload_fail="pair $i: the second reload was lost: generation $((gen + 2)) never served ('$body')"; return
    fi
    if ! wait_one_process "$unit"; then
      reload_fail="pair $i: the unit's cgroup still holds $procs processes 30 s later"; return
    fi
    if ! wait_new_main "$unit" "$old"; then
      reload_fail="pair $i: 30 s later MainPID is $mainpid (was $old), $active/$sub"; return
    fi
    elapsed=$((($(date +%s%N) - t0) / 1000000))
    track_pid "$mainpid"
    body=$(get_from "$port" "$mainpid")
    if [[ "$body" != "pid=$mainpid generation=$((gen + 2))" ]]; then
      reload_fail="pair $i: MainPID=$mainpid but GET / answered '$body' (want generation $((gen + 2)))"; return
    fi
    if [ "$(cat "$pidf" 2>/dev/null)" != "$mainpid" ]; then
      reload_fail="pair $i: MainPID=$mainpid but the PID file says '$(cat "$pidf" 2>/dev/null)'"; return
    fi
    if [ "$b2b" = yes ]; then
      done_pairs=$((done_pairs + 1))
      reload_log+=("$old=>$mainpid(gen $((gen + 2)), ${elapsed}ms)")
    else
      reload_log+=("$old=>$mainpid(gen $((gen + 2)), ${elapsed}ms, not back to back: not counted)")
    fi
    gen=$((gen + 2))
    sleep "$pause"
  done
}

# Runs managed_case and reports it. A `finding` reports what happened and
# never fails the run.
run_managed() { # case|finding NAME UNIT PORT RELOADS [socket-unit]
  local kind=$1 name=$2 unit=$3
  shift 2
  managed_case "$name" "$@"
  local reload_word=clean
  [ -n "$reload_fail" ] && reload_word="NOT clean"
  if [ "$kind" = finding ]; then
    say "systemd: finding: $name (systemd $SD_VER): reload $reload_word; stop $stop_how"
  elif [ -z "$reload_fail$stop_fail" ]; then
    report "$name" "$SD_VER" PASS
  else
    report "$name" "$SD_VER" FAIL
  fi
  detail "$case_info"
  if [ -n "$reload_fail$stop_fail" ]; then
    [ -n "$reload_fail" ] && detail "reload: $reload_fail"
    [ -n "$stop_fail" ] && detail "stop: $stop_fail"
    if [ "$stop_how" = sigkill ] && [ "${alien:-0}" != 0 ]; then
      detail "hint: systemd took MAINPID= from a process that was not its child (a successor is the old" \
        "generation's child): it marks that main process alien and, on stop, sends SIGKILL right after" \
        "SIGTERM. With PIDFile=, a successor must not send MAINPID=: systemd reads the PID file when the" \
        "old process exits, and the new one is its child by then."
    fi
    if [ -n "$stop_line" ]; then
      detail "manager, about the stop:"
      sed 's/^/      /' <<<"$stop_line"
    fi
    detail "service log ($B/${unit%.*}.log), last lines:"
    tail -n 8 "$B/${unit%.*}.log" 2>/dev/null | sed 's/^/      /'
  fi
}

# systemd-socket-activate (no manager): it makes the socket and, on the
# first connection, execs the example with LISTEN_FDS=1 (and
# LISTEN_FDNAMES=http with --fdname=http; without it the socket has no name
# the example asks for, and must be taken all the same). That first
# connection must be answered, not reset; then SIGHUP, GET again.
socket_activate_case() { # case-name [fdname]
  local name=$1 fdname=${2:-} tool port dir pid body new="" why="" i p rc
  tool=$(command -v systemd-socket-activate || echo /lib/systemd/systemd-socket-activate)
  [ -x "$tool" ] || { report "$name" "$SD_VER" SKIPPED "no systemd-socket-activate"; return; }
  port=$(free_port)
  dir=$work/socket-activate${fdname:+-$fdname}
  mkdir -p "$dir"
  # It passes the program only the variables named with -E. The example's
  # own address (--listen) is elsewhere: the activated socket must win.
  "$tool" -l "127.0.0.1:$port" ${fdname:+--fdname="$fdname"} -E NO_COLOR=1 -E RUST_LOG=info \
    "$bin" --listen "127.0.0.1:$(free_port)" --pid-file "$dir/svc.pid" >"$dir/svc.log" 2>&1 &
  pid=$!
  disown "$pid"
  bg_pids+=("$pid")
  track_pid "$pid"
  # The first connection starts the example; retried only while the tool
  # does not listen yet (curl: 7, connection refused).
  for _ in $(seq 200); do
    body=$(curl -s --max-time 10 "http://127.0.0.1:$port/" 2>/dev/null); rc=$?
    [ "$rc" = 7 ] || break
    sleep 0.05
  done
  if [[ "$body" != "pid=$pid "* ]]; then
    why="the connection that activated the example got '$body' (curl exit $rc; want pid=$pid)"
  else
    kill -HUP "$pid"
    new=""
    for _ in $(seq 600); do
      new=$(cat "$dir/svc.pid" 2>/dev/null)
      [ -n "$new" ] && [ "$new" != "$pid" ] && ! kill -0 "$pid" 2>/dev/null && break
      sleep 0.05
    done
    track_pid "$new"
    if [ -z "$new" ] || [ "$new" = "$pid" ] || kill -0 "$pid" 2>/dev/null; then
      why="after SIGHUP: PID file '$new', first generation $pid $(kill -0 "$pid" 2>/dev/null && echo still alive || echo gone)"
    else
      body=$(get_from "$port" "$new")
      if [[ "$body" != "pid=$new "* ]]; then
        why="after SIGHUP the PID file names $new but GET / answered '$body'"
      else
        kill -TERM "$new"
        for i in $(seq 200); do kill -0 "$new" 2>/dev/null || break; sleep 0.05; done
        kill -0 "$new" 2>/dev/null && why="pid $new still alive 10 s after SIGTERM"
        grep -q 'stopping' "$dir/svc.log" || why+="${why:+; }no 'stopping' in its log after SIGTERM"
        : "$i"
      fi
    fi
  fi
  # Whatever of it still runs (after a failure), by pid.
  for p in "$pid" $new; do kill -TERM "$p" 2>/dev/null; done
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || { [ -n "$new" ] && kill -0 "$new" 2>/dev/null; } || break; sleep 0.05; done
  for p in "$pid" $new; do kill -KILL "$p" 2>/dev/null; done
  if [ -z "$why" ]; then
    report "$name" "$SD_VER" PASS
    detail "generation 0 pid $pid answered the activating connection, after SIGHUP pid $new: both served GET /; SIGTERM stopped it"
  else
    report "$name" "$SD_VER" FAIL
    detail "why: $why" "its log, last lines:"
    tail -n 8 "$dir/svc.log" | sed 's/^/      /'
  fi
}

# Every case in one manager.
run_suite() { # label
  local label=$1 has_reload=no port
  if ! start_manager "$label" "$SD_UNITS"; then
    say "systemd.sh: WARNING: no systemd $SD_VER manager can run here, so its cases are SKIPPED: $start_reason"
    for c in pidfile notify notify-reload socket-activation; do
      # notify-reload is reported by the manager that has it.
      [ "$c" = notify-reload ] && [ "${SD_VER%%.*}" -lt 253 ] 2>/dev/null &&
        { [ -n "$backports_elsewhere" ] || { [ -n "$backports_root" ] && [[ " $suites " == *" backports "* ]]; }; } && continue
      wanted "$c" && report "$c" "$SD_VER" SKIPPED "$start_reason"
    done
    return
  fi
  say "systemd.sh: systemd $SD_VER --user manager running (pid $(cat "$B/manager.pid"), logs in $B)"
  [ "${SD_VER%%.*}" -ge 253 ] 2>/dev/null && has_reload=yes

  if wanted pidfile; then
    port=$(free_port); install_unit http-server-pidfile.service http-server-pidfile.service "$port"
    run_managed case pidfile http-server-pidfile.service "$port" "$reloads"
    port=$(free_port); install_unit http-server-pidfile.service pidfile-killmode-process.service "$port" 's/^\[Service\]$/[Service]\nKillMode=process/'
    run_managed finding "pidfile, KillMode=process" pidfile-killmode-process.service "$port" "$finding_reloads"
    # The second reload of each pair while the first one's old generation
    # drains: MainPID moved to the successor when it served (MAINPID=,
    # which NotifyAccess= lets the old generation send), so the second
    # `kill -HUP $MAINPID` reaches the serving generation.
    port=$(free_port); install_unit http-server-pidfile.service pidfile-back-to-back.service "$port"
    mode=back-to-back run_managed case "pidfile, back-to-back reloads" pidfile-back-to-back.service "$port" "$reloads"
    # Without NotifyAccess=, systemd learns of the new main process only
    # when a reload command ends or the old one exits: a second reload can
    # signal a generation that is exiting (and is lost). Recorded.
    port=$(free_port); install_unit http-server-pidfile.service pidfile-no-notify-back-to-back.service "$port" '/^NotifyAccess=/d'
    mode=back-to-back run_managed finding "pidfile without NotifyAccess=, back-to-back reloads" pidfile-no-notify-back-to-back.service "$port" "$finding_reloads"
  fi
  if wanted notify; then
    port=$(free_port); install_unit http-server-notify.service http-server-notify.service "$port"
    run_managed case notify http-server-notify.service "$port" "$reloads"
    # `systemctl reload` that reports the upgrade's outcome.
    port=$(free_port); install_unit http-server-notify.service notify-handover-upgrade.service "$port" \
      's|^ExecStart=\(.*\)$|ExecStart=\1 --control-socket %t/%N.sock|; s|^ExecReload=.*$|ExecReload=/usr/local/bin/handover upgrade --socket %t/%N.sock|'
    sed -i "s|/usr/local/bin/handover|$cli|" "$B/units/notify-handover-upgrade.service"
    run_managed case "notify, ExecReload=handover upgrade" notify-handover-upgrade.service "$port" "$reloads"
    port=$(free_port); install_unit http-server-notify.service notify-back-to-back.service "$port"
    mode=back-to-back run_managed case "notify, back-to-back reloads" notify-back-to-back.service "$port" "$reloads"
    # A hardened unit: RestrictNamespaces= makes clone3 fail with ENOSYS
    # (seccomp cannot look into its arguments), and successors are started
    # with clone(2) instead, still as systemd's children.
    port=$(free_port); install_unit http-server-notify.service notify-restrict-namespaces.service "$port" 's/^\[Service\]$/[Service]\nRestrictNamespaces=yes/'
    run_managed case "notify, RestrictNamespaces=yes" notify-restrict-namespaces.service "$port" "$finding_reloads"
    if ! grep -q 'successor started with clone(2)' "$B/notify-restrict-namespaces.log" 2>/dev/null; then
      say "systemd.sh: note: no \"successor started with clone(2)\" in the RestrictNamespaces=yes case's log: clone3 was not refused here (no seccomp in this manager?), or the fallback did not run"
    fi
    port=$(free_port); install_unit http-server-notify.service notify-killmode-process.service "$port" 's/^\[Service\]$/[Service]\nKillMode=process/'
    run_managed finding "notify, KillMode=process" notify-killmode-process.service "$port" "$finding_reloads"
    # The same without PIDFile=: systemd learns the new main process from
    # MAINPID= alone.
    port=$(free_port); install_unit http-server-notify.service notify-mainpid.service "$port" '/^PIDFile=/d'
    run_managed finding "notify, MAINPID= only (no PIDFile=)" notify-mainpid.service "$port" "$finding_reloads"
  fi
  if wanted notify-reload; then
    if [ "$has_reload" = yes ]; then
      port=$(free_port); install_unit http-server-notify-reload.service http-server-notify-reload.service "$port"
      run_managed case notify-reload http-server-notify-reload.service "$port" "$reloads"
      port=$(free_port); install_unit http-server-notify-reload.service notify-reload-back-to-back.service "$port"
      mode=back-to-back run_managed case "notify-reload, back-to-back reloads" notify-reload-back-to-back.service "$port" "$reloads"
      port=$(free_port); install_unit http-server-notify-reload.service notify-reload-killmode-process.service "$port" 's/^\[Service\]$/[Service]\nKillMode=process/'
      run_managed finding "notify-reload, KillMode=process" notify-reload-killmode-process.service "$port" "$finding_reloads"
      if grep -q '^PIDFile=' "$repo/examples/systemd/http-server-notify-reload.service"; then
        port=$(free_port); install_unit http-server-notify-reload.service notify-reload-mainpid.service "$port" '/^PIDFile=/d'
        run_managed finding "notify-reload, MAINPID= only (no PIDFile=)" notify-reload-mainpid.service "$port" "$finding_reloads"
      else
        port=$(free_port); install_unit http-server-notify-reload.service notify-reload-pidfile.service "$port" \
          's|^ExecStart=.*--pid-file \(.*\)$|&\nPIDFile=\1|'
        run_managed finding "notify-reload with PIDFile=" notify-reload-pidfile.service "$port" "$finding_reloads"
      fi
    elif [ -z "$backports_elsewhere" ] && { [ -z "$backports_root" ] || [[ " $suites " != *" backports "* ]]; }; then
      report notify-reload "$SD_VER" SKIPPED "Type=notify-reload needs systemd >= 253; ${backports_reason:-the backports suite was not asked for}"
    fi
  fi
  if wanted socket-activation; then
    port=$(free_port)
    install_unit http-server.socket http-server.socket "$port"
    rm -rf "$B/units/http-server.socket.d"
    install_unit http-server-socket.service http-server-socket.service "$port"
    run_managed case socket-activation http-server-socket.service "$port" "$reloads" http-server.socket
    # The same socket unit without FileDescriptorName=: systemd names the
    # socket after the unit, and the example must still take it.
    port=$(free_port)
    install_unit http-server.socket unnamed.socket "$port" '/^FileDescriptorName=/d; s/^Service=.*$/Service=unnamed-socket.service/'
    rm -rf "$B/units/unnamed.socket.d"
    install_unit http-server-socket.service unnamed-socket.service "$port" 's/http-server\.socket/unnamed.socket/g'
    run_managed case "socket-activation, no FileDescriptorName=" unnamed-socket.service "$port" "$finding_reloads" unnamed.socket
  fi
}

# ---------------------------------------------------------------- main

if [ "$(id -u)" != 0 ]; then
  skip_everything="not root: a private manager needs a mount namespace and cgroups"
else
  install_needs
fi
if [ -z "$skip_everything" ] && ! unshare --mount true 2>"$work/unshare.err"; then
  skip_everything="cannot make a mount namespace: $(cat "$work/unshare.err")"
fi

say "systemd.sh: the example: $bin"
sys_exec=/lib/systemd/systemd
[ -x "$sys_exec" ] || sys_exec=/usr/lib/systemd/systemd
sys_ctl=$(command -v systemctl || echo /bin/systemctl)
sys_ver=$("$sys_ctl" --version 2>/dev/null | awk 'NR==1 {print $2}')
# bookworm-backports' systemd, only where the installed one is too old for
# Type=notify-reload.
if [ -z "$skip_everything" ] && [[ " $suites " == *" backports "* ]]; then
  if [ "${sys_ver%%.*}" -lt 253 ] 2>/dev/null; then
    fetch_backports
  else
    backports_reason="the installed systemd $sys_ver already has Type=notify-reload"
  fi
fi
for suite in $suites; do
  case $suite in
    system)
      SD_EXEC=$sys_exec SD_CTL=$sys_ctl SD_LIB="" SD_VER=${sys_ver:-?}
      SD_UNITS=/usr/lib/systemd/user
      ;;
    backports)
      if [ -z "$backports_root" ]; then
        # The system suite reports it when it runs here; alone, this one does.
        if [[ " $suites " != *" system "* ]] && wanted notify-reload; then
          report notify-reload "253+" SKIPPED "${backports_reason:-no systemd >= 253}"
        fi
        continue
      fi
      SD_EXEC=$backports_root/lib/systemd/systemd
      [ -x "$SD_EXEC" ] || SD_EXEC=$backports_root/usr/lib/systemd/systemd
      SD_CTL=$backports_root/bin/systemctl
      [ -x "$SD_CTL" ] || SD_CTL=$backports_root/usr/bin/systemctl
      SD_LIB=$backports_root/usr/lib/x86_64-linux-gnu/systemd
      SD_UNITS=$backports_root/usr/lib/systemd/user
      SD_VER=$(LD_LIBRARY_PATH=$SD_LIB "$SD_CTL" --version 2>/dev/null | awk 'NR==1 {print $2}')
      ;;
    *) say "systemd.sh: unknown suite $suite"; exit 2 ;;
  esac
  ports_for "$suite"
  if [ -n "$skip_everything" ]; then
    for c in pidfile notify notify-reload socket-activation systemd-socket-activate; do
      wanted "$c" && report "$c" "$SD_VER" SKIPPED "$skip_everything"
    done
    continue
  fi
  run_suite "$suite"
  if [ "$suite" = system ] && wanted systemd-socket-activate; then
    socket_activate_case systemd-socket-activate http
    socket_activate_case "systemd-socket-activate, no --fdname" ""
  fi
done

say "systemd.sh: summary"
for line in "${results[@]}"; do say "  $line"; done
[ "$failed" = 0 ] && say "systemd.sh: no case failed" || say "systemd.sh: some case FAILED"
exit "$failed"
