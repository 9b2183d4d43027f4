//! A tonic gRPC server (unary and server-streaming) that upgrades itself
//! without failing an RPC: in-flight calls and streams end with OK, never
//! UNAVAILABLE or CANCELLED.
//!
//! ```text
//! cargo run --release --features http2,tls --example grpc -- \
//!     --listen 127.0.0.1:50051 --pid-file /tmp/grpc.pid \
//!     [--control-socket /tmp/grpc.sock] [--tls-cert cert.pem --tls-key key.pem] [--no-drain]
//! kill -HUP "$(cat /tmp/grpc.pid)"     # upgrade (loads the certificate again)
//! ```
//!
//! Service `echo.Echo`: `Say(SayRequest) returns (SayReply)` answers after
//! `delay_ms`; `Count(CountRequest) returns (stream Tick)` sends `count`
//! ticks, one every `interval_ms`. Its protobuf messages are written with
//! prost's derive and the service by hand, as tonic's generated code would
//! be, so the build needs no `protoc`. The standard health service,
//! `grpc.health.v1.Health` (`Check`, and `Watch` streams, which end with OK
//! when the generation drains, so that watchers move to the new one), is
//! written the same way: `handover-harness check --grpc` calls it.
//!
//! `--no-drain` exits as soon as the successor is ready, without the
//! drain: calls and `Watch` streams in flight are cut, as a server that
//! stops without draining cuts them (for comparison).
//!
//! tonic's `Routes` is a tower service, so it is served like any axum
//! router: `Drain::serve` (h2c) or `Drain::serve_tls` (h2 by ALPN), and
//! drained with HTTP/2's graceful GOAWAY. gRPC clients open new calls on a
//! new connection, to the new generation, and the calls in flight finish.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use handover::drain::{Drain, DrainOptions, TicketKeys};
use handover::{ExitReason, Options, Signal, Upgrader};
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::server::{NamedService, ServerStreamingService, UnaryService};
use tonic::{Request, Response, Status};

/// `message SayRequest { string message = 1; uint64 delay_ms = 2; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct SayRequest {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(uint64, tag = "2")]
    pub delay_ms: u64,
}

/// `message SayReply { string message = 1; uint32 pid = 2; uint64 generation = 3; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct SayReply {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(uint32, tag = "2")]
    pub pid: u32,
    #[prost(uint64, tag = "3")]
    pub generation: u64,
}

/// `message CountRequest { uint32 count = 1; uint64 interval_ms = 2; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct CountRequest {
    #[prost(uint32, tag = "1")]
    pub count: u32,
    #[prost(uint64, tag = "2")]
    pub interval_ms: u64,
}

/// `message Tick { uint32 n = 1; uint32 pid = 2; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct Tick {
    #[prost(uint32, tag = "1")]
    pub n: u32,
    #[prost(uint32, tag = "2")]
    pub pid: u32,
}

/// `message HealthCheckRequest { string service = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    pub service: String,
}

/// `message HealthCheckResponse { ServingStatus status = 1; }`: the enum
/// (UNKNOWN 0, SERVING 1, NOT_SERVING 2, SERVICE_UNKNOWN 3) is an int32 on
/// the wire.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    pub status: i32,
}

const SERVING: i32 = 1;
const SERVICE_UNKNOWN: i32 = 3;

/// `grpc.health.v1.Health`, as tonic-health serves it, plus the drain:
/// a `Watch` ends with OK when this generation starts draining.
#[derive(Clone)]
struct HealthServer {
    /// Started when this generation drains (never, with `--no-drain`).
    drain: Drain,
}

impl NamedService for HealthServer {
    const NAME: &'static str = "grpc.health.v1.Health";
}

/// The services this server reports on: itself ("") and `echo.Echo`.
fn known(service: &str) -> bool {
    service.is_empty() || service == EchoServer::NAME
}

struct Check;

impl UnaryService<HealthCheckRequest> for Check {
    type Response = HealthCheckResponse;
    type Future = BoxFuture<Response<HealthCheckResponse>, Status>;

    fn call(&mut self, request: Request<HealthCheckRequest>) -> Self::Future {
        let service = request.into_inner().service;
        Box::pin(async move {
            if !known(&service) {
                return Err(Status::not_found(format!("unknown service {service:?}")));
            }
            Ok(Response::new(HealthCheckResponse { status: SERVING }))
        })
    }
}

struct Watch(Drain);

type HealthStream = tokio_stream::wrappers::ReceiverStream<Result<HealthCheckResponse, Status>>;

impl ServerStreamingService<HealthCheckRequest> for Watch {
    type Response = HealthCheckResponse;
    type ResponseStream = HealthStream;
    type Future = BoxFuture<Response<HealthStream>, Status>;

    fn call(&mut self, request: Request<HealthCheckRequest>) -> Self::Future {
        let service = request.into_inner().service;
        let already_draining = self.0.is_draining();
        let draining = self.0.draining();
        Box::pin(async move {
            let (updates, stream) = tokio::sync::mpsc::channel(1);
            tokio::spawn(async move {
                // A watch opened while draining ends at once, with OK: the
                // client opens its next one on the new generation.
                if already_draining {
                    return;
                }
                let status = if known(&service) {
                    SERVING
                } else {
                    SERVICE_UNKNOWN
                };
                let update = HealthCheckResponse { status };
                if updates.send(Ok(update)).await.is_err() {
                    return;
                }
                // Held until the drain, or until the client goes away. A
                // watch that never ended would hold the connection, and
                // the old generation, until the drain's deadline.
                tokio::select! {
                    _ = draining => {}
                    () = updates.closed() => {}
                }
            });
            Ok(Response::new(HealthStream::new(stream)))
        })
    }
}

