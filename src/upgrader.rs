//! The public face of the library: one [`Upgrader`] per process.
//!
//! It reads the inheritance at startup, lends out named descriptors, and
//! forwards `ready()`, `upgrade()` and `stop()` to the supervisor thread,
//! which does the waiting. Every method works from async and blocking code.

use std::ffi::OsString;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, mpsc};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, JoinHandle, Thread};
use std::time::Duration;

use nix::sys::signal::Signal;
use signal_hook::SigId;
use tokio::sync::{oneshot, watch};

use crate::error::{Error, Result};
use crate::kind::Kind;
use crate::registry::{NewSocket, Registry};
use crate::supervisor::{self, Channels, Command, Config, StateProvider, Supervisor, lock};
use crate::{state, sys, systemd, wire};

/// How an [`Upgrader`] behaves. Build it with the setters:
///
/// ```
/// use std::time::Duration;
/// let options = handover::Options::default()
///     .upgrade_timeout(Duration::from_secs(30))
///     .pid_file("/run/my-service.pid");
/// ```
#[derive(Debug, Clone)]
pub struct Options {
    upgrade_timeout: Duration,
    pid_file: Option<PathBuf>,
    executable: Option<PathBuf>,
    upgrade_signal: Option<Signal>,
    stop_signals: Vec<Signal>,
    rollback_window: Duration,
    successor_parent: SuccessorParent,
}

/// Whose child a successor is: see [`Options::successor_parent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SuccessorParent {
    /// [`Manager`](SuccessorParent::Manager) where this process is a
    /// service that systemd started itself (Linux, `INVOCATION_ID` set and
    /// the parent process is the manager: pid 1 on a machine systemd
    /// booted, or `MANAGERPID` for a user manager), [`Own`](SuccessorParent::Own) everywhere else. The
    /// default. The environment variable `HANDOVER_SUCCESSOR_PARENT`
    /// (`own`, `manager` or `auto`) overrides it, for an operator.
    #[default]
    Auto,
    /// The generation that starts it (`posix_spawn`).
    Own,
    /// The process that started this one: the service manager, for a
    /// service it runs (Linux, `clone3`, or `clone` where a seccomp filter
    /// refuses `clone3`, with `CLONE_PARENT`; elsewhere, or where the
    /// kernel refuses both, `Own` with a WARN).
    Manager,
}

impl SuccessorParent {
    /// `Own` or `Manager`: what `Auto` (and the environment's override)
    /// means for this process.
    fn resolve(self) -> SuccessorParent {
        let chosen = match std::env::var_os("HANDOVER_SUCCESSOR_PARENT") {
            Some(value) if value == "own" => SuccessorParent::Own,
            Some(value) if value == "manager" => SuccessorParent::Manager,
            Some(value) if value == "auto" || value.is_empty() => self,
            Some(value) => {
                tracing::warn!(
                    value = %value.to_string_lossy(),
                    "HANDOVER_SUCCESSOR_PARENT is not own, manager or auto: ignored"
                );
                self
            }
            None => self,
        };
        match chosen {
            SuccessorParent::Auto if cfg!(target_os = "linux") && systemd::started_us() => {
                SuccessorParent::Manager
            }
            SuccessorParent::Auto => SuccessorParent::Own,
            other => other,
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rollback_window: Duration::ZERO,
            upgrade_timeout: Duration::from_secs(60),
            pid_file: None,
            executable: None,
            upgrade_signal: Some(Signal::SIGHUP),
            stop_signals: Vec::new(),
            successor_parent: SuccessorParent::Auto,
        }
    }
}

impl Options {
    /// How long a successor has to call [`Upgrader::ready`] before it is
    /// killed and the upgrade fails. Default: 60 s, as tableflip. A timeout
    /// longer than the clock can count from now (`Duration::MAX`) means no
    /// deadline.
    pub fn upgrade_timeout(mut self, timeout: Duration) -> Self {
        self.upgrade_timeout = timeout;
        self
    }

