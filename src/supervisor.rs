//! The supervisor: one thread per generation that runs every upgrade.
//!
//! It waits with `poll(2)` on events only (a command, the upgrade signal,
//! SIGCHLD, the handshake link to the parent and to the successor, the
//! upgrade deadline) and never polls on a timer. It owns the state machine
//! and the successor, so an upgrade runs to its end even if the caller of
//! `upgrade()` goes away, and only one ever runs at a time. A panic on
//! it fails an upgrade, never the service: see [`Supervisor::run`].

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::sync::{oneshot, watch};

use crate::error::{Error, Result};
use crate::exit_status::ExitStatus;
use crate::machine::{Decision, Machine, Origin, Phase, Refusal};
use crate::problem::{HandshakeProblem, StateProblem};
use crate::registry::Registry;
use crate::state::{self, Inbox, Outbox};
use crate::sys::{self, SpawnRequest};
use crate::systemd::Notifier;
use crate::wire::{self, Inheritance, InheritedFd};
use crate::{ExitReason, RolledBack, Upgraded, Verdict, pidfile};

/// The byte a successor sends on the link when it is ready.
const READY: u8 = b'R';
/// Variables a successor (or any other child) must not inherit from us.
pub(crate) const STALE_VARS: [&str; 4] = [wire::VAR, "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"];

pub(crate) enum Command {
    Upgrade(oneshot::Sender<Result<Upgraded>>),
    Ready(oneshot::Sender<Result<()>>),
    Stop,
    Shutdown,
    /// The `Upgrader` of a generation whose successor is ready was dropped:
    /// the thread serves on, unwatched, until the process exits, so that an
    /// upgrade signal in its last moments is still passed on. The sender is
    /// dropped once the drop is handled (the rollback window closed, the
    /// successor named): the `Upgrader`'s drop waits for that.
    Detach(std::sync::mpsc::SyncSender<()>),
}

/// What the supervisor needs, fixed at startup.
pub(crate) struct Config {
    pub generation: u64,
    pub parent: Option<i32>,
    pub executable: PathBuf,
    pub args: Vec<OsString>,
    pub upgrade_timeout: Duration,
    /// See `Options::rollback_window`; zero for none.
    pub rollback_window: Duration,
    pub pid_file: Option<PathBuf>,
    pub upgrade_signal: Option<Signal>,
    /// Start successors as our parent's child (`Options::successor_parent`).
    pub sibling: bool,
    /// This generation was started as the service manager's child (its
    /// parent process, at its start, was not the generation that started
    /// it): that generation names it when the upgrade commits, and it may
    /// name itself (`MAINPID=`) if that generation dies first.
    pub born_sibling: bool,
    /// No service manager may read the PID file (neither `INVOCATION_ID`
    /// nor `NOTIFY_SOCKET` is set): a successor of our own is named when
    /// the upgrade commits, as one started as the manager's child is,
    /// rather than at this process's exit.
    pub unsupervised: bool,
    /// Called at each upgrade for the bytes to hand over.
    pub state_provider: Arc<Mutex<Option<StateProvider>>>,
}

/// What gives the state to hand to a successor.
pub(crate) struct StateProvider(pub Box<dyn Fn() -> Vec<u8> + Send>);

impl StateProvider {
    /// The state to hand over. The service's code, on the supervisor's
    /// thread: its panic fails this upgrade only, before anything starts.
    fn call(&self) -> Result<Vec<u8>> {
        panic::catch_unwind(AssertUnwindSafe(|| (self.0)())).map_err(|payload| {
            Error::StateProviderPanicked {
                message: panic_message(payload.as_ref()),
            }
        })
    }
}

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
    /// The SIGCHLD handler's registration: a detached supervisor whose
    /// successor is gone removes it as it ends (see `run`).
    pub child_signal_id: signal_hook::SigId,
    pub parent_link: Option<UnixStream>,
    pub exit: watch::Sender<Option<ExitReason>>,
    /// Set before `exit` changes, so that whoever saw `exit` resolve sees
    /// the verdict that goes with it (or none yet).
    pub verdict: watch::Sender<Option<Verdict>>,
    pub parent_gone: watch::Sender<bool>,
    /// The state the parent hands over, filled as it arrives.
    pub state: Arc<state::Slot>,
    /// Set as the thread ends (not by a panic that kills it): a request
    /// whose answer is dropped from then on was not lost to a failure.
    pub ended: Arc<AtomicBool>,
}

/// The successor that became ready. Its link stays open until this process
/// exits (that EOF is how it learns we are gone), and carries the rest of
/// the state and the upgrade requests passed on to it.
struct Successor {
    process: sys::Child,
    link: UnixStream,
    outbox: Outbox,
}

/// The open rollback window of a generation whose successor is ready.
struct Window {
    upgraded: Upgraded,
    ready_at: Instant,
    /// `None` for a window longer than the clock can count: until closed.
    closes: Option<Instant>,
}

/// Panics in consecutive turns after which the supervisor gives up.
const PANICS_IN_A_ROW: u32 = 3;

/// A request whose answer was dropped unsent: the thread ended as it was
/// sent (`Exiting`), or a panic lost the answer with it.
pub(crate) fn request_dropped(ended: &AtomicBool) -> Error {
    if ended.load(Ordering::Acquire) {
        return Error::Exiting;
    }
    Error::SupervisorFailed {
        problem: "it panicked while it handled this request (see its ERROR log)".to_owned(),
    }
}

/// A successor that is starting.
struct Inflight {
    process: sys::Child,
    link: UnixStream,
    /// State still to write to the successor.
    outbox: Option<Outbox>,
    link_closed: bool,
    started: Instant,
    /// `None` for a timeout longer than the clock can count: no deadline.
    deadline: Option<Instant>,
    waiter: Option<oneshot::Sender<Result<Upgraded>>>,
}

