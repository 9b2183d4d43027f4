//! The systemd protocols, spoken by real processes: `sd_notify` datagrams
//! to a socket this test owns, and socket activation through systemd's own
//! `systemd-socket-activate`. (A real service manager runs in
//! `tests/systemd.rs`, where it can.)

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use handover_harness::process::{Subject, SubjectConfig, http_get};

fn subject_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_handover-subject"))
}

/// Reads notifications until one contains `needle`; returns it.
fn notification(socket: &UnixDatagram, needle: &str) -> String {
    let mut buffer = [0u8; 4096];
    loop {
        let n = socket
            .recv(&mut buffer)
            .expect("a notification before the timeout");
        let message = String::from_utf8_lossy(&buffer[..n]).into_owned();
        if message.contains(needle) {
            return message;
        }
    }
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
    let ready = notification(&socket, "READY=1");
    assert!(ready.contains(&format!("MAINPID={first}")), "{ready}");

    // A failed upgrade: reloading, then ready again with the reason.
    std::fs::write(&faults, "1=crash-before-ready").unwrap();
    subject.upgrade().unwrap_err();
    let reloading = notification(&socket, "RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    let failed = notification(&socket, "READY=1");
    assert!(failed.contains("upgrade failed"), "{failed}");

    // A good one: the successor announces itself as the main process.
    std::fs::write(&faults, "").unwrap();
    let successor = subject.upgrade_and_settle(0).unwrap();
    notification(&socket, "RELOADING=1");
    let ready = notification(&socket, "READY=1");
    assert!(ready.contains(&format!("MAINPID={successor}")), "{ready}");

    subject.terminate().unwrap();
    notification(&socket, "STOPPING=1");
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
    let ready = notification(&socket, "READY=1");
    assert!(!ready.contains("MAINPID="), "{ready}");
    subject.upgrade_and_settle(0).unwrap();
    let ready = notification(&socket, "READY=1");
    assert!(!ready.contains("MAINPID="), "{ready}");
}

/// Generation 0 takes the socket systemd passed under its name, serves it,
/// and hands it over like its own; no successor sees `LISTEN_*`.
#[test]
fn socket_activated_listener_is_served_and_handed_over() {
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
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    // The configuration names another address: the activated socket must win
    // by its name in every generation, not only in generation 0.
    let elsewhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let configured = elsewhere.local_addr().unwrap();
    drop(elsewhere);
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
    // The subject asks for "http" on port 0: the activated socket wins by name.
    let mut subject = Subject::start(&SubjectConfig {
        binary: "systemd-socket-activate".into(),
        args: vec![
            "-l".into(),
            addr.to_string(),
            "--fdname=http".into(),
            subject_binary().display().to_string(),
            "--http".into(),
            configured.to_string(),
        ],
        ..SubjectConfig::default()
    })
    .unwrap();
    assert_eq!(
        subject.addresses.http, addr,
        "the activated socket serves HTTP"
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
