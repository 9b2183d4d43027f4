//! HTTP/1.1 and HTTP/2 on one drained connection, and an accept loop that
//! serves any tower service (axum's `Router`, tonic's `Routes`) with it.
//!
//! The protocol is told apart here, not by hyper-util's auto builder: its
//! `graceful_shutdown` cancels a connection whose first bytes have not been
//! read yet, so a client that connected just before the drain started and
//! whose request is on its way would get a reset. Here such a connection is
//! waited for like an idle HTTP/1.1 one (up to the quiet period).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::body::{Body, Incoming};
use hyper::header::{CONNECTION, HeaderValue};
use hyper::service::Service;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::Instant;

use super::http::UntilSent;
use super::{Activity, ConnectionGuard, Drain};
use crate::control::ACCEPT_PAUSE;

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a client sends first on an HTTP/2 connection with prior knowledge
/// (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long a connection the server ends waits for the client's own close.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a connection served by [`Drain::serve_http`] (or
/// [`Drain::serve_https`](crate::drain::Drain::serve_https)) ended in error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
#[cfg_attr(docsrs, doc(cfg(feature = "http2")))]
pub enum ConnectionError {
    /// Reading the first bytes, which tell HTTP/2 from HTTP/1.1, failed.
    #[error("reading the first bytes of the connection: {0}")]
    Preface(#[source] io::Error),
    /// The TLS handshake failed.
    #[error("TLS handshake: {0}")]
    Handshake(#[source] io::Error),
    /// hyper reported an error on the connection (a malformed request, an
    /// I/O error).
    #[error("HTTP connection: {0}")]
    Http(#[from] hyper::Error),
}

/// The protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    Http1,
    Http2,
}

impl Drain {
    /// Serves one connection in HTTP/1.1 or HTTP/2 (h2c with prior
    /// knowledge: told apart by its first bytes) and drains it without
    /// losing a request.
    ///
    /// - HTTP/1.1: as [`serve_http1`](Self::serve_http1) (responses say
    ///   `Connection: close` once draining, an idle connection is closed
    ///   after the quiet period), with upgrades (WebSocket) allowed.
    /// - HTTP/2: when the drain starts, a graceful GOAWAY: first one with
    ///   the last stream id 2³¹−1 and a PING, then, when the PING comes
    ///   back (one round trip: every stream the client opened before it saw
    ///   the first GOAWAY has arrived), one with the last stream id the
    ///   server took. Streams in flight finish; the client opens new ones on
    ///   a new connection, to the new generation. No quiet period is needed:
    ///   unlike closing an HTTP/1.1 connection, GOAWAY is an announcement.
    /// - A connection that has sent nothing yet when the drain starts is
    ///   waited for up to the quiet period, as an idle HTTP/1.1 one.
    ///
    /// At the deadline the connection is dropped, streams in flight with it.
    /// Every request carries the [`Drain`] in its extensions (for
    /// [`WebSocketUpgrade`](crate::drain::WebSocketUpgrade)).
    ///
    /// The connection counts as open from this call: call it in the accept
    /// loop and spawn the future. [`serve`](Self::serve) is that loop.
    ///
    /// # Errors
    /// The future resolves to [`ConnectionError::Preface`] if reading the
    /// first bytes failed, [`ConnectionError::Http`] for hyper's error on the
    /// connection (a malformed request, an I/O error).
    ///
    /// # Panics
    /// The future panics if polled outside a tokio runtime with time enabled
    /// (HTTP/2 spawns its tasks on it; the deadline is a tokio timer).
    #[cfg_attr(docsrs, doc(cfg(feature = "http2")))]
    pub fn serve_http<I, S, B>(
        &self,
        io: I,
        service: S,
    ) -> impl Future<Output = Result<(), ConnectionError>> + Send + 'static
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let open = self.track();
        self.clone().connection(open, io, None, None, service)
    }

    /// Accepts connections on `listener` and serves each with
    /// [`serve_http`](Self::serve_http) and a clone of `service` (any tower
    /// service: an axum `Router`, tonic's `Routes`), until `exit` resolves
    /// (typically [`Upgrader::exit`](crate::Upgrader::exit)). Then it stops
    /// accepting, closes the listener (this process's copy: the successor
    /// has its own), starts the drain, and returns what `exit` returned.
    /// Wait for the connections with [`wait`](Self::wait).
    ///
    /// `exit` is polled before each accept, so that once it has resolved no
    /// connection is taken. A failed accept (`EMFILE`, `ECONNABORTED`) is
    /// logged at DEBUG and the loop accepts on; so is a connection's error,
    /// with its peer's address.
    ///
    /// # Panics
    /// If polled outside a tokio runtime with time enabled: each connection
    /// is a `tokio::spawn`ed task.
    ///
    /// ```no_run
    /// # async fn example(upgrader: handover::Upgrader) -> Result<(), Box<dyn std::error::Error>> {
    /// use handover::drain::Drain;
    /// let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
    /// let listener = tokio::net::TcpListener::from_std(
    ///     upgrader.tcp_listener("http", "127.0.0.1:8080".parse()?)?)?;
    /// upgrader.ready()?;
    /// let drain = Drain::default();
    /// drain.serve(listener, app, upgrader.exit()).await;
    /// drain.wait().await;
    /// # Ok(()) }
    /// ```
    #[cfg_attr(docsrs, doc(cfg(feature = "http2")))]
    pub async fn serve<S, B, F>(&self, listener: TcpListener, service: S, exit: F) -> F::Output
    where
        S: tower_service::Service<Request<Incoming>, Response = Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
        F: Future,
    {
        self.accept_loop(listener, exit, |drain, open, stream, remote| {
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(log_end(
                remote,
                drain.connection(open, stream, Some(remote), None, service),
            ));
        })
        .await
    }

    /// The accept loop of [`serve`](Self::serve) and `serve_tls`: each
    /// connection is tracked before it is handed to `spawn`.
    pub(super) async fn accept_loop<F>(
        &self,
        listener: TcpListener,
        exit: F,
        mut spawn: impl FnMut(Drain, ConnectionGuard, tokio::net::TcpStream, SocketAddr),
    ) -> F::Output
    where
        F: Future,
    {
        tokio::pin!(exit);
        let output = loop {
            let accepted = tokio::select! {
                // Exit first: once the successor is ready, accept nothing.
                biased;
                output = &mut exit => break output,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, remote)) => {
                    // Small responses are not held back by Nagle.
                    let _ = stream.set_nodelay(true);
                    spawn(self.clone(), self.track(), stream, remote);
                }
                // ECONNABORTED: that connection's, not the listener's.
                Err(error) if error.kind() == io::ErrorKind::ConnectionAborted => {
                    tracing::debug!(%error, "accept failed");
                }
                // Out of descriptors (EMFILE, ENFILE) or memory: the
                // connection stays queued and would fail again at once, in
                // a busy loop. Accept again a little later (exit still
                // watched meanwhile).
                Err(error) => {
                    tracing::warn!(%error, "accept failed; pausing");
                    tokio::select! {
                        biased;
                        output = &mut exit => break output,
                        () = tokio::time::sleep(ACCEPT_PAUSE) => {}
                    }
                }
            }
        };
        drop(listener);
        self.start();
        output
    }

    /// Serves a tracked connection whose protocol is known (ALPN) or not.
    pub(super) async fn connection<I, S, B>(
        self,
        open: ConnectionGuard,
        io: I,
        remote: Option<SocketAddr>,
        protocol: Option<Protocol>,
        service: S,
    ) -> Result<(), ConnectionError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let _open = open;
        let activity = Arc::new(Activity::new());
        let (io, protocol) = match protocol {
            Some(protocol) => (Rewind::new(io, Vec::new()), protocol),
            None => match self.detect(io, &activity).await? {
                // Its first bytes are activity: the quiet period counts
                // from them (not from the accept, which may be long past).
                Some(detected) => {
                    activity.changed_now();
                    detected
                }
                // Closed before its first byte, or idle through the drain.
                None => return Ok(()),
            },
        };
        let service = Tracked {
            inner: service,
            drain: self.clone(),
            activity: Arc::clone(&activity),
            remote,
        };
        match protocol {
            Protocol::Http1 => self.http1(TokioIo::new(io), service, &activity).await,
            // h2 takes a late WINDOW_UPDATE for a connection error: see
            // `late_frames`.
            Protocol::Http2 => {
                let (back, returned) = tokio::sync::oneshot::channel();
                let io = super::late_frames::LateWindowUpdates::new(io, back);
                let result = self.http2(TokioIo::new(io), service).await;
                if let Ok(io) = returned.await {
                    self.linger(io).await;
                }
                result
            }
        }
    }

    /// Reads until the first bytes tell HTTP/2's preface from anything else
    /// (HTTP/1.1); `None` if the connection closes first, or stays silent
    /// through the quiet period once draining.
    async fn detect<I>(
        &self,
        mut io: I,
        activity: &Activity,
    ) -> Result<Option<(Rewind<I>, Protocol)>, ConnectionError>
    where
        I: AsyncRead + Unpin,
    {
        let mut seen = Vec::with_capacity(PREFACE.len());
        let mut chunk = [0u8; PREFACE.len()];
        let idle = self.idle(activity);
        tokio::pin!(idle);
        loop {
            let want = PREFACE.len() - seen.len();
            let read = tokio::select! {
                // Bytes first: a request that has arrived is served.
                biased;
                read = io.read(&mut chunk[..want]) => read.map_err(ConnectionError::Preface)?,
                () = &mut idle => return Ok(None),
            };
            if read == 0 {
                // The client closed: whatever it sent is for HTTP/1.1's
                // parser to judge (it reports a truncated request).
                return Ok((!seen.is_empty()).then(|| (Rewind::new(io, seen), Protocol::Http1)));
            }
            seen.extend_from_slice(&chunk[..read]);
            if !PREFACE.starts_with(&seen) {
                return Ok(Some((Rewind::new(io, seen), Protocol::Http1)));
            }
            if seen.len() == PREFACE.len() {
                return Ok(Some((Rewind::new(io, seen), Protocol::Http2)));
            }
        }
    }

    /// Closes a connection the server ends without a reset: its FIN goes
    /// out, then what the client still sends is read and dropped until it
    /// closes too (at most [`LINGER`], and not past the drain's deadline).
    /// Closed at once with bytes unread, the socket would answer RST, and
    /// a client whose last write crossed the final GOAWAY would lose the
    /// GOAWAY and the responses still unread in its buffer with it ("broken
    /// pipe": gRPC's C-core clients failed a call in some upgrades so).
    async fn linger<I>(&self, mut io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let mut until = Instant::now() + LINGER;
        if self.is_draining() {
            until = until.min(self.draining().await);
        }
        // Bounded too: over TLS it flushes close_notify, which a client
        // that reads nothing more would hold up for ever.
        let _ = tokio::time::timeout_at(until, io.shutdown()).await;
        let mut sink = [0u8; 4096];
        let drained = async { while let Ok(1..) = io.read(&mut sink).await {} };
        let _ = tokio::time::timeout_at(until, drained).await;
    }

    /// Resolves once draining and `activity` has been quiet for the quiet
    /// period since (at the earliest) the drain started, or at the deadline.
    async fn idle(&self, activity: &Activity) {
        let deadline = self.draining().await;
        // A connection silent since long before the drain gets the quiet
        // period too: a request it sends as the drain starts is served.
        activity.changed_now();
        tokio::select! {
            () = activity.quiet(self.quiet_period()) => {}
            () = tokio::time::sleep_until(deadline) => {}
        }
    }

    async fn http1<I, S, B>(
        &self,
        io: I,
        service: S,
        activity: &Activity,
    ) -> Result<(), ConnectionError>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<B>>,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let connection = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .with_upgrades();
        tokio::pin!(connection);
        // The connection first in each wait: a request it can read now is
        // read (and counted) before the quiet period is looked at.
        let deadline = tokio::select! {
            biased;
            result = connection.as_mut() => return Ok(result?),
            deadline = self.draining() => deadline,
        };
        // Idle since long before the drain or not, a keep-alive connection
        // gets the quiet period from now: a client that sends its next
        // request as the drain starts is answered, not closed on.
        activity.changed_now();
        tokio::select! {
            biased;
            result = connection.as_mut() => return Ok(result?),
            () = activity.quiet(self.quiet_period()) => connection.as_mut().graceful_shutdown(),
            // Dropping the connection closes it.
            () = tokio::time::sleep_until(deadline) => return Ok(()),
        }
        tokio::select! {
            result = connection.as_mut() => Ok(result?),
            () = tokio::time::sleep_until(deadline) => Ok(()),
        }
    }

    async fn http2<I, S, B>(&self, io: I, service: S) -> Result<(), ConnectionError>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, service);
        tokio::pin!(connection);
        let deadline = tokio::select! {
            result = connection.as_mut() => return Ok(result?),
            deadline = self.draining() => deadline,
        };
        // GOAWAY(2^31-1) and a PING now, GOAWAY(last stream) when it comes
        // back; before the handshake is over, hyper does it right after.
        connection.as_mut().graceful_shutdown();
        tokio::select! {
            result = connection.as_mut() => Ok(result?),
            () = tokio::time::sleep_until(deadline) => {
                tracing::debug!("drain deadline: closing an HTTP/2 connection with streams in flight");
                Ok(())
            }
        }
    }
}

