//! The background resync of Fig. 7: one task per volume copies what the
//! update location table records from origin to mate (or, for a pair no
//! journal vouches for, compares the whole volume and copies what
//! differs), then marks the pair Synchronized.
//!
//! Every failure of a step — an array call, the whole-volume compare, the
//! journal refusing the Synchronized state — is retried after a wait from
//! one [`Backoff`] (100 ms doubling to 2 s), reset by the next step that
//! succeeds. Nothing here retries without waiting.

use std::ops::Range;
use std::sync::Arc;

use splitmirror_proto::client::Backoff;
use splitmirror_proto::range_lock::LockMode;

use super::{SnapshotManager, Volume};
use crate::array_port::OwnAccess;
use crate::crash;
use crate::error::DbError;
use crate::lu_status::PairState;

/// How the resync copies a recorded range from origin to mate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResyncMethod {
    /// Read the range from the origin LU, write it to the mirror LU
    /// (claim 3): the data crosses the network twice.
    WriteBack,
    /// `CopyRange` origin → mate inside the array (claim 4).
    #[default]
    Offload,
}

/// A resync method name that is neither `writeback` nor `offload`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown resync method {0:?} (writeback or offload)")]
pub struct UnknownResyncMethod(pub String);

impl std::str::FromStr for ResyncMethod {
    type Err = UnknownResyncMethod;
    fn from_str(text: &str) -> Result<Self, UnknownResyncMethod> {
        match text {
            "writeback" | "write-back" => Ok(Self::WriteBack),
            "offload" => Ok(Self::Offload),
            other => Err(UnknownResyncMethod(other.to_string())),
        }
    }
}

/// Recorded ranges one resync step copies side by side.
pub(super) const RESYNC_RANGES_IN_FLIGHT: usize = 8;

/// Resync progress of one volume since the snapshot was deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResyncProgress {
    pub running: bool,
    pub ranges_done: u64,
    pub bytes_done: u64,
    pub ranges_total: u64,
    pub bytes_total: u64,
}

/// What one step of a resync pass did.
enum Step {
    /// Compared the whole volume, or copied a batch of ranges (or found a
    /// write recorded one meanwhile): there may be more to do.
    Progress,
    /// The table is empty and the pair is Synchronized: the pass is over.
    Done,
}

