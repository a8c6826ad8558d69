//! `bench export`: what exporting traces and metrics over OTLP costs. The
//! ledger's transactions per second and a `console run`'s backup MB/s are
//! measured with export off and on, alternating in one process and one
//! cluster (target: on ≥ 0.95 × off).
//!
//! Export goes to `OTEL_EXPORTER_OTLP_ENDPOINT` when it is set, else to a
//! collector of the bench's own on loopback that decodes every request and
//! counts its spans and metric points (so that the export is real: encoded,
//! sent, answered). "Off" is export switched off at run time
//! ([`telemetry::set_export_enabled`]): no span reaches OpenTelemetry, no
//! metric is recorded, no trace context is sent — what a program without an
//! endpoint does, but for the layer that stays installed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use serde_json::json;
use splitmirror_proto::telemetry;
use tokio_util::sync::CancellationToken;

use super::common::{Bench, f1, f2, measure, table};
use super::{BenchOptions, BenchOutput};
use crate::progress::Quiet;
use crate::run::{RunOptions, backup_run};

/// Spans and metric data points the bench's own collector received.
static SPANS_RECEIVED: AtomicU64 = AtomicU64::new(0);
static POINTS_RECEIVED: AtomicU64 = AtomicU64::new(0);

/// A collector that counts what it receives and keeps nothing.
#[derive(Debug, Clone, Copy)]
struct CountingCollector;

#[tonic::async_trait]
impl TraceService for CountingCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|resource| &resource.scope_spans)
            .map(|scope| scope.spans.len())
            .sum();
        SPANS_RECEIVED.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for CountingCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let metrics: usize = request
            .get_ref()
            .resource_metrics
            .iter()
            .flat_map(|resource| &resource.scope_metrics)
            .map(|scope| scope.metrics.len())
            .sum();
        POINTS_RECEIVED.fetch_add(metrics as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// Where `bench export` exports to: `OTEL_EXPORTER_OTLP_ENDPOINT` if set,
/// else a counting collector it starts on loopback for the rest of the
/// process. Called before telemetry is set up.
pub async fn export_endpoint() -> anyhow::Result<String> {
    if let Ok(endpoint) = std::env::var(telemetry::OTLP_ENDPOINT_VARIABLE)
        && !endpoint.trim().is_empty()
    {
        return Ok(endpoint);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let incoming = tokio_stream_of(listener);
    tokio::spawn(async move {
        // A plain tonic server: the nodes' stack would trace the
        // collector's own calls and export them again.
        let served = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(CountingCollector))
            .add_service(MetricsServiceServer::new(CountingCollector))
            .serve_with_incoming(incoming)
            .await;
        if let Err(error) = served {
            eprintln!("the bench's OTLP collector stopped: {error}");
        }
    });
    Ok(format!("http://{addr}"))
}

/// The accepted connections of `listener`, as tonic serves them.
fn tokio_stream_of(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}

/// One measurement with export on or off.
#[derive(Debug, Clone, serde::Serialize)]
struct Sample {
    export: bool,
    ledger_tps: f64,
    backup_mb_per_s: f64,
}

pub async fn run(options: &BenchOptions) -> anyhow::Result<BenchOutput> {
    if !telemetry::export_enabled() {
        bail!(
            "export is not set up (the console sets it up for `bench export`; is telemetry initialised?)"
        );
    }
    let bench = Bench::with_busy_ledger(options.size_bytes).await?;
    // Off and on alternate, so that neither gains from going second.
    let rounds = if options.quick { 1 } else { 3 };
    let ledger_window = if options.quick {
        Duration::from_millis(300)
    } else {
        options.seconds
    };
    let spans_before = SPANS_RECEIVED.load(Ordering::Relaxed);
    let mut samples = Vec::new();
    let started = Instant::now();
    for _ in 0..rounds {
        for export in [false, true] {
            telemetry::set_export_enabled(export);
            let ledger = measure(&bench, ledger_window).await?;
            let report = backup_run(
                &bench.clients,
                &RunOptions {
                    volume: 0,
                    mate: 1,
                    keep_snapshot: false,
                    label: "bench export".into(),
                    max_bytes_per_s: options.max_rate,
                    cancel: CancellationToken::new(),
                    verify_read: false,
                },
                &Quiet,
            )
            .await;
            if !report.succeeded() {
                bail!("the run failed: {:?}", report.error);
            }
            if export != report.trace_id.is_some() {
                bail!(
                    "export {export} but the run's trace id is {:?}",
                    report.trace_id
                );
            }
            samples.push(Sample {
                export,
                ledger_tps: ledger.tps,
                backup_mb_per_s: report.throughput_mb_per_s,
            });
        }
    }
    telemetry::set_export_enabled(true);
    bench.shutdown().await?;
    let mean = |export: bool, figure: fn(&Sample) -> f64| {
        let chosen: Vec<f64> = samples
            .iter()
            .filter(|s| s.export == export)
            .map(figure)
            .collect();
        chosen.iter().sum::<f64>() / chosen.len().max(1) as f64
    };
    let tps = (mean(false, |s| s.ledger_tps), mean(true, |s| s.ledger_tps));
    let mbps = (
        mean(false, |s| s.backup_mb_per_s),
        mean(true, |s| s.backup_mb_per_s),
    );
    let ratio = |(off, on): (f64, f64)| on / off.max(1e-9);
    let rows = vec![
        vec!["ledger (tps)".into(), f1(tps.0), f1(tps.1), f2(ratio(tps))],
        vec![
            "backup (MB/s)".into(),
            f1(mbps.0),
            f1(mbps.1),
            f2(ratio(mbps)),
        ],
    ];
    let mut out = table(
        &[
            &format!("mean of {rounds}"),
            "export off",
            "export on",
            "on ÷ off",
        ],
        &rows,
    );
    // Only the bench's own collector counts what arrived.
    let spans = SPANS_RECEIVED.load(Ordering::Relaxed) - spans_before;
    out.push_str(&format!(
        "\n  target: on ÷ off ≥ 0.95; {} s in all; spans received by the bench's collector so far: {spans} (0 when exporting elsewhere)\n",
        f1(started.elapsed().as_secs_f64())
    ));
    Ok(BenchOutput {
        table: out,
        figures: json!({
            "rounds": rounds,
            "ledger_tps": {"off": tps.0, "on": tps.1, "ratio": ratio(tps)},
            "backup_mb_per_s": {"off": mbps.0, "on": mbps.1, "ratio": ratio(mbps)},
            "spans_received": spans,
            "metrics_received": POINTS_RECEIVED.load(Ordering::Relaxed),
            "samples": samples,
        }),
    })
}