/// Logs how a spawned connection ended (at debug: a client that resets is
/// the client's business).
pub(super) async fn log_end(
    remote: SocketAddr,
    connection: impl Future<Output = Result<(), ConnectionError>>,
) {
    if let Err(error) = connection.await {
        tracing::debug!(%remote, %error, "connection ended in error");
    }
}

/// Wraps a service: counts its requests, puts the [`Drain`] (and, with the
/// `axum` feature, axum's `ConnectInfo`) in each request's extensions, and
/// once draining announces `Connection: close` on HTTP/1.x responses (not
/// on a 101: the connection is being handed to another protocol, and not
/// on HTTP/2, where the header is illegal and GOAWAY says it).
struct Tracked<S> {
    inner: S,
    drain: Drain,
    activity: Arc<Activity>,
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    remote: Option<SocketAddr>,
}

impl<S, B> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<UntilSent<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<UntilSent<B>>, S::Error>> + Send>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        let http1 = request.version() < Version::HTTP_2;
        request.extensions_mut().insert(self.drain.clone());
        #[cfg(feature = "axum")]
        if let Some(remote) = self.remote {
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(remote));
        }
        let in_flight = self.activity.request();
        let response = self.inner.call(request);
        let drain = self.drain.clone();
        Box::pin(async move {
            let mut response = response.await?;
            if http1 && drain.is_draining() && response.status() != StatusCode::SWITCHING_PROTOCOLS
            {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            // In flight until the body is sent: see `InFlight`.
            Ok(response.map(|body| UntilSent::new(body, in_flight)))
        })
    }
}

