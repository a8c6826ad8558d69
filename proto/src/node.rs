//! The server and client stacks every splitmirror node shares.
//!
//! A node builds its service, hands it to [`serve`] together with a bound
//! listener and a cancellation token, and gets health (`grpc.health.v1`),
//! reflection (`v1` and `v1alpha`, since grpcurl 1.8 asks for the latter),
//! tuned HTTP/2 windows, per-request tracing spans and graceful shutdown,
//! the same on every node. Clients connect through [`channel`], which applies
//! the matching window sizes.
//!
//! Limits every node has: the message sizes below (each service sets its
//! own, smaller decoding limit), at most [`MAX_CONCURRENT_STREAMS`] streams
//! and [`CONCURRENT_CALLS_PER_CONNECTION`] calls in progress per
//! connection, a [`SERVER_REQUEST_TIMEOUT`] per unary call, and no
//! compression (no codec is enabled on either side: block data does not
//! compress enough to pay for the CPU on the data path).
//!
//! A node lists in reflection only the services it serves; a call to
//! another splitmirror service answers `UNIMPLEMENTED` naming the node that
//! serves it. A node that must wait for a peer before it can serve (db-server
//! waits for the array) serves at once through [`Starting`] and
//! [`serve_when_ready`]: health says `NOT_SERVING` and calls answer
//! `UNAVAILABLE` with the reason until it is ready.

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::transport::server::Router;
use tonic::transport::{Channel, Endpoint, Server};
use tower::ServiceExt as _;
use tower::layer::util::{Identity, Stack};
use tower::util::MapResponseLayer;

use crate::security::{AccessPolicy, AuthorizeLayer, Security};

/// The largest gRPC message any node encodes or decodes. Services check
/// their own, smaller request limits first, so that an oversized request
/// gets `RESOURCE_EXHAUSTED` with a reason rather than a transport error; a
/// message over this limit itself is refused by tonic before it is decoded,
/// and [`server_builder`] makes that answer `RESOURCE_EXHAUSTED` too.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The largest data payload one request to the array may carry (a write's
/// data; a copy or checksum is cut into chunks by the array itself). The
/// array refuses larger ones with `RESOURCE_EXHAUSTED`; its clients (the
/// db-server's `Write`) refuse them before sending, so that a request that
/// cannot succeed never reaches the array and is never mistaken for a write
/// whose outcome is unknown. array-node's own limit must equal this (a
/// cross-node test checks it).
pub const MAX_ARRAY_REQUEST_BYTES: u64 = 16 << 20;

/// The layer every node's server stack carries (see [`server_builder`]).
pub type NodeLayer = MapResponseLayer<fn(http::Response<Body>) -> http::Response<Body>>;
/// The layers of every node's server stack: who may call what, then the
/// correction of oversized-message answers.
pub type NodeLayers = Stack<AuthorizeLayer, Stack<NodeLayer, Identity>>;
/// The server builder every node uses.
pub type NodeServer = Server<NodeLayers>;
/// A router built from [`server_builder`].
pub type NodeRouter = Router<NodeLayers>;

/// HTTP/2 flow-control windows. The defaults (64 KiB) cap a single stream
/// at a few hundred MB/s on loopback; bulk block streams need far more.
const STREAM_WINDOW_BYTES: u32 = 8 << 20;
const CONNECTION_WINDOW_BYTES: u32 = 32 << 20;

/// The largest HTTP/2 frame either side sends. The default (16 KiB) cuts a
/// 1 MiB block chunk into 64 frames, each with its own header and wake-up.
const MAX_FRAME_BYTES: u32 = 1 << 20;

