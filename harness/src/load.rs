//! Load generators that check every response and count every failure.
//!
//! The HTTP client is deliberately strict: it never retries. A request that
//! was sent and got no valid answer is a failure, whatever the cause. A
//! connection that the server closes while no request is on it is not a
//! failure (no request was lost); the client reconnects.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::header::CONNECTION;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;

mod protocols;
pub use protocols::{grpc_health_probe, h2_get, websocket_probe};

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailureClass {
    /// The connection was refused.
    Refused,
    /// The connection was reset or closed with the request unanswered.
    Reset,
    /// No answer in time.
    Timeout,
    /// An answer, but not a 200 with the subject's body.
    WrongResponse,
    /// The TLS handshake failed (the connection was accepted, never served).
    Tls,
    /// An HTTP/2 request sent, then refused by the server's GOAWAY (its
    /// stream above the last one the server took): never processed. A
    /// graceful drain's first GOAWAY (last stream 2³¹−1) prevents it.
    GoAwayRefused,
    /// An HTTP/2 stream reset (RST_STREAM) before its answer.
    StreamReset,
    /// A gRPC call ended UNAVAILABLE.
    GrpcUnavailable,
    /// A gRPC call ended CANCELLED.
    GrpcCancelled,
    /// A gRPC call ended with another non-OK status, or a stream with
    /// replies missing.
    GrpcOther,
    /// A WebSocket message sent and never echoed (the server closed first).
    WsLost,
    /// A WebSocket connection closed without a close frame, or with a code
    /// other than 1000 (normal) or 1001 (going away).
    WsAbnormal,
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureClass::Refused => "refused",
            FailureClass::Reset => "reset",
            FailureClass::Timeout => "timeout",
            FailureClass::WrongResponse => "wrong",
            FailureClass::Tls => "tls",
            FailureClass::GoAwayRefused => "h2_goaway",
            FailureClass::StreamReset => "h2_reset",
            FailureClass::GrpcUnavailable => "grpc_unavailable",
            FailureClass::GrpcCancelled => "grpc_cancelled",
            FailureClass::GrpcOther => "grpc_other",
            FailureClass::WsLost => "ws_lost",
            FailureClass::WsAbnormal => "ws_abnormal",
        })
    }
}

/// What a load run saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Requests answered correctly.
    pub ok: u64,
    /// Failed requests by class.
    pub failures: BTreeMap<FailureClass, u64>,
    /// Connections the server closed between requests (not failures).
    pub reconnects: u64,
    /// The generations that answered.
    pub generations: BTreeSet<u64>,
    /// The first few failures, described.
    pub examples: Vec<String>,
    /// Every HTTP request: when it started and how long it took.
    pub samples: Vec<Sample>,
    /// Echo round trips (TCP, Unix) answered correctly.
    pub echoes: u64,
    /// UDP datagrams sent, and how many were never answered.
    pub udp_sent: u64,
    /// UDP datagrams never answered.
    pub udp_lost: u64,
    /// The local ports of the TCP connections on which a request or round
    /// trip failed: a crashed server process can fail only the connections
    /// it held, and says which (the subject's `crashing` event).
    pub failed_ports: Vec<(FailureClass, u16)>,
    /// Every TLS handshake: when, how long, and which generation then answered.
    pub handshakes: Vec<Handshake>,
    /// Replies of streaming RPCs received in order.
    pub grpc_replies: u64,
    /// WebSocket connections the server closed with 1001 (going away):
    /// the drain's way to say "reconnect", not a failure.
    pub ws_going_away: u64,
}

/// One TLS handshake, for the rate of each generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handshake {
    /// Milliseconds from the start of the load to the handshake's start.
    pub at_ms: u32,
    /// How long it took, in microseconds.
    pub us: u32,
    /// The generation that answered the connection's first request, if any did.
    pub generation: Option<u64>,
    /// It resumed a session (an abbreviated handshake) rather than making a
    /// full one.
    pub resumed: bool,
}

/// What a sample or a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// HTTP/1.1 in the clear.
    Http1,
    /// HTTP/2 in the clear, with prior knowledge.
    H2c,
    /// HTTP/1.1 over TLS.
    TlsHttp1,
    /// HTTP/2 over TLS (ALPN h2).
    TlsH2,
    /// Unary gRPC calls.
    GrpcUnary,
    /// Server-streaming gRPC calls (a sample is a whole stream).
    GrpcStream,
    /// WebSocket echo round trips.
    WebSocket,
    /// gRPC health `Watch` streams held open (a sample is a whole stream).
    GrpcWatch,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Http1 => "http1",
            Protocol::H2c => "h2c",
            Protocol::TlsHttp1 => "tls-http1",
            Protocol::TlsH2 => "tls-h2",
            Protocol::GrpcUnary => "grpc-unary",
            Protocol::GrpcStream => "grpc-stream",
            Protocol::WebSocket => "websocket",
            Protocol::GrpcWatch => "grpc-watch",
        })
    }
}

