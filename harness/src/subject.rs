//! The subject: a service built on `handover` for the harness and the tests.
//!
//! It serves HTTP/1.1 (keep-alive), TCP echo, UDP echo, Unix-socket echo and
//! a line-based control port, all handed over across upgrades. Each
//! generation plays the fault the `SUBJECT_FAULTS` variable gives its
//! number (`"1=crash-before-ready,3=slow-init:500"`). It reports its life as
//! `event=...` lines on stdout, which all generations share.
//!
//! Control commands, one per line: `upgrade` (answers `ok pid=.. gen=.. us=..`
//! or `err reason=.. ..`), `info` (`pid=.. gen=.. fds=.. open=0,1,..`: how
//! many descriptors it has open, and their numbers), `stop`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::fault::{Fault, Faults};
use bytes::Bytes;
use handover::drain::{Drain, DrainOptions, TicketKeys};
use handover::{ExitReason, Options, Signal, Upgrader, Verdict};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UdpSocket, UnixListener};

struct Args {
    http: SocketAddr,
    tcp: SocketAddr,
    udp: SocketAddr,
    control: SocketAddr,
    unix: Option<PathBuf>,
    pid_file: Option<PathBuf>,
    executable: Option<PathBuf>,
    control_socket: Option<PathBuf>,
    state_bytes: usize,
    upgrade_timeout: Duration,
    quiet_period: Duration,
    /// `Options::rollback_window`; zero for none.
    rollback_window: Duration,
    /// SIGTERM and SIGINT stop the generation through the library
    /// (`Options::stop_signals`) from its first instruction, not only
    /// once it serves.
    library_stop_signals: bool,
    /// Call `ready()` before taking the state (which the docs advise
    /// against): the state then reads on while this generation serves,
    /// and the state event comes after `ready`.
    ready_before_state: bool,
    /// A lower RLIMIT_NOFILE (soft limit), so that a test can run the
    /// service out of descriptors.
    max_open_files: Option<u64>,
    /// Hold a pipe made without close-on-exec, as a careless service would:
    /// the library must not pass it to a successor.
    inheritable_pipe: bool,
    /// Die of SIGPIPE, as a process with its default action does, instead
    /// of ignoring it as the Rust runtime arranges.
    sigpipe_default: bool,
    /// How the HTTP port is served.
    http_server: HttpServer,
    /// Serve HTTP/1.1 and HTTP/2 over TLS with this certificate and key.
    tls: Option<(PathBuf, PathBuf)>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_addr: SocketAddr,
    /// Serve the gRPC echo service (h2c).
    grpc: bool,
    grpc_addr: SocketAddr,
    /// Serve WebSocket echo.
    websocket: bool,
    ws_addr: SocketAddr,
}

/// How the subject serves its HTTP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HttpServer {
    /// HTTP/1.1 through the drain's HTTP/1.1 helper.
    Http1,
    /// HTTP/1.1 and h2c (prior knowledge) on one port, through the drain's
    /// `serve_http`.
    Auto,
    /// axum's own `serve(..).with_graceful_shutdown(exit)`, no handover
    /// drain: what most axum services do, and what loses requests at each
    /// upgrade (idle keep-alive connections are closed under the clients).
    Stock,
}

