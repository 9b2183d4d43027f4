//! The example server's handover as its user sees it, from outside the
//! processes: `examples/http_server` (release build) with a PID file in a
//! disk-backed directory, idle, upgraded again and again, beside its floor.
//!
//! - `floor`: `http_server --help` started and reaped (`waitpid`): a bare
//!   start and exit of the same binary, timed the same way.
//! - `sighup`: from `kill(OLD, SIGHUP)` to the PID file naming the new
//!   process (`pid_file`; the rename is seen through inotify, then the file
//!   is read), and to the old process gone (`old_gone`: its `waitpid`
//!   returns; this process is a child subreaper, so every generation is its
//!   child by the time it exits).
//! - `cli`: `handover upgrade --socket` from its spawn to its reaping
//!   (`cli_wait`), beside the event it waits for, the old process's exit;
//!   and `--no-wait` (`cli_no_wait`) beside the successor's readiness (the
//!   timestamp of its `ready` log line, which it writes just after telling
//!   its parent).
//!
//! Each round takes every measurement once, in a shuffled order, so that all
//! of them live through the same moments of a noisy machine; the medians and
//! their ratios come from the same rounds. The phases of the SIGHUP upgrade
//! (signal to `upgrade started`, to the successor's `generation started`,
//! to its `ready`, to the old one's `exiting`, to its exit) come from the
//! processes' own log timestamps and are printed as a breakdown, not as a
//! target.
//!
//! The server is started outside any systemd unit (the unit's variables
//! are removed), where the old generation names its successor in the PID
//! file as soon as it is ready; `HANDOVER_EXAMPLE_IN_UNIT=1` starts it as
//! inside a unit whose successors are its own (`INVOCATION_ID` set), where
//! it does so at its exit.
//!
//! `HANDOVER_EXAMPLE_ROUNDS` sets the rounds (default 100; 0 skips the
//! bench, and so does a criterion-style filter that does not match
//! `example`). `HANDOVER_EXAMPLE_DIR` sets the PID file's directory (default
//! `target/example-bench`, which is wherever the target directory lives; a
//! tmpfs is reported). Linux only (inotify, subreaper).

fn main() {
    #[cfg(target_os = "linux")]
    linux::main();
    #[cfg(not(target_os = "linux"))]
    println!("example bench: Linux only (inotify, child subreaper)");
}

