//! db-server's codes, limits and answers (issue 11): the suspend lease and
//! its cap, writes over the array's limit, messages over the gRPC limit,
//! start-up while the array is down, run ids, `Status` without its
//! histogram, and reflection that lists only a node's own services.

use std::process::{Child, Stdio};
use std::time::Duration;

use array_node::{ArrayNodeConfig, ArrayTestHooks};
use db_server::manager::ManagerConfig;
use splitmirror_proto::db::v1 as pb;
use splitmirror_proto::node::{self, MAX_ARRAY_REQUEST_BYTES, MAX_MESSAGE_BYTES};
use splitmirror_proto::security::role;
use tonic::Code;

use splitmirror_proto::reason::Reason;

use crate::harness::{self, ClientError, DbClient, ErrorKind, db_client, start_array, start_db};

const LU_BYTES: u64 = 64 << 20;

/// An array with two 64 MiB pairs and a db-server without a ledger.
async fn cluster(dir: &std::path::Path) -> (node::NodeHandle, node::NodeHandle, DbClient) {
    let array = start_array(
        &dir.join("array"),
        harness::small_array(LU_BYTES),
        ArrayTestHooks::default(),
    )
    .await;
    let db = start_db(
        &array.url(),
        &dir.join("db"),
        ManagerConfig::default(),
        None,
    )
    .await;
    let client = db_client(&db.url());
    (array, db, client)
}

/// Writes `bytes` of a pattern to volume 0's data LU at `lba`.
async fn write(client: &DbClient, lba: u64, bytes: u64) -> Result<u64, ClientError> {
    client
        .write(0, pb::VirtualLu::Data, lba, vec![0xa5; bytes as usize])
        .await
}

/// A raw request of `bytes` bytes, for messages no typed client sends.
fn write_request(lba: u64, bytes: u64) -> pb::VolumeWriteRequest {
    pb::VolumeWriteRequest {
        mate: 0,
        volume: 0,
        target: pb::VirtualLu::Data.into(),
        lba,
        data: vec![0xa5; bytes as usize],
    }
}

async fn status(client: &DbClient, include_latency_histogram: bool) -> pb::StatusResponse {
    client
        .status(include_latency_histogram)
        .await
        .expect("status")
}

/// A write over the array's limit is refused by db-server with
/// RESOURCE_EXHAUSTED naming the limit, before anything is recorded or sent:
/// no range in the update location table, no array call, nothing to
/// resync. (It used to come back INTERNAL from the array, with its range
/// recorded and resynced as a write of unknown outcome.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_over_the_arrays_limit_is_refused_before_it_is_recorded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_array, _db, client) = cluster(dir.path()).await;
    client.acquire_snapshot(0, "limits").await.expect("acquire");
    let before = status(&client, false).await;
    let writes_before = before.array_traffic.expect("traffic").write_calls;
    for bytes in [MAX_ARRAY_REQUEST_BYTES + 4096, 17 << 20, 40 << 20] {
        let refused = write(&client, 0, bytes)
            .await
            .expect_err("a write over the limit must be refused");
        assert_eq!(
            (refused.kind, refused.reason),
            (ErrorKind::ResourceExhausted, Some(Reason::TooLarge)),
            "{bytes} bytes: {refused:?}"
        );
        // The wording is the point here: the operator is told the limit.
        assert!(
            refused
                .message
                .contains(&MAX_ARRAY_REQUEST_BYTES.to_string()),
            "the answer names the limit: {}",
            refused.message
        );
    }
    let after = status(&client, false).await;
    let volume = &after.volumes[0];
    assert!(
        volume.dirty_ranges.is_empty() && volume.dirty_blocks == 0,
        "a refused write recorded {:?}",
        volume.dirty_ranges
    );
    assert_eq!(
        after.array_traffic.expect("traffic").write_calls,
        writes_before,
        "a refused write reached the array"
    );
    let deleted = client
        .delete_snapshot(0, "limits", false)
        .await
        .expect("delete");
    assert_eq!(deleted.ranges_to_resync, 0, "nothing to resync");
    harness::wait_synchronized(&client, 0).await;
    let resync = status(&client, false).await.volumes[0]
        .resync
        .expect("resync progress");
    assert_eq!(resync.bytes_done, 0, "a resync ran: {resync:?}");
    // Exactly at the limit is a write like any other.
    write(&client, 0, MAX_ARRAY_REQUEST_BYTES)
        .await
        .expect("a write at the limit");
}

