//! The example service under a real systemd: `handover_harness::systemd`
//! runs the unit files of `examples/systemd/` in a private `systemd --user`
//! manager (and the example behind `systemd-socket-activate`), reloads them
//! under strict load and stops them; `ci/systemd-bootstrap.sh` does only
//! the privileged part (packages, the unpacked 254, the manager's mount
//! namespace). One test per manager, the installed systemd (252 on Debian
//! 12) and bookworm-backports' 254: the test harness runs them at the same
//! time, which halves the wall time (their ports, work folders, cgroups and
//! managers are apart). Each fails on any `FAIL` case. Cases that cannot
//! run here (no root, no cgroup access, no systemd >= 253) are `SKIPPED`;
//! their lines, and the `finding:` lines, are written straight to the
//! terminal so that a skip shows in the test output even when it passes.
//!
//! The example and the `handover` client are the release builds (`cargo
//! build --release --example http_server --bin handover`), or the binaries
//! named by `HANDOVER_SYSTEMD_BINARY` and `HANDOVER_SYSTEMD_CLI`. Knobs:
//! `SYSTEMD_SUITES` ("system backports"), `SYSTEMD_CASES` (comma-separated
//! groups, e.g. `pidfile,notify`: see [`Config::cases`]), `SYSTEMD_RELOADS` (20),
//! `SYSTEMD_FINDING_RELOADS` (5), `SYSTEMD_KEEP` (keep the logs),
//! `SYSTEMD_SERVICE_ENV` (more `Environment=` for every unit) and
//! `SYSTEMD_OWN_CHILDREN` (with `HANDOVER_SUCCESSOR_PARENT=own` there).
#![cfg(feature = "chaos")]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use handover_harness::systemd::{self, Config, Suite};

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

/// Copies of the example and the client, taken now: a suite runs for
/// minutes, and a build of another checkout into the same target directory
/// may replace the originals meanwhile.
fn snapshot((example, cli): &(PathBuf, PathBuf)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary folder");
    for (from, name) in [
        (example.as_path(), "http_server"),
        (cli.as_path(), "handover"),
    ] {
        handover_harness::process::copy_executable(from, &dir.path().join(name))
            .unwrap_or_else(|e| panic!("a copy of {}: {e}", from.display()));
    }
    dir
}

/// The installed systemd (252 on Debian 12), and `systemd-socket-activate`.
#[test]
fn example_service_under_the_installed_systemd() {
    under_systemd(Suite::System, Suite::Backports);
}

/// bookworm-backports' systemd 254 (unpacked, not installed), for
/// `Type=notify-reload`.
#[test]
fn example_service_under_bookworm_backports_systemd() {
    under_systemd(Suite::Backports, Suite::System);
}

/// Runs one suite (`SYSTEMD_SUITES`; both by default), telling it that
/// `other` runs at the same time; unless `SYSTEMD_SUITES` leaves it out.
fn under_systemd(suite: Suite, other: Suite) {
    let asked = std::env::var("SYSTEMD_SUITES").unwrap_or_else(|_| "system backports".into());
    let asked_for = |suite: Suite| asked.split_whitespace().any(|word| word == suite.name());
    if !asked_for(suite) {
        shout(&format!(
            "systemd: the {} suite: not run (SYSTEMD_SUITES={asked})",
            suite.name()
        ));
        return;
    }
    let snapshot = snapshot(binaries());
    let number = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let config = Config {
        repo: repo(),
        backports_dir: repo().join("target/systemd-backports"),
        example: snapshot.path().join("http_server"),
        cli: snapshot.path().join("handover"),
        suite,
        elsewhere: if asked_for(other) {
            vec![other]
        } else {
            Vec::new()
        },
        cases: std::env::var("SYSTEMD_CASES")
            .ok()
            .map(|cases| cases.split(',').map(|c| c.trim().to_owned()).collect()),
        reloads: number("SYSTEMD_RELOADS", 20),
        finding_reloads: number("SYSTEMD_FINDING_RELOADS", 5),
        service_env: std::env::var("SYSTEMD_SERVICE_ENV").unwrap_or_default(),
        own_children: std::env::var_os("SYSTEMD_OWN_CHILDREN").is_some(),
        keep: std::env::var_os("SYSTEMD_KEEP").is_some(),
    };
    let started = Instant::now();
    let report = systemd::run(&config);
    let output = report.output.join("\n");
    // Shown on failure by the harness; the case lines are shouted anyway.
    println!("{output}");
    shout(&format!(
        "systemd, suite {}, with {} ({:.0?}):",
        suite.name(),
        binaries().0.display(),
        started.elapsed()
    ));
    for line in report
        .output
        .iter()
        .filter(|line| line.starts_with("systemd: "))
    {
        shout(&format!("  {line}"));
    }
    let failed = report.failed();
    assert!(failed.is_empty(), "failed: {failed:#?}\n\n{output}");
    assert!(!report.results.is_empty(), "no case reported\n\n{output}");
}
