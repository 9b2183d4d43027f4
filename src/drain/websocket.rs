//! WebSocket through axum: sockets that are counted by the drain and, when
//! it starts, say close 1001 ("going away") and wait for the client's
//! close up to the deadline. A client that reconnects then lands on the
//! new generation.

use std::future::Future;

use axum::extract::FromRequestParts;
use axum::extract::ws::{self, CloseFrame, Message, close_code};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use futures_util::SinkExt;
use tokio::time::Instant;

use super::{ConnectionGuard, Drain};

/// axum's `WebSocketUpgrade` for a router served by
/// [`Drain::serve`](crate::drain::Drain::serve) (or `serve_tls`,
/// `serve_http`): its sockets are [`WebSocket`]s, drained with 1001.
///
/// ```no_run
/// use handover::drain::{WebSocket, WebSocketUpgrade};
/// use axum::{Router, routing::get, response::Response};
///
/// async fn echo(upgrade: WebSocketUpgrade) -> Response {
///     upgrade.on_upgrade(|mut socket: WebSocket| async move {
///         // None once the client closed, or after 1001 at the deadline.
///         while let Some(Ok(message)) = socket.recv().await {
///             if socket.send(message).await.is_err() {
///                 break;
///             }
///         }
///     })
/// }
/// let app: Router = Router::new().route("/ws", get(echo));
/// ```
#[derive(Debug)]
#[cfg_attr(docsrs, doc(cfg(feature = "websocket")))]
pub struct WebSocketUpgrade {
    inner: ws::WebSocketUpgrade,
    drain: Drain,
}

/// Why a [`WebSocketUpgrade`] could not be extracted.
#[derive(Debug)]
#[non_exhaustive]
#[cfg_attr(docsrs, doc(cfg(feature = "websocket")))]
pub enum WebSocketRejection {
    /// The request was not served through the drain, so no [`Drain`] is
    /// in its extensions: serve the router with
    /// [`Drain::serve`](crate::drain::Drain::serve) (or add the drain as an
    /// `Extension` layer).
    NoDrain,
    /// Not a WebSocket upgrade request; axum's own reason.
    Upgrade(ws::rejection::WebSocketUpgradeRejection),
}

impl IntoResponse for WebSocketRejection {
    fn into_response(self) -> Response {
        match self {
            WebSocketRejection::NoDrain => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "handover::drain::WebSocketUpgrade: no Drain in the request's extensions \
                 (serve the router with Drain::serve)",
            )
                .into_response(),
            WebSocketRejection::Upgrade(rejection) => rejection.into_response(),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for WebSocketUpgrade {
    type Rejection = WebSocketRejection;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let drain = parts
            .extensions
            .get::<Drain>()
            .cloned()
            .ok_or(WebSocketRejection::NoDrain)?;
        let inner = ws::WebSocketUpgrade::from_request_parts(parts, state)
            .await
            .map_err(WebSocketRejection::Upgrade)?;
        Ok(WebSocketUpgrade { inner, drain })
    }
}

impl WebSocketUpgrade {
    /// Changes axum's upgrade (subprotocols, message sizes, ...).
    pub fn map(self, change: impl FnOnce(ws::WebSocketUpgrade) -> ws::WebSocketUpgrade) -> Self {
        WebSocketUpgrade {
            inner: change(self.inner),
            drain: self.drain,
        }
    }

