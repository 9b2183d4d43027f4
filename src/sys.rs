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
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
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
use nix::sys::stat::SFlag;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use socket2::{Domain, SockAddr, SockRef};

use crate::error::ExitStatus;
use crate::registry::Kind;

/// Checks that `fd` is open and is the kind of object `kind` names,
/// without taking ownership of it; returns a socket's local address for the
/// registry to keep. The error says what it is instead.
///
/// Runs for every inherited descriptor at startup, so it asks the kernel as
/// little as it can: one `getsockname(2)` tells open, socket and family.
pub(crate) fn check_inherited(fd: RawFd, kind: Kind) -> Result<Option<SockAddr>, String> {
    if kind == Kind::Fd {
        // SAFETY: F_GETFD only reads the descriptor table entry for `fd`; on
        // a number that is not open it fails with EBADF and touches nothing.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            return Err(format!("it is not open ({})", io::Error::last_os_error()));
        }
        return Ok(None);
    }
    match inspect(fd)? {
        None => Err(format!("expected a {kind}, found {}", describe(fd))),
        Some((Some(found), addr)) if found == kind => Ok(Some(addr)),
        Some((Some(found), _)) => Err(format!("expected a {kind}, found a {found}")),
        Some((None, _)) => Err(format!("expected a {kind}, found another kind of socket")),
    }
}

/// What an open descriptor is: `None` if it is not a socket, else the
/// socket's kind (`None` for one this library does not hand over by kind,
/// such as a connected stream) and its local address. Errs if it is not open.
pub(crate) fn inspect(fd: RawFd) -> Result<Option<(Option<Kind>, SockAddr)>, String> {
    // SAFETY: `try_init` hands a zeroed storage and its length; getsockname
    // writes at most that many bytes and the actual length, and `try_init`
    // reads only what the call reported. On a number that is not open or
    // not a socket it fails and writes nothing.
    let named = unsafe {
        SockAddr::try_init(|storage, len| {
            if libc::getsockname(fd, storage.cast(), len) == -1 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        })
    };
    let addr = match named {
        Ok(((), addr)) => addr,
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => {
            return Err(format!("it is not open ({e})"));
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => return Ok(None),
        Err(e) => return Err(format!("cannot inspect it: {e}")),
    };
    // SAFETY: getsockname just succeeded on `fd`, so it is open, and it stays
    // open while borrowed here: nothing in this function closes it and the
    // library has not adopted it yet.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let kind =
        socket_kind(borrowed, &addr).map_err(|e| format!("cannot inspect the socket: {e}"))?;
    Ok(Some((kind, addr)))
}

/// What a descriptor that is not a socket is, for an error message.
fn describe(fd: RawFd) -> &'static str {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a `stat` into the buffer it is given, which is
    // large enough, and fails without writing on a bad descriptor.
    if unsafe { libc::fstat(fd, stat.as_mut_ptr()) } == -1 {
        return "something that cannot be inspected";
    }
    // SAFETY: fstat succeeded, so it initialised the buffer.
    let mode = unsafe { stat.assume_init() }.st_mode;
    describe_file_type(SFlag::from_bits_truncate(mode) & SFlag::S_IFMT)
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

/// The kind of a socket and its local address, from its family, listening
/// state and (for one that does not listen) its type.
fn socket_kind(fd: BorrowedFd<'_>, addr: &SockAddr) -> io::Result<Option<Kind>> {
    let domain = addr.domain();
    let inet = domain == Domain::IPV4 || domain == Domain::IPV6;
    let unix = domain == Domain::UNIX;
    // Only stream sockets listen, so a listener needs no SO_TYPE.
    let kind = if getsockopt(&fd, sockopt::AcceptConn)? {
        if inet {
            Some(Kind::TcpListener)
        } else if unix {
            Some(Kind::UnixListener)
        } else {
            None
        }
    } else {
        match getsockopt(&fd, sockopt::SockType)? {
            SockType::Datagram if inet => Some(Kind::Udp),
            SockType::Datagram if unix => Some(Kind::UnixDatagram),
            _ => None,
        }
    };
    Ok(kind)
}

/// Takes ownership of inherited descriptors and marks them close-on-exec,
/// so they reach no process but the next generation (which gets them again
/// through the spawn's file actions).
pub(crate) fn adopt(fds: &[RawFd]) -> io::Result<Vec<OwnedFd>> {
    let owned: Vec<OwnedFd> = fds
        .iter()
        // SAFETY: each `fd` was checked open by `check_inherited`, the parent
        // handed it to this process for the library alone (the inheritance
        // environment names it), and the wire decoder refused duplicates, so
        // exactly one owner is created per descriptor.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    let mut sorted: Vec<RawFd> = fds.to_vec();
    sorted.sort_unstable();
    let mut run_start = 0;
    for i in 1..=sorted.len() {
        if i == sorted.len() || sorted[i] != sorted[i - 1] + 1 {
            if !sorted.is_empty() {
                cloexec_range(sorted[run_start], sorted[i - 1])?;
            }
            run_start = i;
        }
    }
    Ok(owned)
}

/// Marks `first..=last` close-on-exec. Platform branch: Linux (5.11+) does a
/// whole run in one `close_range(2)` call; elsewhere, and on older kernels,
/// one `fcntl(2)` per descriptor.
fn cloexec_range(first: RawFd, last: RawFd) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on the
        // descriptors in the range, all of which this process owns (adopted
        // just before); it closes nothing.
        let done = unsafe {
            libc::syscall(
                libc::SYS_close_range,
                first as libc::c_uint,
                last as libc::c_uint,
                libc::CLOSE_RANGE_CLOEXEC,
            )
        } == 0;
        if done {
            return Ok(());
        }
    }
    for fd in first..=last {
        // SAFETY: every descriptor in the range was adopted by the caller and
        // stays open while borrowed for this one call.
        set_cloexec(&unsafe { BorrowedFd::borrow_raw(fd) })?;
    }
    Ok(())
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