/// A request message over the gRPC limit is refused before it is decoded,
/// with RESOURCE_EXHAUSTED (tonic itself says OUT_OF_RANGE) — on db-server
/// (64 MiB) and on the array (its decoding limit, twice its request limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_grpc_limit_is_resource_exhausted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (array, _db, client) = cluster(dir.path()).await;
    // Raw: a typed client refuses to encode a message over the limit, and
    // the point is what the server answers to one.
    let mut raw = client.raw().max_encoding_message_size(usize::MAX);
    let refused = raw
        .write(write_request(0, 70 << 20))
        .await
        .expect_err("70 MiB must be refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains(&MAX_MESSAGE_BYTES.to_string()),
        "the answer names the limit: {}",
        refused.message()
    );
    let mut array_client = harness::array_client(&array.url())
        .raw()
        .max_encoding_message_size(usize::MAX);
    let refused = array_client
        .write(splitmirror_proto::array::v1::WriteRequest {
            lu: 1,
            lba: 0,
            data: vec![0; 40 << 20],
            fua: false,
        })
        .await
        .expect_err("40 MiB must be refused by the array");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // The node still serves afterwards.
    let _ = status(&client, false).await;
}

/// A lease over the cap is INVALID_ARGUMENT naming the cap and changes
/// nothing; a second suspend renews the lease to the one it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_leases_are_capped_and_a_second_suspend_renews() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_array, _db, client) = cluster(dir.path()).await;
    for lease_ms in [u32::MAX, 60_001] {
        let refused = client
            .suspend(lease_ms)
            .await
            .expect_err("a lease over the cap");
        assert_eq!(
            (refused.kind, refused.reason),
            (ErrorKind::InvalidArgument, Some(Reason::LeaseOverCap)),
            "{refused:?}"
        );
        // The wording is the point here: the operator is told the cap.
        assert!(
            refused.message.contains("60000 ms"),
            "names the cap: {}",
            refused.message
        );
    }
    let gate = status(&client, false).await.gate.expect("gate");
    assert!(!gate.suspended && gate.suspends == 0, "{gate:?}");

    let first = client.suspend(1_000).await.expect("suspend");
    assert_eq!((first.lease_ms, first.already_suspended), (1_000, false));
    let second = client.suspend(20_000).await.expect("renew");
    assert_eq!((second.lease_ms, second.already_suspended), (20_000, true));
    // Past the first lease: the lease answered last is the one in force.
    tokio::time::sleep(Duration::from_millis(1_800)).await;
    let gate = status(&client, false).await.gate.expect("gate");
    assert!(
        gate.suspended && gate.lease_expiries == 0,
        "the first lease ended the suspend: {gate:?}"
    );
    let resumed = client.resume().await.expect("resume");
    assert!(resumed.was_suspended);
}

/// Run ids that say nothing, hold control characters or are too long are
/// refused by AcquireSnapshot and DeleteSnapshot, and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blank_control_and_overlong_run_ids_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_array, _db, client) = cluster(dir.path()).await;
    let long = "r".repeat(splitmirror_proto::run_id::MAX_RUN_ID_BYTES + 1);
    for run_id in ["", "   ", "\t", "run\n2", "run\u{1b}[2J", long.as_str()] {
        let refused = client
            .acquire_snapshot(0, run_id)
            .await
            .expect_err("a bad run id must be refused");
        assert_eq!(
            refused.kind,
            ErrorKind::InvalidArgument,
            "{run_id:?}: {refused:?}"
        );
        let volume = harness::volume_status(&client, 0).await;
        assert_eq!(volume.data_mode(), pb::Mode::Synchronized, "{run_id:?}");
        assert!(volume.snapshot_holder.is_empty());
    }
    client.acquire_snapshot(0, "holder").await.expect("acquire");
    for run_id in ["   ", "hold\ner"] {
        let refused = client
            .delete_snapshot(0, run_id, true)
            .await
            .expect_err("a bad run id must be refused, even forced");
        assert_eq!(
            refused.kind,
            ErrorKind::InvalidArgument,
            "{run_id:?}: {refused:?}"
        );
    }
    assert_eq!(
        harness::volume_status(&client, 0).await.data_mode(),
        pb::Mode::Snapshot
    );
}

