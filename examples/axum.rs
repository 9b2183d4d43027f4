//! An axum server that upgrades itself without failing a request: HTTP/1.1
//! and HTTP/2 (h2c by prior knowledge) on one port, h1 and h2 by ALPN over
//! TLS when given a certificate, and a WebSocket echo that says 1001
//! "going away" when its generation drains.
//!
//! ```text
//! cargo run --release --features axum,websocket,tls --example axum -- \
//!     --listen 127.0.0.1:8080 --pid-file /tmp/axum.pid \
//!     [--control-socket /tmp/axum.sock] [--tls-cert cert.pem --tls-key key.pem]
//! curl http://127.0.0.1:8080/                     # pid=... generation=...
//! curl --http2-prior-knowledge http://127.0.0.1:8080/slow?ms=500
//! kill -HUP "$(cat /tmp/axum.pid)"                # upgrade
//! ```
//!
//! Routes: `/` answers at once, `/slow?ms=N` after N ms, `/ws` echoes
//! WebSocket messages. `--stock-shutdown` serves with axum's own
//! `axum::serve(..).with_graceful_shutdown(exit)` instead of the drain, to
//! show what that loses across upgrades (idle keep-alive connections are
//! closed at once, and a request on its way meets a reset; WebSocket
//! sockets get no 1001 and are cut when the process exits).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Query};
use axum::response::Response;
use axum::routing::get;
use handover::drain::{Drain, DrainOptions, TicketKeys, WebSocket, WebSocketUpgrade};
use handover::{ExitReason, Options, Signal, Upgrader};

struct Args {
    listen: SocketAddr,
    pid_file: Option<String>,
    control_socket: Option<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    stock_shutdown: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut listen = "127.0.0.1:8080".parse().map_err(|e| format!("{e}"))?;
    let (mut pid_file, mut control_socket, mut tls_cert, mut tls_key) = (None, None, None, None);
    let mut stock_shutdown = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = value()?.parse().map_err(|e| format!("--listen: {e}"))?,
            "--pid-file" => pid_file = Some(value()?),
            "--control-socket" => control_socket = Some(value()?),
            "--tls-cert" => tls_cert = Some(value()?),
            "--tls-key" => tls_key = Some(value()?),
            "--stock-shutdown" => stock_shutdown = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if tls_cert.is_some() != tls_key.is_some() {
        return Err("--tls-cert and --tls-key go together".into());
    }
    if stock_shutdown && tls_cert.is_some() {
        return Err("--stock-shutdown serves plain HTTP only".into());
    }
    Ok(Args {
        listen,
        pid_file,
        control_socket,
        tls_cert,
        tls_key,
        stock_shutdown,
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("axum: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    // First thing, before any thread: SIGHUP upgrades, SIGTERM/SIGINT stop.
    let mut options = Options::default()
        .upgrade_timeout(Duration::from_secs(30))
        .stop_signals([Signal::SIGTERM, Signal::SIGINT]);
    if let Some(path) = &args.pid_file {
        options = options.pid_file(path);
    }
    let upgrader = Upgrader::new(options)?;
    tokio::runtime::Runtime::new()?.block_on(serve(upgrader, args))
}

fn app(generation: u64) -> Router {
    let hello = format!("pid={} generation={generation}\n", std::process::id());
    Router::new()
        .route("/", get(move || async move { hello }))
        .route("/slow", get(slow))
        .route("/ws", get(echo))
}

/// Answers after `ms` milliseconds (default 100): a request in flight.
async fn slow(Query(query): Query<HashMap<String, u64>>) -> String {
    let ms = query.get("ms").copied().unwrap_or(100);
    tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_millis(ms)).await;
    format!("pid={} slept={ms}ms\n", std::process::id())
}

/// Echoes every message until the client closes; when the generation
/// drains, the socket says 1001 and `recv` ends once the client closes.
async fn echo(upgrade: WebSocketUpgrade, ConnectInfo(peer): ConnectInfo<SocketAddr>) -> Response {
    upgrade.on_upgrade(move |mut socket: WebSocket| async move {
        while let Some(Ok(message)) = socket.recv().await {
            if socket.send(message).await.is_err() {
                break;
            }
        }
        tracing::debug!(%peer, going_away = socket.is_going_away(), "websocket closed");
    })
}

async fn serve(upgrader: Upgrader, args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::from_std(upgrader.tcp_listener("http", args.listen)?)?;
    let control = match &args.control_socket {
        Some(path) => Some(upgrader.control_socket(path)?),
        None => None,
    };
    // Loaded before ready(): a certificate that does not load fails this
    // generation's start, and the old generation serves on with its own.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            // Session-ticket keys go from generation to generation, so
            // clients resume their TLS sessions across an upgrade.
            let tickets = TicketKeys::inherit(&upgrader).await?;
            Some(handover::drain::tls_acceptor_with_tickets(
                cert, key, &tickets,
            )?)
        }
        _ => None,
    };

    upgrader.ready()?;
    let control = control.map(|control| tokio::spawn(control.serve()));
    let generation = upgrader.generation();
    tracing::info!(generation, addr = %listener.local_addr()?, tls = tls.is_some(), stock = args.stock_shutdown, "serving");
    let app = app(generation);

    if args.stock_shutdown {
        // What most axum services do: correct on its own, lossy across an
        // upgrade (see the README's Protocols section).
        let exit = upgrader.exit();
        // /ws as plain axum serves it: the socket's drain is never
        // started, so no 1001; the sockets are cut when the process exits.
        let app = app.layer(axum::Extension(Drain::new(DrainOptions::default())));
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            exit.await;
        })
        .await?;
        if let Some(control) = control {
            let _ = control.await;
        }
        tracing::info!(generation, "exiting");
        return Ok(());
    }

    // The whole drain: accept until exit() resolves, then finish what is
    // in flight (HTTP/1.1: `Connection: close`, then a quiet period;
    // HTTP/2: GOAWAY; WebSocket: 1001).
    let drain = Drain::new(DrainOptions::default());
    let reason = match tls {
        Some(acceptor) => {
            drain
                .serve_tls(listener, acceptor, app, upgrader.exit())
                .await
        }
        None => drain.serve(listener, app, upgrader.exit()).await,
    };
    match reason {
        ExitReason::Upgraded(successor) => {
            tracing::info!(generation, successor = successor.pid, "draining")
        }
        _ => tracing::info!(generation, "stopping"),
    }
    let outcome = drain.wait().await;
    if let Some(control) = control {
        let _ = control.await;
    }
    tracing::info!(generation, ?outcome, "exiting");
    Ok(())
}
