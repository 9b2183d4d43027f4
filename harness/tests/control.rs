//! The control socket and the `handover` command-line tool, against the
//! real subject: outcomes, exit codes, bad requests, peer credentials.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use handover_harness::process::{Subject, SubjectConfig};

/// The `handover` binary of the library crate, built (or found up to date)
/// by cargo itself.
fn handover_cli() -> &'static Path {
    static CLI: OnceLock<PathBuf> = OnceLock::new();
    CLI.get_or_init(|| {
        let output = Command::new(env!("CARGO"))
            .args([
                "build",
                "-q",
                "-p",
                "handover",
                "--bin",
                "handover",
                "--message-format=json",
            ])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .output()
            .expect("cargo runs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| line.contains("\"executable\":\"") && line.contains("handover"))
            .find_map(|line| {
                let start = line.find("\"executable\":\"")? + "\"executable\":\"".len();
                let end = start + line[start..].find('"')?;
                Some(PathBuf::from(&line[start..end]))
            })
            .expect("cargo names the executable")
    })
}

fn cli(args: &[&str]) -> Output {
    Command::new(handover_cli())
        .args(args)
        .output()
        .expect("the CLI runs")
}

struct Service {
    subject: Subject,
    socket: PathBuf,
    faults: PathBuf,
    _dir: tempfile::TempDir,
}

fn service() -> Service {
    service_with(&[])
}