/// `Status` answers latency percentiles; the 192 buckets only on request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_answers_percentiles_and_the_histogram_only_on_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let array = start_array(
        &dir.path().join("array"),
        harness::small_array(LU_BYTES),
        ArrayTestHooks::default(),
    )
    .await;
    let ledger = db_server::ledger::LedgerConfig {
        accounts: 64,
        target_tps: 500,
        workers: 2,
        ..db_server::ledger::LedgerConfig::default()
    };
    let db = start_db(
        &array.url(),
        &dir.path().join("db"),
        ManagerConfig::default(),
        Some(ledger),
    )
    .await;
    let client = db_client(&db.url());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let ledger = loop {
        let ledger = status(&client, false).await.ledger.expect("ledger");
        if ledger.transactions_committed >= 20 {
            break ledger;
        }
        assert!(tokio::time::Instant::now() < deadline, "the ledger runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        ledger.latency_histogram.is_empty(),
        "buckets without asking: {}",
        ledger.latency_histogram.len()
    );
    assert!(
        0 < ledger.latency_p50_us
            && ledger.latency_p50_us <= ledger.latency_p90_us
            && ledger.latency_p90_us <= ledger.latency_p99_us
            && ledger.latency_p99_us <= ledger.latency_max_us,
        "{ledger:?}"
    );
    let full = status(&client, true).await.ledger.expect("ledger");
    assert_eq!(full.latency_histogram.len(), db_server::latency::BUCKETS);
    assert!(full.latency_histogram.iter().sum::<u64>() >= 20);
}

/// The services a node lists in reflection (v1).
async fn reflected_services(url: &str, server_role: &str) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let channel = harness::security(role::CONSOLE)
        .endpoint(url, server_role)
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(futures_util::stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let answer = answers
        .message()
        .await
        .expect("reflection answer")
        .expect("one answer");
    match answer.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            names
        }
        other => panic!("ListServices answered {other:?}"),
    }
}

/// Each node lists only what it serves, and a call to a splitmirror service
/// it does not serve answers UNIMPLEMENTED naming the node that does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_reflects_only_its_own_service() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (array, db, _client) = cluster(dir.path()).await;
    let backup = harness::start_backup(&array.url(), &db.url(), &dir.path().join("store")).await;
    for (url, own, role) in [
        (
            array.url(),
            "splitmirror.array.v1.ArrayService",
            role::ARRAY,
        ),
        (db.url(), "splitmirror.db.v1.DbService", role::DB),
        (
            backup.url(),
            "splitmirror.backup.v1.BackupService",
            role::BACKUP,
        ),
    ] {
        let services = reflected_services(&url, role).await;
        let splitmirror: Vec<&String> = services
            .iter()
            .filter(|s| s.starts_with("splitmirror."))
            .collect();
        assert_eq!(splitmirror, [own], "{url} lists {services:?}");
        assert!(
            services.iter().any(|s| s == "grpc.health.v1.Health"),
            "{services:?}"
        );
    }
    // The array does not serve DbService: the answer says who does.
    // Raw: the exact code and the wording shown to a person who pointed a
    // tool at the wrong node are the point.
    // With TLS the client checks it reached the array (its certificate),
    // as a tool pointed at the wrong port with the right CA would.
    let channel = harness::security(role::CONSOLE)
        .endpoint(&array.url(), role::ARRAY)
        .expect("endpoint")
        .connect_lazy();
    let refused = pb::db_service_client::DbServiceClient::new(channel)
        .status(pb::StatusRequest::default())
        .await
        .expect_err("the array does not serve DbService");
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
    assert!(
        refused.message().contains("array-node") && refused.message().contains("db-server"),
        "{}",
        refused.message()
    );
}

