//! Named descriptors: what a generation hands to its successor.
//!
//! Invariant: every descriptor held here is close-on-exec, and the registry
//! owns it until the process exits or the name is removed; callers get
//! duplicates. A name maps to exactly one kind for its whole life: asking for
//! it as another kind is an error, never a mix-up.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, Socket, Type};

use crate::error::{Error, Result};
use crate::kind::Kind;
use crate::sys;
use crate::wire::{self, InheritedFd};

struct Entry {
    kind: Kind,
    fd: OwnedFd,
    /// Inherited and not yet asked for by this generation.
    unclaimed: bool,
    /// The socket path this generation serves (removed on a final stop).
    unix_path: Option<PathBuf>,
    /// An internet socket's local address, read once. (Kept small: a
    /// successor builds one entry per inherited descriptor at startup, and
    /// every fresh page it touches is a page fault.)
    inet: Option<SocketAddr>,
    /// Passed by systemd's socket activation: the name decides, whatever
    /// address the service's configuration gives.
    activated: bool,
    /// Taken by its address or as the only one of its kind, not by name
    /// (see [`Registry::claim_activated`]).
    guessed: bool,
}

/// The named descriptors of one generation.
#[derive(Default)]
pub(crate) struct Registry {
    entries: BTreeMap<String, Entry>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.entries
                    .iter()
                    .map(|(name, e)| (name, (e.kind, e.fd.as_raw_fd()))),
            )
            .finish()
    }
}

impl Registry {
    /// Receives the descriptors the parent named on the handshake link,
    /// checks that each is of the kind the parent claims, and adopts the
    /// link. On error the received descriptors are closed and the link is
    /// left alone: a tampered environment may name a descriptor this process
    /// uses for something else.
    pub(crate) fn adopt(inherited: Vec<InheritedFd>, link: RawFd) -> Result<(Registry, OwnedFd)> {
        let link_error = |problem| Error::InheritedDescriptor {
            name: "(handshake link)".into(),
            fd: link,
            problem,
        };
        let fds = sys::receive_fds(link, inherited.len()).map_err(link_error)?;
        let mut registry = Registry::default();
        for (entry, fd) in inherited.into_iter().zip(fds) {
            let local = sys::check_kind(fd.as_fd(), entry.kind).map_err(|problem| {
                Error::InheritedDescriptor {
                    name: entry.name.clone(),
                    fd: fd.as_raw_fd(),
                    problem,
                }
            })?;
            registry.insert_inherited(entry, fd, local);
        }
        let link = sys::adopt(&[link])
            .map_err(|e| Error::io("marking the handshake link close-on-exec", e))?
            .pop()
            .ok_or_else(|| {
                Error::io("adopting the handshake link", std::io::ErrorKind::NotFound)
            })?;
        Ok((registry, link))
    }

    /// Adopts sockets passed by systemd's socket activation, whose kinds are
    /// found out here (the names come from `LISTEN_FDNAMES`). On error
    /// nothing has been adopted and nothing is closed.
    pub(crate) fn adopt_activated(passed: &[(String, RawFd)]) -> Result<Registry> {
        let mut inherited = Vec::with_capacity(passed.len());
        for (name, fd) in passed {
            let (kind, local) = match sys::inspect(*fd) {
                Ok(Some((Some(kind), local))) => (kind, Some(local)),
                Ok(_) => (Kind::Fd, None),
                Err(problem) => {
                    return Err(Error::InheritedDescriptor {
                        name: name.clone(),
                        fd: *fd,
                        problem,
                    });
                }
            };
            let entry = InheritedFd {
                name: name.clone(),
                kind,
                activated: true,
            };
            inherited.push((entry, local));
        }
        let numbers: Vec<RawFd> = passed.iter().map(|(_, fd)| *fd).collect();
        let adopted = sys::adopt(&numbers)
            .map_err(|e| Error::io("marking activated sockets close-on-exec", e))?;
        let mut registry = Registry::default();
        for ((entry, local), fd) in inherited.into_iter().zip(adopted) {
            registry.insert_inherited(entry, fd, local);
        }
        // systemd passes blocking sockets; every socket this library hands
        // out is non-blocking, ready for tokio. (Inherited from a parent
        // generation, they already are: the flag belongs to the socket.)
        for entry in registry.entries.values().filter(|e| e.kind != Kind::Fd) {
            socket2::SockRef::from(&entry.fd)
                .set_nonblocking(true)
                .map_err(|e| Error::io("making an activated socket non-blocking", e))?;
        }
        Ok(registry)
    }