/// One HTTP request, for the timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Milliseconds from the start of the load to the request.
    pub at_ms: u32,
    /// How long the answer took, in microseconds.
    pub latency_us: u32,
    /// Whether it was answered correctly.
    pub ok: bool,
    /// What it was.
    pub protocol: Protocol,
}

/// Counters readable while the load runs, for a progress line.
#[derive(Debug, Default)]
pub struct Live {
    /// Requests and round trips answered correctly.
    pub ok: AtomicU64,
    /// Failures of every class.
    pub failed: AtomicU64,
    /// HTTP/1.1 clients of [`LoadPlan`] that have had a correct answer.
    answered: AtomicUsize,
    /// Told at each client's first correct answer.
    first_answer: tokio::sync::Notify,
    /// Told at each failure.
    failure: tokio::sync::Notify,
}

impl Live {
    fn first_answer(&self) {
        self.answered.fetch_add(1, Ordering::SeqCst);
        self.first_answer.notify_waiters();
    }

    /// Counts a failure.
    pub(crate) fn failed_one(&self) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        self.failure.notify_waiters();
    }

    /// Returns once a request or round trip has failed.
    pub async fn first_failure(&self) {
        loop {
            let told = self.failure.notified();
            tokio::pin!(told);
            told.as_mut().enable();
            if self.failed.load(Ordering::SeqCst) > 0 {
                return;
            }
            told.await;
        }
    }

    /// How many of the plan's HTTP/1.1 clients have had a correct answer.
    pub fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }

    /// Returns once `clients` HTTP/1.1 clients have had a correct answer
    /// (never, if they cannot: the caller bounds it).
    pub async fn all_answered(&self, clients: usize) {
        loop {
            let told = self.first_answer.notified();
            tokio::pin!(told);
            // Registered before the count is read: no answer slips between.
            told.as_mut().enable();
            if self.answered() >= clients {
                return;
            }
            told.await;
        }
    }
}

impl LoadReport {
    /// All failed requests and round trips, and lost datagrams.
    pub fn failed(&self) -> u64 {
        self.failures.values().sum::<u64>() + self.udp_lost
    }

    /// Failed requests in the classes a plain HTTP/1.1 load knows:
    /// `refused`, `reset`, `timeout`, `wrong`, and `other` for the rest.
    pub fn http_classes(&self) -> [(&'static str, u64); 5] {
        let of = |class| self.failures.get(&class).copied().unwrap_or(0);
        let known = [
            FailureClass::Refused,
            FailureClass::Reset,
            FailureClass::Timeout,
            FailureClass::WrongResponse,
        ];
        let other = self.failed() - known.iter().map(|&class| of(class)).sum::<u64>();
        [
            ("refused", of(FailureClass::Refused)),
            ("reset", of(FailureClass::Reset)),
            ("timeout", of(FailureClass::Timeout)),
            ("wrong", of(FailureClass::WrongResponse)),
            ("other", other),
        ]
    }

    /// One line for a person: `1234 ok, 2 failed (reset=2), served by 21
    /// identities; first: ...`.
    pub fn summary_line(&self) -> String {
        let classes: Vec<String> = self
            .http_classes()
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(class, n)| format!("{class}={n}"))
            .collect();
        let mut line = format!("{} ok, {} failed", self.ok, self.failed());
        if !classes.is_empty() {
            line += &format!(" ({})", classes.join(" "));
        }
        line += &format!(
            ", {} reconnects, served by {} identities",
            self.reconnects,
            self.generations.len()
        );
        if !self.examples.is_empty() {
            line += &format!("; first: {}", self.examples.join("; "));
        }
        line
    }

