//! `Drain::serve_http` and `Drain::serve_https` on real sockets, at the
//! edges of the drain: a connection accepted before the drain whose first
//! bytes come after it starts, a TLS handshake under way when it starts, an
//! HTTP/2 stream still running at the deadline, and the GOAWAY a client
//! sees while its stream finishes.
#![cfg(all(feature = "http2", feature = "tls"))]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use handover::drain::{Drain, DrainOptions, DrainOutcome};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// Answers `/slow` once `release` is notified, anything else at once.
fn service(
    release: Arc<Notify>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    service_fn(move |request: Request<Incoming>| {
        let release = Arc::clone(&release);
        async move {
            if request.uri().path() == "/slow" {
                release.notified().await;
            }
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("done"))))
        }
    })
}

async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap());
    let (client, accepted) = tokio::join!(client, listener.accept());
    (client.unwrap(), accepted.unwrap().0)
}

fn options() -> DrainOptions {
    DrainOptions::default()
        .quiet_period(Duration::from_secs(1))
        .deadline(Duration::from_secs(5))
}

/// A connection accepted before the drain whose request arrives after the
/// drain started is answered (with `Connection: close`), not reset: the
/// case hyper-util's auto builder loses (its graceful_shutdown cancels a
/// connection that has not sent its first bytes).
#[tokio::test]
async fn a_connection_silent_at_drain_start_is_still_served() {
    let drain = Drain::new(options());
    let (mut client, accepted) = pair().await;
    let serving = tokio::spawn(drain.serve_http(accepted, service(Arc::new(Notify::new()))));
    drain.start();
    // Let the connection's task see the drain before the request arrives.
    tokio::task::yield_now().await;
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    client.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    serving.await.unwrap().unwrap();
    assert_eq!(drain.wait().await, DrainOutcome::Complete);
}

/// The same for HTTP/2: a connection that sends its preface after the
/// drain started gets its streams served and GOAWAY, not a reset.
#[tokio::test]
async fn an_http2_connection_silent_at_drain_start_is_served_then_told_to_go_away() {
    let drain = Drain::new(options());
    let (client, accepted) = pair().await;
    let serving = tokio::spawn(drain.serve_http(accepted, service(Arc::new(Notify::new()))));
    drain.start();
    tokio::task::yield_now().await;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let response = sender
        .send_request(
            Request::get("http://x/")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "done"
    );
    // The server ends the connection itself (GOAWAY, then close).
    connection.await.unwrap().unwrap();
    serving.await.unwrap().unwrap();
    assert_eq!(drain.wait().await, DrainOutcome::Complete);
}

/// A stream in flight when the drain starts finishes; the client learns
/// about the drain from GOAWAY (its connection stops taking requests) and
/// the connection ends once the stream is done.
#[tokio::test]
async fn an_http2_stream_in_flight_finishes_after_goaway() {
    let drain = Drain::new(options());
    let release = Arc::new(Notify::new());
    let (client, accepted) = pair().await;
    let serving = tokio::spawn(drain.serve_http(accepted, service(Arc::clone(&release))));
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let slow = tokio::spawn(
        sender.send_request(
            Request::get("http://x/slow")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        ),
    );
    // Wait until the server has the stream: a quick request on the same
    // connection is answered after the slow one was sent.
    let quick = sender
        .send_request(
            Request::get("http://x/")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(quick.status(), 200);
    let waiting = tokio::spawn({
        let drain = drain.clone();
        async move { drain.wait().await }
    });
    // The final GOAWAY caps the client's streams: a new one is refused by
    // the client itself, unsent, while the slow one still runs.
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let request = Request::get("http://x/")
                .body(Empty::<Bytes>::new())
                .unwrap();
            match sender.try_send_request(request).await {
                Ok(_) => continue, // before the final GOAWAY arrived: served
                Err(error) => break error,
            }
        }
    })
    .await
    .expect("GOAWAY reaches the client");
    assert!(!slow.is_finished(), "the slow stream was cut: {refused:?}");
    release.notify_waiters();
    let slow = slow.await.unwrap().unwrap();
    assert_eq!(slow.into_body().collect().await.unwrap().to_bytes(), "done");
    connection.await.unwrap().unwrap();
    serving.await.unwrap().unwrap();
    assert_eq!(waiting.await.unwrap(), DrainOutcome::Complete);
}

