//! The supervisor thread when the code it calls misbehaves or is slow, in
//! this test process against the real OS (real successors, real SIGCHLD).
//!
//! A tracing subscriber is code the supervisor calls on its own thread, so
//! it is how these tests reach into it: a hook on the supervisor's log
//! events panics there (as a faulty subscriber would) or holds the thread
//! until a successor has done something (as a slow log writer would), at a
//! chosen line. The subscriber is process-wide, so the tests take turns.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::time::Duration;

use common::{assert_serving, finish, starts, successor_script, write_executable};
use handover::{ExitReason, Options, Upgrader};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};

mod common;

/// One log event of a supervisor thread.
#[derive(Debug, Clone)]
struct Seen {
    level: Level,
    message: String,
    pid: Option<i32>,
}

impl Visit for Seen {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if field.name() == "pid" {
            self.pid = i32::try_from(value).ok();
        }
    }
}

type Hook = Arc<dyn Fn(&Seen) + Send + Sync>;

/// Called on every event of a supervisor thread, on that thread.
static HOOK: Mutex<Option<Hook>> = Mutex::new(None);
/// Every event of a supervisor thread so far.
static SEEN: Mutex<Vec<Seen>> = Mutex::new(Vec::new());
/// Notified when an event is recorded in `SEEN`.
static ARRIVED: Condvar = Condvar::new();
/// One test at a time: the hook is process-wide.
static TURN: Mutex<()> = Mutex::new(());

struct Hooked;

impl<S: Subscriber> Layer<S> for Hooked {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let on_supervisor = std::thread::current()
            .name()
            .is_some_and(|name| name.starts_with("handover-gen"));
        if !on_supervisor {
            return;
        }
        let mut seen = Seen {
            level: *event.metadata().level(),
            message: String::new(),
            pid: None,
        };
        event.record(&mut seen);
        lock(&SEEN).push(seen.clone());
        ARRIVED.notify_all();
        let hook = lock(&HOOK).clone();
        if let Some(hook) = hook {
            hook(&seen);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// This test's turn, with `hook` set until it ends.
struct Turn {
    _turn: MutexGuard<'static, ()>,
}

impl Turn {
    fn take(hook: impl Fn(&Seen) + Send + Sync + 'static) -> Turn {
        static SUBSCRIBER: Once = Once::new();
        SUBSCRIBER.call_once(|| {
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Hooked))
                .unwrap();
        });
        let turn = lock(&TURN);
        lock(&SEEN).clear();
        *lock(&HOOK) = Some(Arc::new(hook));
        Turn { _turn: turn }
    }

    /// The events seen so far.
    fn seen(&self) -> Vec<Seen> {
        lock(&SEEN).clone()
    }

