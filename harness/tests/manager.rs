//! Successors started as the service manager's children
//! (`SuccessorParent::Manager`, Linux): this test process plays the
//! manager, as systemd does: generation 0 is its child, so every successor
//! is too, and a thread reaps whichever of them ends, at once. In a test
//! binary of its own, so that this reaper takes no other test's children.
#![cfg(target_os = "linux")]

use std::path::PathBuf;

use handover_harness::process::{Subject, SubjectConfig, is_running, notification, read_pid_file};
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

fn config() -> SubjectConfig {
    SubjectConfig {
        binary: PathBuf::from(env!("CARGO_BIN_EXE_handover-subject")),
        args: vec!["--quiet-period-ms".into(), "100".into()],
        ..SubjectConfig::default()
    }
}

fn assert_served_by(subject: &Subject, generation: u64) {
    let (status, body) = subject.http_get("/").expect("an HTTP answer");
    assert_eq!(status, 200);
    assert!(body.contains(&format!("gen={generation}")), "{body:?}");
}

/// The parent of `pid`, from `/proc/PID/stat` (after the command name, in
/// parentheses, come the state and then the parent).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Whether the kernel keeps a reaped process's exit status for its pidfd
/// (`PIDFD_INFO_EXIT`, Linux 6.15).
fn kernel_keeps_exit_status() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    version >= (6, 15)
}

/// Reaps every child of this process as it ends, as a service manager
/// does, until none is left (children of both tests in this file: each
/// reads its own processes' ends from the library, not from `waitpid`).
fn reap_like_a_manager() {
    std::thread::spawn(|| while waitpid(Pid::from_raw(-1), Some(WaitPidFlag::__WALL)).is_ok() {});
}

/// Each successor is the manager's child from its start; the old
/// generation names it in the PID file as soon as it is ready, while it
/// still drains (whoever reads the file then finds its own child); a
/// successor that dies before it is ready is reported with its exit
/// status, read through its pidfd once the manager reaped it (Linux 6.15
/// and later; before, with a text that says where the status went), and
/// the old generation serves on; the next upgrade succeeds.
#[test]
fn a_successor_started_as_the_managers_child_is_named_at_ready() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("subject.pid");
    let faults = dir.path().join("faults");
    std::fs::write(&faults, "").unwrap();
    let mut subject = Subject::start(&SubjectConfig {
        pid_file: Some(pid_file.clone()),
        faults_file: Some(faults.clone()),
        env: vec![("HANDOVER_SUCCESSOR_PARENT".into(), "manager".into())],
        ..config()
    })
    .unwrap();
    reap_like_a_manager();
    let me = std::process::id() as i32;
    for generation in 0..2 {
        let old = subject.pid_of(generation).unwrap();
        let held = subject.hold_request(generation).unwrap();
        let answer = subject.upgrade().unwrap();
        let pid = subject.pid_of(generation + 1).unwrap();
        assert!(answer.contains(&format!("pid={pid}")), "{answer}");
        assert_eq!(parent_of(pid), Some(me), "generation {}", generation + 1);
        subject.wait_for(|e| e.is("exiting", generation)).unwrap();
        assert_served_by(&subject, generation + 1);
        assert!(is_running(old));
        assert_eq!(read_pid_file(&pid_file), Some(pid));
        subject.signal(old, Signal::SIGUSR1).unwrap();
        held.join().unwrap().unwrap();
        subject
            .wait_for(|e| e.is("parent-gone", generation + 1))
            .unwrap();
    }

    std::fs::write(&faults, "3=crash-before-ready").unwrap();
    let answer = subject.upgrade().unwrap_err();
    assert!(
        answer.starts_with("err reason=successor_exited "),
        "{answer}"
    );
    if kernel_keeps_exit_status() {
        assert!(answer.contains("exited with code 4"), "{answer}");
    } else {
        assert!(answer.contains("went to the service manager"), "{answer}");
    }
    assert_served_by(&subject, 2);
    assert_eq!(read_pid_file(&pid_file), subject.pid_of(2).ok());
    std::fs::write(&faults, "").unwrap();
    subject.upgrade().unwrap();
    subject.wait_for(|e| e.is("parent-gone", 3)).unwrap();
    assert_served_by(&subject, 3);
    subject.terminate().unwrap();
}

/// `SuccessorParent::Auto`, the default: a process that systemd started
/// itself as a service (`INVOCATION_ID` set, its parent the manager:
/// `MANAGERPID` for a user manager; here this test) starts its successors
/// as the manager's children; with another `MANAGERPID` (a process that a
/// wrapper started, inside a unit) they are its own.
#[test]
fn the_default_is_the_managers_child_only_when_the_manager_started_us() {
    let me = std::process::id();
    for (manager, expected_parent_is_me) in [(me, true), (1, false)] {
        let mut subject = Subject::start(&SubjectConfig {
            env: vec![
                (
                    "INVOCATION_ID".into(),
                    "0123456789abcdef0123456789abcdef".into(),
                ),
                ("MANAGERPID".into(), manager.to_string()),
            ],
            ..config()
        })
        .unwrap();
        let old = subject.pid_of(0).unwrap();
        // The old generation drains this request, and so lives, until
        // SIGUSR1: its successor's parent is read while both run.
        let held = subject.hold_request(0).unwrap();
        subject.upgrade().unwrap();
        let new = subject.pid_of(1).unwrap();
        let expected = if expected_parent_is_me {
            me as i32
        } else {
            old
        };
        assert_eq!(parent_of(new), Some(expected), "MANAGERPID={manager}");
        subject.signal(old, Signal::SIGUSR1).unwrap();
        held.join().unwrap().unwrap();
        subject.wait_for(|e| e.is("parent-gone", 1)).unwrap();
        subject.terminate().unwrap();
    }
}

/// With a rollback window, a successor born the manager's child is named
/// (`MAINPID=`) by the old generation only when the window closes; if the
/// old generation dies inside the window (SIGKILL: no exit hook, no
/// commit), the successor, knowing it is the manager's child, names
/// itself, and the PID file follows. Its own `READY=1` never carries a
/// `MAINPID=` while its parent lives.
#[test]
fn a_successor_born_the_managers_child_names_itself_when_its_parent_dies_in_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("subject.pid");
    let path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut subject = Subject::start(&SubjectConfig {
        pid_file: Some(pid_file.clone()),
        args: vec![
            "--quiet-period-ms".into(),
            "100".into(),
            "--rollback-window-ms".into(),
            "60000".into(),
        ],
        env: vec![
            ("HANDOVER_SUCCESSOR_PARENT".into(), "manager".into()),
            ("NOTIFY_SOCKET".into(), path.display().to_string()),
        ],
        ..config()
    })
    .unwrap();
    reap_like_a_manager();
    let old = subject.first_pid();
    notification(&socket, "READY=1").unwrap();
    subject.upgrade().unwrap();
    let new = subject.pid_of(1).unwrap();
    let ready = notification(&socket, "READY=1").unwrap();
    assert!(!ready.contains("MAINPID="), "{ready}");
    // Inside the window: the old generation is still the main process.
    assert_eq!(read_pid_file(&pid_file), Some(old));
    subject.signal(old, Signal::SIGKILL).unwrap();
    let named = notification(&socket, "MAINPID=").unwrap();
    assert!(named.contains(&format!("MAINPID={new}")), "{named}");
    subject.wait_for(|e| e.is("parent-gone", 1)).unwrap();
    assert_eq!(read_pid_file(&pid_file), Some(new));
    assert_served_by(&subject, 1);
    subject.terminate().unwrap();
}