    /// The same for a program: `ok`, each class of [`LoadReport::http_classes`],
    /// `failed`, `reconnects`, `identities` (the pids or generations that
    /// answered) and `examples`.
    pub fn summary_json(&self) -> serde_json::Value {
        let mut summary = serde_json::Map::new();
        summary.insert("ok".into(), self.ok.into());
        for (class, n) in self.http_classes() {
            summary.insert(class.into(), n.into());
        }
        summary.insert("failed".into(), self.failed().into());
        summary.insert("reconnects".into(), self.reconnects.into());
        summary.insert(
            "identities".into(),
            self.generations
                .iter()
                .copied()
                .collect::<Vec<u64>>()
                .into(),
        );
        summary.insert("examples".into(), self.examples.clone().into());
        summary.into()
    }

    fn fail(&mut self, class: FailureClass, detail: String) {
        *self.failures.entry(class).or_default() += 1;
        if self.examples.len() < 5 {
            self.examples.push(format!("{class}: {detail}"));
        }
    }

    /// Notes the connection a failure of `class` happened on.
    fn failed_on(&mut self, class: FailureClass, port: Option<u16>) {
        if let Some(port) = port {
            self.failed_ports.push((class, port));
        }
    }

    /// Records a connection's TLS handshake, if it had one; returns its
    /// place, for [`LoadReport::handshake_answered`].
    fn handshake_opened(
        &mut self,
        handshake: Option<PendingHandshake>,
        epoch: Instant,
    ) -> Option<usize> {
        let handshake = handshake?;
        self.handshakes.push(Handshake {
            at_ms: handshake.started.duration_since(epoch).as_millis() as u32,
            us: handshake.us,
            generation: None,
            resumed: handshake.resumed,
        });
        Some(self.handshakes.len() - 1)
    }

    /// The first answer on a connection names the generation that shook hands.
    fn handshake_answered(&mut self, handshake: &mut Option<usize>, generation: u64) {
        if let Some(index) = handshake.take() {
            self.handshakes[index].generation = Some(generation);
        }
    }

    fn merge(&mut self, other: LoadReport) {
        self.ok += other.ok;
        self.echoes += other.echoes;
        self.udp_sent += other.udp_sent;
        self.udp_lost += other.udp_lost;
        self.samples.extend(other.samples);
        self.handshakes.extend(other.handshakes);
        self.grpc_replies += other.grpc_replies;
        self.ws_going_away += other.ws_going_away;
        self.reconnects += other.reconnects;
        self.failed_ports.extend(other.failed_ports);
        for (class, n) in other.failures {
            *self.failures.entry(class).or_default() += n;
        }
        self.generations.extend(other.generations);
        for example in other.examples {
            if self.examples.len() < 5 {
                self.examples.push(example);
            }
        }
    }
}

/// How clients use connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Each client keeps its connection for as many requests as the server allows.
    KeepAlive,
    /// Each request on a new connection.
    NewConnection,
}

/// What to run against the subject.
#[derive(Debug, Clone, Default)]
pub struct LoadPlan {
    /// The HTTP address, and clients by mode.
    pub http: Option<SocketAddr>,
    /// Keep-alive clients.
    pub keep_alive: usize,
    /// Connection-per-request clients.
    pub new_connection: usize,
    /// Keep-alive clients that pause between requests: how many, and how
    /// long (a group per pause). Like a pooled client, each checks before
    /// reusing its connection that the server has not closed it meanwhile.
    pub idle: Vec<(usize, Duration)>,
    /// How long the keep-alive and connection-per-request clients pause
    /// before each request (none: one request right after another).
    pub pace: Option<Duration>,
    /// TCP echo address and connections.
    pub tcp: Option<(SocketAddr, usize)>,
    /// Unix echo path and connections.
    pub unix: Option<(PathBuf, usize)>,
    /// How long an echo connection lives before its client reconnects.
    pub connection_life: Duration,
    /// UDP echo address and clients.
    pub udp: Option<(SocketAddr, usize)>,
    /// How to judge an answer of a server that is not the subject; `None`
    /// for the subject's own `pid=.. gen=..` body.
    pub http_check: Option<HttpCheck>,
    /// Clients of the other protocols (HTTP/2, TLS, gRPC, WebSocket).
    pub clients: Vec<Clients>,
}

