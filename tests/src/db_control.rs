//! Who may control db-server and the backup server, over the wire with
//! mutual TLS (issue #14): the control methods only for the console
//! identity, read-only status for any identity of the cluster's CA,
//! nothing but health without a certificate; and the array's masking of
//! the frozen mate, which db-server drives.
//!
//! The scenarios that acquire, delete and resynchronize run twice (issue
//! #19): with db-server `--array-mode stateless` (db-server keeps the
//! pair's mode) and `stateful` (the array holds it: ModeSelect), the mode
//! in every failure's message ([`in_both_array_modes`]). Stateful, the
//! array's ModeSense must follow db-server's pair (SNAPSHOT while the
//! snapshot is held, RESYNCHRONIZING during its resync, SYNCHRONIZED
//! after), and the array itself must refuse a write to the frozen mate by
//! an identity the masking lets write it.

use std::panic::AssertUnwindSafe;

use array_node::ArrayTestHooks;
use array_node::access::Access;
use db_server::manager::{ArrayModeKeeping, ManagerConfig};
use futures_util::FutureExt;
use splitmirror_proto::array::v1::MirrorMode;
use splitmirror_proto::backup::v1 as bpb;
use splitmirror_proto::db::v1 as dpb;
use splitmirror_proto::node::NodeHandle;
use splitmirror_proto::reason::Reason;
use splitmirror_proto::security::role;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::harness::{
    self, BackupClient, DbClient, ErrorKind, array_client, backup_client, db_client, follow_backup,
    start_array, start_backup, start_db,
};

const LU_BYTES: u64 = 8 << 20;
const BLOCK: usize = 4096;

struct Cluster {
    array: NodeHandle,
    db: NodeHandle,
    backup: NodeHandle,
}

async fn cluster(dir: &std::path::Path) -> Cluster {
    cluster_with(
        dir,
        harness::small_array(LU_BYTES),
        ManagerConfig::default(),
    )
    .await
}

async fn cluster_with(
    dir: &std::path::Path,
    array: array_node::ArrayConfig,
    manager: ManagerConfig,
) -> Cluster {
    let array = start_array(&dir.join("array"), array, ArrayTestHooks::default()).await;
    let db = start_db(&array.url(), &dir.join("db"), manager, None).await;
    let backup = start_backup(&array.url(), &db.url(), &dir.join("store")).await;
    Cluster { array, db, backup }
}

/// Both ways of keeping the pair's mode.
const ARRAY_MODES: [ArrayModeKeeping; 2] =
    [ArrayModeKeeping::Stateless, ArrayModeKeeping::Stateful];

/// Runs `scenario` once per [`ARRAY_MODES`] (each on its own cluster), and
/// names the mode in the failure of either.
async fn in_both_array_modes<F, Fut>(scenario: F)
where
    F: Fn(ArrayModeKeeping) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for mode in ARRAY_MODES {
        eprintln!("--array-mode {mode}");
        if let Err(panic) = AssertUnwindSafe(scenario(mode)).catch_unwind().await {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("with db-server --array-mode {mode}: {message}");
        }
    }
}

/// db-server's manager with `mode`.
fn manager(mode: ArrayModeKeeping) -> ManagerConfig {
    ManagerConfig {
        array_mode: mode,
        ..ManagerConfig::default()
    }
}

