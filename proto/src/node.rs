//! The server and client stacks every splitmirror node shares.
//!
//! A node builds its service, hands it to [`serve`] together with a bound
//! listener and a cancellation token, and gets health (`grpc.health.v1`),
//! reflection (`v1` and `v1alpha`, since grpcurl 1.8 asks for the latter),
//! tuned HTTP/2 windows, per-request tracing spans and graceful shutdown,
//! the same on every node. Clients connect through [`channel`], which applies
//! the matching window sizes.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Router;
use tonic::transport::{Channel, Endpoint, Server};

/// The largest gRPC message any node encodes or decodes. Services check
/// their own, smaller request limits first, so that an oversized request
/// gets `RESOURCE_EXHAUSTED` with a reason rather than a transport error.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

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

/// The largest number of concurrent streams one client connection may open.
const MAX_CONCURRENT_STREAMS: u32 = 1024;

/// Where a running node can be reached and how to stop it.
pub struct NodeHandle {
    pub addr: SocketAddr,
    cancel: CancellationToken,
    task: JoinHandle<Result<(), String>>,
}

impl NodeHandle {
    pub fn new(
        addr: SocketAddr,
        cancel: CancellationToken,
        task: JoinHandle<Result<(), String>>,
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
    pub async fn shutdown(self) -> Result<(), String> {
        self.cancel.cancel();
        self.wait().await
    }

    /// Waits until the node stops by itself (or is cancelled elsewhere).
    pub async fn wait(self) -> Result<(), String> {
        match self.task.await {
            Ok(result) => result,
            Err(join_error) => Err(format!("node task ended abnormally: {join_error}")),
        }
    }
}

/// A server builder with the settings every node uses.
pub fn server_builder() -> Server {
    Server::builder()
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_frame_size(MAX_FRAME_BYTES)
        .timeout(SERVER_REQUEST_TIMEOUT)
        .trace_fn(|request| tracing::debug_span!("grpc", path = %request.uri().path()))
}

/// Adds health and reflection to a router that already holds the node's
/// own services, marks `service_names` as serving, and serves until `cancel`
/// is cancelled.
pub async fn serve(
    router: Router,
    service_names: &[&str],
    listener: TcpListener,
    cancel: CancellationToken,
) -> Result<(), String> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    for name in service_names {
        health_reporter
            .set_service_status(*name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| format!("building reflection v1: {e}"))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| format!("building reflection v1alpha: {e}"))?;
    let router = router
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
    router
        .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
        .await
        .map_err(|e| format!("serving gRPC: {e}"))
}

/// Binds `addr` (use port 0 for an ephemeral port).
pub async fn bind(addr: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("binding {addr}: {e}"))
}

/// A lazily connecting channel to `target` (`host:port` or a URL), with the
/// same HTTP/2 windows as the servers. It reconnects by itself after the
/// peer restarts.
pub fn channel(target: &str) -> Result<Channel, String> {
    Ok(endpoint(target)?.connect_lazy())
}

/// The endpoint behind [`channel`], for callers that want to connect eagerly.
pub fn endpoint(target: &str) -> Result<Endpoint, String> {
    let url = if target.contains("://") {
        target.to_string()
    } else {
        format!("http://{target}")
    };
    Ok(Endpoint::from_shared(url.clone())
        .map_err(|e| format!("{url:?} is not a valid address: {e}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20)))
}

/// Asks a node's `grpc.health.v1.Health` whether `service` ("" = the whole
/// node) is serving. Used by tests, the console and container healthchecks.
pub async fn probe_health(target: &str, service: &str) -> Result<(), String> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = endpoint(target)?
        .connect()
        .await
        .map_err(|e| format!("connecting to {target}: {e}"))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|status| format!("health check of {target}: {}", status.message()))?;
    match response.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(format!("{target} is {}", other.as_str_name())),
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
pub async fn serve_until_signal(handle: NodeHandle, name: &str) -> Result<(), String> {
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

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    init_tracing_with_default("info");
}

/// Logs to stderr, filtered by `RUST_LOG`, else by `default_filter`.
pub fn init_tracing_with_default(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // A second initialisation (tests, the embedded demo) is harmless.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
