//! `bench backup`: a mate LU of random data backed up into the chunk store
//! (1 MiB chunks, each written and fsynced as its own file, then the
//! backup's index), next to `qemu-nbd` + `qemu-img convert` of the same
//! file into a file — in its default mode (+ fsync) and in its direct-I/O,
//! out-of-order mode (`-t none -W`) — plus the backup server's CPU seconds
//! per GiB.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::StreamExt;
use serde_json::json;
use splitmirror_proto::backup::v1 as pb;
use splitmirror_proto::client::BackupClient;
use splitmirror_proto::node;

use splitmirror_proto::security::role;

use crate::cluster::Credentials;

use super::common::{
    RandomLuArray, array_with_random_lu, cpu_seconds, f1, f2, mb_per_s, sibling_binary, table,
};
use super::{BenchOptions, BenchOutput, peer};

/// This scenario starts no db-server; its live backup never asks one.
const NO_DB: &str = crate::cluster::NO_DB;

/// A backup-server process, killed when dropped: also when the backup fails
/// and the bench returns early, so that no server outlives it.
struct StopOnDrop(std::process::Child);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One backup through the backup server: how fast, and at what CPU cost to
/// the server when it ran as its own process.
#[derive(Debug, Clone, Copy)]
pub(super) struct BackupMeasurement {
    pub mb_per_s: f64,
    pub seconds: f64,
    /// The backup server's CPU seconds per GiB copied; `None` when it ran
    /// in-process (its binary not built next to the console's).
    pub cpu_seconds_per_gib: Option<f64>,
}