    fn insert_inherited(&mut self, entry: InheritedFd, fd: OwnedFd, local: Option<SockAddr>) {
        // A final stop in this generation removes the path it now serves,
        // unless systemd made it (the socket unit owns the file).
        let unix_path = local
            .as_ref()
            .filter(|_| !entry.activated)
            .and_then(|addr| addr.as_pathname().map(Path::to_path_buf));
        self.entries.insert(
            entry.name,
            Entry {
                kind: entry.kind,
                fd,
                unclaimed: true,
                unix_path,
                inet: local.as_ref().and_then(SockAddr::as_socket),
                activated: entry.activated,
                guessed: false,
            },
        );
    }

    /// Descriptors to hand to a successor, in a fixed order: name, kind,
    /// number, and whether systemd passed it.
    pub(crate) fn handed_on(&self) -> impl Iterator<Item = (&str, Kind, BorrowedFd<'_>, bool)> {
        self.entries
            .iter()
            .map(|(name, e)| (name.as_str(), e.kind, e.fd.as_fd(), e.activated))
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Closes every descriptor held for the next generations: this one
    /// will hand nothing on any more.
    pub(crate) fn release_all(&mut self) {
        self.entries.clear();
    }

    /// Closes what the parent handed over but this generation never asked
    /// for (a listener its new configuration no longer has), and says so:
    /// a socket systemd passed that nobody claimed at WARN, with the fix,
    /// since the service then serves elsewhere than systemd listens.
    pub(crate) fn close_unclaimed(&mut self, generation: u64) {
        let unclaimed: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| e.unclaimed)
            .map(|(name, _)| name.clone())
            .collect();
        let mut closed = Vec::new();
        for name in unclaimed {
            let Some(entry) = self.entries.remove(&name) else {
                continue;
            };
            if entry.activated {
                tracing::warn!(
                    generation,
                    name,
                    kind = %entry.kind,
                    address = %describe_address(&entry),
                    "systemd passed this socket but the service asked for no socket of that name, address or kind: closed. \
                     Name it as the service does (FileDescriptorName= in the .socket unit, --fdname= for systemd-socket-activate)"
                );
            } else {
                closed.push(name);
            }
        }
        if !closed.is_empty() {
            tracing::info!(generation, names = ?closed, "closed inherited descriptors this generation did not ask for");
        }
        for (name, entry) in &self.entries {
            let same_kind = self
                .entries
                .values()
                .filter(|e| e.kind == entry.kind)
                .count();
            if entry.guessed && same_kind > 1 {
                tracing::warn!(
                    generation,
                    name,
                    address = %describe_address(entry),
                    "the socket systemd passed without a name was taken as {name:?}, but the service asked for {same_kind} of its kind: \
                     name them (FileDescriptorName=, --fdname=) so that each goes where it belongs"
                );
            }
        }
    }

    /// The Unix socket paths this registry serves, for removal on a final stop.
    pub(crate) fn unix_paths(&self) -> Vec<PathBuf> {
        self.entries
            .values()
            .filter_map(|e| e.unix_path.clone())
            .collect()
    }

    /// The inherited descriptor under `name`, if it is of `kind` and passes
    /// `matches`; else `None` (it is then replaced by the caller).
    fn claim(
        &mut self,
        name: &str,
        kind: Kind,
        matches: impl Fn(&Entry) -> bool,
    ) -> Result<Option<OwnedFd>> {
        wire::check_name(name).map_err(|problem| Error::InvalidName {
            name: name.into(),
            problem,
        })?;
        if !self.entries.contains_key(name) && !self.claim_activated(name, kind, &matches) {
            return Ok(None);
        }
        let Some(entry) = self.entries.get_mut(name) else {
            return Ok(None);
        };
        if entry.kind != kind {
            return Err(Error::WrongKind {
                name: name.into(),
                expected: kind,
                found: entry.kind,
            });
        }
        if !entry.activated && !matches(entry) {
            tracing::info!(
                name,
                "address changed: binding a new socket instead of the inherited one"
            );
            self.entries.remove(name);
            return Ok(None);
        }
        entry.unclaimed = false;
        duplicate(&entry.fd).map(Some)
    }

