//! The strict clients of HTTP/2, gRPC and WebSocket (HTTP/1.1, plain or
//! TLS, is [`super::client`]). None retries: a request, call or message
//! that was sent and got no complete, correct answer is a failure, by
//! class. What is not a failure is what the drain announces before any
//! request is lost: a GOAWAY seen before the next stream is opened, a
//! WebSocket close 1001 seen before the next message is sent. The client
//! then opens a new connection, which the new generation accepts.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use http_body_util::BodyExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::{
    Clients, FailureClass, HttpCheck, Live, LoadReport, Mode, Protocol, REQUEST_TIMEOUT, Recorder,
    Target, connect_failure, identity_number, parse_generation,
};
use crate::grpc::health::{self, HealthCheckRequest, HealthCheckResponse};
use crate::grpc::{EchoReply, EchoRequest};

/// What every client shares.
pub(super) struct Run {
    pub(super) check: Option<HttpCheck>,
    pub(super) stopped: watch::Receiver<bool>,
    pub(super) live: Arc<Live>,
    pub(super) epoch: Instant,
}

impl Run {
    fn stopped(&self) -> bool {
        *self.stopped.borrow()
    }

    fn recorder(&self, protocol: Protocol) -> Recorder {
        Recorder {
            epoch: self.epoch,
            live: Arc::clone(&self.live),
            protocol,
        }
    }

    /// A failure that is no request's (a connection refused): counted, and
    /// shown live.
    fn connection_failed(&self, report: &mut LoadReport, class: FailureClass, detail: String) {
        report.fail(class, detail);
        self.live.failed_one();
    }
}

/// Runs one client of `clients` until the load stops.
pub(super) async fn client(clients: Clients, run: Run) -> LoadReport {
    match clients {
        Clients::Http1 { target, mode, .. } => {
            super::client(
                target,
                mode,
                None,
                run.check,
                run.stopped,
                run.live,
                run.epoch,
            )
            .await
        }
        Clients::Http2 {
            target,
            mode,
            streams,
            ..
        } => h2_client(target, mode, streams.max(1), run).await,
        Clients::GrpcUnary { addr, .. } => grpc_client(addr, None, run).await,
        Clients::GrpcStream {
            addr,
            replies,
            interval,
            ..
        } => grpc_client(addr, Some((replies, interval)), run).await,
        Clients::WebSocket { addr, .. } => {
            let url = format!("ws://{addr}/");
            ws_client(Target::plain(addr), url, super::ECHO_PACE, true, run).await
        }
        Clients::GrpcHealth {
            target,
            service,
            watch,
            mode,
            ..
        } => grpc_health_client(target, service, watch, mode, run).await,
        Clients::WebSocketAt {
            target, url, pace, ..
        } => ws_client(target, url, pace, false, run).await,
    }
}

/// The class of a failed HTTP/2 exchange: a stream the server reset or
/// cut off by GOAWAY, or a connection reset under it.
fn h2_failure(error: &(dyn std::error::Error + 'static)) -> FailureClass {
    let mut source = Some(error);
    while let Some(error) = source {
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            if h2.is_go_away() {
                return FailureClass::GoAwayRefused;
            }
            if h2.is_reset() {
                return FailureClass::StreamReset;
            }
        }
        source = error.source();
    }
    FailureClass::Reset
}

