//! Zero-downtime upgrades for network services, after Go's `tableflip`.
//!
//! The running process (a *generation*) starts its successor, hands it every
//! listening socket and named descriptor, waits until the successor says it
//! is ready, and then leaves. The listening sockets are never closed, so the
//! kernel's accept queue just gets a new reader: no client sees a refused or
//! reset connection.
//!
//! What it guarantees:
//! - **No old code after success**: once the successor is ready,
//!   [`Upgrader::exit`] resolves in the old generation.
//! - **A grace period for init**: the successor has
//!   [`Options::upgrade_timeout`] to call [`Upgrader::ready`], or it is
//!   killed and the upgrade fails.
//! - **Crashing during init is harmless**: the old generation keeps serving,
//!   learns the exit status, and can upgrade again.
//! - **One upgrade at a time**, and none while the parent generation is
//!   still draining: at most two generations run at once.
//! - **Signals are safe from the first instruction**: the upgrade signal
//!   (SIGHUP) is blocked when a successor starts and held until it can act.
//!
//! It does not restart crashed services (that is the service manager's
//! job), and it does not move established connections: the old generation
//! finishes them (see [`drain`]).
//!
//! # The life of a generation
//!
//! ```no_run
//! use handover::{Options, Upgrader, drain::Drain};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // First thing, before the runtime starts its threads: read what the
//!     // parent handed over (this also clears it from the environment).
//!     let upgrader = Upgrader::new(Options::default().pid_file("/tmp/service.pid"))?;
//!     tokio::runtime::Runtime::new()?.block_on(serve(upgrader))
//! }
//!
//! async fn serve(upgrader: Upgrader) -> Result<(), Box<dyn std::error::Error>> {
//!     // The parent's listener if there is one, else a new one.
//!     let listener = upgrader.tcp_listener("http", "127.0.0.1:8080".parse()?)?;
//!     let listener = tokio::net::TcpListener::from_std(listener)?;
//!     // ... load configuration, warm caches: the parent serves meanwhile ...
//!     upgrader.ready()?; // the parent now exits; SIGHUP upgrades us
//!
//!     let drain = Drain::default();
//!     let exit = upgrader.exit();
//!     tokio::pin!(exit);
//!     loop {
//!         tokio::select! {
//!             biased; // once the successor is ready, accept nothing more
//!             _ = &mut exit => break,
//!             accepted = listener.accept() => {
//!                 // A failed accept (EMFILE, ECONNABORTED) is the moment's,
//!                 // not the listener's: accept on. (A pattern such as
//!                 // `Ok(..) = listener.accept()` would stop accepting.)
//!                 let Ok((stream, _)) = accepted else { continue };
//!                 let _connection = drain.track();
//!                 // ... serve `stream`, e.g. with drain.serve_http1(...) ...
//!             }
//!         }
//!     }
//!     drop(listener); // accept nothing new
//!     drain.wait().await; // finish what is in flight
//!     Ok(())
//! }
//! ```
//!
//! Only the upgrade is the library's; which signal stops the service, and
//! how, is the service's (see `examples/http_server.rs`).
//!
//! # Features
//!
//! The upgrade itself ([`Upgrader`], [`ControlSocket`], [`drain::Drain`]'s
//! counting of connections) needs no feature. The features add draining
//! for HTTP servers; each one enables the ones it builds on, and a user of
//! the bare library compiles none of hyper, axum or rustls.
//!
//! | feature | default | enables | pulls in |
//! | --- | --- | --- | --- |
//! | `hyper` | on | `Drain::serve_http1`: one HTTP/1.1 connection, drained without losing a request | `hyper` 1 (server, http1), `hyper-util` |
//! | `http2` | off | `Drain::serve_http` (HTTP/1.1 and h2c on one entry point, HTTP/2 drained with GOAWAY), `Drain::serve` (an accept loop for any tower service: axum's `Router`, tonic's `Routes`), `drain::ConnectionError`; implies `hyper` | hyper's `http2` (`h2`), `tower-service` |
//! | `tls` | off | `Drain::serve_https`, `Drain::serve_tls`, `drain::tls_acceptor`, `drain::TlsAcceptor`, `drain::TlsError`, `drain::tls_acceptor_with_tickets` and `drain::TicketKeys` (session-ticket keys a successor inherits: sessions resume across upgrades) (rustls with the ring provider; ALPN `h2`, `http/1.1`); implies `http2` | `rustls`, `tokio-rustls` (ring, TLS 1.2 and 1.3), `ring` |
//! | `axum` | off | `ConnectInfo<SocketAddr>` in the extensions of requests served by `Drain::serve`, as axum's extractor expects; implies `http2` | `axum` 0.8 without default features |
//! | `websocket` | off | `drain::WebSocketUpgrade`, `drain::WebSocket`, `drain::WebSocketRejection`: axum WebSockets that say 1001 "going away" when the drain starts; implies `axum` | axum's `ws` (`tokio-tungstenite`), `futures-util` |
//!
//! The feature `chaos` is the project's own: it turns on `axum`,
//! `websocket` and `tls` for its long tests on real processes, and adds
//! nothing to the library.
// docs.rs builds with `--cfg docsrs` on nightly: badges name the feature
// each gated item needs.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unsafe_code
)]

// The whole library is POSIX: descriptor passing over Unix sockets,
// posix_spawn, signals. Windows has none of them.
#[cfg(not(unix))]
compile_error!(
    "handover supports Unix only (Linux and macOS): it hands sockets to a new process over a Unix socket and starts it with posix_spawn"
);

pub mod control;
pub mod drain;
mod error;
mod exit_status;
mod kind;
mod machine;
mod pidfile;
mod problem;
mod registry;
mod signal;
mod state;
mod supervisor;
#[allow(unsafe_code)]
mod sys;
mod systemd;
mod upgrader;
mod wire;

pub use control::ControlSocket;
pub use error::{Error, Result};
pub use exit_status::ExitStatus;
pub use kind::Kind;
pub use problem::{DescriptorProblem, FoundObject, HandshakeProblem, ReceiveError, StateProblem};
pub use registry::NewSocket;
pub use signal::{Signal, UnknownSignal};
pub use upgrader::{ExitReason, Options, RolledBack, SuccessorParent, Upgraded, Upgrader, Verdict};
pub use wire::WireError;

/// The README's examples, compiled as doctests so that they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