/// What a step of the resync failed at (for the log; every one is retried
/// after the backoff's wait).
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("whole-volume compare failed: {0}")]
    Compare(#[source] DbError),
    #[error("copy failed: {0}")]
    Copy(#[source] DbError),
    #[error("journaling Synchronized failed: {0}")]
    JournalSynchronized(#[source] DbError),
    #[error("making the mate writable again failed: {0}")]
    MateAccess(#[source] DbError),
    #[error("setting the array's mode failed: {0}")]
    ArrayMode(#[source] DbError),
}

impl SnapshotManager {
    /// One task per volume: sleeps until woken, copies while the pair is
    /// Resynchronizing, ends on shutdown.
    pub(super) async fn resync_loop(self: Arc<Self>, vol: Arc<Volume>) {
        loop {
            let woken = vol.resync_wakeup.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if vol.inner().state == PairState::Resynchronizing {
                // The pass continues the trace of the delete that woke it.
                let span = tracing::info_span!("resync", volume = vol.volume());
                std::mem::take(&mut vol.inner().resync_parent).adopt(&span);
                tracing::Instrument::instrument(self.resync_pass(&vol), span).await;
            }
            tokio::select! {
                () = &mut woken => {}
                () = self.cancel.cancelled() => return,
            }
        }
    }

    /// Steps until the table is empty and the pair Synchronized, or until
    /// shutdown. A step that fails is tried again after the backoff's wait.
    async fn resync_pass(&self, vol: &Volume) {
        let mut backoff = Backoff::standard();
        vol.inner().resync.running = true;
        loop {
            if self.cancel.is_cancelled() {
                return;
            }
            match self.resync_step(vol).await {
                Ok(Step::Done) => return,
                Ok(Step::Progress) => backoff.reset(),
                Err(_) if self.cancel.is_cancelled() => return,
                Err(error) => {
                    let wait = backoff.next_wait();
                    tracing::warn!(
                        volume = vol.volume(),
                        "resync: {error}; retrying in {wait:?}"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = self.cancel.cancelled() => return,
                    }
                }
            }
        }
    }

    /// One step: the whole-volume compare if one is pending; otherwise a
    /// batch of recorded ranges; otherwise, with no write in flight (a
    /// failing one could still record a range), the switch to
    /// Synchronized, journaled before it takes effect (durability rule 2).
    async fn resync_step(&self, vol: &Volume) -> Result<Step, StepError> {
        // Nothing is copied into the mate before the array lets db-server
        // write it again: normally the delete did, but a SetAccess that
        // failed to be undone, or a crash, can leave it read-only.
        self.ensure_mate_access(vol, OwnAccess::Configured, "resynchronizing")
            .await
            .map_err(StepError::MateAccess)?;
        // A stateful array lets the resync copy into the mate only in
        // RESYNCHRONIZING: a delete whose ModeSelect failed left it unknown.
        self.ensure_array_mode(vol)
            .await
            .map_err(StepError::ArrayMode)?;
        if vol.inner().full_resync_pending {
            self.compare_whole_volume(vol)
                .await
                .map_err(StepError::Compare)?;
            vol.inner().full_resync_pending = false;
            return Ok(Step::Progress);
        }
        let block_size_bytes = u64::from(vol.pair.block_size_bytes);
        let chunk_blocks = (self.config.resync_chunk_bytes / block_size_bytes).max(1);
        let batch = vol
            .inner()
            .table
            .first_ranges(chunk_blocks, RESYNC_RANGES_IN_FLIGHT);
        if !batch.is_empty() {
            self.copy_batch(vol, batch).await.map_err(StepError::Copy)?;
            return Ok(Step::Progress);
        }
        // The mode gate keeps writes out, and is let go (by returning)
        // before any wait.
        let _mode = vol.mode_gate.write().await;
        let finished = {
            let inner = vol.inner();
            inner.table.is_empty() && inner.state == PairState::Resynchronizing
        };
        if finished {
            self.journal_state(&vol.pair, &PairState::Synchronized)
                .await
                .map_err(StepError::JournalSynchronized)?;
            crash::point("resync.after_journal_synchronized");
            // Journaled: the pair is Synchronized whatever the array says
            // now. A failure leaves the array's mode unknown (it stays
            // RESYNCHRONIZING at worst: writes to both, mate unreadable),
            // set again before the next Read or Write.
            self.try_follow_array_mode(vol, &PairState::Synchronized, "resync complete")
                .await;
        }
        let mut inner = vol.inner();
        if !inner.table.is_empty() {
            return Ok(Step::Progress);
        }
        if inner.state == PairState::Resynchronizing {
            inner.state = PairState::Synchronized;
            inner.full_resync_reason = None;
            tracing::info!(
                volume = vol.volume(),
                ranges = inner.resync.ranges_done,
                bytes = inner.resync.bytes_done,
                "resync complete, pair synchronized"
            );
        }
        inner.resync.running = false;
        Ok(Step::Done)
    }

    /// Copies a batch of disjoint recorded ranges.
    async fn copy_batch(&self, vol: &Volume, batch: Vec<Range<u64>>) -> Result<(), DbError> {
        if self.config.resync_skips_recheck() {
            // The broken variant of a test hook: no lock, no re-check.
            for range in batch {
                self.copy(vol, range.clone()).await?;
                self.record_copied(vol, range);
            }
            return Ok(());
        }
        // Each range under its own lock, copied side by side, so that many
        // small ranges do not wait on one round trip each.
        let copies = batch
            .into_iter()
            .map(|range| self.copy_recorded(vol, range));
        futures_util::future::join_all(copies)
            .await
            .into_iter()
            .collect::<Result<Vec<()>, DbError>>()
            .map(drop)
    }

    /// Holds `range` against writes, re-checks what in it is still
    /// recorded (a write may have copied and removed part of it since it was
    /// picked), copies that, and removes it before letting writes in again.
    async fn copy_recorded(&self, vol: &Volume, range: Range<u64>) -> Result<(), DbError> {
        let _blocks = vol.blocks.lock(range.clone(), LockMode::Exclusive).await;
        let recorded = vol.inner().table.recorded_within(range);
        for sub in recorded {
            self.copy(vol, sub.clone()).await?;
            crash::point("resync.after_copy");
            self.record_copied(vol, sub);
            crash::point("resync.after_remove");
        }
        Ok(())
    }

    /// The whole-volume resync. Digests of origin and mate are asked for
    /// in batches (the array hashes holes without reading them); a chunk
    /// whose digests differ is locked against writes, compared again, and
    /// copied if it still differs. A chunk that compared equal needs no lock:
    /// writes in Resynchronizing mode go to the mirror LU (both sides), and a
    /// write caught half-done shows as a difference and is re-checked.
    async fn compare_whole_volume(&self, vol: &Volume) -> Result<(), DbError> {
        /// Chunks asked for in one `ChecksumRange` call per side.
        const BATCH_CHUNKS: u64 = 256;
        let pair = vol.pair;
        let block_size_bytes = u64::from(pair.block_size_bytes);
        let chunk_blocks = (self.config.resync_chunk_bytes / block_size_bytes).max(1);
        {
            let mut inner = vol.inner();
            inner.resync.running = true;
            inner.resync.bytes_total = inner.resync.bytes_done
                + (pair.block_count + inner.table.block_count()) * block_size_bytes;
        }
        let mut copied_chunks = 0u64;
        let mut lba = 0;
        while lba < pair.block_count {
            if self.cancel.is_cancelled() {
                return Err(DbError::ShuttingDown);
            }
            let n = (chunk_blocks * BATCH_CHUNKS).min(pair.block_count - lba);
            let (origin, mate) = tokio::join!(
                self.array.checksums(pair.origin_lu, lba, n, chunk_blocks),
                self.array.checksums(pair.mate_lu, lba, n, chunk_blocks)
            );
            let (origin, mate) = (origin?, mate?);
            for (index, (o, m)) in origin.iter().zip(&mate).enumerate() {
                if o == m {
                    continue;
                }
                let start = lba + index as u64 * chunk_blocks;
                let blocks = chunk_blocks.min(pair.block_count - start);
                let _blocks = vol
                    .blocks
                    .lock(start..start + blocks, LockMode::Exclusive)
                    .await;
                let (o, m) = tokio::join!(
                    self.array.checksums(pair.origin_lu, start, blocks, blocks),
                    self.array.checksums(pair.mate_lu, start, blocks, blocks)
                );
                if o? != m? {
                    self.copy(vol, start..start + blocks).await?;
                    copied_chunks += 1;
                }
            }
            vol.inner().resync.bytes_done += n * block_size_bytes;
            lba += n;
        }
        vol.inner().compare_copied_chunks = Some(copied_chunks);
        let new_pair = std::mem::take(&mut vol.inner().full_resync_new_pair);
        if new_pair && copied_chunks > 0 {
            // A new pair on a fresh array compares equal; one that differs
            // was written before, so a journal that knew it was lost (or
            // the array was written past db-server), and a snapshot held
            // then is gone.
            tracing::warn!(
                volume = vol.volume(),
                copied_chunks,
                "origin and mate of a pair the journal had no record of differed in \
                 {copied_chunks} chunks (a lost or deleted journal, or writes past db-server): \
                 copied the origin over the mate"
            );
        } else {
            tracing::info!(
                volume = vol.volume(),
                copied_chunks,
                "whole-volume resync compared every chunk"
            );
        }
        Ok(())
    }

    fn record_copied(&self, vol: &Volume, blocks: Range<u64>) {
        let bytes = (blocks.end - blocks.start) * u64::from(vol.pair.block_size_bytes);
        let mut inner = vol.inner();
        inner.table.remove(blocks);
        splitmirror_proto::telemetry::record_resync_progress(bytes, inner.table.block_count());
        inner.resync.ranges_done += 1;
        inner.resync.bytes_done += bytes;
        let remaining_bytes = inner.table.block_count() * u64::from(vol.pair.block_size_bytes);
        inner.resync.bytes_total = inner.resync.bytes_done + remaining_bytes;
        inner.resync.ranges_total = inner.resync.ranges_done + inner.table.range_count() as u64;
    }

    async fn copy(&self, vol: &Volume, blocks: Range<u64>) -> Result<(), DbError> {
        let pair = vol.pair;
        let count = blocks.end - blocks.start;
        if let Some(pace) = &self.resync_pace {
            pace.take(count * u64::from(pair.block_size_bytes)).await;
        }
        match self.config.resync_method {
            ResyncMethod::Offload => {
                self.array
                    .copy_range_guaranteed(
                        pair.origin_lu,
                        pair.mate_lu,
                        blocks.start,
                        count,
                        self.config.resync_min_bytes_per_s,
                    )
                    .await?
            }
            ResyncMethod::WriteBack => {
                let data = self.array.read(pair.origin_lu, blocks.start, count).await?;
                self.write_lu(&pair, pair.mirror_lu, blocks.start, data)
                    .await?
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::array_port::{MemoryArray, PairInfo};
    use crate::journal::full_disk;
    use crate::lu_status::{Mode, VirtualLu};
    use crate::manager::ManagerConfig;

    const PAIR: PairInfo = PairInfo {
        mirror_lu: 0,
        origin_lu: 1,
        mate_lu: 2,
        block_size_bytes: 512,
        block_count: 64,
    };

    /// A journal that cannot record Synchronized (its disk is full) must be
    /// retried after waits that grow, not in a loop: over 1.5 s the
    /// backoff (100 ms doubling) allows about four attempts, a hot loop
    /// hundreds. Once the disk has room the pair becomes Synchronized.
    #[tokio::test]
    async fn a_journal_that_refuses_synchronized_is_retried_with_backoff() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (journal, durable, disk) = full_disk::open(dir.path(), 4096);
        let array = Arc::new(MemoryArray::new(vec![PAIR]));
        let manager = SnapshotManager::start(
            array.clone(),
            vec![PAIR],
            Some((journal, durable)),
            ManagerConfig::default(),
            CancellationToken::new(),
            TaskTracker::new(),
        )
        .await
        .expect("start");
        manager
            .wait_synchronized(0, Duration::from_secs(5))
            .await
            .expect("a new pair is compared, then synchronized");
        manager.acquire(0, "run-a", 0).await.expect("acquire");
        manager
            .write(0, VirtualLu::Data, 4, vec![7; 512])
            .await
            .expect("write");
        // Hold the resync at its copy while the disk fills, so that the
        // first journal write to fail is the one of Synchronized.
        array.fail_copies.store(true, Ordering::SeqCst);
        manager.delete(0, "run-a", false).await.expect("delete");
        disk.fill();
        array.fail_copies.store(false, Ordering::SeqCst);

        let first_refusal = tokio::time::Instant::now() + Duration::from_secs(10);
        while disk.refused_appends() == 0 {
            assert!(
                tokio::time::Instant::now() < first_refusal,
                "the resync never tried to journal Synchronized"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let before = disk.refused_appends();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let attempts = disk.refused_appends() - before;
        assert!(
            (1..=8).contains(&attempts),
            "{attempts} attempts to journal Synchronized in 1.5 s: the retry does not back off"
        );
        assert_eq!(
            manager.status()[0].routing.data_mode,
            Mode::Resynchronizing,
            "not Synchronized before the journal says so"
        );

        disk.free();
        manager
            .wait_synchronized(0, Duration::from_secs(10))
            .await
            .expect("synchronized once the disk has room");
        assert_eq!(array.lu(1), array.lu(2));
        manager.close_journal();
    }
}
