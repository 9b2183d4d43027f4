//! The control socket: a deploy script asks for an upgrade and is told
//! whether it worked.
//!
//! A Unix stream socket (mode 0600, handed over like any listener, removed
//! on a final stop). Requests from another user are refused by their peer
//! credentials. One request per line, at most [`MAX_REQUEST`] bytes:
//!
//! ```text
//! > upgrade
//! < ok pid=4250 generation=3 duration_us=2817 old_pid=4242
//! < error reason=successor_exited message=successor pid 4250 exited with code 1 before it was ready
//! > status
//! < ok pid=4242 generation=2
//! ```
//!
//! An upgrade starts when its request is read; a request while one runs is
//! answered `in_progress`. One that reaches a generation whose parent still
//! drains waits until the parent is gone, and then runs (as an upgrade
//! signal would be held). A client that hangs up before its answer does not
//! cancel the upgrade it asked for, and leaves nothing behind. `handover
//! upgrade --socket PATH` is the client.
//!
//! After `ok` for an upgrade, the old generation (`old_pid`) keeps the
//! connection open until its process exits, so the kernel closes it then:
//! a client that reads to the end knows the old code has stopped running.
//!
//! With a [rollback window](crate::Options::rollback_window), `ok` says
//! `window_ms=`, and a second line follows when the window has passed or
//! the successor has died in it:
//!
//! ```text
//! > upgrade
//! < ok pid=4250 generation=3 duration_us=2817 old_pid=4242 window_ms=5000
//! < committed pid=4250 generation=3
//! ```
//! or
//! ```text
//! < rolled_back pid=4250 generation=3 served_ms=130 message=successor pid 4250 (generation 3) exited with code 101 130 ms after it was ready
//! ```
//! after which the old generation serves again and closes the connection;
//! or, when the successor died in the window and the service was stopped
//! (or the old generation dropped its `Upgrader`) as it did, so that nobody
//! serves:
//! ```text
//! < stopped pid=4250 generation=3 message=...
//! ```
//!
//! Every accepted request is answered. A generation that must exit stops
//! accepting (its successor, holding the same socket, accepts from then
//! on) and answers what it had already accepted before
//! [`serve`](ControlSocket::serve) returns: an `upgrade` that reached it in
//! its last moments gets `error reason=exiting`, which means nothing was
//! done; that connection too stays open until this process exits, and the
//! request should then be sent again (the `handover` client does so).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::os::fd::IntoRawFd;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::upgrader::SupervisorHandle;
use crate::{ExitReason, Upgrader, Verdict};

/// The name under which the control socket is handed over.
pub const CONTROL_NAME: &str = "handover.control";
/// Longest request line, newline included.
pub const MAX_REQUEST: usize = 1024;
/// A client has this long to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Once this generation must exit, requests it already accepted have this
/// long to arrive and be answered; a client slower than that is cut off.
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// How long a listener is left unaccepted after an accept failed for want
/// of descriptors or memory (here and in the drain's accept loop): long
/// enough not to spin, short against a client's connect timeout.
pub(crate) const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// A control socket, ready to [`serve`](ControlSocket::serve).
#[derive(Debug)]
pub struct ControlSocket {
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
    supervisor: SupervisorHandle,
    exit: watch::Receiver<Option<ExitReason>>,
    verdict: watch::Receiver<Option<Verdict>>,
    parent_gone: watch::Receiver<bool>,
    generation: u64,
}

impl Upgrader {
    /// The control socket at `path`: inherited from the parent generation,
    /// or created with mode 0600. Serve it with
    /// `tokio::spawn(control.serve())` after [`ready`](Upgrader::ready), and
    /// await that task before returning from `main`.
    ///
    /// # Errors
    /// [`Error::Bind`] if the socket cannot be created or its mode set;
    /// [`Error::WrongKind`] if its name (`handover.control`) is taken by
    /// another kind of descriptor; [`Error::Io`] if the descriptor cannot be
    /// duplicated.
    pub fn control_socket(&self, path: impl AsRef<Path>) -> Result<ControlSocket> {
        let path = path.as_ref();
        // An inherited socket keeps the mode it has (0600 from the
        // generation that made it, or a socket unit's `SocketMode=`): no
        // path lookup on the successor's way to `ready()`. One bound here
        // (also in place of an inherited one at another path) is made 0600.
        let (listener, bound) = self.unix_listener_bound(CONTROL_NAME, path)?;
        if bound {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
                |source| Error::Bind {
                    name: CONTROL_NAME.into(),
                    addr: path.display().to_string(),
                    source,
                },
            )?;
        }
        Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
            supervisor: self.handle(),
            exit: self.exit_watch(),
            verdict: self.verdict_watch(),
            parent_gone: self.parent_gone_watch(),
            generation: self.generation(),
        })
    }
}

