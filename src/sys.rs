//! The platform layer: every `unsafe` block and raw system call of the crate.
//!
//! One POSIX path for Linux and macOS through `nix` and `libc`; the
//! platform branches (receiving descriptors close-on-exec, closing every
//! other descriptor in a successor, writing on the link without SIGPIPE,
//! counting this process's threads, reading `/proc` for a signal's sender)
//! are named in `ARCHITECTURE.md`. What it provides:
//! - passing descriptors on the handshake link (`SCM_RIGHTS`) and checking
//!   what each one is, and writing on it without ever raising SIGPIPE;
//! - adopting sockets passed by systemd's socket activation;
//! - starting a successor with `posix_spawn(3)`, or (Linux, under systemd)
//!   as the service manager's child with `clone3`/`clone` and
//!   `CLONE_PARENT | CLONE_PIDFD`, its handshake link placed at 3, every
//!   other descriptor but stdio closed, and the upgrade signal blocked from
//!   its first instruction; watching, killing and learning the end of such
//!   a sibling through its pidfd;
//! - unblocking a signal; reaping (decoding any wait status, a real-time
//!   signal's included), killing only a child not yet reaped; polling;
//! - the upgrade signal's handler, which notes who sent it;
//! - removing the inheritance variables from this process's environment,
//!   when it has one thread only (counted per system: a platform branch).

use std::ffi::{CString, OsString};
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::libc;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, pthread_sigmask};
use nix::sys::socket::{ControlMessage, MsgFlags, SockType, getsockopt, send, sendmsg, sockopt};
use nix::unistd::Pid;
use socket2::{Domain, SockAddr, SockRef};

use crate::exit_status::ExitStatus;
use crate::kind::Kind;
use crate::problem::{DescriptorProblem, FoundObject, ReceiveError};

/// Checks that a received descriptor is the kind of object `kind` names;
/// returns a socket's local address for the registry to keep. The error
/// says what it is instead.
///
/// Runs for every inherited descriptor at startup, so it asks the kernel as
/// little as it can: one `getsockname(2)` tells socket and family, and one
/// `getsockopt(2)` listening or (for one that does not listen) the type.
pub(crate) fn check_kind(
    fd: BorrowedFd<'_>,
    kind: Kind,
) -> Result<Option<SockAddr>, DescriptorProblem> {
    if kind == Kind::Fd {
        return Ok(None);
    }
    let found = match inspect(fd.as_raw_fd())? {
        Some((Some(found), addr)) if found == kind => return Ok(Some(addr)),
        Some((Some(found), _)) => FoundObject::Socket(found),
        Some((None, _)) => FoundObject::OtherSocket,
        None => describe(fd.as_raw_fd()),
    };
    Err(DescriptorProblem::KindMismatch {
        expected: kind,
        found,
    })
}

/// What an open descriptor is: `None` if it is not a socket, else the
/// socket's kind (`None` for one this library does not hand over by kind,
/// such as a connected stream) and its local address. Errs if it is not open.
pub(crate) fn inspect(fd: RawFd) -> Result<Option<(Option<Kind>, SockAddr)>, DescriptorProblem> {
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
        Err(e) => {
            return match errno(&e) {
                libc::EBADF => Err(DescriptorProblem::NotOpen),
                libc::ENOTSOCK => Ok(None),
                errno => Err(DescriptorProblem::Uninspectable {
                    call: "getsockname(2)",
                    errno,
                }),
            };
        }
    };
    // SAFETY: getsockname just succeeded on `fd`, so it is open, and it stays
    // open while borrowed here: nothing in this function closes it and the
    // library has not adopted it yet.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let kind = socket_kind(borrowed, &addr)?;
    Ok(Some((kind, addr)))
}

/// The error number of an error that came from a system call. Every error
/// this layer builds from one has it; `EIO` stands in should one ever not.
fn errno(error: &io::Error) -> i32 {
    error.raw_os_error().unwrap_or(libc::EIO)
}

/// What a descriptor that is not a socket is, for an error.
fn describe(fd: RawFd) -> FoundObject {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a `stat` into the buffer it is given, which is
    // large enough, and fails without writing on a bad descriptor.
    if unsafe { libc::fstat(fd, stat.as_mut_ptr()) } == -1 {
        return FoundObject::Unknown;
    }
    // SAFETY: fstat succeeded, so it initialised the buffer.
    let mode = unsafe { stat.assume_init() }.st_mode;
    FoundObject::from_file_type(mode)
}

/// The kind of a socket and its local address, from its family, listening
/// state and (for one that does not listen) its type.
fn socket_kind(fd: BorrowedFd<'_>, addr: &SockAddr) -> Result<Option<Kind>, DescriptorProblem> {
    let failed = |call| {
        move |errno: Errno| DescriptorProblem::Uninspectable {
            call,
            errno: errno as i32,
        }
    };
    let domain = addr.domain();
    let inet = domain == Domain::IPV4 || domain == Domain::IPV6;
    let unix = domain == Domain::UNIX;
    // Only stream sockets listen, so a listener needs no SO_TYPE.
    let listening =
        getsockopt(&fd, sockopt::AcceptConn).map_err(failed("getsockopt(SO_ACCEPTCONN)"))?;
    let kind = if listening {
        if inet {
            Some(Kind::TcpListener)
        } else if unix {
            Some(Kind::UnixListener)
        } else {
            None
        }
    } else {
        match getsockopt(&fd, sockopt::SockType).map_err(failed("getsockopt(SO_TYPE)"))? {
            SockType::Datagram if inet => Some(Kind::Udp),
            SockType::Datagram if unix => Some(Kind::UnixDatagram),
            _ => None,
        }
    };
    Ok(kind)
}

/// Takes ownership of inherited descriptors (the handshake link, sockets
/// passed by systemd) and marks them close-on-exec, so they reach no other
/// process (the next generation gets them on the handshake link).
pub(crate) fn adopt(fds: &[RawFd]) -> io::Result<Vec<OwnedFd>> {
    let owned: Vec<OwnedFd> = fds
        .iter()
        // SAFETY: each `fd` was checked open (by `inspect`), was
        // handed to this process for the library alone (the inheritance
        // environment or LISTEN_FDS names it), and callers pass distinct
        // numbers, so exactly one owner is created per descriptor.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    for fd in &owned {
        set_cloexec(fd)?;
    }
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
/// no other child of the service sees them, if that is sound now: only
/// while the calling thread is the process's only one, since another may
/// read the environment meanwhile (C's `getenv` takes no lock). Otherwise
/// leaves them and returns the ones that are set.
pub(crate) fn remove_env(vars: &[&'static str]) -> Result<(), Vec<&'static str>> {
    let set: Vec<&'static str> = vars
        .iter()
        .copied()
        .filter(|var| std::env::var_os(var).is_some())
        .collect();
    if set.is_empty() {
        return Ok(());
    }
    if thread_count() != Some(1) {
        return Err(set);
    }
    for var in set {
        // SAFETY: this thread is the process's only one (counted just
        // above), and only it could start another, which it does not do
        // here: nothing else reads or writes the environment meanwhile.
        unsafe { std::env::remove_var(var) };
    }
    Ok(())
}

/// How many threads this process has, if the system says.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn thread_count() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/task").ok()?.count())
}

/// How many threads this process has, if the system says.
#[cfg(target_os = "macos")]
fn thread_count() -> Option<usize> {
    let mut info = std::mem::MaybeUninit::<libc::proc_taskinfo>::zeroed();
    let size = std::mem::size_of::<libc::proc_taskinfo>();
    let pid = libc::c_int::try_from(std::process::id()).ok()?;
    // SAFETY: proc_pidinfo writes at most `size` bytes into `info`, which is
    // that large, and returns how many it wrote (or 0 on error).
    let written = unsafe {
        libc::proc_pidinfo(
            pid,
            libc::PROC_PIDTASKINFO,
            0,
            info.as_mut_ptr().cast(),
            libc::c_int::try_from(size).ok()?,
        )
    };
    if usize::try_from(written).ok()? != size {
        return None;
    }
    // SAFETY: zeroed, then wholly written; every field is an integer, for
    // which any bits are valid.
    let info = unsafe { info.assume_init() };
    usize::try_from(info.pti_threadnum).ok()
}

/// How many threads this process has: unknown on other systems, where the
/// environment is then left alone.
#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "macos")))]
fn thread_count() -> Option<usize> {
    None
}

/// Unblocks `signal` in the calling thread (a successor is born with it
/// blocked, so that it stays pending until the library's handler is in place).
pub(crate) fn unblock(signal: Signal) -> io::Result<()> {
    let mut set = SigSet::empty();
    set.add(signal);
    pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None)?;
    Ok(())
}

/// Descriptors travel on the handshake link in messages of at most this
/// many: Linux takes up to 253 per message, and a small fixed size keeps
/// each control message well inside every system's limits.
pub(crate) const FDS_PER_MESSAGE: usize = 64;

/// The one data byte that carries each message of descriptors.
const FDS_MARK: u8 = b'F';

