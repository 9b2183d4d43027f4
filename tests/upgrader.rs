//! The `Upgrader` API in this test process, against the real OS: real
//! sockets, real successor processes (small system binaries and shell
//! scripts), real signals.
//! The process-level contract (a service upgrading itself) is tested on
//! the harness's subject in `harness/tests/upgrade.rs`.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use common::{assert_serving, finish, starts, successor_script};
use handover::{Error, ExitStatus, HandshakeProblem, Kind, Options, Upgrader};

mod common;

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A generation 0 that starts `executable` as its successor, with no upgrade
/// signal of its own (the tests in this process share their signal handlers).
fn upgrader(executable: &str) -> Upgrader {
    Upgrader::new(
        Options::default()
            .executable(executable)
            .upgrade_signal(None)
            .upgrade_timeout(Duration::from_secs(10)),
    )
    .unwrap()
}

#[test]
fn first_generation_has_no_parent() {
    let upgrader = upgrader("/bin/true");
    assert_eq!(upgrader.generation(), 0);
    assert!(!upgrader.has_parent());
    assert_eq!(upgrader.parent_pid(), None);
    // Resolves at once: there is no parent to wait for.
    upgrader.wait_for_parent_blocking();
}

#[test]
fn ready_twice_is_an_error() {
    let upgrader = upgrader("/bin/true");
    upgrader.ready().unwrap();
    let err = upgrader.ready().unwrap_err();
    assert!(matches!(err, Error::AlreadyReady), "{err}");
}

#[test]
fn upgrade_before_ready_is_refused() {
    let upgrader = upgrader("/bin/true");
    let err = upgrader.upgrade_blocking().unwrap_err();
    assert_eq!(err.reason(), "not_ready", "{err}");
}

#[tokio::test]
async fn successor_exiting_zero_before_ready_is_a_failure_with_its_status() {
    let upgrader = upgrader("/bin/true");
    upgrader.ready().unwrap();
    let err = upgrader.upgrade().await.unwrap_err();
    match err {
        Error::SuccessorExited { pid, status } => {
            assert!(pid > 0);
            assert_eq!(status, ExitStatus::Exited(0));
        }
        other => panic!("expected SuccessorExited, got {other}"),
    }
    // Still a serving generation: it can try again.
    let err = upgrader.upgrade().await.unwrap_err();
    assert_eq!(err.reason(), "successor_exited");
}

/// A successor that writes anything but the ready byte on its link broke
/// the handshake: the upgrade fails with the byte it sent, the successor is
/// killed and reaped, and this generation serves on.
#[tokio::test]
async fn a_wrong_byte_on_the_link_is_a_typed_handshake_error() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("successor");
    common::write_executable(
        &script,
        "#!/bin/sh\nprintf X >&3\nexec cat <&3 >/dev/null\n",
    );
    let upgrader = upgrader(script.to_str().unwrap());
    upgrader.ready().unwrap();
    let err = upgrader.upgrade().await.unwrap_err();
    assert_eq!(err.reason(), "handshake_broken", "{err}");
    let Error::Handshake { pid, problem } = &err else {
        panic!("expected a handshake error, got {err}");
    };
    assert_eq!(*problem, HandshakeProblem::UnexpectedByte { byte: b'X' });
    assert!(
        err.to_string()
            .ends_with("sent byte 0x58 instead of the ready byte"),
        "{err}"
    );
    assert_eq!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), None),
        Err(nix::errno::Errno::ESRCH),
        "the successor is killed and reaped"
    );
    common::assert_serving(&upgrader);
}

#[test]
fn missing_executable_is_a_spawn_error_naming_the_path() {
    let upgrader = upgrader("/nonexistent/handover-successor");
    upgrader.ready().unwrap();
    let err = upgrader.upgrade_blocking().unwrap_err();
    assert_eq!(err.reason(), "spawn_failed");
    assert!(
        err.to_string().contains("/nonexistent/handover-successor"),
        "{err}"
    );
}

