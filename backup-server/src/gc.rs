//! Garbage collection beside running backups, on a store that offers only
//! put, get, list and delete (S3 has no access time to touch, no rename,
//! no conditional delete). ARCHITECTURE.md, "Garbage collection", gives the
//! argument; in short:
//!
//! - A backup first writes a **writer record** (`writers/<id>.json`) naming
//!   every digest it may reference — it knows them all from the array's
//!   `ChecksumRange` before it reads anything — and keeps it fresh while it
//!   runs. Then it lists the **collector leases** (`collectors/`) and waits
//!   until every collector it saw has ended (or its lease has run out).
//!   Only then does it list the chunks the store holds and decide which to
//!   reuse. It writes its index last, then removes its writer record.
//! - A collector writes its lease first, then lists the writer records
//!   (their digests are kept), then the indexes (their digests are kept),
//!   then the chunks; it removes a chunk only if neither kept it and it is
//!   older than the grace period, and only while its lease holds.
//!
//! Either the collector lists a backup's writer record, or the backup lists
//! the collector's lease (each writes before it lists, and the store is
//! read-after-write consistent): so a chunk a backup decided to reuse is
//! never removed. Removing the writer record after the index is written,
//! and listing writers before indexes, closes the other end.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::blobs::BlobError;
use crate::manifest;
use crate::store::{CHUNKS, ChunkStore, StoreError, chunk_key};

const WRITERS: &str = "writers/";
const COLLECTORS: &str = "collectors/";
/// How long a collector's lease runs; it renews it at half-time and stops
/// removing chunks if it cannot.
pub const COLLECTOR_LEASE: Duration = Duration::from_secs(60);
/// How often a backup waiting for a collector looks again.
const WAIT_POLL: Duration = Duration::from_millis(200);

/// `writers/<backup id>.json`: the digests a running backup may reference.
#[derive(Debug, Serialize, Deserialize)]
struct WriterRecord {
    backup_id: String,
    started_at_unix_ms: u64,
    /// Hex digests of the chunks the backup may reference (not all-zero).
    digests: Vec<String>,
}

/// `collectors/<id>.json`: a running garbage collection.
#[derive(Debug, Serialize, Deserialize)]
struct CollectorRecord {
    collector_id: String,
    started_at_unix_ms: u64,
    /// Until when it may remove chunks (its own clock).
    lease_until_unix_ms: u64,
}

/// What one garbage collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub chunks_listed: u64,
    pub chunks_referenced: u64,
    pub chunks_protected: u64,
    pub chunks_young: u64,
    pub chunks_removed: u64,
    pub bytes_removed: u64,
    pub writers_active: u32,
    pub writers_expired: u32,
}

/// A running backup's writer record: kept fresh while this lives, removed
/// by [`WriterGuard::finish`] (or left to expire after a crash).
pub struct WriterGuard {
    key: String,
    refreshed_unix_ms: Arc<AtomicU64>,
    stop: CancellationToken,
    refresher: tokio::task::JoinHandle<()>,
    grace: Duration,
}

impl WriterGuard {
    /// Fails unless the record was refreshed within half the grace period:
    /// past that, a collector could soon take it for a crashed backup's.
    pub fn check_fresh(&self) -> Result<(), StoreError> {
        let age_ms =
            manifest::now_unix_ms().saturating_sub(self.refreshed_unix_ms.load(Ordering::Relaxed));
        if Duration::from_millis(age_ms) > self.grace / 2 {
            return Err(StoreError::Blob(BlobError::Failed {
                doing: format!("keeping the writer record {} fresh", self.key),
                message: format!(
                    "it was last written {age_ms} ms ago, over half the grace period of {:?}: chunks this backup reuses are no longer protected from garbage collection",
                    self.grace
                ),
            }));
        }
        Ok(())
    }