    /// Nothing goes by `name`: a socket systemd passed under another name
    /// is the one asked for if it is unclaimed, of `kind`, and either on the
    /// address asked for or the only one of its kind that systemd passed,
    /// without a name of its own (`unknown`, or the socket unit's name: a
    /// `.socket` unit without `FileDescriptorName=`, or
    /// `systemd-socket-activate` without `--fdname=`), as `listenfd` users
    /// expect. It is filed under `name` from then on, also for successors.
    fn claim_activated(
        &mut self,
        name: &str,
        kind: Kind,
        matches: &impl Fn(&Entry) -> bool,
    ) -> bool {
        if kind == Kind::Fd {
            // Only sockets have an address to go by.
            return false;
        }
        let candidates = || {
            self.entries
                .iter()
                .filter(move |(_, e)| e.activated && e.kind == kind)
        };
        let by_address = candidates()
            .find(|(_, e)| e.unclaimed && matches(e))
            .map(|(found, _)| found.clone());
        let (found, how) = match by_address {
            Some(found) => (found, "its address is the one asked for"),
            None => {
                let mut all = candidates();
                match (all.next(), all.next()) {
                    (Some((found, e)), None) if e.unclaimed && !has_own_name(found) => (
                        found.clone(),
                        "it is the only one of its kind systemd passed, and has no name of its own",
                    ),
                    _ => return false,
                }
            }
        };
        let Some(mut entry) = self.entries.remove(&found) else {
            return false;
        };
        tracing::info!(
            name,
            passed_as = found,
            address = %describe_address(&entry),
            "taking the socket systemd passed as {found:?} for {name:?}: {how}"
        );
        entry.guessed = true;
        self.entries.insert(name.to_owned(), entry);
        true
    }

    fn insert(
        &mut self,
        name: &str,
        kind: Kind,
        fd: OwnedFd,
        unix_path: Option<PathBuf>,
    ) -> Result<OwnedFd> {
        let copy = duplicate(&fd)?;
        let inet = if kind == Kind::TcpListener || kind == Kind::Udp {
            sys::local_addr(&fd).ok().and_then(|addr| addr.as_socket())
        } else {
            None
        };
        self.entries.insert(
            name.into(),
            Entry {
                kind,
                fd,
                unclaimed: false,
                unix_path,
                inet,
                activated: false,
                guessed: false,
            },
        );
        Ok(copy)
    }

    /// The TCP listener `name`: inherited, or new (then `configure` runs
    /// on it before it binds).
    pub(crate) fn tcp_listener(
        &mut self,
        name: &str,
        addr: SocketAddr,
        configure: &mut dyn FnMut(&mut NewSocket<'_>) -> std::io::Result<()>,
    ) -> Result<OwnedFd> {
        if let Some(fd) = self.claim(name, Kind::TcpListener, |e| same_inet_addr(e.inet, addr))? {
            return Ok(fd);
        }
        let bind_err = |source| Error::Bind {
            name: name.into(),
            addr: addr.to_string(),
            source,
        };
        let socket =
            Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(bind_err)?;
        socket.set_reuse_address(true).map_err(bind_err)?;
        let mut new = NewSocket {
            fd: std::os::fd::AsFd::as_fd(&socket),
            backlog: LISTEN_BACKLOG,
        };
        configure(&mut new).map_err(bind_err)?;
        let backlog = new.backlog;
        socket.bind(&addr.into()).map_err(bind_err)?;
        socket.listen(backlog).map_err(bind_err)?;
        socket.set_nonblocking(true).map_err(bind_err)?;
        self.insert(name, Kind::TcpListener, socket.into(), None)
    }

    /// The UDP socket `name`: inherited, or new (then `configure` runs on
    /// it before it binds).
    pub(crate) fn udp_socket(
        &mut self,
        name: &str,
        addr: SocketAddr,
        configure: &mut dyn FnMut(&mut NewSocket<'_>) -> std::io::Result<()>,
    ) -> Result<OwnedFd> {
        if let Some(fd) = self.claim(name, Kind::Udp, |e| same_inet_addr(e.inet, addr))? {
            return Ok(fd);
        }
        let bind_err = |source| Error::Bind {
            name: name.into(),
            addr: addr.to_string(),
            source,
        };
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None).map_err(bind_err)?;
        let mut new = NewSocket {
            fd: std::os::fd::AsFd::as_fd(&socket),
            backlog: 0,
        };
        configure(&mut new).map_err(bind_err)?;
        socket.bind(&addr.into()).map_err(bind_err)?;
        socket.set_nonblocking(true).map_err(bind_err)?;
        self.insert(name, Kind::Udp, socket.into(), None)
    }

    pub(crate) fn unix_socket(&mut self, name: &str, kind: Kind, path: &Path) -> Result<OwnedFd> {
        self.unix_socket_bound(name, kind, path).map(|(fd, _)| fd)
    }

    /// [`unix_socket`](Self::unix_socket), and whether it bound a new
    /// socket (rather than handing out one inherited or taken before).
    pub(crate) fn unix_socket_bound(
        &mut self,
        name: &str,
        kind: Kind,
        path: &Path,
    ) -> Result<(OwnedFd, bool)> {
        let same_path = |e: &Entry| {
            e.unix_path.as_deref() == Some(path)
                || (e.activated
                    && sys::local_addr(&e.fd)
                        .ok()
                        .is_some_and(|addr| addr.as_pathname() == Some(path)))
        };
        if let Some(fd) = self.claim(name, kind, same_path)? {
            return Ok((fd, false));
        }
        let bind_err = |source| Error::Bind {
            name: name.into(),
            addr: path.display().to_string(),
            source,
        };
        let ty = if kind == Kind::UnixListener {
            Type::STREAM
        } else {
            Type::DGRAM
        };
        let socket = Socket::new(Domain::UNIX, ty, None).map_err(bind_err)?;
        let addr = SockAddr::unix(path).map_err(bind_err)?;
        if let Err(err) = socket.bind(&addr) {
            if err.kind() != std::io::ErrorKind::AddrInUse || !is_stale_socket(path, ty) {
                return Err(bind_err(err));
            }
            // A socket file left behind by a process that is gone: nobody
            // answers on it, so it is safe to replace.
            tracing::info!(name, path = %path.display(), "removing stale socket file");
            std::fs::remove_file(path).map_err(bind_err)?;
            socket.bind(&addr).map_err(bind_err)?;
        }
        if kind == Kind::UnixListener {
            socket.listen(LISTEN_BACKLOG).map_err(bind_err)?;
        }
        socket.set_nonblocking(true).map_err(bind_err)?;
        self.insert(name, kind, socket.into(), Some(path.to_path_buf()))
            .map(|fd| (fd, true))
    }

    pub(crate) fn add_fd(&mut self, name: &str, fd: &impl AsFd) -> Result<()> {
        wire::check_name(name).map_err(|problem| Error::InvalidName {
            name: name.into(),
            problem,
        })?;
        if let Some(existing) = self.entries.get(name) {
            if existing.kind != Kind::Fd {
                return Err(Error::WrongKind {
                    name: name.into(),
                    expected: Kind::Fd,
                    found: existing.kind,
                });
            }
        }
        let owned = duplicate(fd)?;
        self.insert(name, Kind::Fd, owned, None).map(drop)
    }

    pub(crate) fn fd(&mut self, name: &str) -> Result<Option<OwnedFd>> {
        self.claim(name, Kind::Fd, |_| true)
    }

    pub(crate) fn remove(&mut self, name: &str) -> bool {
        self.entries.remove(name).is_some()
    }
}

/// Backlog for listeners the library creates: the kernel caps it at
/// `somaxconn`; a deep queue is what carries clients through a handover.
const LISTEN_BACKLOG: i32 = 4096;

/// A socket the library has just created for a listener, before it binds:
/// see [`Upgrader::tcp_listener_with`](crate::Upgrader::tcp_listener_with).
/// Set options on it through its descriptor (`socket2::SockRef::from(&socket)`,
/// or `nix::sys::socket::setsockopt`).
#[derive(Debug)]
pub struct NewSocket<'a> {
    fd: BorrowedFd<'a>,
    backlog: i32,
}

