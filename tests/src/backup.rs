//! The backup server against a real array: images equal their LU byte for
//! byte, manifests equal `ChecksumRange`, verification can fail, and crashes
//! of either node leave nothing that looks complete.

use std::os::unix::fs::MetadataExt;

use array_node::ArrayTestHooks;
use splitmirror_proto::array::v1 as apb;
use splitmirror_proto::backup::v1 as pb;

use crate::harness::{
    self, NodeProcess, array_client, backup_client, follow_backup, start_array, start_backup,
};

const BLOCK: usize = 4096;
const CHUNK_BLOCKS: u64 = 256;

async fn start(client: &mut harness::BackupClient, run_id: &str, lu: u32) -> (String, bool) {
    let r = client
        .start_backup(pb::StartBackupRequest {
            run_id: run_id.into(),
            lu,
            expected_block_count: None,
            label: "test".into(),
            ledger_sequence: Some(7),
            max_bytes_per_s: None,
        })
        .await
        .expect("start backup")
        .into_inner();
    (r.backup_id, r.already_started)
}

/// Fills the first `chunks` × 16 MiB of mate LU 2 with `byte`, so that a
/// copy of it has real work to do.
async fn fill_mate(client: &mut harness::ArrayClient, chunks: u64, byte: u8) {
    for chunk in 0..chunks {
        client
            .write(apb::WriteRequest {
                lu: 2,
                lba: chunk * 4096,
                data: vec![byte; 16 << 20],
                fua: false,
            })
            .await
            .expect("fill");
    }
}