#[test]
fn a_name_asked_for_as_another_kind_is_an_error() {
    let upgrader = upgrader("/bin/true");
    upgrader.tcp_listener("api", loopback()).unwrap();
    let err = upgrader.udp_socket("api", loopback()).unwrap_err();
    match err {
        Error::WrongKind {
            name,
            expected,
            found,
        } => {
            assert_eq!(name, "api");
            assert_eq!((expected, found), (Kind::Udp, Kind::TcpListener));
        }
        other => panic!("expected WrongKind, got {other}"),
    }
}

#[test]
fn asking_twice_returns_the_same_socket() {
    let upgrader = upgrader("/bin/true");
    let first = upgrader.tcp_listener("api", loopback()).unwrap();
    let addr = first.local_addr().unwrap();
    // Port 0 accepts the registered listener's port.
    let second = upgrader.tcp_listener("api", loopback()).unwrap();
    assert_eq!(second.local_addr().unwrap(), addr);
    assert_ne!(
        first.as_raw_fd(),
        second.as_raw_fd(),
        "callers get duplicates"
    );
    let _client = TcpStream::connect(addr).unwrap();
    second.set_nonblocking(false).unwrap();
    let (_, peer) = second.accept().unwrap();
    assert!(peer.ip().is_loopback());
}

#[test]
fn other_descriptors_are_added_and_taken_by_name() {
    let upgrader = upgrader("/bin/true");
    let file = tempfile::tempfile().unwrap();
    upgrader.add_fd("journal", &file).unwrap();
    let copy = upgrader.fd("journal").unwrap().expect("added just above");
    assert_ne!(copy.as_raw_fd(), file.as_raw_fd());
    assert!(upgrader.fd("absent").unwrap().is_none());
    assert_eq!(upgrader.descriptors(), [("journal".to_owned(), Kind::Fd)]);
    assert!(upgrader.remove("journal"));
    assert!(upgrader.descriptors().is_empty());
    assert!(upgrader.fd("journal").unwrap().is_none());
    let err = upgrader.add_fd("", &file).unwrap_err();
    assert_eq!(err.reason(), "invalid_name");
}

#[test]
fn binding_an_address_in_use_names_the_descriptor_and_address() {
    let taken = std::net::TcpListener::bind(loopback()).unwrap();
    let addr = taken.local_addr().unwrap();
    let upgrader = upgrader("/bin/true");
    let err = upgrader.tcp_listener("api", addr).unwrap_err();
    assert_eq!(err.reason(), "bind_failed");
    let message = err.to_string();
    assert!(
        message.contains("\"api\"") && message.contains(&addr.to_string()),
        "{message}"
    );
}

#[tokio::test]
async fn stop_resolves_exit_and_refuses_later_upgrades() {
    let upgrader = upgrader("/bin/true");
    upgrader.ready().unwrap();
    upgrader.stop();
    assert_eq!(upgrader.exit().await, handover::ExitReason::Stopped);
    let err = upgrader.upgrade().await.unwrap_err();
    assert_eq!(err.reason(), "exiting");
}

#[tokio::test]
async fn a_stop_signal_is_a_final_stop() {
    // SIGUSR2: no other test in this process handles it.
    let upgrader = Upgrader::new(
        Options::default()
            .executable("/bin/true")
            .upgrade_signal(None)
            .stop_signals([handover::Signal::SIGUSR2]),
    )
    .unwrap();
    upgrader.ready().unwrap();
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGUSR2).unwrap();
    assert_eq!(upgrader.exit().await, handover::ExitReason::Stopped);
}

/// An `upgrade()` future starts its upgrade when first polled: one created
/// and dropped unpolled (a disabled `select!` branch) starts nothing.
#[tokio::test]
async fn an_upgrade_future_never_polled_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let upgrader = upgrader(successor_script(dir.path()).to_str().unwrap());
    upgrader.ready().unwrap();
    tokio::select! {
        _ = upgrader.upgrade(), if false => {}
        () = std::future::ready(()) => {}
    }
    let upgraded = upgrader.upgrade().await.unwrap();
    assert_eq!(starts(dir.path()), 1, "one successor started");
    finish(upgrader, upgraded.pid);
}

