//! The invariants the nemesis checks after every round:
//!
//! - every node answers its health check again once its fault has ended
//!   (none stays down or wedged);
//! - the pair becomes Synchronized, and then origin == mate, chunk for
//!   chunk, compared with the array's digests while the database is
//!   quiesced;
//! - the ledger's own check passes on the live volume while quiesced, at
//!   the sequence the suspend reported, and that sequence never goes back
//!   (a sequence reported at a quiesce was acknowledged: losing it is
//!   losing acknowledged transactions);
//! - every backup the backup server reports complete passes the ledger's
//!   check at the sequence its manifest records, and its server-side
//!   verification; a console run that exits 0 reports its backup equal to
//!   the frozen mate's digests;
//! - a database suspended by a console that vanished resumes by itself
//!   when its lease runs out.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use splitmirror_proto::backup::v1 as bpb;
use splitmirror_proto::client::{ArrayClient, BackupClient, ClientError, DbClient};
use splitmirror_proto::db::v1 as pb;
use splitmirror_proto::node;
use splitmirror_proto::security::{Security, role};

use super::Summary;
use super::cluster::{Cluster, Node};

/// How long one call may take before the node counts as not answering.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a node may take to answer its health check after a fault.
const HEAL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the pair may take to become Synchronized after a round.
const SYNC_TIMEOUT: Duration = Duration::from_secs(180);
/// The lease of the console that vanishes.
const LOST_CONSOLE_LEASE_MS: u32 = 1000;
/// Digest chunk for the origin/mate comparison (1 MiB of 4 KiB blocks).
const COMPARE_CHUNK_BLOCKS: u64 = 256;

/// An invariant that did not hold, and the round it was found in.
#[derive(Debug, Clone)]
pub struct Violation {
    pub round: u64,
    pub what: String,
}

impl Violation {
    pub fn new(round: u64, what: impl Into<String>) -> Self {
        Self {
            round,
            what: what.into(),
        }
    }
}

pub struct Checker {
    db: DbClient,
    array: ArrayClient,
    backup: BackupClient,
    /// The console's certificate, for health probes.
    console: Security,
    urls: [String; 3],
    /// The highest ledger sequence reported at a quiesce: every
    /// transaction up to it was acknowledged.
    committed_sequence: u64,
    checked_backups: BTreeSet<String>,
}

/// Runs a call with [`CALL_TIMEOUT`], flattening both failures into text
/// (a violation's description, for a person).
async fn call<T>(
    what: &str,
    future: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, future).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(error)) => Err(format!("{what}: {error}")),
        Err(_) => Err(format!("{what}: no answer within {CALL_TIMEOUT:?}")),
    }
}

impl Checker {
    pub async fn new(cluster: &Cluster) -> Result<Self, String> {
        let text = |e: ClientError| e.to_string();
        // The checker acts as the console towards db-server and the backup
        // server, and as db-server towards the array (the identity that may
        // read every LU of the pairs).
        let console = cluster.security(role::CONSOLE)?;
        let as_db = cluster.security(role::DB)?;
        Ok(Self {
            db: DbClient::new(&cluster.url(Node::Db), &console).map_err(text)?,
            array: ArrayClient::new(&cluster.url(Node::Array), &as_db).map_err(text)?,
            backup: BackupClient::new(&cluster.url(Node::Backup), &console).map_err(text)?,
            console,
            urls: Node::ALL.map(|n| cluster.url(n)),
            committed_sequence: 0,
            checked_backups: BTreeSet::new(),
        })
    }

    async fn status(&mut self) -> Result<pb::StatusResponse, String> {
        call("Status", self.db.status(false)).await
    }

    /// What volume 0 is doing, to say where a kill landed.
    pub async fn phase(&mut self) -> String {
        match tokio::time::timeout(Duration::from_secs(2), self.status()).await {
            Ok(Ok(status)) => match status.volumes.iter().find(|v| v.volume == 0) {
                Some(volume) => match volume.data_mode() {
                    pb::Mode::Synchronized => "synchronized",
                    pb::Mode::Snapshot => "snapshot",
                    pb::Mode::Resynchronizing => "resync",
                    _ => "unknown",
                }
                .to_string(),
                None => "unknown".into(),
            },
            _ => "db-unreachable".into(),
        }
    }

