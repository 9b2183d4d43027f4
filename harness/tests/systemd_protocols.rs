//! The systemd protocols, spoken by real processes: `sd_notify` datagrams
//! to a socket this test owns, and socket activation through systemd's own
//! `systemd-socket-activate`. (A real service manager runs in
//! `tests/systemd.rs`, where it can.)

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use handover_harness::process::{Subject, SubjectConfig, http_get, notification};

fn subject_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_handover-subject"))
}

fn notify_socket(address: &str, bind: impl FnOnce() -> std::io::Result<UnixDatagram>) {
    let socket = bind().unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let faults = dir.path().join("faults");
    let mut subject = Subject::start(&SubjectConfig {
        binary: subject_binary(),
        faults_file: Some(faults.clone()),
        env: vec![("NOTIFY_SOCKET".into(), address.into())],
        ..SubjectConfig::default()
    })
    .unwrap();
    let first = subject.first_pid();
    let ready = notification(&socket, "READY=1").unwrap();
    assert!(ready.contains(&format!("MAINPID={first}")), "{ready}");

    // A failed upgrade: reloading, then ready again with the reason.
    std::fs::write(&faults, "1=crash-before-ready").unwrap();
    subject.upgrade().unwrap_err();
    let reloading = notification(&socket, "RELOADING=1").unwrap();
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    let failed = notification(&socket, "READY=1").unwrap();
    assert!(failed.contains("upgrade failed"), "{failed}");

    // A good one: the successor announces itself as the main process.
    std::fs::write(&faults, "").unwrap();
    let successor = subject.upgrade_and_settle(0).unwrap();
    notification(&socket, "RELOADING=1").unwrap();
    let ready = notification(&socket, "READY=1").unwrap();
    assert!(ready.contains(&format!("MAINPID={successor}")), "{ready}");

    subject.terminate().unwrap();
    notification(&socket, "STOPPING=1").unwrap();
}

#[test]
fn notifies_ready_reloading_and_stopping_on_a_path_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    notify_socket(&path.display().to_string(), || UnixDatagram::bind(&path));
}

/// systemd's `@name` spelling of an abstract socket (Linux only).
#[cfg(target_os = "linux")]
#[test]
fn notifies_on_an_abstract_socket() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("handover-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    notify_socket(&format!("@{name}"), || UnixDatagram::bind_addr(&addr));
}

/// With a PID file, systemd learns the new main process from it: a
/// `MAINPID=` from a process that is not yet systemd's child would make it
/// SIGKILL the service on every later stop.
#[test]
fn with_a_pid_file_readiness_names_no_main_pid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut subject = Subject::start(&SubjectConfig {
        binary: subject_binary(),
        pid_file: Some(dir.path().join("subject.pid")),
        env: vec![("NOTIFY_SOCKET".into(), path.display().to_string())],
        ..SubjectConfig::default()
    })
    .unwrap();
    let ready = notification(&socket, "READY=1").unwrap();
    assert!(!ready.contains("MAINPID="), "{ready}");
    subject.upgrade_and_settle(0).unwrap();
    let ready = notification(&socket, "READY=1").unwrap();
    assert!(!ready.contains("MAINPID="), "{ready}");
}

/// Reads notifications until one contains `needle`; returns every one read.
fn notifications_until(socket: &UnixDatagram, needle: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let message = notification(socket, "").unwrap();
        let done = message.contains(needle);
        seen.push(message);
        if done {
            return seen;
        }
    }
}

fn notified_subject(
    socket_path: &std::path::Path,
    faults: &str,
    args: Vec<String>,
) -> (UnixDatagram, Subject, tempfile::TempDir) {
    let socket = UnixDatagram::bind(socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let subject = Subject::start(&SubjectConfig {
        binary: subject_binary(),
        faults: Some(faults.into()),
        pid_file: Some(dir.path().join("subject.pid")),
        args,
        env: vec![("NOTIFY_SOCKET".into(), socket_path.display().to_string())],
        ..SubjectConfig::default()
    })
    .unwrap();
    notification(&socket, "READY=1").unwrap();
    (socket, subject, dir)
}

/// A successor stopped while it starts is not the service: with
/// `NotifyAccess=all`, a `STOPPING=1` from it would make systemd stop the
/// whole unit, the serving generation with it.
#[test]
fn a_successor_stopped_during_init_does_not_say_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, mut subject, _pids) = notified_subject(
        &dir.path().join("notify.sock"),
        "1=hang",
        vec!["--library-stop-signals".into(), "true".into()],
    );
    let first = subject.first_pid();
    subject
        .signal(first, nix::sys::signal::Signal::SIGHUP)
        .unwrap();
    let second = subject.wait_for(|e| e.is("started", 1)).unwrap().pid;
    subject
        .signal(second, nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    // The successor's notifications, if any, come before its exit, and so
    // before the parent reports the failed upgrade.
    let seen = notifications_until(&socket, "upgrade failed");
    assert!(
        seen.iter().all(|m| !m.contains("STOPPING=1")),
        "a starting successor said STOPPING=1: {seen:#?}"
    );
    // The serving generation does say it when it stops.
    subject
        .signal(first, nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    notification(&socket, "STOPPING=1").unwrap();
}

/// `Type=notify-reload`: systemd sends SIGHUP to the main process, which
/// is the old generation until it exits, and waits for `RELOADING=1` and
/// then `READY=1`. A reload while the old generation drains is answered
/// too: `RELOADING=1` at once, `READY=1` from the generation it starts.
#[test]
fn a_reload_while_draining_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, mut subject, _pids) =
        notified_subject(&dir.path().join("notify.sock"), "", Vec::new());
    let first = subject.first_pid();
    let addr = subject.addresses.http;
    let held = std::thread::spawn(move || http_get(addr, "/hold"));
    subject.wait_for(|e| e.is("hold-request", 0)).unwrap();
    subject
        .signal(first, nix::sys::signal::Signal::SIGHUP)
        .unwrap();
    notification(&socket, "RELOADING=1").unwrap();
    let ready = notification(&socket, "READY=1").unwrap();
    assert!(ready.contains("generation 1"), "{ready}");
    subject.wait_for(|e| e.is("exiting", 0)).unwrap();

    // The second reload, to generation 0 while it drains.
    subject
        .signal(first, nix::sys::signal::Signal::SIGHUP)
        .unwrap();
    let reloading = notification(&socket, "RELOADING=1").unwrap();
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    subject
        .signal(first, nix::sys::signal::Signal::SIGUSR1)
        .unwrap();
    held.join().unwrap().unwrap();
    let ready = notification(&socket, "READY=1").unwrap();
    assert!(ready.contains("generation 2"), "{ready}");
    subject.wait_for(|e| e.is("parent-gone", 2)).unwrap();
}

