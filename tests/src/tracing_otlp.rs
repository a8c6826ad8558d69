//! Traces across the four programs: an in-process OTLP collector receives
//! the spans of a `console run` against node processes on loopback. The
//! spans of all four services carry the one trace id the console printed,
//! and their parent links form one tree. Without an endpoint nothing is
//! exported and no export thread runs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;

use crate::harness::{self, NodeProcess};

/// One span as the collector received it.
#[derive(Debug, Clone)]
struct ReceivedSpan {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

/// What the collector received.
#[derive(Debug, Default)]
struct Received {
    spans: Vec<ReceivedSpan>,
    metric_names: HashSet<String>,
}

/// An OTLP/gRPC collector in the test process that keeps what it receives.
#[derive(Debug, Clone, Default)]
struct Collector {
    received: Arc<Mutex<Received>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.received.lock().expect("received");
        for resource_spans in &request.get_ref().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .find(|attribute| attribute.key == "service.name")
                .and_then(|attribute| attribute.value.as_ref()?.value.as_ref())
                .map(|value| match value {
                    AnyValue::StringValue(name) => name.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for span in resource_spans
                .scope_spans
                .iter()
                .flat_map(|scope| &scope.spans)
            {
                received.spans.push(ReceivedSpan {
                    service: service.clone(),
                    name: span.name.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut received = self.received.lock().expect("received");
        for metric in request
            .get_ref()
            .resource_metrics
            .iter()
            .flat_map(|resource| &resource.scope_metrics)
            .flat_map(|scope| &scope.metrics)
        {
            received.metric_names.insert(metric.name.clone());
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

impl Collector {
    /// Serves on an ephemeral loopback port; answers its URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind collector");
        let addr = listener.local_addr().expect("collector address");
        let incoming = futures_util::stream::unfold(listener, |listener| async move {
            Some((listener.accept().await.map(|(s, _)| s), listener))
        });
        let collector = self.clone();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector.clone()))
                .add_service(MetricsServiceServer::new(collector))
                .serve_with_incoming(incoming)
                .await
                .expect("collector serves");
        });
        format!("http://{addr}")
    }

    fn spans(&self) -> Vec<ReceivedSpan> {
        self.received.lock().expect("received").spans.clone()
    }

    fn metric_names(&self) -> HashSet<String> {
        self.received.lock().expect("received").metric_names.clone()
    }
}

/// The three nodes as processes, with `env`.
struct Nodes {
    array: NodeProcess,
    db: NodeProcess,
    backup: NodeProcess,
    _dir: tempfile::TempDir,
}

fn start_nodes(env: &[(&str, &str)]) -> Nodes {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let array = NodeProcess::start_with_env(
        "array-node",
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &path("array"),
            "--lu-size",
            "8MiB",
        ],
        env,
    );
    // The ledger runs, slowly; its own transactions are not traced (a node
    // traces only what a traced caller asks).
    let db = NodeProcess::start_with_env(
        "db-server",
        &[
            "--listen",
            "127.0.0.1:0",
            "--array",
            &array.addr,
            "--data-dir",
            &path("db"),
            "--workload-tps",
            "50",
        ],
        env,
    );
    let backup = NodeProcess::start_with_env(
        "backup-server",
        &[
            "--listen",
            "127.0.0.1:0",
            "--array",
            &array.addr,
            "--db",
            &db.addr,
            "--store",
            &path("store"),
        ],
        env,
    );
    Nodes {
        array,
        db,
        backup,
        _dir: dir,
    }
}

impl Nodes {
    fn all(&mut self) -> [&mut NodeProcess; 3] {
        [&mut self.array, &mut self.db, &mut self.backup]
    }

    /// SIGTERM to each node, then waits for it to exit: a clean shutdown,
    /// which flushes what its exporter still holds.
    fn stop(&mut self) {
        for node in self.all() {
            let pid = rustix::process::Pid::from_raw(node.child.id() as i32).expect("pid");
            rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        }
        for node in self.all() {
            let status = node.wait_exit(Duration::from_secs(20));
            assert!(
                status.is_some_and(|s| s.success()),
                "{} did not stop cleanly: {status:?}",
                node.addr
            );
        }
    }

