//! The protocol examples (`examples/axum.rs`, `examples/grpc.rs`) as real
//! processes on real sockets, under load from strict clients (a request
//! that was sent and failed is a failure; nothing is retried), across
//! SIGHUP upgrades: HTTP/1.1 and h2c, both over TLS with a CA made at test
//! time, gRPC unary and server-streaming, WebSocket. And the same load on
//! axum's stock `with_graceful_shutdown`, which must show failures: the
//! test sees what it claims to prevent.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

/// How long a test waits for an event of the server before it fails.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds the examples once per test binary (a no-op when up to date): a
/// `cargo test --test protocols` alone does not build them.
fn example(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    BUILT.get_or_init(|| {
        let mut cargo = std::process::Command::new(env!("CARGO"));
        // The variables cargo sets for this test (CARGO_PKG_*, OUT_DIR, ...)
        // are watched by ring's build script: passed on, they would make
        // this build and the test's own rebuild ring and all above it, each
        // time.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name == "OUT_DIR"
                || (name.starts_with("CARGO_")
                    && name != "CARGO_HOME"
                    && name != "CARGO_TARGET_DIR")
            {
                cargo.env_remove(&*name);
            }
        }
        let status = cargo
            .args(["build", "-q", "-p", "handover", "--example", "axum"])
            .args(["--example", "grpc", "--features", "axum,websocket,tls"])
            .current_dir(root)
            .status()
            .expect("cargo runs");
        assert!(status.success(), "the examples build");
    });
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target.join("debug/examples").join(name)
}

/// A running example: its log lines (every generation writes to the same
/// pipe) arrive on a channel.
struct Server {
    first: Child,
    lines: mpsc::UnboundedReceiver<String>,
    history: Vec<String>,
    addr: SocketAddr,
    generation: u64,
    _dir: tempfile::TempDir,
}

/// `key=value` of a tracing log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
}

fn is(line: &str, message: &str, generation: u64) -> bool {
    line.contains(&format!(": {message} "))
        && field(line, "generation") == Some(&generation.to_string())
}

impl Server {
    async fn start(name: &str, args: &[&str]) -> Server {
        // Orphaned generations come back to this process, which reaps them
        // (Linux; on macOS they go to launchd, and `stop` waits for their
        // log lines alone).
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let _ = nix::sys::prctl::set_child_subreaper(true);
        let dir = tempfile::tempdir().unwrap();
        let mut first = Command::new(example(name))
            .args(["--listen", "127.0.0.1:0", "--pid-file"])
            .arg(dir.path().join("pid"))
            .args(args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = tokio::process::ChildStderr::from_std(first.stderr.take().unwrap()).unwrap();
        let (sender, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        let mut server = Server {
            first,
            lines,
            history: Vec::new(),
            addr: ([127, 0, 0, 1], 0).into(),
            generation: 0,
            _dir: dir,
        };
        let serving = server.wait(|line| is(line, "serving", 0)).await;
        server.addr = field(&serving, "addr").unwrap().parse().unwrap();
        server
    }

    /// The first line, seen before or arriving now, that matches.
    async fn wait(&mut self, matches: impl Fn(&str) -> bool) -> String {
        if let Some(line) = self.history.iter().find(|line| matches(line)) {
            return line.clone();
        }
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let line = timeout(
                deadline.saturating_duration_since(Instant::now()),
                self.lines.recv(),
            )
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no such line within {EVENT_TIMEOUT:?}; saw {:#?}",
                    self.history
                )
            })
            .unwrap_or_else(|| panic!("the server's log closed; saw {:#?}", self.history));
            self.history.push(line.clone());
            if matches(&line) {
                return line;
            }
        }
    }

    async fn pid_of(&mut self, generation: u64) -> Pid {
        let ready = self.wait(|line| is(line, "ready", generation)).await;
        Pid::from_raw(field(&ready, "pid").unwrap().parse().unwrap())
    }

    /// SIGHUP to the serving generation; returns once its successor serves
    /// and the old generation has heard it is ready (the library's line;
    /// the example's own "draining" is not said by `--stock-shutdown`).
    /// Not before: a successor stopped between its ready byte and the old
    /// generation reading it fails that upgrade, and the old generation
    /// serves on.
    async fn upgrade(&mut self) {
        let previous = self.generation;
        let pid = self.pid_of(previous).await;
        kill(pid, Signal::SIGHUP).unwrap();
        self.generation += 1;
        let next = self.generation;
        self.wait(|line| is(line, "serving", next)).await;
        self.wait(|line| is(line, "successor ready: this generation exits", previous))
            .await;
    }

    /// Stops the serving generation and waits until every generation has
    /// said how its drain ended; returns those lines.
    async fn stop(mut self) -> Vec<String> {
        let pid = self.pid_of(self.generation).await;
        kill(pid, Signal::SIGTERM).unwrap();
        let mut exits = Vec::new();
        for generation in 0..=self.generation {
            exits.push(self.wait(|line| is(line, "exiting", generation)).await);
        }
        let _ = self.first.wait();
        if std::env::var_os("PROTOCOLS_LOG").is_some() {
            eprintln!("{:#?}", self.history);
        }
        // Reap the later generations, re-parented to this process.
        while let Ok(status) =
            nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG))
        {
            if status == nix::sys::wait::WaitStatus::StillAlive {
                break;
            }
        }
        exits
    }
}

