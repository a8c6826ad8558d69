//! Logs, traces and metrics, set up once for every splitmirror program.
//!
//! - Logs go to stderr, filtered by `RUST_LOG`, as readable text or, with
//!   `--log-format json`, one JSON object a line ([`LogFormat`]).
//! - Traces and metrics are exported over OTLP/gRPC only when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the standard `OTEL_*` variables
//!   apply: `OTEL_SERVICE_NAME` overrides the program's name,
//!   `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*`, `OTEL_METRIC_EXPORT_INTERVAL`
//!   …). Without it no exporter, no background export thread and no
//!   OpenTelemetry layer exist, and the recording functions below are one
//!   relaxed atomic load.
//! - W3C trace context travels in gRPC metadata on every call between
//!   nodes: [`TracedChannel`] (the channel of every typed client) opens a
//!   client span per call and writes its `traceparent`; [`server_span`]
//!   (the span of every call a node serves, see `node::server_builder`)
//!   continues the caller's trace. A grpcurl user who sends a `traceparent`
//!   header gets the server's spans under that trace.
//! - [`Telemetry::shutdown`] flushes what is pending. The tonic exporter's
//!   flush hangs when it is called on a runtime worker, so it runs on a
//!   blocking thread while the multi-thread runtime keeps the exporter's
//!   connection going.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::Channel;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::FilterExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The variable that turns export on (the standard OTLP one).
pub const OTLP_ENDPOINT_VARIABLE: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Readable lines, coloured on a terminal (the default).
    #[default]
    Text,
    /// One JSON object a line, with the fields of the spans it is in.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("{other:?} is not a log format (text or json)")),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

/// The `--log-format` option every program takes, the same everywhere
/// (`#[command(flatten)]` it into a binary's arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// How log lines are written to stderr: text (readable) or json (one
    /// object a line). Traces and metrics are exported over OTLP when
    /// OTEL_EXPORTER_OTLP_ENDPOINT is set (the console's run report then
    /// shows the run's trace id).
    #[arg(
        long,
        global = true,
        env = "SPLITMIRROR_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

/// What a program sets up at start.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// The service name traces and metrics carry unless `OTEL_SERVICE_NAME`
    /// says otherwise, e.g. "db-server".
    pub service_name: &'static str,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// The log filter when `RUST_LOG` is not set, e.g. "info".
    pub default_filter: &'static str,
    /// Where to export to; `None` reads `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// (export stays off when that is unset or empty).
    pub endpoint: Option<String>,
}

impl TelemetryConfig {
    /// Logs at `info` by default, export as the environment says.
    pub fn new(service_name: &'static str, log_format: LogFormat) -> Self {
        Self {
            service_name,
            log_format,
            default_filter: "info",
            endpoint: None,
        }
    }
}

/// Why telemetry could not be set up. None is retryable: the configuration
/// (the `OTEL_*` variables) must change.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (an endpoint that is not a URI,
    /// a bad `OTEL_EXPORTER_OTLP_*` setting).
    #[error("building the OTLP {signal} exporter: {source}")]
    Exporter {
        signal: &'static str,
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// The exporters of a running program, if export is on; flushed and
/// stopped by [`Telemetry::shutdown`].
#[derive(Debug, Default)]
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
}

/// Whether spans go to the OpenTelemetry layer and metrics are recorded:
/// true once export is set up, switched by [`set_export_enabled`].
static EXPORT_ENABLED: AtomicBool = AtomicBool::new(false);

/// The metric instruments, built only when export is set up.
static INSTRUMENTS: OnceLock<Instruments> = OnceLock::new();