/// Stateful only: the array's mode of mirror LU 0 (ModeSense, as
/// db-server's identity) is `expected`, and db-server's Status says the
/// array keeps it and holds the same. Stateless: the array holds
/// HOST_MANAGED and Status says STATELESS.
async fn assert_array_mode(
    nodes: &Cluster,
    mode: ArrayModeKeeping,
    expected: (MirrorMode, bool),
    when: &str,
) {
    let page = array_client(&nodes.array.url())
        .mode_sense(0)
        .await
        .expect("mode sense");
    let status = harness::volume_status(&db_client(&nodes.db.url()), 0).await;
    match mode {
        ArrayModeKeeping::Stateless => {
            assert_eq!(
                (page.mirror_mode, page.mate_writable),
                (MirrorMode::HostManaged, false),
                "{when}: the stateless array holds no mode"
            );
            assert_eq!(
                status.array_mode_keeping(),
                dpb::ArrayModeKeeping::Stateless,
                "{when}"
            );
        }
        ArrayModeKeeping::Stateful => {
            assert_eq!(
                (page.mirror_mode, page.mate_writable),
                expected,
                "{when}: the array's mode"
            );
            assert_eq!(
                status.array_mode_keeping(),
                dpb::ArrayModeKeeping::Stateful,
                "{when}"
            );
            let text = match expected {
                (MirrorMode::Synchronized, _) => "SYNCHRONIZED",
                (MirrorMode::Snapshot, false) => "SNAPSHOT",
                (MirrorMode::Snapshot, true) => "SNAPSHOT (mate writable)",
                (MirrorMode::Resynchronizing, _) => "RESYNCHRONIZING",
                other => panic!("no Status text for {other:?}"),
            };
            assert_eq!(status.array_mode, text, "{when}: Status's array mode");
        }
    }
}

/// The code a call answered (OK when it succeeded).
fn code<T>(answer: Result<tonic::Response<T>, tonic::Status>) -> Code {
    answer.map_or_else(|status| status.code(), |_| Code::Ok)
}

/// What must not change when a control call is refused.
#[derive(Debug, PartialEq)]
struct Observed {
    suspended: bool,
    suspends: u64,
    modes: Vec<(i32, String)>,
    write_calls: u64,
}

async fn observe(client: &DbClient) -> Observed {
    let status = client.status(false).await.expect("status");
    let gate = status.gate.expect("gate");
    Observed {
        suspended: gate.suspended,
        suspends: gate.suspends,
        modes: status
            .volumes
            .iter()
            .map(|v| (v.data_mode, v.snapshot_holder.clone()))
            .collect(),
        write_calls: status.array_traffic.expect("traffic").write_calls,
    }
}

/// The backup server's identity may read status and ask for snapshots, as
/// its jobs must, and nothing else: every control call is
/// PERMISSION_DENIED and changes nothing. The console may do all of it:
/// acquire, back up, delete, resynchronize (in both array modes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_console_controls_db_server_and_the_backup_server() {
    in_both_array_modes(only_the_console_controls).await;
}