fn parse_args(words: impl Iterator<Item = String>) -> Result<Args, String> {
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("constant address");
    let mut args = Args {
        http: loopback,
        tcp: loopback,
        udp: loopback,
        control: loopback,
        unix: None,
        pid_file: None,
        executable: None,
        control_socket: None,
        state_bytes: 0,
        upgrade_timeout: Duration::from_secs(10),
        quiet_period: Duration::from_millis(500),
        rollback_window: Duration::ZERO,
        library_stop_signals: false,
        ready_before_state: false,
        max_open_files: None,
        inheritable_pipe: false,
        sigpipe_default: false,
        http_server: HttpServer::Http1,
        tls: None,
        tls_cert: None,
        tls_key: None,
        tls_addr: loopback,
        grpc: false,
        grpc_addr: loopback,
        websocket: false,
        ws_addr: loopback,
    };
    let mut words = words;
    while let Some(flag) = words.next() {
        let value = words
            .next()
            .ok_or_else(|| format!("{flag} needs a value"))?;
        let addr = || {
            value
                .parse::<SocketAddr>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        let millis = || {
            value
                .parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--http" => args.http = addr()?,
            "--tcp" => args.tcp = addr()?,
            "--udp" => args.udp = addr()?,
            "--control" => args.control = addr()?,
            "--unix" => args.unix = Some(value.into()),
            "--pid-file" => args.pid_file = Some(value.into()),
            "--executable" => args.executable = Some(value.into()),
            "--control-socket" => args.control_socket = Some(value.into()),
            "--state-bytes" => {
                args.state_bytes = value.parse().map_err(|e| format!("{flag} {value}: {e}"))?;
            }
            "--upgrade-timeout-ms" => args.upgrade_timeout = millis()?,
            "--quiet-period-ms" => args.quiet_period = millis()?,
            "--rollback-window-ms" => args.rollback_window = millis()?,
            "--max-open-files" => {
                args.max_open_files =
                    Some(value.parse().map_err(|e| format!("{flag} {value}: {e}"))?);
            }
            "--library-stop-signals" => {
                args.library_stop_signals =
                    value.parse().map_err(|e| format!("{flag} {value}: {e}"))?;
            }
            "--ready-before-state" => {
                args.ready_before_state =
                    value.parse().map_err(|e| format!("{flag} {value}: {e}"))?;
            }
            "--inheritable-pipe" => {
                args.inheritable_pipe =
                    value.parse().map_err(|e| format!("{flag} {value}: {e}"))?;
            }
            "--sigpipe-default" => {
                args.sigpipe_default = value.parse().map_err(|e| format!("{flag} {value}: {e}"))?;
            }
            "--http-server" => {
                args.http_server = match value.as_str() {
                    "http1" => HttpServer::Http1,
                    "auto" => HttpServer::Auto,
                    "stock" => HttpServer::Stock,
                    other => {
                        return Err(format!("{flag} {other}: none of http1, auto, stock"));
                    }
                };
            }
            "--tls-cert" => args.tls_cert = Some(value.into()),
            "--tls-key" => args.tls_key = Some(value.into()),
            "--tls" => args.tls_addr = addr()?,
            "--grpc" => {
                args.grpc = value.parse().map_err(|e| format!("{flag} {value}: {e}"))?;
            }
            "--grpc-addr" => args.grpc_addr = addr()?,
            "--websocket" => {
                args.websocket = value.parse().map_err(|e| format!("{flag} {value}: {e}"))?;
            }
            "--websocket-addr" => args.ws_addr = addr()?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    args.tls = match (args.tls_cert.take(), args.tls_key.take()) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => return Err("--tls-cert and --tls-key go together".into()),
    };
    Ok(args)
}

/// Runs the subject with these command-line words (the program name and
/// any subcommand already taken off).
pub fn main(words: impl Iterator<Item = String>) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SUBJECT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // The upgrader comes first, before the runtime starts its threads.
    let args = match parse_args(words) {
        Ok(args) => args,
        Err(problem) => {
            eprintln!("handover-subject: {problem}");
            return ExitCode::from(2);
        }
    };
    let fault_to_be = Faults::from_env()
        .map(|faults| faults.for_generation(Faults::generation_to_be()))
        .unwrap_or_default();
    fault_to_be.before_start();
    // Held for the life of the process.
    let _inheritable_pipe = if args.inheritable_pipe {
        match nix::unistd::pipe() {
            Ok(pipe) => Some(pipe),
            Err(error) => {
                eprintln!("handover-subject: pipe: {error}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    if args.sigpipe_default {
        let always = Arc::new(std::sync::atomic::AtomicBool::new(true));
        if let Err(error) =
            signal_hook::flag::register_conditional_default(nix::libc::SIGPIPE, always)
        {
            eprintln!("handover-subject: SIGPIPE: {error}");
            return ExitCode::FAILURE;
        }
    }
    if let Some(limit) = args.max_open_files {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let lowered = getrlimit(Resource::RLIMIT_NOFILE)
            .and_then(|(_, hard)| setrlimit(Resource::RLIMIT_NOFILE, limit.min(hard), hard));
        if let Err(error) = lowered {
            eprintln!("handover-subject: --max-open-files {limit}: {error}");
            return ExitCode::from(2);
        }
    }
    let mut options = Options::default()
        .upgrade_timeout(args.upgrade_timeout)
        .rollback_window(args.rollback_window);
    if fault_to_be == Fault::SighupReloads {
        options = options.upgrade_signal(None);
    }
    if let Some(path) = &args.pid_file {
        options = options.pid_file(path);
    }
    if let Some(path) = &args.executable {
        options = options.executable(path);
    }
    if args.library_stop_signals {
        options = options.stop_signals([Signal::SIGTERM, Signal::SIGINT]);
    }
    let upgrader = match Upgrader::new(options) {
        Ok(upgrader) => Arc::new(upgrader),
        Err(error) => {
            eprintln!("handover-subject: {error}");
            return ExitCode::from(2);
        }
    };
    let faults = match Faults::from_env() {
        Ok(faults) => faults,
        Err(problem) => {
            eprintln!("handover-subject: SUBJECT_FAULTS: {problem}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let generation = upgrader.generation();
    let fault = faults.for_generation(generation);
    let served = runtime.block_on(serve(args, upgrader, fault));
    // The runtime's tasks hold the last references to the `Upgrader`.
    drop(runtime);
    fault.before_exit(generation);
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("handover-subject: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Says how much state came from the parent, and whether it is the
/// parent's pattern.
fn state_event(generation: u64, state: &[u8]) {
    let intact = generation > 0 && state == state_pattern(generation - 1, state.len());
    event(format_args!(
        "state gen={generation} bytes={} intact={intact}",
        state.len()
    ));
}

/// The state handed on: the TLS session-ticket keys (a 4-byte big-endian
/// length, then the keys; length 0 without TLS), then the pattern.
fn join_state(tickets: Option<&TicketKeys>, pattern: Vec<u8>) -> Vec<u8> {
    let keys = tickets.map(TicketKeys::to_bytes).unwrap_or_default();
    let mut state = Vec::with_capacity(4 + keys.len() + pattern.len());
    state.extend_from_slice(&(keys.len() as u32).to_be_bytes());
    state.extend_from_slice(&keys);
    state.extend(pattern);
    state
}

/// [`join_state`]'s parts: the ticket keys, if any, and the pattern. No
/// state at all (a parent that handed none) is no keys and no pattern.
fn split_state(
    state: Vec<u8>,
) -> Result<(Option<TicketKeys>, Vec<u8>), Box<dyn std::error::Error>> {
    if state.is_empty() {
        return Ok((None, state));
    }
    let (len, rest) = state
        .split_first_chunk::<4>()
        .ok_or("the state handed over is shorter than its 4-byte header")?;
    let len = u32::from_be_bytes(*len) as usize;
    if rest.len() < len {
        return Err(format!(
            "the state handed over names {len} bytes of ticket keys, has {}",
            rest.len()
        )
        .into());
    }
    let (keys, pattern) = rest.split_at(len);
    let keys = match len {
        0 => None,
        _ => Some(TicketKeys::from_bytes(keys)?),
    };
    Ok((keys, pattern.to_vec()))
}

/// The state generation `generation` hands over: `bytes` bytes that depend
/// on the generation, so that a successor can check it got its parent's.
fn state_pattern(generation: u64, bytes: usize) -> Vec<u8> {
    (0..bytes)
        .map(|i| (i as u64).wrapping_mul(31).wrapping_add(generation) as u8)
        .collect()
}

fn event(line: std::fmt::Arguments<'_>) {
    println!("event={line} pid={}", std::process::id());
}

async fn serve(
    args: Args,
    upgrader: Arc<Upgrader>,
    fault: Fault,
) -> Result<(), Box<dyn std::error::Error>> {
    let generation = upgrader.generation();
    tokio::spawn(release_on_sigusr1());
    if args.library_stop_signals {
        // A stop can come at any moment now, even during init: say when.
        let exit = upgrader.exit();
        tokio::spawn(async move {
            if let ExitReason::Stopped = exit.await {
                event(format_args!("stop-seen gen={generation}"));
            }
        });
    }
    event(format_args!("started gen={generation}"));
    fault.before_listen();

    let http = TcpListener::from_std(upgrader.tcp_listener("http", args.http)?)?;
    let tcp = TcpListener::from_std(upgrader.tcp_listener("tcp", args.tcp)?)?;
    let control = TcpListener::from_std(upgrader.tcp_listener("control", args.control)?)?;
    let udp = UdpSocket::from_std(upgrader.udp_socket("udp", args.udp)?)?;
    let tls_listener = match &args.tls {
        Some(_) => Some(TcpListener::from_std(
            upgrader.tcp_listener("tls", args.tls_addr)?,
        )?),
        None => None,
    };
    let grpc = match args.grpc {
        true => Some(TcpListener::from_std(
            upgrader.tcp_listener("grpc", args.grpc_addr)?,
        )?),
        false => None,
    };
    let websocket = match args.websocket {
        true => Some(TcpListener::from_std(
            upgrader.tcp_listener("websocket", args.ws_addr)?,
        )?),
        false => None,
    };
    let unix = match &args.unix {
        Some(path) => Some(UnixListener::from_std(
            upgrader.unix_listener("unix", path)?,
        )?),
        None => None,
    };

    let control_socket = match &args.control_socket {
        Some(path) => Some(upgrader.control_socket(path)?),
        None => None,
    };

    if fault == Fault::SighupReloads {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = signal(SignalKind::hangup())?;
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                event(format_args!("reloaded gen={generation}"));
            }
        });
    }

    fault.before_ready(generation).await;
    // The state comes before ready(): the parent hands it over meanwhile.
    let early = upgrader.has_parent() && !args.ready_before_state;
    let (inherited_tickets, state) = match early {
        true => split_state(upgrader.inherited_state().await?.unwrap_or_default())?,
        false => (None, Vec::new()),
    };
    if early {
        state_event(generation, &state);
    }
    // Sessions resume across upgrades: the TLS ticket keys go on.
    let tickets = match (&args.tls, inherited_tickets) {
        (None, _) => None,
        (Some(_), Some(keys)) => Some(keys),
        (Some(_), None) => Some(TicketKeys::new()?),
    };
    // Before ready(): a certificate that does not load fails the upgrade,
    // and the old generation serves on with its own.
    let tls = match (tls_listener, &args.tls, &tickets) {
        (Some(listener), Some((cert, key)), Some(tickets)) => Some((
            listener,
            handover::drain::tls_acceptor_with_tickets(cert, key, tickets)?,
        )),
        _ => None,
    };
    if args.state_bytes > 0 || tickets.is_some() {
        let bytes = args.state_bytes;
        upgrader.set_state_provider(move || {
            join_state(tickets.as_ref(), state_pattern(generation, bytes))
        });
    }
    upgrader.ready()?;
    // Awaited before exiting, so that every accepted request is answered.
    let control_socket = control_socket.map(|control| tokio::spawn(control.serve()));
    let mut optional = String::new();
    for (name, listener) in [
        ("tls", tls.as_ref().map(|(listener, _)| listener)),
        ("grpc", grpc.as_ref()),
        ("ws", websocket.as_ref()),
    ] {
        if let Some(listener) = listener {
            optional.push_str(&format!(" {name}={}", listener.local_addr()?));
        }
    }
    event(format_args!(
        "ready gen={generation} http={} tcp={} udp={} control={}{optional}",
        http.local_addr()?,
        tcp.local_addr()?,
        udp.local_addr()?,
        control.local_addr()?
    ));
    fault.after_ready();
    if upgrader.has_parent() && args.ready_before_state {
        let late = Arc::clone(&upgrader);
        tokio::spawn(async move {
            match late.inherited_state().await {
                Ok(state) => match split_state(state.unwrap_or_default()) {
                    Ok((_, state)) => state_event(generation, &state),
                    Err(error) => event(format_args!("state gen={generation} error={error:?}")),
                },
                Err(error) => event(format_args!(
                    "state gen={generation} error={:?}",
                    error.reason()
                )),
            }
        });
    }

    let identity: Bytes = format!("pid={} gen={generation}\n", std::process::id()).into();
    tokio::spawn(stop_on_signals(Arc::clone(&upgrader)));
    let parent_gone = upgrader.wait_for_parent();
    if upgrader.has_parent() {
        tokio::spawn(async move {
            parent_gone.await;
            event(format_args!("parent-gone gen={generation}"));
        });
    }
    if let Fault::CrashAfterReadyIn(after) = fault {
        tokio::spawn(crash_after(generation, after));
    }

    // The listeners outlive each serving period: with a rollback window,
    // this generation may serve again on them.
    let (http, tcp, unix, udp, control) = (
        Arc::new(http),
        Arc::new(tcp),
        unix.map(Arc::new),
        Arc::new(udp),
        Arc::new(control),
    );
    let tls = tls.map(|(listener, acceptor)| (Arc::new(listener), acceptor));
    let grpc = grpc.map(Arc::new);
    let websocket = websocket.map(Arc::new);
    let mut draining = tokio::task::JoinSet::new();
    loop {
        let drain = Drain::new(
            DrainOptions::default()
                .quiet_period(args.quiet_period)
                .deadline(Duration::from_secs(30)),
        );
        // The accept loops end when `exit()` resolves; the drain counts what
        // they accepted, so they must have ended before it is waited for.
        let mut accepting = tokio::task::JoinSet::new();
        let tasks = &mut accepting;
        match args.http_server {
            HttpServer::Http1 => {
                tasks.spawn(accept_http(
                    generation,
                    Arc::clone(&http),
                    drain.clone(),
                    identity.clone(),
                    upgrader.exit(),
                ));
            }
            HttpServer::Auto => {
                let drain = drain.clone();
                let identity = identity.clone();
                tasks.spawn(accept_until_exit(
                    generation,
                    Arc::clone(&http),
                    upgrader.exit(),
                    move |stream| {
                        let _ = stream.set_nodelay(true);
                        let peer = stream.peer_addr().ok();
                        let identity = identity.clone();
                        let service = service_fn(move |request| {
                            respond(request, identity.clone(), generation)
                        });
                        spawn_held(peer, drain.serve_http(stream, service));
                    },
                ));
            }
            HttpServer::Stock => {
                tasks.spawn(serve_stock(
                    Arc::clone(&http),
                    identity.clone(),
                    upgrader.exit(),
                ));
            }
        }
        if let Some((listener, acceptor)) = &tls {
            let drain = drain.clone();
            let identity = identity.clone();
            let acceptor = acceptor.clone();
            tasks.spawn(accept_until_exit(
                generation,
                Arc::clone(listener),
                upgrader.exit(),
                move |stream| {
                    let _ = stream.set_nodelay(true);
                    let peer = stream.peer_addr().ok();
                    let identity = identity.clone();
                    let service =
                        service_fn(move |request| respond(request, identity.clone(), generation));
                    spawn_held(peer, drain.serve_https(stream, acceptor.clone(), service));
                },
            ));
        }
        if let Some(listener) = &grpc {
            let drain = drain.clone();
            tasks.spawn(accept_until_exit(
                generation,
                Arc::clone(listener),
                upgrader.exit(),
                move |stream| {
                    let _ = stream.set_nodelay(true);
                    let peer = stream.peer_addr().ok();
                    let service =
                        service_fn(move |request| crate::grpc::serve(request, generation));
                    spawn_held(peer, drain.serve_http(stream, service));
                },
            ));
        }
        if let Some(listener) = &websocket {
            let drain = drain.clone();
            let greeting = String::from_utf8_lossy(&identity).trim().to_owned();
            let app = axum::Router::new().route(
                "/",
                axum::routing::get(move |upgrade| echo_websocket(upgrade, greeting.clone())),
            );
            tasks.spawn(accept_until_exit(
                generation,
                Arc::clone(listener),
                upgrader.exit(),
                move |stream| {
                    let _ = stream.set_nodelay(true);
                    let peer = stream.peer_addr().ok();
                    let service = hyper_util::service::TowerToHyperService::new(app.clone());
                    spawn_held(peer, drain.serve_http(stream, service));
                },
            ));
        }
        tasks.spawn(accept_echo(
            generation,
            Arc::clone(&tcp),
            drain.clone(),
            upgrader.exit(),
        ));
        if let Some(unix) = &unix {
            tasks.spawn(accept_echo(
                generation,
                Arc::clone(unix),
                drain.clone(),
                upgrader.exit(),
            ));
        }
        tasks.spawn(echo_udp(Arc::clone(&udp), upgrader.exit()));
        tasks.spawn(accept_control(
            Arc::clone(&control),
            Arc::clone(&upgrader),
            drain.clone(),
        ));

        let reason = upgrader.exit().await;
        let reason = match reason {
            ExitReason::Upgraded(upgraded) => format!("upgraded successor={}", upgraded.pid),
            _ => "stopped".to_owned(),
        };
        event(format_args!("exiting gen={generation} reason={reason}"));
        while accepting.join_next().await.is_some() {}
        draining.spawn(async move {
            let outcome = drain.wait().await;
            event(format_args!("drained gen={generation} drain={outcome:?}"));
            outcome
        });
        match upgrader.verdict().await {
            Verdict::Exit(ExitReason::Upgraded(upgraded)) => {
                if !args.rollback_window.is_zero() {
                    event(format_args!(
                        "committed gen={generation} successor={}",
                        upgraded.pid
                    ));
                }
                break;
            }
            Verdict::Exit(_) => break,
            Verdict::RolledBack(rolled_back) => event(format_args!(
                "rolled-back gen={generation} successor={} status={} served_ms={}",
                rolled_back.pid,
                rolled_back.status.to_string().replace(' ', "_"),
                rolled_back.served.as_millis()
            )),
        }
    }
    if let Some(control_socket) = control_socket {
        let _ = control_socket.await;
    }
    let mut outcome = handover::drain::DrainOutcome::Complete;
    while let Some(drained) = draining.join_next().await {
        if let Ok(drained @ handover::drain::DrainOutcome::DeadlinePassed { .. }) = drained {
            outcome = drained;
        }
    }
    event(format_args!("exited gen={generation} drain={outcome:?}"));
    Ok(())
}

/// The client ports of the TCP connections this process holds (HTTP and
/// echo), for the `crashing` event: what a crash may fail, and nothing else.
/// Counted: one client port may be in two connections at once, to two of
/// the subject's ports (the kernel reuses a local port for another
/// destination), and the end of one must not unname the other.
fn held_connections() -> &'static std::sync::Mutex<std::collections::BTreeMap<u16, usize>> {
    static HELD: std::sync::OnceLock<std::sync::Mutex<std::collections::BTreeMap<u16, usize>>> =
        std::sync::OnceLock::new();
    HELD.get_or_init(Default::default)
}

/// Spawns a connection's task, counted as held (see [`hold`]) from now
/// until it ends.
fn spawn_held<F>(peer: Option<SocketAddr>, serving: F)
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let held = hold(peer);
    tokio::spawn(async move {
        let _held = held;
        serving.await
    });
}

/// Unix connections this process holds: they have no port to name.
static HELD_UNIX: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts a connection (`peer`: a TCP client's address, `None` for a Unix
/// one) as held until the returned guard is dropped.
fn hold(peer: Option<SocketAddr>) -> impl Drop + Send {
    use std::sync::atomic::Ordering;
    struct Held(Option<u16>);
    impl Drop for Held {
        fn drop(&mut self) {
            match self.0 {
                Some(port) => {
                    let mut held = held_connections().lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(count) = held.get_mut(&port) {
                        *count -= 1;
                        if *count == 0 {
                            held.remove(&port);
                        }
                    }
                }
                None => {
                    HELD_UNIX.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
    }
    let port = peer.map(|peer| peer.port());
    match port {
        Some(port) => {
            *held_connections()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(port)
                .or_default() += 1;
        }
        None => {
            HELD_UNIX.fetch_add(1, Ordering::SeqCst);
        }
    }
    Held(port)
}

/// What `crash_after` tells the serving loops, and hears back.
struct CrashSignals {
    /// The crash is due: the accept loops and the UDP loop stop.
    due: tokio::sync::watch::Sender<bool>,
    /// Accept loops still running.
    accept_loops: tokio::sync::watch::Sender<usize>,
    /// The UDP loop has stopped.
    udp_stopped: tokio::sync::watch::Sender<bool>,
}

fn crash_signals() -> &'static CrashSignals {
    static SIGNALS: std::sync::OnceLock<CrashSignals> = std::sync::OnceLock::new();
    SIGNALS.get_or_init(|| CrashSignals {
        due: tokio::sync::watch::channel(false).0,
        accept_loops: tokio::sync::watch::channel(0).0,
        udp_stopped: tokio::sync::watch::channel(false).0,
    })
}

/// A running accept loop, counted in [`CrashSignals::accept_loops`].
struct AcceptLoop;

impl AcceptLoop {
    fn enter() -> AcceptLoop {
        crash_signals().accept_loops.send_modify(|n| *n += 1);
        AcceptLoop
    }
}

impl Drop for AcceptLoop {
    fn drop(&mut self) {
        crash_signals().accept_loops.send_modify(|n| *n -= 1);
    }
}

/// The `crash-after-ready:MS` fault: serve for `after`, then die with what
/// this process holds.
async fn crash_after(generation: u64, after: Duration) {
    tokio::time::sleep(after).await;
    // Every connection accepted from here on would die unnamed: stop the
    // accept loops first (each names what it accepted as it accepts it).
    // The UDP loop stops too: no datagram is read and left unanswered.
    let signals = crash_signals();
    let mut loops = signals.accept_loops.subscribe();
    let mut udp_stopped = signals.udp_stopped.subscribe();
    signals.due.send_replace(true);
    let stopped = async {
        let _ = loops.wait_for(|n| *n == 0).await;
        let _ = udp_stopped.wait_for(|stopped| *stopped).await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), stopped).await;
    // A port held twice is named twice.
    let held: Vec<String> = held_connections()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .flat_map(|(port, count)| std::iter::repeat_n(port.to_string(), *count))
        .collect();
    event(format_args!(
        "crashing gen={generation} held={} held_unix={}",
        if held.is_empty() {
            "-".to_owned()
        } else {
            held.join(",")
        },
        HELD_UNIX.load(std::sync::atomic::Ordering::SeqCst)
    ));
    std::process::exit(5);
}

/// Any listener the echo and HTTP loops accept on.
trait Accept: Send + 'static {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl std::future::Future<Output = std::io::Result<Self::Stream>> + Send;
    /// The client's address, for a TCP connection.
    fn peer(_stream: &Self::Stream) -> Option<SocketAddr> {
        None
    }
}

impl Accept for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<Self::Stream> {
        TcpListener::accept(self).await.map(|(stream, _)| stream)
    }
    fn peer(stream: &Self::Stream) -> Option<SocketAddr> {
        stream.peer_addr().ok()
    }
}

impl<L: Accept + Sync> Accept for Arc<L> {
    type Stream = L::Stream;
    async fn accept(&self) -> std::io::Result<Self::Stream> {
        L::accept(self).await
    }
    fn peer(stream: &Self::Stream) -> Option<SocketAddr> {
        L::peer(stream)
    }
}

impl Accept for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<Self::Stream> {
        UnixListener::accept(self).await.map(|(stream, _)| stream)
    }
}

/// Accepts until `exit` resolves, handing each connection to `serve`, then
/// drops the listener: the successor's copy of the same socket takes every
/// connection from then on. A failed accept (EMFILE when out of
/// descriptors, ECONNABORTED) is the moment's, not the listener's: it goes
/// on accepting, and says so once per run of failures.
async fn accept_until_exit<L: Accept>(
    generation: u64,
    listener: L,
    exit: impl std::future::Future<Output = ExitReason>,
    mut serve: impl FnMut(L::Stream),
) {
    tokio::pin!(exit);
    let mut failing = false;
    let _accepting = AcceptLoop::enter();
    let mut crashing = crash_signals().due.subscribe();
    loop {
        tokio::select! {
            // Exit first: `tokio::select!` picks a ready branch at random,
            // and a connection made after `upgrade()` answered must be the
            // successor's (the CI once saw the old generation take one).
            biased;
            _ = &mut exit => return,
            // The `crash-after-ready:MS` fault: accept no more, so that the
            // connections it holds are all it names.
            _ = async { let _ = crashing.wait_for(|c| *c).await; } => return,
            accepted = listener.accept() => match accepted {
                Ok(stream) => {
                    failing = false;
                    serve(stream);
                }
                Err(error) => {
                    if !failing {
                        failing = true;
                        let errno = error.raw_os_error().unwrap_or(0);
                        event(format_args!("accept-failed gen={generation} errno={errno}"));
                    }
                }
            }
        }
    }
}

async fn accept_http(
    generation: u64,
    listener: Arc<TcpListener>,
    drain: Drain,
    identity: Bytes,
    exit: impl std::future::Future<Output = ExitReason>,
) {
    accept_until_exit(generation, listener, exit, |stream| {
        let _ = stream.set_nodelay(true);
        let peer = stream.peer_addr().ok();
        let identity = identity.clone();
        let service = service_fn(move |request| respond(request, identity.clone(), generation));
        spawn_held(peer, drain.serve_http1(stream, service));
    })
    .await
}

/// WebSocket echo through the drain's socket: a greeting that names the
/// generation, then every text message back; close 1001 when the drain
/// starts.
async fn echo_websocket(
    upgrade: handover::drain::WebSocketUpgrade,
    greeting: String,
) -> axum::response::Response {
    use axum::extract::ws::Message;
    upgrade.on_upgrade(move |mut socket| async move {
        if socket.send(Message::Text(greeting.into())).await.is_err() {
            return;
        }
        while let Some(Ok(message)) = socket.recv().await {
            match message {
                Message::Text(_) | Message::Binary(_) => {
                    if socket.send(message).await.is_err() {
                        return;
                    }
                }
                Message::Close(_) => return,
                Message::Ping(_) | Message::Pong(_) => {}
            }
        }
    })
}

/// axum's stock graceful shutdown: it stops accepting when `exit`
/// resolves, lets requests in flight finish, and closes idle keep-alive
/// connections at once, under clients that may be sending on them.
async fn serve_stock(
    listener: Arc<TcpListener>,
    identity: Bytes,
    exit: impl std::future::Future<Output = ExitReason> + Send + 'static,
) {
    let app = axum::Router::new().fallback(move || {
        let identity = identity.clone();
        async move { identity }
    });
    // axum owns what it serves on: a duplicate of the shared socket.
    let listener = match std::os::fd::AsFd::as_fd(&*listener)
        .try_clone_to_owned()
        .map(std::net::TcpListener::from)
        .and_then(TcpListener::from_std)
    {
        Ok(listener) => listener,
        Err(error) => {
            event(format_args!("stock-serve-failed gen=0 error={error:?}"));
            return;
        }
    };
    let served = axum::serve(listener, app).with_graceful_shutdown(async move {
        exit.await;
    });
    if let Err(error) = served.await {
        event(format_args!("stock-serve-failed gen=0 error={error:?}"));
    }
}

/// Released by SIGUSR1 (see `release_on_sigusr1`).
fn held_requests() -> &'static tokio::sync::watch::Sender<bool> {
    static HELD: std::sync::OnceLock<tokio::sync::watch::Sender<bool>> = std::sync::OnceLock::new();
    HELD.get_or_init(|| tokio::sync::watch::channel(false).0)
}

/// Answers every `/hold` request, now and later, on SIGUSR1.
async fn release_on_sigusr1() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
        return;
    };
    if usr1.recv().await.is_some() {
        held_requests().send_replace(true);
    }
}