/// One HTTP/2 connection after another, each with `streams` request loops
/// until the server announces its end (GOAWAY) or the load stops.
async fn h2_client(target: Target, mode: Mode, streams: usize, run: Run) -> LoadReport {
    let mut report = LoadReport::default();
    let protocol = target.protocol(true);
    let recorder = run.recorder(protocol);
    let authority = run
        .check
        .as_ref()
        .map_or_else(|| target.addr.to_string(), |c| c.host.clone());
    let scheme = if target.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let path = run.check.as_ref().map_or("/", |c| c.path.as_str());
    let uri: http::Uri = match format!("{scheme}://{authority}{path}").parse() {
        Ok(uri) => uri,
        Err(e) => {
            report.fail(FailureClass::WrongResponse, format!("request URI: {e}"));
            return report;
        }
    };
    let streams = if mode == Mode::NewConnection {
        1
    } else {
        streams
    };
    while !run.stopped() {
        let opened = match target.open(&[b"h2"]).await {
            Ok(opened) => opened,
            Err((class, detail)) => {
                run.connection_failed(&mut report, class, detail);
                continue;
            }
        };
        if target.tls.is_some() && opened.alpn.as_deref() != Some(b"h2") {
            run.connection_failed(
                &mut report,
                FailureClass::WrongResponse,
                format!(
                    "ALPN: the server chose {:?}, not h2",
                    opened
                        .alpn
                        .map(|id| String::from_utf8_lossy(&id).into_owned())
                ),
            );
            // Not an upgrade's doing: the server does not speak h2 over TLS.
            return report;
        }
        let mut handshake = report.handshake_opened(opened.handshake, run.epoch);
        let sender = match h2_connect(opened.io).await {
            Ok(sender) => sender,
            Err(e) => {
                run.connection_failed(
                    &mut report,
                    FailureClass::Reset,
                    format!("h2 handshake: {e}"),
                );
                continue;
            }
        };
        let loops = (0..streams).map(|_| {
            h2_stream(
                sender.clone(),
                uri.clone(),
                mode == Mode::NewConnection,
                &run,
                &recorder,
            )
        });
        for (stream_report, generation) in futures_util::future::join_all(loops).await {
            report.merge(stream_report);
            if let Some(generation) = generation {
                report.handshake_answered(&mut handshake, generation);
            }
        }
        if !run.stopped() && mode == Mode::KeepAlive {
            report.reconnects += 1;
        }
    }
    report
}

/// An HTTP/2 connection on the h2 crate, driven by its own task. Not
/// hyper's client: hyper queues a request and may drop it unsent when a
/// GOAWAY arrives, reporting the GOAWAY as its error, so that a client
/// could not tell a request never sent from one the server refused. h2's
/// `send_request` says at once whether the stream was opened.
async fn h2_connect(io: Box<dyn super::Io>) -> Result<h2::client::SendRequest<Bytes>, h2::Error> {
    let (sender, connection) = h2::client::handshake(io).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// What an HTTP/2 answer is made of: status, headers, body.
type H2Answer = (http::StatusCode, Vec<(String, String)>, Vec<u8>);

/// The whole answer to a request on an open stream.
async fn h2_answer(response: h2::client::ResponseFuture) -> Result<H2Answer, h2::Error> {
    let (parts, mut body) = response.await?.into_parts();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    let headers = parts
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
        .collect();
    Ok((parts.status, headers, bytes))
}

/// Requests one after another on one stream slot of an HTTP/2 connection;
/// returns what it saw and the generation of its first answer.
async fn h2_stream(
    sender: h2::client::SendRequest<Bytes>,
    uri: http::Uri,
    once: bool,
    run: &Run,
    recorder: &Recorder,
) -> (LoadReport, Option<u64>) {
    let mut report = LoadReport::default();
    let mut first = None;
    while !run.stopped() {
        // GOAWAY (or a closed connection): nothing was sent, nothing lost.
        let Ok(mut ready) = sender.clone().ready().await else {
            break;
        };
        // The URI's authority is HTTP/2's Host (`:authority`).
        let Ok(request) = http::Request::get(uri.clone()).body(()) else {
            report.fail(FailureClass::WrongResponse, "request".into());
            break;
        };
        let sent = Instant::now();
        // Refused here, the stream was never opened: none lost.
        let Ok((response, _)) = ready.send_request(request, true) else {
            break;
        };
        let (status, headers, body) =
            match tokio::time::timeout(REQUEST_TIMEOUT, h2_answer(response)).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(e)) => {
                    recorder.record(&mut report, sent, false);
                    report.fail(h2_failure(&e), format!("h2: {e}"));
                    break;
                }
                Err(_) => {
                    recorder.record(&mut report, sent, false);
                    report.fail(FailureClass::Timeout, "h2: no answer".into());
                    continue;
                }
            };
        let body = String::from_utf8_lossy(&body);
        let generation = match &run.check {
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
                recorder.record(&mut report, sent, true);
                report.ok += 1;
                report.generations.insert(generation);
                first.get_or_insert(generation);
            }
            _ => {
                recorder.record(&mut report, sent, false);
                report.fail(FailureClass::WrongResponse, format!("{status} {body:?}"));
            }
        }
        if once {
            break;
        }
    }
    (report, first)
}

