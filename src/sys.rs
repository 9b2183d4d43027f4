//! The platform layer: every `unsafe` block and raw system call of the crate.
//!
//! One POSIX path for Linux and macOS through `nix`; there is no platform
//! branch in this file. What it provides:
//! - checking and adopting descriptors named by the inheritance environment;
//! - starting a successor with `posix_spawn(3)`, its descriptors placed at
//!   3, 4, ... and the upgrade signal blocked from its first instruction;
//! - unblocking the upgrade signal, reaping, killing, polling;
//! - removing the inheritance variables from this process's environment.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::libc;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, pthread_sigmask};
use nix::sys::socket::{SockType, getsockopt, sockopt};
use nix::sys::stat::{SFlag, fstat};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use socket2::{Domain, SockAddr, SockRef};

use crate::error::ExitStatus;
use crate::registry::Kind;

/// Checks that `fd` is open and is the kind of object `kind` names,
/// without taking ownership of it. The error says what it is instead.
pub(crate) fn check_inherited(fd: RawFd, kind: Kind) -> Result<(), String> {
    // SAFETY: F_GETFD only reads the descriptor table entry for `fd`; on a
    // number that is not open it fails with EBADF and touches nothing.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(format!("it is not open ({})", io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just seen open, and it stays open while borrowed here:
    // nothing in this function closes it and the library has not adopted it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    if kind == Kind::Fd {
        return Ok(());
    }
    let stat = fstat(borrowed).map_err(|e| format!("fstat failed: {e}"))?;
    let file_type = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
    if file_type != SFlag::S_IFSOCK {
        return Err(format!(
            "expected a {kind}, found {}",
            describe_file_type(file_type)
        ));
    }
    let found = socket_kind(borrowed).map_err(|e| format!("cannot inspect the socket: {e}"))?;
    match found {
        Some(found) if found == kind => Ok(()),
        Some(found) => Err(format!("expected a {kind}, found a {found}")),
        None => Err(format!("expected a {kind}, found another kind of socket")),
    }
}

fn describe_file_type(file_type: SFlag) -> &'static str {
    match file_type {
        SFlag::S_IFREG => "a regular file",
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFIFO => "a pipe",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        SFlag::S_IFLNK => "a symbolic link",
        _ => "an unknown kind of file",
    }
}

/// The kind of a socket, from its type, family and listening state.
fn socket_kind(fd: BorrowedFd<'_>) -> nix::Result<Option<Kind>> {
    let ty = getsockopt(&fd, sockopt::SockType)?;
    let domain = SockRef::from(&fd)
        .local_addr()
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL)))?
        .domain();
    let inet = domain == Domain::IPV4 || domain == Domain::IPV6;
    let unix = domain == Domain::UNIX;
    Ok(match ty {
        SockType::Stream if getsockopt(&fd, sockopt::AcceptConn)? => {
            if inet {
                Some(Kind::TcpListener)
            } else if unix {
                Some(Kind::UnixListener)
            } else {
                None
            }
        }
        SockType::Datagram if inet => Some(Kind::Udp),
        SockType::Datagram if unix => Some(Kind::UnixDatagram),
        _ => None,
    })
}

/// Takes ownership of an inherited descriptor and marks it close-on-exec,
/// so it reaches no process but the next generation (which gets it again
/// through the spawn's file actions).
pub(crate) fn adopt(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: `fd` was checked open by `check_inherited`, the parent handed it
    // to this process for the library alone (the inheritance environment
    // names it), and the wire decoder refused duplicates, so exactly one
    // owner is created per descriptor.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(&owned)?;
    Ok(owned)
}

pub(crate) fn set_cloexec(fd: &impl AsFd) -> io::Result<()> {
    fcntl(fd.as_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}

/// The local address of a socket.
pub(crate) fn local_addr(fd: &impl AsFd) -> io::Result<SockAddr> {
    SockRef::from(fd).local_addr()
}

/// Removes inheritance variables from this process's environment so that
/// no other child of the service sees them.
pub(crate) fn remove_env(vars: &[&str]) {
    for var in vars {
        if std::env::var_os(var).is_some() {
            // SAFETY: called once from `Upgrader::new`, which its documentation
            // asks to be called at startup, before the service starts threads
            // that read the environment; the library reads the environment
            // only in this same call.
            unsafe { std::env::remove_var(var) };
        }
    }
}

/// Unblocks `signal` in the calling thread (a successor is born with it
/// blocked, so that it stays pending until the library's handler is in place).
pub(crate) fn unblock(signal: Signal) -> io::Result<()> {
    let mut set = SigSet::empty();
    set.add(signal);
    pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None)?;
    Ok(())
}