/// A timeout too long for the clock is no deadline, not a panic of the
/// supervisor (which left the service to stop itself and the successor
/// unwatched).
#[tokio::test]
async fn an_upgrade_timeout_of_duration_max_means_no_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let upgrader = Upgrader::new(
        Options::default()
            .executable(successor_script(dir.path()))
            .upgrade_signal(None)
            .upgrade_timeout(Duration::MAX),
    )
    .unwrap();
    upgrader.ready().unwrap();
    std::fs::write(dir.path().join("fail"), "").unwrap();
    let err = upgrader.upgrade().await.unwrap_err();
    assert_eq!(err.reason(), "successor_exited", "{err}");
    assert_serving(&upgrader);

    std::fs::remove_file(dir.path().join("fail")).unwrap();
    let upgraded = upgrader.upgrade().await.unwrap();
    assert_eq!(starts(dir.path()), 2);
    finish(upgrader, upgraded.pid);
}

/// A state provider that panics fails that upgrade with a typed error and
/// starts nothing; the generation serves on and the next upgrade works.
#[tokio::test]
async fn a_panicking_state_provider_fails_only_its_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let upgrader = upgrader(successor_script(dir.path()).to_str().unwrap());
    upgrader.ready().unwrap();
    upgrader.set_state_provider(|| panic!("no state today"));
    let err = upgrader.upgrade().await.unwrap_err();
    assert_eq!(err.reason(), "state_provider_panicked", "{err}");
    assert!(err.to_string().contains("no state today"), "{err}");
    assert_eq!(starts(dir.path()), 0, "no successor was started");
    assert_serving(&upgrader);

    upgrader.set_state_provider(|| b"state".to_vec());
    let upgraded = upgrader.upgrade().await.unwrap();
    assert_eq!(starts(dir.path()), 1);
    finish(upgrader, upgraded.pid);
}

/// Ready is ready: a successor heard while it was alive ended this
/// generation's service, even if it exits a moment later (here: once the
/// test opens its gate, after the upgrade succeeded).
#[tokio::test]
async fn a_successor_alive_when_heard_was_ready_even_if_it_dies_next() {
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    nix::unistd::mkfifo(&gate, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let script = dir.path().join("successor");
    // Written by a child process: no descriptor of it open for writing
    // leaks into a sibling test's fork (ETXTBSY at exec).
    common::write_executable(
        &script,
        &format!(
            "#!/bin/sh\nprintf R >&3\nread _ < '{}'\nexit 5\n",
            gate.display()
        ),
    );
    let upgrader = upgrader(script.to_str().unwrap());
    upgrader.ready().unwrap();

    let upgraded = upgrader.upgrade().await.unwrap();
    // Opening the gate ends the successor.
    drop(std::fs::OpenOptions::new().write(true).open(&gate).unwrap());
    assert_eq!(
        upgrader.exit().await,
        handover::ExitReason::Upgraded(upgraded.clone())
    );
    drop(upgrader);
    // Reaped by the supervisor if it saw the exit before it ended.
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(upgraded.pid), None);
}

/// The socket-builder hook runs on a socket the library creates, before it
/// binds (SO_REUSEPORT takes, the backlog is the one set), and not on one
/// that already exists under that name: inherited sockets keep the options
/// their creator gave them.
#[test]
fn the_socket_hook_configures_new_sockets_only() {
    use nix::sys::socket::{getsockopt, sockopt::ReusePort};
    let upgrader = upgrader("/bin/true");
    let mut calls = 0;
    let listener = upgrader
        .tcp_listener_with("hooked", loopback(), |socket| {
            calls += 1;
            assert_eq!(socket.backlog(), 4096);
            nix::sys::socket::setsockopt(socket, ReusePort, &true)?;
            socket.set_backlog(64);
            Ok(())
        })
        .unwrap();
    assert_eq!(calls, 1);
    assert!(getsockopt(&listener, ReusePort).unwrap());
    // It listens.
    TcpStream::connect(listener.local_addr().unwrap()).unwrap();

    let again = upgrader
        .tcp_listener_with("hooked", listener.local_addr().unwrap(), |_| {
            panic!("not for a socket that exists")
        })
        .unwrap();
    assert_eq!(again.local_addr().unwrap(), listener.local_addr().unwrap());

    let udp = upgrader
        .udp_socket_with("hooked-udp", loopback(), |socket| {
            nix::sys::socket::setsockopt(socket, ReusePort, &true)?;
            Ok(())
        })
        .unwrap();
    assert!(getsockopt(&udp, ReusePort).unwrap());
}