/// One `GET` over HTTP/2 on a new connection (prior knowledge, or ALPN h2
/// over TLS): the status, the headers and the body. For probes.
pub async fn h2_get(
    target: &Target,
    host: &str,
    path: &str,
) -> Result<(u16, Vec<(String, String)>, String), (FailureClass, String)> {
    let opened = target.open(&[b"h2"]).await?;
    if target.tls.is_some() && opened.alpn.as_deref() != Some(b"h2") {
        return Err((
            FailureClass::WrongResponse,
            "ALPN: the server does not offer h2".into(),
        ));
    }
    let sender = h2_connect(opened.io)
        .await
        .map_err(|e| (FailureClass::Reset, format!("h2 handshake: {e}")))?;
    let mut ready = sender
        .ready()
        .await
        .map_err(|e| (FailureClass::Reset, format!("h2: {e}")))?;
    let scheme = if target.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let request = http::Request::get(format!("{scheme}://{host}{path}"))
        .body(())
        .map_err(|e| (FailureClass::WrongResponse, format!("request: {e}")))?;
    let (response, _) = ready
        .send_request(request, true)
        .map_err(|e| (h2_failure(&e), format!("h2: {e}")))?;
    let (status, headers, body) = h2_answer(response)
        .await
        .map_err(|e| (h2_failure(&e), format!("h2: {e}")))?;
    Ok((
        status.as_u16(),
        headers,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

/// A request the connection refused before sending it: the client knows
/// nothing was lost.
#[derive(Debug)]
struct NotSent;

impl std::fmt::Display for NotSent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the connection was closing; the request was not sent")
    }
}

impl std::error::Error for NotSent {}

/// An HTTP/2 connection (h2 crate) as the service a tonic client calls:
/// one connection, no reconnection, no retry; a call whose stream could
/// not be opened fails as [`NotSent`].
#[derive(Clone)]
struct H2Connection(h2::client::SendRequest<Bytes>);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for H2Connection {
    type Response = http::Response<H2Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let mut sender = self.0.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            // A unary or server-streaming call's request is one message.
            let body = body.collect().await?.to_bytes();
            let (response, mut stream) = sender
                .send_request(http::Request::from_parts(parts, ()), false)
                .map_err(|_| NotSent)?;
            stream.send_data(body, true)?;
            Ok(response.await?.map(|body| H2Body {
                body,
                data_done: false,
            }))
        })
    }
}

/// An h2 response body as an `http_body::Body`, trailers (gRPC's status)
/// included.
struct H2Body {
    body: h2::RecvStream,
    data_done: bool,
}