/// What strict clients saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Answers for which the server said "not processed, go elsewhere"
    /// (WebSocket close 1001 in place of an answer).
    refused: AtomicU64,
    pids: Mutex<BTreeSet<String>>,
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: impl std::fmt::Display) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock().unwrap();
        if errors.len() < 20 {
            errors.push(what.to_string());
        }
    }

    fn answered_by(&self, body: &str) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        if let Some(pid) = field(body, "pid") {
            self.pids.lock().unwrap().insert(pid.to_string());
        }
    }

    fn summary(&self) -> String {
        format!(
            "ok {} failed {} refused {} pids {:?} errors {:#?}",
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            self.pids.lock().unwrap(),
            self.errors.lock().unwrap()
        )
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Clone, Copy, PartialEq)]
enum Http {
    One,
    Two,
}

/// A test CA and a certificate for `localhost` signed by it, as PEM files.
struct Pki {
    ca: rustls::pki_types::CertificateDer<'static>,
    ca_pem: String,
    cert: PathBuf,
    key: PathBuf,
    _dir: tempfile::TempDir,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, leaf.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    Pki {
        ca: ca.der().clone(),
        ca_pem: ca.pem(),
        cert: cert_path,
        key: key_path,
        _dir: dir,
    }
}

fn tls_connector(pki: &Pki, alpn: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

enum Sender {
    One(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    Two(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

/// One strict client: a keep-alive connection, requests one after another;
/// a new connection when the server closed the old one (HTTP/1.1 after
/// `Connection: close`, HTTP/2 after GOAWAY). A request that was sent and
/// got no 200 is a failure; one the client never sent (its connection was
/// already closing) is not a request.
async fn http_client(
    addr: SocketAddr,
    http: Http,
    tls: Option<tokio_rustls::TlsConnector>,
    path: &'static str,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    while !stop.load(Ordering::Relaxed) {
        let tcp = match TcpStream::connect(addr).await {
            Ok(tcp) => tcp,
            Err(error) => {
                tally.fail(format!("connect: {error}"));
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &tls {
            None => Box::new(tcp),
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                match connector.connect(name, tcp).await {
                    Ok(stream) => Box::new(stream),
                    Err(error) => {
                        tally.fail(format!("TLS handshake: {error}"));
                        continue;
                    }
                }
            }
        };
        let mut sender = match http {
            Http::One => match hyper::client::conn::http1::handshake(TokioIo::new(io)).await {
                Ok((sender, connection)) => {
                    tokio::spawn(connection);
                    Sender::One(sender)
                }
                Err(error) => {
                    tally.fail(format!("HTTP/1.1 handshake: {error}"));
                    continue;
                }
            },
            Http::Two => {
                match hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                    .await
                {
                    Ok((sender, connection)) => {
                        tokio::spawn(connection);
                        Sender::Two(sender)
                    }
                    Err(error) => {
                        tally.fail(format!("HTTP/2 handshake: {error}"));
                        continue;
                    }
                }
            }
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        while !stop.load(Ordering::Relaxed) {
            let sent = match &mut sender {
                Sender::One(sender) => {
                    if sender.ready().await.is_err() {
                        break; // closed after `Connection: close`
                    }
                    let request = Request::get(path)
                        .header("host", "localhost")
                        .body(Empty::new())
                        .unwrap();
                    sender.try_send_request(request).await
                }
                Sender::Two(sender) => {
                    if sender.ready().await.is_err() {
                        break; // closed after GOAWAY
                    }
                    let request = Request::get(format!("{scheme}://localhost{path}"))
                        .body(Empty::new())
                        .unwrap();
                    sender.try_send_request(request).await
                }
            };
            match sent {
                Ok(response) => {
                    let status = response.status();
                    match response.into_body().collect().await {
                        Ok(body) if status == 200 => {
                            tally.answered_by(&String::from_utf8_lossy(&body.to_bytes()))
                        }
                        Ok(_) => tally.fail(format!("status {status}")),
                        Err(error) => tally.fail(format!("body: {error}")),
                    }
                }
                Err(mut error) => {
                    // Never sent: the connection was closing. Not a request.
                    if error.take_message().is_none() {
                        let error = error.into_error();
                        if unprocessed(&error) {
                            tally.refused.fetch_add(1, Ordering::Relaxed);
                        } else {
                            tally.fail(format!("{path}: {error:?}"));
                        }
                    }
                    break;
                }
            }
        }
    }
}

/// Whether an error says the server did not process the request, so
/// that HTTP/2 lets a client send it again anywhere (RFC 9113 §6.8, §8.7): a
/// stream above the last stream id of the server's GOAWAY, or a request
/// hyper had not sent when its connection closed. The h2 crate's client
/// (under hyper and tonic) opens streams after the server's first GOAWAY,
/// which RFC 9113 §6.8 forbids ("MUST NOT open additional streams"): those
/// that cross the final GOAWAY end so. A compliant client (nghttp2's, Go's)
/// opens none; see the README's h2load figures.
fn unprocessed(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(hyper) = error.downcast_ref::<hyper::Error>() {
            return hyper.is_canceled()
                || format!("{hyper:?}").contains("GoAway(b\"\", NO_ERROR, Remote)");
        }
        cause = error.source();
    }
    false
}

/// Answers the clients get from each generation before the next upgrade.
const PER_GENERATION: u64 = 20;

/// Waits until the clients have `more` answers than now (or failures: the
/// test then reports them), checking every few milliseconds, for a bounded
/// time.
async fn progress(tally: &Tally, more: u64) {
    let target = tally.ok.load(Ordering::Relaxed) + more;
    let deadline = Instant::now() + EVENT_TIMEOUT;
    let mut check = tokio::time::interval(Duration::from_millis(5));
    while tally.ok.load(Ordering::Relaxed) < target && tally.failed.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "no progress: {}",
            tally.summary()
        );
        check.tick().await;
    }
}

/// Runs `clients` while upgrading the server `upgrades` times, waiting for
/// each successor to serve; then stops the clients and the server.
async fn under_load(
    mut server: Server,
    upgrades: u64,
    clients: Vec<tokio::task::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    tally: &Tally,
) -> Vec<String> {
    let started = Instant::now();
    for _ in 0..=upgrades {
        progress(tally, PER_GENERATION).await;
        if server.generation == upgrades {
            break;
        }
        server.upgrade().await;
        eprintln!(
            "{:?}: generation {} serves",
            started.elapsed(),
            server.generation
        );
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        timeout(EVENT_TIMEOUT, client)
            .await
            .expect("a client ends")
            .expect("a client does not panic");
    }
    eprintln!("{:?}: clients stopped", started.elapsed());
    server.stop().await
}

async fn http_load(args: &[&str], pki: Option<&Pki>, upgrades: u64) -> (Arc<Tally>, Vec<String>) {
    let server = Server::start("axum", args).await;
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut clients = Vec::new();
    for (http, path) in [
        (Http::One, "/"),
        (Http::One, "/"),
        (Http::One, "/slow?ms=30"),
        (Http::Two, "/"),
        (Http::Two, "/"),
        (Http::Two, "/slow?ms=30"),
    ] {
        let tls = pki.map(|pki| {
            tls_connector(
                pki,
                if http == Http::Two {
                    b"h2"
                } else {
                    b"http/1.1"
                },
            )
        });
        clients.push(tokio::spawn(http_client(
            server.addr,
            http,
            tls,
            path,
            Arc::clone(&stop),
            Arc::clone(&tally),
        )));
    }
    let exits = under_load(server, upgrades, clients, stop, &tally).await;
    (tally, exits)
}

/// HTTP/1.1 and h2c on one port, keep-alive, across upgrades: nothing
/// fails, and the answers come from every generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_http1_and_h2c_lose_no_request_across_upgrades() {
    let (tally, exits) = http_load(&[], None, 5).await;
    let summary = tally.summary();
    eprintln!("{summary}");
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0, "{summary}");
    assert!(
        tally.ok.load(Ordering::Relaxed) >= 5 * PER_GENERATION,
        "{summary}"
    );
    assert!(
        tally.pids.lock().unwrap().len() >= 5,
        "answers from the generations: {summary}"
    );
    assert!(
        exits.iter().all(|line| line.contains("outcome=Complete")),
        "{exits:#?}"
    );
}