async fn respond(
    request: Request<Incoming>,
    identity: Bytes,
    generation: u64,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path();
    let query = request.uri().query().unwrap_or("");
    let body = match path {
        "/" => identity,
        "/slow" => {
            let millis = query
                .strip_prefix("ms=")
                .and_then(|ms| ms.parse().ok())
                .unwrap_or(1000);
            event(format_args!("slow-request gen={generation} ms={millis}"));
            // The fault itself: a request that takes this long to answer.
            tokio::time::sleep(Duration::from_millis(millis)).await;
            identity
        }
        "/hold" => {
            // Answered only when this process gets SIGUSR1: a request in
            // flight for exactly as long as a test needs, with no clock.
            let mut released = held_requests().subscribe();
            event(format_args!("hold-request gen={generation}"));
            let _ = released.wait_for(|released| *released).await;
            identity
        }
        "/fds" => format!("{}\n", crate::open_descriptors()).into(),
        _ => {
            let mut response = Response::new(Full::new(Bytes::from_static(b"not found\n")));
            *response.status_mut() = StatusCode::NOT_FOUND;
            return Ok(response);
        }
    };
    Ok(Response::new(Full::new(body)))
}

async fn accept_echo<L: Accept>(
    generation: u64,
    listener: L,
    drain: Drain,
    exit: impl std::future::Future<Output = ExitReason>,
) {
    accept_until_exit(generation, listener, exit, |mut stream| {
        let held = hold(L::peer(&stream));
        let open = drain.track();
        let deadline = drain.deadline_passed();
        tokio::spawn(async move {
            // The old generation finishes its connections: it echoes until
            // the client closes, or the drain deadline cuts it.
            let echo = async {
                let mut buffer = vec![0u8; 16 * 1024];
                loop {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if stream.write_all(&buffer[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            };
            tokio::select! {
                _ = echo => {}
                _ = deadline => {}
            }
            drop(open);
            drop(held);
        });
    })
    .await
}

async fn echo_udp(socket: Arc<UdpSocket>, exit: impl std::future::Future<Output = ExitReason>) {
    tokio::pin!(exit);
    let mut buffer = vec![0u8; 64 * 1024];
    let mut stop = crash_signals().due.subscribe();
    loop {
        tokio::select! {
            biased;
            _ = &mut exit => return,
            // A crash to come: no datagram is read and left unanswered.
            _ = async { let _ = stop.wait_for(|stop| *stop).await; } => {
                crash_signals().udp_stopped.send_replace(true);
                exit.await;
                return;
            }
            received = socket.recv_from(&mut buffer) => {
                if let Ok((n, peer)) = received {
                    let _ = socket.send_to(&buffer[..n], peer).await;
                }
            }
        }
    }
}

/// A control session counts as a connection to drain: the answer to the
/// upgrade that ends this generation is written before it exits, and a
/// session accepted before the drain began gets its first answer (a client
/// connects to ask something; closing it unanswered would be a dropped
/// request, the drain's deadline bounds the wait).
async fn accept_control(listener: Arc<TcpListener>, upgrader: Arc<Upgrader>, drain: Drain) {
    let exit = upgrader.exit();
    accept_until_exit(upgrader.generation(), listener, exit, |stream| {
        let upgrader = Arc::clone(&upgrader);
        let open = drain.track();
        let draining = drain.draining();
        tokio::spawn(async move {
            let _open = open;
            tokio::pin!(draining);
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            let mut answered = false;
            loop {
                // Once draining, finish the command being answered (or the
                // session's first) and close.
                let line = tokio::select! {
                    line = lines.next_line() => match line {
                        Ok(Some(line)) => line,
                        _ => return,
                    },
                    _ = &mut draining, if answered => return,
                };
                answered = true;
                let answer = match line.trim() {
                    "upgrade" => match upgrader.upgrade().await {
                        Ok(up) => format!(
                            "ok pid={} gen={} us={}",
                            up.pid,
                            up.generation,
                            up.duration.as_micros()
                        ),
                        Err(error) => format!("err reason={} {error}", error.reason()),
                    },
                    "info" => format!(
                        "pid={} gen={} fds={} open={}",
                        std::process::id(),
                        upgrader.generation(),
                        crate::open_descriptors(),
                        crate::open_descriptor_numbers()
                            .iter()
                            .map(i32::to_string)
                            .collect::<Vec<_>>()
                            .join(",")
                    ),
                    "stop" => {
                        upgrader.stop();
                        "ok".to_owned()
                    }
                    other => format!("err reason=unknown_command {other:?}"),
                };
                if write
                    .write_all(format!("{answer}\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    })
    .await
}

async fn stop_on_signals(upgrader: Arc<Upgrader>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    upgrader.stop();
}