    /// The names of the export threads each node runs.
    fn export_threads(&self) -> Vec<Vec<String>> {
        [&self.array, &self.db, &self.backup]
            .iter()
            .map(|node| export_threads(node.child.id()))
            .collect()
    }
}

/// The threads of process `pid` the OpenTelemetry SDK started (the batch
/// span processor and the periodic metric reader).
fn export_threads(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .filter(|name| name.starts_with("OpenTelemetry"))
        .collect()
}

/// `console run --json` against `nodes`, with `env`; answers the report.
async fn console_run(nodes: &Nodes, env: &[(&str, &str)]) -> serde_json::Value {
    let mut command = harness::command("console");
    command
        .args(["--array", &nodes.array.addr])
        .args(["--db", &nodes.db.addr])
        .args(["--backup", &nodes.backup.addr])
        .args(["run", "--volume", "0", "--json"]);
    for (key, value) in env {
        command.env(key, value);
    }
    let out = tokio::task::spawn_blocking(move || command.output().expect("run console"))
        .await
        .expect("console task");
    assert!(
        out.status.success(),
        "console run: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON report")
}

/// Waits until `done` holds for the collector, or `timeout` passes.
async fn wait_for(
    collector: &Collector,
    timeout: Duration,
    done: impl Fn(&[ReceivedSpan]) -> bool,
) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline && !done(&collector.spans()) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const SERVICES: [&str; 4] = ["console", "db-server", "array-node", "backup-server"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_console_run_is_one_trace_across_the_four_programs() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_SERVICE_NAME", ""),
    ];
    let mut nodes = start_nodes(&env);
    for (threads, node) in nodes.export_threads().iter().zip(["array", "db", "backup"]) {
        assert!(
            !threads.is_empty(),
            "{node} exports but runs no export thread"
        );
    }
    let report = console_run(&nodes, &env).await;
    assert_eq!(report["verified"], true, "{report}");
    let trace_id = report["trace_id"]
        .as_str()
        .unwrap_or_else(|| panic!("the report has no trace id: {report}"))
        .to_string();
    assert_eq!(trace_id.len(), 32, "a W3C trace id: {trace_id}");