/// Orders the `dup2`s that put `fds` at 3, 4, ... so that none overwrites a
/// source still to be copied: a parallel move. A source is copied above the
/// targets (by `copy`) only to break a cycle, or when it already sits at its
/// target (`dup2(fd, fd)` would leave it close-on-exec). Returns the
/// (source, target) pairs in order.
fn placement(
    fds: &[RawFd],
    copy: &mut impl FnMut(RawFd) -> io::Result<RawFd>,
) -> io::Result<Vec<(RawFd, RawFd)>> {
    use std::collections::HashMap;
    let mut sources: Vec<RawFd> = fds.to_vec();
    let target_of = |i: usize| 3 + i as RawFd;
    // How many pending moves still read each descriptor.
    let mut readers: HashMap<RawFd, usize> = HashMap::new();
    for (i, source) in sources.iter_mut().enumerate() {
        if *source == target_of(i) {
            *source = copy(*source)?;
        }
        *readers.entry(*source).or_default() += 1;
    }
    let mut pending: Vec<usize> = (0..sources.len()).collect();
    let mut order = Vec::with_capacity(sources.len());
    while !pending.is_empty() {
        let before = pending.len();
        pending.retain(|&i| {
            let free = readers.get(&target_of(i)).copied().unwrap_or(0) == 0;
            if free {
                order.push((sources[i], target_of(i)));
                if let Some(n) = readers.get_mut(&sources[i]) {
                    *n -= 1;
                }
            }
            !free
        });
        if pending.len() == before {
            // Every pending target is still a source: a cycle. Copy one
            // source out of the way, which frees its descriptor as a target.
            let i = pending[0];
            if let Some(n) = readers.get_mut(&sources[i]) {
                *n -= 1;
            }
            sources[i] = copy(sources[i])?;
            *readers.entry(sources[i]).or_default() += 1;
        }
    }
    Ok(order)
}

/// Starts a successor with `posix_spawn(3)`: no fork of this (possibly large)
/// process, and the exec error (ENOENT, EACCES, ENOEXEC) is returned here.
pub(crate) fn spawn(request: &SpawnRequest<'_>) -> io::Result<Pid> {
    let mut moved: Vec<OwnedFd> = Vec::new();
    let end = 3 + request.fds.len() as RawFd;
    let mut copy_above_targets = |fd: RawFd| -> io::Result<RawFd> {
        // SAFETY: the registry owns `fd` and holds its lock for the whole
        // spawn (the link is owned by the caller), so it stays open while
        // borrowed.
        let raw = fcntl(
            unsafe { BorrowedFd::borrow_raw(fd) },
            FcntlArg::F_DUPFD_CLOEXEC(end),
        )?;
        // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor nothing else owns.
        let copy = unsafe { OwnedFd::from_raw_fd(raw) };
        moved.push(copy);
        Ok(raw)
    };
    let mut actions = PosixSpawnFileActions::init()?;
    for (source, target) in placement(request.fds, &mut copy_above_targets)? {
        actions.add_dup2(source, target)?;
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

/// Waits until one of `fds` is readable (or hung up), or writable where
/// asked (`true`), or `timeout` passes. Returns, for each descriptor,
/// whether it needs attention.
pub(crate) fn poll(
    fds: &[(BorrowedFd<'_>, bool)],
    timeout: Option<Duration>,
) -> io::Result<Vec<bool>> {
    let mut poll_fds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|&(fd, writable)| {
            let events = if writable {
                PollFlags::POLLIN | PollFlags::POLLOUT
            } else {
                PollFlags::POLLIN
            };
            PollFd::new(fd, events)
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Runs the moves on a model descriptor table and checks every target
    /// ends up with its source's object.
    fn check(fds: &[RawFd]) {
        let mut next_copy = 10_000;
        let mut copies = Vec::new();
        let order = placement(fds, &mut |fd| {
            next_copy += 1;
            copies.push((fd, next_copy));
            Ok(next_copy)
        })
        .unwrap();
        let mut table: std::collections::HashMap<RawFd, RawFd> =
            fds.iter().map(|&fd| (fd, fd)).collect();
        for &(from, to) in &copies {
            table.insert(to, table[&from]);
        }
        for (source, target) in order {
            assert_ne!(source, target, "dup2(fd, fd) leaves it close-on-exec");
            let object = table[&source];
            table.insert(target, object);
        }
        for (i, &fd) in fds.iter().enumerate() {
            assert_eq!(table[&(3 + i as RawFd)], fd, "target {} of {fds:?}", 3 + i);
        }
    }

    #[test]
    fn places_chains_cycles_and_fixed_points() {
        check(&[]);
        check(&[3]); // already in place
        check(&[4, 3]); // a swap
        check(&[4, 5, 3]); // a three-cycle
        check(&[10, 11, 12]); // nothing overlaps
        check(&[5, 3, 20]); // a chain
    }

    #[test]
    fn copies_only_to_break_cycles() {
        let mut copies = 0;
        placement(&[10, 3, 4, 5, 6], &mut |fd| {
            copies += 1;
            Ok(fd + 1000)
        })
        .unwrap();
        assert_eq!(copies, 0);
    }

    proptest! {
        #[test]
        fn any_distinct_sources_are_placed(fds in prop::collection::hash_set(3..40i32, 0..30)) {
            let fds: Vec<RawFd> = fds.into_iter().collect();
            check(&fds);
        }
    }
}
