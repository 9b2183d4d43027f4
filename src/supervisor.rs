//! The supervisor: one thread per generation that runs every upgrade.
//!
//! It waits with `poll(2)` on events only (a command, the upgrade signal,
//! SIGCHLD, the handshake link to the parent and to the successor, the
//! upgrade deadline) and never polls on a timer. It owns the state machine
//! and the successor, so an upgrade runs to its end even if the caller of
//! `upgrade()` goes away, and only one ever runs at a time.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::sync::{oneshot, watch};

use crate::error::{Error, Result};
use crate::machine::{Decision, Machine, Origin, Phase, Refusal};
use crate::registry::Registry;
use crate::state::{self, Inbox, Outbox};
use crate::sys::{self, SpawnRequest};
use crate::systemd::Notifier;
use crate::wire::{self, Inheritance, InheritedFd};
use crate::{ExitReason, Upgraded, pidfile};

/// The byte a successor sends on the link when it is ready.
const READY: u8 = b'R';
/// Variables a successor (or any other child) must not inherit from us.
pub(crate) const STALE_VARS: [&str; 4] = [wire::VAR, "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"];

pub(crate) enum Command {
    Upgrade(oneshot::Sender<Result<Upgraded>>),
    Ready(oneshot::Sender<Result<()>>),
    Stop,
    Shutdown,
}

/// What the supervisor needs, fixed at startup.
pub(crate) struct Config {
    pub generation: u64,
    pub parent: Option<i32>,
    pub executable: PathBuf,
    pub args: Vec<OsString>,
    pub upgrade_timeout: Duration,
    pub pid_file: Option<PathBuf>,
    pub upgrade_signal: Option<Signal>,
    /// Called at each upgrade for the bytes to hand over.
    pub state_provider: Arc<Mutex<Option<StateProvider>>>,
}

/// What gives the state to hand to a successor.
pub(crate) struct StateProvider(pub Box<dyn Fn() -> Vec<u8> + Send>);

impl std::fmt::Debug for StateProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateProvider")
    }
}

pub(crate) struct Channels {
    pub commands: mpsc::Receiver<Command>,
    pub wake: UnixStream,
    pub upgrade_signal: Option<UnixStream>,
    pub stop_signal: Option<UnixStream>,
    pub child_signal: UnixStream,
    pub parent_link: Option<UnixStream>,
    pub exit: watch::Sender<Option<ExitReason>>,
    pub parent_gone: watch::Sender<bool>,
    /// The state the parent hands over, filled as it arrives.
    pub state: Arc<state::Slot>,
}

/// A successor that is starting.
struct Inflight {
    pid: Pid,
    link: UnixStream,
    /// State still to write to the successor.
    outbox: Option<Outbox>,
    link_closed: bool,
    started: Instant,
    deadline: Instant,
    waiter: Option<oneshot::Sender<Result<Upgraded>>>,
}

pub(crate) struct Supervisor {
    config: Config,
    channels: Channels,
    registry: Arc<Mutex<Registry>>,
    machine: Machine,
    inflight: Option<Inflight>,
    /// The successor that became ready: its link stays open until this
    /// process exits (that EOF is how it learns we are gone).
    successor: Option<(Pid, UnixStream)>,
    systemd: Notifier,
    /// The parent's state, while it arrives.
    inbox: Option<Inbox>,
}

impl Supervisor {
    pub(crate) fn new(config: Config, channels: Channels, registry: Arc<Mutex<Registry>>) -> Self {
        let machine = Machine::new(config.parent.is_some());
        let inbox = config.parent.map(|_| Inbox::default());
        Supervisor {
            config,
            channels,
            registry,
            machine,
            inflight: None,
            successor: None,
            systemd: Notifier::from_env(),
            inbox,
        }
    }

    pub(crate) fn run(mut self) {
        loop {
            match self.turn() {
                Ok(true) => {}
                Ok(false) => break,
                Err(err) => {
                    // Only poll(2) itself can fail here; retrying at once
                    // would spin, so give up the generation's upgrades.
                    tracing::error!(generation = self.config.generation, error = %err, "supervisor stopped");
                    break;
                }
            }
        }
        if let Some(inflight) = self.inflight.take() {
            let pid = inflight.pid;
            let _ = sys::kill_and_reap(pid);
            if let Some(waiter) = inflight.waiter {
                let _ = waiter.send(Err(Error::Exiting));
            }
        }
    }