/// Sends `fds` on the handshake link, before the successor starts: one byte
/// per message of at most [`FDS_PER_MESSAGE`], the descriptors attached as
/// `SCM_RIGHTS`. The kernel gives the successor its own references, so
/// nothing is placed by number and no descriptor but the link is inherited.
///
/// Everything must fit in the link's buffers until the successor reads it:
/// Linux counts a stream socket's queued messages against the sender's
/// `SO_SNDBUF`, macOS against the receiver's `SO_RCVBUF` (8 KiB by default,
/// too little for a few hundred descriptors), so both are raised to what
/// `fds` needs. Sending never blocks: a full buffer is an error, not a
/// hang of the supervisor.
pub(crate) fn send_fds(
    link: BorrowedFd<'_>,
    peer: BorrowedFd<'_>,
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let messages = fds.len().div_ceil(FDS_PER_MESSAGE);
    // A generous bound per message: its byte, the control message (a
    // pointer per descriptor inside the kernel) and the buffers' overhead.
    let needed = LINK_BUFFER_BASE + messages * LINK_BUFFER_PER_MESSAGE;
    let (ours, theirs) = (SockRef::from(&link), SockRef::from(&peer));
    if ours.send_buffer_size()? < needed {
        ours.set_send_buffer_size(needed)?;
    }
    if theirs.recv_buffer_size()? < needed {
        theirs.set_recv_buffer_size(needed)?;
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    for chunk in raw.chunks(FDS_PER_MESSAGE) {
        let sent = sendmsg::<()>(
            link.as_raw_fd(),
            &[IoSlice::new(&[FDS_MARK])],
            &[ControlMessage::ScmRights(chunk)],
            MsgFlags::MSG_DONTWAIT,
            None,
        )?;
        if sent != 1 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the handshake link took no byte",
            ));
        }
    }
    Ok(())
}

/// The link's buffers hold at least this much, plus
/// [`LINK_BUFFER_PER_MESSAGE`] per message of descriptors.
const LINK_BUFFER_BASE: usize = 64 * 1024;
const LINK_BUFFER_PER_MESSAGE: usize = 4 * 1024;

/// Receives exactly `count` descriptors sent by [`send_fds`], close-on-exec.
/// The parent sent them before it started this process, so they are all
/// waiting: this never blocks, and anything else (fewer, more, another byte,
/// not a socket) is an error that says so. Whatever was received is closed
/// on error; the link itself is only borrowed.
pub(crate) fn receive_fds(link: RawFd, count: usize) -> Result<Vec<OwnedFd>, DescriptorProblem> {
    if inspect(link)?.is_none() {
        return Err(DescriptorProblem::NotASocket {
            found: describe(link),
        });
    }
    // SAFETY: `link` is an open socket (just checked), and it is only
    // borrowed for this call: nothing here closes it.
    let link = unsafe { BorrowedFd::borrow_raw(link) };
    let mut received: Vec<OwnedFd> = Vec::with_capacity(count);
    while received.len() < count {
        let before = received.len();
        let byte = receive_some(link, &mut received).map_err(|e| match e {
            ReceiveError::Io {
                errno: libc::EAGAIN,
                ..
            } => ReceiveError::TooFew {
                expected: count,
                received: before,
            },
            other => other,
        })?;
        match byte {
            None => {
                return Err(ReceiveError::Closed {
                    expected: count,
                    received: before,
                }
                .into());
            }
            Some(FDS_MARK) => {}
            Some(other) => return Err(ReceiveError::UnexpectedByte { byte: other }.into()),
        }
        if received.len() == before {
            return Err(ReceiveError::Empty { received: before }.into());
        }
    }
    if received.len() > count {
        return Err(ReceiveError::TooMany {
            expected: count,
            received: received.len(),
        }
        .into());
    }
    Ok(received)
}

/// One `recvmsg(2)` of one byte and at most [`FDS_PER_MESSAGE`] descriptors,
/// appended to `into` as owned, close-on-exec descriptors. `None` at end of
/// stream.
fn receive_some(link: BorrowedFd<'_>, into: &mut Vec<OwnedFd>) -> Result<Option<u8>, ReceiveError> {
    const FD_BYTES: usize = FDS_PER_MESSAGE * std::mem::size_of::<libc::c_int>();
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    let space = unsafe { libc::CMSG_SPACE(FD_BYTES as libc::c_uint) } as usize;
    // u64 words: cmsghdr needs its alignment, which a byte buffer lacks.
    let mut control = vec![0u64; space.div_ceil(8)];
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let first_new = into.len();
    let mut byte = 0u8;
    let mut iov = libc::iovec {
        iov_base: (&raw mut byte).cast(),
        iov_len: 1,
    };
    // SAFETY: an all-zero msghdr is a valid empty header (null pointers,
    // zero lengths); the fields that matter are set just below.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &raw mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = (control.len() * 8) as _;
    // Platform branch: Linux marks received descriptors close-on-exec
    // atomically; macOS has no MSG_CMSG_CLOEXEC, so each is marked below.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let flags = libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let flags = libc::MSG_DONTWAIT;
    let n = loop {
        // SAFETY: `header` points at `iov` (one byte, `byte`) and `control`
        // (`msg_controllen` bytes), all alive and exclusively borrowed for
        // the call; recvmsg writes at most those lengths and updates the
        // header's lengths and flags.
        let n = unsafe { libc::recvmsg(link.as_raw_fd(), &raw mut header, flags) };
        if n == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        break n;
    };
    if n == -1 {
        return Err(ReceiveError::Io {
            call: "recvmsg(2)",
            errno: errno(&io::Error::last_os_error()),
        });
    }
    // Take ownership of every descriptor that arrived before looking at
    // anything else, so that none leaks whatever the verdict.
    // SAFETY: recvmsg filled `header`; CMSG_FIRSTHDR and CMSG_NXTHDR walk
    // only the `msg_controllen` bytes it reported, within `control`.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const header) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is non-null and points at a complete header inside
        // `control` (CMSG_FIRSTHDR/CMSG_NXTHDR check that).
        let (level, kind, len) =
            unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len) };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN only computes a size.
            let header_len = unsafe { libc::CMSG_LEN(0) } as usize;
            // cmsg_len is a usize on Linux and a socklen_t on macOS.
            #[allow(clippy::unnecessary_cast)]
            let len = len as usize;
            // SAFETY: CMSG_DATA only computes the address of this message's
            // data from its header, which is inside `control`.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<libc::c_int>();
            // The length a truncated message claims can exceed what was
            // written (macOS reports the untruncated length): read only what
            // lies within the bytes recvmsg reported.
            #[allow(clippy::unnecessary_cast)]
            let written = (header.msg_controllen as usize).min(control.len() * 8);
            let end = control.as_ptr() as usize + written;
            let room = end.saturating_sub(data as usize);
            let fds = len.saturating_sub(header_len).min(room) / std::mem::size_of::<libc::c_int>();
            for i in 0..fds {
                // SAFETY: `i < fds`, inside the message's data and within the
                // bytes recvmsg wrote; the data may be unaligned for c_int,
                // hence read_unaligned.
                let raw = unsafe { data.add(i).read_unaligned() };
                // SAFETY: the kernel just installed `raw` in this process for
                // this message alone; nothing else knows the number.
                into.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR; returns null after the last one.
        cmsg = unsafe { libc::CMSG_NXTHDR(&raw const header, cmsg) };
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    for fd in &into[first_new..] {
        set_cloexec(fd).map_err(|e| ReceiveError::Io {
            call: "fcntl(F_SETFD, FD_CLOEXEC)",
            errno: errno(&e),
        })?;
    }
    if header.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(ReceiveError::Truncated {
            limit: FDS_PER_MESSAGE,
        });
    }
    Ok((n == 1).then_some(byte))
}

/// What to start, with its handshake link.
pub(crate) struct SpawnRequest<'a> {
    pub path: &'a Path,
    pub args: &'a [OsString],
    pub env: Vec<OsString>,
    /// Placed at 3 in the successor, not close-on-exec there.
    pub link: BorrowedFd<'a>,
    /// Blocked in the successor from its first instruction.
    pub blocked: Option<Signal>,
}

/// The descriptor number the successor finds its handshake link at.
pub(crate) const LINK_FD: RawFd = 3;

/// Starts a successor with `posix_spawn(3)`: no fork of this (possibly large)
/// process, and the exec error (ENOENT, EACCES, ENOEXEC) is returned here.
///
/// It inherits stdio (0, 1, 2) and the link (at 3), nothing else: every
/// other descriptor is closed in it, close-on-exec or not (a pipe the
/// service made without the flag, one its own launcher left it, one that
/// another thread has just created and not yet marked).
///
/// With `sibling` (Linux), the successor is started as our parent's child
/// instead, from its first instruction (see [`spawn_sibling`]); where the
/// kernel refuses that, it is started as ours, with a WARN.
pub(crate) fn spawn(request: &SpawnRequest<'_>, sibling: bool) -> io::Result<Child> {
    if sibling {
        match spawn_sibling(request)? {
            Ok(child) => return Ok(child),
            Err(refused) => tracing::warn!(
                error = %refused,
                "cannot start the successor as the service manager's child here: started as ours"
            ),
        }
    }
    Ok(Child {
        pid: posix_spawn(request)?,
        pidfd: None,
    })
}