    /// Waits (boundedly) until an event matches.
    fn wait_for(&self, matches: impl Fn(&Seen) -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut seen = lock(&SEEN);
        while !seen.iter().any(&matches) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(!left.is_zero(), "no such event in {:#?}", *seen);
            seen = ARRIVED
                .wait_timeout(seen, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// Removes the hook; the events are still recorded.
    fn unhook(&self) {
        *lock(&HOOK) = None;
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        *lock(&HOOK) = None;
    }
}

fn upgrader(executable: &std::path::Path) -> Upgrader {
    Upgrader::new(
        Options::default()
            .executable(executable)
            .upgrade_signal(None)
            .upgrade_timeout(Duration::from_secs(10)),
    )
    .unwrap()
}

/// A panic in the supervisor's loop, after the successor was spawned, fails
/// that upgrade with `supervisor_failed` and kills and reaps the successor;
/// the generation serves on and its next upgrade works.
#[tokio::test]
async fn a_panic_in_the_supervisor_fails_that_upgrade_only() {
    let dir = tempfile::tempdir().unwrap();
    let spawned = Arc::new(Mutex::new(Vec::new()));
    let turn = Turn::take({
        let spawned = Arc::clone(&spawned);
        move |seen| {
            if seen.message == "successor started" {
                let mut spawned = lock(&spawned);
                spawned.extend(seen.pid);
                if spawned.len() == 1 {
                    drop(spawned);
                    panic!("a faulty log subscriber");
                }
            }
        }
    });
    let upgrader = upgrader(&successor_script(dir.path()));
    upgrader.ready().unwrap();

    let err = upgrader.upgrade().await.unwrap_err();
    assert_eq!(err.reason(), "supervisor_failed", "{err}");
    assert!(err.to_string().contains("a faulty log subscriber"), "{err}");
    let first = lock(&spawned)[0];
    assert_eq!(
        nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(first), None),
        Err(nix::errno::Errno::ECHILD),
        "the abandoned successor was reaped"
    );
    assert_serving(&upgrader);
    assert!(
        turn.seen()
            .iter()
            .any(|s| s.level == Level::ERROR && s.message.contains("supervisor panicked")),
        "{:#?}",
        turn.seen()
    );

    let upgraded = upgrader.upgrade().await.unwrap();
    assert_eq!(*lock(&spawned), [first, upgraded.pid]);
    finish(upgrader, upgraded.pid);
}

/// A supervisor that cannot carry on (here: it panics again while it
/// recovers) is failed, never a clean stop: `exit()` does not resolve, every
/// upgrade says `supervisor_failed`, and `stop()` still stops.
#[tokio::test]
async fn a_failed_supervisor_is_not_a_stop() {
    let dir = tempfile::tempdir().unwrap();
    let turn = Turn::take(|seen| {
        // "upgrade started", then "upgrade failed: ..." while it recovers.
        if seen.message.starts_with("upgrade ") {
            panic!("a faulty log subscriber");
        }
    });
    let upgrader = upgrader(&successor_script(dir.path()));
    upgrader.ready().unwrap();

    let err = upgrader.upgrade().await.unwrap_err();
    assert_eq!(err.reason(), "supervisor_failed", "{err}");
    turn.wait_for(|s| s.level == Level::ERROR && s.message.contains("supervisor failed"));
    turn.unhook();
    let err = upgrader.upgrade().await.unwrap_err();
    assert_eq!(err.reason(), "supervisor_failed", "{err}");
    assert!(err.to_string().contains("a faulty log subscriber"), "{err}");
    assert_eq!(starts(dir.path()), 0);
    assert_serving(&upgrader);

    upgrader.stop();
    assert_eq!(upgrader.exit().await, ExitReason::Stopped);
}

/// A successor that writes its pid to the PID file and says it is ready,
/// as a real one does, then exits 3 at once if `dir/die` exists (else it
/// lives until its parent closes the handshake link).
#[cfg(target_os = "linux")]
fn ready_then_exiting_successor(
    dir: &std::path::Path,
    pid_file: &std::path::Path,
) -> std::path::PathBuf {
    let path = dir.join("successor");
    let (dir, pid_file) = (dir.display(), pid_file.display());
    write_executable(
        &path,
        &format!(
            "#!/bin/sh\necho $$ > '{pid_file}'\nprintf R >&3\n\
             [ -e '{dir}/die' ] && exit 3\nexec cat <&3 >/dev/null\n"
        ),
    );
    path
}

/// A successor that said it was ready but had already exited when the
/// supervisor looked (the supervisor held up, here by its log writer,
/// until the successor is a zombie: its ready byte and SIGCHLD wait
/// together) leaves nobody to serve: the upgrade fails with
/// `successor_exited`, the PID file names this generation again, and it
/// serves on. (Linux: `waitid(WNOWAIT)` waits for the exit without reaping.)
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_successor_gone_before_its_ready_byte_is_read_was_not_ready() {
    use handover::{Error, ExitStatus};
    use nix::sys::wait::{Id, WaitPidFlag, waitid};
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("service.pid");
    let _turn = Turn::take(|seen| {
        if let (Some(pid), "successor started") = (seen.pid, seen.message.as_str()) {
            // The first successor only: it dies; the second serves.
            static HELD: Once = Once::new();
            HELD.call_once(|| {
                waitid(
                    Id::Pid(nix::unistd::Pid::from_raw(pid)),
                    WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
                )
                .unwrap();
            });
        }
    });
    let upgrader = Upgrader::new(
        Options::default()
            .executable(ready_then_exiting_successor(dir.path(), &pid_file))
            .pid_file(&pid_file)
            .upgrade_signal(None)
            .upgrade_timeout(Duration::from_secs(10)),
    )
    .unwrap();
    upgrader.ready().unwrap();
    std::fs::write(dir.path().join("die"), "").unwrap();

    let err = upgrader.upgrade().await.unwrap_err();
    match err {
        Error::SuccessorExited { status, .. } => assert_eq!(status, ExitStatus::Exited(3)),
        other => panic!("expected successor_exited, got {other}"),
    }
    assert_serving(&upgrader);
    let named: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        named,
        std::process::id() as i32,
        "the PID file names us again"
    );

    std::fs::remove_file(dir.path().join("die")).unwrap();
    let upgraded = upgrader.upgrade().await.unwrap();
    finish(upgrader, upgraded.pid);
}