    /// One wait and what follows it. `false` ends the thread.
    fn turn(&mut self) -> io::Result<bool> {
        let mut watched: Vec<(Source, (BorrowedFd<'_>, bool))> = vec![
            (Source::Wake, (self.channels.wake.as_fd(), false)),
            (
                Source::ChildSignal,
                (self.channels.child_signal.as_fd(), false),
            ),
        ];
        if let Some(signal) = &self.channels.upgrade_signal {
            watched.push((Source::UpgradeSignal, (signal.as_fd(), false)));
        }
        if let Some(signal) = &self.channels.stop_signal {
            watched.push((Source::StopSignal, (signal.as_fd(), false)));
        }
        if let Some(link) = &self.channels.parent_link {
            watched.push((Source::Parent, (link.as_fd(), false)));
        }
        if let Some(inflight) = self.inflight.as_ref().filter(|i| !i.link_closed) {
            // Writable too while state remains to be sent.
            let sending = inflight.outbox.is_some();
            watched.push((Source::Successor, (inflight.link.as_fd(), sending)));
        }
        let timeout = self
            .inflight
            .as_ref()
            .map(|i| i.deadline.saturating_duration_since(Instant::now()));
        let fds: Vec<(BorrowedFd<'_>, bool)> = watched.iter().map(|(_, fd)| *fd).collect();
        let ready = sys::poll(&fds, timeout)?;
        let sources: Vec<Source> = watched
            .iter()
            .zip(ready)
            .filter_map(|((source, _), ready)| ready.then_some(*source))
            .collect();

        for source in sources {
            match source {
                Source::Successor => self.on_successor_link(),
                Source::ChildSignal => {
                    drain(&self.channels.child_signal);
                    self.on_child_signal();
                }
                Source::Parent => self.on_parent_link(),
                Source::UpgradeSignal => {
                    if let Some(signal) = &self.channels.upgrade_signal {
                        drain(signal);
                    }
                    self.on_upgrade_signal();
                }
                Source::StopSignal => {
                    if let Some(signal) = &self.channels.stop_signal {
                        drain(signal);
                    }
                    tracing::info!(generation = self.config.generation, "stop signal");
                    self.stop();
                }
                Source::Wake => {
                    drain(&self.channels.wake);
                    while let Ok(command) = self.channels.commands.try_recv() {
                        if !self.on_command(command) {
                            return Ok(false);
                        }
                    }
                }
            }
        }
        if self
            .inflight
            .as_ref()
            .is_some_and(|i| Instant::now() >= i.deadline)
        {
            self.on_deadline();
        }
        Ok(true)
    }

    fn on_command(&mut self, command: Command) -> bool {
        match command {
            Command::Upgrade(reply) => match self.machine.request_upgrade(Origin::Call) {
                Decision::Start => self.start_upgrade(Some(reply)),
                Decision::Refuse(refusal) => {
                    let _ = reply.send(Err(self.refusal_error(refusal)));
                }
                Decision::Hold => unreachable!("calls are never held"),
            },
            Command::Ready(reply) => {
                let result = self.ready();
                let start_held = result.is_ok() && self.machine.ready() == Ok(true);
                let _ = reply.send(result);
                if start_held {
                    self.start_upgrade(None);
                }
            }
            Command::Stop => self.stop(),
            Command::Shutdown => return false,
        }
        true
    }

    fn refusal_error(&self, refusal: Refusal) -> Error {
        match refusal {
            Refusal::NotReady => Error::NotReady,
            Refusal::InProgress => Error::InProgress,
            Refusal::Exiting => Error::Exiting,
            Refusal::ParentAlive => Error::ParentAlive {
                parent: self.config.parent.unwrap_or_default(),
            },
        }
    }

    /// The work of `ready()`, before the state machine moves on.
    fn ready(&mut self) -> Result<()> {
        match self.machine.phase() {
            Phase::Initializing => {}
            // Stopped (by a stop signal) before it was ready.
            Phase::Exiting => return Err(Error::Exiting),
            Phase::Serving | Phase::Upgrading => return Err(Error::AlreadyReady),
        }
        let generation = self.config.generation;
        let closed = lock(&self.registry).close_unclaimed();
        if !closed.is_empty() {
            tracing::info!(generation, names = ?closed, "closed inherited descriptors this generation did not ask for");
        }
        if let Some(path) = &self.config.pid_file {
            pidfile::write(path, sys::pid())?;
        }
        // The service manager learns of the new main process before the old
        // one is told to leave: from the PID file if there is one (systemd
        // re-reads it when the old main process exits, and this process is
        // its child by then), else from MAINPID=. A MAINPID= naming a process
        // that is not systemd's child yet makes it SIGKILL on every later
        // stop (found under a real systemd: ci/systemd.sh).
        let main_pid = self.config.pid_file.is_none().then(sys::pid);
        self.systemd.ready(main_pid, generation);
        if let Some(link) = &mut self.channels.parent_link {
            if let Err(err) = sys::LinkWriter(link.as_fd()).write_all(&[READY]) {
                // The parent is gone (killed while we started): we are the
                // only generation now, and ready all the same.
                tracing::warn!(generation, error = %err, "parent gone before it heard we are ready");
                self.parent_gone();
            }
        }
        tracing::info!(generation, pid = sys::pid(), "ready");
        Ok(())
    }

    fn stop(&mut self) {
        if self.machine.phase() == Phase::Exiting {
            return;
        }
        let generation = self.config.generation;
        let serves_paths = self.machine.serves_paths();
        if self.machine.stop() {
            if let Some(inflight) = self.inflight.take() {
                let status = sys::kill_and_reap(inflight.pid);
                tracing::warn!(
                    generation,
                    pid = inflight.pid.as_raw(),
                    ?status,
                    "stop requested: killed the starting successor"
                );
                if let Some(waiter) = inflight.waiter {
                    let _ = waiter.send(Err(Error::Exiting));
                }
            }
        }
        // A final stop: nobody serves these paths after us. (A successor
        // stopped while it starts leaves them to its parent.)
        let paths = if serves_paths {
            lock(&self.registry).unix_paths()
        } else {
            Vec::new()
        };
        for path in paths {
            if let Err(err) = std::fs::remove_file(&path) {
                tracing::warn!(generation, path = %path.display(), error = %err, "cannot remove socket path");
            }
        }
        tracing::info!(generation, "stopping");
        self.systemd.stopping();
        self.channels.exit.send_replace(Some(ExitReason::Stopped));
    }

    fn on_upgrade_signal(&mut self) {
        let generation = self.config.generation;
        match self.machine.request_upgrade(Origin::Signal) {
            Decision::Start => self.start_upgrade(None),
            Decision::Hold => {
                tracing::info!(
                    generation,
                    "upgrade signal held until this generation is ready and its parent is gone"
                );
            }
            Decision::Refuse(refusal) => {
                let error = self.refusal_error(refusal);
                tracing::warn!(
                    generation,
                    reason = error.reason(),
                    "upgrade signal refused: {error}"
                );
            }
        }
    }

    fn on_parent_link(&mut self) {
        let Some(link) = &mut self.channels.parent_link else {
            return;
        };
        let mut buffer = vec![0u8; 64 * 1024];
        match link.read(&mut buffer) {
            Ok(0) => self.parent_gone(),
            Ok(n) => {
                // Bytes after the state belong to no protocol yet: ignored.
                if let Some(inbox) = &mut self.inbox {
                    match inbox.push(&buffer[..n]) {
                        Ok(false) => {}
                        Ok(true) => self.state_received(),
                        Err(problem) => self.state_lost(&problem),
                    }
                }
            }
            Err(err)
                if err.kind() == io::ErrorKind::WouldBlock
                    || err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => self.parent_gone(),
        }
    }

    fn state_received(&mut self) {
        if let Some(inbox) = self.inbox.take() {
            let (bytes, _) = inbox.progress();
            tracing::debug!(generation = self.config.generation, bytes, "state received");
            *self
                .channels
                .state
                .data
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = inbox.into_state();
            self.channels
                .state
                .status
                .send_replace(state::Status::Complete);
        }
    }

    fn state_lost(&mut self, problem: &str) {
        if let Some(inbox) = self.inbox.take() {
            let (received, expected) = inbox.progress();
            tracing::warn!(
                generation = self.config.generation,
                received,
                ?expected,
                problem,
                "state lost"
            );
            self.channels
                .state
                .status
                .send_replace(state::Status::Lost { received, expected });
        }
    }

    fn parent_gone(&mut self) {
        self.state_lost("the parent went away");
        self.channels.parent_link = None;
        tracing::info!(
            generation = self.config.generation,
            parent = self.config.parent,
            "parent exited"
        );
        self.channels.parent_gone.send_replace(true);
        if self.machine.parent_gone() {
            self.start_upgrade(None);
        }
    }

    fn start_upgrade(&mut self, waiter: Option<oneshot::Sender<Result<Upgraded>>>) {
        let generation = self.config.generation;
        let started = Instant::now();
        tracing::info!(generation, "upgrade started");
        self.systemd.reloading(generation);
        match self.spawn_successor() {
            Ok((pid, link, outbox)) => {
                tracing::info!(generation, pid = pid.as_raw(), "successor started");
                self.inflight = Some(Inflight {
                    pid,
                    link,
                    outbox,
                    link_closed: false,
                    started,
                    deadline: started + self.config.upgrade_timeout,
                    waiter,
                });
            }
            Err(error) => self.finish(Err(error), waiter),
        }
    }

    fn spawn_successor(&self) -> Result<(Pid, UnixStream, Option<Outbox>)> {
        let state = match &*self
            .config
            .state_provider
            .lock()
            .unwrap_or_else(|p| p.into_inner())
        {
            Some(provider) => (provider.0)(),
            None => Vec::new(),
        };
        if state.len() as u64 > state::MAX_STATE {
            return Err(Error::io(
                "handing over state",
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} bytes is more than the limit of 1 GiB", state.len()),
                ),
            ));
        }
        let (ours, theirs) =
            sys::link_pair().map_err(|e| Error::io("creating the handshake link", e))?;
        let registry = lock(&self.registry);
        let mut fds = Vec::with_capacity(registry.len());
        let mut named = Vec::with_capacity(registry.len());
        for (name, kind, fd, activated) in registry.handed_on() {
            fds.push(fd);
            named.push(InheritedFd {
                name: name.to_owned(),
                kind,
                activated,
            });
        }
        ours.set_nonblocking(true)
            .map_err(|e| Error::io("creating the handshake link", e))?;
        // Queued before the successor exists, so they wait for it on the link.
        sys::send_fds(ours.as_fd(), theirs.as_fd(), &fds)
            .map_err(|e| Error::io("sending descriptors on the handshake link", e))?;
        drop(registry);
        // As much of the state as the link takes now, also before the
        // successor exists (all of it, when it is small): a parent killed
        // while its successor starts leaves that much behind. The poll loop
        // writes the rest as the successor reads.
        let mut outbox = Outbox::new(state);
        let outbox = match outbox.write_some(sys::LinkWriter(ours.as_fd())) {
            Ok(true) => None,
            Ok(false) => Some(outbox),
            Err(e) => return Err(Error::io("handing over state", e)),
        };
        // The successor unblocks it whatever its own options say.
        let blocked = self.config.upgrade_signal;
        let inheritance = Inheritance {
            generation: self.config.generation + 1,
            parent: sys::pid(),
            link: sys::LINK_FD,
            blocked,
            fds: named,
        };
        let mut env: Vec<OsString> = std::env::vars_os()
            .filter(|(key, _)| !STALE_VARS.iter().any(|stale| key == stale))
            .map(|(mut key, value)| {
                key.push("=");
                key.push(value);
                key
            })
            .collect();
        env.push(format!("{}={}", wire::VAR, wire::encode(&inheritance)).into());
        let request = SpawnRequest {
            path: &self.config.executable,
            args: &self.config.args,
            env,
            link: theirs.as_fd(),
            blocked,
        };
        let pid = sys::spawn(&request).map_err(|source| Error::Spawn {
            path: self.config.executable.clone(),
            source,
        })?;
        Ok((pid, ours, outbox))
    }