/// An I/O object that first reads back bytes already read from it.
pub(super) struct Rewind<I> {
    prefix: Vec<u8>,
    position: usize,
    inner: I,
}

impl<I> Rewind<I> {
    pub(super) fn new(inner: I, prefix: Vec<u8>) -> Rewind<I> {
        Rewind {
            prefix,
            position: 0,
            inner,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.position < this.prefix.len() {
            let left = &this.prefix[this.position..];
            let taken = left.len().min(buf.remaining());
            buf.put_slice(&left[..taken]);
            this.position += taken;
            if this.position == this.prefix.len() {
                this.prefix = Vec::new();
                this.position = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn rewind_reads_the_prefix_then_the_rest() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b" world").await.unwrap();
        drop(client);
        let mut rewound = Rewind::new(server, b"hello".to_vec());
        let mut all = String::new();
        rewound.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world");
    }

    #[tokio::test]
    async fn detect_tells_the_http2_preface_from_http1_even_byte_by_byte() {
        for (sent, expected) in [
            (&PREFACE[..], Protocol::Http2),
            (&b"GET / HTTP/1.1\r\n\r\n"[..], Protocol::Http1),
            (&b"PRI * HTTP/1.1\r\n"[..], Protocol::Http1),
        ] {
            let (mut client, server) = tokio::io::duplex(64);
            let drain = Drain::default();
            let activity = Activity::new();
            let writer = tokio::spawn(async move {
                for byte in sent {
                    client.write_all(&[*byte]).await.unwrap();
                    tokio::task::yield_now().await;
                }
                client
            });
            let (mut io, protocol) = drain.detect(server, &activity).await.unwrap().unwrap();
            assert_eq!(protocol, expected, "{sent:?}");
            drop(writer.await.unwrap());
            let mut replayed = Vec::new();
            io.read_to_end(&mut replayed).await.unwrap();
            assert_eq!(replayed, sent, "every byte is read back");
        }
    }

    /// A connection that sent nothing yet when the drain starts is given
    /// the quiet period, not closed at once (which is what hyper-util's
    /// auto builder does, and what resets a request on its way).
    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_waited_for_through_the_quiet_period() {
        let drain = Drain::new(super::super::DrainOptions {
            quiet_period: std::time::Duration::from_secs(1),
            deadline: std::time::Duration::from_secs(30),
        });
        let (mut client, server) = tokio::io::duplex(64);
        let activity = Activity::new();
        drain.start();
        let detecting = tokio::spawn({
            let drain = drain.clone();
            async move {
                let activity = activity;
                drain
                    .detect(server, &activity)
                    .await
                    .map(|found| found.map(|(_, protocol)| protocol))
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(900)).await;
        assert!(!detecting.is_finished(), "closed before the quiet period");
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(detecting.await.unwrap().unwrap(), Some(Protocol::Http1));
    }
}