/// A successor whose ready byte comes as the deadline passes (here: the
/// supervisor is held, by its log writer, between the deadline and its
/// verdict until the byte is written) was ready: it is not killed (it may
/// be accepting already) and the upgrade succeeds.
#[tokio::test]
async fn a_ready_byte_that_comes_at_the_deadline_is_not_killed() {
    let dir = tempfile::tempdir().unwrap();
    let (gate, written) = (dir.path().join("gate"), dir.path().join("written"));
    for fifo in [&gate, &written] {
        nix::unistd::mkfifo(fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    }
    let script = dir.path().join("successor");
    write_executable(
        &script,
        &format!(
            "#!/bin/sh\nread _ < '{}'\nprintf R >&3\necho > '{}'\nexec cat <&3 >/dev/null\n",
            gate.display(),
            written.display()
        ),
    );
    let _turn = Turn::take(move |seen| {
        if seen.message == "upgrade deadline passed" {
            // Let the successor write its byte, and wait until it has.
            drop(std::fs::OpenOptions::new().write(true).open(&gate).unwrap());
            std::fs::read(&written).unwrap();
        }
    });
    let upgrader = Upgrader::new(
        Options::default()
            .executable(&script)
            .upgrade_signal(None)
            .upgrade_timeout(Duration::from_millis(100)),
    )
    .unwrap();
    upgrader.ready().unwrap();

    let upgraded = upgrader.upgrade().await.unwrap();
    assert_eq!(
        upgrader.exit().await,
        ExitReason::Upgraded(upgraded.clone())
    );
    finish(upgrader, upgraded.pid);
}

/// A stop that panics half-way still stops: `exit()` resolves `Stopped`.
#[tokio::test]
async fn a_stop_that_panics_still_stops() {
    let dir = tempfile::tempdir().unwrap();
    let _turn = Turn::take(|seen| {
        if seen.message == "stopping" {
            panic!("a faulty log subscriber");
        }
    });
    let upgrader = upgrader(&successor_script(dir.path()));
    upgrader.ready().unwrap();
    upgrader.stop();
    let reason = tokio::time::timeout(Duration::from_secs(20), upgrader.exit()).await;
    assert_eq!(reason, Ok(ExitReason::Stopped));
}

/// A hook that, at the supervisor's line starting with `line`, kills the
/// successor named in `successor` (once it is set) and waits until it is a
/// zombie, without reaping it: the supervisor, held meanwhile, then finds
/// its end and its SIGCHLD waiting together.
#[cfg(target_os = "linux")]
fn kill_the_successor_at(
    successor: &Arc<Mutex<Option<i32>>>,
    line: &'static str,
) -> impl Fn(&Seen) + Send + Sync + 'static {
    use nix::sys::wait::{Id, WaitPidFlag, waitid};
    let successor = Arc::clone(successor);
    move |seen| {
        let pid = *lock(&successor);
        if let Some(pid) = pid.filter(|_| seen.message.starts_with(line)) {
            let pid = nix::unistd::Pid::from_raw(pid);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
            waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT).unwrap();
        }
    }
}

/// A deploy script's `upgrade` on the control socket at `path`; its answer
/// lines are read with [`read_line`] (20 s at most each).
#[cfg(target_os = "linux")]
fn ask_to_upgrade(path: &std::path::Path) -> std::io::BufReader<std::os::unix::net::UnixStream> {
    use std::io::Write;
    let mut client = std::os::unix::net::UnixStream::connect(path).unwrap();
    client.write_all(b"upgrade\n").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    std::io::BufReader::new(client)
}

/// The next answer line.
#[cfg(target_os = "linux")]
fn read_line(client: &mut std::io::BufReader<std::os::unix::net::UnixStream>) -> String {
    let mut line = String::new();
    std::io::BufRead::read_line(client, &mut line).unwrap();
    line
}