    fn on_successor_link(&mut self) {
        let Some(inflight) = &mut self.inflight else {
            return;
        };
        if let Some(outbox) = &mut inflight.outbox {
            match outbox.write_some(sys::LinkWriter(inflight.link.as_fd())) {
                Ok(false) => {}
                Ok(true) => inflight.outbox = None,
                // It is gone or going: SIGCHLD brings its status.
                Err(_) => inflight.outbox = None,
            }
        }
        match read_link(&inflight.link) {
            LinkRead::Ready => {
                if let Some(inflight) = self.inflight.take() {
                    self.succeed(inflight, false);
                }
            }
            LinkRead::Unexpected(byte) => {
                let problem = format!("sent byte 0x{byte:02x} instead of the ready byte");
                self.fail_inflight(|pid| Error::Handshake { pid, problem });
            }
            LinkRead::Nothing => {}
            // EOF: it is exiting. SIGCHLD brings its status.
            LinkRead::Closed => inflight.link_closed = true,
        }
    }

    fn on_child_signal(&mut self) {
        if let Some((pid, _)) = &self.successor {
            if let Ok(Some(status)) = sys::try_reap(*pid) {
                tracing::error!(generation = self.config.generation, pid = pid.as_raw(), %status, "successor exited after it was ready");
                self.successor = None;
            }
        }
        let Some(inflight) = &self.inflight else {
            return;
        };
        match sys::try_reap(inflight.pid) {
            Ok(Some(status)) => {
                let Some(inflight) = self.inflight.take() else {
                    return;
                };
                // SIGCHLD and the ready byte can arrive in the same wake-up:
                // a successor that said it was ready and then exited was ready.
                if read_link(&inflight.link) == LinkRead::Ready {
                    tracing::error!(
                        generation = self.config.generation,
                        pid = inflight.pid.as_raw(),
                        %status,
                        "successor exited right after it was ready"
                    );
                    self.succeed(inflight, true);
                } else {
                    let error = Error::SuccessorExited {
                        pid: inflight.pid.as_raw(),
                        status,
                    };
                    self.finish(Err(error), inflight.waiter);
                }
            }
            Ok(None) => {} // another child of this process
            // Not ours to wait for any more (someone else reaped it): its
            // pid may name another process by now, so nothing kills it.
            Err(err) => {
                let Some(inflight) = self.inflight.take() else {
                    return;
                };
                let error = Error::Handshake {
                    pid: inflight.pid.as_raw(),
                    problem: format!("cannot wait for it: {err}"),
                };
                self.finish(Err(error), inflight.waiter);
            }
        }
    }