/// Waits until the copy is under way (and has not finished).
async fn wait_until_copying(client: &mut harness::BackupClient, id: &str) {
    loop {
        let info = client
            .get_backup(pb::BackupIdRequest {
                backup_id: id.to_string(),
            })
            .await
            .expect("get")
            .into_inner();
        assert_eq!(
            info.state(),
            pb::BackupState::Running,
            "the copy ended before the kill"
        );
        if info.bytes_done > 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_equals_its_lu_and_its_manifest_equals_checksum_range() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lu_bytes = 10 << 20; // 10 chunks; the copy spans segments and streams
    let array = start_array(
        &dir.path().join("array"),
        harness::small_array(lu_bytes),
        ArrayTestHooks::default(),
    )
    .await;
    let mut array_client = array_client(&array.url()).await;
    // A known pattern with zero holes: chunks 0, 3 and 9 (the last) hold
    // data, one of them only in a single block; the rest stays zero.
    for (lba, blocks) in [(0u64, 256u64), (3 * 256 + 17, 1), (9 * 256, 200)] {
        let data: Vec<u8> = (0..blocks as usize * BLOCK)
            .map(|i| (i % 251) as u8 + 1)
            .collect();
        array_client
            .write(apb::WriteRequest {
                lu: 2,
                lba,
                data,
                fua: false,
            })
            .await
            .expect("pattern write");
    }
    let backup = start_backup(&array.url(), &dir.path().join("store")).await;
    let mut client = backup_client(&backup.url()).await;
    let (id, already) = start(&mut client, "run-1", 2).await;
    assert!(!already);
    let last = follow_backup(&mut client, &id).await;
    assert_eq!(last.state(), pb::BackupState::Complete, "{}", last.error);
    assert_eq!(last.bytes_done, lu_bytes);

    let image_path = dir.path().join("store").join(&id).join("image.raw");
    let image = std::fs::read(&image_path).expect("image");
    let lu_file = std::fs::read(dir.path().join("array").join("lu2.img")).expect("LU file");
    assert!(
        image == lu_file,
        "the image equals the mate LU byte for byte"
    );
    let allocated_bytes = std::fs::metadata(&image_path).expect("meta").blocks() * 512;
    assert!(
        allocated_bytes <= 4 << 20,
        "the image is sparse where the LU is zero: {allocated_bytes} bytes allocated for 3 data chunks"
    );

    let info = client
        .get_backup(pb::BackupIdRequest {
            backup_id: id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    let manifest: serde_json::Value = serde_json::from_str(&info.manifest_json).expect("manifest");
    let on_disk: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("store").join(&id).join("manifest.json")).expect("file"),
    )
    .expect("manifest.json");
    assert_eq!(manifest, on_disk);
    assert_eq!(manifest["ledger_sequence"], 7);
    assert_eq!(manifest["source_lu"], 2);
    let sums = array_client
        .checksum_range(apb::ChecksumRangeRequest {
            lu: 2,
            lba: 0,
            blocks: lu_bytes / BLOCK as u64,
            chunk_blocks: CHUNK_BLOCKS,
        })
        .await
        .expect("checksum")
        .into_inner()
        .digests;
    let from_array: Vec<String> = sums
        .iter()
        .map(|d| {
            blake3::Hash::from_bytes(d[..].try_into().expect("32"))
                .to_hex()
                .to_string()
        })
        .collect();
    let from_manifest: Vec<String> = manifest["chunk_digests"]
        .as_array()
        .expect("digests")
        .iter()
        .map(|d| d.as_str().expect("hex").to_string())
        .collect();
    assert_eq!(
        from_manifest, from_array,
        "manifest digests = ChecksumRange of the LU"
    );
    let mut joined = Vec::new();
    for d in &sums {
        joined.extend_from_slice(d);
    }
    assert_eq!(
        manifest["image_digest"],
        blake3::hash(&joined).to_hex().to_string()
    );

    // Verification passes, and fails once one byte is flipped.
    let verified = client
        .verify_backup(pb::BackupIdRequest {
            backup_id: id.clone(),
        })
        .await
        .expect("verify")
        .into_inner();
    assert!(verified.ok, "{}", verified.error);
    assert_eq!(verified.chunks, 10);
    let mut damaged = image.clone();
    damaged[5 * (1 << 20) + 12345] ^= 0x01;
    std::fs::write(&image_path, &damaged).expect("damage");
    let verified = client
        .verify_backup(pb::BackupIdRequest {
            backup_id: id.clone(),
        })
        .await
        .expect("verify")
        .into_inner();
    assert!(!verified.ok, "a flipped byte must fail verification");
    assert_eq!(verified.bad_chunks, vec![5]);
    // The offline verifier agrees.
    let out = std::process::Command::new(harness::binary("backup-server"))
        .args(["verify", "--store"])
        .arg(dir.path().join("store"))
        .arg(&id)
        .output()
        .expect("run backup-server verify");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The same run id does not start a second job.
    let (again, already) = start(&mut client, "run-1", 2).await;
    assert_eq!((again, already), (id.clone(), true));
    let listed = client
        .list_backups(pb::ListBackupsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.backups.len(), 1);

    // Unknown LUs and backups are NOT_FOUND.
    let unknown = client
        .start_backup(pb::StartBackupRequest {
            run_id: "run-2".into(),
            lu: 99,
            ..Default::default()
        })
        .await
        .expect_err("unknown LU");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let unknown = client
        .get_backup(pb::BackupIdRequest {
            backup_id: "0000".into(),
        })
        .await
        .expect_err("unknown backup");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    backup.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_array_mid_backup_fails_the_job_as_unavailable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("array");
    let data_dir = data_dir.to_str().expect("utf-8 path");
    let mut array = NodeProcess::start(
        "array-node",
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data_dir,
            "--lu-size",
            "512MiB",
        ],
    );
    let mut array_client = array_client(&array.url()).await;
    // Data everywhere, so that the copy has real work to do.
    fill_mate(&mut array_client, 32, 0xC3).await;
    let store = dir.path().join("store");
    let backup = start_backup(&array.url(), &store).await;
    let mut client = backup_client(&backup.url()).await;
    let (id, _) = start(&mut client, "run-kill-array", 2).await;
    // Wait until the copy is under way, then kill the array.
    wait_until_copying(&mut client, &id).await;
    array.kill9();
    let last = follow_backup(&mut client, &id).await;
    assert_eq!(last.state(), pb::BackupState::Failed);
    assert!(last.error.contains("UNAVAILABLE"), "reason: {}", last.error);
    let listed = client
        .list_backups(pb::ListBackupsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert!(
        listed
            .backups
            .iter()
            .all(|b| b.state() != pb::BackupState::Complete)
    );
    assert!(!store.join(&id).exists(), "nothing that looks complete");
    backup.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_backup_server_leaves_no_complete_backup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let array = start_array(
        &dir.path().join("array"),
        harness::small_array(256 << 20),
        ArrayTestHooks::default(),
    )
    .await;
    let mut array_client = array_client(&array.url()).await;
    fill_mate(&mut array_client, 16, 0x3C).await;
    let store = dir.path().join("store");
    let store_arg = store.to_str().expect("utf-8 path");
    let array_addr = array.addr.to_string();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--array",
        array_addr.as_str(),
        "--store",
        store_arg,
    ];
    let mut server = NodeProcess::start("backup-server", &args);
    let mut client = backup_client(&server.url()).await;
    let (id, _) = start(&mut client, "run-kill-backup", 2).await;
    wait_until_copying(&mut client, &id).await;
    server.kill9();
    let leftovers: Vec<String> = std::fs::read_dir(&store)
        .expect("store")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        leftovers.iter().all(|name| name.starts_with(".partial-")),
        "{leftovers:?}"
    );

    // After a restart the leftovers are cleaned and a new job succeeds.
    let server = NodeProcess::start("backup-server", &args);
    let mut client = backup_client(&server.url()).await;
    let listed = client
        .list_backups(pb::ListBackupsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert!(
        listed.backups.is_empty(),
        "no complete backup after the kill: {listed:?}"
    );
    assert!(
        std::fs::read_dir(&store).expect("store").next().is_none(),
        "partial leftovers cleaned"
    );
    let (id, _) = start(&mut client, "run-after-restart", 2).await;
    let last = follow_backup(&mut client, &id).await;
    assert_eq!(last.state(), pb::BackupState::Complete, "{}", last.error);
    let verified = client
        .verify_backup(pb::BackupIdRequest { backup_id: id })
        .await
        .expect("verify")
        .into_inner();
    assert!(verified.ok);
    drop(server);
    array.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_capped_backup_takes_at_least_its_size_over_the_rate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let array = start_array(
        &dir.path().join("array"),
        harness::small_array(8 << 20),
        ArrayTestHooks::default(),
    )
    .await;
    let backup = start_backup(&array.url(), &dir.path().join("store")).await;
    let mut client = backup_client(&backup.url()).await;
    let started = std::time::Instant::now();
    let id = client
        .start_backup(pb::StartBackupRequest {
            run_id: "capped".into(),
            lu: 2,
            max_bytes_per_s: Some(16 << 20),
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner()
        .backup_id;
    let last = follow_backup(&mut client, &id).await;
    assert_eq!(last.state(), pb::BackupState::Complete, "{}", last.error);
    // 8 MiB at 16 MiB/s: the first chunk goes at once, the other seven
    // wait their turn, so at least 7/16 s. Only a lower bound is checked:
    // the cap promises the copy is never faster than the rate.
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(430),
        "the cap was not applied: {:?}",
        started.elapsed()
    );
    backup.shutdown().await.expect("shutdown");
}