fn posix_spawn(request: &SpawnRequest<'_>) -> io::Result<Pid> {
    // dup2(3, 3) would leave the link close-on-exec: copy it elsewhere first.
    let copy = if request.link.as_raw_fd() == LINK_FD {
        Some(request.link.try_clone_to_owned()?)
    } else {
        None
    };
    let source = copy
        .as_ref()
        .map_or(request.link.as_raw_fd(), AsRawFd::as_raw_fd);
    let mut actions = FileActions::new()?;
    actions.dup2(source, LINK_FD)?;
    let signal_flags = libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF;
    // Platform branch: macOS closes every descriptor that no file action
    // names (POSIX_SPAWN_CLOEXEC_DEFAULT), so stdio is named; elsewhere a
    // file action closes everything above the link.
    #[cfg(target_vendor = "apple")]
    let flags = {
        for fd in 0..LINK_FD {
            if is_open(fd) {
                actions.inherit(fd)?;
            }
        }
        signal_flags | libc::POSIX_SPAWN_CLOEXEC_DEFAULT
    };
    #[cfg(not(target_vendor = "apple"))]
    let flags = {
        actions.close_from(LINK_FD + 1)?;
        signal_flags
    };

    let mut attr = SpawnAttributes::new()?;
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
    attr.set_flags(flags)?;

    let path = CString::new(request.path.as_os_str().as_bytes()).map_err(|_| nul_byte())?;
    let args = c_strings(request.args.iter().cloned())?;
    let env = c_strings(request.env.iter().cloned())?;
    let argv = null_terminated(&args);
    let envp = null_terminated(&env);
    let mut pid: libc::pid_t = 0;
    // SAFETY: `path` and every string `argv` and `envp` point at are
    // NUL-terminated and outlive the call, and both arrays end with a null
    // pointer; `actions` and `attr` were initialised by their `new`; `pid`
    // is a valid place for the child's pid. posix_spawn copies what it
    // needs before it returns.
    let result = unsafe {
        libc::posix_spawn(
            &mut pid,
            path.as_ptr(),
            &actions.0,
            &attr.0,
            argv.as_ptr(),
            envp.as_ptr(),
        )
    };
    spawn_result(result)?;
    drop(copy);
    Ok(Pid::from_raw(pid))
}

/// The kernel's `struct clone_args`, its first version (64 bytes): the libc
/// crate has it for few targets.
#[cfg(target_os = "linux")]
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
}

/// Starts a successor as our parent's child (`clone3(2)` with
/// `CLONE_PARENT | CLONE_PIDFD`), with the same file actions and signal
/// settings as [`posix_spawn`]: under a service manager it is the
/// manager's child from birth, so whenever the manager reads a PID file
/// that names it, it finds its own child. `Ok(Err)` where the kernel refuses
/// (no clone3: ENOSYS, also what seccomp filters return; EINVAL: we are
/// PID 1 of a namespace and have no parent to share; EPERM).
///
/// Between clone3 and execve the child runs on a copy of this (possibly
/// multi-threaded) process: it calls only async-signal-safe functions,
/// and everything it needs is prepared before. An exec error comes back on
/// a close-on-exec pipe; the failed child's status goes to our parent.
#[cfg(target_os = "linux")]
pub(crate) fn spawn_sibling(request: &SpawnRequest<'_>) -> io::Result<Result<Child, io::Error>> {
    spawn_sibling_with(request, CloneCall::Clone3)
}

/// Which system call [`spawn_sibling_with`] starts with.
#[cfg(target_os = "linux")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CloneCall {
    /// `clone3(2)`, and `clone(2)` where it gets ENOSYS.
    Clone3,
    /// `clone(2)` only (what a kernel or filter without clone3 leaves).
    Clone,
}

/// `clone(2)` without a new stack, the flags given and the pidfd's place.
///
/// # Safety
/// As `fork`: the child returns from this call on a copy of the caller's
/// stack and memory; `pidfd` must point to a live `c_int`.
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
unsafe fn legacy_clone(flags: libc::c_int, pidfd: *mut libc::c_int) -> libc::c_long {
    // SAFETY: the caller's contract; on x86_64 the arguments are (flags,
    // stack, parent_tid, child_tid, tls), on aarch64 (flags, stack,
    // parent_tid, tls, child_tid): the two last are 0 either way.
    unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags as libc::c_ulong,
            0usize,
            pidfd,
            0usize,
            0usize,
        )
    }
}

/// Platform branch: where `clone(2)`'s argument order is another
/// (s390x, ...), the legacy call is not made: refused like a missing clone3.
#[cfg(all(
    target_os = "linux",
    not(any(target_arch = "x86_64", target_arch = "aarch64"))
))]
unsafe fn legacy_clone(_flags: libc::c_int, _pidfd: *mut libc::c_int) -> libc::c_long {
    // SAFETY: nothing unsafe happens; errno is set as a refused call would.
    unsafe { *libc::__errno_location() = libc::ENOSYS };
    -1
}

#[cfg(target_os = "linux")]
fn spawn_sibling_with(
    request: &SpawnRequest<'_>,
    flavour: CloneCall,
) -> io::Result<Result<Child, io::Error>> {
    // A kernel before 5.2 ignores CLONE_PIDFD in clone(2) and would start a
    // child we could neither watch nor kill: pidfd_open (5.3) is the proof.
    if !has_pidfds() {
        return Ok(Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "no pidfds on this kernel (pidfd_open: Linux 5.3 and later)",
        )));
    }
    let path = CString::new(request.path.as_os_str().as_bytes()).map_err(|_| nul_byte())?;
    let args = c_strings(request.args.iter().cloned())?;
    let env = c_strings(request.env.iter().cloned())?;
    let argv = null_terminated(&args);
    let envp = null_terminated(&env);
    let link = request.link.as_raw_fd();
    let mut mask = SigSet::empty();
    if let Some(signal) = request.blocked {
        mask.add(signal);
    }
    let mask: libc::sigset_t = *mask.as_ref();
    // For a kernel without close_range (before 5.9): what is open now.
    let fallback_close = if has_close_range() {
        Vec::new()
    } else {
        inheritable_descriptors(LINK_FD + 1).unwrap_or_default()
    };
    // The exec error's pipe, above the link's number so that placing the
    // link at 3 cannot overwrite it.
    // (The original is closed when moved: a copy of the write end left
    // open here would keep the read below from ever seeing its end.)
    let (report_read, report_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let report_write = if report_write.as_raw_fd() <= LINK_FD {
        let moved = fcntl(report_write.as_fd(), FcntlArg::F_DUPFD_CLOEXEC(LINK_FD + 1))?;
        drop(report_write);
        // SAFETY: F_DUPFD_CLOEXEC just created this descriptor; nobody else owns it.
        unsafe { OwnedFd::from_raw_fd(moved) }
    } else {
        report_write
    };
    let report = report_write.as_raw_fd();
    let mut pidfd: libc::c_int = -1;
    let clone_args = CloneArgs {
        flags: (libc::CLONE_PARENT | libc::CLONE_PIDFD) as u64,
        pidfd: (&raw mut pidfd) as u64,
        // Must be 0 with CLONE_PARENT (EINVAL otherwise): the child's end
        // is signalled to our parent as ours would be.
        exit_signal: 0,
        ..CloneArgs::default()
    };
    // Every signal blocked across the clone, as posix_spawn does: one
    // that reached the child before its handlers are reset would run this
    // process's handlers there (the library's write to its wake-up pipes,
    // which this process shares).
    let all = SigSet::all();
    let mut before = SigSet::empty();
    pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&all), Some(&mut before))?;
    let mut ret = if flavour == CloneCall::Clone3 {
        // SAFETY: clone3 with a valid, fully initialised `clone_args` of
        // the size passed, no CLONE_VM and no stack: fork semantics, the
        // child runs on a copy of this thread's stack and memory. `pidfd`
        // is a live c_int the kernel writes the pidfd into (in this
        // process only).
        unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &raw const clone_args,
                std::mem::size_of::<CloneArgs>(),
            )
        }
    } else {
        -1
    };
    let mut clone_error = io::Error::last_os_error();
    let mut legacy = false;
    if ret == -1
        && (flavour == CloneCall::Clone
            || matches!(clone_error.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)))
    {
        // No clone3: a kernel before 5.3, or a seccomp filter that cannot
        // look into clone3's arguments and so refuses it with ENOSYS
        // (systemd's RestrictNamespaces=, container runtimes' profiles) or,
        // in older profiles that list allowed calls, EPERM, expecting the
        // caller to use clone(2), whose flags it can check.
        // SAFETY: as clone3 above: fork semantics (no CLONE_VM, no stack:
        // the child runs on a copy of this thread's stack); with
        // CLONE_PIDFD the kernel writes the pidfd into the c_int at the
        // parent_tid argument, which is the third on every architecture
        // `legacy_clone` is built for. The exit signal (the flags' low byte)
        // is 0, as with CLONE_PARENT the child's end is signalled to our
        // parent as ours would be.
        ret = unsafe { legacy_clone(libc::CLONE_PARENT | libc::CLONE_PIDFD, &raw mut pidfd) };
        clone_error = io::Error::last_os_error();
        legacy = true;
    }
    if ret != 0 {
        pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&before), None)?;
    }
    if ret == 0 {
        // The child. SAFETY: only async-signal-safe calls on data prepared
        // above, which the copied memory holds unchanged: sigprocmask,
        // sigaction, fcntl, dup2, close_range, close, execve, write, _exit.
        // Nothing allocates, locks or unwinds; every path ends in execve or
        // _exit.
        unsafe { sibling_child(link, &mask, report, &fallback_close, &path, &argv, &envp) }
    }
    if ret == -1 {
        let error = clone_error;
        return match error.raw_os_error() {
            Some(libc::ENOSYS | libc::EINVAL | libc::EPERM) => Ok(Err(error)),
            _ => Err(error),
        };
    }
    drop(report_write);
    if legacy && flavour == CloneCall::Clone3 {
        tracing::info!(
            "clone3 refused (a seccomp filter such as RestrictNamespaces=, or an old kernel): successor started with clone(2)"
        );
    }
    if pidfd < 0 {
        // Cannot happen where pidfd_open exists (checked above); if it
        // does, the child is not ours to watch: end it, and say so.
        let _ = nix::sys::signal::kill(Pid::from_raw(ret as libc::pid_t), Signal::SIGKILL);
        return Err(io::Error::other(
            "the kernel started the successor but gave no pidfd for it (killed)",
        ));
    }
    // SAFETY: clone3 (or clone) succeeded with CLONE_PIDFD, so the kernel
    // installed a new close-on-exec pidfd at `pidfd` (checked: not -1) in
    // this process, owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let child = Child {
        pid: Pid::from_raw(ret as libc::pid_t),
        pidfd: Some(pidfd),
    };
    // EOF: the exec succeeded (the pipe was close-on-exec); four bytes: its
    // error number, and the child has exited.
    let mut errno_bytes = [0u8; 4];
    let mut got = 0;
    let mut reader = std::fs::File::from(report_read);
    while got < errno_bytes.len() {
        match io::Read::read(&mut reader, &mut errno_bytes[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if got == errno_bytes.len() {
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(
            errno_bytes,
        )));
    }
    Ok(Ok(child))
}