    /// Stops refreshing and removes the record (after the index is
    /// written, or when the backup failed). A failure to remove it is
    /// logged: the record expires after the grace period.
    pub async fn finish(self, store: &ChunkStore) {
        self.stop.cancel();
        let _ = self.refresher.await;
        if let Err(e) = store.blobs().delete(&self.key).await {
            tracing::warn!(
                "removing the writer record {}: {e} (it expires after the grace period)",
                self.key
            );
        }
    }
}

impl ChunkStore {
    /// Before a backup decides what to reuse: records the digests it may
    /// reference, waits for every collector that may not have seen the
    /// record, and answers the chunks the store holds from then on.
    pub async fn begin_writing(
        self: &Arc<Self>,
        backup_id: &str,
        digests: &[[u8; 32]],
        cancel: &CancellationToken,
    ) -> Result<(WriterGuard, HashSet<[u8; 32]>), StoreError> {
        let unique: HashSet<[u8; 32]> = digests.iter().copied().collect();
        let record = WriterRecord {
            backup_id: backup_id.to_string(),
            started_at_unix_ms: manifest::now_unix_ms(),
            digests: unique.iter().map(manifest::to_hex).collect(),
        };
        let body = serde_json::to_vec(&record).expect("a writer record serializes");
        let key = format!("{WRITERS}{backup_id}.json");
        self.blobs().put(&key, body.clone()).await?;
        let refreshed_unix_ms = Arc::new(AtomicU64::new(manifest::now_unix_ms()));
        let stop = CancellationToken::new();
        let refresher = {
            let store = self.clone();
            let key = key.clone();
            let refreshed = refreshed_unix_ms.clone();
            let stop = stop.clone();
            let every = (self.gc_grace() / 4).max(Duration::from_millis(100));
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(every) => {}
                        () = stop.cancelled() => return,
                    }
                    match store.blobs().put(&key, body.clone()).await {
                        Ok(()) => refreshed.store(manifest::now_unix_ms(), Ordering::Relaxed),
                        Err(e) => tracing::warn!("refreshing the writer record {key}: {e}"),
                    }
                }
            })
        };
        let guard = WriterGuard {
            key,
            refreshed_unix_ms,
            stop,
            refresher,
            grace: self.gc_grace(),
        };
        #[cfg(feature = "testing")]
        self.hooks.writer_recorded.pass().await;
        let waited = async {
            if !self.skip_wait_for_collectors() {
                self.wait_for_collectors(cancel).await?;
            }
            self.held_chunks().await
        }
        .await;
        match waited {
            Ok(held) => Ok((guard, held)),
            Err(e) => {
                guard.finish(self).await;
                Err(e)
            }
        }
    }

    #[cfg(feature = "testing")]
    fn skip_wait_for_collectors(&self) -> bool {
        self.hooks
            .canary_skip_wait_for_collectors
            .load(Ordering::Relaxed)
    }

    #[cfg(not(feature = "testing"))]
    fn skip_wait_for_collectors(&self) -> bool {
        false
    }

    #[cfg(feature = "testing")]
    fn collector_ignores_writers(&self) -> bool {
        self.hooks
            .canary_collector_ignores_writers
            .load(Ordering::Relaxed)
    }

    #[cfg(not(feature = "testing"))]
    fn collector_ignores_writers(&self) -> bool {
        false
    }

    /// Waits until no collector whose lease holds is running.
    async fn wait_for_collectors(&self, cancel: &CancellationToken) -> Result<(), StoreError> {
        let mut logged = false;
        loop {
            let mut running = Vec::new();
            for meta in self.blobs().list(COLLECTORS).await? {
                let record: CollectorRecord = match self.blobs().get(&meta.key).await {
                    Ok(bytes) => match serde_json::from_slice(&bytes) {
                        Ok(record) => record,
                        Err(e) => {
                            tracing::warn!(
                                "ignoring the unreadable collector lease {}: {e}",
                                meta.key
                            );
                            continue;
                        }
                    },
                    Err(BlobError::NotFound(_)) => continue,
                    Err(e) => return Err(e.into()),
                };
                if record.lease_until_unix_ms > manifest::now_unix_ms() {
                    running.push(record.collector_id);
                }
            }
            if running.is_empty() {
                return Ok(());
            }
            if !logged {
                tracing::info!(
                    "waiting for garbage collection {} to end before deciding which chunks to reuse",
                    running.join(", ")
                );
                logged = true;
            }
            tokio::select! {
                () = tokio::time::sleep(WAIT_POLL) => {}
                () = cancel.cancelled() => return Err(StoreError::Blob(BlobError::Failed {
                    doing: "waiting for garbage collection".into(),
                    message: "cancelled".into(),
                })),
            }
        }
    }

    /// Removes every chunk that no index references, no running backup's
    /// writer record names, and that is older than the grace period.
    pub async fn collect_garbage(&self) -> Result<GcReport, StoreError> {
        let collector_id = uuid::Uuid::now_v7().to_string();
        let lease_key = format!("{COLLECTORS}{collector_id}.json");
        let started_at_unix_ms = manifest::now_unix_ms();
        let lease_until = self
            .renew_lease(&lease_key, &collector_id, started_at_unix_ms)
            .await?;
        let collected = self
            .collect_under_lease(&lease_key, &collector_id, started_at_unix_ms, lease_until)
            .await;
        if let Err(e) = self.blobs().delete(&lease_key).await {
            tracing::warn!("removing the collector lease {lease_key}: {e} (it runs out by itself)");
        }
        collected
    }

    /// Writes the collector's lease; answers until when it holds.
    async fn renew_lease(
        &self,
        key: &str,
        collector_id: &str,
        started_at_unix_ms: u64,
    ) -> Result<u64, StoreError> {
        let lease_until_unix_ms = manifest::now_unix_ms() + COLLECTOR_LEASE.as_millis() as u64;
        let record = CollectorRecord {
            collector_id: collector_id.to_string(),
            started_at_unix_ms,
            lease_until_unix_ms,
        };
        let body = serde_json::to_vec(&record).expect("a collector record serializes");
        self.blobs().put(key, body).await?;
        Ok(lease_until_unix_ms)
    }

    async fn collect_under_lease(
        &self,
        lease_key: &str,
        collector_id: &str,
        started_at_unix_ms: u64,
        mut lease_until: u64,
    ) -> Result<GcReport, StoreError> {
        let mut report = GcReport::default();
        let grace_ms = self.gc_grace().as_millis() as u64;
        // 1. Writers first: a backup that finishes after this listing has
        //    its index written before its record is removed, so the index
        //    listing below sees it.
        let mut protected = HashSet::new();
        for meta in self.blobs().list(WRITERS).await? {
            if meta.modified_unix_ms + grace_ms < manifest::now_unix_ms() {
                tracing::warn!(
                    "removing the writer record {}: not refreshed for the grace period (its backup stopped without finishing)",
                    meta.key
                );
                self.blobs().delete(&meta.key).await?;
                report.writers_expired += 1;
                continue;
            }
            let record: WriterRecord = match self.blobs().get(&meta.key).await {
                Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Damaged {
                    what: format!("the writer record {}", meta.key),
                    why: e.to_string(),
                })?,
                // Finished since the listing: its index is listed below.
                Err(BlobError::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            report.writers_active += 1;
            if self.collector_ignores_writers() {
                continue;
            }
            for hex in &record.digests {
                let digest = manifest::from_hex(hex).ok_or_else(|| StoreError::Damaged {
                    what: format!("the writer record {}", meta.key),
                    why: format!("{hex:?} is not a digest"),
                })?;
                protected.insert(digest);
            }
        }
        #[cfg(feature = "testing")]
        self.hooks.collector_listed_writers.pass().await;
        // 2. Every index: a damaged one stops the collection, since what it
        //    references cannot be known.
        let mut referenced = HashSet::new();
        for id in self.backup_ids().await? {
            let manifest = match self.manifest(&id).await {
                Ok(manifest) => manifest,
                Err(StoreError::NotFound(_)) => continue, // pruned meanwhile
                Err(e) => return Err(e),
            };
            let digests = manifest.digests().map_err(|index| StoreError::Damaged {
                what: format!("the index of backup {id}"),
                why: format!("chunk digest {index} is not a hex BLAKE3 digest"),
            })?;
            referenced.extend(digests);
        }
        // 3. The chunks, and what may go.
        let cutoff_unix_ms = manifest::now_unix_ms().saturating_sub(grace_ms);
        let mut doomed = Vec::new();
        for meta in self.blobs().list(CHUNKS).await? {
            report.chunks_listed += 1;
            let Some(digest) = meta
                .key
                .rsplit('/')
                .next()
                .and_then(manifest::from_hex)
                .filter(|d| chunk_key(d) == meta.key)
            else {
                continue; // not a chunk this store wrote: left alone
            };
            if referenced.contains(&digest) {
                report.chunks_referenced += 1;
            } else if protected.contains(&digest) {
                report.chunks_protected += 1;
            } else if meta.modified_unix_ms > cutoff_unix_ms {
                report.chunks_young += 1;
            } else {
                doomed.push(meta);
            }
        }
        // 4. Remove, only while the lease holds.
        for meta in doomed {
            let now = manifest::now_unix_ms();
            if now + COLLECTOR_LEASE.as_millis() as u64 / 2 > lease_until {
                lease_until = self
                    .renew_lease(lease_key, collector_id, started_at_unix_ms)
                    .await?;
            }
            self.blobs().delete(&meta.key).await?;
            report.chunks_removed += 1;
            report.bytes_removed += meta.size_bytes;
        }
        // 5. What interrupted writes of a directory store left behind.
        match self.blobs().sweep_interrupted(self.gc_grace()).await {
            Ok(0) => {}
            Ok(swept) => tracing::info!("removed {swept} files of interrupted writes"),
            Err(e) => tracing::warn!("removing the files of interrupted writes: {e}"),
        }
        tracing::info!(
            removed = report.chunks_removed,
            bytes = report.bytes_removed,
            "garbage collection removed {} chunks ({} bytes); kept {} referenced, {} protected by running backups, {} younger than the grace period",
            report.chunks_removed,
            report.bytes_removed,
            report.chunks_referenced,
            report.chunks_protected,
            report.chunks_young
        );
        Ok(report)
    }
}