/// The longest a unary call may take on the server before it is cancelled
/// with `DEADLINE_EXCEEDED` (streams are bounded by their own progress).
const SERVER_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Why a node could not start, serve or be reached. Each variant says
/// whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The listening address could not be bound (in use, no permission).
    /// Retryable once the address is free.
    #[error("binding {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    /// A peer address that is not a valid URI. Not retryable.
    #[error("{target:?} is not a valid address: {source}")]
    Address {
        target: String,
        source: tonic::transport::Error,
    },
    /// The compiled-in descriptor set does not hold what the node serves:
    /// a build defect, not retryable.
    #[error("the file descriptor set {problem}")]
    Descriptors { problem: String },
    /// The descriptor set could not be decoded: a build defect.
    #[error("decoding the file descriptor set: {0}")]
    DescriptorDecode(#[from] prost::DecodeError),
    /// Building gRPC reflection failed: a build defect.
    #[error("building gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The gRPC server failed while serving (the listener broke).
    #[error("serving gRPC: {0}")]
    Serve(#[source] tonic::transport::Error),
    /// The node never became ready; its starter was told why (see
    /// [`serve_when_ready`]).
    #[error("the node stopped before it became ready")]
    NotReady,
    /// The node's task panicked or was aborted.
    #[error("the node's task ended abnormally: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// A health probe could not connect. Retryable: the node may be
    /// starting.
    #[error("connecting to {target}: {source}")]
    Connect {
        target: String,
        source: tonic::transport::Error,
    },
    /// A health probe's call failed.
    #[error("health check of {target}: {}", status.message())]
    HealthCheck {
        target: String,
        status: Box<tonic::Status>,
    },
    /// The node's certificate or key could not be used for TLS. Not
    /// retryable.
    #[error("setting up TLS: {0}")]
    Tls(#[source] tonic::transport::Error),
    /// The node answered that it is not serving (yet). Retryable.
    #[error("{target} is {state}")]
    NotServing { target: String, state: &'static str },
}

/// The largest number of concurrent streams one client connection may open.
const MAX_CONCURRENT_STREAMS: u32 = 1024;

/// The most calls of one connection a node works on at once; the rest wait
/// their turn (they are not refused). The busiest caller, db-server, has at
/// most a few dozen calls in flight to the array (ledger workers, the
/// journal's writes, the resync's copies), so this only bounds a peer that
/// floods one connection.
const CONCURRENT_CALLS_PER_CONNECTION: usize = 256;

/// Where a running node can be reached and how to stop it.
pub struct NodeHandle {
    pub addr: SocketAddr,
    cancel: CancellationToken,
    task: JoinHandle<Result<(), NodeError>>,
}

impl NodeHandle {
    pub fn new(
        addr: SocketAddr,
        cancel: CancellationToken,
        task: JoinHandle<Result<(), NodeError>>,
    ) -> Self {
        Self { addr, cancel, task }
    }

    /// `http://addr`, for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The token that stops the node when cancelled.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stops the node and waits until it has stopped serving and its
    /// background work has ended.
    pub async fn shutdown(self) -> Result<(), NodeError> {
        self.cancel.cancel();
        self.wait().await
    }

    /// Waits until the node stops by itself (or is cancelled elsewhere).
    pub async fn wait(self) -> Result<(), NodeError> {
        self.task.await?
    }
}

/// A server builder with the settings every node uses: TLS with client
/// certificates of the cluster's CA (unless `security` is insecure), and
/// `policy` decided for every call before its handler runs.
pub fn server_builder(security: &Security, policy: AccessPolicy) -> Result<NodeServer, NodeError> {
    let mut builder = Server::builder();
    if let Some(tls) = security.server_tls() {
        builder = builder.tls_config(tls).map_err(NodeError::Tls)?;
    }
    Ok(builder
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .concurrency_limit_per_connection(CONCURRENT_CALLS_PER_CONNECTION)
        .max_frame_size(MAX_FRAME_BYTES)
        .timeout(SERVER_REQUEST_TIMEOUT)
        // The span of every call served: it continues the caller's W3C
        // trace context (see `telemetry`), and handlers record their fields
        // (run id, volume, LU, LBA range, bytes, mode) on it.
        .trace_fn(crate::telemetry::server_span)
        .layer(MapResponseLayer::new(
            oversized_is_resource_exhausted as fn(http::Response<Body>) -> http::Response<Body>,
        ))
        .layer(AuthorizeLayer::new(policy, security)))
}

/// gRPC and DESIGN §6 answer a message over the size limit with
/// `RESOURCE_EXHAUSTED`; tonic answers `OUT_OF_RANGE`, the code splitmirror
/// keeps for "beyond the end of the LU". The refusal comes before the
/// handler runs, as a trailers-only response, so its code is in the
/// headers and can be corrected here, once for every node. A node's own
/// `OUT_OF_RANGE` always carries [`Reason::BeyondEnd`]; one without it
/// came from tonic, which answers that code for nothing else a node
/// receives (the message is not read; the 70 MiB test in `db_limits` and
/// the bad-input table in `array_io` hold both halves).
fn oversized_is_resource_exhausted(mut response: http::Response<Body>) -> http::Response<Body> {
    let Some(status) = tonic::Status::from_header_map(response.headers()) else {
        return response;
    };
    if status.code() == tonic::Code::OutOfRange && crate::reason::reason(&status).is_none() {
        let corrected = tonic::Status::resource_exhausted(format!(
            "the request message is over this service's size limit: {}",
            status.message()
        ));
        if corrected.add_header(response.headers_mut()).is_err() {
            tracing::warn!("could not rewrite an oversized request's status");
        }
    }
    response
}

/// Adds health and reflection to a router that already holds the node's
/// own services, marks `service_names` as serving, and serves until `cancel`
/// is cancelled.
pub async fn serve(
    router: NodeRouter,
    service_names: &[&str],
    listener: TcpListener,
    cancel: CancellationToken,
) -> Result<(), NodeError> {
    let (started, _) = tokio::sync::oneshot::channel::<Result<(), std::convert::Infallible>>();
    serve_when_ready(
        router,
        service_names,
        listener,
        cancel,
        async { Ok(()) },
        started,
    )
    .await
}

/// Like [`serve`], but the node becomes ready only when `ready` resolves:
/// until then health answers `NOT_SERVING` for the node (`""`) and for each
/// of `service_names` (whose calls should answer `UNAVAILABLE`, see
/// [`Starting`]). Once health says `SERVING`, `started` is told so. If
/// `ready` fails, `started` is given its error (typed as the node made it),
/// the node stops serving (cancelling `cancel`) and answers
/// [`NodeError::NotReady`].
pub async fn serve_when_ready<F, E>(
    router: NodeRouter,
    service_names: &[&str],
    listener: TcpListener,
    cancel: CancellationToken,
    ready: F,
    started: tokio::sync::oneshot::Sender<Result<(), E>>,
) -> Result<(), NodeError>
where
    F: Future<Output = Result<(), E>>,
{
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    for name in std::iter::once(&"").chain(service_names) {
        health_reporter
            .set_service_status(*name, tonic_health::ServingStatus::NotServing)
            .await;
    }
    let own_files = descriptor_set_of(crate::FILE_DESCRIPTOR_SET, service_names)?;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(&own_files)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(&own_files)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let router = add_unserved(router, service_names)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let incoming = TcpListenerStream::new(listener).map(|stream| {
        let stream = stream?;
        // Small requests (4 KiB writes, acknowledgements) must not wait for
        // Nagle's algorithm.
        stream.set_nodelay(true)?;
        Ok::<_, std::io::Error>(stream)
    });
    let serving = router.serve_with_incoming_shutdown(incoming, cancel.clone().cancelled_owned());
    tokio::pin!(serving);
    tokio::select! {
        served = &mut serving => {
            return served.map_err(NodeError::Serve);
        }
        outcome = ready => match outcome {
            Ok(()) => {
                for name in std::iter::once(&"").chain(service_names) {
                    health_reporter
                        .set_service_status(*name, tonic_health::ServingStatus::Serving)
                        .await;
                }
                let _ = started.send(Ok(()));
            }
            Err(e) => {
                let _ = started.send(Err(e));
                cancel.cancel();
                if let Err(serve_error) = serving.await {
                    tracing::warn!("stopping the gRPC server: {serve_error}");
                }
                return Err(NodeError::NotReady);
            }
        },
    }
    serving.await.map_err(NodeError::Serve)
}

/// A node's own service while the node starts: every call answers
/// `UNAVAILABLE` with the reason given to [`Starting::new`] until
/// [`Starting::ready`] hands over the real service, after which every call
/// goes to it. Clones share the slot.
pub struct Starting<S> {
    slot: Arc<OnceLock<S>>,
    waiting: Arc<str>,
}

impl<S> Clone for Starting<S> {
    fn clone(&self) -> Self {
        Self {
            slot: self.slot.clone(),
            waiting: self.waiting.clone(),
        }
    }
}

impl<S> Starting<S> {
    /// `waiting` says what the node waits for, e.g. "waiting for the array
    /// at http://…".
    pub fn new(waiting: impl Into<String>) -> Self {
        Self {
            slot: Arc::new(OnceLock::new()),
            waiting: Arc::from(waiting.into()),
        }
    }

    /// Hands over the real service; later calls go to it. A second call
    /// changes nothing.
    pub fn ready(&self, service: S) {
        let _ = self.slot.set(service);
    }
}

impl<S: NamedService> NamedService for Starting<S> {
    const NAME: &'static str = S::NAME;
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl<S> tower::Service<http::Request<Body>> for Starting<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The inner service is made ready per call (`oneshot`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        match self.slot.get() {
            Some(service) => Box::pin(service.clone().oneshot(request)),
            None => {
                let status = tonic::Status::unavailable(self.waiting.to_string());
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// Which node serves each splitmirror service, for the answer to a call
/// that reaches the wrong node.
const SPLITMIRROR_SERVICES: [(&str, &str); 3] = [
    (
        crate::array::v1::array_service_server::SERVICE_NAME,
        "array-node",
    ),
    (crate::db::v1::db_service_server::SERVICE_NAME, "db-server"),
    (
        crate::backup::v1::backup_service_server::SERVICE_NAME,
        "backup-server",
    ),
];

/// Routes the splitmirror services this node does not serve to an answer
/// that says so, instead of tonic's `UNIMPLEMENTED` with an empty message.
fn add_unserved(router: NodeRouter, service_names: &[&str]) -> NodeRouter {
    let node = SPLITMIRROR_SERVICES
        .iter()
        .find(|(service, _)| service_names.contains(service))
        .map_or("this node", |(_, node)| node);
    let message = |service: &str| -> Arc<str> {
        let owner = SPLITMIRROR_SERVICES
            .iter()
            .find(|(s, _)| *s == service)
            .map_or("another node", |(_, node)| node);
        Arc::from(format!(
            "{node} does not serve {service} (it serves {}); ask {owner}",
            service_names.join(", ")
        ))
    };
    let mut router = router;
    if !service_names.contains(&ArrayServiceName::NAME) {
        router = router.add_service(Unserved::<ArrayServiceName>::new(message(
            ArrayServiceName::NAME,
        )));
    }
    if !service_names.contains(&DbServiceName::NAME) {
        router = router.add_service(Unserved::<DbServiceName>::new(message(DbServiceName::NAME)));
    }
    if !service_names.contains(&BackupServiceName::NAME) {
        router = router.add_service(Unserved::<BackupServiceName>::new(message(
            BackupServiceName::NAME,
        )));
    }
    router
}

struct ArrayServiceName;
impl NamedService for ArrayServiceName {
    const NAME: &'static str = crate::array::v1::array_service_server::SERVICE_NAME;
}
struct DbServiceName;
impl NamedService for DbServiceName {
    const NAME: &'static str = crate::db::v1::db_service_server::SERVICE_NAME;
}
struct BackupServiceName;
impl NamedService for BackupServiceName {
    const NAME: &'static str = crate::backup::v1::backup_service_server::SERVICE_NAME;
}

/// A splitmirror service routed on a node that does not serve it.
struct Unserved<N> {
    message: Arc<str>,
    _name: PhantomData<fn() -> N>,
}

impl<N> Clone for Unserved<N> {
    fn clone(&self) -> Self {
        Self {
            message: self.message.clone(),
            _name: PhantomData,
        }
    }
}

impl<N> Unserved<N> {
    fn new(message: Arc<str>) -> Self {
        Self {
            message,
            _name: PhantomData,
        }
    }
}

impl<N: NamedService> NamedService for Unserved<N> {
    const NAME: &'static str = N::NAME;
}

impl<N> tower::Service<http::Request<Body>> for Unserved<N> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: http::Request<Body>) -> Self::Future {
        std::future::ready(Ok(
            tonic::Status::unimplemented(self.message.to_string()).into_http()
        ))
    }
}

/// The heads of a `FileDescriptorSet`: just enough of `descriptor.proto` to
/// pick files by the services they define, keeping each file's bytes as
/// they are.
#[derive(Clone, PartialEq, prost::Message)]
struct RawFileSet {
    #[prost(bytes = "vec", repeated, tag = "1")]
    file: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct FileHead {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    package: String,
    #[prost(string, repeated, tag = "3")]
    dependency: Vec<String>,
    #[prost(message, repeated, tag = "6")]
    service: Vec<ServiceHead>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ServiceHead {
    #[prost(string, tag = "1")]
    name: String,
}

/// The files of `encoded_set` that define one of `service_names`, with the
/// files they import, as an encoded `FileDescriptorSet`: what one node's
/// reflection serves, so that it lists only its own services.
pub fn descriptor_set_of(encoded_set: &[u8], service_names: &[&str]) -> Result<Vec<u8>, NodeError> {
    use prost::Message as _;
    let set = RawFileSet::decode(encoded_set)?;
    let heads = set
        .file
        .iter()
        .map(|raw| FileHead::decode(raw.as_slice()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut wanted: Vec<&str> = Vec::new();
    for service in service_names {
        let file = heads
            .iter()
            .find(|head| {
                head.service
                    .iter()
                    .any(|s| format!("{}.{}", head.package, s.name) == *service)
            })
            .ok_or_else(|| NodeError::Descriptors {
                problem: format!("defines no {service}"),
            })?;
        wanted.push(&file.name);
    }
    // The files they import, transitively.
    let mut next = 0;
    while next < wanted.len() {
        let name = wanted[next];
        if let Some(head) = heads.iter().find(|h| h.name == name) {
            for dependency in &head.dependency {
                if !wanted.contains(&dependency.as_str()) {
                    wanted.push(dependency);
                }
            }
        }
        next += 1;
    }
    let file = set
        .file
        .iter()
        .zip(&heads)
        .filter(|(_, head)| wanted.contains(&head.name.as_str()))
        .map(|(raw, _)| raw.clone())
        .collect();
    Ok(RawFileSet { file }.encode_to_vec())
}

/// Binds `addr` (use port 0 for an ephemeral port).
pub async fn bind(addr: &str) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Bind {
            addr: addr.to_string(),
            source,
        })
}

/// A lazily connecting channel to `target` (`host:port` or a URL), with the
/// same HTTP/2 windows as the servers. It reconnects by itself after the
/// peer restarts.
pub fn channel(target: &str) -> Result<Channel, NodeError> {
    Ok(endpoint(target)?.connect_lazy())
}

/// The endpoint behind [`channel`], for callers that want to connect eagerly.
pub fn endpoint(target: &str) -> Result<Endpoint, NodeError> {
    let url = if target.contains("://") {
        target.to_string()
    } else {
        format!("http://{target}")
    };
    Ok(Endpoint::from_shared(url.clone())
        .map_err(|source| NodeError::Address {
            target: url.clone(),
            source,
        })?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20)))
}

/// Asks a node's `grpc.health.v1.Health` whether `service` ("" = the whole
/// node) is serving, verifying that the node is `server_role` when
/// `security` is TLS. Used by tests, the console and container
/// healthchecks.
pub async fn probe_health(
    target: &str,
    service: &str,
    security: &Security,
    server_role: &str,
) -> Result<(), NodeError> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = security
        .endpoint(target, server_role)?
        .connect()
        .await
        .map_err(|source| NodeError::Connect {
            target: target.to_string(),
            source,
        })?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|status| NodeError::HealthCheck {
            target: target.to_string(),
            status: Box::new(status),
        })?;
    match response.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(NodeError::NotServing {
            target: target.to_string(),
            state: other.as_str_name(),
        }),
    }
}

/// Resolves when the process receives SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("listening for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!("listening for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

/// Cancels `cancel` when SIGINT or SIGTERM arrives.
pub async fn cancel_on_signal(cancel: CancellationToken) {
    tokio::select! {
        () = shutdown_signal() => {
            tracing::info!("signal received, shutting down");
            cancel.cancel();
        }
        () = cancel.cancelled() => {}
    }
}

/// Serves until SIGINT or SIGTERM, then shuts the node down cleanly: what
/// every node binary does once its node is started.
pub async fn serve_until_signal(handle: NodeHandle, name: &str) -> Result<(), NodeError> {
    cancel_on_signal(handle.cancel_token()).await;
    handle.shutdown().await?;
    tracing::info!("{name} stopped");
    Ok(())
}

/// The exit code of a binary's `main`: failure is printed as one line of
/// context on stderr (no backtrace, whatever `RUST_BACKTRACE` says).
pub fn exit_code<E: std::fmt::Display>(result: Result<(), E>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs to stderr as text, filtered by `RUST_LOG` (default `info`), with
/// no export: for tests and tools. Programs use [`crate::telemetry::init`].
pub fn init_tracing() {
    init_tracing_with_default("info");
}

/// Logs to stderr as text, filtered by `RUST_LOG`, else by
/// `default_filter`. Coloured only on a terminal. A second initialisation
/// (tests, the embedded demo) is harmless.
pub fn init_tracing_with_default(default_filter: &'static str) {
    let config = crate::telemetry::TelemetryConfig {
        default_filter,
        endpoint: Some(String::new()),
        ..crate::telemetry::TelemetryConfig::new("splitmirror", Default::default())
    };
    // Without an endpoint nothing can fail.
    let _ = crate::telemetry::init(config);
}

/// Whether logs on stderr are coloured: only on a terminal, and never when
/// `NO_COLOR` is set to anything non-empty (<https://no-color.org>).
pub fn log_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|value| value.is_empty())
}

#[cfg(test)]
mod log_colour_tests {
    use super::log_colour;
    use std::ffi::OsStr;

    #[test]
    fn logs_are_coloured_only_on_a_terminal_without_no_color() {
        assert!(log_colour(true, None));
        assert!(log_colour(true, Some(OsStr::new(""))));
        assert!(!log_colour(true, Some(OsStr::new("1"))));
        assert!(!log_colour(false, None));
        assert!(!log_colour(false, Some(OsStr::new("1"))));
    }
}

#[cfg(test)]
mod descriptor_tests {
    use super::*;

    /// The names of the services a descriptor set defines.
    fn services(encoded: &[u8]) -> Vec<String> {
        use prost::Message as _;
        let set = RawFileSet::decode(encoded).expect("set");
        let mut names: Vec<String> = set
            .file
            .iter()
            .map(|raw| FileHead::decode(raw.as_slice()).expect("file"))
            .flat_map(|head| {
                head.service
                    .into_iter()
                    .map(move |s| format!("{}.{}", head.package, s.name))
            })
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_nodes_descriptor_set_holds_only_its_own_service() {
        assert_eq!(services(crate::FILE_DESCRIPTOR_SET).len(), 3);
        for (service, _) in SPLITMIRROR_SERVICES {
            let own = descriptor_set_of(crate::FILE_DESCRIPTOR_SET, &[service]).expect("own set");
            assert_eq!(services(&own), [service]);
        }
        assert!(descriptor_set_of(crate::FILE_DESCRIPTOR_SET, &["no.such.Service"]).is_err());
    }
}
