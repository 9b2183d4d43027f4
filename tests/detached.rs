//! Generations made and upgraded one after another in one process (as the
//! bench does, or a program that embeds several): a dropped generation
//! whose successor is gone leaves no thread and no descriptor behind. Its
//! own test binary, so that no other test's threads and descriptors come
//! and go meanwhile.

#![cfg(target_os = "linux")]

use std::path::Path;
use std::time::{Duration, Instant};

use common::successor_script;
use handover::{Options, Upgrader};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

mod common;

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

/// Threads and descriptors of this process.
fn footprint() -> (usize, usize) {
    (count("/proc/self/task"), count("/proc/self/fd"))
}

#[test]
fn dropped_generations_leave_no_thread_or_descriptor_once_their_successors_are_gone() {
    let dir = tempfile::tempdir().unwrap();
    let script = successor_script(dir.path());
    let before = footprint();
    for _ in 0..20 {
        let (upgrader, successor) = upgraded_generation(&script);
        // Its successor ends, and this program reaps it (the supervisor
        // may have reaped it first: ECHILD).
        common::finish(upgrader, successor);
    }
    assert_eq!(
        wait_until_back(before),
        before,
        "threads and descriptors after 20 generations (left), before them (right)"
    );

    // The program reaps the successor before it drops the generation, so
    // the supervisor heard of that end while its generation was not yet
    // dropped (once found to keep the thread until another child of the
    // process ended). In the same test: the counts are the whole process's.
    let (upgrader, successor) = upgraded_generation(&script);
    let successor = Pid::from_raw(successor);
    kill(successor, Signal::SIGKILL).unwrap();
    // This thread keeps running (it spins, it does not yield) while the
    // supervisor must be woken through its SIGCHLD pipe, so it usually
    // reaps first (an ECHILD means the supervisor did: then this round
    // tests nothing, and passes all the same).
    loop {
        match waitpid(successor, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::hint::spin_loop(),
            Ok(_) | Err(Errno::ECHILD) => break,
            Err(e) => panic!("cannot reap the successor: {e}"),
        }
    }
    drop(upgrader);
    assert_eq!(
        wait_until_back(before),
        before,
        "threads and descriptors after a generation whose successor this program reaped first (left), before it (right)"
    );
}

/// A ready generation that has upgraded to `script`, and its successor.
fn upgraded_generation(script: &Path) -> (Upgrader, i32) {
    let upgrader = Upgrader::new(
        Options::default()
            .executable(script)
            .upgrade_signal(None)
            .upgrade_timeout(Duration::from_secs(10)),
    )
    .unwrap();
    let listener = upgrader
        .tcp_listener("web", "127.0.0.1:0".parse().unwrap())
        .unwrap();
    upgrader.ready().unwrap();
    let upgraded = upgrader.upgrade_blocking().unwrap();
    drop(listener);
    (upgrader, upgraded.pid)
}

/// Waits (at most 10 s) until this process has `to` threads and
/// descriptors again. The supervisors end on their own threads, each once
/// it hears its successor is gone: no event reaches this thread, so it
/// looks.
fn wait_until_back(to: (usize, usize)) -> (usize, usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while footprint() != to && Instant::now() < deadline {
        std::thread::yield_now();
    }
    footprint()
}