/// Sets up logging and, when an endpoint is configured, OTLP export of
/// traces and metrics. Call once, inside a multi-thread tokio runtime; a
/// second call (tests, the embedded demo) leaves the first setup in place
/// and exports nothing itself.
pub fn init(config: TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(config.default_filter));
    let ansi = crate::node::log_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let fmt_layer = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let endpoint = config
        .endpoint
        .clone()
        .or_else(|| std::env::var(OTLP_ENDPOINT_VARIABLE).ok())
        .filter(|endpoint| !endpoint.trim().is_empty());
    let log_filter = filter.and(tracing_subscriber::filter::filter_fn(|metadata| {
        metadata.target() != RPC_TARGET
    }));
    let Some(endpoint) = endpoint else {
        let _ = tracing_subscriber::registry()
            .with(fmt_layer.with_filter(log_filter))
            .try_init();
        return Ok(Telemetry::default());
    };

    let resource = resource(config.service_name);
    let span_exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .build()
        .map_err(|source| TelemetryError::Exporter {
            signal: "trace",
            source,
        })?;
    let tracer_provider = SdkTracerProvider::builder()
        .with_batch_exporter(span_exporter)
        .with_resource(resource.clone())
        .build();
    let metric_exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|source| TelemetryError::Exporter {
            signal: "metrics",
            source,
        })?;
    let meter_provider = SdkMeterProvider::builder()
        .with_periodic_exporter(metric_exporter)
        .with_resource(resource)
        .build();

    let tracer = tracer_provider.tracer("splitmirror");
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(tracing_subscriber::filter::dynamic_filter_fn(
            |metadata, _| exported(metadata),
        ));
    let installed = tracing_subscriber::registry()
        .with(fmt_layer.with_filter(log_filter))
        .with(otel_layer)
        .try_init()
        .is_ok();
    if !installed {
        // Another setup came first; its layers stay, this one exports
        // nothing, so its providers are dropped unused.
        return Ok(Telemetry::default());
    }
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let _ = INSTRUMENTS.set(Instruments::new(&meter_provider));
    EXPORT_ENABLED.store(true, Ordering::Relaxed);
    tracing::info!(
        service = config.service_name,
        "exporting traces and metrics over OTLP"
    );
    Ok(Telemetry {
        tracer_provider: Some(tracer_provider),
        meter_provider: Some(meter_provider),
    })
}

/// The resource every span and metric carries: `OTEL_SERVICE_NAME` and
/// `OTEL_RESOURCE_ATTRIBUTES` as the SDK reads them, else `service_name`.
fn resource(service_name: &'static str) -> opentelemetry_sdk::Resource {
    let named_by_environment =
        std::env::var("OTEL_SERVICE_NAME").is_ok_and(|name| !name.is_empty());
    let builder = opentelemetry_sdk::Resource::builder();
    if named_by_environment {
        builder.build()
    } else {
        builder.with_service_name(service_name).build()
    }
}

/// Whether a span or event goes to the OpenTelemetry layer: while export
/// is on, everything at `info` or above except what the transport and the
/// exporter themselves log (exporting the exporter's spans would feed
/// itself).
fn exported(metadata: &tracing::Metadata<'_>) -> bool {
    const TRANSPORT: [&str; 6] = ["h2", "hyper", "tonic", "tower", "opentelemetry", "reqwest"];
    EXPORT_ENABLED.load(Ordering::Relaxed)
        && *metadata.level() <= tracing::Level::INFO
        && !TRANSPORT
            .iter()
            .any(|prefix| metadata.target().starts_with(prefix))
}

impl Telemetry {
    /// Whether this program exports traces and metrics.
    pub fn exporting(&self) -> bool {
        self.tracer_provider.is_some()
    }