/// An HTTP/2 stream that outlives the deadline is cut there, and the drain
/// says so.
#[tokio::test]
async fn an_http2_stream_at_the_deadline_is_cut_and_counted() {
    let drain = Drain::new(
        DrainOptions::default()
            .quiet_period(Duration::from_millis(100))
            .deadline(Duration::from_millis(500)),
    );
    let (client, accepted) = pair().await;
    let serving = tokio::spawn(drain.serve_http(accepted, service(Arc::new(Notify::new()))));
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client))
            .await
            .unwrap();
    tokio::spawn(connection);
    let quick = sender
        .send_request(
            Request::get("http://x/")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(quick.status(), 200);
    let slow = tokio::spawn(
        sender.send_request(
            Request::get("http://x/slow")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        ),
    );
    let started = tokio::time::Instant::now();
    // The slow stream never ends: the connection is still open when the
    // deadline passes; the task of the connection ends there.
    let outcome = drain.wait().await;
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(
            outcome,
            DrainOutcome::DeadlinePassed { remaining: 1 } | DrainOutcome::Complete
        ),
        "{outcome:?}"
    );
    serving.await.unwrap().unwrap();
    assert!(slow.await.unwrap().is_err(), "the cut stream fails");
    assert_eq!(drain.active(), 0);
}

/// A TLS handshake under way when the drain starts is finished, and the
/// connection served as draining (HTTP/1.1: `Connection: close`).
#[tokio::test]
async fn a_tls_handshake_under_way_at_drain_start_is_finished_and_served() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let acceptor = handover::drain::tls_acceptor(&cert_path, &key_path).unwrap();

    let drain = Drain::new(options());
    let (client, accepted) = pair().await;
    let serving =
        tokio::spawn(drain.serve_https(accepted, acceptor, service(Arc::new(Notify::new()))));
    // The TCP connection is there, the handshake not begun: drain now.
    drain.start();
    tokio::task::yield_now().await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, client)
        .await
        .unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    // read_to_string fails on a TCP close without TLS close_notify.
    tls.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    serving.await.unwrap().unwrap();
    assert_eq!(drain.wait().await, DrainOutcome::Complete);
}

/// One HTTP/2 frame, as bytes.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = (payload.len() as u32).to_be_bytes();
    let mut frame = vec![length[1], length[2], length[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A `GET path` request's HEADERS frame (HPACK without the dynamic table).
fn get(stream: u32, path: &str) -> Vec<u8> {
    // :method GET, :scheme http, :path (name 4) and :authority (name 1) literal.
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, 0x01, b'x']);
    frame(0x1, 0x5, stream, &block)
}

/// Reads one frame: type, flags, stream, payload; `None` at the end.
async fn read_frame(client: &mut TcpStream) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut header = [0u8; 9];
    client.read_exact(&mut header).await.ok()?;
    let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; length];
    client.read_exact(&mut payload).await.ok()?;
    Some((header[3], header[4], stream, payload))
}

/// The GOAWAY frames' error codes a client has seen.
fn goaway_error(payload: &[u8]) -> u32 {
    u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]])
}