/// A hook that fails fails the call with a bind error that names the
/// listener, the address and the hook's error; nothing is registered.
#[test]
fn a_failing_socket_hook_is_a_bind_error() {
    let upgrader = upgrader("/bin/true");
    let error = upgrader
        .tcp_listener_with("refused", loopback(), |_| {
            Err(std::io::Error::other("no such option here"))
        })
        .unwrap_err();
    assert!(matches!(error, Error::Bind { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains("refused") && message.contains("127.0.0.1:0"),
        "{message}"
    );
    assert!(
        std::error::Error::source(&error)
            .is_some_and(|source| source.to_string() == "no such option here"),
        "{error:?}"
    );
    assert!(
        !upgrader
            .descriptors()
            .iter()
            .any(|(name, _)| name == "refused")
    );
}

/// How many descriptors in this process's table are `socket` (by device
/// and inode: a number may be reused by another test meanwhile). Linux:
/// `/proc/self/fd`.
#[cfg(target_os = "linux")]
fn copies_of(socket: &impl AsRawFd) -> usize {
    use std::os::unix::fs::MetadataExt;
    let table = "/proc/self/fd";
    let identity = |fd: i32| {
        // A number closed since the listing fails, or names another file.
        std::fs::metadata(format!("{table}/{fd}"))
            .ok()
            .map(|m| (m.dev(), m.ino()))
    };
    let target = identity(socket.as_raw_fd()).unwrap();
    std::fs::read_dir(table)
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&fd| identity(fd) == Some(target))
        .count()
}

/// A generation whose successor is ready and whose `Upgrader` is dropped
/// keeps none of the sockets it handed on: its supervisor stays until the
/// process exits (to pass a late upgrade signal on), but the library's
/// copies go at once. (They stayed open until the process exited: the
/// bench, which makes thousands of generations in one process, ran out of
/// descriptors at `upgrade/256`.)
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_dropped_upgraded_generation_keeps_none_of_its_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let upgrader = upgrader(successor_script(dir.path()).to_str().unwrap());
    let listener = upgrader.tcp_listener("web", loopback()).unwrap();
    // A copy of the same socket kept by the test, to look for the others.
    let probe = listener.try_clone().unwrap();
    drop(listener);
    assert_eq!(copies_of(&probe), 2, "the library's copy and the probe");
    upgrader.ready().unwrap();
    let upgraded = upgrader.upgrade().await.unwrap();

    drop(upgrader);
    // The supervisor hears of the drop on its own thread: wait for the
    // library's copy to close (or give up after 10 s: the bug).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while copies_of(&probe) > 1 && std::time::Instant::now() < deadline {
        std::thread::yield_now();
    }
    assert_eq!(copies_of(&probe), 1, "only the probe is left");
    // The successor has its own (in flight on its link).
    let successor = nix::unistd::Pid::from_raw(upgraded.pid);
    let _ = nix::sys::signal::kill(successor, nix::sys::signal::Signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(successor, None);
}

/// An upgrade future made before the `Upgrader` of a generation that has
/// upgraded is dropped, and polled after: refused as exiting. (The dropped
/// generation's supervisor stays while its successor lives, and once read
/// no request at all: the future waited as long as the successor lived.)
#[cfg(target_os = "linux")]
#[tokio::test]
async fn an_upgrade_asked_of_a_dropped_upgraded_generation_is_refused_as_exiting() {
    let dir = tempfile::tempdir().unwrap();
    let upgrader = upgrader(successor_script(dir.path()).to_str().unwrap());
    let listener = upgrader.tcp_listener("web", loopback()).unwrap();
    let probe = listener.try_clone().unwrap();
    drop(listener);
    upgrader.ready().unwrap();
    let upgraded = upgrader.upgrade().await.unwrap();
    // Not polled yet: it asks nothing until then.
    let late = upgrader.upgrade();

    drop(upgrader);
    // The supervisor has heard of the drop once the library's copy of the
    // listener is closed (see the test above).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while copies_of(&probe) > 1 && std::time::Instant::now() < deadline {
        std::thread::yield_now();
    }
    assert_eq!(copies_of(&probe), 1, "the drop was not handled");
    let outcome = tokio::time::timeout(Duration::from_secs(10), late).await;
    assert!(
        matches!(outcome, Ok(Err(Error::Exiting))),
        "expected Exiting within 10 s, got {outcome:?}"
    );
    let successor = nix::unistd::Pid::from_raw(upgraded.pid);
    let _ = nix::sys::signal::kill(successor, nix::sys::signal::Signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(successor, None);
}

