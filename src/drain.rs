//! Draining: after [`Upgrader::exit`](crate::Upgrader::exit), finish what is
//! in flight and lose no request.
//!
//! Closing idle keep-alive connections at the hand-over loses about one
//! request per connection per upgrade: a client that sends on a connection
//! at the moment the server closes it gets a reset. So the HTTP/1.1 drain
//! announces instead: every response after the drain starts carries
//! `Connection: close` (the client then closes after reading it), in-flight
//! requests finish, and a connection is closed by the server only after it
//! has been quiet for [`DrainOptions::quiet_period`]. A hard deadline bounds
//! it all.
//!
//! HTTP/2 (feature `http2`) drains with GOAWAY instead, on the same
//! connection entry point as HTTP/1.1 (`Drain::serve_http`), and
//! `Drain::serve` is a whole accept loop for any tower service: an axum
//! `Router`, tonic's `Routes`. Feature `tls` adds rustls in front
//! (`Drain::serve_tls`, `tls_acceptor`), feature `websocket` sockets that
//! say 1001 "going away" (`WebSocketUpgrade`).
//!
//! For raw TCP, [`Drain::track`] counts connections; [`Drain::wait`]
//! resolves when they are all gone or the deadline passes, and
//! [`Drain::deadline_passed`] tells connection tasks to give up.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

#[cfg(feature = "http2")]
mod late_frames;
#[cfg(feature = "http2")]
mod serve;
#[cfg(feature = "tls")]
mod tickets;
#[cfg(feature = "tls")]
mod tls;
#[cfg(feature = "websocket")]
mod websocket;

#[cfg(feature = "http2")]
pub use serve::ConnectionError;
#[cfg(feature = "tls")]
pub use tickets::TicketKeys;
#[cfg(feature = "tls")]
pub use tls::{TlsError, tls_acceptor, tls_acceptor_with_tickets};
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub use tokio_rustls::TlsAcceptor;
#[cfg(feature = "websocket")]
pub use websocket::{WebSocket, WebSocketRejection, WebSocketUpgrade};

/// How long a drain may take. Build it from the default:
/// `DrainOptions::default().quiet_period(Duration::from_millis(500))`.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct DrainOptions {
    /// A keep-alive connection with no request in flight for this long is
    /// closed by the server once draining: counted from the drain's start
    /// at the earliest (a request sent as the drain starts, on a connection
    /// idle since long before, is served), and from the end of the last
    /// response's body. Default: 1 s. `Duration::MAX`: never.
    pub quiet_period: Duration,
    /// Connections still open this long after the drain started are cut.
    /// Default: 30 s. `Duration::MAX`: never.
    pub deadline: Duration,
}

impl Default for DrainOptions {
    fn default() -> Self {
        DrainOptions {
            quiet_period: Duration::from_secs(1),
            deadline: Duration::from_secs(30),
        }
    }
}

impl DrainOptions {
    /// Sets the quiet period.
    pub fn quiet_period(mut self, period: Duration) -> Self {
        self.quiet_period = period;
        self
    }

    /// Sets the deadline.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DrainOutcome {
    /// Every connection finished on its own.
    Complete,
    /// The deadline passed with this many connections still open.
    DeadlinePassed {
        /// Connections that were still open.
        remaining: usize,
    },
}

/// Tracks a generation's connections and drains them. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Drain {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    options: DrainOptions,
    /// `Some(deadline)` once draining.
    deadline: watch::Sender<Option<Instant>>,
    active: AtomicUsize,
    all_closed: Notify,
}

/// Held for as long as a connection is open; see [`Drain::track`].
#[derive(Debug)]
#[must_use = "the connection counts as open only while the guard lives"]
pub struct ConnectionGuard {
    inner: Arc<Inner>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.inner.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.all_closed.notify_waiters();
        }
    }
}

impl Default for Drain {
    fn default() -> Self {
        Drain::new(DrainOptions::default())
    }
}