/// The same over TLS (h1 and h2 by ALPN), with a CA made here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_over_tls_loses_no_request_across_upgrades() {
    let pki = pki();
    let (cert, key) = (pki.cert.to_str().unwrap(), pki.key.to_str().unwrap());
    let (tally, exits) = http_load(&["--tls-cert", cert, "--tls-key", key], Some(&pki), 5).await;
    let summary = tally.summary();
    eprintln!("{summary}");
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0, "{summary}");
    assert!(
        tally.ok.load(Ordering::Relaxed) >= 5 * PER_GENERATION,
        "{summary}"
    );
    assert!(tally.pids.lock().unwrap().len() >= 5, "{summary}");
    assert!(
        exits.iter().all(|line| line.contains("outcome=Complete")),
        "{exits:#?}"
    );
}

/// axum's own `with_graceful_shutdown` under the same load and upgrades:
/// the clients must see failures, or the tests above prove nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_stock_graceful_shutdown_loses_requests_and_the_test_sees_it() {
    let (tally, _) = http_load(&["--stock-shutdown"], None, 5).await;
    assert!(
        tally.failed.load(Ordering::Relaxed) > 0,
        "no failure seen: {}",
        tally.summary()
    );
    eprintln!("stock with_graceful_shutdown: {}", tally.summary());
}