impl http_body::Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if !this.data_done {
            match std::task::ready!(this.body.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.body.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match std::task::ready!(this.body.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }
}

fn grpc_failure(status: &tonic::Status) -> FailureClass {
    match status.code() {
        tonic::Code::Unavailable => FailureClass::GrpcUnavailable,
        tonic::Code::Cancelled => FailureClass::GrpcCancelled,
        _ => FailureClass::GrpcOther,
    }
}

fn not_sent(status: &tonic::Status) -> bool {
    use std::error::Error as _;
    let mut source = status.source();
    while let Some(error) = source {
        if error.is::<NotSent>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// gRPC calls one after another on one h2c connection, a new connection
/// when the server announces the end of this one: unary calls, or streams
/// of `replies` replies `interval` apart.
async fn grpc_client(
    addr: std::net::SocketAddr,
    streaming: Option<(u32, Duration)>,
    run: Run,
) -> LoadReport {
    use tonic::codegen::http::uri::PathAndQuery;
    let mut report = LoadReport::default();
    let protocol = if streaming.is_some() {
        Protocol::GrpcStream
    } else {
        Protocol::GrpcUnary
    };
    let recorder = run.recorder(protocol);
    let Ok(origin) = format!("http://{addr}").parse::<http::Uri>() else {
        report.fail(FailureClass::GrpcOther, format!("origin http://{addr}"));
        return report;
    };
    let mut sequence = 0u64;
    'connections: while !run.stopped() {
        let tcp = match TcpStream::connect(addr).await {
            Ok(tcp) => tcp,
            Err(e) => {
                run.connection_failed(&mut report, connect_failure(&e), format!("connect: {e}"));
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let sender = match h2_connect(Box::new(tcp)).await {
            Ok(sender) => sender,
            Err(e) => {
                run.connection_failed(
                    &mut report,
                    FailureClass::Reset,
                    format!("h2 handshake: {e}"),
                );
                continue;
            }
        };
        let mut grpc = tonic::client::Grpc::with_origin(H2Connection(sender), origin.clone());
        while !run.stopped() {
            if grpc.ready().await.is_err() {
                // GOAWAY before the next call: none lost.
                report.reconnects += 1;
                continue 'connections;
            }
            sequence += 1;
            let message = sequence.to_string();
            let (count, interval_ms) = streaming.map_or((0, 0), |(replies, interval)| {
                (replies, interval.as_millis() as u32)
            });
            let request = tonic::Request::new(EchoRequest {
                message: message.clone(),
                count,
                interval_ms,
            });
            let codec = tonic_prost::ProstCodec::<EchoRequest, EchoReply>::default();
            let sent = Instant::now();
            let timeout =
                REQUEST_TIMEOUT + Duration::from_millis(u64::from(count) * u64::from(interval_ms));
            let outcome = tokio::time::timeout(timeout, async {
                if streaming.is_none() {
                    let path = PathAndQuery::from_static(crate::grpc::UNARY);
                    let reply = grpc.unary(request, path, codec).await?.into_inner();
                    return Ok((vec![reply], 1));
                }
                let path = PathAndQuery::from_static(crate::grpc::STREAM);
                let mut stream = grpc
                    .server_streaming(request, path, codec)
                    .await?
                    .into_inner();
                let mut replies = Vec::new();
                while let Some(reply) = stream.message().await? {
                    replies.push(reply);
                }
                Ok::<_, tonic::Status>((replies, count.max(1)))
            })
            .await;
            let (replies, expected) = match outcome {
                Ok(Ok(replies)) => replies,
                Ok(Err(status)) if not_sent(&status) => {
                    report.reconnects += 1;
                    continue 'connections;
                }
                Ok(Err(status)) => {
                    recorder.record(&mut report, sent, false);
                    report.fail(
                        grpc_failure(&status),
                        format!("{:?}: {}", status.code(), status.message()),
                    );
                    continue 'connections;
                }
                Err(_) => {
                    recorder.record(&mut report, sent, false);
                    report.fail(FailureClass::Timeout, "grpc: no answer".into());
                    continue 'connections;
                }
            };
            let in_order = replies.len() == expected as usize
                && replies
                    .iter()
                    .enumerate()
                    .all(|(i, r)| r.message == message && r.index as usize == i);
            if in_order {
                recorder.record(&mut report, sent, true);
                report.ok += 1;
                if streaming.is_some() {
                    report.grpc_replies += replies.len() as u64;
                }
                report
                    .generations
                    .extend(replies.iter().map(|r| r.generation));
            } else {
                recorder.record(&mut report, sent, false);
                report.fail(
                    FailureClass::GrpcOther,
                    format!(
                        "OK with {} of {expected} replies in order",
                        replies
                            .iter()
                            .enumerate()
                            .take_while(|(i, r)| r.index as usize == *i)
                            .count()
                    ),
                );
            }
        }
    }
    report
}

/// What a WebSocket frame means to the echo client.
enum Frame {
    Echo(String),
    GoingAway,
    Abnormal(String),
}

fn frame(next: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) -> Option<Frame> {
    match next {
        Some(Ok(Message::Text(text))) => Some(Frame::Echo(text.as_str().to_owned())),
        Some(Ok(Message::Close(Some(close))))
            if matches!(close.code, CloseCode::Away | CloseCode::Normal) =>
        {
            Some(Frame::GoingAway)
        }
        Some(Ok(Message::Close(close))) => Some(Frame::Abnormal(format!("close {close:?}"))),
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => None,
        Some(Ok(Message::Binary(bytes))) => {
            Some(Frame::Echo(String::from_utf8_lossy(&bytes).into()))
        }
        Some(Err(e)) => Some(Frame::Abnormal(e.to_string())),
        None => Some(Frame::Abnormal("closed without a close frame".into())),
    }
}

/// Waits for the next frame that means something, within `timeout`.
async fn next_frame<S>(ws: &mut S, timeout: Duration) -> Option<Frame>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    tokio::time::timeout(timeout, async {
        loop {
            if let Some(frame) = frame(ws.next().await) {
                return frame;
            }
        }
    })
    .await
    .ok()
}

/// WebSocket echo: the subject greets with `pid=.. gen=..`, then echoes
/// each text message. One message at a time, every [`super::ECHO_PACE`];
/// before each, a close already received is read first, so that a client
/// never sends into a connection the server has said goodbye on.
///
/// With `subject` false (anyone's server, `check --websocket`), there is
/// no greeting and any text or binary answer to a message counts.
async fn ws_client(
    target: Target,
    url: String,
    pace: Duration,
    subject: bool,
    mut run: Run,
) -> LoadReport {
    let mut report = LoadReport::default();
    let recorder = run.recorder(Protocol::WebSocket);
    let mut sequence = 0u64;
    'connections: while !run.stopped() {
        // WebSocket is an HTTP/1.1 upgrade: no h2 by ALPN.
        let io = match target.open(&[b"http/1.1"]).await {
            Ok(opened) => opened.io,
            Err((class, detail)) => {
                run.connection_failed(&mut report, class, detail);
                continue;
            }
        };
        let mut ws = match tokio_tungstenite::client_async(url.as_str(), io).await {
            Ok((ws, _)) => ws,
            Err(e) => {
                run.connection_failed(
                    &mut report,
                    FailureClass::WsAbnormal,
                    format!("upgrade: {e}"),
                );
                continue;
            }
        };
        let greeting = if subject {
            next_frame(&mut ws, REQUEST_TIMEOUT).await
        } else {
            Some(Frame::Echo(String::new()))
        };
        match greeting {
            Some(Frame::Echo(greeting)) => {
                if let Some(generation) = parse_generation(&greeting) {
                    report.generations.insert(generation);
                }
            }
            // Closed at once by a generation that was draining: no message lost.
            Some(Frame::GoingAway) => {
                report.ws_going_away += 1;
                let _ = ws.close(None).await;
                continue;
            }
            Some(Frame::Abnormal(why)) => {
                run.connection_failed(&mut report, FailureClass::WsAbnormal, why);
                continue;
            }
            None => {
                run.connection_failed(&mut report, FailureClass::Timeout, "no greeting".into());
                continue;
            }
        }
        let mut pace = tokio::time::interval(pace);
        loop {
            tokio::select! {
                _ = run.stopped.changed() => {
                    let _ = ws.close(None).await;
                    break 'connections;
                }
                _ = pace.tick() => {}
            }
            // A goodbye already here: read it before sending anything more.
            if let Some(next) = ws.next().now_or_never() {
                match frame(next) {
                    Some(Frame::GoingAway) => {
                        report.ws_going_away += 1;
                        // Answers the close, and waits (bounded) for the end.
                        let _ = next_frame(&mut ws, REQUEST_TIMEOUT).await;
                        continue 'connections;
                    }
                    Some(Frame::Abnormal(why)) => {
                        run.connection_failed(&mut report, FailureClass::WsAbnormal, why);
                        continue 'connections;
                    }
                    Some(Frame::Echo(text)) => {
                        run.connection_failed(
                            &mut report,
                            FailureClass::WrongResponse,
                            format!("unasked {text:?}"),
                        );
                        continue 'connections;
                    }
                    None => {}
                }
            }
            sequence += 1;
            let message = sequence.to_string();
            let sent = Instant::now();
            if let Err(e) = ws.send(Message::text(message.clone())).await {
                recorder.record(&mut report, sent, false);
                report.fail(FailureClass::WsAbnormal, format!("send: {e}"));
                continue 'connections;
            }
            match next_frame(&mut ws, REQUEST_TIMEOUT).await {
                Some(Frame::Echo(echo)) if echo == message || !subject => {
                    recorder.record(&mut report, sent, true);
                    report.ok += 1;
                }
                Some(Frame::Echo(echo)) => {
                    recorder.record(&mut report, sent, false);
                    report.fail(
                        FailureClass::WrongResponse,
                        format!("echo {echo:?} of {message:?}"),
                    );
                    continue 'connections;
                }
                Some(Frame::GoingAway) => {
                    recorder.record(&mut report, sent, false);
                    report.fail(
                        FailureClass::WsLost,
                        format!("message {message} unanswered at close 1001"),
                    );
                    report.ws_going_away += 1;
                    let _ = next_frame(&mut ws, REQUEST_TIMEOUT).await;
                    continue 'connections;
                }
                Some(Frame::Abnormal(why)) => {
                    recorder.record(&mut report, sent, false);
                    report.fail(
                        FailureClass::WsAbnormal,
                        format!("message {message}: {why}"),
                    );
                    continue 'connections;
                }
                None => {
                    recorder.record(&mut report, sent, false);
                    report.fail(FailureClass::Timeout, format!("message {message}: no echo"));
                    continue 'connections;
                }
            }
        }
    }
    report
}

/// A gRPC connection to `target` (h2c, or ALPN h2 over TLS) on the strict
/// h2 client, calls going to `origin`.
async fn grpc_open(
    target: &Target,
    origin: &http::Uri,
) -> Result<tonic::client::Grpc<H2Connection>, (FailureClass, String)> {
    let opened = target.open(&[b"h2"]).await?;
    if target.tls.is_some() && opened.alpn.as_deref() != Some(b"h2") {
        return Err((
            FailureClass::WrongResponse,
            "ALPN: the server did not choose h2, which gRPC needs".into(),
        ));
    }
    let sender = h2_connect(opened.io)
        .await
        .map_err(|e| (FailureClass::Reset, format!("h2 handshake: {e}")))?;
    Ok(tonic::client::Grpc::with_origin(
        H2Connection(sender),
        origin.clone(),
    ))
}

/// `http://HOST` or `https://HOST`: the scheme and `:authority` of calls.
fn grpc_origin(target: &Target, host: &str) -> Result<http::Uri, (FailureClass, String)> {
    let scheme = if target.tls.is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{host}")
        .parse()
        .map_err(|e| (FailureClass::WrongResponse, format!("origin {host:?}: {e}")))
}

/// How one health call ended.
enum HealthCall {
    /// Answered SERVING (`Check`), or a `Watch` that said SERVING and then
    /// ended with OK or was still open when the load stopped.
    Ok,
    /// Refused before its stream was opened (GOAWAY came first): none lost.
    NotSent,
    /// A `Watch` that the server ended with OK before any update: a
    /// generation that drains ends its streams so. Not a failure.
    EndedEarly,
    /// Lost, by class.
    Failed(FailureClass, String),
}

fn health_status(status: &tonic::Status) -> HealthCall {
    if not_sent(status) {
        HealthCall::NotSent
    } else {
        HealthCall::Failed(
            grpc_failure(status),
            format!("{:?}: {}", status.code(), status.message()),
        )
    }
}

/// One `Check` call: OK only with SERVING.
async fn health_check(grpc: &mut tonic::client::Grpc<H2Connection>, service: &str) -> HealthCall {
    use tonic::codegen::http::uri::PathAndQuery;
    let request = tonic::Request::new(HealthCheckRequest {
        service: service.to_owned(),
    });
    let codec = tonic_prost::ProstCodec::<HealthCheckRequest, HealthCheckResponse>::default();
    let call = grpc.unary(request, PathAndQuery::from_static(health::CHECK), codec);
    match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
        Ok(Ok(reply)) if reply.get_ref().status == health::SERVING => HealthCall::Ok,
        Ok(Ok(reply)) => HealthCall::Failed(
            FailureClass::WrongResponse,
            format!("Check: status {} (not SERVING)", reply.get_ref().status),
        ),
        Ok(Err(status)) => health_status(&status),
        Err(_) => HealthCall::Failed(FailureClass::Timeout, "Check: no answer".into()),
    }
}

/// One `Watch` stream: its first update must say SERVING; then it is held
/// open until the server ends it with OK (a draining generation's way to
/// send its clients elsewhere), or the load stops. Cut without a status,
/// or ended with any other, it is lost.
async fn health_watch(
    grpc: &mut tonic::client::Grpc<H2Connection>,
    service: &str,
    stopped: &mut watch::Receiver<bool>,
) -> HealthCall {
    use tonic::codegen::http::uri::PathAndQuery;
    let request = tonic::Request::new(HealthCheckRequest {
        service: service.to_owned(),
    });
    let codec = tonic_prost::ProstCodec::<HealthCheckRequest, HealthCheckResponse>::default();
    let call = grpc.server_streaming(request, PathAndQuery::from_static(health::WATCH), codec);
    let first = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut stream = call.await?.into_inner();
        let first = stream.message().await?;
        Ok::<_, tonic::Status>((stream, first))
    })
    .await;
    let mut stream = match first {
        Ok(Ok((stream, Some(update)))) if update.status == health::SERVING => stream,
        Ok(Ok((_, Some(update)))) => {
            return HealthCall::Failed(
                FailureClass::WrongResponse,
                format!("Watch: first status {} (not SERVING)", update.status),
            );
        }
        Ok(Ok((_, None))) => return HealthCall::EndedEarly,
        Ok(Err(status)) => return health_status(&status),
        Err(_) => {
            return HealthCall::Failed(FailureClass::Timeout, "Watch: no first update".into());
        }
    };
    loop {
        if *stopped.borrow() {
            return HealthCall::Ok;
        }
        tokio::select! {
            _ = stopped.changed() => return HealthCall::Ok,
            next = stream.message() => match next {
                // A later update (NOT_SERVING from a draining server, say)
                // is the server's news, not a lost call.
                Ok(Some(_)) => {}
                Ok(None) => return HealthCall::Ok,
                Err(status) => {
                    return HealthCall::Failed(
                        grpc_failure(&status),
                        format!("Watch cut: {:?}: {}", status.code(), status.message()),
                    );
                }
            },
        }
    }
}