impl<B> Service<http::Request<B>> for HealthServer
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let drain = self.drain.clone();
        match request.uri().path() {
            "/grpc.health.v1.Health/Check" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(Check, request).await)
            }),
            "/grpc.health.v1.Health/Watch" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.server_streaming(Watch(drain), request).await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

/// The `echo.Echo` service, as tonic-build would generate its server.
#[derive(Clone)]
struct EchoServer {
    generation: u64,
}

impl NamedService for EchoServer {
    const NAME: &'static str = "echo.Echo";
}

struct Say(u64);

impl UnaryService<SayRequest> for Say {
    type Response = SayReply;
    type Future = BoxFuture<Response<SayReply>, Status>;

    fn call(&mut self, request: Request<SayRequest>) -> Self::Future {
        let generation = self.0;
        Box::pin(async move {
            let request = request.into_inner();
            // Work that takes a while, so that upgrades find calls in flight.
            let done = tokio::time::Instant::now() + Duration::from_millis(request.delay_ms);
            tokio::time::sleep_until(done).await;
            Ok(Response::new(SayReply {
                message: request.message,
                pid: std::process::id(),
                generation,
            }))
        })
    }
}

struct Count;

type TickStream = tokio_stream::wrappers::ReceiverStream<Result<Tick, Status>>;

impl ServerStreamingService<CountRequest> for Count {
    type Response = Tick;
    type ResponseStream = TickStream;
    type Future = BoxFuture<Response<TickStream>, Status>;

    fn call(&mut self, request: Request<CountRequest>) -> Self::Future {
        Box::pin(async move {
            let request = request.into_inner();
            let (ticks, stream) = tokio::sync::mpsc::channel(4);
            tokio::spawn(async move {
                let period = Duration::from_millis(request.interval_ms.max(1));
                let mut interval = tokio::time::interval(period);
                for n in 0..request.count {
                    interval.tick().await;
                    let tick = Tick {
                        n,
                        pid: std::process::id(),
                    };
                    if ticks.send(Ok(tick)).await.is_err() {
                        return; // the client went away
                    }
                }
            });
            Ok(Response::new(TickStream::new(stream)))
        })
    }
}

impl<B> Service<http::Request<B>> for EchoServer
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let generation = self.generation;
        match request.uri().path() {
            "/echo.Echo/Say" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(Say(generation), request).await)
            }),
            "/echo.Echo/Count" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.server_streaming(Count, request).await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

struct Args {
    listen: SocketAddr,
    pid_file: Option<String>,
    control_socket: Option<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    no_drain: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut listen = "127.0.0.1:50051".parse().map_err(|e| format!("{e}"))?;
    let (mut pid_file, mut control_socket, mut tls_cert, mut tls_key) = (None, None, None, None);
    let mut no_drain = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = value()?.parse().map_err(|e| format!("--listen: {e}"))?,
            "--pid-file" => pid_file = Some(value()?),
            "--control-socket" => control_socket = Some(value()?),
            "--tls-cert" => tls_cert = Some(value()?),
            "--tls-key" => tls_key = Some(value()?),
            "--no-drain" => no_drain = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if tls_cert.is_some() != tls_key.is_some() {
        return Err("--tls-cert and --tls-key go together".into());
    }
    Ok(Args {
        listen,
        pid_file,
        control_socket,
        tls_cert,
        tls_key,
        no_drain,
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
            eprintln!("grpc: {error}");
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

async fn serve(upgrader: Upgrader, args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::from_std(upgrader.tcp_listener("grpc", args.listen)?)?;
    let control = match &args.control_socket {
        Some(path) => Some(upgrader.control_socket(path)?),
        None => None,
    };
    // The certificate is loaded before ready(): one that does not load
    // fails this generation's start, and the old one serves on.
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
    tracing::info!(generation, addr = %listener.local_addr()?, tls = tls.is_some(), "serving gRPC");

    let drain = Drain::new(DrainOptions::default());
    // Without the drain, nothing tells the watches to end: they are cut.
    let health = HealthServer {
        drain: if args.no_drain {
            Drain::new(DrainOptions::default())
        } else {
            drain.clone()
        },
    };
    let routes = tonic::service::Routes::new(EchoServer { generation }).add_service(health);
    let reason = match tls {
        Some(acceptor) => {
            drain
                .serve_tls(listener, acceptor, routes, upgrader.exit())
                .await
        }
        None => drain.serve(listener, routes, upgrader.exit()).await,
    };
    match reason {
        ExitReason::Upgraded(successor) => {
            tracing::info!(generation, successor = successor.pid, "draining")
        }
        _ => tracing::info!(generation, "stopping"),
    }
    if args.no_drain {
        // What a server without a drain does: gone at once.
        tracing::info!(generation, "exiting without the drain");
        return Ok(());
    }
    let outcome = drain.wait().await;
    if let Some(control) = control {
        let _ = control.await;
    }
    tracing::info!(generation, ?outcome, "exiting");
    Ok(())
}