    /// Answers 101 and runs `callback` on the socket once upgraded.
    ///
    /// The socket counts as an open connection of the drain from this call,
    /// while the HTTP connection it comes from still counts, so that the
    /// drain never sees zero connections between the two.
    pub fn on_upgrade<C, Fut>(self, callback: C) -> Response
    where
        C: FnOnce(WebSocket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let open = self.drain.track();
        let drain = self.drain;
        self.inner.on_upgrade(move |socket| {
            callback(WebSocket {
                socket,
                drain,
                going: Going::Open,
                _open: open,
            })
        })
    }
}

/// An upgraded WebSocket that goes away with the generation: once the drain
/// starts, [`recv`](Self::recv) sends close 1001 ("going away"), then
/// returns what the client still sends until its close, or `None` at the
/// drain's deadline. Counted by the drain until dropped.
///
/// A handler that mostly sends must still call `recv` (in a `select!`
/// beside its own work): that is where the drain, pings and the client's
/// close are seen.
#[derive(Debug)]
#[cfg_attr(docsrs, doc(cfg(feature = "websocket")))]
pub struct WebSocket {
    socket: ws::WebSocket,
    drain: Drain,
    going: Going,
    _open: ConnectionGuard,
}

/// Where a socket is in going away.
#[derive(Debug, Clone, Copy)]
enum Going {
    Open,
    /// Draining: the next message is delivered and close 1001 follows the
    /// app's next send (the answer and the close leave together), or the
    /// socket is closed once quiet until `quiet`.
    Closing {
        deadline: Instant,
        quiet: Instant,
        after_send: bool,
    },
    /// Draining, with the drain's deadline; `queued` once close 1001 is in
    /// the socket's buffer.
    Away {
        deadline: Instant,
        queued: bool,
    },
}

impl WebSocket {
    /// Receives the next message; `None` once the socket is closed, or
    /// after close 1001 when the deadline passes. Cancel-safe: a call
    /// dropped half-way through sending close 1001 leaves it queued, and the
    /// next call flushes it.
    ///
    /// # Errors
    /// `Some(Err(_))` with axum's error when receiving fails, or sending
    /// close 1001 does (the connection broke).
    pub async fn recv(&mut self) -> Option<Result<Message, axum::Error>> {
        loop {
            match self.going {
                Going::Open => {
                    let draining = self.drain.draining();
                    tokio::select! {
                        // A message that has arrived is delivered first.
                        biased;
                        message = self.socket.recv() => return message,
                        deadline = draining => {
                            // Saturating: a quiet period of `Duration::MAX` means never.
                            let quiet = super::after(Instant::now(), self.drain.quiet_period());
                            self.going = Going::Closing { deadline, quiet: quiet.min(deadline), after_send: false };
                        }
                    }
                }
                Going::Closing {
                    deadline,
                    quiet,
                    after_send,
                } => {
                    if after_send {
                        // The app read a message and did not answer: close now.
                        self.going = Going::Away {
                            deadline,
                            queued: false,
                        };
                        continue;
                    }
                    tokio::select! {
                        biased;
                        message = self.socket.recv() => {
                            self.going = Going::Closing { deadline, quiet, after_send: true };
                            return message;
                        }
                        () = tokio::time::sleep_until(quiet) => {
                            self.going = Going::Away { deadline, queued: false };
                        }
                    }
                }
                Going::Away {
                    deadline,
                    queued: false,
                } => {
                    let away = Message::Close(Some(CloseFrame {
                        code: close_code::AWAY,
                        reason: "going away".into(),
                    }));
                    // `feed` queues without flushing: once it resolves the
                    // frame is in the socket's buffer, whatever happens next.
                    tokio::select! {
                        queued = self.socket.feed(away) => match queued {
                            Ok(()) => self.going = Going::Away { deadline, queued: true },
                            Err(error) => return Some(Err(error)),
                        },
                        () = tokio::time::sleep_until(deadline) => return None,
                    }
                }
                Going::Away {
                    deadline,
                    queued: true,
                } => {
                    let socket = &mut self.socket;
                    return tokio::select! {
                        message = async move {
                            if let Err(error) = socket.flush().await {
                                return Some(Err(error));
                            }
                            socket.recv().await
                        } => message,
                        () = tokio::time::sleep_until(deadline) => None,
                    };
                }
            }
        }
    }

    /// Sends a message.
    ///
    /// # Errors
    /// axum's error if the connection broke, or the socket is closed: after
    /// close 1001 it fails, as after any close.
    pub async fn send(&mut self, message: Message) -> Result<(), axum::Error> {
        if let Going::Closing {
            deadline,
            after_send: true,
            ..
        } = self.going
        {
            self.socket.feed(message).await?;
            let away = Message::Close(Some(CloseFrame {
                code: close_code::AWAY,
                reason: "going away".into(),
            }));
            self.socket.feed(away).await?;
            self.going = Going::Away {
                deadline,
                queued: true,
            };
            return self.socket.flush().await;
        }
        self.socket.send(message).await
    }

    /// Whether the drain has started for this socket (close 1001 is sent
    /// or about to be).
    pub fn is_going_away(&self) -> bool {
        matches!(self.going, Going::Away { .. } | Going::Closing { .. })
    }

    /// The subprotocol chosen, if any.
    pub fn protocol(&self) -> Option<&axum::http::HeaderValue> {
        self.socket.protocol()
    }
}