    /// A PID file, replaced atomically by each generation when it becomes
    /// ready. Default: none. A directory that anyone may write to without
    /// the sticky bit is refused ([`Error::PidFile`]): anyone could replace
    /// the file there.
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.pid_file = Some(path.into());
        self
    }

    /// The executable to start as the successor. Default: this process's
    /// executable as resolved at startup, so that a deploy that replaces the
    /// file on disk starts the new binary.
    pub fn executable(mut self, path: impl Into<PathBuf>) -> Self {
        self.executable = Some(path.into());
        self
    }

    /// The signal that asks for an upgrade (default SIGHUP), or `None` to
    /// upgrade only through [`Upgrader::upgrade`]. A successor is started
    /// with this signal blocked, and the library holds it until the
    /// generation is ready and its parent is gone: it never kills a
    /// starting generation and is never lost.
    ///
    /// A successor whose options name another signal, or none, still gets
    /// its parent's unblocked in [`Upgrader::new`], so that a release that
    /// handles it itself (a SIGHUP that reloads its configuration) receives
    /// it; one that arrived before is delivered then, with the action the
    /// process has at that moment.
    pub fn upgrade_signal(mut self, signal: Option<crate::Signal>) -> Self {
        self.upgrade_signal = signal.map(crate::Signal::to_nix);
        self
    }

    /// Signals that ask for a final stop, as [`Upgrader::stop`] does (for
    /// example SIGTERM and SIGINT). Default: none, so that a service that
    /// handles them itself keeps doing so. With them set, [`Upgrader::exit`]
    /// resolves with [`ExitReason::Stopped`] on either signal; a generation
    /// stopped before it is ready gets [`Error::Exiting`] from `ready()`.
    pub fn stop_signals(mut self, signals: impl IntoIterator<Item = crate::Signal>) -> Self {
        self.stop_signals = signals.into_iter().map(crate::Signal::to_nix).collect();
        self
    }

    /// How long a generation whose successor is ready stays able to take
    /// back over, should that successor exit (a release that crashes on
    /// its first requests, an OOM kill a second after start). Default: zero,
    /// no window, the behaviour of every release before this option.
    ///
    /// With a window, [`Upgrader::exit`] still resolves the moment the
    /// successor is ready: stop accepting and drain as always, but keep
    /// the listeners (the kernel queues new connections on them for the
    /// successor) and await [`Upgrader::verdict`] before leaving. If the
    /// successor exits within the window, the verdict is
    /// [`Verdict::RolledBack`]: this generation serves again, with the same
    /// sockets (connections queued meanwhile are served, not refused),
    /// names itself in the PID file, tells systemd `READY=1`, and may be
    /// upgraded again. Otherwise, once the window has passed since the
    /// successor's readiness, the verdict is [`Verdict::Exit`]. The
    /// successor may not upgrade while the window is open (its parent
    /// lives); upgrade signals it gets meanwhile run once it has passed.
    ///
    /// Zero is the default because a window needs the service's help (it
    /// must await the verdict and serve again), and keeps the old
    /// generation's memory for its length. A few seconds (`5s`) cover the
    /// crashes a deploy is most likely to meet. `Duration::MAX`: until
    /// [`Upgrader::stop`], which closes a window, as dropping the
    /// `Upgrader` does.
    pub fn rollback_window(mut self, window: Duration) -> Self {
        self.rollback_window = window;
        self
    }

    /// Whose child each successor is. Default [`SuccessorParent::Auto`]:
    /// the service manager's under systemd on Linux, this generation's
    /// everywhere else.
    ///
    /// [`SuccessorParent::Manager`] (Linux): the successor
    /// is started as the child of this process's parent, the service
    /// manager, from its first instruction. systemd then never finds a
    /// process that is not its child in the PID file, whenever it reads
    /// it, and the old generation names its successor as the main process
    /// (PID file and `MAINPID=`) as soon as the upgrade commits (at its
    /// ready byte, or when the rollback window closes) rather than at its
    /// exit, so that a later `kill -HUP $MAINPID` reaches the new
    /// generation. What it costs: the status of a successor that fails
    /// goes to the manager, its parent; the old generation reads it
    /// through the successor's pidfd once the manager has reaped it (Linux
    /// 6.15 and later; before, and if the manager does not reap it within
    /// a second, it is reported as
    /// [`ExitStatus::Unknown`](crate::ExitStatus::Unknown)); and a
    /// successor's parent process is not the generation that started it
    /// ([`Upgrader::parent_pid`] still names that generation, whose end it
    /// learns from their link).
    pub fn successor_parent(mut self, parent: SuccessorParent) -> Self {
        self.successor_parent = parent;
        self
    }
}

/// A successful upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Upgraded {
    /// The successor's process id.
    pub pid: i32,
    /// The successor's generation number.
    pub generation: u64,
    /// From the start of the upgrade to the successor's readiness.
    pub duration: Duration,
}

/// Why [`Upgrader::exit`] resolved: this generation must stop accepting,
/// drain, and exit.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitReason {
    /// A successor is ready and serves the same sockets.
    Upgraded(Upgraded),
    /// [`Upgrader::stop`] was called: a final stop.
    Stopped,
}

/// What became of the hand-over that made [`Upgrader::exit`] resolve: leave,
/// or serve again. See [`Upgrader::verdict`]. Exhaustive on purpose: a
/// generation either leaves or serves again, and a service's loop should
/// not need a third arm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Leave: finish draining and return from `main`. The successor serves
    /// for good (its rollback window, if any, has passed or was closed), or
    /// this is a final stop.
    Exit(ExitReason),
    /// The successor exited within the rollback window: this generation
    /// serves again. Accept again on the same listeners, and wait for
    /// [`Upgrader::exit`] anew.
    RolledBack(RolledBack),
}

/// A successor that exited within its parent's rollback window.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RolledBack {
    /// The successor's process id.
    pub pid: i32,
    /// The successor's generation number.
    pub generation: u64,
    /// How it exited.
    pub status: crate::ExitStatus,
    /// From its readiness to its exit, as this generation saw them.
    pub served: Duration,
}