/// Whether the kernel has pidfds for any process (`pidfd_open(2)`, 5.3 and
/// later, with `CLONE_PIDFD` since 5.2 and pollable pidfds), asked once.
#[cfg(target_os = "linux")]
fn has_pidfds() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| own_pidfd().is_some())
}

/// A pidfd of this process (`pidfd_open`), where the kernel has them.
#[cfg(target_os = "linux")]
fn own_pidfd() -> Option<OwnedFd> {
    // SAFETY: pidfd_open with our own pid and no flags returns a new
    // descriptor or -1; nothing else is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0u32) };
    // SAFETY: a non-negative result is a new descriptor owned by nobody else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Whether a pidfd tells a reaped process's exit status
/// (`PIDFD_INFO_EXIT`, Linux 6.15), asked once: the kernel's release, and
/// `PIDFD_GET_INFO` (6.13) answering on our own pidfd. Before 6.15 there
/// is no status to wait for (and before 6.9 a pidfd does not even tell of
/// the reaping), so an ended sibling is reported at once as `Unknown`.
#[cfg(target_os = "linux")]
fn has_pidfd_exit_info() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        let release = nix::sys::utsname::uname()
            .map(|name| name.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut numbers = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse::<u32>().unwrap_or(0));
        let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
        version >= (6, 15) && own_pidfd().is_some_and(|fd| pidfd_info(fd.as_fd(), 0).is_some())
    })
}

/// Whether the kernel has `close_range(2)` (5.9 and later), asked once.
#[cfg(target_os = "linux")]
fn has_close_range() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        let beyond = libc::c_uint::MAX - 1;
        // SAFETY: closes descriptors numbered from `beyond` to `beyond`,
        // which no process can have open (the kernel's limit is far lower):
        // only whether the call exists is learned.
        unsafe { libc::syscall(libc::SYS_close_range, beyond, beyond, 0) == 0 }
    })
}

/// The child side of [`spawn_sibling`], up to execve.
///
/// # Safety
/// Only in the child of a clone without CLONE_VM, with the arguments
/// prepared by `spawn_sibling`.
#[cfg(target_os = "linux")]
unsafe fn sibling_child(
    link: RawFd,
    mask: &libc::sigset_t,
    report: RawFd,
    fallback_close: &[RawFd],
    path: &CString,
    argv: &[*mut libc::c_char],
    envp: &[*mut libc::c_char],
) -> ! {
    // SAFETY: see the caller: each call is async-signal-safe and gets
    // pointers into memory prepared before the clone.
    unsafe {
        // Every signal is blocked (see the caller): reset each one this
        // process handles to its default before any can be delivered here,
        // and SIGPIPE too (the std runtime ignores it; the successor gets
        // the default, as from posix_spawn). Numbers the C library keeps
        // for itself fail with EINVAL, harmlessly.
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        let mut current: libc::sigaction = std::mem::zeroed();
        for signal in 1..libc::SIGRTMAX() + 1 {
            if libc::sigaction(signal, std::ptr::null(), &mut current) == 0
                && (signal == libc::SIGPIPE || current.sa_sigaction != libc::SIG_IGN)
                && current.sa_sigaction != libc::SIG_DFL
            {
                libc::sigaction(signal, &default, std::ptr::null_mut());
            }
        }
        libc::sigprocmask(libc::SIG_SETMASK, mask, std::ptr::null_mut());
        let placed = if link == LINK_FD {
            libc::fcntl(LINK_FD, libc::F_SETFD, 0)
        } else {
            libc::dup2(link, LINK_FD)
        };
        if placed != -1 {
            // Everything above the link but the report pipe (close-on-exec).
            let closed = if report > LINK_FD + 1 {
                libc::syscall(libc::SYS_close_range, LINK_FD + 1, report - 1, 0)
            } else {
                0
            };
            let closed = closed | libc::syscall(libc::SYS_close_range, report + 1, u32::MAX, 0);
            if closed != 0 {
                for &fd in fallback_close {
                    if fd != report {
                        libc::close(fd);
                    }
                }
            }
            libc::execve(path.as_ptr(), argv.as_ptr().cast(), envp.as_ptr().cast());
        }
        let errno = *libc::__errno_location();
        libc::write(report, errno.to_ne_bytes().as_ptr().cast(), 4);
        libc::_exit(127)
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn spawn_sibling(_request: &SpawnRequest<'_>) -> io::Result<Result<Child, io::Error>> {
    Ok(Err(io::Error::from(io::ErrorKind::Unsupported)))
}

/// The `posix_spawn` family returns an error number instead of setting errno.
fn spawn_result(code: libc::c_int) -> io::Result<()> {
    if code == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(code))
    }
}

/// An initialised `posix_spawn_file_actions_t`, destroyed on drop.
struct FileActions(libc::posix_spawn_file_actions_t);

impl FileActions {
    fn new() -> io::Result<FileActions> {
        let mut raw = std::mem::MaybeUninit::uninit();
        // SAFETY: init writes an initialised object into the storage it is
        // given; on failure nothing reads the storage.
        spawn_result(unsafe { libc::posix_spawn_file_actions_init(raw.as_mut_ptr()) })?;
        // SAFETY: init succeeded. The object holds no pointer into itself
        // (glibc: counts and a heap array; macOS: one heap pointer), so it
        // may be moved.
        Ok(FileActions(unsafe { raw.assume_init() }))
    }

    fn dup2(&mut self, from: RawFd, to: RawFd) -> io::Result<()> {
        // SAFETY: `self.0` is initialised; the call only records the action.
        spawn_result(unsafe { libc::posix_spawn_file_actions_adddup2(&mut self.0, from, to) })
    }

    /// Closes, in the successor, every descriptor from `lowest` up.
    #[cfg(not(target_vendor = "apple"))]
    fn close_from(&mut self, lowest: RawFd) -> io::Result<()> {
        if let Some(add_close_from) = close_from_action() {
            // SAFETY: `self.0` is initialised, and the function has the
            // signature `close_from_action` resolved it with.
            return spawn_result(unsafe { add_close_from(&mut self.0, lowest) });
        }
        // Without the call (glibc before 2.34, musl): close each descriptor
        // that would be inherited, as listed now. One that another thread
        // opens without close-on-exec between the listing and the spawn
        // still reaches the successor.
        let inheritable = match inheritable_descriptors(lowest) {
            Ok(fds) => fds,
            Err(err) => {
                tracing::warn!(error = %err, "cannot list open descriptors: a successor may inherit some that are not close-on-exec");
                return Ok(());
            }
        };
        for fd in inheritable {
            // SAFETY: `self.0` is initialised; the call only records the
            // action (closing a descriptor that is gone by then is ignored).
            spawn_result(unsafe { libc::posix_spawn_file_actions_addclose(&mut self.0, fd) })?;
        }
        Ok(())
    }