    /// The fault "lost console": suspends with a short lease and never
    /// resumes. Answers when it suspended (`None` if the database refused,
    /// e.g. because another suspend is in force).
    pub async fn suspend_and_vanish(&mut self) -> Option<Instant> {
        call("Suspend", self.db.suspend(LOST_CONSOLE_LEASE_MS))
            .await
            .ok()
            .map(|_| Instant::now())
    }

    /// After a lost console: the gate must have reopened by itself.
    pub async fn check_resumed_by_itself(
        &mut self,
        round: u64,
        suspended_at: Instant,
    ) -> Result<(), Violation> {
        let deadline =
            suspended_at + Duration::from_millis(u64::from(LOST_CONSOLE_LEASE_MS) + 5000);
        loop {
            if let Ok(status) = self.status().await
                && !status.gate.is_some_and(|g| g.suspended)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Violation::new(
                    round,
                    format!(
                        "the database stayed suspended {} ms after a {LOST_CONSOLE_LEASE_MS} ms lease ran out",
                        suspended_at.elapsed().as_millis()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every node healthy, no snapshot left behind, the pair Synchronized.
    pub async fn wait_settled(
        &mut self,
        cluster: &mut Cluster,
        round: u64,
    ) -> Result<u64, Violation> {
        for (i, url) in self.urls.clone().iter().enumerate() {
            let started = Instant::now();
            let role = Node::ALL[i].role();
            while let Err(e) = node::probe_health(url, "", &self.console, role).await {
                if started.elapsed() > HEAL_TIMEOUT {
                    return Err(Violation::new(
                        round,
                        format!(
                            "{} at {url} did not answer its health check within {HEAL_TIMEOUT:?}: {e}",
                            Node::ALL[i]
                        ),
                    ));
                }
                if let Some(status) = cluster.exited_by_itself(Node::ALL[i]) {
                    return Err(Violation::new(
                        round,
                        format!(
                            "{} exited by itself ({status}) after its fault",
                            Node::ALL[i]
                        ),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let started = Instant::now();
        let mut deleted = 0;
        loop {
            let status = match self.status().await {
                Ok(status) => status,
                Err(e) if started.elapsed() < SYNC_TIMEOUT => {
                    tracing::debug!("status: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => {
                    return Err(Violation::new(
                        round,
                        format!("db-server does not answer: {e}"),
                    ));
                }
            };
            // A run that failed (its console lost a node) may have left its
            // snapshot behind; the operator's move is a forced delete.
            for volume in status
                .volumes
                .iter()
                .filter(|v| !v.snapshot_holder.is_empty())
            {
                let delete = self.db.delete_snapshot(volume.volume, "soak-cleanup", true);
                if call("DeleteSnapshot", delete).await.is_ok() {
                    deleted += 1;
                }
            }
            if status
                .volumes
                .iter()
                .all(|v| v.data_mode() == pb::Mode::Synchronized)
            {
                return Ok(deleted);
            }
            if started.elapsed() > SYNC_TIMEOUT {
                let modes: Vec<String> = status
                    .volumes
                    .iter()
                    .map(|v| {
                        format!(
                            "volume {}: {:?} ({} blocks recorded)",
                            v.volume,
                            v.data_mode(),
                            v.dirty_blocks
                        )
                    })
                    .collect();
                return Err(Violation::new(
                    round,
                    format!(
                        "the pairs did not become Synchronized within {SYNC_TIMEOUT:?}: {}",
                        modes.join("; ")
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Everything checked after a round.
    pub async fn after_round(
        &mut self,
        cluster: &mut Cluster,
        round: u64,
        summary: &mut Summary,
    ) -> Result<(), Violation> {
        summary.leftover_snapshots_deleted += self.wait_settled(cluster, round).await?;
        self.check_quiesced(round).await?;
        self.check_backups(cluster, round, summary).await
    }

    /// Suspends the database, compares origin with mate and runs the
    /// ledger's own check on the live volume, then resumes.
    async fn check_quiesced(&mut self, round: u64) -> Result<(), Violation> {
        let started = Instant::now();
        let sequence = loop {
            match call("Suspend", self.db.suspend(30_000)).await {
                Ok(answer) => break answer.ledger_sequence,
                Err(e) if started.elapsed() > Duration::from_secs(30) => {
                    return Err(Violation::new(
                        round,
                        format!("the database cannot be suspended: {e}"),
                    ));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let result = self.compare_quiesced(round, sequence).await;
        let _ = call("Resume", self.db.resume()).await;
        result
    }

    async fn compare_quiesced(&mut self, round: u64, sequence: u64) -> Result<(), Violation> {
        if sequence < self.committed_sequence {
            return Err(Violation::new(
                round,
                format!(
                    "the ledger's sequence went back from {} to {sequence}: acknowledged transactions were lost",
                    self.committed_sequence
                ),
            ));
        }
        self.committed_sequence = sequence;
        let status = self.status().await.map_err(|e| Violation::new(round, e))?;
        for volume in &status.volumes {
            if volume.data_mode() != pb::Mode::Synchronized {
                // A write that failed under the quiesce's own check may
                // have turned it; the next round looks again.
                continue;
            }
            let origin = self
                .digests(volume.origin_lu, volume.block_count)
                .await
                .map_err(|e| Violation::new(round, e))?;
            let mate = self
                .digests(volume.mate_lu, volume.block_count)
                .await
                .map_err(|e| Violation::new(round, e))?;
            let differing: Vec<usize> = (0..origin.len().max(mate.len()))
                .filter(|&i| origin.get(i) != mate.get(i))
                .collect();
            if !differing.is_empty() {
                return Err(Violation::new(
                    round,
                    format!(
                        "volume {} reports Synchronized but origin LU {} and mate LU {} differ in 1 MiB chunks {differing:?}",
                        volume.volume, volume.origin_lu, volume.mate_lu
                    ),
                ));
            }
        }
        if let Some(ledger) = status.ledger.as_ref().filter(|l| l.running) {
            let volume = status
                .volumes
                .iter()
                .find(|v| v.volume == ledger.volume)
                .ok_or_else(|| Violation::new(round, "the ledger's volume is not in Status"))?;
            let image = self
                .read_lu(volume.mirror_lu, volume.block_count)
                .await
                .map_err(|e| Violation::new(round, e))?;
            let report = db_server::ledger_format::verify_image(&image, Some(sequence));
            if !report.ok {
                return Err(Violation::new(
                    round,
                    format!(
                        "the ledger's own check fails on the live volume at sequence {sequence}: {:?}",
                        report.violations
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn digests(&mut self, lu: u32, blocks: u64) -> Result<Vec<[u8; 32]>, String> {
        let checksums = self.array.checksums(lu, 0, blocks, COMPARE_CHUNK_BLOCKS);
        call("ChecksumRange", checksums).await
    }

    /// The whole LU, each chunk within [`CALL_TIMEOUT`].
    async fn read_lu(&mut self, lu: u32, blocks: u64) -> Result<Vec<u8>, String> {
        let mut stream = call("Read", self.array.read_stream(lu, 0, blocks)).await?;
        let mut data = Vec::new();
        loop {
            match tokio::time::timeout(CALL_TIMEOUT, stream.next()).await {
                Ok(Some(Ok(chunk))) => data.extend_from_slice(&chunk),
                Ok(None) => return Ok(data),
                Ok(Some(Err(error))) => return Err(format!("Read LU {lu}: {error}")),
                Err(_) => return Err(format!("Read LU {lu}: no data within {CALL_TIMEOUT:?}")),
            }
        }
    }

    /// Every backup that became complete since the last round: its image
    /// passes the ledger's check at its manifest's sequence, and the server
    /// verifies it. Then the store is pruned to the newest two backups and
    /// garbage-collected, and the newest backup must still verify (the
    /// collector never removes a chunk a backup references).
    async fn check_backups(
        &mut self,
        cluster: &Cluster,
        round: u64,
        summary: &mut Summary,
    ) -> Result<(), Violation> {
        let backups = call("ListBackups", self.backup.list_backups())
            .await
            .map_err(|e| Violation::new(round, e))?;
        for backup in backups {
            if backup.state() != bpb::BackupState::Complete
                || self.checked_backups.contains(&backup.backup_id)
            {
                continue;
            }
            let index = cluster
                .store_dir()
                .join("indexes")
                .join(format!("{}.json", backup.backup_id));
            let manifest: serde_json::Value = std::fs::read(&index)
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok())
                .ok_or_else(|| {
                    Violation::new(
                        round,
                        format!(
                            "backup {} is complete but has no readable index",
                            backup.backup_id
                        ),
                    )
                })?;
            let sequence = manifest["ledger_sequence"].as_u64();
            // The image as a restore would see it: exported from the chunk
            // store, every chunk checked against its digest.
            let exported = cluster.export_path();
            let image = async {
                let store = backup_server::store::ChunkStore::open_existing(
                    &backup_server::store::StoreLocation::Dir(cluster.store_dir()),
                    backup_server::store::DEFAULT_GC_GRACE,
                )
                .await?;
                store.export(&backup.backup_id, &exported).await?;
                let image = std::fs::read(&exported).map_err(|e| {
                    backup_server::store::StoreError::Export {
                        doing: "reading",
                        path: exported.display().to_string(),
                        source: e,
                    }
                });
                let _ = std::fs::remove_file(&exported);
                image
            }
            .await
            .map_err(|e| {
                Violation::new(
                    round,
                    format!(
                        "backup {} is complete but cannot be exported: {e}",
                        backup.backup_id
                    ),
                )
            })?;
            let report = db_server::ledger_format::verify_image(&image, sequence);
            if !report.ok {
                return Err(Violation::new(
                    round,
                    format!(
                        "backup {} is reported complete but fails the ledger's check at sequence {sequence:?}: {:?}",
                        backup.backup_id, report.violations
                    ),
                ));
            }
            let verified = call("VerifyBackup", self.backup.verify_backup(&backup.backup_id))
                .await
                .map_err(|e| Violation::new(round, e))?;
            if !verified.ok {
                return Err(Violation::new(
                    round,
                    format!(
                        "backup {} is complete but VerifyBackup fails: {verified:?}",
                        backup.backup_id
                    ),
                ));
            }
            summary.backups_verified += 1;
            self.checked_backups.insert(backup.backup_id.clone());
        }
        self.prune_and_collect(round).await
    }

    /// Prunes volume 0 to its newest two backups and collects garbage. A
    /// node that does not answer (a fault of the round) is not a violation;
    /// a kept backup that no longer verifies afterwards is.
    async fn prune_and_collect(&mut self, round: u64) -> Result<(), Violation> {
        let prune = bpb::PruneBackupsRequest {
            volume: 0,
            keep_last: Some(2),
            ..Default::default()
        };
        let Ok(pruned) = call("PruneBackups", self.backup.prune_backups(prune)).await else {
            return Ok(());
        };
        if call("CollectGarbage", self.backup.collect_garbage())
            .await
            .is_err()
        {
            return Ok(());
        }
        for kept in pruned.decisions.iter().filter(|d| d.keep) {
            let Ok(verified) =
                call("VerifyBackup", self.backup.verify_backup(&kept.backup_id)).await
            else {
                continue;
            };
            if !verified.ok {
                return Err(Violation::new(
                    round,
                    format!(
                        "backup {} was kept by the prune but fails VerifyBackup after garbage collection: {verified:?}",
                        kept.backup_id
                    ),
                ));
            }
        }
        Ok(())
    }
}