impl std::fmt::Display for RolledBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "successor pid {} (generation {}) {} {} ms after it was ready",
            self.pid,
            self.generation,
            self.status,
            self.served.as_millis()
        )
    }
}

/// Runs graceful upgrades for one process. Create it once, first thing in
/// `main`; see the [crate documentation](crate) for the life of a generation.
#[derive(Debug)]
pub struct Upgrader {
    generation: u64,
    parent: Option<i32>,
    registry: Arc<Mutex<Registry>>,
    supervisor_handle: SupervisorHandle,
    exit: watch::Receiver<Option<ExitReason>>,
    verdict: watch::Receiver<Option<Verdict>>,
    parent_gone: watch::Receiver<bool>,
    signal_ids: Vec<SigId>,
    state_provider: Arc<Mutex<Option<StateProvider>>>,
    state: Arc<state::Slot>,
    supervisor: Option<JoinHandle<()>>,
}

impl Upgrader {
    /// Reads what the parent handed over (if this process is a successor),
    /// takes charge of the upgrade signal, and starts the supervisor thread.
    ///
    /// Call it first thing in `main`, before any other thread starts (an
    /// async runtime's included, so not inside `#[tokio::main]`): it then
    /// removes the inheritance variables (`HANDOVER`, `LISTEN_FDS`,
    /// `LISTEN_PID`, `LISTEN_FDNAMES`) from the environment, so that no
    /// other child of the service sees them.
    ///
    /// It is safe to call anywhere all the same. Changing the environment is
    /// only sound while no other thread can read it, so it first counts this
    /// process's threads (Linux: `/proc/self/task`; macOS: `proc_pidinfo`);
    /// if another runs, or they cannot be counted, it leaves the variables
    /// in place and says so in a WARN log, and works as usual: the children
    /// this process starts then inherit them, unless it removes them
    /// (`Command::env_remove`). The successors it starts never see stale ones.
    /// Only the process's first `Upgrader` takes the inheritance; a later one
    /// starts as generation 0 with nothing inherited, as each descriptor has
    /// one owner.
    ///
    /// # Errors
    /// [`Error::Inheritance`] for a malformed inheritance environment
    /// (`HANDOVER`, or systemd's `LISTEN_FDS`/`LISTEN_FDNAMES`);
    /// [`Error::InheritedDescriptor`] for a descriptor in it that is not
    /// open, not of the kind claimed, or did not arrive on the handshake link
    /// (its [`DescriptorProblem`](crate::DescriptorProblem) says which);
    /// [`Error::Io`] when a system call fails (resolving the executable,
    /// installing a signal handler, starting the supervisor thread). On
    /// error the handshake link is left open, and the descriptors received
    /// on it are closed.
    pub fn new(options: Options) -> Result<Upgrader> {
        // The inheritance is taken once per process: the environment may
        // still name it (see above), and its descriptors have one owner.
        static INHERITANCE_TAKEN: Mutex<bool> = Mutex::new(false);
        let mut taken = INHERITANCE_TAKEN
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let inheritance = match std::env::var(wire::VAR) {
            _ if *taken => None,
            Ok(text) => Some(wire::decode(&text).map_err(|source| Error::Inheritance {
                var: wire::VAR,
                source,
            })?),
            Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(Error::Inheritance {
                    var: wire::VAR,
                    source: wire::WireError::new(0, "not UTF-8"),
                });
            }
        };
        let generation = inheritance.as_ref().map_or(0, |i| i.generation);
        let parent = inheritance.as_ref().map(|i| i.parent);
        let blocked_by_parent = inheritance.as_ref().and_then(|i| i.blocked);
        let (registry, parent_link) = match inheritance {
            Some(inheritance) => {
                let (registry, link) = Registry::adopt(inheritance.fds, inheritance.link)?;
                let link = UnixStream::from(link);
                link.set_nonblocking(true)
                    .map_err(|e| Error::io("configuring the handshake link", e))?;
                (registry, Some(link))
            }
            None if *taken => (Registry::default(), None),
            None => match systemd::activated_sockets(sys::pid())? {
                Some(passed) => (Registry::adopt_activated(&passed)?, None),
                None => (Registry::default(), None),
            },
        };
        *taken = true;
        drop(taken);
        if let Err(left) = sys::remove_env(&supervisor::STALE_VARS) {
            tracing::warn!(
                generation,
                vars = ?left,
                "other threads run, so the inheritance variables stay in the environment (changing it is sound only with one thread): other children of this process will see them; create the Upgrader first thing in main"
            );
        }