    /// Keeps `fd` open in the successor despite POSIX_SPAWN_CLOEXEC_DEFAULT.
    #[cfg(target_vendor = "apple")]
    fn inherit(&mut self, fd: RawFd) -> io::Result<()> {
        // SAFETY: `self.0` is initialised; the call only records the action.
        spawn_result(unsafe { posix_spawn_file_actions_addinherit_np(&mut self.0, fd) })
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: `self.0` was initialised and is destroyed once, here.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

#[cfg(target_vendor = "apple")]
unsafe extern "C" {
    /// macOS's file action that exempts a descriptor from
    /// POSIX_SPAWN_CLOEXEC_DEFAULT (`<spawn.h>`); the libc crate lacks it.
    fn posix_spawn_file_actions_addinherit_np(
        actions: *mut libc::posix_spawn_file_actions_t,
        fd: libc::c_int,
    ) -> libc::c_int;
}

/// Whether `fd` is an open descriptor of this process.
#[cfg(target_vendor = "apple")]
fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the flags of a descriptor number; on one
    // that is not open it fails with EBADF.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

#[cfg(not(target_vendor = "apple"))]
type AddCloseFrom =
    unsafe extern "C" fn(*mut libc::posix_spawn_file_actions_t, libc::c_int) -> libc::c_int;

/// glibc's `posix_spawn_file_actions_addclosefrom_np` (2.34 and later),
/// looked up at run time: linking it would stop the library's users from
/// starting on an older glibc at all.
#[cfg(not(target_vendor = "apple"))]
fn close_from_action() -> Option<AddCloseFrom> {
    static RESOLVED: std::sync::OnceLock<Option<AddCloseFrom>> = std::sync::OnceLock::new();
    *RESOLVED.get_or_init(|| {
        // SAFETY: dlsym only looks a NUL-terminated name up in the objects
        // already loaded; RTLD_DEFAULT is a valid pseudo-handle.
        let address = unsafe {
            libc::dlsym(
                libc::RTLD_DEFAULT,
                c"posix_spawn_file_actions_addclosefrom_np".as_ptr(),
            )
        };
        // SAFETY: a symbol of that name is the C library's function, with
        // this signature (`<spawn.h>`: int (posix_spawn_file_actions_t *,
        // int)); a non-null address is a valid function pointer.
        (!address.is_null())
            .then(|| unsafe { std::mem::transmute::<*mut libc::c_void, AddCloseFrom>(address) })
    })
}

/// The descriptors from `lowest` up that are open and not close-on-exec.
#[cfg(not(target_vendor = "apple"))]
fn inheritable_descriptors(lowest: RawFd) -> io::Result<Vec<RawFd>> {
    let listed: Vec<RawFd> = std::fs::read_dir("/dev/fd")?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd >= lowest)
        .collect();
    // The listing's own descriptor is closed by now: F_GETFD fails on it.
    Ok(listed
        .into_iter()
        .filter(|&fd| {
            // SAFETY: F_GETFD only reads the flags of a descriptor number;
            // on one that is not open it fails with EBADF.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            flags != -1 && flags & libc::FD_CLOEXEC == 0
        })
        .collect())
}

/// An initialised `posix_spawnattr_t`, destroyed on drop.
struct SpawnAttributes(libc::posix_spawnattr_t);

impl SpawnAttributes {
    fn new() -> io::Result<SpawnAttributes> {
        let mut raw = std::mem::MaybeUninit::uninit();
        // SAFETY: as for FileActions::new.
        spawn_result(unsafe { libc::posix_spawnattr_init(raw.as_mut_ptr()) })?;
        // SAFETY: init succeeded; the object holds no pointer into itself.
        Ok(SpawnAttributes(unsafe { raw.assume_init() }))
    }

    fn set_sigmask(&mut self, mask: &SigSet) -> io::Result<()> {
        // SAFETY: `self.0` is initialised; the set is copied.
        spawn_result(unsafe { libc::posix_spawnattr_setsigmask(&mut self.0, mask.as_ref()) })
    }

    fn set_sigdefault(&mut self, signals: &SigSet) -> io::Result<()> {
        // SAFETY: `self.0` is initialised; the set is copied.
        spawn_result(unsafe { libc::posix_spawnattr_setsigdefault(&mut self.0, signals.as_ref()) })
    }

    fn set_flags(&mut self, flags: libc::c_int) -> io::Result<()> {
        // Every POSIX_SPAWN_* flag fits the short the call takes.
        let flags = flags as libc::c_short;
        // SAFETY: `self.0` is initialised.
        spawn_result(unsafe { libc::posix_spawnattr_setflags(&mut self.0, flags) })
    }
}

impl Drop for SpawnAttributes {
    fn drop(&mut self) {
        // SAFETY: `self.0` was initialised and is destroyed once, here.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

fn nul_byte() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "path, argument or environment entry contains a NUL byte",
    )
}

fn c_strings(items: impl Iterator<Item = OsString>) -> io::Result<Vec<CString>> {
    items
        .map(|item| CString::new(item.into_vec()).map_err(|_| nul_byte()))
        .collect()
}

/// The `char *const[]` that posix_spawn takes, borrowing `strings`.
fn null_terminated(strings: &[CString]) -> Vec<*mut libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr().cast_mut())
        .chain(std::iter::once(std::ptr::null_mut()))
        .collect()
}

/// A started successor: its pid and, for one started as our parent's child
/// (see [`spawn`]'s `sibling`), a pidfd, the only handle we have on it: no
/// SIGCHLD comes for it, it is not ours to wait for, and its exit status
/// goes to its parent (the service manager).
#[derive(Debug)]
pub(crate) struct Child {
    pub(crate) pid: Pid,
    pidfd: Option<OwnedFd>,
}

impl Child {
    pub(crate) fn raw_pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// Whether it is our parent's child rather than ours.
    pub(crate) fn is_sibling(&self) -> bool {
        self.pidfd.is_some()
    }

    /// What becomes readable when a sibling exits (a child of ours is
    /// watched through SIGCHLD instead).
    pub(crate) fn exit_fd(&self) -> Option<BorrowedFd<'_>> {
        self.pidfd.as_ref().map(AsFd::as_fd)
    }

    /// Its exit status if it has ended (reaped, for a child of ours;
    /// [`ExitStatus::Unknown`] for a sibling); `None` while it runs.
    pub(crate) fn try_reap(&self) -> io::Result<Option<ExitStatus>> {
        match &self.pidfd {
            None => try_reap(self.pid),
            Some(pidfd) => Ok(has_exited(pidfd.as_fd(), Duration::ZERO)?
                .then(|| sibling_exit_status(pidfd.as_fd(), SIBLING_REAP_WAIT))),
        }
    }

    /// Kills it with SIGKILL and waits until it has ended. A sibling is
    /// signalled through its pidfd, which names that process and no other
    /// even once its pid is reused; its end is awaited on the pidfd,
    /// boundedly ([`SIBLING_KILL_WAIT`]).
    pub(crate) fn kill_and_reap(&self) -> io::Result<ExitStatus> {
        let Some(pidfd) = &self.pidfd else {
            return kill_and_reap(self.pid);
        };
        if has_exited(pidfd.as_fd(), Duration::ZERO)? {
            return Ok(sibling_exit_status(pidfd.as_fd(), SIBLING_REAP_WAIT));
        }
        pidfd_send_signal(pidfd.as_fd(), Signal::SIGKILL)?;
        if has_exited(pidfd.as_fd(), SIBLING_KILL_WAIT)? {
            Ok(sibling_exit_status(pidfd.as_fd(), SIBLING_REAP_WAIT))
        } else {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("still running {SIBLING_KILL_WAIT:?} after SIGKILL"),
            ))
        }
    }
}

/// How long a killed sibling may take to end (SIGKILL ends even a stopped
/// process; only one stuck in the kernel takes longer).
const SIBLING_KILL_WAIT: Duration = Duration::from_secs(10);

/// How long an ended sibling's exit status may wait for its parent, the
/// service manager, to reap it: systemd does at once, in its event loop.
const SIBLING_REAP_WAIT: Duration = Duration::from_secs(1);

/// How an ended sibling ended, learned through its pidfd
/// (`PIDFD_GET_INFO` with `PIDFD_INFO_EXIT`, Linux 6.15 and later) once its
/// parent has reaped it (the pidfd then hangs up), waiting up to `wait`
/// for that. [`ExitStatus::Unknown`] on an older kernel, or when the parent
/// has not reaped it in time.
fn sibling_exit_status(pidfd: BorrowedFd<'_>, wait: Duration) -> ExitStatus {
    if !has_pidfd_exit_info() || !is_reaped_within(pidfd, wait) {
        return ExitStatus::Unknown;
    }
    pidfd_exit_code(pidfd)
        .and_then(exit_status)
        .unwrap_or(ExitStatus::Unknown)
}