/// A successor whose certificate does not load fails before ready(): the
/// upgrade fails, and the old generation serves on with its certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_fails_the_upgrade_and_the_old_generation_serves_on() {
    let pki = pki();
    let (cert, key) = (pki.cert.to_str().unwrap(), pki.key.to_str().unwrap());
    let mut server = Server::start("axum", &["--tls-cert", cert, "--tls-key", key]).await;
    let good = std::fs::read(&pki.cert).unwrap();
    std::fs::write(&pki.cert, "not a certificate\n").unwrap();
    let pid = server.pid_of(0).await;
    kill(pid, Signal::SIGHUP).unwrap();
    let error = server.wait(|line| line.starts_with("axum: ")).await;
    assert!(
        error.contains("cert.pem") && error.contains("no CERTIFICATE"),
        "the successor says which file is wrong: {error}"
    );
    server
        .wait(|line| line.contains("upgrade failed") || line.contains("successor exited"))
        .await;
    // The old generation answers over TLS with the certificate it loaded.
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let client = tokio::spawn(http_client(
        server.addr,
        Http::Two,
        Some(tls_connector(&pki, b"h2")),
        "/",
        Arc::clone(&stop),
        Arc::clone(&tally),
    ));
    progress(&tally, 10).await;
    stop.store(true, Ordering::Relaxed);
    client.await.unwrap();
    assert_eq!(
        tally.failed.load(Ordering::Relaxed),
        0,
        "{}",
        tally.summary()
    );
    assert_eq!(
        *tally.pids.lock().unwrap(),
        BTreeSet::from([pid.to_string()]),
        "the old generation serves on"
    );
    // A good certificate again: the next upgrade goes through.
    std::fs::write(&pki.cert, good).unwrap();
    server.upgrade().await;
    server.stop().await;
}

/// A client with a TLS session from the old generation resumes it with the
/// new one (an abbreviated handshake, no certificate sent), over TLS 1.3
/// and TLS 1.2: the example hands its session-ticket keys to its successor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_resume_across_an_upgrade() {
    use rustls::HandshakeKind::{Full, Resumed};
    let pki = pki();
    let (cert, key) = (pki.cert.to_str().unwrap(), pki.key.to_str().unwrap());
    let mut server = Server::start("axum", &["--tls-cert", cert, "--tls-key", key]).await;
    let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
    let connectors = versions.map(|version| resuming_connector(&pki, version));
    for connector in &connectors {
        assert_eq!(tls_hello(connector, server.addr).await, (Full, 0));
        assert_eq!(tls_hello(connector, server.addr).await, (Resumed, 0));
    }
    server.upgrade().await;
    // Generation 0's accept loop has ended (its "draining" line comes after
    // it): a new connection reaches generation 1.
    server.wait(|line| is(line, "draining", 0)).await;
    for (connector, version) in connectors.iter().zip(versions) {
        assert_eq!(
            tls_hello(connector, server.addr).await,
            (Resumed, 1),
            "{:?}: a session of generation 0 resumes with generation 1",
            version.version
        );
    }
    server.stop().await;
}