/// gRPC health calls (`grpc.health.v1.Health`), `Check` one after another
/// or `Watch` streams one after another, on one connection until the
/// server announces its end (GOAWAY), or each on a new connection.
async fn grpc_health_client(
    target: Target,
    service: String,
    watch: bool,
    mode: Mode,
    mut run: Run,
) -> LoadReport {
    let mut report = LoadReport::default();
    let recorder = run.recorder(if watch {
        Protocol::GrpcWatch
    } else {
        Protocol::GrpcUnary
    });
    let host = run
        .check
        .as_ref()
        .map_or_else(|| target.addr.to_string(), |c| c.host.clone());
    let origin = match grpc_origin(&target, &host) {
        Ok(origin) => origin,
        Err((class, detail)) => {
            report.fail(class, detail);
            return report;
        }
    };
    'connections: while !run.stopped() {
        let mut grpc = match grpc_open(&target, &origin).await {
            Ok(grpc) => grpc,
            Err((class, detail)) => {
                run.connection_failed(&mut report, class, detail);
                continue;
            }
        };
        while !run.stopped() {
            if grpc.ready().await.is_err() {
                // GOAWAY before the next call: none lost.
                report.reconnects += 1;
                continue 'connections;
            }
            let sent = Instant::now();
            let call = if watch {
                health_watch(&mut grpc, &service, &mut run.stopped).await
            } else {
                health_check(&mut grpc, &service).await
            };
            match call {
                HealthCall::Ok => {
                    recorder.record(&mut report, sent, true);
                    report.ok += 1;
                }
                HealthCall::NotSent => {
                    report.reconnects += 1;
                    continue 'connections;
                }
                HealthCall::EndedEarly => {}
                HealthCall::Failed(class, detail) => {
                    recorder.record(&mut report, sent, false);
                    report.fail(class, detail);
                    continue 'connections;
                }
            }
            if mode == Mode::NewConnection {
                continue 'connections;
            }
        }
    }
    report
}