/// Clients of one protocol, beyond the plain HTTP/1.1 ones of [`LoadPlan`].
#[derive(Debug, Clone)]
pub enum Clients {
    /// HTTP/1.1 clients, over TLS when the target says so.
    Http1 {
        /// Where, and how.
        target: Target,
        /// Keep-alive or a connection per request.
        mode: Mode,
        /// How many clients.
        count: usize,
    },
    /// HTTP/2 connections (prior knowledge, or ALPN `h2` over TLS), each
    /// with `streams` streams one request after another; with
    /// [`Mode::NewConnection`], one request per connection.
    Http2 {
        /// Where, and how.
        target: Target,
        /// Keep-alive or a connection per request.
        mode: Mode,
        /// Concurrent streams per connection.
        streams: usize,
        /// How many connections (clients).
        count: usize,
    },
    /// Unary gRPC calls over h2c, one after another on each connection.
    GrpcUnary {
        /// The gRPC port.
        addr: SocketAddr,
        /// How many clients.
        count: usize,
    },
    /// Server-streaming gRPC calls, each asking for `replies` replies
    /// `interval` apart: streams in flight at every upgrade.
    GrpcStream {
        /// The gRPC port.
        addr: SocketAddr,
        /// How many clients.
        count: usize,
        /// Replies per stream.
        replies: u32,
        /// Between two replies.
        interval: Duration,
    },
    /// WebSocket echo clients.
    WebSocket {
        /// The WebSocket port.
        addr: SocketAddr,
        /// How many clients.
        count: usize,
    },
    /// gRPC health checking (`grpc.health.v1.Health`) over h2c, or h2
    /// over TLS: unary `Check` calls one after another (on one connection,
    /// or each on a new one), or `Watch` streams held open until the
    /// server ends them.
    GrpcHealth {
        /// Where, and how.
        target: Target,
        /// The service asked about (`""`: the whole server).
        service: String,
        /// `Watch` streams instead of `Check` calls.
        watch: bool,
        /// Keep-alive or a connection per call.
        mode: Mode,
        /// How many clients.
        count: usize,
    },
    /// WebSocket clients of anyone's server at `url` (ws:// or wss://,
    /// TLS by the target): a text message at a steady pace, any answer
    /// to each.
    WebSocketAt {
        /// Where, and how.
        target: Target,
        /// The URL asked for (its authority is the Host header).
        url: String,
        /// Between two messages of a client.
        pace: Duration,
        /// How many clients.
        count: usize,
    },
}

impl LoadPlan {
    /// The HTTP/1.1 clients of `http`: keep-alive, connection per request
    /// and idle ones (those [`Live::all_answered`] counts).
    pub fn http_clients(&self) -> usize {
        if self.http.is_none() {
            return 0;
        }
        self.keep_alive + self.new_connection + self.idle.iter().map(|(n, _)| n).sum::<usize>()
    }
}

impl Clients {
    fn count(&self) -> usize {
        match self {
            Clients::Http1 { count, .. }
            | Clients::Http2 { count, .. }
            | Clients::GrpcUnary { count, .. }
            | Clients::GrpcStream { count, .. }
            | Clients::WebSocket { count, .. }
            | Clients::GrpcHealth { count, .. }
            | Clients::WebSocketAt { count, .. } => *count,
        }
    }
}

/// Where a client connects, and whether over TLS.
#[derive(Debug, Clone)]
pub struct Target {
    /// The address.
    pub addr: SocketAddr,
    /// TLS, if the port speaks it.
    pub tls: Option<TlsTarget>,
}

/// A TLS client's configuration and the name it asks for.
#[derive(Debug, Clone)]
pub struct TlsTarget {
    /// Whom it trusts (ALPN is set per protocol).
    pub config: Arc<rustls::ClientConfig>,
    /// The server name it asks for (SNI and the certificate's name).
    pub name: rustls::pki_types::ServerName<'static>,
}

impl Target {
    /// A plain TCP target.
    pub fn plain(addr: SocketAddr) -> Target {
        Target { addr, tls: None }
    }

    fn protocol(&self, http2: bool) -> Protocol {
        match (self.tls.is_some(), http2) {
            (false, false) => Protocol::Http1,
            (false, true) => Protocol::H2c,
            (true, false) => Protocol::TlsHttp1,
            (true, true) => Protocol::TlsH2,
        }
    }