/// Backs up LU 2 of `source` (live, `size_bytes` of random data) through a
/// backup server started for this one backup with the array's credentials
/// (`--tls-dir` or `--insecure`), into `store`, and stops the server.
pub(super) async fn backup_through_server(
    source: &RandomLuArray,
    size_bytes: u64,
    store: &Path,
) -> anyhow::Result<BackupMeasurement> {
    let RandomLuArray {
        array, credentials, ..
    } = source;
    let size = size_bytes;
    let tls_args: Vec<std::ffi::OsString> = match credentials {
        Credentials::Certificates(certs) => vec!["--tls-dir".into(), certs.into()],
        Credentials::Insecure => vec!["--insecure".into()],
    };
    // The backup server runs as its own process when its binary is next to
    // this one, so that its CPU time can be read on its own.
    let mut child = None;
    let mut in_process = None;
    let backup_url = match sibling_binary("backup-server") {
        Some(binary) => {
            let listener =
                std::net::TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
            let addr = listener.local_addr()?;
            drop(listener);
            let process = std::process::Command::new(binary)
                .args([
                    "--listen",
                    &addr.to_string(),
                    "--array",
                    &array.url(),
                    // No db-server in this scenario: the copy is live.
                    "--db",
                    NO_DB,
                    "--store",
                ])
                .arg(store)
                .args(&tls_args)
                .env("RUST_LOG", "warn")
                .spawn()
                .context("starting backup-server")?;
            child = Some(StopOnDrop(process));
            format!("http://{addr}")
        }
        None => {
            let handle = crate::cluster::start_backup(
                &array.url(),
                NO_DB,
                &backup_server::store::StoreLocation::Dir(store.to_path_buf()),
                backup_server::store::DEFAULT_GC_GRACE,
                None,
                &credentials.security(role::BACKUP)?,
            )
            .await?;
            let url = handle.url();
            in_process = Some(handle);
            url
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let console = credentials.security(role::CONSOLE)?;
    while node::probe_health(&backup_url, "", &console, role::BACKUP)
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("backup-server did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = BackupClient::new(&backup_url, &console)?;
    let cpu_before = child.as_ref().and_then(|c| cpu_seconds(c.0.id()));
    let started = Instant::now();
    let id = client
        .start_backup(pb::StartBackupRequest {
            run_id: "bench".into(),
            lu: 2,
            // An idle LU of random data, with no snapshot to name: the copy
            // speed is what is measured.
            live: true,
            ..Default::default()
        })
        .await?
        .backup_id;
    let mut stream = client.watch_backup(&id).await?;
    let mut last = None;
    while let Some(p) = stream.next().await {
        last = Some(p?);
    }
    let elapsed = started.elapsed();
    let last = last.context("the backup server sent no progress")?;
    if last.state() != pb::BackupState::Complete {
        bail!("the backup failed: {}", last.error);
    }
    let cpu = match (
        cpu_before,
        child.as_ref().and_then(|c| cpu_seconds(c.0.id())),
    ) {
        (Some(before), Some(after)) => Some((after - before) / (size as f64 / (1u64 << 30) as f64)),
        _ => None,
    };
    let ours = mb_per_s(size, elapsed);
    drop(child);
    if let Some(handle) = in_process {
        handle.shutdown().await.map_err(anyhow::Error::msg)?;
    }

    Ok(BackupMeasurement {
        mb_per_s: ours,
        seconds: elapsed.as_secs_f64(),
        cpu_seconds_per_gib: cpu,
    })
}

pub async fn run(options: &BenchOptions) -> anyhow::Result<BenchOutput> {
    let size = options.size_bytes;
    let source = array_with_random_lu(2, size, true).await?;
    let store = source.dir.path().join("store");
    let BackupMeasurement {
        mb_per_s: ours,
        seconds,
        cpu_seconds_per_gib: cpu,
    } = backup_through_server(&source, size, &store).await?;
    let RandomLuArray {
        dir,
        array,
        lu_file: mate_file,
        ..
    } = source;

    let peers: Result<Peers, String> = match peer::missing() {
        Some(reason) => Err(reason),
        None => measure_peers(&mate_file, &dir.path().join("peer.raw"), size),
    };
    array.shutdown().await.map_err(anyhow::Error::msg)?;

    let mut rows = vec![vec![
        "backup-server (chunk store: chunks + index, fsynced)".into(),
        f1(ours),
        "MB/s".into(),
    ]];
    let (peer_json, ratio_json) = match &peers {
        Ok(p) => {
            rows.push(vec![
                "qemu-img convert from qemu-nbd, no fsync".into(),
                f1(p.convert_mb_per_s),
                "MB/s".into(),
            ]);
            rows.push(vec![
                "qemu-img convert + fsync".into(),
                f1(p.convert_and_fsync_mb_per_s),
                "MB/s".into(),
            ]);
            rows.push(vec![
                "qemu-img convert -t none -W from qemu-nbd --cache=none".into(),
                p.convert_direct_mb_per_s.map_or("failed".into(), f1),
                p.convert_direct_error
                    .clone()
                    .unwrap_or_else(|| "MB/s".into()),
            ]);
            let over_direct = p.convert_direct_mb_per_s.map(|direct| ours / direct);
            rows.push(vec![
                "ratio (ours / convert -t none -W)".into(),
                over_direct.map_or("-".into(), f2),
                format!("× (target ≥ 1.0: {})", met(over_direct.map(|r| r >= 1.0))),
            ]);
            let over_fsync = ours / p.convert_and_fsync_mb_per_s;
            rows.push(vec![
                "ratio (ours / convert + fsync)".into(),
                f2(over_fsync),
                format!("× (target ≥ 2.0: {})", met(Some(over_fsync >= 2.0))),
            ]);
            rows.push(vec![
                "ratio (ours / convert, no fsync)".into(),
                f2(ours / p.convert_mb_per_s),
                "×".into(),
            ]);
            (
                json!({
                    "convert_mb_per_s": p.convert_mb_per_s,
                    "convert_and_fsync_mb_per_s": p.convert_and_fsync_mb_per_s,
                    "convert_direct_mb_per_s": p.convert_direct_mb_per_s,
                    "convert_direct_error": p.convert_direct_error,
                    "convert_direct_command": "qemu-nbd --read-only --cache=none …; qemu-img convert -f raw -O raw -t none -W nbd://…",
                }),
                json!({
                    "over_convert_and_fsync": over_fsync,
                    "over_convert": ours / p.convert_mb_per_s,
                    "over_convert_direct": over_direct,
                }),
            )
        }
        Err(reason) => {
            rows.push(vec!["peer".into(), "skipped".into(), reason.clone()]);
            (json!(null), json!(reason))
        }
    };
    rows.push(vec![
        "backup-server CPU per GiB".into(),
        cpu.map_or("n/a".into(), f2),
        format!("CPU s/GiB (target ≤ 1.0: {})", met(cpu.map(|c| c <= 1.0))),
    ]);
    Ok(BenchOutput {
        table: table(
            &["backup of a mate LU of random data", "value", "unit"],
            &rows,
        ),
        figures: json!({
            "backup_mb_per_s": ours,
            "backup_seconds": seconds,
            "peer": peer_json,
            "ratio": ratio_json,
            "backup_server_cpu_seconds_per_gib": cpu,
        }),
    })
}

/// The peer's figures, measured after our backup on the same file.
struct Peers {
    convert_mb_per_s: f64,
    convert_and_fsync_mb_per_s: f64,
    /// `-t none -W`, its copy and the (near-empty) fsync after it; `None`
    /// with the reason in `convert_direct_error` when qemu refused (e.g. a
    /// filesystem without `O_DIRECT`).
    convert_direct_mb_per_s: Option<f64>,
    convert_direct_error: Option<String>,
}

/// `qemu-img convert` of `lu_file` into `out`, in its default mode, then
/// with `-t none -W` from an export with `--cache=none`.
fn measure_peers(lu_file: &Path, out: &Path, size: u64) -> Result<Peers, String> {
    let buffered = (|| -> anyhow::Result<(Duration, Duration)> {
        let export = peer::export(lu_file)?;
        peer::convert(&export, out)
    })()
    .map_err(|e| format!("{e:#}"))?;
    let _ = std::fs::remove_file(out);
    let direct = (|| -> anyhow::Result<(Duration, Duration)> {
        let export = peer::export_with_cache(lu_file, peer::ExportCache::Direct)?;
        peer::convert_direct(&export, out)
    })();
    let _ = std::fs::remove_file(out);
    let (copied, synced) = buffered;
    let (convert_direct_mb_per_s, convert_direct_error) = match direct {
        Ok((copied, synced)) => (Some(mb_per_s(size, copied + synced)), None),
        Err(error) => (None, Some(format!("{error:#}"))),
    };
    Ok(Peers {
        convert_mb_per_s: mb_per_s(size, copied),
        convert_and_fsync_mb_per_s: mb_per_s(size, copied + synced),
        convert_direct_mb_per_s,
        convert_direct_error,
    })
}

/// "met" / "missed" / "not measured", for a target's row.
pub(super) fn met(outcome: Option<bool>) -> &'static str {
    match outcome {
        Some(true) => "met",
        Some(false) => "missed",
        None => "not measured",
    }
}