/// A client that opens a stream after the final GOAWAY crossed its frames
/// (gRPC's C-core clients do, with a WINDOW_UPDATE right after the
/// stream's HEADERS) must not cost the streams in flight: h2 alone takes
/// that WINDOW_UPDATE for a protocol error and cuts the connection (GOAWAY
/// PROTOCOL_ERROR), RFC 9113 says it is ignored. Frame by frame, on the
/// wire, against the real h2.
#[tokio::test]
async fn a_window_update_for_a_stream_opened_after_the_final_goaway_cuts_nothing() {
    let drain = Drain::new(options());
    let release = Arc::new(Notify::new());
    let (mut client, accepted) = pair().await;
    let serving = tokio::spawn(drain.serve_http(accepted, service(Arc::clone(&release))));
    let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    opening.extend(frame(0x4, 0, 0, &[]));
    opening.extend(get(1, "/slow"));
    opening.extend(get(3, "/"));
    client.write_all(&opening).await.unwrap();
    let mut errors = Vec::new();
    // Stream 3 answered: the server has stream 1 too.
    loop {
        let (kind, flags, stream, payload) = read_frame(&mut client).await.expect("a frame");
        match kind {
            0x4 if flags & 1 == 0 => client.write_all(&frame(0x4, 1, 0, &[])).await.unwrap(),
            0x0 if stream == 3 && flags & 1 != 0 => break,
            0x7 => errors.push(goaway_error(&payload)),
            _ => {}
        }
    }
    drain.start();
    // The first GOAWAY and the shutdown PING; its acknowledgement brings
    // the final GOAWAY (last stream 3).
    loop {
        let (kind, flags, _, payload) = read_frame(&mut client).await.expect("a frame");
        match kind {
            0x6 if flags & 1 == 0 => client.write_all(&frame(0x6, 1, 0, &payload)).await.unwrap(),
            0x7 => {
                errors.push(goaway_error(&payload));
                let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                if last == 3 {
                    break;
                }
            }
            _ => {}
        }
    }
    // Too late: stream 5 and its WINDOW_UPDATE, then a PING whose answer
    // says the server has read them.
    let mut late = get(5, "/");
    late.extend(frame(0x8, 0, 5, &5u32.to_be_bytes()));
    late.extend(frame(0x6, 0, 0, &[7; 8]));
    client.write_all(&late).await.unwrap();
    let mut answered = false;
    let mut body = Vec::new();
    while let Some((kind, flags, stream, payload)) = read_frame(&mut client).await {
        match kind {
            0x6 if flags & 1 != 0 && payload == [7; 8] => {
                answered = true;
                release.notify_waiters();
            }
            0x7 => errors.push(goaway_error(&payload)),
            0x0 if stream == 1 => body.extend_from_slice(&payload),
            _ => {}
        }
    }
    assert_eq!(errors, [0, 0], "GOAWAY error codes (1: PROTOCOL_ERROR)");
    assert!(
        answered,
        "the connection was cut before the PING was answered"
    );
    assert_eq!(body, b"done", "the stream in flight finishes");
    // The server lingers until the client closes too.
    drop(client);
    serving.await.unwrap().unwrap();
    assert_eq!(drain.wait().await, DrainOutcome::Complete);
}

/// A body streamed on `/stream` from `chunks` (the test sends them), and
/// "done" at once anywhere else.
type Chunks = tokio::sync::mpsc::Receiver<Result<hyper::body::Frame<Bytes>, Infallible>>;

fn streaming_service(
    chunks: Chunks,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    let chunks = Arc::new(std::sync::Mutex::new(Some(chunks)));
    service_fn(move |request: Request<Incoming>| {
        let chunks = Arc::clone(&chunks);
        async move {
            let body = match chunks.lock().unwrap().take() {
                Some(chunks) if request.uri().path() == "/stream" => {
                    http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(
                        chunks,
                    ))
                    .boxed()
                }
                _ => Full::new(Bytes::from("done")).boxed(),
            };
            Ok::<_, Infallible>(Response::new(body))
        }
    })
}

