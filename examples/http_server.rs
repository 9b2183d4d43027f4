//! A tokio HTTP/1.1 server that upgrades itself without dropping a request.
//!
//! ```text
//! cargo run --release --example http_server -- --listen 127.0.0.1:8080 --pid-file /tmp/http.pid
//! curl http://127.0.0.1:8080/          # pid=... generation=...
//! kill -HUP "$(cat /tmp/http.pid)"     # upgrade: a new process takes over
//! kill -TERM "$(cat /tmp/http.pid)"    # stop
//! # with --control-socket /tmp/http.sock, an upgrade that reports its outcome:
//! handover upgrade --socket /tmp/http.sock
//! # with --rollback-window 5s, a release that dies within 5 s of its
//! # readiness hands the service back to this one (handover upgrade exits 4)
//! ```
//!
//! The whole API in one page: create the `Upgrader` first, take listeners
//! by name, call `ready()`, serve until `exit()`, then drain (and, with a
//! rollback window, serve again if the verdict says so). SIGHUP upgrades,
//! SIGTERM and SIGINT stop; under systemd it notifies readiness and takes a
//! socket-activated listener named "http".

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use handover::drain::{Drain, DrainOptions};
use handover::{ExitReason, Options, Signal, Upgrader, Verdict};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};

/// A tokio HTTP/1.1 server that upgrades itself on SIGHUP without dropping
/// a request.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The address to serve on (a socket-activated "http" socket wins).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// A PID file naming the serving process (for systemd's PIDFile=).
    #[arg(long, value_name = "PATH")]
    pid_file: Option<String>,
    /// A control socket for `handover upgrade --socket PATH`.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<String>,
    /// How long the old generation can take back over if its successor
    /// dies after it is ready, e.g. 5s, 1m30s (default: no window).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    rollback_window: Option<Duration>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("http_server: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();

    // 1. First thing in main, before any thread: read what the parent
    //    handed over. SIGHUP now asks for an upgrade; one that arrives before
    //    we are ready is held, not fatal.
    //    SIGTERM and SIGINT are a final stop (exit() resolves with Stopped).
    let mut options = Options::default()
        .upgrade_timeout(Duration::from_secs(30))
        .stop_signals([Signal::SIGTERM, Signal::SIGINT]);
    if let Some(path) = &args.pid_file {
        options = options.pid_file(path);
    }
    if let Some(window) = args.rollback_window {
        options = options.rollback_window(window);
    }
    let upgrader = Upgrader::new(options)?;

    tokio::runtime::Runtime::new()?.block_on(serve(upgrader, args))
}

async fn serve(upgrader: Upgrader, args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // 2. Take the listener by name: the parent's socket if it handed one
    //    over, else a new one. Do not accept on it yet.
    //    Under systemd socket activation, the socket named "http" comes from
    //    LISTEN_FDS instead, whatever the address.
    let listener = tokio::net::TcpListener::from_std(upgrader.tcp_listener("http", args.listen)?)?;
    //    Optional: a socket on which `handover upgrade --socket PATH` asks for
    //    an upgrade and is told the outcome (handed over like the listener).
    let control = match &args.control_socket {
        Some(path) => Some(upgrader.control_socket(path)?),
        None => None,
    };

    // ... load configuration, open databases, warm caches: the old
    //     generation keeps serving meanwhile, and if this fails it is told.

    // 3. Ready: the PID file now names us, and the parent starts to drain.
    upgrader.ready()?;
    //    The control socket answers until exit; its task is awaited at the
    //    end so that a request it accepted is answered before we leave.
    let control = control.map(|control| tokio::spawn(control.serve()));
    let generation = upgrader.generation();
    tracing::info!(generation, addr = %listener.local_addr()?, "serving");

    let body = Bytes::from(format!(
        "pid={} generation={generation}\n",
        std::process::id()
    ));

    // Each serving period's drain, finishing in the background.
    let mut draining = tokio::task::JoinSet::new();
    let reason = loop {
        let drain = Drain::new(DrainOptions::default());

        // 4. Serve until exit() resolves: a successor is ready, or stop().
        let exit = upgrader.exit();
        tokio::pin!(exit);
        let reason = loop {
            tokio::select! {
                // Exit first: once the successor is ready (and a deploy script
                // has been told so), this generation accepts nothing more.
                biased;
                reason = &mut exit => break reason,
                accepted = listener.accept() => {
                    // A failed accept (EMFILE, ECONNABORTED): accept on.
                    let Ok((stream, _)) = accepted else { continue };
                    let body = body.clone();
                    let hello = service_fn(move |_: Request<Incoming>| {
                        let body = body.clone();
                        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                    });
                    // Counted by the drain from here on, not from the spawn.
                    tokio::spawn(drain.serve_http1(stream, hello));
                }
            }
        };

        // 5. Accept nothing new, finish what is in flight: responses now say
        //    `Connection: close`, and idle keep-alive connections are closed
        //    only after a quiet period, so no client loses a request.
        drain.start();
        match &reason {
            ExitReason::Upgraded(successor) => {
                tracing::info!(generation, successor = successor.pid, "draining")
            }
            _ => tracing::info!(generation, "stopping"),
        }

        // 6. Leave once drained, or (with a rollback window, if the
        //    successor died in it) serve again on the same listener while
        //    this drain finishes in the background: the connections the
        //    kernel queued meanwhile are accepted now.
        match upgrader.verdict().await {
            Verdict::Exit(_) => {
                drop(listener);
                let outcome = drain.wait().await;
                tracing::info!(generation, ?outcome, "drained");
                break reason;
            }
            Verdict::RolledBack(why) => {
                tracing::error!(generation, %why, "rolled back: serving again");
                draining.spawn(async move { drain.wait().await });
            }
        }
    };
    // The drains of serving periods that ended in a rollback.
    while let Some(outcome) = draining.join_next().await {
        tracing::info!(generation, ?outcome, "drained");
    }
    if let Some(control) = control {
        let _ = control.await;
    }
    tracing::info!(generation, ?reason, "exiting");
    Ok(())
}