    /// Connects, and shakes hands over TLS offering `alpn` if this target
    /// is TLS (the default configuration's ALPN when `alpn` is empty).
    async fn open(&self, alpn: &[&[u8]]) -> Result<Opened, (FailureClass, String)> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| (connect_failure(&e), format!("connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let port = tcp.local_addr().map(|addr| addr.port()).ok();
        let Some(tls) = &self.tls else {
            return Ok(Opened {
                port,
                io: Box::new(tcp),
                handshake: None,
                alpn: None,
            });
        };
        let config = if alpn.is_empty() {
            Arc::clone(&tls.config)
        } else {
            let mut config = (*tls.config).clone();
            config.alpn_protocols = alpn.iter().map(|id| id.to_vec()).collect();
            Arc::new(config)
        };
        let started = Instant::now();
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(tls.name.clone(), tcp)
            .await
            .map_err(|e| (FailureClass::Tls, format!("TLS handshake: {e}")))?;
        let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let resumed = stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        Ok(Opened {
            port,
            io: Box::new(stream),
            handshake: Some(PendingHandshake {
                started,
                us: started.elapsed().as_micros().min(u32::MAX as u128) as u32,
                resumed,
            }),
            alpn,
        })
    }
}

/// A byte stream, plain or TLS.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A connection just made.
struct Opened {
    io: Box<dyn Io>,
    /// The local port, for [`LoadReport::failed_ports`].
    port: Option<u16>,
    handshake: Option<PendingHandshake>,
    alpn: Option<Vec<u8>>,
}

/// A TLS handshake whose generation the first answer will tell.
#[derive(Clone, Copy)]
struct PendingHandshake {
    started: Instant,
    us: u32,
    resumed: bool,
}

/// Puts each answer on the timeline and the live counters.
#[derive(Clone)]
struct Recorder {
    epoch: Instant,
    live: Arc<Live>,
    protocol: Protocol,
}

impl Recorder {
    fn record(&self, report: &mut LoadReport, sent: Instant, ok: bool) {
        report.samples.push(Sample {
            at_ms: sent.duration_since(self.epoch).as_millis() as u32,
            latency_us: sent.elapsed().as_micros().min(u32::MAX as u128) as u32,
            ok,
            protocol: self.protocol,
        });
        if ok {
            self.live.ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.live.failed_one();
        }
    }
}

/// How the HTTP clients judge a black-box server's answers: a 200 on
/// `path`, with `body_contains` in the body if given. The generation that
/// answered is read from `identity`, when the server names it.
#[derive(Debug, Clone)]
pub struct HttpCheck {
    /// The path every request asks for.
    pub path: String,
    /// The `Host` header.
    pub host: String,
    /// Text the body must contain.
    pub body_contains: Option<String>,
    /// Where the answer names the process or generation that gave it.
    pub identity: Identity,
    /// TLS, when the server speaks it (for the HTTP/1.1 clients and probes).
    pub tls: Option<TlsTarget>,
    /// Probes speak HTTP/2: the server may speak nothing else on this port.
    pub http2: bool,
    /// Probes are gRPC health `Check`s of this service (`""`: the whole
    /// server) instead of `GET`s.
    pub grpc: Option<String>,
    /// Probes are a WebSocket message to this path, answered.
    pub websocket: Option<String>,
}

impl Default for HttpCheck {
    fn default() -> Self {
        HttpCheck {
            path: "/".into(),
            host: "localhost".into(),
            body_contains: None,
            identity: Identity::None,
            tls: None,
            http2: false,
            grpc: None,
            websocket: None,
        }
    }
}

/// Where a server's answer names the process or generation that gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// It does not.
    None,
    /// In this response header (`X-Pid: 1234`).
    Header(String),
    /// In the body's word after this prefix (`pid=` in `pid=1234 generation=2`).
    BodyPrefix(String),
}

impl Identity {
    /// The identity an answer names, if this server names one.
    pub fn of(&self, headers: &[(String, String)], body: &str) -> Option<String> {
        match self {
            Identity::None => None,
            Identity::Header(name) => headers
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.trim().to_owned()),
            Identity::BodyPrefix(prefix) => body
                .split_whitespace()
                .find_map(|word| word.strip_prefix(prefix.as_str()))
                .map(str::to_owned),
        }
    }
}

/// An identity as a number for [`LoadReport::generations`]: itself if it
/// is one (a pid, a generation), else a hash of its text.
fn identity_number(identity: &str) -> u64 {
    identity.parse().unwrap_or_else(|_| {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        identity.hash(&mut hasher);
        hasher.finish()
    })
}

/// Load running on its own thread until [`Load::finish`].
#[derive(Debug)]
pub struct Load {
    stop: watch::Sender<bool>,
    thread: std::thread::JoinHandle<LoadReport>,
    live: Arc<Live>,
}

/// The HTTP-only load the tests use.
pub type HttpLoad = Load;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Pace of one echo or UDP client: a message every this long.
const ECHO_PACE: Duration = Duration::from_millis(2);