        let executable = match options.executable {
            Some(path) => path,
            None => current_executable()?,
        };
        // As the handshake link: a write after the reading end is gone
        // (a detached supervisor that has ended) is an error, never SIGPIPE.
        let self_pipe = || -> Result<(UnixStream, UnixStream)> {
            let (read, write) =
                sys::link_pair().map_err(|e| Error::io("creating a self-pipe", e))?;
            read.set_nonblocking(true)
                .map_err(|e| Error::io("creating a self-pipe", e))?;
            write
                .set_nonblocking(true)
                .map_err(|e| Error::io("creating a self-pipe", e))?;
            Ok((read, write))
        };
        let mut signal_ids = Vec::new();
        let register = |signal: Signal, write: UnixStream, ids: &mut Vec<SigId>| -> Result<()> {
            let id = signal_hook::low_level::pipe::register(signal as i32, write)
                .map_err(|e| Error::io("installing a signal handler", e))?;
            ids.push(id);
            Ok(())
        };
        let (child_signal, child_signal_write) = self_pipe()?;
        register(Signal::SIGCHLD, child_signal_write, &mut signal_ids)?;
        let child_signal_id = signal_ids[0];
        let upgrade_signal = match options.upgrade_signal {
            Some(signal) => {
                let (read, write) = self_pipe()?;
                // The handler first: a successor may already have this signal
                // pending, and unblocking it without one would kill it. It
                // notes the sender too (see `pidfile::wait_at_exit_for`).
                let id = sys::register_upgrade_signal(signal, write)
                    .map_err(|e| Error::io("installing a signal handler", e))?;
                signal_ids.push(id);
                sys::unblock(signal).map_err(|e| Error::io("unblocking the upgrade signal", e))?;
                Some(read)
            }
            None => None,
        };
        // The parent blocked its own upgrade signal, which may not be ours
        // (a release that reloads on SIGHUP and upgrades only through the
        // API): unblocked all the same, after our own handler is in place.
        if let Some(signal) = blocked_by_parent.filter(|&s| Some(s) != options.upgrade_signal) {
            sys::unblock(signal)
                .map_err(|e| Error::io("unblocking the parent's upgrade signal", e))?;
        }

        let stop_signal = if options.stop_signals.is_empty() {
            None
        } else {
            let (read, write) = self_pipe()?;
            for &signal in &options.stop_signals {
                let write = write
                    .try_clone()
                    .map_err(|e| Error::io("creating a self-pipe", e))?;
                register(signal, write, &mut signal_ids)?;
            }
            Some(read)
        };

