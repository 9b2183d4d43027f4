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