/// A stop in the rollback window closes the window. If the successor died
/// just before (its end seen only as the stop closes the window: here the
/// supervisor is held, by its log writer, until the successor is a zombie),
/// the stop is still for this generation: `exit()` resolves `Stopped`.
/// (`systemctl stop` signals both generations; the old one must not come
/// back and serve on until the manager's SIGKILL.) The deploy script that
/// asked for the upgrade is told `stopped`: nobody serves (it was told
/// `committed`, or for a moment `rolled_back`, the rollback published and
/// overwritten by the stop in the same turn).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_stop_in_the_window_just_after_the_successor_died_still_stops() {
    use handover::{Signal, Verdict};
    let dir = tempfile::tempdir().unwrap();
    let successor = Arc::new(Mutex::new(None::<i32>));
    let turn = Turn::take(kill_the_successor_at(&successor, "stop signal"));
    let upgrader = Upgrader::new(
        Options::default()
            .executable(successor_script(dir.path()))
            .upgrade_signal(None)
            .stop_signals([Signal::SIGUSR2])
            .rollback_window(Duration::from_secs(60))
            .upgrade_timeout(Duration::from_secs(10)),
    )
    .unwrap();
    let path = dir.path().join("control.sock");
    let control = upgrader.control_socket(&path).unwrap();
    upgrader.ready().unwrap();
    tokio::spawn(control.serve());
    // A deploy script's request, on a thread: its reads block.
    let client = std::thread::spawn(move || {
        let mut client = ask_to_upgrade(&path);
        (read_line(&mut client), read_line(&mut client))
    });
    // Its `ok` is written once `exit()` says who the successor is.
    let reason = tokio::time::timeout(Duration::from_secs(20), upgrader.exit()).await;
    let Ok(ExitReason::Upgraded(upgraded)) = reason else {
        panic!("the upgrade asked on the control socket: {reason:?}");
    };
    let upgraded = upgraded.pid;
    *lock(&successor) = Some(upgraded);

    nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGUSR2).unwrap();
    // The stop finds the successor dead and stops: it says "stopping".
    // (Lost, it said nothing more, and this generation served on with the
    // verdict `RolledBack`.)
    turn.wait_for(|seen| seen.message == "stopping");
    // The verdict was cleared when the window opened: the next is the stop's.
    let verdict = tokio::time::timeout(Duration::from_secs(20), upgrader.verdict()).await;
    assert_eq!(verdict, Ok(Verdict::Exit(ExitReason::Stopped)));
    // `exit` goes from `Upgraded` to `Stopped` just after the verdict.
    let stopped = async {
        while upgrader.exit().await != ExitReason::Stopped {
            tokio::task::yield_now().await;
        }
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(20), stopped)
            .await
            .is_ok(),
        "exit() never said Stopped"
    );
    let (ok, verdict) = tokio::task::spawn_blocking(move || client.join().unwrap())
        .await
        .unwrap();
    assert!(ok.starts_with("ok ") && ok.contains("window_ms="), "{ok}");
    assert!(
        verdict.starts_with(&format!("stopped pid={upgraded} ")),
        "the verdict line: {verdict}"
    );
}

/// The successor dies just as the `Upgrader` of a generation in its
/// rollback window is dropped (here: killed, and a zombie, while the
/// supervisor handles the drop, held by its log writer): nobody serves any
/// more, so the drop is a final stop. The deploy script that asked for the
/// upgrade is told `stopped` (not `committed`, nor `rolled_back`: nobody
/// serves again), and the control socket's task (which the service awaits
/// before it leaves `main`) returns. (It rolled back instead; with an
/// upgrade signal the dropped generation's supervisor stays, so `exit()`
/// never resolved again and the task accepted on for ever.)
#[cfg(target_os = "linux")]
#[test]
fn a_successor_dying_as_the_upgrader_is_dropped_in_the_window_is_a_final_stop() {
    use handover::Signal;
    let dir = tempfile::tempdir().unwrap();
    let successor = Arc::new(Mutex::new(None::<i32>));
    let turn = Turn::take(kill_the_successor_at(&successor, "upgrader dropped"));
    let upgrader = Upgrader::new(
        Options::default()
            .executable(successor_script(dir.path()))
            // The dropped generation's supervisor stays for it.
            .upgrade_signal(Some(Signal::SIGUSR1))
            .rollback_window(Duration::from_secs(60))
            .upgrade_timeout(Duration::from_secs(10)),
    )
    .unwrap();
    let path = dir.path().join("control.sock");
    let control = upgrader.control_socket(&path).unwrap();
    upgrader.ready().unwrap();
    let serve_returned = common::serve_on_its_own_thread(control);
    // A deploy script's request.
    let mut client = ask_to_upgrade(&path);
    let ok = read_line(&mut client);
    assert!(ok.starts_with("ok ") && ok.contains("window_ms="), "{ok}");
    let pid = ok
        .split_whitespace()
        .find_map(|word| word.strip_prefix("pid="))
        .unwrap()
        .parse()
        .unwrap();
    *lock(&successor) = Some(pid);

    drop(upgrader);
    let verdict = read_line(&mut client);
    assert!(
        verdict.starts_with(&format!("stopped pid={pid} ")),
        "the verdict line: {verdict}"
    );
    assert_eq!(
        serve_returned.recv_timeout(Duration::from_secs(10)),
        Ok(()),
        "the control socket's task still runs 10 s after the Upgrader was dropped"
    );
    assert!(
        turn.seen().iter().any(|seen| seen.message == "stopping"),
        "the drop was a final stop"
    );
}