fn service_with(extra: &[&str]) -> Service {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    let faults = dir.path().join("faults");
    let mut args = vec!["--control-socket".to_owned(), socket.display().to_string()];
    args.extend(extra.iter().map(|word| (*word).to_owned()));
    let subject = Subject::start(&SubjectConfig {
        binary: PathBuf::from(env!("CARGO_BIN_EXE_handover-subject")),
        args,
        faults_file: Some(faults.clone()),
        ..SubjectConfig::default()
    })
    .unwrap();
    Service {
        subject,
        socket,
        faults,
        _dir: dir,
    }
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn successful_upgrade_exits_zero_and_names_the_new_generation() {
    let mut service = service();
    let mode = std::fs::metadata(&service.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let socket = service.socket.to_str().unwrap();

    let output = cli(&["upgrade", "--socket", socket]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let pid = service.subject.pid_of(1).unwrap();
    assert!(
        text(&output).contains(&format!("generation 1 (pid {pid}) is serving")),
        "{}",
        text(&output)
    );

    // The socket was handed over: the new generation answers on it.
    service
        .subject
        .wait_for(|e| e.is("parent-gone", 1))
        .unwrap();
    let output = cli(&["status", "--socket", socket]);
    assert_eq!(output.status.code(), Some(0));
    assert!(
        text(&output).contains(&format!("generation 1 (pid {pid})")),
        "{}",
        text(&output)
    );
}

#[test]
fn failed_upgrade_exits_one_with_the_reason() {
    let service = service();
    std::fs::write(&service.faults, "1=crash-before-ready").unwrap();
    let output = cli(&["upgrade", "--socket", service.socket.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let said = text(&output);
    assert!(
        said.contains("(successor_exited)") && said.contains("exited with code 4"),
        "{said}"
    );
    // Still the old generation.
    let output = cli(&["status", "--socket", service.socket.to_str().unwrap()]);
    assert!(text(&output).contains("generation 0"), "{}", text(&output));
}

#[test]
fn an_unreachable_service_exits_three() {
    let output = cli(&["upgrade", "--socket", "/nonexistent/control.sock"]);
    assert_eq!(output.status.code(), Some(3), "{}", text(&output));
    assert!(
        text(&output).contains("cannot reach /nonexistent/control.sock"),
        "{}",
        text(&output)
    );
    let output = cli(&["explode"]);
    assert_eq!(output.status.code(), Some(2));
}

/// Sends `bytes` and reads the one-line answer (an old generation keeps
/// the connection open after it, until it exits).
fn raw_request(socket: &Path, bytes: &[u8]) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    // The service may answer before reading everything it was sent.
    let _ = stream.write_all(bytes);
    let mut answer = String::new();
    let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stream), &mut answer);
    answer
}

#[test]
fn garbage_and_oversized_requests_get_an_error_and_change_nothing() {
    let service = service();
    assert!(raw_request(&service.socket, b"bogus\n").starts_with("error reason=bad_request"));
    assert!(raw_request(&service.socket, &[b'x'; 5000]).starts_with("error reason=bad_request"));
    assert!(raw_request(&service.socket, b"\xff\xfe\n").starts_with("error reason=bad_request"));
    let output = cli(&["status", "--socket", service.socket.to_str().unwrap()]);
    assert!(text(&output).contains("generation 0"), "{}", text(&output));
}

#[test]
fn a_client_that_hangs_up_leaves_no_upgrade_queued() {
    let mut service = service();
    std::fs::write(&service.faults, "1=slow-init:300").unwrap();
    let mut stream = UnixStream::connect(&service.socket).unwrap();
    stream.write_all(b"upgrade\n").unwrap();
    drop(stream);
    // The upgrade it asked for runs to its end...
    service
        .subject
        .wait_for(|e| e.is("parent-gone", 1))
        .unwrap();
    // ...and is the only one: no second successor was started.
    let output = cli(&["status", "--socket", service.socket.to_str().unwrap()]);
    assert!(text(&output).contains("generation 1"), "{}", text(&output));
    let started = service.subject.count("started");
    assert_eq!(started, 2, "{:#?}", service.subject.history);
}

/// Another user is refused even where the socket's mode would let it in.
#[test]
fn requests_from_another_user_are_refused() {
    if !nix::unistd::geteuid().is_root()
        || Command::new("setpriv").arg("--version").output().is_err()
    {
        eprintln!(
            "SKIPPED requests_from_another_user_are_refused: needs root and setpriv to act as another user"
        );
        return;
    }
    let service = service();
    std::fs::set_permissions(&service.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(handover_cli())
        .args(["upgrade", "--socket", service.socket.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(text(&output).contains("(forbidden)"), "{}", text(&output));
}

/// Every request gets an answer, even one that reaches a generation in its
/// last moments, and none is refused because the previous generation still
/// drains: `handover upgrade` returns only once the old generation has
/// exited, so back to back, every one succeeds.
#[test]
fn back_to_back_upgrades_all_succeed() {
    let service = service();
    let socket = service.socket.to_str().unwrap();
    for attempt in 0..100 {
        let output = cli(&["upgrade", "--socket", socket]);
        assert_eq!(
            output.status.code(),
            Some(0),
            "attempt {attempt}: {}",
            text(&output)
        );
        assert!(
            text(&output).contains(&format!("generation {} ", attempt + 1)),
            "attempt {attempt}: {}",
            text(&output)
        );
    }
}

/// `handover upgrade` returns once the old generation has exited, so that
/// no old code runs after it (and a service manager that reads the PID file
/// when it ends finds its own child); `--no-wait` returns at readiness.
#[test]
fn upgrade_waits_for_the_old_generation_to_exit() {
    let mut service = service();
    let socket = service.socket.to_str().unwrap().to_owned();
    let addr = service.subject.addresses.http;
    let held = std::thread::spawn(move || handover_harness::process::http_get(addr, "/hold"));
    service
        .subject
        .wait_for(|e| e.is("hold-request", 0))
        .unwrap();
    let old = service.subject.first_pid();

    // Generation 0 drains until released: the wait runs out, and says so.
    // (The same deadline covers the successor's start: a debug build on a
    // loaded machine needs more than a second or two.)
    let output = cli(&["upgrade", "--socket", &socket, "--timeout", "5s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert!(
        text(&output).contains(&format!("old generation (pid {old}) was still finishing")),
        "{}",
        text(&output)
    );
    assert!(handover_harness::process::is_running(old));
    service
        .subject
        .signal(old, nix::sys::signal::Signal::SIGUSR1)
        .unwrap();
    held.join().unwrap().unwrap();
    service
        .subject
        .wait_for(|e| e.is("parent-gone", 1))
        .unwrap();

    // Generation 1 has nothing in flight: it exits, and the command says so
    // only after that.
    let old = service.subject.pid_of(1).unwrap();
    let output = cli(&["upgrade", "--socket", &socket]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert!(
        text(&output).contains(&format!("the old generation (pid {old}) exited")),
        "{}",
        text(&output)
    );
    assert!(!handover_harness::process::is_running(old));

    let old = service.subject.pid_of(2).unwrap();
    let addr = service.subject.addresses.http;
    let held = std::thread::spawn(move || handover_harness::process::http_get(addr, "/hold"));
    service
        .subject
        .wait_for(|e| e.is("hold-request", 2))
        .unwrap();
    let output = cli(&["upgrade", "--socket", &socket, "--no-wait"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert!(handover_harness::process::is_running(old));
    service
        .subject
        .signal(old, nix::sys::signal::Signal::SIGUSR1)
        .unwrap();
    held.join().unwrap().unwrap();
}

/// Usage mistakes are named, with the usage, and exit 2; `--help` is not a
/// mistake.
#[test]
fn the_command_line_says_what_was_wrong() {
    for args in [
        &["upgrade", "--socket", "s", "--timeout", "0"][..],
        &[
            "upgrade",
            "--socket",
            "s",
            "--timeout",
            "307445734561825861m",
        ],
        &["upgrade", "--socket", "s", "--frobnicate"],
        &["upgrade"],
        &["reload", "--socket", "s"],
    ] {
        let output = cli(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", text(&output));
        let said = String::from_utf8_lossy(&output.stderr);
        assert!(said.starts_with("handover: "), "{args:?}: {said}");
        assert!(said.contains("usage: handover upgrade"), "{args:?}: {said}");
    }
    for args in [&["--help"][..], &["upgrade", "--help"], &["--version"]] {
        let output = cli(args);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {}", text(&output));
        assert!(!output.stdout.is_empty(), "{args:?}");
    }
}

/// A connection the old generation accepted before its successor became
/// ready, whose request comes only after: the old generation answers it
/// (`exiting`: nothing done, ask again) before it leaves, rather than
/// closing it unanswered.
#[test]
fn a_request_accepted_as_the_generation_exits_is_answered() {
    let service = service();
    // Accepted by generation 0: the only one, and first in the queue.
    let mut early = UnixStream::connect(&service.socket).unwrap();
    let upgraded = raw_request(&service.socket, b"upgrade\n");
    assert!(upgraded.starts_with("ok "), "{upgraded}");
    early.write_all(b"upgrade\n").unwrap();
    let mut answer = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(early), &mut answer).unwrap();
    assert!(
        answer.starts_with("error reason=exiting "),
        "generation 0 answered {answer:?}"
    );
}

/// Once a client has read `ok` for an upgrade, the old generation accepts
/// nothing more: the very next request, sent at once, reaches the new
/// generation (it used to be accepted now and then by the old one, in the
/// moment between its answer and its accept loop seeing the exit, and be
/// refused with `exiting`).
#[test]
fn after_ok_only_the_new_generation_accepts() {
    let service = service();
    let mut refused = Vec::new();
    for attempt in 0..40 {
        let upgraded = raw_request(&service.socket, b"upgrade\n");
        assert!(upgraded.starts_with("ok "), "attempt {attempt}: {upgraded}");
        let pid = upgraded
            .split_whitespace()
            .find_map(|w| w.strip_prefix("pid="))
            .unwrap()
            .to_owned();
        let status = raw_request(&service.socket, b"status\n");
        if !status.starts_with(&format!("ok pid={pid} ")) {
            refused.push(format!("attempt {attempt}: {pid} was ready, {status:?}"));
        }
    }
    assert!(refused.is_empty(), "{refused:#?}");
}

/// The same through the subject's own accept loop (`biased` towards the
/// exit, as the README's loop is): after `ok`, the next connection is the
/// new generation's.
#[test]
fn after_ok_only_the_new_generation_accepts_on_the_subjects_port() {
    let mut service = service();
    let mut refused = Vec::new();
    for attempt in 0..40u64 {
        let upgraded = service.subject.upgrade().unwrap();
        let info = service.subject.control("info").unwrap();
        if !info.contains(&format!("gen={} ", attempt + 1)) {
            refused.push(format!("attempt {attempt}: {upgraded:?}, then {info:?}"));
        }
        service
            .subject
            .wait_for(|e| e.is("parent-gone", attempt + 1))
            .unwrap();
    }
    assert!(refused.is_empty(), "{refused:#?}");
}

/// With a rollback window, `handover upgrade` waits for the verdict: a new
/// generation that dies within the window is a rollback (exit 4, the old
/// generation named as serving again, and it answers); one that lives
/// through it is committed (exit 0), and the old generation has exited.
#[test]
fn the_command_line_tells_a_rollback_from_a_commit() {
    // A window far longer than the successor's 50 ms to its crash, so that
    // a loaded machine cannot turn the rollback into a commit.
    let mut service = service_with(&["--rollback-window-ms", "3000"]);
    let socket = service.socket.to_str().unwrap().to_owned();
    let old = service.subject.pid_of(0).unwrap();
    std::fs::write(&service.faults, "1=crash-after-ready:50").unwrap();
    let output = cli(&["upgrade", "--socket", &socket]);
    let said = text(&output);
    assert_eq!(output.status.code(), Some(4), "{said}");
    assert!(
        said.contains("rolled back: successor pid")
            && said.contains("exited with code 5")
            && said.contains(&format!("the old generation (pid {old}) serves again")),
        "{said}"
    );
    service
        .subject
        .wait_for(|e| e.is("rolled-back", 0))
        .unwrap();
    let output = cli(&["status", "--socket", &socket]);
    assert!(
        text(&output).contains(&format!("generation 0 (pid {old})")),
        "{}",
        text(&output)
    );

    std::fs::write(&service.faults, "").unwrap();
    let output = cli(&["upgrade", "--socket", &socket]);
    let said = text(&output);
    assert_eq!(output.status.code(), Some(0), "{said}");
    assert!(
        said.contains("committed after its 3000 ms rollback window")
            && said.contains(&format!("the old generation (pid {old}) exited")),
        "{said}"
    );
    // It had exited when the command returned: reaped or gone.
    service.subject.wait_exit(old).unwrap();
    service
        .subject
        .wait_for(|e| e.is("parent-gone", 1))
        .unwrap();
    assert_eq!(service.subject.live_pids().len(), 1);
}