impl Drain {
    /// A drain that has not started.
    pub fn new(options: DrainOptions) -> Drain {
        Drain {
            inner: Arc::new(Inner {
                options,
                deadline: watch::channel(None).0,
                active: AtomicUsize::new(0),
                all_closed: Notify::new(),
            }),
        }
    }

    /// Counts a connection as open until the guard is dropped.
    pub fn track(&self) -> ConnectionGuard {
        self.inner.active.fetch_add(1, Ordering::AcqRel);
        ConnectionGuard {
            inner: Arc::clone(&self.inner),
        }
    }

    /// Connections open now.
    pub fn active(&self) -> usize {
        self.inner.active.load(Ordering::Acquire)
    }

    /// Starts draining (once; later calls change nothing).
    pub fn start(&self) {
        let deadline = after(Instant::now(), self.inner.options.deadline);
        self.inner.deadline.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(deadline);
                true
            } else {
                false
            }
        });
    }

    /// Whether [`start`](Self::start) was called.
    pub fn is_draining(&self) -> bool {
        self.inner.deadline.borrow().is_some()
    }

    /// Resolves once draining has started; returns the deadline.
    pub fn draining(&self) -> impl Future<Output = Instant> + Send + 'static {
        let mut deadline = self.inner.deadline.subscribe();
        async move {
            match deadline.wait_for(Option::is_some).await {
                Ok(value) => value.unwrap_or_else(Instant::now),
                // The sender lives in `Inner`, which this future does not
                // hold: if it is gone, nothing is left to drain.
                Err(_) => Instant::now(),
            }
        }
    }

    /// Resolves when the drain deadline has passed.
    pub fn deadline_passed(&self) -> impl Future<Output = ()> + Send + 'static {
        let draining = self.draining();
        async move { tokio::time::sleep_until(draining.await).await }
    }

    /// Starts draining if needed and waits until every tracked connection is
    /// closed or the deadline passes.
    pub async fn wait(&self) -> DrainOutcome {
        self.start();
        let deadline = self.draining().await;
        loop {
            let all_closed = self.inner.all_closed.notified();
            tokio::pin!(all_closed);
            all_closed.as_mut().enable();
            let remaining = self.active();
            if remaining == 0 {
                return DrainOutcome::Complete;
            }
            tokio::select! {
                _ = &mut all_closed => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return match self.active() {
                        0 => DrainOutcome::Complete,
                        remaining => DrainOutcome::DeadlinePassed { remaining },
                    };
                }
            }
        }
    }

    fn quiet_period(&self) -> Duration {
        self.inner.options.quiet_period
    }
}

/// `instant + duration`, with a duration the clock cannot hold (such as
/// `Duration::MAX`, meaning "never") cut to 30 years, which is also what
/// tokio's own timers take for "never": adding it cannot overflow, here or
/// where tokio's timer rounds the instant up.
fn after(instant: Instant, duration: Duration) -> Instant {
    const NEVER: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
    instant + duration.min(NEVER)
}

/// Request activity on one connection.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
    changed: Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
            changed: Notify::new(),
        }
    }

    /// A request arrived.
    fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.changed_now();
    }

    /// A request was answered.
    fn end(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.changed_now();
    }

    fn changed_now(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.changed.notify_waiters();
    }

    /// A request arrived; it is in flight until what this returns is
    /// dropped (with its response's body, once sent).
    fn request(self: &Arc<Self>) -> InFlight {
        self.begin();
        InFlight(Arc::clone(self))
    }

    /// Resolves once no request has been in flight for `period`.
    async fn quiet(&self, period: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.in_flight.load(Ordering::Acquire) > 0 {
                changed.await;
                continue;
            }
            let quiet_since = *self.last.lock().unwrap_or_else(|p| p.into_inner());
            if quiet_since.elapsed() >= period {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(after(quiet_since, period)) => {}
                _ = &mut changed => {}
            }
        }
    }
}

/// One request of a connection in flight: from its arrival until its
/// response has been sent (the body wrapped in [`http::UntilSent`]
/// holds it), so that the quiet period counts from the end of the last
/// response, not from its head: a connection is not closed under a client
/// still reading a long body, who would send its next request on it.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