/// Whether the process a pidfd names has been reaped (the pidfd reports
/// POLLHUP; an exited, unreaped one only POLLIN), waiting up to `wait`.
fn is_reaped_within(pidfd: BorrowedFd<'_>, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let millis = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        // Only POLLHUP (always reported) is asked for: POLLIN, which an
        // exited process's pidfd has until it is reaped, would end the
        // wait at once.
        let mut fds = [PollFd::new(pidfd, PollFlags::empty())];
        match nix::poll::poll(
            &mut fds,
            PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(_)
                if fds[0]
                    .revents()
                    .is_some_and(|r| r.contains(PollFlags::POLLHUP)) =>
            {
                return true;
            }
            Ok(_) | Err(Errno::EINTR) if !left.is_zero() => {}
            Ok(_) | Err(_) => return false,
        }
    }
}

/// The kernel's `struct pidfd_info`, its first version (64 bytes).
#[cfg(target_os = "linux")]
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    /// pid, tgid, ppid, ruid, rgid, euid, egid, suid, sgid, fsuid, fsgid.
    ids: [u32; 11],
    exit_code: i32,
}

/// `PIDFD_GET_INFO`: `_IOWR(0xFF, 11, struct pidfd_info)` (64 bytes).
#[cfg(target_os = "linux")]
const PIDFD_GET_INFO: u32 = (3 << 30) | (64 << 16) | (0xFF << 8) | 11;
/// `PIDFD_INFO_EXIT`: ask for (and, answered, have) the exit status.
#[cfg(target_os = "linux")]
const PIDFD_INFO_EXIT: u64 = 1 << 3;

/// The raw wait status of the reaped process a pidfd names, where the
/// kernel keeps it (6.15 and later).
#[cfg(target_os = "linux")]
fn pidfd_exit_code(pidfd: BorrowedFd<'_>) -> Option<libc::c_int> {
    let info = pidfd_info(pidfd, PIDFD_INFO_EXIT)?;
    (info.mask & PIDFD_INFO_EXIT != 0).then_some(info.exit_code)
}

/// `PIDFD_GET_INFO` on `pidfd`, asking for `mask` (beside what the kernel
/// always gives); `None` where the kernel has no such request (before 6.13)
/// or refuses it.
#[cfg(target_os = "linux")]
fn pidfd_info(pidfd: BorrowedFd<'_>, mask: u64) -> Option<PidfdInfo> {
    const _: () = assert!(std::mem::size_of::<PidfdInfo>() == 64);
    let mut info = PidfdInfo {
        mask,
        ..PidfdInfo::default()
    };
    // SAFETY: PIDFD_GET_INFO on an open pidfd, with a pointer to a live,
    // initialised `struct pidfd_info` of the size the request encodes; the
    // kernel writes at most that many bytes. Older kernels fail (ENOTTY or
    // EINVAL) and write nothing.
    let result = unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_INFO as _, &raw mut info) };
    (result == 0).then_some(info)
}

#[cfg(not(target_os = "linux"))]
fn pidfd_exit_code(_pidfd: BorrowedFd<'_>) -> Option<libc::c_int> {
    None
}

#[cfg(not(target_os = "linux"))]
fn has_pidfd_exit_info() -> bool {
    false
}

