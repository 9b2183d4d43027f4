//! systemd integration without libsystemd: readiness notifications and
//! socket activation.
//!
//! Notifications are datagrams to `NOTIFY_SOCKET` (a path, or `@name` for
//! the abstract namespace), best effort: a service must run the same without
//! systemd. `NOTIFY_SOCKET` stays in the environment for the successors;
//! the `LISTEN_*` variables do not (they name descriptors of generation 0).

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::error::{Error, Result};
use crate::sys;
use crate::wire::{self, WireError};

/// Sends `sd_notify` messages, if the service runs under systemd.
#[derive(Debug)]
pub(crate) struct Notifier {
    target: Option<(Socket, SockAddr)>,
}

impl Notifier {
    /// A notifier for `NOTIFY_SOCKET`; does nothing where it is not set.
    pub(crate) fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let mut bytes = path.into_vec();
            // `@name` is systemd's spelling of an abstract socket (Linux only).
            if bytes.first() == Some(&b'@') {
                bytes[0] = 0;
            }
            let addr = SockAddr::unix(OsString::from_vec(bytes)).ok()?;
            let socket = Socket::new(Domain::UNIX, Type::DGRAM, None).ok()?;
            Some((socket, addr))
        });
        Notifier { target }
    }

    /// Whether a service manager listens.
    pub(crate) fn active(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one message (`KEY=value` lines). Failures are logged, never
    /// fatal: the service serves the same without its manager's attention.
    pub(crate) fn notify(&self, message: &str) {
        if let Some((socket, addr)) = &self.target {
            if let Err(err) = socket.send_to(message.as_bytes(), addr) {
                tracing::warn!(error = %err, message, "cannot notify the service manager");
            }
        }
    }

    /// The generation is ready and is the service's main process now;
    /// `main_pid` is announced with `MAINPID=` (None where a PID file tells).
    pub(crate) fn ready(&self, main_pid: Option<i32>, generation: u64) {
        let pid = sys::pid();
        let main = main_pid
            .map(|p| format!("MAINPID={p}\n"))
            .unwrap_or_default();
        self.notify(&format!(
            "READY=1\n{main}STATUS=serving (generation {generation}, pid {pid})"
        ));
    }

    /// The main process is `pid` from now on (sent by the main process,
    /// so any `NotifyAccess=` but `none` takes it).
    pub(crate) fn main_pid(&self, pid: i32) {
        self.notify(&format!("MAINPID={pid}"));
    }

    /// An upgrade starts (`Type=notify-reload` waits for the next `READY=1`).
    pub(crate) fn reloading(&self, generation: u64) {
        if !self.active() {
            return;
        }
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
            .unwrap_or(0);
        self.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={now}\nSTATUS=upgrading to generation {}",
            generation + 1
        ));
    }

    /// An upgrade failed: this generation still serves.
    pub(crate) fn upgrade_failed(&self, generation: u64, error: &Error) {
        self.notify(&format!(
            "READY=1\nSTATUS=serving (generation {generation}); upgrade failed: {error}"
        ));
    }

    /// The successor exited within the rollback window: this generation
    /// serves again (`Type=notify-reload` hears the reload end).
    pub(crate) fn rolled_back(&self, generation: u64, rolled_back: &crate::RolledBack) {
        self.notify(&format!(
            "READY=1\nSTATUS=serving (generation {generation}, pid {}); rolled back: {rolled_back}",
            sys::pid()
        ));
    }

    /// A final stop.
    pub(crate) fn stopping(&self) {
        self.notify("STOPPING=1\nSTATUS=stopping");
    }
}

/// Whether systemd started this process itself as a service: it set
/// `INVOCATION_ID` (for every unit type) and is our parent (pid 1, the
/// system manager, on a machine systemd booted; or `MANAGERPID`, a user
/// manager). A process that a
/// wrapper (a shell that does not `exec`) started, or one started from a
/// shell inside a unit (which inherits `INVOCATION_ID`), is not.
pub(crate) fn started_us() -> bool {
    if std::env::var_os("INVOCATION_ID").is_none() {
        return false;
    }
    let parent = std::os::unix::process::parent_id();
    // Pid 1 is systemd only on a machine it booted (sd_booted(3): this
    // directory); a container's init (tini, ...) with an inherited
    // INVOCATION_ID is not.
    (parent == 1 && Path::new("/run/systemd/system").is_dir())
        || std::env::var("MANAGERPID")
            .ok()
            .and_then(|pid| pid.parse::<u32>().ok())
            == Some(parent)
}

/// Whether a service manager may read our PID file: this process runs
/// inside a systemd unit (`INVOCATION_ID`, inherited by a wrapper's
/// children too) or speaks to one (`NOTIFY_SOCKET`).
pub(crate) fn may_read_pid_file() -> bool {
    std::env::var_os("INVOCATION_ID").is_some() || std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// The sockets systemd passed to this process (`LISTEN_FDS`, from fd 3 on),
/// named by `LISTEN_FDNAMES` (a name used twice gets `.1`, `.2`, ...).
/// `None` when there are none for this process (`LISTEN_PID` is another's).
pub(crate) fn activated_sockets(pid: i32) -> Result<Option<Vec<(String, RawFd)>>> {
    let Ok(listen_pid) = std::env::var("LISTEN_PID") else {
        return Ok(None);
    };
    if listen_pid.trim().parse::<i32>().ok() != Some(pid) {
        // Meant for another process (a wrapper that exec'd us keeps its pid;
        // one that forked does not).
        return Ok(None);
    }
    let malformed = |var: &'static str, problem: String| Error::Inheritance {
        var,
        source: WireError::new(0, problem),
    };
    let count = std::env::var("LISTEN_FDS")
        .map_err(|_| malformed("LISTEN_FDS", "missing beside LISTEN_PID".into()))?;
    let count: usize = count
        .trim()
        .parse()
        .map_err(|_| malformed("LISTEN_FDS", format!("{count:?} is not a number")))?;
    if count > wire::MAX_FDS {
        return Err(malformed(
            "LISTEN_FDS",
            format!("{count} is more than {}", wire::MAX_FDS),
        ));
    }
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .ok()
        .map(|names| names.split(':').map(str::to_owned).collect())
        .filter(|names: &Vec<String>| names.len() == count)
        .unwrap_or_else(|| vec!["unknown".to_owned(); count]);
    let mut used = std::collections::BTreeMap::<String, usize>::new();
    let mut sockets = Vec::with_capacity(count);
    for (i, name) in names.into_iter().enumerate() {
        let name = if wire::check_name(&name).is_ok() {
            name
        } else {
            "unknown".to_owned()
        };
        let seen = used.entry(name.clone()).or_default();
        let unique = if *seen == 0 {
            name
        } else {
            format!("{name}.{seen}")
        };
        *seen += 1;
        sockets.push((unique, 3 + i as RawFd));
    }
    Ok(Some(sockets))
}