#[cfg(feature = "hyper")]
mod http {
    use std::error::Error as StdError;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;

    use std::task::{Context, Poll};

    use hyper::body::{Body, Frame, Incoming, SizeHint};
    use hyper::header::{CONNECTION, HeaderValue};
    use hyper::service::Service;
    use hyper::{Request, Response};
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncRead, AsyncWrite};

    use super::{Activity, Drain, InFlight};

    pin_project_lite::pin_project! {
        /// A response body that keeps its request in flight until it has
        /// been sent to its end (or dropped: the connection failed).
        pub(super) struct UntilSent<B> {
            #[pin]
            inner: B,
            in_flight: Option<InFlight>,
        }
    }

    impl<B> UntilSent<B> {
        pub(super) fn new(inner: B, in_flight: InFlight) -> UntilSent<B> {
            UntilSent {
                inner,
                in_flight: Some(in_flight),
            }
        }
    }

    impl<B: Body> Body for UntilSent<B> {
        type Data = B::Data;
        type Error = B::Error;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
            let this = self.project();
            let frame = this.inner.poll_frame(cx);
            if matches!(frame, Poll::Ready(None)) {
                // Sent: hyper may keep the body until the connection's next
                // request, so the request ends here rather than at the drop.
                this.in_flight.take();
            }
            frame
        }

        fn is_end_stream(&self) -> bool {
            self.inner.is_end_stream()
        }

        fn size_hint(&self) -> SizeHint {
            self.inner.size_hint()
        }
    }

    type BoxError = Box<dyn StdError + Send + Sync>;

    impl Drain {
        /// Serves one HTTP/1.1 connection with keep-alive and drains it
        /// without losing a request: once the drain starts, each response
        /// says `Connection: close`, and the connection is closed by the
        /// server only after [`quiet_period`](super::DrainOptions::quiet_period)
        /// without a request in flight (counted from the drain's start at
        /// the earliest, and from the end of the last response's body), or
        /// at the deadline.
        ///
        /// The connection counts as open from this call, not from the first
        /// poll of the returned future: call it in the accept loop and spawn
        /// the future, so that a connection accepted just before the drain
        /// starts is waited for.
        ///
        /// ```no_run
        /// # async fn example(listener: tokio::net::TcpListener, drain: handover::drain::Drain) {
        /// use http_body_util::Full;
        /// use hyper::{Request, Response, body::{Bytes, Incoming}, service::service_fn};
        /// let Ok((stream, _)) = listener.accept().await else { return };
        /// let hello = service_fn(|_: Request<Incoming>| async {
        ///     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("hello"))))
        /// });
        /// tokio::spawn(drain.serve_http1(stream, hello));
        /// # }
        /// ```
        ///
        /// # Errors
        /// The future resolves to hyper's error on the connection, if any
        /// (a malformed request, an I/O error).
        ///
        /// # Panics
        /// The future panics if polled outside a tokio runtime with time
        /// enabled (it waits for the drain's deadline with tokio's timers).
        #[cfg_attr(docsrs, doc(cfg(feature = "hyper")))]
        pub fn serve_http1<I, S, B>(
            &self,
            io: I,
            service: S,
        ) -> impl Future<Output = Result<(), hyper::Error>> + Send + 'static
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
            let drain = self.clone();
            async move {
                let _open = open;
                let activity = Arc::new(Activity::new());
                let service = Announce {
                    inner: service,
                    drain: drain.clone(),
                    activity: Arc::clone(&activity),
                };
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(io), service);
                tokio::pin!(connection);
                // The connection first in each wait: a request it can read
                // now is read (and counted) before the quiet period is
                // looked at.
                let deadline = tokio::select! {
                    biased;
                    result = connection.as_mut() => return result,
                    deadline = drain.draining() => deadline,
                };
                // Idle since long before the drain or not, the connection
                // gets the quiet period from now: a client that sends its
                // next request as the drain starts is answered.
                activity.changed_now();
                tokio::select! {
                    biased;
                    result = connection.as_mut() => return result,
                    _ = activity.quiet(drain.quiet_period()) => connection.as_mut().graceful_shutdown(),
                    // Dropping the connection closes it.
                    _ = tokio::time::sleep_until(deadline) => return Ok(()),
                }
                tokio::select! {
                    result = connection.as_mut() => result,
                    _ = tokio::time::sleep_until(deadline) => Ok(()),
                }
            }
        }
    }

    /// Wraps a service: counts its requests and, once draining, announces
    /// `Connection: close` on every response.
    struct Announce<S> {
        inner: S,
        drain: Drain,
        activity: Arc<Activity>,
    }

    impl<S, B> Service<Request<Incoming>> for Announce<S>
    where
        S: Service<Request<Incoming>, Response = Response<B>>,
        S::Future: Send + 'static,
    {
        type Response = Response<UntilSent<B>>;
        type Error = S::Error;
        type Future =
            Pin<Box<dyn Future<Output = Result<Response<UntilSent<B>>, S::Error>> + Send>>;

        fn call(&self, request: Request<Incoming>) -> Self::Future {
            let in_flight = self.activity.request();
            let response = self.inner.call(request);
            let drain = self.drain.clone();
            Box::pin(async move {
                let mut response = response.await?;
                if drain.is_draining() {
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                Ok(response.map(|body| UntilSent::new(body, in_flight)))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wait_completes_when_the_last_connection_closes() {
        let drain = Drain::default();
        let first = drain.track();
        let second = drain.track();
        let waiter = tokio::spawn({
            let drain = drain.clone();
            async move { drain.wait().await }
        });
        tokio::task::yield_now().await;
        assert!(drain.is_draining());
        drop(first);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(second);
        assert_eq!(waiter.await.unwrap(), DrainOutcome::Complete);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_gives_up_at_the_deadline_and_counts_what_is_left() {
        let drain = Drain::new(DrainOptions {
            quiet_period: Duration::from_millis(10),
            deadline: Duration::from_secs(5),
        });
        let _stuck = drain.track();
        let started = Instant::now();
        assert_eq!(
            drain.wait().await,
            DrainOutcome::DeadlinePassed { remaining: 1 }
        );
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    /// `Duration::MAX` means "never": no panic when the drain starts.
    #[tokio::test(start_paused = true)]
    async fn a_deadline_of_duration_max_waits_for_the_last_connection() {
        let drain = Drain::new(DrainOptions {
            quiet_period: Duration::MAX,
            deadline: Duration::MAX,
        });
        let open = drain.track();
        let waiter = tokio::spawn({
            let drain = drain.clone();
            async move { drain.wait().await }
        });
        tokio::time::sleep(Duration::from_secs(365 * 24 * 3600)).await;
        assert!(drain.is_draining());
        assert!(!waiter.is_finished(), "a year is not forever");
        drop(open);
        assert_eq!(waiter.await.unwrap(), DrainOutcome::Complete);
    }

    /// A quiet period of `Duration::MAX` never closes an idle connection
    /// (the deadline does), and does not panic.
    #[tokio::test(start_paused = true)]
    async fn a_quiet_period_of_duration_max_is_never_over() {
        let activity = Arc::new(Activity::new());
        let quiet = tokio::spawn({
            let activity = Arc::clone(&activity);
            async move { activity.quiet(Duration::MAX).await }
        });
        tokio::time::sleep(Duration::from_secs(365 * 24 * 3600)).await;
        assert!(!quiet.is_finished(), "quiet ended (or panicked)");
        quiet.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_waits_for_in_flight_requests_and_the_period() {
        let activity = Arc::new(Activity::new());
        activity.begin();
        let quiet = tokio::spawn({
            let activity = Arc::clone(&activity);
            async move {
                activity.quiet(Duration::from_secs(1)).await;
                Instant::now()
            }
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!quiet.is_finished(), "quiet while a request is in flight");
        activity.end();
        let finished_at = Instant::now();
        assert_eq!(quiet.await.unwrap() - finished_at, Duration::from_secs(1));
    }
}