impl ControlSocket {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers requests until this generation must exit; then the successor
    /// (which holds the same socket) answers them. Returns once the requests
    /// this generation accepted are answered (at most a second after it must
    /// exit, or after the verdict with a rollback window; after a rollback
    /// it answers again, until it must exit or its `Upgrader` is dropped):
    /// spawn it after [`ready`](Upgrader::ready), and
    /// await its task before returning from `main`, so that no client is
    /// left without an answer.
    ///
    /// # Panics
    /// If polled outside a tokio runtime with I/O and time enabled, as
    /// tokio's own sockets and timers do.
    pub async fn serve(self) {
        let listener = match UnixListener::from_std(self.listener) {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(%error, "cannot serve the control socket");
                return;
            }
        };
        let mut exit = self.exit;
        let mut verdict = self.verdict;
        let mut answering = tokio::task::JoinSet::new();
        loop {
            let event = tokio::select! {
                // Exit first: once it is due, accept nothing more.
                biased;
                due = exit.wait_for(Option::is_some) => Event::MustExit {
                    // `exit`'s sender gone: the supervisor has ended (the
                    // `Upgrader` was dropped), so nobody could take back over.
                    supervisor_gone: due.is_err(),
                },
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => Event::Accepted(stream),
                    Err(error) => Event::AcceptFailed(error),
                },
                // Reap finished answers as they end.
                Some(_) = answering.join_next(), if !answering.is_empty() => Event::Answered,
            };
            let supervisor_gone = match event {
                Event::MustExit { supervisor_gone } => supervisor_gone,
                Event::Accepted(stream) => {
                    answering.spawn(answer(
                        stream,
                        self.supervisor.clone(),
                        Watches {
                            parent_gone: self.parent_gone.clone(),
                            exit: exit.clone(),
                            verdict: verdict.clone(),
                        },
                        self.generation,
                    ));
                    continue;
                }
                // Out of descriptors (EMFILE, ENFILE, ENOBUFS): the
                // connection stays queued and would fail again at once, in
                // a loop. Accept again a little later (an exit due meanwhile
                // is seen at once, first in the next wait).
                Event::AcceptFailed(error) => {
                    tracing::warn!(generation = self.generation, %error, "control socket: cannot accept; pausing");
                    tokio::select! {
                        biased;
                        _ = exit.wait_for(Option::is_some) => {}
                        () = tokio::time::sleep(ACCEPT_PAUSE) => {}
                    }
                    continue;
                }
                Event::Answered => continue,
            };
            // Not accepting from here on; the socket stays open in case this
            // generation takes back over (a rollback window).
            let settled = async {
                match verdict.wait_for(Option::is_some).await {
                    Ok(verdict) => matches!(*verdict, Some(Verdict::RolledBack(_))),
                    Err(_) => false,
                }
            };
            tokio::pin!(settled);
            let rolled_back = loop {
                tokio::select! {
                    rolled_back = &mut settled => break rolled_back,
                    Some(_) = answering.join_next(), if !answering.is_empty() => {}
                }
            };
            // (A rolled-back generation whose supervisor is gone once
            // looped here for ever: `exit` closed, the verdict standing.)
            if !rolled_back || supervisor_gone {
                break;
            }
        }
        drop(listener);
        let answered = async { while answering.join_next().await.is_some() {} };
        if tokio::time::timeout(EXIT_GRACE, answered).await.is_err() {
            tracing::warn!(
                generation = self.generation,
                "control requests not received within a second of exiting were cut off"
            );
        }
    }
}

/// What an answer watches: whether the parent is gone (a request waits
/// for that), whether this generation must exit, and the verdict.
struct Watches {
    parent_gone: watch::Receiver<bool>,
    exit: watch::Receiver<Option<ExitReason>>,
    verdict: watch::Receiver<Option<Verdict>>,
}

/// What ended a wait of [`ControlSocket::serve`].
enum Event {
    MustExit { supervisor_gone: bool },
    Accepted(UnixStream),
    AcceptFailed(std::io::Error),
    Answered,
}