        let (wake_read, wake) = self_pipe()?;
        let ended = Arc::new(AtomicBool::new(false));
        let (commands, commands_rx) = mpsc::channel();
        let (exit_tx, exit) = watch::channel(None);
        let (verdict_tx, verdict) = watch::channel(None);
        let (parent_gone_tx, parent_gone) = watch::channel(parent_link.is_none());
        let registry = Arc::new(Mutex::new(registry));
        let state_provider = Arc::new(Mutex::new(None));
        let state = Arc::new(state::Slot::new(if parent.is_some() {
            state::Status::Pending
        } else {
            state::Status::Complete
        }));
        let successor_parent = options.successor_parent.resolve();
        tracing::debug!(generation, ?successor_parent, "whose child successors are");
        let config_has_no_pid_file = options.pid_file.is_none();
        let rollback_window = options.rollback_window;
        let config = Config {
            generation,
            parent,
            executable,
            args: std::env::args_os().collect::<Vec<OsString>>(),
            upgrade_timeout: options.upgrade_timeout,
            rollback_window: options.rollback_window,
            pid_file: options.pid_file,
            upgrade_signal: options.upgrade_signal,
            sibling: successor_parent == SuccessorParent::Manager,
            born_sibling: parent
                .is_some_and(|parent| std::os::unix::process::parent_id() != parent as u32),
            unsupervised: !systemd::may_read_pid_file(),
            state_provider: Arc::clone(&state_provider),
        };
        let channels = Channels {
            commands: commands_rx,
            wake: wake_read,
            upgrade_signal,
            stop_signal,
            child_signal,
            child_signal_id,
            parent_link,
            exit: exit_tx,
            verdict: verdict_tx,
            parent_gone: parent_gone_tx,
            state: Arc::clone(&state),
            ended: Arc::clone(&ended),
        };
        let supervisor = Supervisor::new(config, channels, Arc::clone(&registry));
        let supervisor = thread::Builder::new()
            .name(format!("handover-gen{generation}"))
            .spawn(move || supervisor.run())
            .map_err(|e| Error::io("starting the supervisor thread", e))?;
        tracing::info!(generation, parent, pid = sys::pid(), "generation started");
        if std::env::var_os("NOTIFY_SOCKET").is_some()
            && config_has_no_pid_file
            && successor_parent != SuccessorParent::Manager
        {
            // Found under a real systemd (harness/tests/systemd.rs): with successors of
            // our own, MAINPID= alone does not carry a service across
            // upgrades; PIDFile= does. (Successors started as systemd's
            // children are named with MAINPID= when they serve.)
            tracing::warn!(
                generation,
                "running under systemd, with successors that cannot be systemd's children, and without a PID file: set Options::pid_file and PIDFile= in the unit, or systemd will lose the service at its first upgrade"
            );
        }
        Ok(Upgrader {
            generation,
            parent,
            registry,
            supervisor_handle: SupervisorHandle {
                commands,
                wake: Arc::new(wake),
                rollback_window,
                ended,
            },
            exit,
            verdict,
            parent_gone,
            signal_ids,
            state_provider,
            state,
            supervisor: Some(supervisor),
        })
    }

    /// This generation's number: 0 for the first, the parent's plus one after.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether this process was started by an upgrade.
    pub fn has_parent(&self) -> bool {
        self.parent.is_some()
    }

    /// The process id of the generation that started this one, if any.
    pub fn parent_pid(&self) -> Option<i32> {
        self.parent
    }

    /// The TCP listener named `name`: the parent's if it handed one over on
    /// the same address, else a new one bound to `addr` (with SO_REUSEADDR
    /// and a deep backlog). Port 0 accepts the inherited listener's port.
    ///
    /// The listener is non-blocking (a flag shared by every generation, as
    /// they share the socket): pass it to [`tokio::net::TcpListener::from_std`].
    /// Accept on it only after [`ready`](Self::ready), so that a successor
    /// that fails during init takes no connection with it.
    ///
    /// # Errors
    /// [`Error::InvalidName`] for an empty or too long name;
    /// [`Error::WrongKind`] if `name` is another kind of descriptor;
    /// [`Error::Bind`] if a new socket cannot be created, bound or made to
    /// listen; [`Error::Io`] if the descriptor cannot be duplicated.
    pub fn tcp_listener(&self, name: &str, addr: SocketAddr) -> Result<std::net::TcpListener> {
        self.tcp_listener_with(name, addr, |_| Ok(()))
    }

    /// [`tcp_listener`](Self::tcp_listener), with `configure` run on a new
    /// socket after `SO_REUSEADDR` and before `bind(2)` and `listen(2)`: set
    /// `SO_REUSEPORT`, `IPV6_V6ONLY`, `TCP_DEFER_ACCEPT`, buffer sizes or
    /// the backlog there. It is not run for a listener that is inherited
    /// (from the parent, or systemd), which keeps the options its creator
    /// gave it; a new generation cannot change what a socket it shares
    /// with the old one was bound with.
    ///
    /// ```no_run
    /// # fn f(upgrader: &handover::Upgrader) -> handover::Result<()> {
    /// use nix::sys::socket::{setsockopt, sockopt::ReusePort};
    /// let listener = upgrader.tcp_listener_with("http", "[::]:8080".parse().unwrap(), |socket| {
    ///     // Or with socket2: socket2::SockRef::from(&*socket).set_reuse_port(true)?;
    ///     setsockopt(&*socket, ReusePort, &true)?;
    ///     socket.set_backlog(16384);
    ///     Ok(())
    /// })?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`tcp_listener`](Self::tcp_listener); an error from `configure` is
    /// an [`Error::Bind`] with that error as its source, and the socket is
    /// closed.
    pub fn tcp_listener_with(
        &self,
        name: &str,
        addr: SocketAddr,
        mut configure: impl FnMut(&mut NewSocket<'_>) -> std::io::Result<()>,
    ) -> Result<std::net::TcpListener> {
        Ok(lock(&self.registry)
            .tcp_listener(name, addr, &mut configure)?
            .into())
    }

    /// The UDP socket named `name`, inherited or newly bound to `addr`;
    /// non-blocking, for [`tokio::net::UdpSocket::from_std`].
    ///
    /// # Errors
    /// As [`tcp_listener`](Self::tcp_listener).
    pub fn udp_socket(&self, name: &str, addr: SocketAddr) -> Result<std::net::UdpSocket> {
        self.udp_socket_with(name, addr, |_| Ok(()))
    }

    /// [`udp_socket`](Self::udp_socket), with `configure` run on a new
    /// socket before `bind(2)` (`SO_REUSEPORT`, buffer sizes, ...); not for
    /// an inherited one. See [`tcp_listener_with`](Self::tcp_listener_with).
    ///
    /// # Errors
    /// As [`tcp_listener_with`](Self::tcp_listener_with).
    pub fn udp_socket_with(
        &self,
        name: &str,
        addr: SocketAddr,
        mut configure: impl FnMut(&mut NewSocket<'_>) -> std::io::Result<()>,
    ) -> Result<std::net::UdpSocket> {
        Ok(lock(&self.registry)
            .udp_socket(name, addr, &mut configure)?
            .into())
    }

    /// The Unix stream listener named `name`, inherited or newly bound to
    /// `path` (a stale socket file nobody answers on is replaced). The path
    /// is left in place when a successor takes over and removed on a final
    /// [`stop`](Self::stop). Non-blocking.
    ///
    /// # Errors
    /// As [`tcp_listener`](Self::tcp_listener); [`Error::Bind`] also when a
    /// stale socket file cannot be removed, or `path` is taken by a file
    /// that is not a stale socket.
    pub fn unix_listener(&self, name: &str, path: impl AsRef<Path>) -> Result<UnixListener> {
        Ok(lock(&self.registry)
            .unix_socket(name, Kind::UnixListener, path.as_ref())?
            .into())
    }

    /// [`unix_listener`](Self::unix_listener), and whether it bound a new
    /// socket (rather than one inherited or taken before).
    pub(crate) fn unix_listener_bound(
        &self,
        name: &str,
        path: &Path,
    ) -> Result<(UnixListener, bool)> {
        let (fd, bound) = lock(&self.registry).unix_socket_bound(name, Kind::UnixListener, path)?;
        Ok((fd.into(), bound))
    }

    /// The Unix datagram socket named `name`, inherited or newly bound to
    /// `path`. Non-blocking.
    ///
    /// # Errors
    /// As [`unix_listener`](Self::unix_listener).
    pub fn unix_datagram(&self, name: &str, path: impl AsRef<Path>) -> Result<UnixDatagram> {
        Ok(lock(&self.registry)
            .unix_socket(name, Kind::UnixDatagram, path.as_ref())?
            .into())
    }

    /// Hands any other descriptor (a file, a pipe, a connection) to the next
    /// generations under `name`; the library keeps its own duplicate.
    ///
    /// # Errors
    /// [`Error::InvalidName`] for an empty or too long name;
    /// [`Error::WrongKind`] if `name` is a socket; [`Error::Io`] if `fd`
    /// cannot be duplicated.
    pub fn add_fd(&self, name: &str, fd: &impl AsFd) -> Result<()> {
        lock(&self.registry).add_fd(name, fd)
    }

    /// A duplicate of the descriptor added under `name` by this generation or
    /// an earlier one, if there is one.
    ///
    /// # Errors
    /// [`Error::InvalidName`] for an empty or too long name;
    /// [`Error::WrongKind`] if `name` is a socket; [`Error::Io`] if the
    /// descriptor cannot be duplicated.
    pub fn fd(&self, name: &str) -> Result<Option<OwnedFd>> {
        lock(&self.registry).fd(name)
    }

    /// The named descriptors this generation holds and will hand on, with
    /// their kinds, in the order they are handed on.
    pub fn descriptors(&self) -> Vec<(String, Kind)> {
        lock(&self.registry)
            .handed_on()
            .map(|(name, kind, _, _)| (name.to_owned(), kind))
            .collect()
    }

    /// Gives the bytes to hand to each successor (a serialised cache,
    /// session tickets, counters): called on the supervisor's thread when an
    /// upgrade starts, so keep it quick. Megabytes are fine; the limit is
    /// 1 GiB. The successor reads them with
    /// [`inherited_state`](Self::inherited_state). A successor that never
    /// reads them, or dies first, does not block this generation. A provider
    /// that panics fails that upgrade with [`Error::StateProviderPanicked`]
    /// before any successor starts; this generation serves on (with
    /// `panic = "abort"`, a panic ends the process, as anywhere).
    pub fn set_state_provider(&self, provider: impl Fn() -> Vec<u8> + Send + 'static) {
        *self
            .state_provider
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(StateProvider(Box::new(provider)));
    }

    /// The state the parent handed over, once all of it has come: `None` if
    /// there is none (no parent, no provider, or already taken). Call it
    /// before [`ready`](Self::ready): the parent hands it over while this
    /// generation starts.
    ///
    /// # Errors
    /// [`Error::StateLost`] if the parent went away (or broke the framing)
    /// before all of it came; [`Error::Exiting`] if the supervisor has shut
    /// down (the `Upgrader` is being dropped).
    pub fn inherited_state(
        &self,
    ) -> impl Future<Output = Result<Option<Vec<u8>>>> + Send + 'static {
        let slot = Arc::clone(&self.state);
        let parent = self.parent.unwrap_or_default();
        async move {
            let mut status = slot.status.subscribe();
            let status = *status
                .wait_for(|s| *s != state::Status::Pending)
                .await
                .map_err(|_| Error::Exiting)?;
            match status {
                state::Status::Lost {
                    received,
                    expected,
                    problem,
                } => Err(Error::StateLost {
                    parent,
                    received,
                    expected,
                    problem,
                }),
                _ => Ok(slot.data.lock().unwrap_or_else(|p| p.into_inner()).take()),
            }
        }
    }

    /// [`inherited_state`](Self::inherited_state) for blocking code.
    ///
    /// # Errors
    /// As [`inherited_state`](Self::inherited_state).
    pub fn inherited_state_blocking(&self) -> Result<Option<Vec<u8>>> {
        block_on(self.inherited_state())
    }

    /// Stops handing `name` to successors. Returns whether it was there.
    pub fn remove(&self, name: &str) -> bool {
        lock(&self.registry).remove(name)
    }

    /// Declares this generation ready to serve: closes inherited descriptors
    /// it did not ask for, writes the PID file, then tells the parent, which
    /// then exits. Start accepting after this returns.
    ///
    /// If the parent is already gone (killed while this generation started),
    /// this still succeeds: this generation is then the only one.
    ///
    /// It is cheap and may be called from async code: the calling thread
    /// only hands the request to the supervisor thread and waits for its
    /// answer; the supervisor writes the PID file (a small file and a
    /// rename, without waiting for the disk) and a byte or two to its
    /// parent and the service manager. About 0.1 ms, once per process.
    ///
    /// # Errors
    /// [`Error::AlreadyReady`] on a second call; [`Error::Exiting`] if a
    /// stop signal or [`stop`](Self::stop) came first; [`Error::PidFile`] if
    /// the PID file cannot be written (the parent is then not told);
    /// [`Error::SupervisorFailed`] if the supervisor thread failed.
    pub fn ready(&self) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Ready(reply))?;
        block_on(answer).unwrap_or_else(|_| Err(self.supervisor_handle.dropped()))
    }

    /// Starts a successor and resolves when it is ready (this generation must
    /// then exit: [`exit`](Self::exit) resolves too) or has failed (this
    /// generation serves on and may try again).
    ///
    /// The upgrade starts when the future is first polled, and from then on
    /// runs to its end even if the future is dropped.
    ///
    /// # Errors
    /// [`Error::InProgress`], [`Error::NotReady`], [`Error::ParentAlive`],
    /// [`Error::WindowOpen`] and [`Error::Exiting`] when no upgrade may
    /// start now; [`Error::Spawn`],
    /// [`Error::SuccessorExited`], [`Error::Timeout`] and
    /// [`Error::Handshake`] when the successor failed;
    /// [`Error::StateProviderPanicked`] when the state provider panicked;
    /// [`Error::Io`] when the handover could not be prepared (the handshake
    /// link, sending the descriptors on it: `ETOOMANYREFS` near
    /// `RLIMIT_NOFILE`, state over 1 GiB);
    /// [`Error::SupervisorFailed`] when the supervisor thread failed (this
    /// generation serves on; see the error).
    pub fn upgrade(&self) -> impl Future<Output = Result<Upgraded>> + Send + 'static {
        self.supervisor_handle.upgrade()
    }

    /// [`upgrade`](Self::upgrade) for blocking code.
    ///
    /// # Errors
    /// As [`upgrade`](Self::upgrade).
    pub fn upgrade_blocking(&self) -> Result<Upgraded> {
        block_on(self.upgrade())
    }

    /// Resolves when this generation must exit: its successor is ready, or
    /// [`stop`](Self::stop) was called. From then on, accept nothing new,
    /// finish what is in flight (see [`crate::drain`]) and return from `main`
    /// (with a [rollback window](Options::rollback_window), once
    /// [`verdict`](Self::verdict) says so). After a rollback it resolves
    /// again at the next upgrade or stop.
    ///
    /// It resolves before [`upgrade`](Self::upgrade) returns `Ok`. In an
    /// accept loop, poll it first (`tokio::select! { biased; ... }`, as in
    /// the crate's example): `select!` otherwise picks a ready branch at
    /// random, and a connection made just after the upgrade was reported
    /// could still be accepted here.
    pub fn exit(&self) -> impl Future<Output = ExitReason> + Send + 'static {
        let mut exit = self.exit.clone();
        async move {
            match exit.wait_for(Option::is_some).await {
                Ok(reason) => reason.clone().unwrap_or(ExitReason::Stopped),
                Err(_) => ExitReason::Stopped,
            }
        }
    }

    /// [`exit`](Self::exit) for blocking code.
    pub fn exit_blocking(&self) -> ExitReason {
        block_on(self.exit())
    }

    /// Resolves once what made [`exit`](Self::exit) resolve is settled:
    /// [`Verdict::Exit`] when this generation must leave (a final stop, or a
    /// successor that serves for good: at once without a
    /// [rollback window](Options::rollback_window), when it passes with
    /// one), or [`Verdict::RolledBack`] when the successor exited within
    /// the window and this generation serves again. Await it after `exit()`,
    /// while the drain runs:
    ///
    /// ```no_run
    /// # async fn serve(upgrader: handover::Upgrader, listener: tokio::net::TcpListener) {
    /// use handover::{Verdict, drain::Drain};
    /// let mut draining = tokio::task::JoinSet::new();
    /// loop {
    ///     let drain = Drain::default();
    ///     let exit = upgrader.exit();
    ///     tokio::pin!(exit);
    ///     loop {
    ///         tokio::select! {
    ///             biased;
    ///             _ = &mut exit => break,
    ///             Ok((stream, _)) = listener.accept() => {
    ///                 let _open = drain.track();
    ///                 // ... serve `stream` ...
    ///             }
    ///         }
    ///     }
    ///     // Stop accepting (the listener stays), drain in the background.
    ///     let finishing = drain.clone();
    ///     draining.spawn(async move { finishing.wait().await });
    ///     match upgrader.verdict().await {
    ///         Verdict::Exit(_) => break,
    ///         Verdict::RolledBack(why) => tracing::warn!(%why, "rolled back: serving again"),
    ///     }
    /// }
    /// while draining.join_next().await.is_some() {}
    /// # }
    /// ```
    ///
    /// Called while this generation serves, it waits for the next exit and
    /// its verdict (or returns the last rollback at once, if one came since
    /// the last upgrade: the caller then serves on, which is right).
    pub fn verdict(&self) -> impl Future<Output = Verdict> + Send + 'static {
        let mut verdict = self.verdict.clone();
        async move {
            match verdict.wait_for(Option::is_some).await {
                Ok(verdict) => verdict
                    .clone()
                    .unwrap_or(Verdict::Exit(ExitReason::Stopped)),
                Err(_) => Verdict::Exit(ExitReason::Stopped),
            }
        }
    }

    /// [`verdict`](Self::verdict) for blocking code.
    pub fn verdict_blocking(&self) -> Verdict {
        block_on(self.verdict())
    }

    /// A final stop: [`exit`](Self::exit) resolves with
    /// [`ExitReason::Stopped`], a starting successor is killed, and the Unix
    /// socket paths this generation serves are removed.
    pub fn stop(&self) {
        let _ = self.send(Command::Stop);
    }

    /// Resolves once the parent generation has exited (at once if there is
    /// none). Useful before work that must not overlap with the old code.
    pub fn wait_for_parent(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut gone = self.parent_gone.clone();
        async move {
            let _ = gone.wait_for(|gone| *gone).await;
        }
    }

    /// [`wait_for_parent`](Self::wait_for_parent) for blocking code.
    pub fn wait_for_parent_blocking(&self) {
        block_on(self.wait_for_parent())
    }

    fn send(&self, command: Command) -> Result<()> {
        self.supervisor_handle.send(command)
    }

    pub(crate) fn handle(&self) -> SupervisorHandle {
        self.supervisor_handle.clone()
    }

    pub(crate) fn exit_watch(&self) -> watch::Receiver<Option<ExitReason>> {
        self.exit.clone()
    }

    pub(crate) fn verdict_watch(&self) -> watch::Receiver<Option<Verdict>> {
        self.verdict.clone()
    }

    pub(crate) fn parent_gone_watch(&self) -> watch::Receiver<bool> {
        self.parent_gone.clone()
    }
}