/// A TLS client of one protocol version that keeps its sessions (rustls's
/// default in-memory store) to resume them.
fn resuming_connector(
    pki: &Pki,
    version: &'static rustls::SupportedProtocolVersion,
) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[version])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// One `GET /` over a new TLS connection, read to the end (the session
/// tickets come after the handshake): how the handshake went, and which
/// generation answered.
async fn tls_hello(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> (rustls::HandshakeKind, u64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let kind = tls.get_ref().1.handshake_kind().unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let generation = answer
        .split_whitespace()
        .find_map(|word| word.strip_prefix("generation="))
        .unwrap_or_else(|| panic!("no generation in {answer:?}"));
    (kind, generation.parse().unwrap())
}

/// WebSocket echo across upgrades: each open socket gets close 1001 when
/// its generation drains, and the client reconnects to the new one. A
/// message is failed if its connection ends any other way (a reset, an EOF
/// without a close frame, another close code) or its echo is wrong; one
/// that crossed the server's 1001 (the server will not answer after its
/// close, RFC 6455 §5.5.1) is counted as refused and sent again on the new
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_sockets_go_away_with_1001_and_clients_reconnect() {
    let server = Server::start("axum", &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let going_away = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, tally, going_away) = (
            Arc::clone(&stop),
            Arc::clone(&tally),
            Arc::clone(&going_away),
        );
        let url = format!("ws://{}/ws", server.addr);
        clients.push(tokio::spawn(async move {
            let mut n = 0u64;
            'connect: while !stop.load(Ordering::Relaxed) {
                let mut socket = match tokio_tungstenite::connect_async(&url).await {
                    Ok((socket, _)) => socket,
                    Err(error) => {
                        tally.fail(format!("connect: {error}"));
                        continue;
                    }
                };
                while !stop.load(Ordering::Relaxed) {
                    let text = format!("message {n}");
                    if let Err(error) = socket.send(text.clone().into()).await {
                        tally.fail(format!("send: {error}"));
                        continue 'connect;
                    }
                    use tokio_tungstenite::tungstenite::Message;
                    match socket.next().await {
                        Some(Ok(Message::Text(echo))) if echo.as_str() == text => {
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                            n += 1;
                        }
                        Some(Ok(Message::Close(Some(frame)))) if u16::from(frame.code) == 1001 => {
                            tally.refused.fetch_add(1, Ordering::Relaxed);
                            going_away.fetch_add(1, Ordering::Relaxed);
                            // Finish the close handshake, then reconnect.
                            while let Some(Ok(_)) = socket.next().await {}
                            continue 'connect;
                        }
                        other => {
                            tally.fail(format!("{text}: {other:?}"));
                            continue 'connect;
                        }
                    }
                }
                let _ = socket.close(None).await;
                while let Some(Ok(_)) = socket.next().await {}
            }
        }));
    }
    let exits = under_load(server, 4, clients, stop, &tally).await;
    let summary = tally.summary();
    eprintln!("{summary}");
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0, "{summary}");
    assert!(
        going_away.load(Ordering::Relaxed) >= 4,
        "every upgrade says 1001 to the sockets: {summary}"
    );
    assert!(
        tally.ok.load(Ordering::Relaxed) >= 5 * PER_GENERATION,
        "{summary}"
    );
    assert!(
        exits.iter().all(|line| line.contains("outcome=Complete")),
        "{exits:#?}"
    );
}

