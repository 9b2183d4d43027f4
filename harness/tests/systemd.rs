//! The example service under a real systemd: `ci/systemd.sh` runs the unit
//! files of `examples/systemd/` in a private `systemd --user` manager (and
//! the example behind `systemd-socket-activate`), reloads them under load and
//! stops them. One test per manager, the installed systemd (252 on Debian
//! 12) and bookworm-backports' 254, each running the script for its suite
//! alone: the test harness runs them at the same time, which halves the
//! wall time (the script keeps their ports, work folders, cgroups and
//! managers apart). Each fails on any `FAIL` line. Cases that cannot run here
//! (no root, no cgroup access, no systemd >= 253) are `SKIPPED` by the
//! script; their lines, and the `finding:` lines, are written straight to
//! the terminal so that a skip shows in the test output even when it passes.
//!
//! The example and the `handover` client are the release builds (`cargo
//! build --release --example http_server --bin handover`), or the binaries
//! named by `HANDOVER_SYSTEMD_BINARY` and `HANDOVER_SYSTEMD_CLI`; the load
//! generator is this crate's `handover-harness load`.
#![cfg(feature = "chaos")]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The whole script is bounded inside; this only guards against a hang.
const DEADLINE: Duration = Duration::from_secs(20 * 60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the repository")
}

/// Writes to the terminal, past the test harness's output capture.
fn shout(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{text}");
}

/// Builds the example and the client in release mode, once for both
/// tests, and returns their paths (from cargo's own report, so that
/// CARGO_TARGET_DIR and the like are honoured).
fn binaries() -> &'static (PathBuf, PathBuf) {
    static BUILT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BUILT.get_or_init(build)
}

fn build() -> (PathBuf, PathBuf) {
    if let (Some(example), Some(cli)) = (
        std::env::var_os("HANDOVER_SYSTEMD_BINARY"),
        std::env::var_os("HANDOVER_SYSTEMD_CLI"),
    ) {
        return (PathBuf::from(example), PathBuf::from(cli));
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--example",
            "http_server",
            "--bin",
            "handover",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(repo())
        .stderr(Stdio::inherit())
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "cargo build --release --example http_server --bin handover: {}",
        output.status
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let executable = |name: &str| {
        stdout
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|message| message["reason"] == "compiler-artifact")
            .filter(|message| message["target"]["name"] == name)
            .find_map(|message| message["executable"].as_str().map(PathBuf::from))
            .unwrap_or_else(|| panic!("cargo reports the executable of {name}"))
    };
    (executable("http_server"), executable("handover"))
}

/// Copies of the example, the client and this crate's `handover-harness`
/// (the load generator), taken now: the script runs for minutes, and a
/// build of another checkout into the same target directory may replace
/// the originals meanwhile.
fn snapshot((example, cli): &(PathBuf, PathBuf)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let harness = Path::new(env!("CARGO_BIN_EXE_handover-harness"));
    for (from, name) in [
        (example.as_path(), "http_server"),
        (cli.as_path(), "handover"),
        (harness, "handover-harness"),
    ] {
        handover_harness::process::copy_executable(from, &dir.path().join(name))
            .unwrap_or_else(|e| panic!("a copy of {}: {e}", from.display()));
    }
    dir
}

/// The installed systemd (252 on Debian 12), and `systemd-socket-activate`.
#[test]
fn example_service_under_the_installed_systemd() {
    under_systemd("system", "backports");
}

/// bookworm-backports' systemd 254 (unpacked, not installed), for
/// `Type=notify-reload`.
#[test]
fn example_service_under_bookworm_backports_systemd() {
    under_systemd("backports", "system");
}

/// Runs `ci/systemd.sh` for one suite (`SYSTEMD_SUITES`), telling it that
/// `other` runs at the same time; unless `SYSTEMD_SUITES` is set and leaves
/// this suite out.
fn under_systemd(suite: &str, other: &str) {
    if !cfg!(target_os = "linux") {
        shout("systemd: every case: SKIPPED (systemd runs on Linux only)");
        return;
    }
    let asked = std::env::var("SYSTEMD_SUITES").unwrap_or_else(|_| "system backports".into());
    if !asked.split_whitespace().any(|word| word == suite) {
        shout(&format!(
            "systemd: the {suite} suite: not run (SYSTEMD_SUITES={asked})"
        ));
        return;
    }
    let others: Vec<&str> = asked
        .split_whitespace()
        .filter(|word| *word == other)
        .collect();
    let snapshot = snapshot(binaries());
    let [binary, cli, load] =
        ["http_server", "handover", "handover-harness"].map(|name| snapshot.path().join(name));
    let log = tempfile::NamedTempFile::new().expect("a temporary file");
    let mut child = Command::new("bash")
        .arg(repo().join("ci/systemd.sh"))
        .arg(&binary)
        .arg(&cli)
        .arg(&load)
        .env("SYSTEMD_SUITES", suite)
        .env("SYSTEMD_OTHER_SUITES", others.join(" "))
        .current_dir(repo())
        .stdin(Stdio::null())
        .stdout(log.reopen().expect("the log"))
        .stderr(log.reopen().expect("the log"))
        .spawn()
        .expect("bash runs");
    // Wait for the script's exit; a watchdog sends SIGTERM (the script's trap
    // tears its managers down) only if it is still running at the deadline.
    let started = Instant::now();
    let pid = Pid::from_raw(child.id() as i32);
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        let expired = finished.recv_timeout(DEADLINE).is_err();
        if expired {
            let _ = kill(pid, Signal::SIGTERM);
        }
        expired
    });
    let exit = child.wait().expect("wait for the script");
    let _ = done.send(());
    let status = if watchdog.join().unwrap_or(false) {
        None
    } else {
        Some(exit)
    };
    let output = std::fs::read_to_string(log.path()).expect("the script's output");
    // Shown on failure by the harness; the case lines are shouted anyway.
    println!("{output}");

    let lines: Vec<&str> = output
        .lines()
        .filter(|line| line.starts_with("systemd: "))
        .collect();
    shout(&format!(
        "ci/systemd.sh, suite {suite}, with {} ({:.0?}):",
        binaries().0.display(),
        started.elapsed()
    ));
    for line in &lines {
        shout(&format!("  {line}"));
    }
    let status = status.unwrap_or_else(|| panic!("ci/systemd.sh ran past {DEADLINE:?}\n{output}"));
    let failed: Vec<&&str> = lines
        .iter()
        .filter(|line| line.contains(": FAIL"))
        .collect();
    assert!(failed.is_empty(), "failed: {failed:#?}\n\n{output}");
    assert!(status.success(), "ci/systemd.sh: {status}\n\n{output}");
    assert!(
        lines
            .iter()
            .any(|line| line.contains(": PASS") || line.contains(": SKIPPED")),
        "ci/systemd.sh reported no case\n\n{output}"
    );
}