    /// Flushes pending spans and metrics and stops the exporters (nothing
    /// to do when export is off). Runs the flush on a blocking thread: the
    /// tonic exporter needs the runtime's workers free to send.
    pub async fn shutdown(self) {
        if self.tracer_provider.is_none() && self.meter_provider.is_none() {
            return;
        }
        EXPORT_ENABLED.store(false, Ordering::Relaxed);
        let flushed = tokio::task::spawn_blocking(move || {
            if let Some(provider) = self.tracer_provider
                && let Err(error) = provider.shutdown_with_timeout(Duration::from_secs(5))
            {
                eprintln!("flushing traces: {error}");
            }
            if let Some(provider) = self.meter_provider
                && let Err(error) = provider.shutdown_with_timeout(Duration::from_secs(5))
            {
                eprintln!("flushing metrics: {error}");
            }
        })
        .await;
        if let Err(error) = flushed {
            eprintln!("flushing telemetry: {error}");
        }
    }
}

/// Switches export on or off while a program runs (the bench compares the
/// two in one process). Off, spans are not handed to OpenTelemetry and no
/// metric is recorded, as if no endpoint were set; does nothing unless
/// export was set up.
pub fn set_export_enabled(enabled: bool) {
    EXPORT_ENABLED.store(enabled && INSTRUMENTS.get().is_some(), Ordering::Relaxed);
}

/// Whether spans and metrics are exported right now.
pub fn export_enabled() -> bool {
    EXPORT_ENABLED.load(Ordering::Relaxed)
}

/// The W3C trace id of `span`, as 32 hex digits, if it is exported (none
/// when export is off).
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    if !export_enabled() {
        return None;
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

/// Where in a trace the current span is, kept to continue that trace from
/// work that outlives it (a backup job, a resync woken by a delete). Empty
/// when export is off.
#[derive(Debug, Clone, Default)]
pub struct TraceParent(Option<opentelemetry::Context>);

impl TraceParent {
    /// The current span's place in its trace.
    pub fn current() -> Self {
        if export_enabled() {
            Self(Some(tracing::Span::current().context()))
        } else {
            Self(None)
        }
    }

    /// Makes `span` (just created, not yet entered) a child of this place.
    pub fn adopt(&self, span: &tracing::Span) {
        if let Some(context) = &self.0 {
            let _ = span.set_parent(context.clone());
        }
    }
}

// ---------------------------------------------------------------------
// Metrics.

/// The instruments of every node, under the meter "splitmirror".
struct Instruments {
    array_writes: Counter<u64>,
    array_write_bytes: Counter<u64>,
    resync_bytes: Counter<u64>,
    resync_remaining_blocks: opentelemetry::metrics::Gauge<u64>,
    freeze_window: Histogram<f64>,
    backup_bytes: Counter<u64>,
    backup_throughput: Histogram<f64>,
    backup_store_bytes: opentelemetry::metrics::Gauge<u64>,
    ledger_transactions: Counter<u64>,
}

impl Instruments {
    fn new(provider: &SdkMeterProvider) -> Self {
        let meter = provider.meter("splitmirror");
        Self {
            array_writes: meter
                .u64_counter("splitmirror.array.writes")
                .with_description("Mirrored writes the array applied")
                .build(),
            array_write_bytes: meter
                .u64_counter("splitmirror.array.write.bytes")
                .with_unit("By")
                .with_description("Bytes the array wrote to mirror LUs")
                .build(),
            resync_bytes: meter
                .u64_counter("splitmirror.resync.bytes")
                .with_unit("By")
                .with_description("Bytes copied from origin to mate by resyncs")
                .build(),
            resync_remaining_blocks: meter
                .u64_gauge("splitmirror.resync.remaining_blocks")
                .with_description("Blocks a running resync still has to copy")
                .build(),
            freeze_window: meter
                .f64_histogram("splitmirror.freeze_window")
                .with_unit("ms")
                .with_description("How long writes were held while a pair was split")
                .build(),
            backup_bytes: meter
                .u64_counter("splitmirror.backup.bytes")
                .with_unit("By")
                .with_description("Bytes backups read and stored")
                .build(),
            backup_throughput: meter
                .f64_histogram("splitmirror.backup.throughput")
                .with_unit("By/s")
                .with_description("Throughput of each finished backup")
                .build(),
            backup_store_bytes: meter
                .u64_gauge("splitmirror.backup.store.bytes")
                .with_unit("By")
                .with_description("Bytes of images in the backup store after a backup")
                .build(),
            ledger_transactions: meter
                .u64_counter("splitmirror.ledger.transactions")
                .with_description("Ledger transactions committed")
                .build(),
        }
    }
}

/// The instruments, when metrics are recorded now.
fn instruments() -> Option<&'static Instruments> {
    if EXPORT_ENABLED.load(Ordering::Relaxed) {
        INSTRUMENTS.get()
    } else {
        None
    }
}

