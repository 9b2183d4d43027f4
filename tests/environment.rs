//! `Upgrader::new` and the environment, in a child process of this test
//! binary (a fresh environment and a known descriptor table): it runs one
//! test of this file again, which acts as the child when `ROLE` is set.
//! Under the test harness the child always has other threads (the
//! harness's own), which is the case these tests are about.

use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::process::{Command, Output};

use handover::{DescriptorProblem, Error, FoundObject, Kind, Options, Upgrader};

const ROLE: &str = "HANDOVER_TEST_ROLE";

/// Runs test `name` of this binary as a child, with `role` and through
/// `sh -c script` (the binary is `$0`, its arguments follow).
fn run_child(name: &str, role: &str, script: &str, stdin: Option<OwnedFd>) -> Output {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(script)
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(ROLE, role);
    if let Some(stdin) = stdin {
        command.stdin(stdin);
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "child failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn role() -> Option<String> {
    std::env::var(ROLE).ok()
}

/// Removing a variable while another thread may read the environment is
/// undefined behaviour (C's `getenv` takes no lock), so a process with
/// other threads keeps its inheritance variables, and is told why.
#[test]
fn with_other_threads_the_environment_is_left_alone() {
    if role().as_deref() == Some("threads") {
        let _other = std::thread::spawn(std::thread::park);
        let _upgrader = Upgrader::new(Options::default().upgrade_signal(None)).unwrap();
        println!("left={:?}", std::env::var("LISTEN_FDS").ok());
        return;
    }
    // Meant for another process (pid 1): nothing is inherited, but the
    // variables are there to remove.
    let output = run_child(
        "with_other_threads_the_environment_is_left_alone",
        "threads",
        r#"LISTEN_PID=1 LISTEN_FDS=0 exec "$0" "$@""#,
        None,
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains(r#"left=Some("0")"#), "{stdout}");
}

/// With the inheritance left in the environment, only the process's first
/// `Upgrader` takes it: a second one would own the same descriptors twice.
#[test]
fn a_second_upgrader_inherits_nothing() {
    if role().as_deref() == Some("twice") {
        let first = Upgrader::new(Options::default().upgrade_signal(None)).unwrap();
        assert_eq!(
            first.descriptors(),
            [("http".to_owned(), Kind::TcpListener)]
        );
        drop(first);
        let second = Upgrader::new(Options::default().upgrade_signal(None)).unwrap();
        assert_eq!(second.descriptors(), []);
        assert_eq!(second.generation(), 0);
        drop(second);
        println!("checked");
        return;
    }
    // A socket-activated listener, as systemd passes it: fd 3, and
    // LISTEN_PID naming the process (sh execs it, keeping its pid).
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let output = run_child(
        "a_second_upgrader_inherits_nothing",
        "twice",
        r#"exec 3<&0 0</dev/null; LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=http exec "$0" "$@""#,
        Some(OwnedFd::from(listener)),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("checked"), "{stdout}");
}

/// A descriptor that is not what its parent named it as is a typed problem
/// behind the public error: the caller can match on what was expected and
/// what was found, and the message still says both.
#[test]
fn an_inherited_descriptor_of_another_kind_is_a_typed_problem() {
    if role().as_deref() == Some("wrong-kind") {
        let err = Upgrader::new(Options::default().upgrade_signal(None)).unwrap_err();
        assert_eq!(err.reason(), "inherited_descriptor_unusable");
        let expected = DescriptorProblem::KindMismatch {
            expected: Kind::TcpListener,
            found: FoundObject::Socket(Kind::Udp),
        };
        match &err {
            Error::InheritedDescriptor { name, problem, .. } => {
                assert_eq!(name, "http");
                assert_eq!(problem, &expected);
            }
            other => panic!("another error: {other}"),
        }
        let source = std::error::Error::source(&err).expect("a source");
        assert_eq!(source.downcast_ref::<DescriptorProblem>(), Some(&expected));
        assert!(
            err.to_string()
                .ends_with("is unusable: expected a tcp listener, found a udp socket"),
            "{err}"
        );
        println!("checked");
        return;
    }
    // As a parent sends it: one byte 'F' with the descriptor attached, on
    // the link that the inheritance names; a UDP socket where a TCP
    // listener is claimed.
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::os::fd::AsRawFd;
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let sent = sendmsg::<()>(
        ours.as_raw_fd(),
        &[std::io::IoSlice::new(b"F")],
        &[ControlMessage::ScmRights(&[udp.as_raw_fd()])],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    assert_eq!(sent, 1);
    let output = run_child(
        "an_inherited_descriptor_of_another_kind_is_a_typed_problem",
        "wrong-kind",
        r#"exec 8<&0 0</dev/null; HANDOVER="v1;gen=1;parent=1;link=8;fd=tcp,http" exec "$0" "$@""#,
        Some(OwnedFd::from(theirs)),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("checked"), "{stdout}");
}