    /// The successor said it is ready: this generation must exit.
    fn succeed(&mut self, inflight: Inflight, already_reaped: bool) {
        let upgraded = Upgraded {
            pid: inflight.pid.as_raw(),
            generation: self.config.generation + 1,
            duration: inflight.started.elapsed(),
        };
        if !already_reaped {
            self.successor = Some((inflight.pid, inflight.link));
        }
        self.finish(Ok(upgraded), inflight.waiter);
    }

    fn on_deadline(&mut self) {
        let timeout = self.config.upgrade_timeout;
        self.fail_inflight(|pid| Error::Timeout { pid, timeout });
    }

    /// Kills and reaps the starting successor, then reports `error`.
    fn fail_inflight(&mut self, error: impl FnOnce(i32) -> Error) {
        let Some(inflight) = self.inflight.take() else {
            return;
        };
        if let Err(err) = sys::kill_and_reap(inflight.pid) {
            tracing::error!(pid = inflight.pid.as_raw(), error = %err, "cannot reap the successor");
        }
        self.finish(Err(error(inflight.pid.as_raw())), inflight.waiter);
    }

    fn finish(
        &mut self,
        outcome: Result<Upgraded>,
        waiter: Option<oneshot::Sender<Result<Upgraded>>>,
    ) {
        let generation = self.config.generation;
        self.machine.upgrade_finished(outcome.is_ok());
        match &outcome {
            Ok(upgraded) => {
                tracing::info!(
                    generation,
                    pid = upgraded.pid,
                    duration_us = upgraded.duration.as_micros() as u64,
                    "successor ready: this generation exits"
                );
                self.channels
                    .exit
                    .send_replace(Some(ExitReason::Upgraded(upgraded.clone())));
            }
            Err(error) => {
                tracing::warn!(
                    generation,
                    reason = error.reason(),
                    "upgrade failed: {error}"
                );
                self.restore_pid_file();
                self.systemd.upgrade_failed(generation, error);
            }
        }
        if let Some(waiter) = waiter {
            let _ = waiter.send(outcome);
        }
    }