impl Load {
    /// Starts `clients` HTTP clients, each sending one request after another.
    pub fn start(addr: SocketAddr, clients: usize, mode: Mode) -> Load {
        let (keep_alive, new_connection) = match mode {
            Mode::KeepAlive => (clients, 0),
            Mode::NewConnection => (0, clients),
        };
        Load::run(LoadPlan {
            http: Some(addr),
            keep_alive,
            new_connection,
            ..LoadPlan::default()
        })
    }

    /// Starts every client of `plan`.
    pub fn run(plan: LoadPlan) -> Load {
        let (stop, stopped) = watch::channel(false);
        let live = Arc::new(Live::default());
        let counters = Arc::clone(&live);
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            runtime.block_on(run_plan(plan, stopped, counters))
        });
        Load { stop, thread, live }
    }

    /// Counters that move while the load runs.
    pub fn live(&self) -> Arc<Live> {
        Arc::clone(&self.live)
    }

    /// Stops every client and reports what they saw.
    pub fn finish(self) -> LoadReport {
        let _ = self.stop.send(true);
        self.thread.join().expect("the load thread does not panic")
    }
}

async fn run_plan(plan: LoadPlan, stopped: watch::Receiver<bool>, live: Arc<Live>) -> LoadReport {
    let started = Instant::now();
    let total = Arc::new(Mutex::new(LoadReport::default()));
    let mut tasks = tokio::task::JoinSet::new();
    let mut spawn =
        |client: std::pin::Pin<Box<dyn std::future::Future<Output = LoadReport> + Send>>| {
            let total = Arc::clone(&total);
            tasks.spawn(async move {
                let report = client.await;
                total.lock().expect("no panic while held").merge(report);
            });
        };
    if let Some(addr) = plan.http {
        let http = |mode, pause| {
            Box::pin(client(
                Target {
                    addr,
                    tls: plan.http_check.as_ref().and_then(|c| c.tls.clone()),
                },
                mode,
                pause,
                plan.http_check.clone(),
                stopped.clone(),
                Arc::clone(&live),
                started,
            )) as _
        };
        (0..plan.keep_alive).for_each(|_| spawn(http(Mode::KeepAlive, plan.pace)));
        (0..plan.new_connection).for_each(|_| spawn(http(Mode::NewConnection, plan.pace)));
        for &(clients, pause) in &plan.idle {
            (0..clients).for_each(|_| spawn(http(Mode::KeepAlive, Some(pause))));
        }
    }
    let life = plan.connection_life.max(ECHO_PACE);
    if let Some((addr, clients)) = plan.tcp {
        for _ in 0..clients {
            let connect = move || async move { TcpStream::connect(addr).await };
            spawn(Box::pin(echo_client(
                connect,
                life,
                stopped.clone(),
                Arc::clone(&live),
            )));
        }
    }
    if let Some((path, clients)) = plan.unix {
        for _ in 0..clients {
            let path = path.clone();
            let connect = move || {
                let path = path.clone();
                async move { tokio::net::UnixStream::connect(path).await }
            };
            spawn(Box::pin(echo_client(
                connect,
                life,
                stopped.clone(),
                Arc::clone(&live),
            )));
        }
    }
    if let Some((addr, clients)) = plan.udp {
        for _ in 0..clients {
            spawn(Box::pin(udp_client(
                addr,
                stopped.clone(),
                Arc::clone(&live),
            )));
        }
    }
    for clients in &plan.clients {
        for _ in 0..clients.count() {
            let run = protocols::Run {
                check: plan.http_check.clone(),
                stopped: stopped.clone(),
                live: Arc::clone(&live),
                epoch: started,
            };
            spawn(Box::pin(protocols::client(clients.clone(), run)));
        }
    }
    while tasks.join_next().await.is_some() {}
    let mut report = total.lock().expect("no panic while held").clone();
    report.samples.sort_by_key(|s| s.at_ms);
    report
}