/// One mirrored write of `bytes` applied by the array.
pub fn record_array_write(bytes: u64) {
    if let Some(instruments) = instruments() {
        instruments.array_writes.add(1, &[]);
        instruments.array_write_bytes.add(bytes, &[]);
    }
}

/// A resync copied `bytes`; `remaining_blocks` are still to copy.
pub fn record_resync_progress(bytes: u64, remaining_blocks: u64) {
    if let Some(instruments) = instruments() {
        instruments.resync_bytes.add(bytes, &[]);
        instruments
            .resync_remaining_blocks
            .record(remaining_blocks, &[]);
    }
}

/// Writes were held for `window` while a pair was split.
pub fn record_freeze_window(window: Duration) {
    if let Some(instruments) = instruments() {
        instruments
            .freeze_window
            .record(window.as_secs_f64() * 1e3, &[]);
    }
}

/// A backup read and stored `bytes` more.
pub fn record_backup_bytes(bytes: u64) {
    if let Some(instruments) = instruments() {
        instruments.backup_bytes.add(bytes, &[]);
    }
}

/// A backup of `bytes` finished in `elapsed`; the store now holds
/// `store_bytes` of images, if known.
pub fn record_backup_finished(bytes: u64, elapsed: Duration, store_bytes: Option<u64>) {
    if let Some(instruments) = instruments() {
        let seconds = elapsed.as_secs_f64();
        if seconds > 0.0 {
            instruments
                .backup_throughput
                .record(bytes as f64 / seconds, &[]);
        }
        if let Some(store_bytes) = store_bytes {
            instruments.backup_store_bytes.record(store_bytes, &[]);
        }
    }
}

/// `count` ledger transactions committed.
pub fn record_ledger_transactions(count: u64) {
    if let Some(instruments) = instruments() {
        instruments.ledger_transactions.add(count, &[]);
    }
}

// ---------------------------------------------------------------------
// Trace context on the wire.

/// The target of the RPC spans. They go to OpenTelemetry only, never to
/// the log: a log line inside a call shows the long phase it belongs to,
/// and without export an RPC span is disabled outright (no cost per call).
pub const RPC_TARGET: &str = "splitmirror_rpc";

/// The fields every RPC span declares; handlers fill those that apply with
/// `tracing::Span::current().record(…)`.
macro_rules! rpc_span {
    ($name:literal, $kind:literal, $path:expr, $service:expr, $method:expr) => {
        tracing::info_span!(
            target: RPC_TARGET,
            $name,
            otel.name = %$path,
            otel.kind = $kind,
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = %$service,
            rpc.method = %$method,
            run_id = tracing::field::Empty,
            volume = tracing::field::Empty,
            lu = tracing::field::Empty,
            lba = tracing::field::Empty,
            blocks = tracing::field::Empty,
            bytes = tracing::field::Empty,
            mode = tracing::field::Empty,
            backup_id = tracing::field::Empty,
            peer.service = tracing::field::Empty,
        )
    };
}

/// Records on the current RPC span which blocks a call addresses: `lu`,
/// `lba` and `blocks`, and `bytes` when it carries data.
pub fn record_blocks(lu: u32, lba: u64, blocks: u64, bytes: Option<u64>) {
    let span = tracing::Span::current();
    span.record("lu", lu);
    span.record("lba", lba);
    span.record("blocks", blocks);
    if let Some(bytes) = bytes {
        span.record("bytes", bytes);
    }
}