/// Whether the process a pidfd names has ended (its pidfd is readable),
/// waiting up to `timeout`.
fn has_exited(pidfd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let mut fds = [PollFd::new(pidfd, PollFlags::POLLIN)];
    loop {
        match nix::poll::poll(
            &mut fds,
            PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(_) => return Ok(fds[0].revents().is_some_and(|r| !r.is_empty())),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(target_os = "linux")]
fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: Signal) -> io::Result<()> {
    // SAFETY: the raw system call (glibc's wrapper exists only from 2.36)
    // with the kernel's argument types: an open pidfd, a signal number, a
    // null siginfo (the kernel fills one as kill(2) would) and no flags.
    let result = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if result == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn pidfd_send_signal(_pidfd: BorrowedFd<'_>, _signal: Signal) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// Reaps `pid` if it has ended; `None` while it still runs.
pub(crate) fn try_reap(pid: Pid) -> io::Result<Option<ExitStatus>> {
    wait(pid, libc::WNOHANG)
}

/// Kills `pid` with SIGKILL and reaps it. SIGKILL also ends a stopped
/// process, so the wait is short and bounded.
///
/// Only a child that is still ours is signalled: one that has ended is
/// reaped without a signal, and one that is not ours any more (reaped by
/// someone else: the wait fails with ECHILD) is left alone, since its pid
/// may name another process by now. An unreaped child's pid cannot be
/// reused, so between the check and the kill it still names that child.
pub(crate) fn kill_and_reap(pid: Pid) -> io::Result<ExitStatus> {
    if let Some(status) = wait(pid, libc::WNOHANG)? {
        return Ok(status);
    }
    match kill(pid, Signal::SIGKILL) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => return Err(e.into()),
    }
    loop {
        if let Some(status) = wait(pid, 0)? {
            return Ok(status);
        }
    }
}

/// `waitpid(2)`, its status decoded here: nix refuses (EINVAL) a status
/// it cannot name, such as death by a real-time signal, after the kernel
/// has already reaped the child.
fn wait(pid: Pid, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
    loop {
        let mut raw: libc::c_int = 0;
        // SAFETY: waitpid writes the status into `raw`, a valid c_int.
        let reaped = unsafe { libc::waitpid(pid.as_raw(), &mut raw, flags) };
        match reaped {
            -1 => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
            0 => return Ok(None),
            _ => match exit_status(raw) {
                Some(status) => return Ok(Some(status)),
                // Stopped under a tracer: it has not ended.
                None if flags & libc::WNOHANG != 0 => return Ok(None),
                None => {}
            },
        }
    }
}

/// How a process ended, from its raw wait status; `None` if it has not.
fn exit_status(raw: libc::c_int) -> Option<ExitStatus> {
    if libc::WIFEXITED(raw) {
        Some(ExitStatus::Exited(libc::WEXITSTATUS(raw)))
    } else if libc::WIFSIGNALED(raw) {
        Some(ExitStatus::Signaled(libc::WTERMSIG(raw)))
    } else {
        None
    }
}

/// Writes on a handshake link without ever raising SIGPIPE: a service may
/// have restored SIGPIPE's default action, and a peer that died must cost it
/// an error, not its life.
pub(crate) struct LinkWriter<'a>(pub BorrowedFd<'a>);

/// Platform branch: Linux has a flag for each send; macOS has none, and
/// [`link_pair`] sets SO_NOSIGPIPE on both ends instead.
#[cfg(not(target_vendor = "apple"))]
const LINK_SEND_FLAGS: MsgFlags = MsgFlags::MSG_NOSIGNAL;
#[cfg(target_vendor = "apple")]
const LINK_SEND_FLAGS: MsgFlags = MsgFlags::empty();

impl io::Write for LinkWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(send(self.0.as_raw_fd(), buf, LINK_SEND_FLAGS)?)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A new handshake link: a connected pair of Unix stream sockets, both ends
/// close-on-exec (and, on macOS, SO_NOSIGPIPE: see [`LinkWriter`]). Also
/// the supervisor's self-pipes, for the same reason.
pub(crate) fn link_pair() -> io::Result<(UnixStream, UnixStream)> {
    let (ours, theirs) = UnixStream::pair()?;
    #[cfg(target_vendor = "apple")]
    for end in [&ours, &theirs] {
        SockRef::from(end).set_nosigpipe(true)?;
    }
    Ok((ours, theirs))
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

/// Who sent the last upgrade signal (0: nobody since it was last taken).
static UPGRADE_SIGNAL_SENDER: AtomicI32 = AtomicI32::new(0);
/// How many upgrade signals arrived.
static UPGRADE_SIGNALS: AtomicU64 = AtomicU64::new(0);

/// How many upgrade signals have arrived so far.
pub(crate) fn upgrade_signals() -> u64 {
    UPGRADE_SIGNALS.load(Ordering::Acquire)
}

/// Installs the handler of the upgrade signal: it notes who sent it (see
/// [`take_upgrade_signal_sender`]) and wakes the supervisor through `wake`,
/// a non-blocking socket it keeps until the handler is unregistered.
pub(crate) fn register_upgrade_signal(
    signal: Signal,
    wake: std::os::unix::net::UnixStream,
) -> io::Result<signal_hook_registry::SigId> {
    let action = move |info: &libc::siginfo_t| {
        // SAFETY: every siginfo_t the kernel delivers for a signal sent by
        // kill(2), sigqueue(3) or the kernel itself has si_pid readable
        // (0 when no process sent it); reading it is a plain load.
        let sender = unsafe { info.si_pid() };
        UPGRADE_SIGNAL_SENDER.store(sender, Ordering::Relaxed);
        UPGRADE_SIGNALS.fetch_add(1, Ordering::AcqRel);
        // SAFETY: write(2) is async-signal-safe; the buffer is a live
        // one-byte array, and `wake` is owned by this closure, so its
        // descriptor is open for as long as the handler is registered. A
        // full pipe (EAGAIN) already wakes the supervisor.
        unsafe { libc::write(wake.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
    };
    // SAFETY: the action does only async-signal-safe work (an atomic store
    // and write(2)), allocates nothing and takes no lock; signal-hook-registry
    // chains it with any other handler of the signal.
    unsafe { signal_hook_registry::register_sigaction(signal as libc::c_int, action) }
}

/// The process that sent the upgrade signal last, once.
pub(crate) fn take_upgrade_signal_sender() -> Option<i32> {
    Some(UPGRADE_SIGNAL_SENDER.swap(0, Ordering::Relaxed)).filter(|pid| *pid > 0)
}

/// A process, told from a later one with its pid by its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcessId {
    pub(crate) pid: i32,
    start: u64,
}

/// `pid`, if it is this process's sibling: a child of the same parent, as
/// an `ExecReload=` command and the main process are both children of
/// systemd. Linux reads `/proc/PID/stat`; elsewhere no service manager
/// reads a PID file after a reload command, and this says `None`.
pub(crate) fn sibling(pid: i32) -> Option<ProcessId> {
    let (parent, start) = proc_stat(pid)?;
    (parent == nix::unistd::getppid().as_raw()).then_some(ProcessId { pid, start })
}

/// Whether `process` has been reaped (a zombie still counts as there: its
/// parent has not yet seen it exit).
pub(crate) fn is_reaped(process: ProcessId) -> bool {
    proc_stat(process.pid).is_none_or(|(_, start)| start != process.start)
}

/// The parent and start time of `pid`, from `/proc/PID/stat` (Linux).
#[cfg(target_os = "linux")]
fn proc_stat(pid: i32) -> Option<(i32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: count from after it.
    let (_, fields) = stat.rsplit_once(") ")?;
    let fields: Vec<&str> = fields.split_whitespace().collect();
    // Field 3 is the state; 4 the parent; 22 the start time.
    let parent = fields.get(1)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((parent, start))
}

#[cfg(not(target_os = "linux"))]
fn proc_stat(_pid: i32) -> Option<(i32, u64)> {
    None
}

/// Runs `hook` when the process exits through `exit(3)` (a return from
/// `main` or `std::process::exit`), after everything else the program did:
/// [`atexit(3)`](https://man7.org/linux/man-pages/man3/atexit.3.html).
pub(crate) fn at_exit(hook: extern "C" fn()) -> io::Result<()> {
    // SAFETY: atexit only records the function pointer; `hook` is a plain
    // `extern "C" fn()` with a 'static lifetime, and the callers' hooks
    // catch every panic, so none unwinds into libc.
    if unsafe { libc::atexit(hook) } == 0 {
        Ok(())
    } else {
        Err(io::Error::other("atexit: no room for another handler"))
    }
}

/// Atomically exchanges the files at `a` and `b` (both must exist):
/// `renameat2(RENAME_EXCHANGE)`, Linux 3.15 and later, on file systems that
/// support it (ext4, xfs, btrfs, tmpfs; others say `EINVAL`).
#[cfg(target_os = "linux")]
pub(crate) fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    let a = CString::new(a.as_os_str().as_bytes()).map_err(|_| nul_byte())?;
    let b = CString::new(b.as_os_str().as_bytes()).map_err(|_| nul_byte())?;
    // SAFETY: both paths are NUL-terminated strings that outlive the call,
    // which only reads them; the raw system call is used because glibc's
    // wrapper exists only from 2.28 on, and the arguments have the kernel's
    // types (int, const char *, int, const char *, unsigned int).
    let result = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::net::UnixStream;

    fn listener() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").unwrap()
    }

    fn borrowed(listeners: &[TcpListener]) -> Vec<BorrowedFd<'_>> {
        listeners.iter().map(AsFd::as_fd).collect()
    }

    /// A port nobody holds any more refuses connections: a listener whose
    /// every descriptor was closed, the received ones included.
    fn assert_closed_everywhere(port: u16) {
        let refused = TcpStream::connect(("127.0.0.1", port))
            .map(|_| ())
            .unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
    }

    /// Lets this test process hold `n` more descriptors (macOS starts
    /// processes with a soft limit of 256).
    fn allow_descriptors(n: u64) {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let wanted = (soft + n).min(hard);
        if wanted > soft {
            setrlimit(Resource::RLIMIT_NOFILE, wanted, hard).unwrap();
        }
    }

    #[test]
    fn passes_more_descriptors_than_fit_in_one_message() {
        allow_descriptors(1024);
        let listeners: Vec<TcpListener> =
            (0..FDS_PER_MESSAGE * 3 + 5).map(|_| listener()).collect();
        let (ours, theirs) = UnixStream::pair().unwrap();
        send_fds(ours.as_fd(), theirs.as_fd(), &borrowed(&listeners)).unwrap();
        let received = receive_fds(theirs.as_raw_fd(), listeners.len()).unwrap();
        assert_eq!(received.len(), listeners.len());
        for (sent, got) in listeners.iter().zip(&received) {
            // The same socket, in the order sent, close-on-exec here.
            assert_eq!(
                local_addr(got).unwrap().as_socket(),
                Some(sent.local_addr().unwrap())
            );
            let flags = fcntl(got.as_fd(), FcntlArg::F_GETFD).unwrap();
            assert!(FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC));
        }
    }

    /// The most a handover can name, all queued before anyone reads: the
    /// link's buffers are sized for them, and sending never blocks.
    #[test]
    fn the_most_descriptors_a_handover_names_fit_on_the_link() {
        let count = crate::wire::MAX_FDS;
        allow_descriptors(2 * count as u64 + 64);
        let sent = listener();
        let copies = vec![sent.as_fd(); count];
        let (ours, theirs) = UnixStream::pair().unwrap();
        // As small as the systems allow (macOS starts at 8 KiB): what the
        // messages need must come from send_fds.
        SockRef::from(&ours).set_send_buffer_size(4096).unwrap();
        SockRef::from(&theirs).set_recv_buffer_size(4096).unwrap();
        send_fds(ours.as_fd(), theirs.as_fd(), &copies).unwrap();
        let received = receive_fds(theirs.as_raw_fd(), count).unwrap();
        assert_eq!(received.len(), count);
        let addr = sent.local_addr().unwrap();
        assert!(
            received
                .iter()
                .all(|fd| local_addr(fd).unwrap().as_socket() == Some(addr))
        );
    }

    #[test]
    fn fewer_descriptors_than_named_is_an_error_and_closes_what_came() {
        let sent = listener();
        let port = sent.local_addr().unwrap().port();
        let (ours, theirs) = UnixStream::pair().unwrap();
        send_fds(ours.as_fd(), theirs.as_fd(), &[sent.as_fd()]).unwrap();
        drop(sent);
        let err = receive_fds(theirs.as_raw_fd(), 2).unwrap_err();
        assert_eq!(
            err,
            DescriptorProblem::Receive(ReceiveError::TooFew {
                expected: 2,
                received: 1
            })
        );
        assert_eq!(
            err.to_string(),
            "only 1 of 2 descriptors were waiting on it"
        );
        drop((ours, theirs));
        assert_closed_everywhere(port);
    }

    #[test]
    fn more_descriptors_than_named_is_an_error_and_closes_them_all() {
        let sent = [listener(), listener()];
        let ports: Vec<u16> = sent
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        let (ours, theirs) = UnixStream::pair().unwrap();
        send_fds(ours.as_fd(), theirs.as_fd(), &borrowed(&sent)).unwrap();
        drop(sent);
        let err = receive_fds(theirs.as_raw_fd(), 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "it carried 2 descriptors, the inheritance names 1"
        );
        drop((ours, theirs));
        for port in ports {
            assert_closed_everywhere(port);
        }
    }

    #[test]
    fn a_closed_link_or_another_byte_is_an_error() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(ours);
        let err = receive_fds(theirs.as_raw_fd(), 1).unwrap_err();
        assert_eq!(err.to_string(), "it was closed after 0 of 1 descriptors");

        let (mut ours, theirs) = UnixStream::pair().unwrap();
        io::Write::write_all(&mut ours, b"R").unwrap();
        let err = receive_fds(theirs.as_raw_fd(), 1).unwrap_err();
        assert_eq!(
            err,
            DescriptorProblem::Receive(ReceiveError::UnexpectedByte { byte: b'R' })
        );
        assert_eq!(
            err.to_string(),
            "it carried byte 0x52 instead of descriptors"
        );
    }

    #[test]
    fn a_link_that_is_not_a_socket_is_an_error() {
        let file = tempfile::tempfile().unwrap();
        let err = receive_fds(file.as_raw_fd(), 1).unwrap_err();
        assert_eq!(
            err,
            DescriptorProblem::NotASocket {
                found: FoundObject::RegularFile
            }
        );
        assert_eq!(err.to_string(), "expected a socket, found a regular file");
    }

    #[test]
    fn no_descriptors_named_reads_nothing_from_the_link() {
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        io::Write::write_all(&mut ours, b"state").unwrap();
        assert!(receive_fds(theirs.as_raw_fd(), 0).unwrap().is_empty());
        let mut rest = [0u8; 5];
        io::Read::read_exact(&mut &theirs, &mut rest).unwrap();
        assert_eq!(&rest, b"state");
    }

    /// A descriptor of this process that is not close-on-exec, at `at` or
    /// above, closed on drop.
    fn inheritable_copy(of: &impl AsFd, at: RawFd) -> OwnedFd {
        // SAFETY: F_DUPFD duplicates an open descriptor to a new number,
        // without close-on-exec; the new number is owned by the result alone.
        let fd = unsafe { libc::fcntl(of.as_fd().as_raw_fd(), libc::F_DUPFD, at) };
        assert!(fd >= at, "{}", io::Error::last_os_error());
        // SAFETY: just created above, owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    /// The successor gets stdio and the link, not the descriptors of its
    /// parent that are not close-on-exec. `ls` lists its own: stdio, the
    /// link, and its directory at the lowest free number, 4.
    #[test]
    fn a_successor_inherits_only_stdio_and_the_link() {
        let file = tempfile::tempfile().unwrap();
        let low = inheritable_copy(&file, 0);
        let high = inheritable_copy(&file, 200);
        let (ours, theirs) = UnixStream::pair().unwrap();
        let request = SpawnRequest {
            path: Path::new("/bin/sh"),
            args: &["sh".into(), "-c".into(), "exec ls /dev/fd >&3".into()],
            env: Vec::new(),
            link: theirs.as_fd(),
            blocked: None,
        };
        let pid = spawn(&request, false).unwrap().pid;
        drop(theirs);
        let mut listing = String::new();
        io::Read::read_to_string(&mut &ours, &mut listing).unwrap();
        assert_eq!(wait(pid, 0).unwrap(), Some(ExitStatus::Exited(0)));
        let listed: Vec<&str> = listing.split_whitespace().collect();
        assert_eq!(
            listed,
            ["0", "1", "2", "3", "4"],
            "not inherited: {} and {}",
            low.as_raw_fd(),
            high.as_raw_fd()
        );
    }

    /// A sibling successor: our parent's child from birth, with the same
    /// descriptors (stdio, the link, and `ls`'s directory at 4) as one of
    /// ours; its end is seen on its pidfd, with no status. (It is left
    /// for our parent, the test runner's, to reap.)
    /// The same, through `clone(2)`: what runs where clone3 is refused
    /// with ENOSYS (systemd's `RestrictNamespaces=`).
    #[cfg(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    #[test]
    fn a_sibling_started_by_the_older_clone_call_is_our_parents_child() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let args = ["sh".into(), "-c".into(), "echo $PPID >&3".into()];
        let request = SpawnRequest {
            path: Path::new("/bin/sh"),
            args: &args,
            env: Vec::new(),
            link: theirs.as_fd(),
            blocked: None,
        };
        let child = spawn_sibling_with(&request, CloneCall::Clone)
            .unwrap()
            .expect("clone(2) with CLONE_PARENT | CLONE_PIDFD refused");
        assert!(child.is_sibling());
        let missing = SpawnRequest {
            path: Path::new("/nonexistent/successor"),
            ..request
        };
        let err = spawn_sibling_with(&missing, CloneCall::Clone).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        drop(theirs);
        let mut output = String::new();
        io::Read::read_to_string(&mut &ours, &mut output).unwrap();
        let parent: i32 = output.trim().parse().unwrap();
        assert_eq!(parent, nix::unistd::getppid().as_raw());
        assert!(has_exited(child.exit_fd().unwrap(), Duration::from_secs(10)).unwrap());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_sibling_successor_is_our_parents_child_with_only_stdio_and_the_link() {
        let file = tempfile::tempfile().unwrap();
        let high = inheritable_copy(&file, 200);
        let (ours, theirs) = UnixStream::pair().unwrap();
        let request = SpawnRequest {
            path: Path::new("/bin/sh"),
            args: &[
                "sh".into(),
                "-c".into(),
                "echo $PPID >&3; exec ls /dev/fd >&3".into(),
            ],
            env: Vec::new(),
            link: theirs.as_fd(),
            blocked: None,
        };
        let child = spawn(&request, true).unwrap();
        assert!(child.is_sibling(), "clone3 refused here");
        drop(theirs);
        let mut output = String::new();
        io::Read::read_to_string(&mut &ours, &mut output).unwrap();
        let mut words = output.split_whitespace();
        let parent: i32 = words.next().unwrap().parse().unwrap();
        assert_eq!(parent, nix::unistd::getppid().as_raw());
        let listed: Vec<&str> = words.collect();
        assert_eq!(
            listed,
            ["0", "1", "2", "3", "4"],
            "not inherited: {}",
            high.as_raw_fd()
        );
        let exit = child.exit_fd().unwrap();
        assert!(has_exited(exit, Duration::from_secs(10)).unwrap());
        assert_eq!(child.try_reap().unwrap(), Some(ExitStatus::Unknown));
        assert_eq!(
            wait(child.pid, libc::WNOHANG).unwrap_err().raw_os_error(),
            Some(libc::ECHILD),
            "not ours to wait for"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_sibling_is_killed_through_its_pidfd_and_an_exec_error_is_returned() {
        let (_ours, theirs) = UnixStream::pair().unwrap();
        let args = ["sleep".into(), "30".into()];
        let request = SpawnRequest {
            path: Path::new("/bin/sleep"),
            args: &args,
            env: Vec::new(),
            link: theirs.as_fd(),
            blocked: Some(Signal::SIGHUP),
        };
        let child = spawn(&request, true).unwrap();
        assert_eq!(child.try_reap().unwrap(), None);
        assert_eq!(child.kill_and_reap().unwrap(), ExitStatus::Unknown);

        let missing = SpawnRequest {
            path: Path::new("/nonexistent/successor"),
            ..request
        };
        let err = spawn(&missing, true).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    }

    /// Where the C library cannot close everything above the link in one
    /// file action, these are the descriptors closed one by one.
    #[cfg(not(target_vendor = "apple"))]
    #[test]
    fn inheritable_descriptors_are_those_open_without_close_on_exec() {
        let file = tempfile::tempfile().unwrap();
        let inheritable = inheritable_copy(&file, 100);
        let listed = inheritable_descriptors(LINK_FD + 1).unwrap();
        assert!(listed.contains(&inheritable.as_raw_fd()), "{listed:?}");
        assert!(!listed.contains(&file.as_raw_fd()), "close-on-exec");
        assert!(listed.iter().all(|&fd| fd > LINK_FD), "{listed:?}");
    }

    /// SIGPIPE, blocked in this thread, would stay pending here if a write
    /// raised it (Linux keeps a blocked signal pending even when ignored).
    #[test]
    fn writing_on_a_link_whose_peer_is_gone_raises_no_sigpipe() {
        let (ours, theirs) = link_pair().unwrap();
        drop(theirs);
        let mut pipe_only = SigSet::empty();
        pipe_only.add(Signal::SIGPIPE);
        pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&pipe_only), None).unwrap();
        let written = io::Write::write_all(&mut LinkWriter(ours.as_fd()), b"R");
        let mut pending = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigpending fills the set it is given.
        assert_eq!(unsafe { libc::sigpending(pending.as_mut_ptr()) }, 0);
        // SAFETY: the set was just filled by sigpending.
        let raised = unsafe { libc::sigismember(pending.as_ptr(), libc::SIGPIPE) } == 1;
        // If it was raised, it is delivered now, and ignored (the test
        // runtime ignores SIGPIPE).
        pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&pipe_only), None).unwrap();
        assert_eq!(written.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        assert!(!raised, "the write raised SIGPIPE");
    }

    /// nix cannot name a real-time signal, and failed after the kernel had
    /// already reaped the process.
    #[cfg(target_os = "linux")]
    #[test]
    fn death_by_a_real_time_signal_is_an_exit_status() {
        let signal = libc::SIGRTMIN() + 2;
        let (_ours, theirs) = UnixStream::pair().unwrap();
        let request = SpawnRequest {
            path: Path::new("/bin/sh"),
            args: &[
                "sh".into(),
                "-c".into(),
                format!("kill -{signal} $$").into(),
            ],
            env: Vec::new(),
            link: theirs.as_fd(),
            blocked: None,
        };
        let pid = spawn(&request, false).unwrap().pid;
        assert_eq!(wait(pid, 0).unwrap(), Some(ExitStatus::Signaled(signal)));
        assert_eq!(
            ExitStatus::Signaled(signal).to_string(),
            format!("killed by signal {signal}")
        );
    }
}