/// Test hooks: pause points inside the protocol and canaries that switch
/// one protection off (only with the `testing` feature).
#[cfg(feature = "testing")]
#[derive(Default)]
pub struct ProtocolHooks {
    /// A backup has written its writer record and not yet looked for
    /// collectors.
    pub writer_recorded: PausePoint,
    /// A collector has listed the writer records and not yet the indexes.
    pub collector_listed_writers: PausePoint,
    /// Canary: a backup does not wait for running collectors.
    pub canary_skip_wait_for_collectors: std::sync::atomic::AtomicBool,
    /// Canary: a collector does not keep the digests of writer records.
    pub canary_collector_ignores_writers: std::sync::atomic::AtomicBool,
}

/// A place where code stops, once armed, until the test releases it.
#[cfg(feature = "testing")]
#[derive(Default)]
pub struct PausePoint {
    armed: std::sync::atomic::AtomicBool,
    reached: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

#[cfg(feature = "testing")]
impl PausePoint {
    /// The next pass stops here.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Waits until code stopped here.
    pub async fn reached(&self) {
        self.reached.notified().await;
    }

    /// Lets the stopped code go on.
    pub fn release(&self) {
        self.release.notify_one();
    }

    pub(crate) async fn pass(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.reached.notify_one();
            self.release.notified().await;
        }
    }
}

#[cfg(feature = "testing")]
impl ChunkStore {
    /// The protocol's test hooks.
    pub fn hooks(&self) -> &ProtocolHooks {
        &self.hooks
    }
}
