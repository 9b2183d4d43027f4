//! Load generators that check every response and count every failure.
//!
//! The HTTP client is deliberately strict: it never retries. A request that
//! was sent and got no valid answer is a failure, whatever the cause. A
//! connection that the server closes while no request is on it is not a
//! failure (no request was lost); the client reconnects.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::header::CONNECTION;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;

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
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureClass::Refused => "refused",
            FailureClass::Reset => "reset",
            FailureClass::Timeout => "timeout",
            FailureClass::WrongResponse => "wrong",
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
}

impl LoadReport {
    /// All failed requests.
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    fn fail(&mut self, class: FailureClass, detail: String) {
        *self.failures.entry(class).or_default() += 1;
        if self.examples.len() < 5 {
            self.examples.push(format!("{class}: {detail}"));
        }
    }

    fn merge(&mut self, other: LoadReport) {
        self.ok += other.ok;
        self.reconnects += other.reconnects;
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

/// HTTP load running on its own thread until [`HttpLoad::finish`].
#[derive(Debug)]
pub struct HttpLoad {
    stop: watch::Sender<bool>,
    thread: std::thread::JoinHandle<LoadReport>,
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl HttpLoad {
    /// Starts `clients` clients, each sending one request after another.
    pub fn start(addr: SocketAddr, clients: usize, mode: Mode) -> HttpLoad {
        let (stop, stopped) = watch::channel(false);
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            runtime.block_on(async move {
                let total = Arc::new(Mutex::new(LoadReport::default()));
                let mut tasks = tokio::task::JoinSet::new();
                for _ in 0..clients {
                    let stopped = stopped.clone();
                    let total = Arc::clone(&total);
                    tasks.spawn(async move {
                        let report = client(addr, mode, stopped).await;
                        total.lock().expect("no panic while held").merge(report);
                    });
                }
                while tasks.join_next().await.is_some() {}
                total.lock().expect("no panic while held").clone()
            })
        });
        HttpLoad { stop, thread }
    }

    /// Requests answered so far is not tracked live; stop and report.
    pub fn finish(self) -> LoadReport {
        let _ = self.stop.send(true);
        self.thread.join().expect("the load thread does not panic")
    }
}

async fn client(addr: SocketAddr, mode: Mode, stopped: watch::Receiver<bool>) -> LoadReport {
    let mut report = LoadReport::default();
    'connections: while !*stopped.borrow() {
        let stream = match TcpStream::connect(addr).await {
            Ok(stream) => stream,
            Err(e) => {
                let class = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    FailureClass::Refused
                } else {
                    FailureClass::Reset
                };
                report.fail(class, format!("connect: {e}"));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok((mut sender, connection)) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await
        else {
            report.fail(FailureClass::Reset, "handshake".into());
            continue;
        };
        tokio::spawn(connection);
        loop {
            if *stopped.borrow() {
                break 'connections;
            }
            if sender.ready().await.is_err() {
                // Closed by the server between requests: nothing was lost.
                report.reconnects += 1;
                continue 'connections;
            }
            let request = Request::get("/")
                .header("host", "subject")
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
                let body = response.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>((status, close, body))
            })
            .await;
            let (status, close, body) = match answer {
                Err(_) => {
                    report.fail(FailureClass::Timeout, "no answer".into());
                    continue 'connections;
                }
                Ok(Err(e)) => {
                    report.fail(FailureClass::Reset, e.to_string());
                    continue 'connections;
                }
                Ok(Ok(answer)) => answer,
            };
            let body = String::from_utf8_lossy(&body);
            match parse_generation(&body) {
                Some(generation) if status == 200 => {
                    report.ok += 1;
                    report.generations.insert(generation);
                }
                _ => report.fail(FailureClass::WrongResponse, format!("{status} {body:?}")),
            }
            if close || mode == Mode::NewConnection {
                continue 'connections;
            }
        }
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