/// `/pkg.Service/Method` as (service, method).
fn split_path(path: &str) -> (&str, &str) {
    let trimmed = path.trim_start_matches('/');
    trimmed.split_once('/').unwrap_or((trimmed, ""))
}

/// The span of a call a node serves, continuing the trace whose
/// `traceparent` the caller sent. It declares `run_id`, `volume`, `lu`,
/// `lba`, `blocks`, `bytes`, `mode` and `backup_id` for the handler to
/// record.
///
/// A call that is not part of a trace (no `traceparent`) gets no span: the
/// nodes trace what a traced caller asks (a `console run`, a grpcurl call
/// that sends `traceparent`), not their own background traffic. Without
/// that rule every ledger transaction's array writes would be exported as
/// traces of their own (about 7 spans per transaction), which cost the
/// ledger 20 % of its throughput in `bench export`.
pub fn server_span<B>(request: &http::Request<B>) -> tracing::Span {
    if !export_enabled() {
        return tracing::Span::none();
    }
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(request.headers()))
    });
    if !parent.span().span_context().is_valid() {
        return tracing::Span::none();
    }
    let path = request.uri().path();
    let (service, method) = split_path(path);
    let span = rpc_span!("grpc.server", "server", path, service, method);
    let _ = span.set_parent(parent);
    span
}

/// Whether the code running now is part of an exported trace: only then
/// does a call it makes get a client span and send `traceparent`.
fn in_a_trace() -> bool {
    export_enabled()
        && tracing::Span::current()
            .context()
            .span()
            .span_context()
            .is_valid()
}

/// The channel every typed client is built on: a tonic [`Channel`] that
/// opens a client span per call and sends its W3C trace context in the
/// call's metadata.
#[derive(Debug, Clone)]
pub struct TracedChannel {
    inner: Channel,
    peer: &'static str,
}

impl TracedChannel {
    /// Wraps `inner`, which calls the node `peer` ("db-server", …).
    pub fn new(inner: Channel, peer: &'static str) -> Self {
        Self { inner, peer }
    }
}

impl tower::Service<http::Request<Body>> for TracedChannel {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future = tracing::instrument::Instrumented<tonic::transport::channel::ResponseFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.inner, cx)
    }

    /// A call made inside a trace gets a client span and carries its
    /// context; any other call goes out as it is (see [`server_span`]).
    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        if !in_a_trace() {
            return self.inner.call(request).instrument(tracing::Span::none());
        }
        let path = request.uri().path().to_string();
        let (service, method) = split_path(&path);
        let span = rpc_span!("grpc.client", "client", path, service, method);
        span.record("peer.service", self.peer);
        let context = span.context();
        opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.inject_context(&context, &mut HeaderInjector(request.headers_mut()));
        });
        self.inner.call(request).instrument(span)
    }
}

/// Reads W3C trace context from gRPC metadata (HTTP/2 headers).
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Writes W3C trace context into gRPC metadata.
struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_formats_parse_and_print_alike() {
        for format in [LogFormat::Text, LogFormat::Json] {
            assert_eq!(format.to_string().parse::<LogFormat>(), Ok(format));
        }
        assert!("yaml".parse::<LogFormat>().is_err());
    }

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(
            split_path("/splitmirror.db.v1.DbService/Transact"),
            ("splitmirror.db.v1.DbService", "Transact")
        );
        assert_eq!(split_path("/odd"), ("odd", ""));
    }

    #[test]
    fn nothing_is_recorded_or_propagated_without_export() {
        assert!(!export_enabled());
        record_array_write(4096);
        assert!(trace_id(&tracing::info_span!("x")).is_none());
        set_export_enabled(true);
        assert!(
            !export_enabled(),
            "export cannot be switched on unless set up"
        );
    }
}
