//! The one error type of the crate.
//!
//! Every variant names what went wrong and where (descriptor name, path, pid,
//! exit status), so that a single log line tells an operator what happened,
//! and has a stable [`Error::reason`] string for metrics labels.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::exit_status::ExitStatus;
use crate::kind::Kind;
use crate::problem::{DescriptorProblem, HandshakeProblem, StateProblem};
use crate::wire::WireError;

/// A specialised `Result` for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a handover.
///
/// The running generation keeps serving after every one of these: an error
/// never closes a descriptor that is being handed over.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The inheritance environment variable could not be decoded: it is
    /// truncated, tampered with, or was not written by this library.
    #[error("malformed inheritance environment {var}: {source}")]
    Inheritance {
        /// The environment variable that was read.
        var: &'static str,
        /// What is wrong with it, and at which byte.
        #[source]
        source: WireError,
    },

    /// A descriptor this generation inherited is not usable: it is not
    /// open, it is not the kind of object its parent named it as, or the
    /// named descriptors did not arrive as named on the handshake link
    /// (then `name` is `"(handshake link)"` and `fd` the link's number).
    #[error("inherited descriptor {name:?} (fd {fd}) is unusable: {problem}")]
    InheritedDescriptor {
        /// The name the parent (or systemd) gave it.
        name: String,
        /// Its descriptor number in this process.
        fd: i32,
        /// What is wrong with it; also the error's
        /// [`source`](std::error::Error::source).
        #[source]
        problem: DescriptorProblem,
    },

    /// A name was asked for as one kind of descriptor but is registered as
    /// another (a UDP socket where a TCP listener is expected).
    #[error("descriptor {name:?} is a {found}, not a {expected}")]
    WrongKind {
        /// The name asked for.
        name: String,
        /// The kind the caller asked for.
        expected: Kind,
        /// The kind registered under that name.
        found: Kind,
    },

    /// A descriptor name is empty, too long, or already used.
    #[error("invalid descriptor name {name:?}: {problem}")]
    InvalidName {
        /// The name given.
        name: String,
        /// Why it cannot be used.
        problem: &'static str,
    },

    /// A new socket could not be created or bound.
    #[error("cannot bind {name:?} to {addr}: {source}")]
    Bind {
        /// The descriptor name.
        name: String,
        /// The address or path it was to be bound to.
        addr: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// The successor could not be started at all (missing or
    /// non-executable binary, resource limits).
    #[error("cannot start successor {path}: {source}")]
    Spawn {
        /// The executable that was to be started.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// The successor exited or crashed before it called `ready()`.
    #[error("successor pid {pid} {status} before it was ready")]
    SuccessorExited {
        /// Its process id.
        pid: i32,
        /// How it ended.
        status: ExitStatus,
    },

    /// The successor did not call `ready()` within the upgrade timeout; it
    /// has been killed and reaped.
    #[error("successor pid {pid} was not ready within {timeout:?}; killed it")]
    Timeout {
        /// Its process id.
        pid: i32,
        /// The upgrade timeout that passed.
        timeout: Duration,
    },

    /// The successor broke the handshake protocol (sent something other
    /// than the readiness byte).
    #[error("successor pid {pid} broke the handshake: {problem}")]
    Handshake {
        /// Its process id.
        pid: i32,
        /// What it did; also the error's [`source`](std::error::Error::source).
        #[source]
        problem: HandshakeProblem,
    },

    /// The parent generation went away, or broke the framing, before it
    /// had handed over all of its state.
    #[error("parent pid {parent} handed over {received} of {} bytes of state, then {problem}", expected.map_or("?".to_owned(), |n| n.to_string()))]
    StateLost {
        /// The parent's process id.
        parent: i32,
        /// Bytes that came.
        received: u64,
        /// Bytes announced, if the length came.
        expected: Option<u64>,
        /// What happened.
        problem: StateProblem,
    },

    /// Another upgrade is already running in this generation.
    #[error("an upgrade is already in progress")]
    InProgress,

    /// This generation's parent has not exited yet, so it may not start an
    /// upgrade: at most two generations run at once. The parent drains, or
    /// holds its rollback window ([`Options::rollback_window`](crate::Options::rollback_window)).
    #[error(
        "this generation's parent (pid {parent}) has not exited yet: it drains, or its rollback window is open"
    )]
    ParentAlive {
        /// The parent's process id.
        parent: i32,
    },

    /// `upgrade()` was called before `ready()`.
    #[error("this generation is not ready yet; call ready() first")]
    NotReady,

    /// `ready()` was called a second time.
    #[error("ready() was already called")]
    AlreadyReady,

    /// This generation is exiting (its successor is ready, or `stop()` was
    /// called), so it starts no upgrade.
    #[error("this generation is exiting")]
    Exiting,

    /// This generation's successor serves in the rollback window: this one
    /// takes back over only if that one exits, and starts no upgrade. Ask
    /// the successor (it holds upgrade signals until the window has passed).
    #[error(
        "successor pid {successor} serves in this generation's rollback window; ask it to upgrade"
    )]
    WindowOpen {
        /// The successor's process id.
        successor: i32,
    },

    /// The PID file could not be written.
    #[error("cannot write PID file {path}: {source}")]
    PidFile {
        /// The PID file's path.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// Another system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What the library was doing.
        context: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// The state provider (see `Upgrader::set_state_provider`) panicked, so
    /// this upgrade started no successor. It is called again at the next.
    #[error("the state provider panicked ({message}); no successor was started")]
    StateProviderPanicked {
        /// The panic's message.
        message: String,
    },

    /// The supervisor thread failed (it panicked, or could not wait for
    /// events) while it handled this request, or earlier for good. The
    /// generation serves on; an upgrade it was running was abandoned, its
    /// successor killed and reaped. The ERROR log says more.
    #[error("the upgrade supervisor failed ({problem}); this generation serves on")]
    SupervisorFailed {
        /// What happened to it.
        problem: String,
    },
}