/// A generation that took back over after a rollback, then dropped its
/// `Upgrader` (its supervisor ends) before its control socket's task
/// ended: the task returns. (It once looped for ever without yielding,
/// taking the closed `exit` for "must exit" and the standing `RolledBack`
/// for "serve again".)
#[test]
fn the_control_socket_task_returns_once_a_rolled_back_generation_drops_its_upgrader() {
    let dir = tempfile::tempdir().unwrap();
    let upgrader = Upgrader::new(
        Options::default()
            .executable(successor_script(dir.path()))
            .upgrade_signal(None)
            .rollback_window(Duration::from_secs(60))
            .upgrade_timeout(Duration::from_secs(10)),
    )
    .unwrap();
    let control = upgrader
        .control_socket(dir.path().join("control.sock"))
        .unwrap();
    upgrader.ready().unwrap();
    let serve_returned = common::serve_on_its_own_thread(control);
    let upgraded = upgrader.upgrade_blocking().unwrap();
    // Dead within the window, and reaped by the supervisor: rolled back.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(upgraded.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        matches!(
            upgrader.verdict_blocking(),
            handover::Verdict::RolledBack(_)
        ),
        "the successor's death in the window rolls back"
    );
    drop(upgrader);
    assert_eq!(
        serve_returned.recv_timeout(Duration::from_secs(10)),
        Ok(()),
        "the control socket's task still runs 10 s after the Upgrader was dropped"
    );
}

/// A control socket bound anew (here: asked for again at another path,
/// as a successor whose configuration moved it does) is made 0600 like the
/// first. (Only a socket inherited at the same path keeps its mode; one
/// replacing it at another path once kept the umask's.)
#[test]
fn a_control_socket_bound_at_a_new_path_is_made_0600() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let upgrader = upgrader("/bin/true");
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let first = dir.path().join("first.sock");
    let _first = upgrader.control_socket(&first).unwrap();
    assert_eq!(mode(&first), 0o600);
    let moved = dir.path().join("moved.sock");
    let _moved = upgrader.control_socket(&moved).unwrap();
    assert_eq!(mode(&moved), 0o600, "the socket bound at the new path");
}

/// A control request that reached a generation whose parent still drains
/// waits for the parent to go; if this generation is stopped meanwhile, it
/// is answered `exiting` (nothing done: ask again). It used to wait for the
/// parent only, and the stop's second of grace cut it off unanswered.
///
/// The generation is this test binary again, started by the test with a
/// parent of its own making: `HANDOVER` names this process as its parent
/// and descriptor 3 as the handshake link, whose other end the test keeps
/// open (the parent lives) until the child has said how it went.
#[test]
fn a_request_waiting_for_the_parent_is_answered_exiting_when_the_generation_stops() {
    const NAME: &str =
        "a_request_waiting_for_the_parent_is_answered_exiting_when_the_generation_stops";
    if std::env::var_os("HANDOVER").is_some() {
        return waiting_request_in_a_child();
    }
    let (parent_end, child_end) = std::os::unix::net::UnixStream::pair().unwrap();
    // The link goes in as stdin, and `sh` moves it to descriptor 3.
    let mut child = std::process::Command::new("sh");
    child
        .args(["-c", "exec \"$@\" 3<&0 </dev/null", "sh"])
        .arg(std::env::current_exe().unwrap())
        .env(
            "HANDOVER",
            format!("v1;gen=1;parent={};link=3", std::process::id()),
        )
        .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
            child_end,
        )));
    passes_in_a_child(NAME, child);
    drop(parent_end);
}