/// What it takes to ask the supervisor for something, from anywhere.
#[derive(Debug, Clone)]
pub(crate) struct SupervisorHandle {
    commands: mpsc::Sender<Command>,
    wake: Arc<UnixStream>,
    rollback_window: Duration,
    /// See `supervisor::Channels::ended`.
    ended: Arc<AtomicBool>,
}

impl SupervisorHandle {
    pub(crate) fn rollback_window(&self) -> Duration {
        self.rollback_window
    }

    /// The error for a request whose answer was dropped unsent.
    fn dropped(&self) -> Error {
        supervisor::request_dropped(&self.ended)
    }

    fn send(&self, command: Command) -> Result<()> {
        self.commands.send(command).map_err(|_| Error::Exiting)?;
        // A full pipe already wakes the supervisor. A detached supervisor
        // may end between the two lines: the byte then fails quietly.
        let _ = sys::LinkWriter(self.wake.as_fd()).write(&[1]);
        Ok(())
    }

    pub(crate) fn upgrade(&self) -> impl Future<Output = Result<Upgraded>> + Send + 'static {
        let handle = self.clone();
        // Asked for on the first poll, not here: a future that is created
        // and never polled (a disabled `select!` branch) starts nothing.
        async move {
            let (reply, answer) = oneshot::channel();
            handle.send(Command::Upgrade(reply))?;
            answer.await.unwrap_or_else(|_| Err(handle.dropped()))
        }
    }
}