mod grpc {
    //! The messages of `examples/grpc.rs` again (examples are not libraries).

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SayRequest {
        #[prost(string, tag = "1")]
        pub message: String,
        #[prost(uint64, tag = "2")]
        pub delay_ms: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SayReply {
        #[prost(string, tag = "1")]
        pub message: String,
        #[prost(uint32, tag = "2")]
        pub pid: u32,
        #[prost(uint64, tag = "3")]
        pub generation: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CountRequest {
        #[prost(uint32, tag = "1")]
        pub count: u32,
        #[prost(uint64, tag = "2")]
        pub interval_ms: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Tick {
        #[prost(uint32, tag = "1")]
        pub n: u32,
        #[prost(uint32, tag = "2")]
        pub pid: u32,
    }
}

/// gRPC unary calls and server streams across upgrades, on tonic's client
/// (no retry policy: tonic has none unless one is layered on): every call
/// ends OK with every tick, never UNAVAILABLE or CANCELLED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_calls_end_ok_across_upgrades() {
    let pki = pki();
    let (cert, key) = (pki.cert.to_str().unwrap(), pki.key.to_str().unwrap());
    for tls in [false, true] {
        let args: &[&str] = if tls {
            &["--tls-cert", cert, "--tls-key", key]
        } else {
            &[]
        };
        let server = Server::start("grpc", args).await;
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let mut endpoint = tonic::transport::Endpoint::from_shared(format!(
            "{}://localhost:{}",
            if tls { "https" } else { "http" },
            server.addr.port()
        ))
        .unwrap();
        if tls {
            endpoint = endpoint
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(&pki.ca_pem))
                        .domain_name("localhost"),
                )
                .unwrap();
        }
        let mut clients = Vec::new();
        for streaming in [false, false, true, true] {
            let (stop, tally, endpoint) = (Arc::clone(&stop), Arc::clone(&tally), endpoint.clone());
            clients.push(tokio::spawn(async move {
                let channel = endpoint.connect().await.expect("connects");
                let mut client = tonic::client::Grpc::new(channel);
                while !stop.load(Ordering::Relaxed) {
                    if let Err(error) = client.ready().await {
                        tally.fail(format!("ready: {error}"));
                        continue;
                    }
                    if streaming {
                        let codec =
                            tonic_prost::ProstCodec::<grpc::CountRequest, grpc::Tick>::default();
                        let request = grpc::CountRequest {
                            count: 10,
                            interval_ms: 20,
                        };
                        let path = "/echo.Echo/Count".parse().unwrap();
                        match client
                            .server_streaming(tonic::Request::new(request), path, codec)
                            .await
                        {
                            Ok(response) => {
                                let mut stream: tonic::Streaming<grpc::Tick> =
                                    response.into_inner();
                                let mut ticks = 0;
                                loop {
                                    match stream.message().await {
                                        Ok(Some(tick)) => {
                                            assert_eq!(tick.n, ticks);
                                            ticks += 1;
                                            if ticks == 1 {
                                                tally
                                                    .pids
                                                    .lock()
                                                    .unwrap()
                                                    .insert(tick.pid.to_string());
                                            }
                                        }
                                        Ok(None) if ticks == 10 => {
                                            tally.ok.fetch_add(1, Ordering::Relaxed);
                                            break;
                                        }
                                        Ok(None) => {
                                            tally.fail(format!("stream ended after {ticks} ticks"));
                                            break;
                                        }
                                        Err(status) => {
                                            tally.fail(format!(
                                                "stream after {ticks} ticks: {status}"
                                            ));
                                            break;
                                        }
                                    }
                                }
                            }
                            Err(status) if unprocessed(&status) => {
                                tally.refused.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(status) => tally.fail(format!("Count: {status}")),
                        }
                    } else {
                        let codec =
                            tonic_prost::ProstCodec::<grpc::SayRequest, grpc::SayReply>::default();
                        let request = grpc::SayRequest {
                            message: "hi".into(),
                            delay_ms: 5,
                        };
                        let path = "/echo.Echo/Say".parse().unwrap();
                        match client
                            .unary(tonic::Request::new(request), path, codec)
                            .await
                        {
                            Ok(reply) => {
                                let reply = reply.into_inner();
                                assert_eq!(reply.message, "hi");
                                tally.answered_by(&format!("pid={}", reply.pid));
                            }
                            Err(status) if unprocessed(&status) => {
                                tally.refused.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(status) => tally.fail(format!("Say: {status}")),
                        }
                    }
                }
            }));
        }
        let exits = under_load(server, 4, clients, stop, &tally).await;
        let summary = tally.summary();
        eprintln!("{summary}");
        assert_eq!(
            tally.failed.load(Ordering::Relaxed),
            0,
            "tls={tls}: {summary}"
        );
        assert!(
            tally.ok.load(Ordering::Relaxed) >= 4 * PER_GENERATION,
            "tls={tls}: {summary}"
        );
        assert!(
            tally.pids.lock().unwrap().len() >= 4,
            "tls={tls}: {summary}"
        );
        assert!(
            exits.iter().all(|line| line.contains("outcome=Complete")),
            "{exits:#?}"
        );
    }
}