    /// A successor may have written the PID file just before it failed; it
    /// must name the serving process again.
    fn restore_pid_file(&self) {
        let Some(path) = &self.config.pid_file else {
            return;
        };
        if pidfile::read(path) != Some(sys::pid()) {
            if let Err(err) = pidfile::write(path, sys::pid()) {
                tracing::error!(error = %err, "cannot restore the PID file");
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Source {
    Wake,
    ChildSignal,
    UpgradeSignal,
    StopSignal,
    Parent,
    Successor,
}

#[derive(Debug, PartialEq, Eq)]
enum LinkRead {
    Ready,
    Unexpected(u8),
    Nothing,
    Closed,
}

/// One non-blocking read of the successor's link.
fn read_link(mut link: &UnixStream) -> LinkRead {
    let mut byte = [0u8; 1];
    match link.read(&mut byte) {
        Ok(1) if byte[0] == READY => LinkRead::Ready,
        Ok(1) => LinkRead::Unexpected(byte[0]),
        Err(err)
            if err.kind() == io::ErrorKind::WouldBlock
                || err.kind() == io::ErrorKind::Interrupted =>
        {
            LinkRead::Nothing
        }
        _ => LinkRead::Closed,
    }
}

/// Empties a non-blocking self-pipe.
fn drain(mut stream: &UnixStream) {
    let mut buffer = [0u8; 64];
    while matches!(stream.read(&mut buffer), Ok(n) if n > 0) {}
}

/// The registry lock: a panic while it was held left nothing half-done that
/// matters here (each operation inserts or removes whole entries).
pub(crate) fn lock(registry: &Mutex<Registry>) -> std::sync::MutexGuard<'_, Registry> {
    registry
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
