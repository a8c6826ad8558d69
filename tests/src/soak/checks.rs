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
//!   when its lease runs out;
//! - while a restore runs (between BeginRestore and EndRestore, or during
//!   a reverse resync) db-server's Status shows it with no ledger running
//!   on the volume, and a Read of the volume answers UNAVAILABLE with the
//!   reason `restoring`, never data ([`Checker::probe_offline`]);
//! - after a completed restore the volume holds the restored image (the
//!   backup, or the frozen mate) block for block, except the blocks the
//!   ledger has written since, each a record of a sequence after the
//!   restored one ([`check_restored_image`]), and the sequence rule starts
//!   again from the restored sequence.
//! - in a console run without a fault, the ledger fails no transaction
//!   (the snapshot's split and the resync included);
//! - the array's mode of each pair (ModeSense) agrees with db-server's
//!   Status at every quiesce and right after a snapshot is acquired:
//!   with `--array-mode stateful`, SYNCHRONIZED / SNAPSHOT (mate_writable
//!   as the snapshot's) / RESYNCHRONIZING as the pair's mode, and Status
//!   says STATEFUL with the same array mode; stateless, HOST_MANAGED
//!   ([`expected_array_mode`]).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use db_server::ledger_format::{self, Superblock};
use futures_util::StreamExt;
use rand::Rng;
use rand::rngs::SmallRng;
use splitmirror_proto::array::v1::MirrorMode;
use splitmirror_proto::backup::v1 as bpb;
use splitmirror_proto::client::{ArrayClient, BackupClient, ClientError, DbClient, ErrorKind};
use splitmirror_proto::db::v1 as pb;
use splitmirror_proto::node;
use splitmirror_proto::reason::Reason;
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

/// Volume 0 as db-server shows it (see [`Checker::volume_state`]).
#[derive(Debug, Clone)]
pub struct VolumeState {
    pub restore_run_id: Option<String>,
    pub synchronized: bool,
    pub snapshot_holder: String,
    pub ledger_running: bool,
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
    /// Volume 0's backups the last prune kept, newest first.
    kept_backups: Vec<String>,
    /// A restore that completed since the last quiesce: what the volume
    /// must hold (but for the ledger's later writes) at the next one.
    restored: Option<RestoredImage>,
    /// db-server runs `--array-mode stateful`: the array holds the modes.
    stateful: bool,
}

/// The image a completed restore put on volume 0, for the next quiesce.
pub struct RestoredImage {
    /// "backup B" or "the snapshot of run R", for a violation's text.
    pub what: String,
    pub image: Vec<u8>,
    /// The ledger's sequence in that image.
    pub sequence: u64,
}

/// A backup a restore round can restore: complete, frozen, of volume 0,
/// kept by the last prune.
pub struct RestorableBackup {
    pub backup_id: String,
    pub ledger_sequence: u64,
    /// Its image, exported from the chunk store.
    pub image: Vec<u8>,
}

/// A copy-on-write snapshot the checker took on volume 0 inside a
/// suspension, and what a split-mirror snapshot at that quiesce would have
/// frozen: the mate, read while suspended (the pair Synchronized).
pub struct CowSnapshot {
    pub run_id: String,
    pub sequence: u64,
    pub split_image: Vec<u8>,
}

/// What a read of a held copy-on-write snapshot through db-server found.
pub enum CowRead {
    /// The image.
    Image(Vec<u8>),
    /// Refused as invalidated (reason `snapshot-invalidated`), with the
    /// reason Status gives.
    Invalidated(String),
    /// Any other failure (a node down, the snapshot gone), as text.
    Failed(String),
}