/// One gRPC health `Check` on a new connection, for probes: `Ok` when the
/// server answers SERVING.
pub async fn grpc_health_probe(
    target: &Target,
    host: &str,
    service: &str,
) -> Result<(), (FailureClass, String)> {
    let origin = grpc_origin(target, host)?;
    let mut grpc = grpc_open(target, &origin).await?;
    if grpc.ready().await.is_err() {
        return Err((FailureClass::GoAwayRefused, "GOAWAY at once".into()));
    }
    match health_check(&mut grpc, service).await {
        HealthCall::Ok => Ok(()),
        HealthCall::NotSent | HealthCall::EndedEarly => {
            Err((FailureClass::GoAwayRefused, "Check not sent".into()))
        }
        HealthCall::Failed(class, detail) => Err((class, detail)),
    }
}

/// A WebSocket connection to `url` on a new connection, one message, any
/// answer, then a close: for probes.
pub async fn websocket_probe(target: &Target, url: &str) -> Result<(), (FailureClass, String)> {
    let opened = target.open(&[b"http/1.1"]).await?;
    let (mut ws, _) = tokio_tungstenite::client_async(url, opened.io)
        .await
        .map_err(|e| (FailureClass::WsAbnormal, format!("upgrade: {e}")))?;
    ws.send(Message::text("probe"))
        .await
        .map_err(|e| (FailureClass::WsAbnormal, format!("send: {e}")))?;
    let answer = next_frame(&mut ws, REQUEST_TIMEOUT).await;
    let _ = ws.close(None).await;
    match answer {
        Some(Frame::Echo(_)) => Ok(()),
        Some(Frame::GoingAway) => Err((FailureClass::WsLost, "close before an answer".into())),
        Some(Frame::Abnormal(why)) => Err((FailureClass::WsAbnormal, why)),
        None => Err((FailureClass::Timeout, "no answer".into())),
    }
}