/// What to start, and with which descriptors.
pub(crate) struct SpawnRequest<'a> {
    pub path: &'a Path,
    pub args: &'a [OsString],
    pub env: Vec<OsString>,
    /// Placed at 3, 4, ... in the successor, in this order, not close-on-exec there.
    pub fds: &'a [RawFd],
    /// Blocked in the successor from its first instruction.
    pub blocked: Option<Signal>,
}

/// Starts a successor with `posix_spawn(3)`: no fork of this (possibly large)
/// process, and the exec error (ENOENT, EACCES, ENOEXEC) is returned here.
pub(crate) fn spawn(request: &SpawnRequest<'_>) -> io::Result<Pid> {
    let first_target: RawFd = 3;
    let end = first_target + request.fds.len() as RawFd;
    // A source below `end` could be overwritten by an earlier dup2 in the
    // child; move those out of the way first. The copies are close-on-exec,
    // and dup2 clears that flag on the target.
    let mut moved: Vec<OwnedFd> = Vec::new();
    let mut sources = Vec::with_capacity(request.fds.len());
    for &fd in request.fds {
        if fd < end {
            let raw = fcntl(
                // SAFETY: the registry owns `fd` and holds its lock for the
                // whole spawn, so it stays open while borrowed.
                unsafe { BorrowedFd::borrow_raw(fd) },
                FcntlArg::F_DUPFD_CLOEXEC(end),
            )?;
            // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing
            // else owns.
            let copy = unsafe { OwnedFd::from_raw_fd(raw) };
            sources.push(copy.as_raw_fd());
            moved.push(copy);
        } else {
            sources.push(fd);
        }
    }
    let mut actions = PosixSpawnFileActions::init()?;
    for (i, &source) in sources.iter().enumerate() {
        actions.add_dup2(source, first_target + i as RawFd)?;
    }

    let mut attr = PosixSpawnAttr::init()?;
    let mut mask = SigSet::empty();
    if let Some(signal) = request.blocked {
        mask.add(signal);
    }
    // The std runtime ignores SIGPIPE; give the successor the default, as
    // std::process::Command does.
    let mut defaults = SigSet::empty();
    defaults.add(Signal::SIGPIPE);
    attr.set_sigmask(&mask)?;
    attr.set_sigdefault(&defaults)?;
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
    )?;

    let args = c_strings(request.args.iter().cloned())?;
    let env = c_strings(request.env.iter().cloned())?;
    let pid = posix_spawn(request.path, &actions, &attr, &args, &env)?;
    drop(moved);
    Ok(pid)
}

fn c_strings(items: impl Iterator<Item = OsString>) -> io::Result<Vec<CString>> {
    items
        .map(|item| {
            CString::new(item.into_vec()).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "argument or environment entry contains a NUL byte",
                )
            })
        })
        .collect()
}

/// Reaps `pid` if it has ended; `None` while it still runs.
pub(crate) fn try_reap(pid: Pid) -> io::Result<Option<ExitStatus>> {
    match waitpid(pid, Some(WaitPidFlag::WNOHANG))? {
        WaitStatus::Exited(_, code) => Ok(Some(ExitStatus::Exited(code))),
        WaitStatus::Signaled(_, signal, _) => Ok(Some(ExitStatus::Signaled(signal as i32))),
        _ => Ok(None),
    }
}

/// Kills `pid` with SIGKILL and reaps it. SIGKILL also ends a stopped
/// process, so the wait is short and bounded.
pub(crate) fn kill_and_reap(pid: Pid) -> io::Result<ExitStatus> {
    match kill(pid, Signal::SIGKILL) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => return Err(e.into()),
    }
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(ExitStatus::Exited(code)),
            Ok(WaitStatus::Signaled(_, signal, _)) => {
                return Ok(ExitStatus::Signaled(signal as i32));
            }
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits until one of `fds` is readable (or hung up), or `timeout` passes.
/// Returns, for each descriptor, whether it needs attention.
pub(crate) fn poll_readable(
    fds: &[BorrowedFd<'_>],
    timeout: Option<Duration>,
) -> io::Result<Vec<bool>> {
    let mut poll_fds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    let timeout = match timeout {
        None => PollTimeout::NONE,
        // Round up, so that a deadline is never reported early.
        Some(t) => {
            PollTimeout::try_from(t.as_millis().saturating_add(1).min(i32::MAX as u128) as i32)
                .unwrap_or(PollTimeout::MAX)
        }
    };
    match nix::poll::poll(&mut poll_fds, timeout) {
        Ok(_) | Err(Errno::EINTR) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(poll_fds
        .iter()
        .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
        .collect())
}

/// This process's id.
pub(crate) fn pid() -> i32 {
    nix::unistd::getpid().as_raw()
}