/// What a probe of the volume during a restore saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// db-server did not answer, or shows no restore of the volume.
    NoRestore,
    /// Status showed the restore, no ledger on the volume, and the Read
    /// was refused with UNAVAILABLE `restoring`.
    Offline,
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
    pub async fn new(cluster: &Cluster, stateful: bool) -> Result<Self, String> {
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
            kept_backups: Vec::new(),
            restored: None,
            stateful,
        })
    }

    /// The ledger's count of failed transactions, if db-server answers and
    /// the ledger runs.
    pub async fn ledger_failed(&mut self) -> Option<u64> {
        let status = self.status().await.ok()?;
        status.ledger.map(|l| l.transactions_failed)
    }

    /// Whether db-server runs `--array-mode stateful`.
    pub fn stateful(&self) -> bool {
        self.stateful
    }

    async fn status(&mut self) -> Result<pb::StatusResponse, String> {
        call("Status", self.db.status(false)).await
    }

    /// What volume 0 is doing, to say where a kill landed.
    pub async fn phase(&mut self) -> String {
        match tokio::time::timeout(Duration::from_secs(2), self.status()).await {
            Ok(Ok(status)) => match status.volumes.iter().find(|v| v.volume == 0) {
                Some(volume) if volume.restore.is_some() => {
                    match volume.restore.as_ref().map(|r| r.kind()) {
                        Some(pb::RestoreKind::ToSnapshot) => "reverse-resync",
                        _ => "restoring",
                    }
                    .to_string()
                }
                Some(volume) if volume.snapshot_method() == pb::SnapshotMethod::Cow => {
                    "cow-snapshot".to_string()
                }
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

    /// Whether the last prune kept a backup of volume 0.
    pub fn has_kept_backup(&self) -> bool {
        !self.kept_backups.is_empty()
    }

    /// While a restore of volume 0 runs: Status must show no ledger on the
    /// volume, and a Read of it must be refused with UNAVAILABLE
    /// `restoring` — never answered with data ("at no point is the volume
    /// served to the ledger while half restored"). A node that does not
    /// answer, or a Status that shows no restore, proves nothing either
    /// way ([`Probe::NoRestore`]).
    pub async fn probe_offline(&mut self, round: u64) -> Result<Probe, Violation> {
        let quick = Duration::from_secs(2);
        let restore_of = |status: &pb::StatusResponse| {
            status
                .volumes
                .iter()
                .find(|v| v.volume == 0)
                .and_then(|v| v.restore.clone())
                .filter(|r| r.kind() != pb::RestoreKind::Unspecified)
        };
        let Ok(Ok(status)) = tokio::time::timeout(quick, self.db.status(false)).await else {
            return Ok(Probe::NoRestore);
        };
        let Some(restore) = restore_of(&status) else {
            return Ok(Probe::NoRestore);
        };
        let ledger_on_volume = |status: &pb::StatusResponse| {
            status
                .ledger
                .as_ref()
                .is_some_and(|l| l.running && l.volume == 0)
        };
        if ledger_on_volume(&status) {
            // Status may gather the volume and the ledger a moment apart:
            // both shown again by the next Status is no such moment.
            if let Ok(Ok(again)) = tokio::time::timeout(quick, self.db.status(false)).await
                && restore_of(&again).is_some_and(|r| r.run_id == restore.run_id)
                && ledger_on_volume(&again)
            {
                return Err(Violation::new(
                    round,
                    format!(
                        "db-server shows volume 0 offline for restore run {} and the ledger running on it: {:?}",
                        restore.run_id, again.ledger
                    ),
                ));
            }
        }
        let read = tokio::time::timeout(quick, self.db.read(0, pb::VirtualLu::Data, 0, 1)).await;
        let refused_right = match &read {
            Err(_) => return Ok(Probe::NoRestore),
            Ok(Err(e))
                if e.kind == ErrorKind::Unavailable && e.reason == Some(Reason::Restoring) =>
            {
                return Ok(Probe::Offline);
            }
            // db-server restarting or unreachable: proves nothing.
            Ok(Err(e)) if e.kind.is_transient() => return Ok(Probe::NoRestore),
            Ok(Err(e)) => format!("refused otherwise than UNAVAILABLE restoring: {e}"),
            Ok(Ok(data)) => format!("answered {} bytes of data", data.len()),
        };
        // The restore may have ended between the Status and the Read; if
        // Status still shows it afterwards, the Read came in the middle.
        let Ok(Ok(after)) = tokio::time::timeout(quick, self.db.status(false)).await else {
            return Ok(Probe::NoRestore);
        };
        if restore_of(&after).is_some_and(|r| r.run_id == restore.run_id) {
            return Err(Violation::new(
                round,
                format!(
                    "a Read of volume 0 while restore run {} ({:?}) held it offline {refused_right}",
                    restore.run_id,
                    restore.kind()
                ),
            ));
        }
        Ok(Probe::NoRestore)
    }

    /// What db-server says of volume 0 and the ledger between the attempts
    /// of a restore: the restore run it shows offline (if any), whether the
    /// pair is Synchronized, whether the ledger runs on the volume, and who
    /// holds its snapshot. `None` when db-server does not answer.
    pub async fn volume_state(&mut self) -> Option<VolumeState> {
        let status = tokio::time::timeout(Duration::from_secs(2), self.db.status(false))
            .await
            .ok()?
            .ok()?;
        let volume = status.volumes.iter().find(|v| v.volume == 0)?;
        Some(VolumeState {
            restore_run_id: volume
                .restore
                .as_ref()
                .filter(|r| r.kind() != pb::RestoreKind::Unspecified)
                .map(|r| r.run_id.clone()),
            synchronized: volume.data_mode() == pb::Mode::Synchronized,
            snapshot_holder: volume.snapshot_holder.clone(),
            ledger_running: status
                .ledger
                .as_ref()
                .is_some_and(|l| l.running && l.volume == 0),
        })
    }

    /// The newest backup of volume 0 that the last prune kept and that a
    /// restore can take: complete, frozen, with a ledger sequence, and
    /// exportable (its image is read here, for the check after the
    /// restore). `None` when there is none (yet).
    pub async fn restorable_backup(&mut self, cluster: &Cluster) -> Option<RestorableBackup> {
        let listed = call("ListBackups", self.backup.list_backups()).await.ok()?;
        for backup_id in self.kept_backups.clone() {
            let Some(info) = listed.iter().find(|b| b.backup_id == backup_id) else {
                continue;
            };
            if info.state() != bpb::BackupState::Complete || info.live {
                continue;
            }
            let index = cluster
                .store_dir()
                .join("indexes")
                .join(format!("{backup_id}.json"));
            let Some(manifest) = std::fs::read(&index)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            else {
                continue;
            };
            let Some(ledger_sequence) = manifest["ledger_sequence"].as_u64() else {
                continue;
            };
            let exported = cluster.export_path();
            let image = async {
                let store = backup_server::store::ChunkStore::open_existing(
                    &backup_server::store::StoreLocation::Dir(cluster.store_dir()),
                    backup_server::store::DEFAULT_GC_GRACE,
                )
                .await
                .ok()?;
                store.export(&backup_id, &exported).await.ok()?;
                let image = std::fs::read(&exported).ok();
                let _ = std::fs::remove_file(&exported);
                image
            }
            .await;
            if let Some(image) = image {
                return Some(RestorableBackup {
                    backup_id,
                    ledger_sequence,
                    image,
                });
            }
        }
        None
    }

    /// Overwrites `count` distinct random 1 MiB chunks of volume 0 with
    /// random bytes, through the array on the mirror LU (both sides), as
    /// the owner: the damage a restore repairs. The ledger runs on: it may
    /// fail a transaction or not notice. Answers the chunks overwritten.
    pub async fn corrupt_chunks(
        &mut self,
        rng: &mut SmallRng,
        count: usize,
    ) -> Result<Vec<u64>, String> {
        let status = self.status().await?;
        let volume = status
            .volumes
            .iter()
            .find(|v| v.volume == 0)
            .ok_or("volume 0 is not in Status")?;
        let chunks = volume.block_count.div_ceil(COMPARE_CHUNK_BLOCKS);
        let mut picked = BTreeSet::new();
        while picked.len() < count.min(chunks as usize) {
            picked.insert(rng.random_range(0..chunks));
        }
        for &chunk in &picked {
            let lba = chunk * COMPARE_CHUNK_BLOCKS;
            let blocks = COMPARE_CHUNK_BLOCKS.min(volume.block_count - lba);
            let mut garbage = vec![0u8; (blocks * u64::from(volume.block_size_bytes)) as usize];
            rng.fill(&mut garbage[..]);
            call(
                "Write (corrupting volume 0)",
                self.array.write(volume.mirror_lu, lba, garbage),
            )
            .await?;
        }
        Ok(picked.into_iter().collect())
    }

    /// The snapshot `run_id` holds on volume 0 right after its acquire: its
    /// ledger sequence and the frozen mate's image, which must pass the
    /// ledger's check at that sequence (it is a quiesced image).
    pub async fn frozen_image(
        &mut self,
        round: u64,
        run_id: &str,
    ) -> Result<RestoredImage, Violation> {
        let snapshot = call("GetSnapshot", self.db.get_snapshot(0))
            .await
            .map_err(|e| Violation::new(round, e))?;
        if snapshot.holder_run_id != run_id {
            return Err(Violation::new(
                round,
                format!(
                    "right after run {run_id} acquired it, volume 0's snapshot is held by {:?}",
                    snapshot.holder_run_id
                ),
            ));
        }
        let image = self
            .read_lu(snapshot.mate_lu, snapshot.block_count)
            .await
            .map_err(|e| Violation::new(round, e))?;
        let report = ledger_format::verify_image(&image, Some(snapshot.ledger_sequence));
        if !report.ok {
            return Err(Violation::new(
                round,
                format!(
                    "the frozen mate of run {run_id} fails the ledger's check at its sequence {}: {:?}",
                    snapshot.ledger_sequence, report.violations
                ),
            ));
        }
        Ok(RestoredImage {
            what: format!("the snapshot of run {run_id}"),
            image,
            sequence: snapshot.ledger_sequence,
        })
    }

    /// Volume 0's status.
    pub async fn volume0(&mut self) -> Result<pb::VolumeStatus, String> {
        self.status()
            .await?
            .volumes
            .into_iter()
            .find(|v| v.volume == 0)
            .ok_or_else(|| "db-server's Status has no volume 0".to_string())
    }

    /// Takes a copy-on-write snapshot of volume 0 for `run_id` inside a
    /// suspension, after reading the mate (the split's image at this
    /// quiesce). The outer error is a violation (the acquire answered
    /// another method, or another sequence than the suspend's quiesce);
    /// the inner one a call that failed.
    pub async fn take_cow_snapshot(
        &mut self,
        round: u64,
        run_id: &str,
    ) -> Result<Result<CowSnapshot, String>, Violation> {
        let volume = match self.volume0().await {
            Ok(volume) => volume,
            Err(e) => return Ok(Err(e)),
        };
        let suspended = match call("Suspend", self.db.suspend(30_000)).await {
            Ok(suspended) => suspended,
            Err(e) => return Ok(Err(e)),
        };
        let split_image = self.read_lu(volume.mate_lu, volume.block_count).await;
        let acquired = match &split_image {
            Ok(_) => {
                let acquire = self
                    .db
                    .acquire_snapshot_by(0, run_id, pb::SnapshotMethod::Cow);
                call("AcquireSnapshot (cow)", acquire).await
            }
            Err(e) => Err(e.clone()),
        };
        let _ = call("Resume", self.db.resume()).await;
        let (split_image, acquired) = match (split_image, acquired) {
            (Ok(image), Ok(acquired)) => (image, acquired),
            (Err(e), _) | (_, Err(e)) => return Ok(Err(e)),
        };
        if acquired.method() != pb::SnapshotMethod::Cow {
            return Err(Violation::new(
                round,
                format!("a copy-on-write acquire answered another method: {acquired:?}"),
            ));
        }
        if acquired.ledger_sequence != suspended.ledger_sequence {
            return Err(Violation::new(
                round,
                format!(
                    "an acquire inside a suspension at sequence {} reported sequence {}",
                    suspended.ledger_sequence, acquired.ledger_sequence
                ),
            ));
        }
        Ok(Ok(CowSnapshot {
            run_id: run_id.to_string(),
            sequence: acquired.ledger_sequence,
            split_image,
        }))
    }

    /// Reads volume 0's snapshot virtual LU through db-server.
    pub async fn read_cow_image(&mut self, blocks: u64) -> CowRead {
        let read = self.db.read(0, pb::VirtualLu::Snapshot, 0, blocks);
        match tokio::time::timeout(3 * CALL_TIMEOUT, read).await {
            Ok(Ok(image)) => CowRead::Image(image),
            Ok(Err(e)) if e.reason == Some(Reason::SnapshotInvalidated) => {
                match self.volume0().await {
                    Ok(volume) if !volume.snapshot_invalidated_reason.is_empty() => {
                        CowRead::Invalidated(volume.snapshot_invalidated_reason)
                    }
                    Ok(volume) => CowRead::Failed(format!(
                        "a read refused as snapshot-invalidated while Status gives no reason: \
                         {e}; {volume:?}"
                    )),
                    Err(status) => CowRead::Failed(format!("{e}; then {status}")),
                }
            }
            Ok(Err(e)) => CowRead::Failed(format!("Read of the snapshot: {e}")),
            Err(_) => CowRead::Failed(format!(
                "Read of the snapshot: no answer within {:?}",
                3 * CALL_TIMEOUT
            )),
        }
    }

    /// Deletes the snapshot `run_id` holds on volume 0.
    pub async fn delete_snapshot(
        &mut self,
        run_id: &str,
    ) -> Result<pb::DeleteSnapshotResponse, String> {
        call("DeleteSnapshot", self.db.delete_snapshot(0, run_id, false)).await
    }

    /// Waits (bounded) until db-server answers Status again.
    pub async fn wait_db_answers(&mut self, round: u64) -> Result<(), Violation> {
        let started = Instant::now();
        loop {
            match self.status().await {
                Ok(_) => return Ok(()),
                Err(e) if started.elapsed() > HEAL_TIMEOUT => {
                    return Err(Violation::new(
                        round,
                        format!("db-server does not answer within {HEAL_TIMEOUT:?}: {e}"),
                    ));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// A restore completed: the ledger was moved back on purpose, so the
    /// "never goes back" rule starts again from the restored sequence, and
    /// the next quiesce compares the volume with the restored image.
    pub fn restored(&mut self, restored: RestoredImage) {
        self.committed_sequence = restored.sequence;
        self.restored = Some(restored);
    }

    /// The server's verification of one backup (a restore's safety backup).
    pub async fn verify_backup(&mut self, round: u64, backup_id: &str) -> Result<(), Violation> {
        let verified = call("VerifyBackup", self.backup.verify_backup(backup_id))
            .await
            .map_err(|e| Violation::new(round, e))?;
        if !verified.ok {
            return Err(Violation::new(
                round,
                format!("backup {backup_id} fails VerifyBackup: {verified:?}"),
            ));
        }
        Ok(())
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
        summary.array_modes_checked += self.check_quiesced(round).await?;
        self.check_backups(cluster, round, summary).await
    }

    /// Suspends the database, compares origin with mate, each pair's mode
    /// in the array with db-server's, and runs the ledger's own check on
    /// the live volume, then resumes. Answers how many pairs' array modes
    /// it compared.
    async fn check_quiesced(&mut self, round: u64) -> Result<u64, Violation> {
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

    async fn compare_quiesced(&mut self, round: u64, sequence: u64) -> Result<u64, Violation> {
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
        let mut modes_checked = 0;
        for volume in &status.volumes {
            modes_checked += u64::from(
                self.check_array_mode(round, volume, "at the quiesce")
                    .await?,
            );
        }
        check_pace(status.background_pace.as_ref()).map_err(|e| Violation::new(round, e))?;
        let restored = self.restored.take();
        let ledger_running = status.ledger.as_ref().filter(|l| l.running);
        if let Some(restored) = &restored
            && ledger_running.is_none_or(|l| l.volume != 0)
        {
            return Err(Violation::new(
                round,
                format!(
                    "after restoring {} the ledger does not run on volume 0: {:?}",
                    restored.what, status.ledger
                ),
            ));
        }
        if let Some(ledger) = ledger_running {
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
            if let Some(restored) = restored.filter(|_| ledger.volume == 0) {
                check_restored_image(&restored.image, &image, restored.sequence, sequence)
                    .map_err(|e| {
                        Violation::new(
                            round,
                            format!(
                                "volume 0 after restoring {} (ledger sequence {}, now {sequence}): {e}",
                                restored.what, restored.sequence
                            ),
                        )
                    })?;
            }
        }
        Ok(modes_checked)
    }

    /// The array's mode of `volume`'s pair (ModeSense of its mirror LU)
    /// against what db-server's Status says of it ([`expected_array_mode`]);
    /// answers whether it compared (a pair under a restore or a
    /// copy-on-write snapshot is not).
    async fn check_array_mode(
        &mut self,
        round: u64,
        volume: &pb::VolumeStatus,
        when: &str,
    ) -> Result<bool, Violation> {
        let keeping = if self.stateful {
            pb::ArrayModeKeeping::Stateful
        } else {
            pb::ArrayModeKeeping::Stateless
        };
        if volume.array_mode_keeping() != keeping {
            return Err(Violation::new(
                round,
                format!(
                    "{when}: volume {} says its array mode is kept {:?}, db-server runs {keeping:?}",
                    volume.volume,
                    volume.array_mode_keeping()
                ),
            ));
        }
        let Some(expected) = expected_array_mode(self.stateful, volume) else {
            return Ok(false);
        };
        let page = call("ModeSense", self.array.mode_sense(volume.mirror_lu))
            .await
            .map_err(|e| Violation::new(round, e))?;
        let got = (page.mirror_mode, page.mate_writable);
        if got != expected {
            return Err(Violation::new(
                round,
                format!(
                    "{when}: volume {} is {:?} (snapshot writable {}) in db-server's Status, but the array holds {got:?} for mirror LU {} (expected {expected:?})",
                    volume.volume,
                    volume.data_mode(),
                    volume.snapshot_writable,
                    volume.mirror_lu
                ),
            ));
        }
        if self.stateful && volume.array_mode != array_mode_text(expected) {
            return Err(Violation::new(
                round,
                format!(
                    "{when}: volume {} shows array mode {:?} in Status, the array holds {got:?}",
                    volume.volume, volume.array_mode
                ),
            ));
        }
        Ok(true)
    }

    /// Right after a split snapshot's acquire: the array holds SNAPSHOT
    /// for volume 0 when stateful, HOST_MANAGED when stateless.
    pub async fn check_snapshot_array_mode(&mut self, round: u64) -> Result<(), Violation> {
        let volume = self.volume0().await.map_err(|e| Violation::new(round, e))?;
        self.check_array_mode(round, &volume, "right after the acquire")
            .await
            .map(drop)
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
            // A live backup (a restore's safety backup) copies whatever the
            // volume held, here a volume the nemesis had just corrupted:
            // only the server's verification applies to it.
            let live = manifest["live"].as_bool() == Some(true);
            let report = db_server::ledger_format::verify_image(&image, sequence);
            if !live && !report.ok {
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
            if live {
                // The prune keeps live backups forever; verified, a safety
                // backup has served here, and its index goes (as a prune
                // would remove it), so that the store stays bounded.
                let removed = async {
                    backup_server::store::ChunkStore::open_existing(
                        &backup_server::store::StoreLocation::Dir(cluster.store_dir()),
                        backup_server::store::DEFAULT_GC_GRACE,
                    )
                    .await?
                    .remove_index(&backup.backup_id)
                    .await
                }
                .await;
                if let Err(e) = removed {
                    tracing::warn!("removing safety backup {}: {e}", backup.backup_id);
                }
            }
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
        self.kept_backups = pruned
            .decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.backup_id.clone())
            .collect();
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

/// Compares the volume at a quiesce with the image a restore put on it:
/// every block must equal the restored image's, except the blocks the
/// ledger has written since the restore — each of them a valid account
/// block or log record (in its own slot) of a sequence after
/// `restored_sequence` and at most `quiesced_sequence`. A chunk the
/// restore left out (garbage, or the volume before the restore) or a
/// block changed by anything but the ledger's later transactions fails.
pub fn check_restored_image(
    restored: &[u8],
    volume: &[u8],
    restored_sequence: u64,
    quiesced_sequence: u64,
) -> Result<(), String> {
    if restored.len() != volume.len() {
        return Err(format!(
            "the volume is {} bytes, the restored image {}",
            volume.len(),
            restored.len()
        ));
    }
    let layout = [4096usize, 512]
        .iter()
        .find_map(
            |&size| match ledger_format::decode_superblock(restored.get(..size)?) {
                Superblock::Ledger(layout) => Some(layout),
                _ => None,
            },
        )
        .ok_or("the restored image holds no ledger superblock")?;
    let bs = layout.block_size_bytes as usize;
    let later = |sequence: u64| sequence > restored_sequence && sequence <= quiesced_sequence;
    let mut unexplained = Vec::new();
    for (block, (expected, actual)) in restored.chunks(bs).zip(volume.chunks(bs)).enumerate() {
        if expected == actual {
            continue;
        }
        let lba = block as u64;
        let explained = if lba >= layout.account_lba(0) && lba < layout.log_start_lba() {
            ledger_format::decode_account(actual)
                .is_some_and(|a| layout.account_lba(a.id) == lba && later(a.last_sequence))
        } else if lba >= layout.log_start_lba() && lba < layout.total_blocks() {
            matches!(ledger_format::decode_log(actual),
                Ok(Some(r)) if layout.log_lba(r.sequence) == lba && later(r.sequence))
        } else {
            false
        };
        if !explained {
            unexplained.push(lba);
        }
    }
    if unexplained.is_empty() {
        return Ok(());
    }
    let chunks: BTreeSet<u64> = unexplained
        .iter()
        .map(|lba| lba * bs as u64 / (1 << 20))
        .collect();
    Err(format!(
        "{} blocks differ from the restored image and are no later write of the ledger (first LBAs {:?}; 1 MiB chunks {chunks:?})",
        unexplained.len(),
        &unexplained[..unexplained.len().min(8)]
    ))
}

/// The background pace db-server reports (the array's adaptive pace with
/// the resync's limits): a reason, and a rate that honours the resync's
/// guaranteed minimum and its cap. Unset is allowed (the array did not
/// answer in time: the faults kill and stop it).
fn check_pace(pace: Option<&pb::BackgroundPace>) -> Result<(), String> {
    let Some(pace) = pace else { return Ok(()) };
    if pace.reason() == pb::PaceReason::Unspecified {
        return Err(format!(
            "Status shows a background pace without a reason: {pace:?}"
        ));
    }
    if let Some(rate) = pace.rate_bytes_per_s {
        if rate < pace.resync_min_bytes_per_s {
            return Err(format!(
                "the resync's pace {rate} B/s is below its guaranteed minimum {} B/s: {pace:?}",
                pace.resync_min_bytes_per_s
            ));
        }
        if let Some(max) = pace.resync_max_bytes_per_s
            && rate > max
        {
            return Err(format!(
                "the resync's pace {rate} B/s is above its cap {max} B/s: {pace:?}"
            ));
        }
    }
    Ok(())
}

/// What the array must hold for a pair (ModeSense of its mirror LU: the
/// mode and mate_writable), from db-server's Status of it: stateless,
/// HOST_MANAGED whatever the pair does; stateful, the pair's own mode.
/// `None` where the design leaves the array's mode to no rule the soak
/// checks: during a restore, or with a copy-on-write snapshot held.
pub fn expected_array_mode(
    stateful: bool,
    volume: &pb::VolumeStatus,
) -> Option<(MirrorMode, bool)> {
    if !stateful {
        return Some((MirrorMode::HostManaged, false));
    }
    if volume.restore.is_some() || volume.snapshot_method() == pb::SnapshotMethod::Cow {
        return None;
    }
    match volume.data_mode() {
        pb::Mode::Synchronized => Some((MirrorMode::Synchronized, false)),
        pb::Mode::Snapshot => Some((MirrorMode::Snapshot, volume.snapshot_writable)),
        pb::Mode::Resynchronizing => Some((MirrorMode::Resynchronizing, false)),
        _ => None,
    }
}

/// How db-server's Status writes an array mode (`VolumeStatus.array_mode`).
fn array_mode_text((mode, mate_writable): (MirrorMode, bool)) -> &'static str {
    match (mode, mate_writable) {
        (MirrorMode::Synchronized, _) => "SYNCHRONIZED",
        (MirrorMode::Snapshot, false) => "SNAPSHOT",
        (MirrorMode::Snapshot, true) => "SNAPSHOT (mate writable)",
        (MirrorMode::Resynchronizing, _) => "RESYNCHRONIZING",
        (MirrorMode::HostManaged, _) => "HOST_MANAGED",
        (MirrorMode::Unspecified, _) => "",
    }
}

#[cfg(test)]
mod tests {
    use db_server::ledger_format::{Account, Layout, LogRecord};

    use super::*;

    const BS: u32 = 512;

    fn layout() -> Layout {
        Layout {
            block_size_bytes: BS,
            accounts: 4,
            initial_balance: 100,
            log_blocks: 8,
        }
    }

    /// A ledger image at sequence 10 and 4 blocks of other data after it.
    fn image() -> Vec<u8> {
        let layout = layout();
        let mut image = ledger_format::encode_superblock(&layout);
        for id in 0..layout.accounts {
            let account = Account {
                id,
                balance: 100,
                last_sequence: 10,
            };
            image.extend(ledger_format::encode_account(&account, BS));
        }
        image.resize((layout.total_blocks() + 4) as usize * BS as usize, 0);
        image
    }

    fn put(image: &mut [u8], lba: u64, block: &[u8]) {
        let at = lba as usize * BS as usize;
        image[at..at + BS as usize].copy_from_slice(block);
    }

    #[test]
    fn only_the_ledgers_later_writes_may_differ_from_the_restored_image() {
        let layout = layout();
        let restored = image();
        assert_eq!(check_restored_image(&restored, &restored, 10, 10), Ok(()));
        // Transaction 11 after the restore: its log record and an account.
        let mut volume = restored.clone();
        let record = LogRecord {
            sequence: 11,
            from: 1,
            to: 2,
            amount: 5,
            from_balance: 95,
            to_balance: 105,
        };
        put(
            &mut volume,
            layout.log_lba(11),
            &ledger_format::encode_log(&record, BS),
        );
        let account = Account {
            id: 1,
            balance: 95,
            last_sequence: 11,
        };
        put(
            &mut volume,
            layout.account_lba(1),
            &ledger_format::encode_account(&account, BS),
        );
        assert_eq!(check_restored_image(&restored, &volume, 10, 11), Ok(()));
        // The same records are not explained by a quiesce at 10 (a volume
        // ahead of what was restored: the restore left it out), nor by a
        // restore at 11.
        assert!(check_restored_image(&restored, &volume, 10, 10).is_err());
        assert!(check_restored_image(&restored, &volume, 11, 20).is_err());
        // A record in another account's block is no ledger write.
        let mut misplaced = restored.clone();
        put(
            &mut misplaced,
            layout.account_lba(3),
            &ledger_format::encode_account(&account, BS),
        );
        assert!(check_restored_image(&restored, &misplaced, 10, 11).is_err());
        // Garbage anywhere, and any change past the ledger, fail.
        let mut garbage = restored.clone();
        put(&mut garbage, layout.log_lba(12), &[0xA5; BS as usize]);
        let error = check_restored_image(&restored, &garbage, 10, 20)
            .expect_err("garbage in the log is no ledger write");
        assert!(error.starts_with("1 blocks differ"), "{error}");
        let mut beyond = restored.clone();
        put(&mut beyond, layout.total_blocks() + 1, &[1; BS as usize]);
        assert!(check_restored_image(&restored, &beyond, 10, 20).is_err());
    }

    /// The soak's rule for the array's mode, cell by cell: stateless is
    /// HOST_MANAGED whatever the pair does; stateful follows the pair;
    /// restores and copy-on-write snapshots are not compared.
    #[test]
    fn the_array_mode_the_soak_expects() {
        let volume = |mode: pb::Mode, writable: bool, method: pb::SnapshotMethod| {
            let mut v = pb::VolumeStatus {
                snapshot_writable: writable,
                ..Default::default()
            };
            v.set_data_mode(mode);
            v.set_snapshot_method(method);
            v
        };
        let split = pb::SnapshotMethod::Split;
        let cases = [
            (
                false,
                volume(pb::Mode::Snapshot, false, split),
                Some((MirrorMode::HostManaged, false)),
            ),
            (
                false,
                volume(pb::Mode::Resynchronizing, false, split),
                Some((MirrorMode::HostManaged, false)),
            ),
            (
                true,
                volume(pb::Mode::Synchronized, false, split),
                Some((MirrorMode::Synchronized, false)),
            ),
            (
                true,
                volume(pb::Mode::Snapshot, false, split),
                Some((MirrorMode::Snapshot, false)),
            ),
            (
                true,
                volume(pb::Mode::Snapshot, true, split),
                Some((MirrorMode::Snapshot, true)),
            ),
            (
                true,
                volume(pb::Mode::Resynchronizing, false, split),
                Some((MirrorMode::Resynchronizing, false)),
            ),
            (
                true,
                volume(pb::Mode::Snapshot, false, pb::SnapshotMethod::Cow),
                None,
            ),
        ];
        for (stateful, volume, expected) in cases {
            assert_eq!(
                expected_array_mode(stateful, &volume),
                expected,
                "stateful {stateful}: {volume:?}"
            );
        }
        let mut restoring = volume(pb::Mode::Synchronized, false, split);
        restoring.restore = Some(Default::default());
        assert_eq!(expected_array_mode(true, &restoring), None);
        assert_eq!(
            array_mode_text((MirrorMode::Snapshot, true)),
            "SNAPSHOT (mate writable)"
        );
    }
}