impl Error {
    /// A short, stable, snake_case name for the variant, fit for a metrics
    /// label or a machine-readable answer. It never changes between releases.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Inheritance { .. } => "inheritance_malformed",
            Error::InheritedDescriptor { .. } => "inherited_descriptor_unusable",
            Error::WrongKind { .. } => "wrong_kind",
            Error::InvalidName { .. } => "invalid_name",
            Error::Bind { .. } => "bind_failed",
            Error::Spawn { .. } => "spawn_failed",
            Error::SuccessorExited { .. } => "successor_exited",
            Error::Timeout { .. } => "timeout",
            Error::Handshake { .. } => "handshake_broken",
            Error::StateLost { .. } => "state_lost",
            Error::InProgress => "in_progress",
            Error::ParentAlive { .. } => "parent_alive",
            Error::NotReady => "not_ready",
            Error::AlreadyReady => "already_ready",
            Error::Exiting => "exiting",
            Error::WindowOpen { .. } => "window_open",
            Error::PidFile { .. } => "pid_file",
            Error::Io { .. } => "io",
            Error::StateProviderPanicked { .. } => "state_provider_panicked",
            Error::SupervisorFailed { .. } => "supervisor_failed",
        }
    }

    pub(crate) fn io(context: &'static str, source: impl Into<io::Error>) -> Error {
        Error::Io {
            context,
            source: source.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant, so that the list of reasons below is complete and a new
    /// variant cannot be added without a stable reason.
    fn one_of_each() -> Vec<Error> {
        let io = || io::Error::from(io::ErrorKind::NotFound);
        vec![
            Error::Inheritance {
                var: "HANDOVER",
                source: WireError::new(0, "empty"),
            },
            Error::InheritedDescriptor {
                name: "http".into(),
                fd: 9,
                problem: DescriptorProblem::NotOpen,
            },
            Error::WrongKind {
                name: "dns".into(),
                expected: Kind::TcpListener,
                found: Kind::Udp,
            },
            Error::InvalidName {
                name: String::new(),
                problem: "empty",
            },
            Error::Bind {
                name: "http".into(),
                addr: "127.0.0.1:1".into(),
                source: io(),
            },
            Error::Spawn {
                path: "/nope".into(),
                source: io(),
            },
            Error::SuccessorExited {
                pid: 1,
                status: ExitStatus::Exited(3),
            },
            Error::Timeout {
                pid: 1,
                timeout: Duration::from_secs(1),
            },
            Error::Handshake {
                pid: 1,
                problem: HandshakeProblem::UnexpectedByte { byte: 0x41 },
            },
            Error::StateLost {
                parent: 1,
                received: 0,
                expected: None,
                problem: StateProblem::ParentGone,
            },
            Error::InProgress,
            Error::ParentAlive { parent: 1 },
            Error::NotReady,
            Error::AlreadyReady,
            Error::Exiting,
            Error::WindowOpen { successor: 1 },
            Error::PidFile {
                path: "/run/x.pid".into(),
                source: io(),
            },
            Error::Io {
                context: "poll",
                source: io(),
            },
            Error::StateProviderPanicked {
                message: "boom".into(),
            },
            Error::SupervisorFailed {
                problem: "it panicked: boom".into(),
            },
        ]
    }

    #[test]
    fn every_variant_has_a_distinct_stable_reason() {
        let reasons: Vec<&str> = one_of_each().iter().map(Error::reason).collect();
        assert_eq!(
            reasons,
            [
                "inheritance_malformed",
                "inherited_descriptor_unusable",
                "wrong_kind",
                "invalid_name",
                "bind_failed",
                "spawn_failed",
                "successor_exited",
                "timeout",
                "handshake_broken",
                "state_lost",
                "in_progress",
                "parent_alive",
                "not_ready",
                "already_ready",
                "exiting",
                "window_open",
                "pid_file",
                "io",
                "state_provider_panicked",
                "supervisor_failed",
            ]
        );
        let mut unique = reasons.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), reasons.len());
    }

    #[test]
    fn messages_name_what_and_where() {
        let e = Error::SuccessorExited {
            pid: 42,
            status: ExitStatus::Signaled(9),
        };
        assert_eq!(
            e.to_string(),
            "successor pid 42 killed by SIGKILL before it was ready"
        );
        let e = Error::WrongKind {
            name: "dns".into(),
            expected: Kind::TcpListener,
            found: Kind::Udp,
        };
        assert_eq!(
            e.to_string(),
            "descriptor \"dns\" is a udp socket, not a tcp listener"
        );
    }
}