/// How systemd names the socket it passes, and where the service's own
/// configuration says to listen.
#[derive(Debug, Clone, Copy)]
enum Activation {
    /// `--fdname=http`, the name the subject asks for; configured elsewhere.
    Named,
    /// No `--fdname` (the socket is `unknown`); configured on its address.
    UnnamedSameAddress,
    /// No `--fdname`; configured elsewhere: the only TCP socket passed.
    UnnamedElsewhere,
}

/// Generation 0 takes the socket systemd passed, serves it, and hands it
/// over like its own; no successor sees `LISTEN_*`. The connection that
/// triggered the activation is answered, never reset.
fn socket_activated_listener_is_served_and_handed_over(activation: Activation) {
    if Command::new("systemd-socket-activate")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "SKIPPED socket_activated_listener_is_served_and_handed_over: systemd-socket-activate is not installed"
        );
        return;
    }
    // systemd-socket-activate binds it: a port no outgoing connection can
    // be given meanwhile.
    let addr = handover_harness::check::free_addr().unwrap();
    // Where the configuration says: the activated socket must win in every
    // generation, not only in generation 0.
    let configured = match activation {
        Activation::UnnamedSameAddress => addr,
        Activation::Named | Activation::UnnamedElsewhere => {
            // Nobody binds `addr` before the tool does: another call may
            // choose it again.
            std::iter::repeat_with(|| handover_harness::check::free_addr().unwrap())
                .find(|elsewhere| *elsewhere != addr)
                .unwrap()
        }
    };
    // systemd-socket-activate listens, and execs the subject (same pid, with
    // LISTEN_FDS) when the first connection comes: this one, which is
    // answered once the subject is ready. It retries only until the tool
    // has bound the port.
    let first_request = std::thread::spawn(move || {
        let mut pause = Duration::from_millis(5);
        for _ in 0..100 {
            match http_get(addr, "/") {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    std::thread::sleep(pause)
                }
                answer => return answer,
            }
            pause = (pause * 2).min(Duration::from_millis(100));
        }
        http_get(addr, "/")
    });
    let mut args = vec!["-l".to_owned(), addr.to_string()];
    if let Activation::Named = activation {
        args.push("--fdname=http".into());
    }
    args.extend([
        subject_binary().display().to_string(),
        "--http".into(),
        configured.to_string(),
    ]);
    let mut subject = Subject::start(&SubjectConfig {
        binary: "systemd-socket-activate".into(),
        args,
        ..SubjectConfig::default()
    })
    .unwrap();
    assert_eq!(
        subject.addresses.http, addr,
        "the activated socket serves HTTP ({activation:?})"
    );
    let (status, body) = first_request.join().unwrap().unwrap();
    assert_eq!((status, body.contains("gen=0")), (200, true), "{body}");

    for generation in 0..2 {
        subject.upgrade_and_settle(generation).unwrap();
        let (status, body) = http_get(addr, "/").unwrap();
        assert_eq!(
            (status, body.contains(&format!("gen={}", generation + 1))),
            (200, true),
            "{body}"
        );
        let ready = subject.wait_for(|e| e.is("ready", generation + 1)).unwrap();
        assert_eq!(
            ready.fields["http"],
            addr.to_string(),
            "still the activated socket"
        );
    }
    let environment =
        std::fs::read_to_string(format!("/proc/{}/environ", subject.pid_of(1).unwrap()));
    if let Ok(environment) = environment {
        assert!(
            !environment.contains("LISTEN_FDS="),
            "a successor sees no stale LISTEN_FDS"
        );
    }
}

#[test]
fn socket_activated_listener_is_taken_by_name() {
    socket_activated_listener_is_served_and_handed_over(Activation::Named);
}

#[test]
fn socket_activated_listener_without_a_name_is_taken_by_its_address() {
    socket_activated_listener_is_served_and_handed_over(Activation::UnnamedSameAddress);
}

#[test]
fn the_only_socket_activated_listener_without_a_name_is_taken() {
    socket_activated_listener_is_served_and_handed_over(Activation::UnnamedElsewhere);
}
