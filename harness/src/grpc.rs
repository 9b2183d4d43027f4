//! The subject's gRPC service, `harness.Echo`, without protoc: the messages
//! are prost derives and the routes are written out, so that neither the
//! build nor CI needs a protocol compiler.
//!
//! ```text
//! service Echo {
//!   rpc Unary(EchoRequest) returns (EchoReply);
//!   rpc Stream(EchoRequest) returns (stream EchoReply);  // `count` replies, `interval_ms` apart
//! }
//! ```

use std::convert::Infallible;
use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;
use tonic::server::{Grpc, ServerStreamingService, UnaryService};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

/// The path of the unary RPC.
pub const UNARY: &str = "/harness.Echo/Unary";
/// The path of the server-streaming RPC.
pub const STREAM: &str = "/harness.Echo/Stream";

/// What a client asks.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    /// Echoed back in every reply.
    #[prost(string, tag = "1")]
    pub message: String,
    /// Replies of a stream.
    #[prost(uint32, tag = "2")]
    pub count: u32,
    /// Between two replies of a stream.
    #[prost(uint32, tag = "3")]
    pub interval_ms: u32,
}

/// One reply.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    /// The request's message.
    #[prost(string, tag = "1")]
    pub message: String,
    /// The generation that answered.
    #[prost(uint64, tag = "2")]
    pub generation: u64,
    /// Its place in a stream, from 0.
    #[prost(uint32, tag = "3")]
    pub index: u32,
}

/// The longest stream a client may ask for, so that a bad request cannot
/// hold a connection (and a drain) for ever.
const MOST_REPLIES: u32 = 10_000;

#[derive(Clone, Copy)]
struct Echo {
    generation: u64,
}

impl UnaryService<EchoRequest> for Echo {
    type Response = EchoReply;
    type Future = std::future::Ready<Result<Response<EchoReply>, Status>>;

    fn call(&mut self, request: Request<EchoRequest>) -> Self::Future {
        std::future::ready(Ok(Response::new(EchoReply {
            message: request.into_inner().message,
            generation: self.generation,
            index: 0,
        })))
    }
}

type Replies = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

impl ServerStreamingService<EchoRequest> for Echo {
    type Response = EchoReply;
    type ResponseStream = Replies;
    type Future = std::future::Ready<Result<Response<Replies>, Status>>;

    fn call(&mut self, request: Request<EchoRequest>) -> Self::Future {
        let request = request.into_inner();
        if request.count > MOST_REPLIES {
            return std::future::ready(Err(Status::invalid_argument(format!(
                "count {} over {MOST_REPLIES}",
                request.count
            ))));
        }
        let generation = self.generation;
        let interval = Duration::from_millis(request.interval_ms.into());
        let replies = futures_util::stream::unfold(0u32, move |index| {
            let message = request.message.clone();
            async move {
                if index >= request.count {
                    return None;
                }
                if index > 0 {
                    // The stream's pace is what the client asked for.
                    tokio::time::sleep(interval).await;
                }
                let reply = EchoReply {
                    message,
                    generation,
                    index,
                };
                Some((Ok(reply), index + 1))
            }
        });
        std::future::ready(Ok(Response::new(Box::pin(replies) as Replies)))
    }
}

/// Answers one HTTP/2 request as the `harness.Echo` service of
/// `generation`; any other path is UNIMPLEMENTED.
pub async fn serve<B>(
    request: http::Request<B>,
    generation: u64,
) -> Result<http::Response<tonic::body::Body>, Infallible>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let echo = Echo { generation };
    let codec = ProstCodec::<EchoReply, EchoRequest>::default();
    Ok(match request.uri().path() {
        UNARY => Grpc::new(codec).unary(echo, request).await,
        STREAM => Grpc::new(codec).server_streaming(echo, request).await,
        other => Status::unimplemented(format!("no route {other}")).into_http(),
    })
}

/// The standard gRPC health checking protocol (`grpc.health.v1.Health`),
/// which servers in any language commonly register: what `check --grpc`
/// calls, so that it needs no proto of the server's own.
///
/// ```text
/// service Health {
///   rpc Check(HealthCheckRequest) returns (HealthCheckResponse);
///   rpc Watch(HealthCheckRequest) returns (stream HealthCheckResponse);
/// }
/// ```
pub mod health {
    /// The path of the unary `Check`.
    pub const CHECK: &str = "/grpc.health.v1.Health/Check";
    /// The path of the server-streaming `Watch`.
    pub const WATCH: &str = "/grpc.health.v1.Health/Watch";
    /// `ServingStatus.SERVING`.
    pub const SERVING: i32 = 1;

    /// `message HealthCheckRequest { string service = 1; }` (`""`: the
    /// server as a whole).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HealthCheckRequest {
        /// The service asked about.
        #[prost(string, tag = "1")]
        pub service: String,
    }

    /// `message HealthCheckResponse { ServingStatus status = 1; }`; an
    /// enum is an int32 on the wire, so no enum type is needed here.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HealthCheckResponse {
        /// UNKNOWN 0, SERVING 1, NOT_SERVING 2, SERVICE_UNKNOWN 3.
        #[prost(int32, tag = "1")]
        pub status: i32,
    }
}