    // A grpcurl user's traceparent: the server's span joins that trace.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut raw = splitmirror_proto::db::v1::db_service_client::DbServiceClient::new(
        harness::security(splitmirror_proto::security::role::CONSOLE)
            .endpoint(&nodes.db.addr, splitmirror_proto::security::role::DB)
            .expect("endpoint")
            .connect_lazy(),
    );
    let mut request = tonic::Request::new(splitmirror_proto::db::v1::StatusRequest::default());
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{caller_trace}-{caller_span}-01")
            .parse()
            .expect("metadata"),
    );
    raw.status(request).await.expect("status");

    // A manual command is a trace of its own too.
    let mut status = harness::command("console");
    status
        .args(["--array", &nodes.array.addr])
        .args(["--db", &nodes.db.addr])
        .args(["--backup", &nodes.backup.addr])
        .args(["status", "--json"])
        .envs(env);
    let out = tokio::task::spawn_blocking(move || status.output().expect("console status"))
        .await
        .expect("console task");
    assert!(out.status.success(), "console status failed: {out:?}");

    // A clean stop flushes what the exporters hold (their batch delay is
    // 5 s; the nodes are stopped at once).
    nodes.stop();
    wait_for(&collector, Duration::from_secs(10), |spans| {
        let services: HashSet<&str> = spans
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .map(|s| s.service.as_str())
            .collect();
        SERVICES.iter().all(|s| services.contains(s))
            && spans.iter().any(|s| s.trace_id == caller_trace)
    })
    .await;

    let spans = collector.spans();
    let run: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    let mut per_service: BTreeMap<&str, usize> = BTreeMap::new();
    for span in &run {
        *per_service.entry(span.service.as_str()).or_default() += 1;
    }
    println!(
        "trace {trace_id}: {} spans per service {per_service:?} ({} spans received in all)",
        run.len(),
        spans.len()
    );
    for service in SERVICES {
        assert!(
            per_service.get(service).is_some_and(|n| *n > 0),
            "no span of {service} in the run's trace: {per_service:?}"
        );
    }
    // One tree: every parent is in the trace, and one root, the console's.
    let ids: HashMap<&str, &ReceivedSpan> = run.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    let roots: Vec<&&ReceivedSpan> = run.iter().filter(|s| s.parent_span_id.is_empty()).collect();
    let orphans: Vec<&&ReceivedSpan> = run
        .iter()
        .filter(|s| !s.parent_span_id.is_empty() && !ids.contains_key(s.parent_span_id.as_str()))
        .collect();
    assert!(
        orphans.is_empty(),
        "spans whose parent is missing: {orphans:#?}"
    );
    assert_eq!(roots.len(), 1, "one root: {roots:#?}");
    assert_eq!(roots[0].service, "console");
    assert_eq!(roots[0].name, "backup run");
    // Every node's spans hang under a span of another program: the context
    // crossed each hop.
    for service in ["db-server", "array-node", "backup-server"] {
        assert!(
            run.iter().any(|s| s.service == service
                && ids
                    .get(s.parent_span_id.as_str())
                    .is_some_and(|parent| parent.service != service)),
            "no {service} span is the child of another program's span"
        );
    }
    // The long phases have their spans.
    for phase in ["quiesce", "split", "backup job", "resync"] {
        assert!(
            run.iter().any(|s| s.name == phase),
            "no {phase:?} span in the run's trace"
        );
    }
    // The caller's traceparent was continued.
    assert!(
        spans.iter().any(|s| s.trace_id == caller_trace
            && s.parent_span_id == caller_span
            && s.service == "db-server"),
        "db-server's span of the call with a traceparent is not under it"
    );
    // The status command's root span has db-server's span under it.
    let command = spans
        .iter()
        .find(|s| s.service == "console" && s.name == "console command")
        .expect("no span of the console's status command");
    assert!(command.parent_span_id.is_empty(), "a command is a root");
    assert!(
        spans
            .iter()
            .any(|s| s.trace_id == command.trace_id && s.service == "db-server"),
        "db-server's spans of the status command are not in its trace"
    );
    // And metrics came too, flushed on shutdown.
    let metrics = collector.metric_names();
    for name in [
        "splitmirror.array.writes",
        "splitmirror.ledger.transactions",
        "splitmirror.freeze_window",
        "splitmirror.backup.bytes",
        "splitmirror.backup.throughput",
        "splitmirror.backup.store.bytes",
    ] {
        assert!(metrics.contains(name), "no {name} among {metrics:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_exported_and_no_export_thread_runs() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    // The endpoint is set but empty (as good as unset, whatever the test's
    // own environment says); the other OTLP variables name the collector,
    // so that anything a node exported would arrive there.
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", endpoint.as_str()),
    ];
    let mut nodes = start_nodes(&env);
    let report = console_run(&nodes, &env).await;
    assert_eq!(report["verified"], true, "{report}");
    assert!(
        report["trace_id"].is_null(),
        "a trace id without export: {report}"
    );
    let threads = nodes.export_threads();
    assert!(
        threads.iter().all(Vec::is_empty),
        "export threads without an endpoint: {threads:?}"
    );
    nodes.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(collector.spans().is_empty(), "spans were exported");
    assert!(collector.metric_names().is_empty(), "metrics were exported");
}

#[test]
fn bench_export_reports_both_modes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("figures.json");
    let out = harness::command("console")
        .args([
            "bench",
            "export",
            "--quick",
            "--size",
            "8MiB",
            "--seconds",
            "300ms",
            "--json",
        ])
        .arg(&json)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .output()
        .expect("console bench export");
    assert!(
        out.status.success(),
        "{} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let figures: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("figures")).expect("JSON");
    let f = &figures["figures"];
    for pointer in [
        "/ledger_tps/off",
        "/ledger_tps/on",
        "/backup_mb_per_s/off",
        "/backup_mb_per_s/on",
    ] {
        assert!(
            f.pointer(pointer)
                .and_then(serde_json::Value::as_f64)
                .is_some_and(|v| v > 0.0),
            "{pointer} in {f}"
        );
    }
}