async fn client(
    target: Target,
    mode: Mode,
    pause: Option<Duration>,
    check: Option<HttpCheck>,
    mut stopped: watch::Receiver<bool>,
    live: Arc<Live>,
    epoch: Instant,
) -> LoadReport {
    let mut report = LoadReport::default();
    let recorder = Recorder {
        epoch,
        live: Arc::clone(&live),
        protocol: target.protocol(false),
    };
    let record =
        |report: &mut LoadReport, sent: Instant, ok: bool| recorder.record(report, sent, ok);
    'connections: while !*stopped.borrow() {
        let opened = match target.open(&[]).await {
            Ok(opened) => opened,
            Err((class, detail)) => {
                report.fail(class, detail);
                live.failed_one();
                // A paced client does not hammer a closed port either.
                if let Some(pace) = pause {
                    tokio::select! {
                        _ = tokio::time::sleep(pace) => {}
                        _ = stopped.changed() => break 'connections,
                    }
                }
                continue;
            }
        };
        let port = opened.port;
        let mut handshake = report.handshake_opened(opened.handshake, epoch);
        let Ok((mut sender, connection)) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(opened.io)).await
        else {
            report.fail(FailureClass::Reset, "handshake".into());
            report.failed_on(FailureClass::Reset, port);
            live.failed_one();
            continue;
        };
        tokio::spawn(connection);
        loop {
            if *stopped.borrow() {
                break 'connections;
            }
            if let Some(pause) = pause {
                // An idle keep-alive client (or a paced busy one); the
                // server may close the connection meanwhile, which
                // `ready()` then tells.
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stopped.changed() => break 'connections,
                }
            }
            if sender.ready().await.is_err() {
                // Closed by the server between requests: nothing was lost.
                report.reconnects += 1;
                continue 'connections;
            }
            let sent = Instant::now();
            let (path, host) = check
                .as_ref()
                .map_or(("/", "subject"), |c| (c.path.as_str(), c.host.as_str()));
            let request = Request::get(path)
                .header("host", host)
                .header(
                    CONNECTION,
                    if mode == Mode::KeepAlive {
                        "keep-alive"
                    } else {
                        "close"
                    },
                )
                .body(Empty::new())
                .expect("a valid request");
            let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let response = sender.send_request(request).await?;
                let status = response.status();
                let close = response
                    .headers()
                    .get(CONNECTION)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                let headers: Vec<(String, String)> = response
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                    .collect();
                let body = response.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>((status, close, headers, body))
            })
            .await;
            let (status, close, headers, body) = match answer {
                Err(_) => {
                    record(&mut report, sent, false);
                    report.fail(FailureClass::Timeout, "no answer".into());
                    report.failed_on(FailureClass::Timeout, port);
                    continue 'connections;
                }
                Ok(Err(e)) => {
                    record(&mut report, sent, false);
                    report.fail(FailureClass::Reset, e.to_string());
                    report.failed_on(FailureClass::Reset, port);
                    continue 'connections;
                }
                Ok(Ok(answer)) => answer,
            };
            let body = String::from_utf8_lossy(&body);
            let generation = match &check {
                None => parse_generation(&body),
                Some(check) => (status == 200
                    && check
                        .body_contains
                        .as_ref()
                        .is_none_or(|text| body.contains(text.as_str())))
                .then(|| {
                    check
                        .identity
                        .of(&headers, &body)
                        .map_or(0, |identity| identity_number(&identity))
                }),
            };
            match generation {
                Some(generation) if status == 200 => {
                    record(&mut report, sent, true);
                    if report.ok == 0 {
                        live.first_answer();
                    }
                    report.ok += 1;
                    report.generations.insert(generation);
                    report.handshake_answered(&mut handshake, generation);
                }
                _ => {
                    record(&mut report, sent, false);
                    report.fail(FailureClass::WrongResponse, format!("{status} {body:?}"));
                    report.failed_on(FailureClass::WrongResponse, port);
                }
            }
            if close || mode == Mode::NewConnection {
                continue 'connections;
            }
        }
    }
    report
}

fn connect_failure(e: &std::io::Error) -> FailureClass {
    if e.kind() == std::io::ErrorKind::ConnectionRefused {
        FailureClass::Refused
    } else {
        FailureClass::Reset
    }
}

/// The local port of a connection, for [`LoadReport::failed_ports`].
pub trait LocalPort {
    /// `None` where there are no ports (Unix sockets).
    fn local_port(&self) -> Option<u16>;
}

impl LocalPort for TcpStream {
    fn local_port(&self) -> Option<u16> {
        self.local_addr().map(|addr| addr.port()).ok()
    }
}

impl LocalPort for tokio::net::UnixStream {
    /// Port 0 stands for every Unix connection: a crashed server can name
    /// only how many it held.
    fn local_port(&self) -> Option<u16> {
        Some(UNIX_PORT)
    }
}

/// The port [`LoadReport::failed_ports`] gives a Unix connection.
pub const UNIX_PORT: u16 = 0;