impl NewSocket<'_> {
    /// The `listen(2)` backlog a TCP listener will get (default 4096; the
    /// kernel caps it at `net.core.somaxconn`). Meaningless for UDP.
    pub fn set_backlog(&mut self, backlog: i32) {
        self.backlog = backlog;
    }

    /// The backlog it will get.
    pub fn backlog(&self) -> i32 {
        self.backlog
    }
}

impl AsFd for NewSocket<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd
    }
}

fn duplicate(fd: &impl AsFd) -> Result<OwnedFd> {
    fd.as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::io("duplicating a descriptor", e))
}

/// Whether systemd named a socket on purpose: not `unknown` (its name when
/// none was given, made unique as `unknown.1`, ...) nor a socket unit's name,
/// its default.
fn has_own_name(name: &str) -> bool {
    let base = name.split_once('.').map_or(name, |(base, rest)| {
        if rest.chars().all(|c| c.is_ascii_digit()) {
            base
        } else {
            name
        }
    });
    base != "unknown" && !name.ends_with(".socket")
}

/// A socket's address for a log line.
fn describe_address(entry: &Entry) -> String {
    match sys::local_addr(&entry.fd) {
        Ok(addr) => match (addr.as_socket(), addr.as_pathname()) {
            (Some(inet), _) => inet.to_string(),
            (None, Some(path)) => path.display().to_string(),
            (None, None) => "(unnamed)".to_owned(),
        },
        Err(_) => "(unknown)".to_owned(),
    }
}

fn same_inet_addr(local: Option<SocketAddr>, wanted: SocketAddr) -> bool {
    let Some(local) = local else {
        return false;
    };
    // Port 0 asks for any port: the inherited one is as good as a new one.
    local.ip() == wanted.ip() && (wanted.port() == 0 || local.port() == wanted.port())
}

fn is_stale_socket(path: &Path, ty: Type) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if !is_socket {
        return false;
    }
    let Ok(probe) = Socket::new(Domain::UNIX, ty, None) else {
        return false;
    };
    let Ok(addr) = SockAddr::unix(path) else {
        return false;
    };
    matches!(probe.connect(&addr), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}