pub(crate) struct Supervisor {
    config: Config,
    channels: Channels,
    registry: Arc<Mutex<Registry>>,
    machine: Machine,
    inflight: Option<Inflight>,
    successor: Option<Successor>,
    window: Option<Window>,
    systemd: Notifier,
    /// The parent's state, while it arrives.
    inbox: Option<Inbox>,
    /// Whether what the parent sends now are messages: the state has come.
    parent_messages: bool,
    /// See [`Command::Detach`].
    detached: bool,
    /// Every handle that could send a command is gone.
    wake_closed: bool,
    /// `stop()` is closing the rollback window: a successor found dead
    /// then is not rolled back to (see `lost_in_window`).
    closing_to_stop: bool,
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
            window: None,
            systemd: Notifier::from_env(),
            inbox,
            parent_messages: false,
            detached: false,
            wake_closed: false,
            closing_to_stop: false,
        }
    }

    /// Runs turns until the `Upgrader` is dropped.
    ///
    /// A panic in a turn (a bug, or code this thread calls, such as a
    /// tracing subscriber) is caught, and the turn's upgrade, if any, fails
    /// with `supervisor_failed`: what was half-done cannot be trusted, so the
    /// starting successor is killed and reaped. The next turn goes on, so one
    /// bad event does not end upgrades for good. A panic while recovering,
    /// [`PANICS_IN_A_ROW`] panics in a row (an event that panics each time it
    /// is looked at would spin) or a failing poll(2) fail the supervisor for
    /// good instead: see [`serve_failed`](Self::serve_failed).
    pub(crate) fn run(mut self) {
        let generation = self.config.generation;
        let mut panics_in_a_row = 0;
        let failure = loop {
            match panic::catch_unwind(AssertUnwindSafe(|| self.turn())) {
                Ok(Ok(true)) if self.done_detached() => break None,
                Ok(Ok(true)) => panics_in_a_row = 0,
                Ok(Ok(false)) => break None,
                // Only poll(2) itself can fail here; retrying at once
                // would spin.
                Ok(Err(err)) => break Some(format!("poll(2) failed: {err}")),
                Err(payload) => {
                    panics_in_a_row += 1;
                    let problem = format!("it panicked: {}", panic_message(payload.as_ref()));
                    guarded(|| {
                        tracing::error!(
                            generation,
                            %problem,
                            "supervisor panicked; the upgrade it ran, if any, failed"
                        );
                    });
                    let recovered =
                        panic::catch_unwind(AssertUnwindSafe(|| self.recover(&problem))).is_ok();
                    if !recovered || panics_in_a_row >= PANICS_IN_A_ROW {
                        break Some(problem);
                    }
                }
            }
        };
        if let Some(problem) = failure {
            self.serve_failed(&problem);
        }
        // A request sent from here on may find its answer dropped with the
        // channel: it is told `Exiting`, not that the thread failed.
        self.channels.ended.store(true, Ordering::Release);
        if let Some(inflight) = self.inflight.take() {
            let _ = inflight.process.kill_and_reap();
            if let Some(waiter) = inflight.waiter {
                let _ = waiter.send(Err(Error::Exiting));
            }
        }
        // The successor must see its link close when this process exits,
        // not when the `Upgrader` is dropped: until then the old code still
        // runs, and the successor must not start another generation, nor
        // take over the PID file. Close-on-exec, so no other child gets it.
        if let Some(successor) = self.successor.take() {
            let _ = successor.link.into_raw_fd();
        }
        while let Ok(command) = self.channels.commands.try_recv() {
            match command {
                Command::Upgrade(reply) => drop(reply.send(Err(Error::Exiting))),
                Command::Ready(reply) => drop(reply.send(Err(Error::Exiting))),
                Command::Stop | Command::Shutdown | Command::Detach(_) => {}
            }
        }
        if self.detached {
            // Nobody joins this thread, and the `Upgrader` forgot the
            // handlers (a late signal must not take a default action).
            // SIGCHLD's default is to be ignored: its handler goes, or every
            // later child's end would still wake a pipe nobody reads. The
            // stop signals' handler stays (SIGTERM's default would end the
            // process while it drains), and so does its pipe's read end, so
            // that a late one finds an open pipe (no EPIPE, no SIGPIPE)
            // until the process exits.
            signal_hook::low_level::unregister(self.channels.child_signal_id);
            if let Some(kept) = self.channels.stop_signal.take() {
                let _ = kept.into_raw_fd();
            }
            // Ended with an upgrade signal only if it failed: its handler
            // stays too, and writes into this pipe rather than a closed one.
            if let Some(kept) = self.channels.upgrade_signal.take() {
                let _ = kept.into_raw_fd();
            }
        }
    }

    /// A dropped generation's supervisor without an upgrade signal, whose
    /// successor is gone, has nothing left to do: it ends, and releases its
    /// thread and descriptors (a process that makes many generations, such
    /// as the bench, would otherwise keep one of each per generation, every
    /// one woken by each SIGCHLD). With an upgrade signal it stays until the
    /// process exits: the exit hook waits until every upgrade signal that
    /// came has been handled, and a late one would find nobody to handle
    /// it (a second's wait at exit).
    fn done_detached(&self) -> bool {
        self.detached
            && self.successor.is_none()
            && self.inflight.is_none()
            && self.channels.upgrade_signal.is_none()
    }

    /// After a panic in a turn, leaves no upgrade half-done.
    fn recover(&mut self, problem: &str) {
        let failed = || Error::SupervisorFailed {
            problem: problem.to_owned(),
        };
        if self.inflight.is_some() {
            self.fail_inflight(|_| failed());
        } else if self.machine.phase() == Phase::Upgrading {
            self.finish(Err(failed()), None);
        } else if self.machine.phase() == Phase::Stopping && self.channels.exit.borrow().is_none() {
            // A stop that panicked before `exit()` heard of it.
            self.stopped();
        }
    }

    /// The supervisor failed for good. It is never taken for a stop, which
    /// would make a correct service shut itself down: `exit()` stays
    /// unresolved and the service serves on. It starts no upgrade again but
    /// answers every request with `supervisor_failed`, and `stop()` and the
    /// stop signals still stop. Returns when the `Upgrader` is dropped.
    fn serve_failed(&mut self, problem: &str) {
        let generation = self.config.generation;
        // Detached, nobody asks anything any more, and the process exits.
        if self.detached {
            guarded(|| {
                tracing::error!(
                    generation,
                    problem,
                    "upgrade supervisor failed while exiting"
                )
            });
            return;
        }
        let failed = || Error::SupervisorFailed {
            problem: problem.to_owned(),
        };
        guarded(|| {
            tracing::error!(
                generation,
                problem,
                "upgrade supervisor failed: this generation serves on, but cannot upgrade until it restarts"
            );
        });
        if let Some(inflight) = self.inflight.take() {
            if let Err(err) = inflight.process.kill_and_reap() {
                guarded(
                    || tracing::error!(pid = inflight.process.raw_pid(), error = %err, "cannot reap the successor"),
                );
            }
            if let Some(waiter) = inflight.waiter {
                let _ = waiter.send(Err(failed()));
            }
            // It may have replaced the PID file before it was killed.
            guarded(|| self.restore_pid_file());
        }
        loop {
            let ready = {
                let mut watched = vec![(self.channels.wake.as_fd(), false)];
                if let Some(signal) = &self.channels.stop_signal {
                    watched.push((signal.as_fd(), false));
                }
                sys::poll(&watched, None)
            };
            let command = match ready {
                Ok(ready) => {
                    if ready.get(1) == Some(&true) {
                        if let Some(signal) = &self.channels.stop_signal {
                            drain(signal);
                        }
                        self.stop_even_if_it_panics();
                    }
                    drain(&self.channels.wake);
                    self.channels.commands.try_recv().ok()
                }
                // Commands only, then: their channel blocks without poll(2).
                Err(_) => match self.channels.commands.recv() {
                    Ok(command) => Some(command),
                    Err(_) => return,
                },
            };
            let mut next = command;
            while let Some(command) = next {
                match command {
                    Command::Upgrade(reply) => drop(reply.send(Err(failed()))),
                    Command::Ready(reply) => drop(reply.send(Err(failed()))),
                    Command::Stop => self.stop_even_if_it_panics(),
                    Command::Shutdown => return,
                    // Its handlers stay: `run` leaves them safe to call.
                    Command::Detach(_) => {
                        self.detached = true;
                        return;
                    }
                }
                next = self.channels.commands.try_recv().ok();
            }
        }
    }

    /// A final stop from a failed supervisor: `exit()` resolves even if the
    /// rest of the stop panics.
    fn stop_even_if_it_panics(&mut self) {
        guarded(|| self.stop());
        if self.channels.exit.borrow().is_none() {
            self.stopped();
        }
    }

    /// One wait and what follows it. `false` ends the thread.
    fn turn(&mut self) -> io::Result<bool> {
        // Signals before commands: one that came with the last command
        // (dropping the `Upgrader`) is handled all the same.
        // A stop first of all: a successor's end seen in the same turn is
        // then found by the stop as it closes a rollback window (a final
        // stop at once, see `lost_in_window`), rather than rolled back to
        // first; and an upgrade signal of the same turn is refused rather
        // than started and killed.
        let mut watched: Vec<(Source, (BorrowedFd<'_>, bool))> = Vec::new();
        if let Some(signal) = &self.channels.stop_signal {
            watched.push((Source::StopSignal, (signal.as_fd(), false)));
        }
        watched.push((
            Source::ChildSignal,
            (self.channels.child_signal.as_fd(), false),
        ));
        if let Some(signal) = &self.channels.upgrade_signal {
            watched.push((Source::UpgradeSignal, (signal.as_fd(), false)));
        }
        if let Some(link) = &self.channels.parent_link {
            watched.push((Source::Parent, (link.as_fd(), false)));
        }
        if let Some(inflight) = self.inflight.as_ref().filter(|i| !i.link_closed) {
            // Writable too while state remains to be sent.
            let sending = inflight.outbox.is_some();
            watched.push((Source::Successor, (inflight.link.as_fd(), sending)));
        }
        // A successor started as our parent's child sends no SIGCHLD: its
        // pidfd becomes readable when it exits.
        if let Some(exit) = self.inflight.as_ref().and_then(|i| i.process.exit_fd()) {
            watched.push((Source::ChildSignal, (exit, false)));
        }
        if let Some(exit) = self.successor.as_ref().and_then(|s| s.process.exit_fd()) {
            watched.push((Source::ChildSignal, (exit, false)));
        }
        if let Some(successor) = self.successor.as_ref().filter(|s| s.outbox.pending()) {
            watched.push((Source::ReadySuccessor, (successor.link.as_fd(), true)));
        }
        // Until every handle is gone (the pipe's other end closed, which
        // would wake poll(2) for ever): a detached generation's handles (a
        // control socket's task, an upgrade future) are still answered.
        if !self.wake_closed {
            watched.push((Source::Wake, (self.channels.wake.as_fd(), false)));
        }
        let deadline = [
            self.inflight.as_ref().and_then(|i| i.deadline),
            self.window.as_ref().and_then(|w| w.closes),
        ]
        .into_iter()
        .flatten()
        .min();
        let timeout = deadline.map(|deadline| deadline.saturating_duration_since(Instant::now()));
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
                Source::ReadySuccessor => self.write_to_successor(),
                Source::ChildSignal => {
                    drain(&self.channels.child_signal);
                    self.on_child_signal();
                }
                Source::Parent => self.on_parent_link(),
                Source::UpgradeSignal => self.on_upgrade_signals(),
                Source::StopSignal => {
                    if let Some(signal) = &self.channels.stop_signal {
                        drain(signal);
                    }
                    tracing::info!(generation = self.config.generation, "stop signal");
                    self.stop();
                }
                Source::Wake => {
                    self.wake_closed = drain(&self.channels.wake);
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
            .and_then(|i| i.deadline)
            .is_some_and(|deadline| Instant::now() >= deadline)
        {
            self.on_deadline();
        }
        if self
            .window
            .as_ref()
            .and_then(|w| w.closes)
            .is_some_and(|closes| Instant::now() >= closes)
        {
            self.commit("the rollback window passed");
        }
        Ok(true)
    }

    fn on_command(&mut self, command: Command) -> bool {
        if self.detached {
            // The generation was dropped: it starts nothing any more (not
            // even after a rollback at the drop), and nobody stops it.
            match command {
                Command::Upgrade(reply) => drop(reply.send(Err(Error::Exiting))),
                Command::Ready(reply) => drop(reply.send(Err(Error::Exiting))),
                Command::Stop | Command::Detach(_) => {}
                Command::Shutdown => return false,
            }
            return true;
        }
        match command {
            Command::Upgrade(reply) => match self.machine.request_upgrade(Origin::Call) {
                Decision::Start => self.start_upgrade(Some(reply)),
                Decision::Refuse(refusal) => {
                    let _ = reply.send(Err(self.refusal_error(refusal)));
                }
                Decision::Hold | Decision::Forward => {
                    unreachable!("calls are answered, never held or passed on")
                }
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
            // Handled when `_handled` goes, at the end of this arm.
            Command::Detach(_handled) => {
                tracing::debug!(
                    generation = self.config.generation,
                    "upgrader dropped: passing upgrade signals on until this process exits"
                );
                self.detached = true;
                // A successor this program reaped before dropping us (its
                // SIGCHLD handled while we were not detached: ECHILD, kept)
                // is gone for a dropped generation: look again, or this
                // thread would wait for some other child's end.
                self.on_child_signal();
                // Nobody would serve again: the successor is on its own.
                self.commit("the Upgrader was dropped");
                if !matches!(self.machine.phase(), Phase::Exiting | Phase::Stopping) {
                    // Its successor died as it was dropped in the window
                    // (rolled back above): nobody serves any more, and this
                    // generation cannot take back over. A final stop, so
                    // that `exit()` resolves for whoever still watches it
                    // (a control socket's task), rather than never.
                    self.stop();
                }
                if self.machine.phase() == Phase::Exiting {
                    // It holds every socket now (its own copies), and this
                    // generation hands nothing on: the library's copies go,
                    // rather than stay open until the process exits (an
                    // embedding process with many generations, such as the
                    // bench, ran out of descriptors).
                    lock(&self.registry).release_all();
                }
            }
        }
        true
    }

    fn refusal_error(&self, refusal: Refusal) -> Error {
        match refusal {
            Refusal::NotReady => Error::NotReady,
            Refusal::InProgress => Error::InProgress,
            Refusal::Exiting => Error::Exiting,
            Refusal::WindowOpen => Error::WindowOpen {
                successor: self.successor.as_ref().map_or(0, |s| s.process.raw_pid()),
            },
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
            Phase::Stopping => return Err(Error::Exiting),
            Phase::Serving | Phase::Upgrading | Phase::Window | Phase::Exiting => {
                return Err(Error::AlreadyReady);
            }
        }
        let generation = self.config.generation;
        lock(&self.registry).close_unclaimed(generation);
        // The PID file names this process from now on only if no parent
        // runs: a parent names us in it when the upgrade commits (see
        // `name_successor`), or, where a manager could read it while we are
        // still that parent's child, as its last act, when it exits (see
        // `pidfile::name_at_exit`).
        if self.machine.serves() {
            if let Some(path) = &self.config.pid_file {
                pidfile::write(path, sys::pid())?;
            }
        }
        // With a PID file, systemd learns of the new main process from it
        // when the old one exits; else from MAINPID=, which makes systemd
        // SIGKILL on every later stop when the process it names is not its
        // child yet (found under a real systemd: harness/tests/systemd.rs).
        // A successor started as the manager's child is named by its
        // parent when the upgrade commits (`name_successor`), not at ready:
        // within a rollback window the parent stays the main process.
        let named_by_parent = self.config.born_sibling && self.channels.parent_link.is_some();
        let main_pid = (self.config.pid_file.is_none() && !named_by_parent).then(sys::pid);
        self.systemd.ready(main_pid, generation);
        if let Some(link) = &mut self.channels.parent_link {
            if let Err(err) = sys::LinkWriter(link.as_fd()).write_all(&[READY]) {
                // The parent is gone (killed while we started): we are the
                // only generation now, and ready all the same.
                tracing::warn!(generation, error = %err, "parent gone before it heard we are ready");
                self.parent_gone();
                // It cannot name us in the PID file any more: we serve.
                self.take_over_pid_file();
            }
        }
        tracing::info!(generation, pid = sys::pid(), "ready");
        Ok(())
    }

    fn stop(&mut self) {
        if self.machine.phase() == Phase::Window {
            // The successor serves; a service manager that stops the whole
            // service stops it too, and that must not bring us back.
            self.closing_to_stop = true;
            self.commit("stop() closed the rollback window");
            self.closing_to_stop = false;
            // Committed; or the successor had died a moment before (its
            // end not handled yet), and `commit`, finding it gone, stopped
            // this generation without taking back over (`lost_in_window`).
            if matches!(self.machine.phase(), Phase::Exiting | Phase::Stopping) {
                return;
            }
        }
        self.stop_serving();
    }

    /// The rest of a stop, once no rollback window is open.
    fn stop_serving(&mut self) {
        let generation = self.config.generation;
        if matches!(self.machine.phase(), Phase::Exiting | Phase::Stopping) {
            // Leaving already; its successor (if any) serves.
            tracing::info!(generation, "stop asked while exiting: nothing to do");
            return;
        }
        // Only the generation that serves speaks for the service: a
        // successor stopped while it starts must not tell the manager the
        // whole service stops, nor remove the paths its parent serves.
        let serves = self.machine.serves();
        if self.machine.stop() {
            if let Some(inflight) = self.inflight.take() {
                let status = inflight.process.kill_and_reap();
                tracing::warn!(
                    generation,
                    pid = inflight.process.raw_pid(),
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
        if serves {
            for path in lock(&self.registry).unix_paths() {
                if let Err(err) = std::fs::remove_file(&path) {
                    tracing::warn!(generation, path = %path.display(), error = %err, "cannot remove socket path");
                }
            }
            self.systemd.stopping();
        }
        tracing::info!(generation, serves, "stopping");
        self.stopped();
    }

    /// `exit()` and `verdict()` say: a final stop.
    fn stopped(&self) {
        self.channels
            .verdict
            .send_replace(Some(Verdict::Exit(ExitReason::Stopped)));
        self.channels.exit.send_replace(Some(ExitReason::Stopped));
    }

    /// Closes the rollback window, if one is open: the successor serves
    /// for good, and this generation leaves.
    fn commit(&mut self, why: &'static str) {
        // A successor that died in the same moment as the window closed
        // (its end not handled yet) is rolled back, not named.
        if self.window.is_some() {
            self.on_child_signal();
            if self.window.is_none() {
                return;
            }
        }
        if !self.machine.commit() {
            return;
        }
        let Some(window) = self.window.take() else {
            return;
        };
        tracing::info!(
            generation = self.config.generation,
            successor = window.upgraded.pid,
            why,
            "upgrade committed: this generation exits"
        );
        if self
            .successor
            .as_ref()
            .is_some_and(|s| s.process.is_sibling() || self.config.unsupervised)
        {
            self.name_successor(window.upgraded.pid);
        }
        self.channels
            .verdict
            .send_replace(Some(Verdict::Exit(ExitReason::Upgraded(window.upgraded))));
    }

    /// The ready successor exited within the rollback window: this
    /// generation serves again, with the sockets it kept.
    fn roll_back(&mut self, pid: Pid, status: ExitStatus) {
        let Some(window) = self.window.take() else {
            return;
        };
        let Some(start_passed_on) = self.machine.successor_lost() else {
            return;
        };
        let generation = self.config.generation;
        let rolled_back = RolledBack {
            pid: pid.as_raw(),
            generation: window.upgraded.generation,
            status,
            served: window.ready_at.elapsed(),
        };
        tracing::error!(
            generation,
            successor = rolled_back.pid,
            %status,
            served_ms = rolled_back.served.as_millis() as u64,
            "successor exited within the rollback window: this generation serves again"
        );
        // The PID file names us still (the successor never wrote it while
        // we live); the exit hook must not name the dead successor.
        self.restore_pid_file();
        self.systemd.rolled_back(generation, &rolled_back);
        // `exit` first: whoever sees the verdict then waits for a new exit.
        self.channels.exit.send_replace(None);
        self.channels
            .verdict
            .send_replace(Some(Verdict::RolledBack(rolled_back)));
        if start_passed_on {
            // An upgrade request passed on to the successor during the
            // window died with it: it is this generation's again, and runs
            // now (the binary on disk may be a fixed one).
            tracing::info!(
                generation,
                "an upgrade request passed on to the dead successor runs here"
            );
            self.start_upgrade(None);
        }
    }

    /// The successor died within the rollback window (`status`; `None`: the
    /// program reaped it) as the window closed for a stop, or after this
    /// generation's `Upgrader` was dropped. This generation does not take
    /// back over (it is asked to stop, or cannot serve any more), and
    /// nobody else serves: a final stop, rather than a rollback followed by
    /// one (whose `RolledBack` would tell watchers for a moment to serve
    /// again, and whose passed-on upgrade would start a successor only to
    /// kill it).
    fn lost_in_window(&mut self, pid: Pid, status: Option<ExitStatus>) {
        if self.window.take().is_none() || self.machine.successor_lost().is_none() {
            return;
        }
        tracing::error!(
            generation = self.config.generation,
            successor = pid.as_raw(),
            status = %status.map_or_else(|| "reaped by this program".to_owned(), |s| s.to_string()),
            "successor exited within the rollback window as this generation was leaving: nobody serves"
        );
        self.restore_pid_file();
        self.stop_serving();
    }

    /// The upgrade signal, or a request the parent passed on (`from` says
    /// which, for the log): never lost, only held or passed on, unless this
    /// generation stops.
    fn on_upgrade_request(&mut self, from: &'static str) {
        let generation = self.config.generation;
        match self.machine.request_upgrade(Origin::Signal) {
            Decision::Start => self.start_upgrade(None),
            Decision::Hold => {
                tracing::info!(
                    generation,
                    from,
                    "upgrade request held until this generation is ready, its parent is gone and no upgrade runs"
                );
            }
            Decision::Forward => self.forward_upgrade(from),
            Decision::Refuse(refusal) => {
                let error = self.refusal_error(refusal);
                tracing::warn!(
                    generation,
                    from,
                    reason = error.reason(),
                    "upgrade request refused: {error}"
                );
            }
        }
    }

    /// The upgrade signal's pipe is readable: one request for however many
    /// signals came, and the count of those handled for the last moments
    /// (see [`settle_at_exit`]).
    fn on_upgrade_signals(&mut self) {
        loop {
            let seen = sys::upgrade_signals();
            if let Some(signal) = &self.channels.upgrade_signal {
                drain(signal);
            }
            self.note_signal_sender();
            self.on_upgrade_request("upgrade signal");
            signals_handled(seen);
            // One that came while this one was handled may have had its
            // wake-up byte drained with the others.
            if sys::upgrade_signals() == seen {
                return;
            }
        }
    }

    /// An upgrade signal from a sibling (systemd's `ExecReload=` command)
    /// must have been handled by the manager before the PID file changes.
    fn note_signal_sender(&self) {
        let sender = sys::take_upgrade_signal_sender();
        // Without a manager to read the file, it is never named at exit
        // (see `succeed`): no `/proc` read on the way to the spawn.
        if self.config.pid_file.is_none() || self.config.unsupervised {
            return;
        }
        if let Some(sibling) = sender.and_then(sys::sibling) {
            tracing::debug!(
                generation = self.config.generation,
                sender = sibling.pid,
                "upgrade signal from a sibling process: the PID file changes only once it is reaped"
            );
            pidfile::wait_at_exit_for(sibling);
        }
    }

    /// Passes an upgrade request on to the ready successor, which serves
    /// next and runs it once this generation is gone. A service manager
    /// that sent it (`Type=notify-reload`) hears `RELOADING=1` now and
    /// `READY=1` from the generation that upgrade starts.
    fn forward_upgrade(&mut self, from: &'static str) {
        let generation = self.config.generation;
        let Some(successor) = &mut self.successor else {
            tracing::error!(
                generation,
                from,
                "upgrade request while exiting, but the successor is gone: dropped"
            );
            return;
        };
        tracing::info!(
            generation,
            from,
            successor = successor.process.raw_pid(),
            "upgrade request passed on to the successor, which runs it once this generation is gone"
        );
        successor.outbox.push_message(state::FORWARDED_UPGRADE);
        self.systemd.reloading(generation + 1);
        self.write_to_successor();
    }

    fn write_to_successor(&mut self) {
        let Some(successor) = &mut self.successor else {
            forward_unsent(false);
            return;
        };
        if let Err(error) = successor
            .outbox
            .write_some(sys::LinkWriter(successor.link.as_fd()))
        {
            tracing::error!(
                generation = self.config.generation,
                successor = successor.process.raw_pid(),
                %error,
                "cannot write to the successor: it has gone"
            );
            // Nothing more can be sent to it.
            successor.outbox = Outbox::sent();
        }
        // A request passed on waits behind the rest of the state: the exit
        // hook must not end the process before it is written.
        forward_unsent(successor.outbox.message_pending());
    }

    fn on_parent_link(&mut self) {
        let Some(link) = &mut self.channels.parent_link else {
            return;
        };
        let mut buffer = vec![0u8; 64 * 1024];
        match link.read(&mut buffer) {
            Ok(0) => self.parent_gone(),
            Ok(n) => {
                let mut messages = &buffer[..n];
                if let Some(inbox) = &mut self.inbox {
                    match inbox.push(messages) {
                        Ok((false, _)) => messages = &[],
                        Ok((true, used)) => {
                            messages = &messages[used..];
                            self.state_received();
                        }
                        Err(problem) => {
                            messages = &[];
                            self.state_lost(problem);
                        }
                    }
                }
                // After a broken state frame, nothing more can be read.
                let messages = if self.parent_messages {
                    messages.to_vec()
                } else {
                    Vec::new()
                };
                for message in messages {
                    self.on_parent_message(message);
                }
            }
            Err(err)
                if err.kind() == io::ErrorKind::WouldBlock
                    || err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => self.parent_gone(),
        }
    }

    fn on_parent_message(&mut self, message: u8) {
        match message {
            state::FORWARDED_UPGRADE => self.on_upgrade_request("passed on by the parent"),
            other => tracing::warn!(
                generation = self.config.generation,
                message = other,
                "unknown message from the parent: ignored"
            ),
        }
    }

    fn state_received(&mut self) {
        self.parent_messages = true;
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

    fn state_lost(&mut self, problem: StateProblem) {
        if let Some(inbox) = self.inbox.take() {
            let (received, expected) = inbox.progress();
            tracing::warn!(
                generation = self.config.generation,
                received,
                ?expected,
                %problem,
                "state lost"
            );
            self.channels
                .state
                .status
                .send_replace(state::Status::Lost {
                    received,
                    expected,
                    problem,
                });
        }
    }

    fn parent_gone(&mut self) {
        self.state_lost(StateProblem::ParentGone);
        self.channels.parent_link = None;
        tracing::info!(
            generation = self.config.generation,
            parent = self.config.parent,
            "parent exited"
        );
        self.channels.parent_gone.send_replace(true);
        // The parent names us in the PID file as it exits; one that died
        // without exiting (a signal) could not, so do it now if we serve.
        // Born the manager's child, we may also tell it MAINPID= (one of
        // our own parent's children learns of its death on the link before
        // the kernel has handed it to the manager: not then). The machine
        // hears of it first: a generation serves only once its parent is
        // gone.
        let start_held = self.machine.parent_gone();
        if self.machine.phase() != Phase::Initializing && self.machine.serves() {
            self.take_over_pid_file();
            if self.config.born_sibling {
                self.systemd.main_pid(sys::pid());
            }
        }
        if start_held {
            self.start_upgrade(None);
        }
    }

    fn take_over_pid_file(&self) {
        let Some(path) = &self.config.pid_file else {
            return;
        };
        if pidfile::read(path) != Some(sys::pid()) {
            tracing::warn!(
                generation = self.config.generation,
                path = %path.display(),
                "the parent left without naming this generation in the PID file: written now"
            );
            if let Err(error) = pidfile::write(path, sys::pid()) {
                tracing::error!(%error, "cannot write the PID file");
            }
        }
    }

    fn start_upgrade(&mut self, waiter: Option<oneshot::Sender<Result<Upgraded>>>) {
        let generation = self.config.generation;
        let started = Instant::now();
        tracing::info!(generation, "upgrade started");
        self.systemd.reloading(generation);
        match self.spawn_successor() {
            Ok((process, link, outbox)) => {
                let pid = process.pid;
                // Recorded before anything else can panic: a successor
                // that exists is always killed and reaped if it fails.
                self.inflight = Some(Inflight {
                    process,
                    link,
                    outbox,
                    link_closed: false,
                    started,
                    deadline: started.checked_add(self.config.upgrade_timeout),
                    waiter,
                });
                tracing::info!(generation, pid = pid.as_raw(), "successor started");
            }
            Err(error) => self.finish(Err(error), waiter),
        }
    }

    fn spawn_successor(&self) -> Result<(sys::Child, UnixStream, Option<Outbox>)> {
        let state = match &*self
            .config
            .state_provider
            .lock()
            .unwrap_or_else(|p| p.into_inner())
        {
            Some(provider) => provider.call()?,
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
        let process = sys::spawn(&request, self.config.sibling).map_err(|source| Error::Spawn {
            path: self.config.executable.clone(),
            source,
        })?;
        Ok((process, ours, outbox))
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
            LinkRead::Ready => self.ready_byte_read(),
            LinkRead::Unexpected(byte) => {
                let problem = HandshakeProblem::UnexpectedByte { byte };
                self.fail_inflight(|pid| Error::Handshake { pid, problem });
            }
            LinkRead::Nothing => {}
            // EOF: it is exiting. SIGCHLD brings its status.
            LinkRead::Closed => inflight.link_closed = true,
        }
    }

    fn on_child_signal(&mut self) {
        if let Some(successor) = &self.successor {
            let pid = successor.process.pid;
            // `Some(status)` once it is gone; `Some(None)` when someone else
            // (an embedding program waiting for its children) reaped it:
            // gone all the same, for a dropped generation that hands
            // nothing on any more.
            let gone = match successor.process.try_reap() {
                Ok(Some(status)) => Some(Some(status)),
                Err(_) if self.detached => Some(None),
                Ok(None) | Err(_) => None,
            };
            if let Some(status) = gone {
                pidfile::forget_at_exit(pid.as_raw());
                // Its link is closed by the kernel; ours may go now.
                self.successor = None;
                forward_unsent(false);
                match status {
                    _ if self.window.is_some() && (self.detached || self.closing_to_stop) => {
                        self.lost_in_window(pid, status);
                    }
                    Some(status) if self.window.is_some() => self.roll_back(pid, status),
                    Some(status) => {
                        tracing::error!(generation = self.config.generation, pid = pid.as_raw(), %status, "successor exited after it was ready");
                    }
                    None => {}
                }
            }
        }
        let Some(inflight) = &self.inflight else {
            return;
        };
        match inflight.process.try_reap() {
            Ok(Some(status)) => {
                let Some(inflight) = self.inflight.take() else {
                    return;
                };
                // SIGCHLD and the ready byte can arrive in the same wake-up.
                // Either way it is gone before this generation heard it was
                // ready: were it to leave, nobody would serve.
                let said_ready = read_link(&inflight.link) == LinkRead::Ready;
                self.successor_exited(inflight, status, said_ready);
            }
            Ok(None) => {} // another child of this process
            // Not ours to wait for any more (someone else reaped it): its
            // pid may name another process by now, so nothing kills it.
            Err(err) => {
                let Some(inflight) = self.inflight.take() else {
                    return;
                };
                let error = Error::Handshake {
                    pid: inflight.process.raw_pid(),
                    problem: HandshakeProblem::unwaitable(&err),
                };
                self.finish(Err(error), inflight.waiter);
            }
        }
    }

    /// The starting successor exited (`said_ready`: after its ready byte,
    /// but before this generation heard it): the upgrade fails.
    fn successor_exited(&mut self, inflight: Inflight, status: ExitStatus, said_ready: bool) {
        if said_ready {
            tracing::warn!(
                generation = self.config.generation,
                pid = inflight.process.raw_pid(),
                %status,
                "successor said it was ready but had exited before we heard it; serving on"
            );
        }
        let error = Error::SuccessorExited {
            pid: inflight.process.raw_pid(),
            status,
        };
        self.finish(Err(error), inflight.waiter);
    }

    /// The starting successor's ready byte was read. It succeeds if it is
    /// still alive now (if it dies a moment later, it was ready all the
    /// same); one already gone would leave nobody serving once this
    /// generation left, so that upgrade fails and this generation serves on.
    fn ready_byte_read(&mut self) {
        let Some(inflight) = self.inflight.take() else {
            return;
        };
        match inflight.process.try_reap() {
            Ok(None) => self.succeed(inflight),
            Ok(Some(status)) => self.successor_exited(inflight, status, true),
            Err(err) => {
                self.inflight = Some(inflight);
                let problem = HandshakeProblem::unwaitable(&err);
                self.fail_inflight(|pid| Error::Handshake { pid, problem });
            }
        }
    }

    /// The successor said it is ready: this generation must exit.
    fn succeed(&mut self, inflight: Inflight) {
        let upgraded = Upgraded {
            pid: inflight.process.raw_pid(),
            generation: self.config.generation + 1,
            duration: inflight.started.elapsed(),
        };
        if inflight.process.is_sibling() || self.config.unsupervised {
            // The manager's child already, or no manager to read the file
            // while the successor is ours: named now, or when the rollback
            // window closes (see `name_successor`). A script's
            // `kill -HUP $(cat PIDFILE)` then reaches the serving generation.
            if self.config.rollback_window.is_zero() {
                self.name_successor(upgraded.pid);
            }
        } else if let Some(path) = &self.config.pid_file {
            pidfile::name_at_exit(path, inflight.process.raw_pid());
        }
        // Registered after the PID file's hook, so run before it.
        static SETTLE: std::sync::Once = std::sync::Once::new();
        SETTLE.call_once(|| {
            SETTLE_PID.get_or_init(sys::pid);
            if let Err(error) = sys::at_exit(settle_at_exit) {
                tracing::error!(%error, "cannot arrange to pass on upgrade signals at exit");
            }
        });
        // What is left of the state goes on to the ready successor.
        let outbox = inflight.outbox.unwrap_or_else(Outbox::sent);
        self.successor = Some(Successor {
            process: inflight.process,
            link: inflight.link,
            outbox,
        });
        self.finish(Ok(upgraded), inflight.waiter);
    }

    fn on_deadline(&mut self) {
        let Some(inflight) = &self.inflight else {
            return;
        };
        tracing::debug!(
            generation = self.config.generation,
            pid = inflight.process.raw_pid(),
            "upgrade deadline passed"
        );
        // The ready byte may have come since poll(2) timed out: a successor
        // that is ready, and may be accepting already, is not killed.
        match read_link(&inflight.link) {
            LinkRead::Ready => return self.ready_byte_read(),
            LinkRead::Unexpected(byte) => {
                let problem = HandshakeProblem::UnexpectedByte { byte };
                return self.fail_inflight(|pid| Error::Handshake { pid, problem });
            }
            LinkRead::Nothing | LinkRead::Closed => {}
        }
        let timeout = self.config.upgrade_timeout;
        self.fail_inflight(|pid| Error::Timeout { pid, timeout });
    }

    /// Kills and reaps the starting successor, then reports `error`.
    fn fail_inflight(&mut self, error: impl FnOnce(i32) -> Error) {
        let Some(inflight) = self.inflight.take() else {
            return;
        };
        if let Err(err) = inflight.process.kill_and_reap() {
            tracing::error!(pid = inflight.process.raw_pid(), error = %err, "cannot reap the successor");
        }
        self.finish(Err(error(inflight.process.raw_pid())), inflight.waiter);
    }

    fn finish(
        &mut self,
        outcome: Result<Upgraded>,
        waiter: Option<oneshot::Sender<Result<Upgraded>>>,
    ) {
        let generation = self.config.generation;
        let window = self.config.rollback_window;
        let next = self
            .machine
            .upgrade_finished(outcome.is_ok(), !window.is_zero());
        // An upgrade signal held while this upgrade ran goes to the
        // successor now, before `exit()` resolves: from then on the service
        // may drain and return from `main` at once, and the process would
        // take the request with it while this thread was still on its way
        // to pass it on (seen on a loaded machine: the held signal lost, no
        // next upgrade). Its count was settled when it was held, so the
        // exit hook does not wait for it.
        if next == Some(Decision::Forward) {
            self.forward_upgrade("held while the upgrade ran");
        }
        match &outcome {
            Ok(upgraded) if self.machine.phase() == Phase::Window => {
                tracing::info!(
                    generation,
                    pid = upgraded.pid,
                    duration_us = upgraded.duration.as_micros() as u64,
                    window_ms = window.as_millis() as u64,
                    "successor ready: this generation stops accepting, and takes back over if it exits within the rollback window"
                );
                let ready_at = Instant::now();
                self.window = Some(Window {
                    upgraded: upgraded.clone(),
                    ready_at,
                    closes: ready_at.checked_add(window),
                });
                self.channels.verdict.send_replace(None);
                self.channels
                    .exit
                    .send_replace(Some(ExitReason::Upgraded(upgraded.clone())));
            }
            Ok(upgraded) => {
                tracing::info!(
                    generation,
                    pid = upgraded.pid,
                    duration_us = upgraded.duration.as_micros() as u64,
                    "successor ready: this generation exits"
                );
                self.channels
                    .verdict
                    .send_replace(Some(Verdict::Exit(ExitReason::Upgraded(upgraded.clone()))));
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
        // An upgrade signal that came while this one ran, which failed.
        if next == Some(Decision::Start) {
            tracing::info!(generation, "a held upgrade request runs now");
            self.start_upgrade(None);
        }
    }

    /// The successor, started as the manager's child (or with no manager
    /// to read the file), serves for good:
    /// the PID file and the manager (`MAINPID=`, sent by this generation,
    /// the main process until now) learn of it at once, not at this
    /// generation's exit. Both are the manager's children, so whenever it
    /// reads the file it finds its own child; and its main process moves
    /// now, so that a later `kill -HUP $MAINPID` reaches the successor
    /// rather than this draining, soon exiting, generation.
    fn name_successor(&self, successor: i32) {
        if let Some(path) = &self.config.pid_file {
            if let Err(error) = pidfile::write(path, successor) {
                tracing::error!(%error, successor, "cannot name the successor in the PID file");
            }
        }
        self.systemd.main_pid(successor);
        tracing::info!(
            generation = self.config.generation,
            successor,
            "successor named the main process"
        );
    }

    /// The PID file must name the serving process. (A starting successor
    /// does not write it while this generation lives; this is a guard
    /// against anything else that did.)
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
    ReadySuccessor,
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

/// Runs `f`, ignoring a panic in it: for what a failing supervisor still
/// does (log, restore the PID file) when the code it calls may panic too.
fn guarded(f: impl FnOnce()) {
    let _ = panic::catch_unwind(AssertUnwindSafe(f));
}

/// What a panic said, for a log line or an error.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

/// Empties a non-blocking self-pipe; `true` if its other end is closed.
fn drain(mut stream: &UnixStream) -> bool {
    let mut buffer = [0u8; 64];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Upgrade signals handled by the supervisor (see `on_upgrade_signals`).
static SIGNALS_HANDLED: Mutex<u64> = Mutex::new(0);
static SIGNALS_HANDLED_CHANGED: std::sync::Condvar = std::sync::Condvar::new();
/// The process that registered [`settle_at_exit`].
static SETTLE_PID: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
/// How long the exit waits for the supervisor to pass a signal on.
const SETTLE_AT_EXIT: Duration = Duration::from_secs(1);

/// A request passed on to the ready successor is queued on its link behind
/// bytes not yet written (a large state it is still reading): the exit
/// hook waits (boundedly) for it to go.
static FORWARD_UNSENT: Mutex<bool> = Mutex::new(false);
static FORWARD_UNSENT_CHANGED: std::sync::Condvar = std::sync::Condvar::new();

fn forward_unsent(unsent: bool) {
    let mut current = FORWARD_UNSENT.lock().unwrap_or_else(|p| p.into_inner());
    if *current != unsent {
        *current = unsent;
        FORWARD_UNSENT_CHANGED.notify_all();
    }
}

fn signals_handled(count: u64) {
    let mut handled = SIGNALS_HANDLED.lock().unwrap_or_else(|p| p.into_inner());
    *handled = (*handled).max(count);
    SIGNALS_HANDLED_CHANGED.notify_all();
}

/// At the exit of a generation whose successor is ready: an upgrade signal
/// whose handler ran but which the supervisor thread has not yet passed on
/// would die with the process, and so would one passed on but still queued
/// on the link behind the rest of the state. Waits (boundedly, a second in
/// all) until it has gone. One that comes after this, in the last
/// microseconds of `exit`, is lost: nothing of this process runs any more
/// to pass it on.
extern "C" fn settle_at_exit() {
    // Only in the process that registered it, not in a child forked from it
    // that calls exit(3).
    if sys::pid() != *SETTLE_PID.get_or_init(sys::pid) {
        return;
    }
    let _ = std::panic::catch_unwind(|| {
        let deadline = Instant::now() + SETTLE_AT_EXIT;
        let handled = wait_until(&SIGNALS_HANDLED, &SIGNALS_HANDLED_CHANGED, deadline, |n| {
            *n >= sys::upgrade_signals()
        });
        if handled {
            wait_until(
                &FORWARD_UNSENT,
                &FORWARD_UNSENT_CHANGED,
                deadline,
                |unsent| !*unsent,
            );
        }
    });
}

/// Waits on `changed` until `done` holds for `value` or `deadline` has
/// passed; whether it holds.
fn wait_until<T>(
    value: &Mutex<T>,
    changed: &std::sync::Condvar,
    deadline: Instant,
    done: impl Fn(&T) -> bool,
) -> bool {
    let mut value = value.lock().unwrap_or_else(|p| p.into_inner());
    while !done(&value) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        value = changed
            .wait_timeout(value, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    true
}

/// The registry lock: a panic while it was held left nothing half-done that
/// matters here (each operation inserts or removes whole entries).
pub(crate) fn lock(registry: &Mutex<Registry>) -> std::sync::MutexGuard<'_, Registry> {
    registry
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