async fn only_the_console_controls(mode: ArrayModeKeeping) {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = cluster_with(dir.path(), harness::small_array(LU_BYTES), manager(mode)).await;
    assert_array_mode(&nodes, mode, (MirrorMode::Synchronized, false), "at start").await;
    let console_db = db_client(&nodes.db.url());
    let console_backup = backup_client(&nodes.backup.url());
    let as_backup = harness::security(role::BACKUP);
    let backup_db = DbClient::new(&nodes.db.url(), &as_backup).expect("address");
    let backup_backup = BackupClient::new(&nodes.backup.url(), &as_backup).expect("address");

    let before = observe(&console_db).await;
    let mut raw = backup_db.raw();
    let denied = [
        (
            "Suspend",
            code(raw.suspend(dpb::SuspendRequest { lease_ms: 1_000 }).await),
        ),
        ("Resume", code(raw.resume(dpb::ResumeRequest {}).await)),
        (
            "AcquireSnapshot",
            code(
                raw.acquire_snapshot(dpb::AcquireSnapshotRequest {
                    volume: 0,
                    run_id: "intruder".into(),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "DeleteSnapshot",
            code(
                raw.delete_snapshot(dpb::DeleteSnapshotRequest {
                    mate: 0,
                    volume: 0,
                    run_id: String::new(),
                    force: true,
                })
                .await,
            ),
        ),
        (
            "Write",
            code(
                raw.write(dpb::VolumeWriteRequest {
                    mate: 0,
                    volume: 0,
                    target: dpb::VirtualLu::Data.into(),
                    lba: 0,
                    data: vec![0xee; BLOCK],
                })
                .await,
            ),
        ),
        (
            "Read",
            code(
                raw.read(dpb::VolumeReadRequest {
                    mate: 0,
                    volume: 0,
                    target: dpb::VirtualLu::Data.into(),
                    lba: 0,
                    blocks: 1,
                })
                .await,
            ),
        ),
    ];
    for (method, code) in denied {
        assert_eq!(code, Code::PermissionDenied, "db-server {method}");
    }
    assert_eq!(
        observe(&console_db).await,
        before,
        "a refused call changed db-server"
    );
    let status = backup_db
        .status(false)
        .await
        .expect("status for any identity");
    assert_eq!(status.volumes.len(), before.modes.len());
    let no_snapshot = backup_db
        .get_snapshot(0)
        .await
        .expect_err("no snapshot yet");
    assert_eq!(
        no_snapshot.kind,
        ErrorKind::FailedPrecondition,
        "{no_snapshot:?}"
    );

    let mut raw = backup_backup.raw();
    let id = "0190d3c4-0000-7000-8000-000000000000".to_string();
    let denied = [
        (
            "StartBackup",
            code(
                raw.start_backup(bpb::StartBackupRequest {
                    run_id: "intruder".into(),
                    lu: 2,
                    live: true,
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "CancelBackup",
            code(
                raw.cancel_backup(bpb::BackupIdRequest {
                    backup_id: id.clone(),
                })
                .await,
            ),
        ),
        (
            "VerifyBackup",
            code(
                raw.verify_backup(bpb::BackupIdRequest {
                    backup_id: id.clone(),
                })
                .await,
            ),
        ),
    ];
    for (method, code) in denied {
        assert_eq!(code, Code::PermissionDenied, "backup server {method}");
    }
    assert!(
        backup_backup
            .list_backups()
            .await
            .expect("list for any identity")
            .is_empty(),
        "a refused StartBackup started a backup"
    );
    let unknown = backup_backup
        .get_backup(&id, false)
        .await
        .expect_err("no such backup");
    assert_eq!(unknown.kind, ErrorKind::NotFound, "{unknown:?}");

    // The console may do all of it, and the backup server's identity then
    // sees the snapshot its jobs copy.
    console_db.suspend(5_000).await.expect("suspend");
    console_db.resume().await.expect("resume");
    console_db
        .write(0, dpb::VirtualLu::Data, 0, vec![0x5a; BLOCK])
        .await
        .expect("write");
    let acquired = console_db
        .acquire_snapshot(0, "control")
        .await
        .expect("acquire");
    let held = backup_db.get_snapshot(0).await.expect("get snapshot");
    assert_eq!(held.holder_run_id, "control");
    assert_array_mode(&nodes, mode, (MirrorMode::Snapshot, false), "while held").await;
    let started = console_backup
        .start_backup(bpb::StartBackupRequest {
            run_id: "control".into(),
            lu: acquired.mate_lu,
            snapshot: Some(bpb::SnapshotRef {
                mate: 0,
                volume: 0,
                holder_run_id: "control".into(),
            }),
            ..Default::default()
        })
        .await
        .expect("start backup");
    let last = follow_backup(&console_backup, &started.backup_id).await;
    assert_eq!(last.state, bpb::BackupState::Complete as i32, "{last:?}");
    assert!(
        console_backup
            .verify_backup(&started.backup_id)
            .await
            .expect("verify")
            .ok
    );
    console_backup
        .cancel_backup(&started.backup_id)
        .await
        .expect("cancel of a finished backup answers its state");
    console_db
        .delete_snapshot(0, "control", false)
        .await
        .expect("delete");
    harness::wait_synchronized(&console_db, 0).await;
    assert_array_mode(
        &nodes,
        mode,
        (MirrorMode::Synchronized, false),
        "after the resync",
    )
    .await;
    drop(nodes.array);
}

/// A TLS client without a certificate.
fn anonymous_channel(url: &str, server_role: &str) -> Channel {
    let ca = std::fs::read(harness::certs_dir().join("ca.pem")).expect("ca.pem");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(server_role);
    let host_port = url.split_once("://").map_or(url, |(_, rest)| rest);
    Channel::from_shared(format!("https://{host_port}"))
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect_lazy()
}

/// Without a certificate only health answers: every method of db-server
/// and of the backup server, read-only ones included, is UNAUTHENTICATED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_certificate_only_health_answers() {
    use splitmirror_proto::backup::v1::backup_service_client::BackupServiceClient;
    use splitmirror_proto::db::v1::db_service_client::DbServiceClient;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = cluster(dir.path()).await;
    let before = observe(&db_client(&nodes.db.url())).await;
    let db_channel = anonymous_channel(&nodes.db.url(), role::DB);
    let backup_channel = anonymous_channel(&nodes.backup.url(), role::BACKUP);

    for channel in [db_channel.clone(), backup_channel.clone()] {
        let health = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health answers without a certificate")
            .into_inner();
        assert_eq!(health.status, ServingStatus::Serving as i32);
    }

    let mut db = DbServiceClient::new(db_channel);
    let answers = [
        (
            "Status",
            code(
                db.status(dpb::StatusRequest {
                    include_latency_histogram: false,
                })
                .await,
            ),
        ),
        (
            "GetSnapshot",
            code(
                db.get_snapshot(dpb::GetSnapshotRequest { volume: 0, mate: 0 })
                    .await,
            ),
        ),
        (
            "Suspend",
            code(db.suspend(dpb::SuspendRequest { lease_ms: 1_000 }).await),
        ),
        (
            "AcquireSnapshot",
            code(
                db.acquire_snapshot(dpb::AcquireSnapshotRequest {
                    volume: 0,
                    run_id: "anonymous".into(),
                    ..Default::default()
                })
                .await,
            ),
        ),
    ];
    for (method, code) in answers {
        assert_eq!(code, Code::Unauthenticated, "db-server {method}");
    }
    let mut backup = BackupServiceClient::new(backup_channel);
    let answers = [
        (
            "ListBackups",
            code(backup.list_backups(bpb::ListBackupsRequest {}).await),
        ),
        (
            "StartBackup",
            code(
                backup
                    .start_backup(bpb::StartBackupRequest {
                        run_id: "anonymous".into(),
                        lu: 2,
                        live: true,
                        ..Default::default()
                    })
                    .await,
            ),
        ),
    ];
    for (method, code) in answers {
        assert_eq!(code, Code::Unauthenticated, "backup server {method}");
    }
    assert_eq!(observe(&db_client(&nodes.db.url())).await, before);
    assert!(
        backup_client(&nodes.backup.url())
            .list_backups()
            .await
            .expect("list")
            .is_empty()
    );
}

/// db-server has the array protect the frozen mate while a snapshot is
/// held — from db-server itself too — and gives it back before the resync
/// writes it: a direct write to the mate and a write to the snapshot
/// virtual LU are PERMISSION_DENIED (the masking, in both array modes)
/// and change no byte; after the delete the pair resynchronizes and the
/// mate is writable again. Stateful, the array's mode also refuses
/// (mirror-mode) the backup server's identity, which a [[grant]] lets
/// write the mate, and a read of the mate while it is resynchronized (the
/// resync is slowed so that it is seen).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mate_under_a_snapshot_is_read_only_even_for_db_server() {
    in_both_array_modes(the_mate_under_a_snapshot_is_protected).await;
}

/// Blocks written under the snapshot: the resync has this much to copy.
const DIRTY_BLOCKS: u64 = 512;

async fn the_mate_under_a_snapshot_is_protected(mode: ArrayModeKeeping) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut array = harness::small_array(LU_BYTES);
    array.grants.push(array_node::access::GrantConfig {
        identity: role::BACKUP.into(),
        lu: 2,
        access: Access::ReadWrite,
    });
    array.validate().expect("valid config");
    let slow_resync = ManagerConfig {
        resync_chunk_bytes: 128 << 10,
        resync_max_bytes_per_s: Some(1 << 20),
        ..manager(mode)
    };
    let nodes = cluster_with(dir.path(), array, slow_resync).await;
    let stateful = mode == ArrayModeKeeping::Stateful;
    let db = db_client(&nodes.db.url());
    let array = array_client(&nodes.array.url());
    let as_backup = harness::ArrayClient::new(&nodes.array.url(), &harness::security(role::BACKUP))
        .expect("array address");
    db.write(0, dpb::VirtualLu::Data, 0, vec![1; BLOCK])
        .await
        .expect("write");
    let acquired = db.acquire_snapshot(0, "masked").await.expect("acquire");
    let mate = acquired.mate_lu;
    assert_eq!(mate, 2);
    let frozen = harness::lu_digests(&array, mate).await;
    assert_array_mode(&nodes, mode, (MirrorMode::Snapshot, false), "while held").await;

    // db-server's own identity: the masking refuses it in both modes
    // (db-server masks the frozen mate read-only for itself either way).
    let refused = array
        .write(mate, 0, vec![2; BLOCK])
        .await
        .expect_err("the frozen mate is read-only for db-server's identity");
    assert_eq!(refused.kind, ErrorKind::PermissionDenied, "{refused:?}");
    if stateful {
        // An identity the masking lets write the mate: the array's mode
        // refuses it.
        let refused = as_backup
            .write(mate, 0, vec![6; BLOCK])
            .await
            .expect_err("the array's mode refuses whoever writes the frozen mate");
        assert_eq!(
            (refused.kind, refused.reason),
            (ErrorKind::FailedPrecondition, Some(Reason::MirrorMode)),
            "{refused:?}"
        );
    }
    let refused = db
        .write(0, dpb::VirtualLu::Snapshot, 0, vec![3; BLOCK])
        .await
        .expect_err("the snapshot virtual LU is read-only");
    assert_eq!(refused.kind, ErrorKind::PermissionDenied, "{refused:?}");
    assert_eq!(
        harness::lu_digests(&array, mate).await,
        frozen,
        "a byte changed"
    );
    let volume = harness::volume_status(&db, 0).await;
    assert!(volume.dirty_ranges.is_empty(), "{:?}", volume.dirty_ranges);

    // Data writes go on, to the origin: enough that the slowed resync
    // takes a couple of seconds.
    for lba in (8..8 + DIRTY_BLOCKS).step_by(128) {
        db.write(0, dpb::VirtualLu::Data, lba, vec![4; 128 * BLOCK])
            .await
            .expect("a data write under the snapshot");
    }
    assert_eq!(
        harness::lu_digests(&array, mate).await,
        frozen,
        "a data write reached the frozen mate"
    );
    db.delete_snapshot(0, "masked", false)
        .await
        .expect("delete");
    // While Status says Resynchronizing (before and after the look), the
    // stateful array holds RESYNCHRONIZING and refuses a read of the mate.
    let mut seen_resynchronizing = false;
    for _ in 0..3 {
        if harness::volume_status(&db, 0).await.data_mode() != dpb::Mode::Resynchronizing {
            break;
        }
        let page = array.mode_sense(0).await.expect("mode sense");
        let read = array.read(mate, 0, 1).await;
        if harness::volume_status(&db, 0).await.data_mode() != dpb::Mode::Resynchronizing {
            break;
        }
        seen_resynchronizing = true;
        if stateful {
            assert_eq!(
                (page.mirror_mode, page.mate_writable),
                (MirrorMode::Resynchronizing, false),
                "during the resync"
            );
            let refused = read.expect_err("a read of the mate during its resync");
            assert_eq!(
                (refused.kind, refused.reason),
                (ErrorKind::FailedPrecondition, Some(Reason::MirrorMode)),
                "{refused:?}"
            );
        } else {
            assert_eq!(page.mirror_mode, MirrorMode::HostManaged);
            read.expect("stateless: the array lets db-server read the mate");
        }
    }
    assert!(seen_resynchronizing, "the slowed resync was never seen");
    harness::wait_synchronized(&db, 0).await;
    assert_array_mode(
        &nodes,
        mode,
        (MirrorMode::Synchronized, false),
        "after the resync",
    )
    .await;
    let origin_lu = harness::volume_status(&db, 0).await.origin_lu;
    let origin = harness::lu_digests(&array, origin_lu).await;
    assert_eq!(
        harness::lu_digests(&array, mate).await,
        origin,
        "resynchronized"
    );
    db.write(0, dpb::VirtualLu::Data, 0, vec![5; BLOCK])
        .await
        .expect("the mirror is writable again");
    if stateful {
        let refused = array
            .write(mate, 0, vec![7; BLOCK])
            .await
            .expect_err("synchronized: a write naming the mate is refused");
        assert_eq!(refused.reason, Some(Reason::MirrorMode), "{refused:?}");
    }
}