#[cfg(target_os = "linux")]
// Every child is reaped with waitpid, by pid or as any child (a subreaper's
// generations are its children too), not through std's `Child::wait`.
#[allow(clippy::zombie_processes)]
mod linux {
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader};
    use std::os::fd::AsFd;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::sync::mpsc;
    use std::time::{Duration, Instant, SystemTime};

    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    use nix::sys::signal::{Signal, kill};
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::Pid;

    /// How long any one event may take before the bench gives up.
    const PATIENCE: Duration = Duration::from_secs(20);

    pub fn main() {
        let rounds = rounds();
        if rounds == 0 {
            return;
        }
        let server = example_binary();
        let cli = PathBuf::from(env!("CARGO_BIN_EXE_handover"));
        let dir = pid_dir();
        let _ = nix::sys::prctl::set_child_subreaper(true);
        let mut bench = Bench::start(&server, cli, &dir);
        let mut samples: HashMap<&'static str, Vec<f64>> = HashMap::new();
        let mut record = |id: &'static str, ms: f64| samples.entry(id).or_default().push(ms);
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        // A first upgrade and floor, unrecorded: page cache, first exec.
        bench.floor();
        bench.sighup();
        for _ in 0..rounds {
            let mut order = [0, 1, 2, 3];
            for i in (1..order.len()).rev() {
                order.swap(i, (next() % (i as u64 + 1)) as usize);
            }
            for figure in order {
                match figure {
                    0 => record("floor", bench.floor()),
                    1 => {
                        let sighup = bench.sighup();
                        record("pid_file", sighup.pid_file);
                        record("old_gone", sighup.old_gone);
                        for (phase, ms) in sighup.phases {
                            record(phase, ms);
                        }
                    }
                    2 => {
                        let (cli, event) = bench.cli(true);
                        record("cli_wait", cli);
                        record("cli_wait_over_event", cli - event);
                    }
                    _ => {
                        let (cli, event) = bench.cli(false);
                        record("cli_no_wait", cli);
                        record("cli_no_wait_over_event", cli - event);
                    }
                }
            }
        }
        bench.stop();
        report(rounds, &dir, &samples);
    }

    fn rounds() -> usize {
        if let Ok(rounds) = std::env::var("HANDOVER_EXAMPLE_ROUNDS") {
            return rounds.parse().unwrap_or(0);
        }
        // `cargo bench -- FILTER`: run only if the filter names this bench.
        let filters: Vec<String> = std::env::args()
            .skip(1)
            .filter(|arg| !arg.starts_with('-'))
            .collect();
        if filters.is_empty() || filters.iter().any(|f| "example".contains(f.as_str())) {
            100
        } else {
            0
        }
    }

    /// The release build of the example, built now if cargo runs this bench
    /// (a no-op when it is up to date); `HANDOVER_EXAMPLE_BIN` names another.
    fn example_binary() -> PathBuf {
        if let Some(bin) = std::env::var_os("HANDOVER_EXAMPLE_BIN") {
            return bin.into();
        }
        if let Some(cargo) = std::env::var_os("CARGO") {
            let status = Command::new(cargo)
                .args(["build", "--release", "--example", "http_server"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("run cargo build");
            assert!(status.success(), "cargo build --example http_server failed");
        }
        target_dir().join("release/examples/http_server")
    }

    fn target_dir() -> PathBuf {
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
    }

    fn pid_dir() -> PathBuf {
        let dir = std::env::var_os("HANDOVER_EXAMPLE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| target_dir().join("example-bench"));
        std::fs::create_dir_all(&dir).expect("create the PID file's directory");
        for stale in ["http.pid", "http.sock"] {
            let _ = std::fs::remove_file(dir.join(stale));
        }
        dir
    }

    /// One log line of the servers: when it was written (their clock) and
    /// what it says.
    struct Line {
        at: SystemTime,
        text: String,
    }

    struct Bench {
        server: PathBuf,
        cli: PathBuf,
        pid_file: PathBuf,
        socket: PathBuf,
        inotify: Inotify,
        /// The serving generation.
        serving: Pid,
        lines: mpsc::Receiver<Line>,
        /// The lines of the current upgrade.
        log: Vec<Line>,
    }

    struct Sighup {
        pid_file: f64,
        old_gone: f64,
        phases: Vec<(&'static str, f64)>,
    }

    impl Bench {
        fn start(server: &Path, cli: PathBuf, dir: &Path) -> Bench {
            let pid_file = dir.join("http.pid");
            let socket = dir.join("http.sock");
            let inotify = Inotify::init(InitFlags::IN_CLOEXEC).expect("inotify");
            inotify
                .add_watch(
                    dir,
                    AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE,
                )
                .expect("watch the PID file's directory");
            let mut command = Command::new(server);
            // A server started by hand, outside any systemd unit, whatever
            // ran the bench; `HANDOVER_EXAMPLE_IN_UNIT=1`: as inside a unit
            // whose successors are the old generation's children (the PID
            // file then names the successor only at the old one's exit).
            for var in [
                "INVOCATION_ID",
                "MANAGERPID",
                "NOTIFY_SOCKET",
                "LISTEN_FDS",
                "LISTEN_PID",
            ] {
                command.env_remove(var);
            }
            if std::env::var_os("HANDOVER_EXAMPLE_IN_UNIT").is_some_and(|v| v == "1") {
                command.env("INVOCATION_ID", "0123456789abcdef0123456789abcdef");
            }
            let mut child = command
                .args(["--listen", "127.0.0.1:0", "--pid-file"])
                .arg(&pid_file)
                .arg("--control-socket")
                .arg(&socket)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start the example server");
            let stderr = child.stderr.take().expect("piped");
            let (send, lines) = mpsc::channel();
            std::thread::spawn(move || {
                for text in BufReader::new(stderr).lines().map_while(Result::ok) {
                    // "2026-11-30T11:37:29.677966Z  INFO ...": the servers' clock.
                    let at = text
                        .split_whitespace()
                        .next()
                        .and_then(|stamp| humantime::parse_rfc3339(stamp).ok())
                        .unwrap_or_else(SystemTime::now);
                    if send.send(Line { at, text }).is_err() {
                        return;
                    }
                }
            });
            let serving = Pid::from_raw(child.id() as i32);
            let mut bench = Bench {
                server: server.to_path_buf(),
                cli,
                pid_file,
                socket,
                inotify,
                serving,
                lines,
                log: Vec::new(),
            };
            bench.wait_for_pid_file(serving);
            bench.log_until("serving", serving);
            bench
        }

        /// `http_server --help`, spawned and reaped, in milliseconds.
        fn floor(&mut self) -> f64 {
            let started = Instant::now();
            let child = Command::new(&self.server)
                .arg("--help")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn the floor");
            let status = waitpid(Pid::from_raw(child.id() as i32), None).expect("reap the floor");
            let elapsed = ms(started.elapsed());
            assert!(
                matches!(status, WaitStatus::Exited(_, 0)),
                "--help: {status:?}"
            );
            elapsed
        }

        /// One upgrade by SIGHUP.
        fn sighup(&mut self) -> Sighup {
            let old = self.serving;
            self.log.clear();
            let sent_wall = SystemTime::now();
            let started = Instant::now();
            kill(old, Signal::SIGHUP).expect("signal the serving generation");
            let new = self.wait_for_pid_file_change(old);
            let pid_file = ms(started.elapsed());
            let status = waitpid(old, None).expect("reap the old generation");
            let old_gone = ms(started.elapsed());
            let gone_wall = sent_wall + Duration::from_secs_f64(old_gone / 1e3);
            assert!(
                matches!(status, WaitStatus::Exited(_, 0)),
                "old generation: {status:?}"
            );
            self.serving = new;
            // Phases, from the processes' own log lines.
            let upgrade_started = self.log_until("upgrade started", old);
            let successor_started = self.log_until("generation started", new);
            let ready = self.log_until("supervisor: ready", new);
            let exiting = self.log_until("exiting", old);
            // The successor takes an upgrade only once it has seen its
            // parent go: wait for that before the next round.
            self.log_until("parent exited", new);
            let between =
                |from: SystemTime, to: SystemTime| to.duration_since(from).map_or(0.0, ms);
            Sighup {
                pid_file,
                old_gone,
                phases: vec![
                    (
                        "phase: signal -> upgrade started",
                        between(sent_wall, upgrade_started),
                    ),
                    (
                        "phase: -> successor's main",
                        between(upgrade_started, successor_started),
                    ),
                    (
                        "phase: -> successor ready",
                        between(successor_started, ready),
                    ),
                    (
                        "phase: -> old exiting (main returns)",
                        between(ready, exiting),
                    ),
                    ("phase: -> old gone", between(exiting, gone_wall)),
                ],
            }
        }

        /// `handover upgrade --socket` (with `--no-wait` unless `wait`): its
        /// time from spawn to reaping, and the time of the event it waits
        /// for from the same start, in milliseconds.
        fn cli(&mut self, wait: bool) -> (f64, f64) {
            let old = self.serving;
            self.log.clear();
            let mut command = Command::new(&self.cli);
            command
                .arg("upgrade")
                .arg("--socket")
                .arg(&self.socket)
                .stdin(Stdio::null())
                .stdout(Stdio::null());
            if !wait {
                command.arg("--no-wait");
            }
            let started_wall = SystemTime::now();
            let started = Instant::now();
            let child = command.spawn().expect("spawn handover upgrade");
            let cli = Pid::from_raw(child.id() as i32);
            // Both are this process's children: reap them as they go.
            let (mut cli_done, mut old_gone) = (None, None);
            while cli_done.is_none() || (wait && old_gone.is_none()) {
                let status = waitpid(None, None).expect("reap a child");
                let at = ms(started.elapsed());
                match status.pid() {
                    Some(pid) if pid == cli => {
                        assert!(
                            matches!(status, WaitStatus::Exited(_, 0)),
                            "handover upgrade: {status:?}"
                        );
                        cli_done = Some(at);
                    }
                    Some(pid) if pid == old => old_gone = Some(at),
                    other => panic!("an unexpected child went: {other:?}"),
                }
            }
            let cli_ms = cli_done.unwrap_or_default();
            let new = self.wait_for_pid_file_change(old);
            let ready = self.log_until("supervisor: ready", new);
            self.serving = new;
            if old_gone.is_none() {
                let status = waitpid(old, None).expect("reap the old generation");
                assert!(matches!(status, WaitStatus::Exited(_, 0)), "{status:?}");
            }
            self.log_until("parent exited", new);
            let event = if wait {
                old_gone.unwrap_or_default()
            } else {
                ready.duration_since(started_wall).map_or(0.0, ms)
            };
            (cli_ms, event)
        }

        fn stop(&mut self) {
            let _ = kill(self.serving, Signal::SIGTERM);
            let _ = waitpid(self.serving, None);
        }

        /// Waits until the PID file names `pid`.
        fn wait_for_pid_file(&mut self, pid: Pid) {
            let deadline = Instant::now() + PATIENCE;
            while read_pid(&self.pid_file) != Some(pid) {
                self.next_rename(deadline);
            }
        }

        /// Waits until the PID file names another process than `old`.
        fn wait_for_pid_file_change(&mut self, old: Pid) -> Pid {
            let deadline = Instant::now() + PATIENCE;
            loop {
                match read_pid(&self.pid_file) {
                    Some(pid) if pid != old => return pid,
                    _ => self.next_rename(deadline),
                }
            }
        }

        /// Sleeps until something is renamed or written in the directory.
        fn next_rename(&mut self, deadline: Instant) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "the PID file did not change in time");
            let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, timeout).expect("poll inotify") > 0 {
                let _ = self.inotify.read_events();
            }
        }

        /// When the line by `pid` that holds `what` was written, from the
        /// lines of this upgrade (the processes write concurrently, so their
        /// lines may come in any order).
        fn log_until(&mut self, what: &str, pid: Pid) -> SystemTime {
            let pid = format!("pid={pid}");
            // Lines that name their process by pid= are its own, except the
            // old generation's "successor ..." lines; the other lines this
            // looks for name no pid and come from one process only.
            let matches = |line: &Line| {
                line.text.contains(what)
                    && ((line.text.contains(&pid) && !line.text.contains("successor"))
                        || !line.text.contains("pid="))
            };
            if let Some(line) = self.log.iter().find(|line| matches(line)) {
                return line.at;
            }
            loop {
                let line = self
                    .lines
                    .recv_timeout(PATIENCE)
                    .unwrap_or_else(|_| panic!("no log line {what:?} by {pid}"));
                let at = line.at;
                let found = matches(&line);
                self.log.push(line);
                if found {
                    return at;
                }
            }
        }
    }

    fn read_pid(path: &Path) -> Option<Pid> {
        let text = std::fs::read_to_string(path).ok()?;
        text.trim().parse().ok().map(Pid::from_raw)
    }

    fn ms(duration: Duration) -> f64 {
        duration.as_secs_f64() * 1e3
    }

    fn report(rounds: usize, dir: &Path, samples: &HashMap<&'static str, Vec<f64>>) {
        let quantile = |id: &str, q: f64| -> f64 {
            let mut values = samples.get(id).cloned().unwrap_or_default();
            if values.is_empty() {
                return f64::NAN;
            }
            values.sort_by(f64::total_cmp);
            values[((values.len() - 1) as f64 * q).round() as usize]
        };
        let median = |id: &str| quantile(id, 0.5);
        let fs = nix::sys::statfs::statfs(dir).map(|s| s.filesystem_type());
        let tmpfs = matches!(fs, Ok(t) if t == nix::sys::statfs::TMPFS_MAGIC);
        println!(
            "\nexamples/http_server, idle, PID file in {} ({}); {rounds} rounds, each taking every figure once in a shuffled order:",
            dir.display(),
            if tmpfs {
                "tmpfs: NOT disk-backed"
            } else {
                "not tmpfs"
            }
        );
        let floor = median("floor");
        println!(
            "  {:<40} {:>8} {:>8} {:>8}   median / floor",
            "", "median", "p10", "p90"
        );
        let row = |id: &str, label: &str, ratio: bool| {
            let ratio = if ratio {
                format!("{:.2} x", median(id) / floor)
            } else {
                String::new()
            };
            println!(
                "  {label:<40} {:>8.3} {:>8.3} {:>8.3}   {ratio}",
                median(id),
                quantile(id, 0.1),
                quantile(id, 0.9)
            );
        };
        row("floor", "floor: http_server --help", true);
        row("pid_file", "SIGHUP -> PID file names the new one", true);
        row("old_gone", "SIGHUP -> old process gone", true);
        println!("  where the time goes (the processes' log timestamps, medians):");
        for phase in [
            "phase: signal -> upgrade started",
            "phase: -> successor's main",
            "phase: -> successor ready",
            "phase: -> old exiting (main returns)",
            "phase: -> old gone",
        ] {
            row(
                phase,
                &format!("  {}", phase.trim_start_matches("phase: ")),
                false,
            );
        }
        row("cli_wait", "handover upgrade --socket", true);
        row(
            "cli_wait_over_event",
            "  its exit after the old one's",
            false,
        );
        row("cli_no_wait", "handover upgrade --socket --no-wait", true);
        row(
            "cli_no_wait_over_event",
            "  its exit after the ready line",
            false,
        );

        let verdict = |met: bool| if met { "met" } else { "NOT MET" };
        println!("\ntargets (medians):");
        let old_gone = median("old_gone") / floor;
        let pid_file = median("pid_file") / floor;
        println!(
            "  SIGHUP -> old process gone          {old_gone:.2} x floor   at most 1.50 x   {}",
            verdict(old_gone <= 1.5)
        );
        println!(
            "  SIGHUP -> PID file names the new    {pid_file:.2} x floor   at most 1.25 x   {}",
            verdict(pid_file <= 1.25)
        );
        for (id, label) in [
            ("cli_wait_over_event", "handover upgrade, past the old exit"),
            (
                "cli_no_wait_over_event",
                "--no-wait, past the ready line     ",
            ),
        ] {
            let over = median(id);
            println!(
                "  {label}  {over:.3} ms         at most 0.5 ms   {}",
                verdict(over <= 0.5)
            );
        }
    }
}