/// Runs the test `name` alone in `child` (this test binary, or a command
/// that execs it, given as its last argument before these) and checks that
/// it passed, showing what it said if not.
fn passes_in_a_child(name: &str, mut child: std::process::Command) {
    let output = child
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "the child said:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The child of the test above: generation 1, its parent alive.
fn waiting_request_in_a_child() {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::{Arc, Condvar, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    /// Notes the library's line saying a request waits for the parent.
    struct Waiting(Arc<(Mutex<bool>, Condvar)>);
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Waiting {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct Message(String);
            impl tracing::field::Visit for Message {
                fn record_debug(
                    &mut self,
                    field: &tracing::field::Field,
                    value: &dyn std::fmt::Debug,
                ) {
                    if field.name() == "message" {
                        self.0 = format!("{value:?}");
                    }
                }
            }
            let mut message = Message(String::new());
            event.record(&mut message);
            if message
                .0
                .contains("waits until the parent generation is gone")
            {
                *self.0.0.lock().unwrap() = true;
                self.0.1.notify_all();
            }
        }
    }
    let waiting = Arc::new((Mutex::new(false), Condvar::new()));
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(Waiting(Arc::clone(&waiting))),
    )
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let upgrader = upgrader("/bin/true");
    assert_eq!(upgrader.generation(), 1);
    let path = dir.path().join("control.sock");
    let control = upgrader.control_socket(&path).unwrap();
    upgrader.ready().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let serving = runtime.spawn(control.serve());

    let mut client = std::os::unix::net::UnixStream::connect(&path).unwrap();
    client.write_all(b"upgrade\n").unwrap();
    let (noted, arrived) = &*waiting;
    let (noted, timed_out) = arrived
        .wait_timeout_while(noted.lock().unwrap(), Duration::from_secs(20), |noted| {
            !*noted
        })
        .unwrap();
    assert!(
        !timed_out.timed_out(),
        "the request never waited for the parent"
    );
    drop(noted);

    upgrader.stop();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut answer = String::new();
    BufReader::new(&client).read_line(&mut answer).unwrap();
    assert!(
        answer.starts_with("error reason=exiting "),
        "the waiting request was answered {answer:?}"
    );
    runtime.block_on(serving).unwrap();
}

/// Dropping the `Upgrader` in the rollback window closes the window (the
/// successor serves for good); with no service manager to read the PID
/// file while this process lives, the file names the successor by the time
/// the drop returns, so that a process leaving right after cannot exit
/// first. (The drop returned at once, and the supervisor named the
/// successor some time later: a process that exited in between left the
/// file naming itself, gone.) Run in a child with no manager's variables
/// (`INVOCATION_ID`, `NOTIFY_SOCKET`), which would make this process name
/// its successor at its exit instead.
#[test]
fn dropping_the_upgrader_in_the_window_names_the_successor_before_it_returns() {
    const NAME: &str = "dropping_the_upgrader_in_the_window_names_the_successor_before_it_returns";
    if std::env::var_os("HANDOVER_TEST_CHILD").is_none() {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child
            .env("HANDOVER_TEST_CHILD", "1")
            .env_remove("INVOCATION_ID")
            .env_remove("NOTIFY_SOCKET");
        return passes_in_a_child(NAME, child);
    }
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("service.pid");
    let named = || {
        std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse::<i32>()
            .unwrap()
    };
    let upgrader = Upgrader::new(
        Options::default()
            .executable(successor_script(dir.path()))
            .upgrade_signal(None)
            .pid_file(&pid_file)
            .rollback_window(Duration::from_secs(60))
            .upgrade_timeout(Duration::from_secs(10)),
    )
    .unwrap();
    upgrader.ready().unwrap();
    let me = std::process::id() as i32;
    assert_eq!(named(), me);
    let upgraded = upgrader.upgrade_blocking().unwrap();
    assert_eq!(named(), me, "in the window, this generation is named still");
    drop(upgrader);
    assert_eq!(named(), upgraded.pid, "the PID file as the drop returned");
    let successor = nix::unistd::Pid::from_raw(upgraded.pid);
    let _ = nix::sys::signal::kill(successor, nix::sys::signal::Signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(successor, None);
}