/// A client of the echo service that keeps each connection for `life`,
/// sending a numbered message every [`ECHO_PACE`] and checking its echo: a
/// connection that stays open across an upgrade must keep being served by
/// the old generation until the client closes it.
async fn echo_client<C, F, S>(
    connect: C,
    life: Duration,
    stopped: watch::Receiver<bool>,
    live: Arc<Live>,
) -> LoadReport
where
    C: Fn() -> F,
    F: std::future::Future<Output = std::io::Result<S>>,
    S: AsyncRead + AsyncWrite + Unpin + LocalPort,
{
    let mut report = LoadReport::default();
    let mut sequence = 0u64;
    while !*stopped.borrow() {
        let mut stream = match connect().await {
            Ok(stream) => stream,
            Err(e) => {
                report.fail(connect_failure(&e), format!("echo connect: {e}"));
                live.failed_one();
                continue;
            }
        };
        let opened = Instant::now();
        let port = stream.local_port();
        let mut pace = tokio::time::interval(ECHO_PACE);
        while opened.elapsed() < life && !*stopped.borrow() {
            pace.tick().await;
            sequence += 1;
            let message = format!("{sequence:020}\n");
            let mut echoed = vec![0u8; message.len()];
            let round_trip = tokio::time::timeout(REQUEST_TIMEOUT, async {
                stream.write_all(message.as_bytes()).await?;
                stream.read_exact(&mut echoed).await
            })
            .await;
            match round_trip {
                Ok(Ok(_)) if echoed == message.as_bytes() => {
                    report.echoes += 1;
                    live.ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Ok(_)) => {
                    report.fail(
                        FailureClass::WrongResponse,
                        format!("echo {:?}", String::from_utf8_lossy(&echoed)),
                    );
                    live.failed_one();
                    report.failed_on(FailureClass::WrongResponse, port);
                    break;
                }
                Ok(Err(e)) => {
                    report.fail(FailureClass::Reset, format!("echo: {e}"));
                    live.failed_one();
                    report.failed_on(FailureClass::Reset, port);
                    break;
                }
                Err(_) => {
                    report.fail(FailureClass::Timeout, "echo: no answer".into());
                    live.failed_one();
                    report.failed_on(FailureClass::Timeout, port);
                    break;
                }
            }
        }
        let _ = stream.shutdown().await;
    }
    report
}

/// A UDP client: a numbered datagram every [`ECHO_PACE`]; at the end it
/// waits (bounded) for the last answers, and what never came back is lost.
async fn udp_client(
    addr: SocketAddr,
    mut stopped: watch::Receiver<bool>,
    live: Arc<Live>,
) -> LoadReport {
    let mut report = LoadReport::default();
    let socket = match UdpSocket::bind("127.0.0.1:0").await {
        Ok(socket) => socket,
        Err(e) => {
            report.fail(FailureClass::Refused, format!("udp bind: {e}"));
            return report;
        }
    };
    if let Err(e) = socket.connect(addr).await {
        report.fail(FailureClass::Refused, format!("udp connect: {e}"));
        return report;
    }
    let mut answered = BTreeSet::new();
    let mut pace = tokio::time::interval(ECHO_PACE);
    let mut buffer = [0u8; 64];
    let receive = |n: usize, answered: &mut BTreeSet<u64>, buffer: &[u8]| {
        let seq = std::str::from_utf8(&buffer[..n])
            .ok()
            .and_then(|t| t.trim().parse().ok());
        if seq.is_some_and(|seq| answered.insert(seq)) {
            live.ok.fetch_add(1, Ordering::Relaxed);
        }
    };
    loop {
        tokio::select! {
            _ = stopped.changed() => break,
            _ = pace.tick() => {
                report.udp_sent += 1;
                let _ = socket.send(format!("{}\n", report.udp_sent).as_bytes()).await;
            }
            received = socket.recv(&mut buffer) => {
                if let Ok(n) = received {
                    receive(n, &mut answered, &buffer);
                }
            }
        }
    }
    // The last answers are on their way: wait for them, not for ever.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while (answered.len() as u64) < report.udp_sent {
        match tokio::time::timeout_at(deadline, socket.recv(&mut buffer)).await {
            Ok(Ok(n)) => receive(n, &mut answered, &buffer),
            _ => break,
        }
    }
    report.udp_lost = report.udp_sent - answered.len() as u64;
    if report.udp_lost > 0 {
        report.examples.push(format!(
            "udp: {} of {} datagrams unanswered",
            report.udp_lost, report.udp_sent
        ));
    }
    report
}

/// The generation in a subject's `pid=.. gen=..` body.
pub fn parse_generation(body: &str) -> Option<u64> {
    body.split_whitespace()
        .find_map(|word| word.strip_prefix("gen="))?
        .parse()
        .ok()
}