/// How long dropping the `Upgrader` in a rollback window waits for the
/// supervisor to close the window, at most.
const DETACH_WAIT: Duration = Duration::from_secs(1);

impl Drop for Upgrader {
    fn drop(&mut self) {
        // A generation whose successor is ready is on its way out: until the
        // process exits, an upgrade signal must neither kill it (the default
        // action of SIGHUP) nor be lost, so the supervisor stays to pass it
        // on, with its handlers.
        let (handled, detached) = std::sync::mpsc::sync_channel(0);
        if matches!(*self.exit.borrow(), Some(ExitReason::Upgraded(_)))
            && self.send(Command::Detach(handled)).is_ok()
        {
            // In the rollback window, the drop closes it: the successor is
            // named in the PID file (and to systemd) then, which must come
            // before this process exits, or the manager would find the file
            // naming a process gone. Without a window it was named already.
            if self.verdict.borrow().is_none() {
                let _ = detached.recv_timeout(DETACH_WAIT);
            }
            self.supervisor.take();
            self.signal_ids.clear();
            return;
        }
        let _ = self.send(Command::Shutdown);
        if let Some(supervisor) = self.supervisor.take() {
            let _ = supervisor.join();
        }
        for id in self.signal_ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// The executable as the kernel resolved it at startup. On Linux, a binary
/// replaced on disk after it started reads as "PATH (deleted)": the new file
/// at PATH is the one to start.
fn current_executable() -> Result<PathBuf> {
    let path =
        std::env::current_exe().map_err(|e| Error::io("resolving the current executable", e))?;
    if let Some(text) = path.to_str() {
        if let Some(original) = text.strip_suffix(" (deleted)") {
            return Ok(PathBuf::from(original));
        }
    }
    Ok(path)
}

/// Runs a future on this thread. The futures given to it wait on channels
/// only, which need no runtime.
fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut context = Context::from_waker(&waker);
    let mut future = pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
        thread::park();
    }
}
