//! How a successor process ended: decoded by the platform layer, reported
//! in errors and outcomes.

use std::fmt;

/// How a successor ended (before it became ready, or within its parent's
/// rollback window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitStatus {
    /// It exited on its own with this code.
    Exited(i32),
    /// It was ended by this signal number.
    Signaled(i32),
    /// It ended, but how is not known here: it was started as the service
    /// manager's child (`Options::successor_parent`), which alone gets its
    /// exit status (see the manager's log).
    Unknown,
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitStatus::Exited(code) => write!(f, "exited with code {code}"),
            ExitStatus::Signaled(signal) => match nix::sys::signal::Signal::try_from(signal) {
                Ok(name) => write!(f, "killed by {name}"),
                Err(_) => write!(f, "killed by signal {signal}"),
            },
            ExitStatus::Unknown => f.write_str(
                "exited (its exit status went to the service manager, its parent: see the manager's log)",
            ),
        }
    }
}
