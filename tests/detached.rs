//! Generations made and upgraded one after another in one process (as the
//! bench does, or a program that embeds several): a dropped generation
//! whose successor is gone leaves no thread and no descriptor behind. Its
//! own test binary, so that no other test's threads and descriptors come
//! and go meanwhile.

#![cfg(target_os = "linux")]

use std::time::{Duration, Instant};

use common::successor_script;
use handover::{Options, Upgrader};

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
    let generation = || {
        let upgrader = Upgrader::new(
            Options::default()
                .executable(&script)
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
        // Its successor ends, and this program reaps it (the supervisor
        // may have reaped it first: ECHILD).
        common::finish(upgrader, upgraded.pid);
    };
    let before = footprint();
    let wait_until_back = |to: (usize, usize)| {
        let deadline = Instant::now() + Duration::from_secs(10);
        // The supervisors end on their own threads, each once it hears its
        // successor is gone: no event reaches this thread, so it looks.
        while footprint() != to && Instant::now() < deadline {
            std::thread::yield_now();
        }
        footprint()
    };
    for _ in 0..20 {
        generation();
    }
    assert_eq!(
        wait_until_back(before),
        before,
        "threads and descriptors after 20 generations (left), before them (right)"
    );
}