async fn answer(
    stream: UnixStream,
    supervisor: SupervisorHandle,
    watches: Watches,
    generation: u64,
) {
    let Watches {
        mut parent_gone,
        mut exit,
        mut verdict,
    } = watches;
    let allowed = match stream.peer_cred() {
        Ok(peer) => peer.uid() == nix::unistd::geteuid().as_raw() || peer.uid() == 0,
        Err(_) => false,
    };
    let (read, mut write) = stream.into_split();
    if !allowed {
        let _ = write
            .write_all(b"error reason=forbidden message=requests are taken from this service's user only\n")
            .await;
        return;
    }
    let mut line = Vec::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64));
    let request = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    // Whether this connection must stay open until this process exits.
    let mut until_exit = false;
    // The successor (pid, generation) whose verdict line follows, when a
    // rollback window is open.
    let mut verdict_for = None;
    let reply = match request {
        Err(_) => "error reason=bad_request message=no request within 10 s".to_owned(),
        Ok(Err(error)) => format!("error reason=bad_request message={error}"),
        Ok(Ok(_)) if !line.ends_with(b"\n") => {
            format!(
                "error reason=bad_request message=a request is one line of at most {MAX_REQUEST} bytes"
            )
        }
        Ok(Ok(_)) => match std::str::from_utf8(&line).map(str::trim) {
            Ok("upgrade") => {
                match upgrade_when_parent_gone(&supervisor, &mut parent_gone, &mut exit, generation)
                    .await
                {
                    Ok(upgraded) => {
                        until_exit = true;
                        // The verdict was cleared before the upgrade's answer
                        // came: the next one set is this upgrade's.
                        let window = supervisor.rollback_window();
                        let window = if window.is_zero() {
                            String::new()
                        } else {
                            verdict_for = Some((upgraded.pid, upgraded.generation));
                            format!(" window_ms={}", window.as_millis())
                        };
                        format!(
                            "ok pid={} generation={} duration_us={} old_pid={}{window}",
                            upgraded.pid,
                            upgraded.generation,
                            upgraded.duration.as_micros(),
                            std::process::id()
                        )
                    }
                    Err(error) => {
                        until_exit = matches!(error, Error::Exiting);
                        error_line(&error)
                    }
                }
            }
            Ok("status") => format!("ok pid={} generation={generation}", std::process::id()),
            _ => "error reason=bad_request message=unknown request (upgrade, status)".to_owned(),
        },
    };
    let _ = write.write_all(format!("{reply}\n").as_bytes()).await;
    if let Some((pid, successor_generation)) = verdict_for {
        let line = match verdict.wait_for(Option::is_some).await.map(|v| v.clone()) {
            Ok(Some(Verdict::RolledBack(rolled_back))) => {
                // This generation serves again: nothing to wait for.
                until_exit = false;
                format!(
                    "rolled_back pid={} generation={} served_ms={} message={rolled_back}",
                    rolled_back.pid,
                    rolled_back.generation,
                    rolled_back.served.as_millis()
                )
            }
            Ok(Some(Verdict::Exit(ExitReason::Upgraded(upgraded)))) => format!(
                "committed pid={} generation={}",
                upgraded.pid, upgraded.generation
            ),
            // The window closed with a stop (or the `Upgrader` dropped)
            // just as the successor died in it: rolled back, then stopped.
            Ok(Some(Verdict::Exit(ExitReason::Stopped))) => format!(
                "stopped pid={pid} generation={successor_generation} message=the new generation died within the rollback window as this service was stopped: nobody serves"
            ),
            // The supervisor ended without a verdict (it failed).
            _ => "unknown message=the old generation ended without a verdict".to_owned(),
        };
        let _ = write.write_all(format!("{line}\n").as_bytes()).await;
    }
    if until_exit {
        // The kernel closes it when this process exits: that EOF is how the
        // client learns the old code has stopped running. Close-on-exec,
        // and one per upgrade (or per request refused while exiting).
        if let Ok(stream) = reader.into_inner().into_inner().reunite(write) {
            if let Ok(stream) = stream.into_std() {
                let _ = stream.into_raw_fd();
            }
        }
    }
}

/// Runs an upgrade; one asked while the parent generation still drains
/// runs once it is gone, instead of being refused, unless this generation
/// must exit first (stopped meanwhile): then it is answered `exiting`.
async fn upgrade_when_parent_gone(
    supervisor: &SupervisorHandle,
    parent_gone: &mut watch::Receiver<bool>,
    exit: &mut watch::Receiver<Option<ExitReason>>,
    generation: u64,
) -> Result<crate::Upgraded> {
    loop {
        match supervisor.upgrade().await {
            Err(Error::ParentAlive { parent }) => {
                tracing::info!(
                    generation,
                    parent,
                    "control request: the upgrade waits until the parent generation is gone"
                );
                let gone = tokio::select! {
                    gone = parent_gone.wait_for(|gone| *gone) => gone.is_ok(),
                    _ = exit.wait_for(Option::is_some) => false,
                };
                if !gone {
                    return Err(Error::Exiting);
                }
            }
            outcome => return outcome,
        }
    }
}

fn error_line(error: &Error) -> String {
    format!(
        "error reason={} message={}",
        error.reason(),
        error.to_string().replace('\n', " ")
    )
}