/// A response whose body is still being sent when the drain starts, for
/// longer than the quiet period: the connection stays open until the body
/// is done and the quiet period has passed after it, so the client's next
/// request on it is answered (`Connection: close`), not met by a closed
/// connection. (The quiet period counted from the response's head, so
/// hyper was told to close in the middle of the body, and closed right
/// after it, under a client that had been told nothing.) The clock is
/// moved on while the body waits: the quiet period passes without a real
/// wait.
async fn a_long_body_outlasting_the_quiet_period_keeps_its_connection(serve_http1: bool) {
    let drain = Drain::new(
        DrainOptions::default()
            .quiet_period(Duration::from_millis(200))
            .deadline(Duration::from_secs(30)),
    );
    let (client, accepted) = pair().await;
    let (chunk, chunks) = tokio::sync::mpsc::channel(4);
    let service = streaming_service(chunks);
    let serving = if serve_http1 {
        tokio::spawn(drain.serve_http1(accepted, service))
    } else {
        let serving = drain.serve_http(accepted, service);
        tokio::spawn(async move {
            let _ = serving.await;
            Ok(())
        })
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(client))
        .await
        .unwrap();
    tokio::spawn(connection);

    let response = sender
        .send_request(Request::get("/stream").body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    assert!(
        response.headers().get("connection").is_none(),
        "its head went out before the drain"
    );
    let mut body = response.into_body();
    chunk
        .send(Ok(hyper::body::Frame::data(Bytes::from("first"))))
        .await
        .unwrap();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "first");

    drain.start();
    // Twice the quiet period while the body is still being sent.
    // Let the connection's task see the drain, then move the clock on by
    // twice the quiet period (no real wait) while the body is being sent.
    tokio::task::yield_now().await;
    tokio::time::pause();
    tokio::time::advance(Duration::from_millis(400)).await;
    tokio::time::resume();
    chunk
        .send(Ok(hyper::body::Frame::data(Bytes::from("last"))))
        .await
        .unwrap();
    drop(chunk);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "last");

    // The client's next request on the same connection, at once.
    sender.ready().await.expect("the connection is still open");
    let next = sender
        .send_request(Request::get("/").body(Empty::<Bytes>::new()).unwrap())
        .await
        .expect("the next request on the connection is answered");
    assert_eq!(
        next.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    assert_eq!(next.into_body().collect().await.unwrap().to_bytes(), "done");
    serving.await.unwrap().unwrap();
    assert_eq!(drain.wait().await, DrainOutcome::Complete);
}

#[tokio::test]
async fn a_long_body_outlasting_the_quiet_period_keeps_its_connection_serve_http1() {
    a_long_body_outlasting_the_quiet_period_keeps_its_connection(true).await;
}

#[tokio::test]
async fn a_long_body_outlasting_the_quiet_period_keeps_its_connection_serve_http() {
    a_long_body_outlasting_the_quiet_period_keeps_its_connection(false).await;
}

/// A connection silent since long before the drain (longer than the quiet
/// period), whose request arrives just as the drain starts: it is answered.
/// (The quiet period counted from the accept, so it was over already, and
/// the connection could be closed under the request it had just read: a
/// race, lost now and then; 40 rounds here.) The connection ages on the
/// paused clock.
#[tokio::test]
async fn a_request_arriving_as_the_drain_starts_on_an_old_silent_connection_is_answered() {
    for round in 0..40 {
        let drain = Drain::new(
            DrainOptions::default()
                .quiet_period(Duration::from_millis(200))
                .deadline(Duration::from_secs(30)),
        );
        let (mut client, accepted) = pair().await;
        let serving = tokio::spawn(drain.serve_http(accepted, service(Arc::new(Notify::new()))));
        // The connection ages past the quiet period on the paused clock,
        // which jumps from timer to timer with every task run in between
        // (no real wait).
        tokio::time::pause();
        tokio::time::sleep(Duration::from_millis(400)).await;
        tokio::time::resume();
        drain.start();
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        let read = client.read_to_string(&mut answer).await;
        assert!(
            read.is_ok() && answer.starts_with("HTTP/1.1 200"),
            "round {round}: {read:?} {answer:?}"
        );
        serving.await.unwrap().unwrap();
        assert_eq!(drain.wait().await, DrainOutcome::Complete);
    }
}