/// A loopback address nothing listens on (yet).
fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").to_string()
}

/// A db-server process, killed when dropped.
struct DbProcess {
    child: Child,
    log: std::path::PathBuf,
}

impl DbProcess {
    fn start(listen: &str, array: &str, data_dir: &std::path::Path, extra: &[&str]) -> Self {
        let log = data_dir.with_extension("log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = harness::command("db-server")
            .args(["--listen", listen, "--array", array, "--data-dir"])
            .arg(data_dir)
            .args(["--no-ledger"])
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("SPLITMIRROR_CRASH_AT")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start db-server");
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for DbProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Started while the array is down, db-server answers at once: health
/// NOT_SERVING, calls UNAVAILABLE saying what it waits for; once the array
/// comes up on that address it turns SERVING and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_server_serves_not_serving_until_the_array_comes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let array_addr = free_addr();
    let db_addr = free_addr();
    let db = DbProcess::start(&db_addr, &array_addr, &dir.path().join("db"), &[]);
    let db_url = format!("http://{db_addr}");
    // Health answers (NOT_SERVING) while the array is down.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match node::probe_health(
            &db_url,
            "",
            &harness::security(splitmirror_proto::security::role::CONSOLE),
            splitmirror_proto::security::role::DB,
        )
        .await
        {
            Err(node::NodeError::NotServing {
                state: "NOT_SERVING",
                ..
            }) => break,
            Ok(()) => panic!("SERVING without an array"),
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "no health answer while waiting: {e}; log: {}",
                db.log()
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = db_client(&db_url);
    let refused = client
        .status(false)
        .await
        .expect_err("no status without the array");
    assert_eq!(refused.kind, ErrorKind::Unavailable, "{refused:?}");
    assert!(refused.is_transient(), "a caller waits and retries");
    // The wording is the point here: the operator is told what db-server
    // waits for.
    assert!(
        refused
            .message
            .contains(&format!("waiting for the array at {array_addr}")),
        "{}",
        refused.message
    );
    // The array comes up on the address db-server waits for.
    let listener = node::bind(&array_addr)
        .await
        .expect("bind the array's address");
    let array = array_node::spawn(
        ArrayNodeConfig {
            data_dir: dir.path().join("array"),
            array: harness::small_array(LU_BYTES),
            hooks: ArrayTestHooks::default(),
            security: harness::security(role::ARRAY),
        },
        listener,
    )
    .await
    .expect("start array");
    harness::wait_healthy(&db_url, splitmirror_proto::security::role::DB).await;
    harness::wait_synchronized(&client, 0).await;
    let written = write(&client, 8, 4096)
        .await
        .expect("write once the array is there");
    assert_eq!(written, 1);
    drop(db);
    array.shutdown().await.expect("array shutdown");
}

/// With `--array-wait 1s` and no array, db-server gives up, says why in
/// its log, and exits non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_server_gives_up_waiting_for_the_array_and_says_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let array_addr = free_addr();
    let mut db = DbProcess::start(
        &free_addr(),
        &array_addr,
        &dir.path().join("db"),
        &["--array-wait", "1s"],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = db.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "db-server still waiting after 20 s with --array-wait 1s; log: {}",
            db.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "exited {status:?}");
    let log = db.log();
    assert!(
        log.contains(&format!("gave up waiting for the array at {array_addr}"))
            && log.contains("--array-wait"),
        "the log says why: {log}"
    );
}

/// `--array-wait` is documented in `--help`.
#[test]
fn array_wait_and_the_lease_cap_are_documented() {
    let output = harness::command("db-server")
        .arg("--help")
        .output()
        .expect("db-server --help");
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(
        help.contains("--array-wait") && help.contains("0 = for ever"),
        "{help}"
    );
    assert!(help.contains("--max-suspend-lease"), "{help}");
}
